"""PyTorch's own modules that ``lightllm.patch`` swaps, by exact class.

Each lightllm class is a subclass of the torch class it replaces that adds no parameters or
buffers, so swapping ``module.__class__`` keeps the module object, its parameters, hooks and
``state_dict`` and changes only ``forward``. A subclass of a torch class (a model's own variant)
is left alone: its ``forward`` may do something else.
"""

from __future__ import annotations

from torch import nn

from .. import nn as lnn
from ..nn.transformer import fused_activation


def _swaps() -> dict[type[nn.Module], tuple[type[nn.Module], str]]:
    return {
        nn.LayerNorm: (lnn.LayerNorm, "norm"),
        nn.RMSNorm: (lnn.RMSNorm, "norm"),
        nn.Softmax: (lnn.Softmax, "softmax"),
        nn.MultiheadAttention: (lnn.MultiheadAttention, "attention"),
        nn.TransformerEncoderLayer: (lnn.TransformerEncoderLayer, "layer"),
        nn.TransformerDecoderLayer: (lnn.TransformerDecoderLayer, "layer"),
        nn.TransformerEncoder: (lnn.TransformerEncoder, "layer"),
    }


SWAPS = _swaps()


def _layer_problem(layer: nn.Module) -> str | None:
    """Why a Transformer layer's lightllm forward cannot serve it (its parts were replaced)."""
    for name in ("norm1", "norm2", "norm3"):
        norm = getattr(layer, name, None)
        if norm is not None and type(norm) not in (nn.LayerNorm, lnn.LayerNorm):
            return f"{name} is {type(norm).__name__}, not nn.LayerNorm"
    for name in ("self_attn", "multihead_attn"):
        attn = getattr(layer, name, None)
        if attn is not None and type(attn) not in (nn.MultiheadAttention, lnn.MultiheadAttention):
            return f"{name} is {type(attn).__name__}, not nn.MultiheadAttention"
    return None


def _layer_note(layer: nn.Module) -> str:
    if fused_activation(layer.activation) is None:
        name = getattr(layer.activation, "__name__", type(layer.activation).__name__)
        return f"activation {name} runs eagerly (lightllm fuses ReLU and GeLU)"
    return ""


def plan_module(module: nn.Module) -> tuple[str, type, str] | str | None:
    """``(kind, new class, note)`` to swap ``module``, a reason to leave it alone (reported), or
    None when it is nothing lightllm swaps."""
    cls = type(module)
    entry = SWAPS.get(cls)
    if entry is not None:
        new, kind = entry
        if kind == "layer" and hasattr(module, "activation"):
            problem = _layer_problem(module)
            if problem is not None:
                return f"{cls.__name__}: {problem}; its parts are patched one by one"
            return kind, new, _layer_note(module)
        return kind, new, ""
    if cls.__module__.startswith("lightllm."):
        return None  # already lightllm's
    for base in cls.__mro__[1:]:
        if base in SWAPS:
            return (f"{cls.__name__} subclasses torch.nn.{base.__name__}; its own forward is "
                    "kept")
    return None
