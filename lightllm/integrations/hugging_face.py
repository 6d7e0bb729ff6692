"""Hugging Face transformers on lightllm: the ``"lightllm"`` attention implementation and the
modules ``lightllm.patch`` swaps inside a ``PreTrainedModel``.

Imported only once ``transformers`` is (``lightllm.integrations`` arranges that), so a user who
never imports transformers never pays for it.

Attention. Every model that picks its attention through ``ALL_ATTENTION_FUNCTIONS`` (BERT, RoBERTa,
DistilBERT, GPT-2, Llama, Mistral, Qwen2, SmolLM, ...) calls :func:`attention_forward` once
``config._attn_implementation == "lightllm"``. Transformers builds attention masks only for the
implementations its ``AttentionMaskInterface`` knows (for any other it hands in
``attention_mask=None`` and padding is silently dropped), so the name is registered there too, with
``sdpa_mask``: a boolean (B, 1, Q, KV) mask, True = attend, or None when causality alone applies.
A padding-free packed batch (one row of sequences back to back, from ``DataCollatorWithFlattening``:
``position_ids`` restarting per sequence, optionally ``cu_seq_lens_q/k``) runs the variable-length
kernel instead (``flash_attn_varlen_func``): each sequence attends only to itself, causally and
within a sliding window when the model has one, and the block-diagonal mask transformers builds
for such a row is never read.

Modules. transformers copies one implementation into many model files (``# Copied from``, modular
generation): 137 models share LlamaRMSNorm's forward. A module is swapped when its class's
``forward`` is, statement for statement (compared as syntax trees), one of the forms below and
its submodules are what that form expects; anything else is left alone and the report says why.
  rms_norm      LlamaRMSNorm          weight * rms_normalize(x.float()).to(x.dtype)
  linear_act    BertIntermediate      act(dense(x)), act GeLU (erf or tanh) or ReLU
  add_norm      BertOutput            LayerNorm(dropout(dense(x)) + input)  (and BertSelfOutput)
  mlp_conv1d    GPT2MLP               dropout(c_proj(act(c_fc(x)))), Conv1D weights (in, out)
  mlp_gated     LlamaMLP              down_proj(silu(gate_proj(x)) * up_proj(x))
The swapped class is a subclass of the model's own with only ``forward`` replaced: parameters,
buffers, hooks and ``state_dict`` are untouched and no weight is copied (Conv1D's (in, out) weight
is passed as a transposed view; the matmul kernels take any strides).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as LF
from ..nn.fused_linear import feed_forward_block
from ..nn.transformer import fused_activation
from ..ops.fused_linear import linear_act

ATTENTION = "lightllm"

# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None,
                      position_bias: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention interface on lightllm's SDPA.

    ``query`` (B, H, Q, D), ``key``/``value`` (B, Hkv, KV, D) with H a multiple of Hkv (grouped
    heads go to the kernel as ``enable_gqa``, never repeated in memory). Causality comes from
    ``is_causal`` or ``module.is_causal`` when no mask is given, as in transformers' SDPA path.
    Rows whose keys are all masked (left padding) give 0, never NaN. Returns (B, Q, H, D) and no
    attention weights.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("lightllm attention does not support softcap; use attn_implementation="
                         "'eager' for this model")
    q_len = query.shape[2]
    packed = _packed_sequences(query, key, kwargs)
    if packed is not None and position_bias is None:
        return _packed_attention(module, query, key, value, dropout, scaling, packed, kwargs), None
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal) and attention_mask is None and q_len > 1
    if is_causal and key.shape[2] > q_len:
        # Prefill into an empty static cache: keys past the queries are never attended.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if position_bias is not None:  # T5-style learned bias: one float mask with the padding
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal,
                                                   query, key)
        is_causal = False
    out = LF.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
        scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _packed_sequences(query: Tensor, key: Tensor, kwargs: dict):
    """``(cu_seqlens_q, cu_seqlens_k, max_q, max_k)`` of a padding-free packed batch, or None.

    A packed batch is one row (batch 1) of several sequences one after another, as
    ``DataCollatorWithFlattening`` makes it: either with its ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` kwargs (used as given, so nothing is read back from the device), or with
    ``position_ids`` that restart where a sequence starts (a position that is not its
    predecessor's + 1, transformers' own rule for its packed masks). The boundaries found from
    ``position_ids`` are computed once per forward pass (every layer receives the same tensor) and
    cost one read of the positions."""
    if query.shape[0] != 1 or query.shape[2] < 2:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(cu_q.diff().max()) if max_q is None else int(max_q)
        max_k = int(cu_k.diff().max()) if max_k is None else int(max_k)
        return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k
    positions = kwargs.get("position_ids")
    if torch.compiler.is_compiling():
        return None  # finding the boundaries reads the positions back: transformers' mask serves
    if not isinstance(positions, Tensor) or key.shape[2] != query.shape[2]:
        return None
    if positions.shape[-1] != query.shape[2] or positions.numel() != query.shape[2]:
        return None
    return _boundaries(positions)


_last_boundaries: list = [None, None, None]  # (weakref to position_ids, its _version, result)


def _boundaries(positions: Tensor):
    ref, version, found = _last_boundaries
    if ref is not None and ref() is positions and version == positions._version:
        return found
    flat = positions.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    index = starts.nonzero().flatten().to(torch.int32)
    if index.numel() < 2:
        found = None  # one sequence: the causal mask alone
    else:
        cu = torch.cat([index, index.new_tensor([flat.numel()])])
        longest = int(cu.diff().max())
        found = (cu, cu, longest, longest)
    _last_boundaries[:] = weakref.ref(positions), positions._version, found
    return found


def _packed_attention(module, query, key, value, dropout, scaling, packed, kwargs) -> Tensor:
    """Each packed sequence attends to itself alone (causal, and within the model's sliding
    window if it has one) through the variable-length kernel: no block-diagonal mask is read."""
    cu_q, cu_k, max_q, max_k = packed
    causal = bool(getattr(module, "is_causal", True))
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    left = window - 1 if isinstance(window, int) and window > 0 else -1
    out = LF.flash_attn_varlen_func(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
        max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=causal,
        window_size=(left, -1))
    return out.unsqueeze(0)


def register() -> None:
    """Register ``"lightllm"`` with transformers' attention and attention-mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def is_hf_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def set_attention(model: nn.Module, implementation: str | None) -> str | None:
    """Set ``model``'s attention implementation; returns the previous one."""
    previous = model.config._attn_implementation
    if implementation is not None and implementation != previous:
        model.set_attn_implementation(implementation)
    return previous


# ------------------------------------------------------------------------------------------------
# Module forms
# ------------------------------------------------------------------------------------------------


def _activation(act: nn.Module) -> tuple[str, str] | None:
    """``(activation, approximate)`` of a transformers activation module lightllm fuses."""
    name = type(act).__name__
    if type(act).__module__ == "transformers.activations":
        if name == "GELUActivation":  # F.gelu, or its erf formula in Python
            return "gelu", "none"
        if name in ("NewGELUActivation", "FastGELUActivation", "GELUTanh"):  # the tanh form
            return "gelu", "tanh"
        if name == "SiLUActivation":
            return "silu", "none"
    if isinstance(act, nn.SiLU) or act is F.silu:
        return "silu", "none"
    return fused_activation(act)


def _act_name(activation: str, approximate: str) -> str:
    return "gelu_tanh" if activation == "gelu" and approximate == "tanh" else activation


def _rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    return LF.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight,
                       self.variance_epsilon, cast_before_weight=True)


def _linear_act_forward(self, hidden_states: Tensor) -> Tensor:
    dense = self.dense
    return linear_act(hidden_states, dense.weight, dense.bias,
                      _act_name(*_activation(self.intermediate_act_fn)))


def _add_norm_forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    h = self.dropout(F.linear(hidden_states, self.dense.weight, self.dense.bias))
    norm = self.LayerNorm
    return LF.add_layer_norm(h, input_tensor, norm.normalized_shape, norm.weight, norm.bias,
                             norm.eps)[0]


class _Conv1DAsLinear:
    """The ``weight``/``bias`` of a transformers ``Conv1D`` (weight (in, out)) seen as an
    ``nn.Linear``'s (weight (out, in)): a transposed view, no copy."""

    __slots__ = ("weight", "bias")

    def __init__(self, conv: nn.Module) -> None:
        self.weight = conv.weight.t()
        self.bias = conv.bias


def _mlp_conv1d_forward(self, hidden_states: Tensor) -> Tensor:
    activation, approximate = _activation(self.act)
    y = feed_forward_block(hidden_states, _Conv1DAsLinear(self.c_fc), _Conv1DAsLinear(self.c_proj),
                           0.0, False, activation, approximate)
    return self.dropout(y)


def _mlp_gated_forward(self, x: Tensor) -> Tensor:
    gate, up, down = self.gate_proj, self.up_proj, self.down_proj
    return LF.swiglu_feed_forward(x, gate.weight, up.weight, down.weight, gate.bias, up.bias,
                                  down.bias)


def _is_linear(m) -> bool:
    return type(m) is nn.Linear


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")


def _fusable(*acts: str):
    def check(module, act):
        fused = _activation(act)
        if fused is None or fused[0] not in acts:
            return f"activation {type(act).__name__} has no fused lightllm kernel"
        return None
    return check


def _check_rms_norm(m):
    if not isinstance(getattr(m, "weight", None), nn.Parameter) or m.weight.dim() != 1:
        return "no 1-D weight"
    return None


def _check_linear_act(m):
    if not _is_linear(m.dense):
        return f"dense is {type(m.dense).__name__}, not nn.Linear"
    return _fusable("gelu", "relu")(m, m.intermediate_act_fn)


def _check_add_norm(m):
    if not _is_linear(m.dense):
        return f"dense is {type(m.dense).__name__}, not nn.Linear"
    if type(m.LayerNorm) not in (nn.LayerNorm, _lightllm_layer_norm()):
        return f"LayerNorm is {type(m.LayerNorm).__name__}, not nn.LayerNorm"
    return None


def _check_mlp_conv1d(m):
    if not (_is_conv1d(m.c_fc) and _is_conv1d(m.c_proj)):
        return "c_fc/c_proj are not transformers Conv1D"
    return _fusable("gelu", "relu")(m, m.act)


def _check_mlp_gated(m):
    if not all(_is_linear(getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj")):
        return "gate_proj/up_proj/down_proj are not nn.Linear"
    return _fusable("silu")(m, m.act_fn)


def _lightllm_layer_norm():
    from ..nn import LayerNorm

    return LayerNorm


# form: (template module, template class, kind, new forward, check)
_FORMS = {
    "rms_norm": ("llama", "LlamaRMSNorm", "norm", _rms_norm_forward, _check_rms_norm),
    "linear_act": ("bert", "BertIntermediate", "feed-forward", _linear_act_forward,
                   _check_linear_act),
    "add_norm": ("bert", "BertOutput", "norm", _add_norm_forward, _check_add_norm),
    "mlp_conv1d": ("gpt2", "GPT2MLP", "feed-forward", _mlp_conv1d_forward, _check_mlp_conv1d),
    "mlp_gated": ("llama", "LlamaMLP", "feed-forward", _mlp_gated_forward, _check_mlp_gated),
}
# Class names that say "I am a norm or a feed-forward": reported when no form matches.
_SUGGESTIVE = ("Norm", "MLP", "FFN", "FeedForward", "Intermediate")


def source_form(fn) -> str | None:
    """The statements of ``fn`` (docstring dropped) as a syntax-tree dump, or None."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef):
        return None
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                              ast.Constant):
        body = body[1:]
    args = [a.arg for a in func.args.args]
    return ast.dump(ast.Module(body=body, type_ignores=[])) + repr(args)


@functools.cache
def _templates() -> dict[str, str]:
    import importlib

    out = {}
    for form, (model, cls, *_) in _FORMS.items():
        module = importlib.import_module(f"transformers.models.{model}.modeling_{model}")
        out[form] = source_form(getattr(module, cls).forward)
    return out


@functools.cache
def _form_of(cls: type) -> str | None:
    forward = cls.__dict__.get("forward")
    if forward is None:
        return None
    body = source_form(forward)
    return next((form for form, tpl in _templates().items() if tpl is not None and body == tpl),
                None)


@functools.cache
def _swapped_class(cls: type, form: str) -> type:
    new_forward = _FORMS[form][3]
    return type(f"Lightllm{cls.__name__}", (cls,), {
        "forward": new_forward, "__module__": __name__, "__doc__": cls.__doc__,
        "_lightllm_form": form,
    })


def plan_module(module: nn.Module) -> tuple[str, type, str] | str | None:
    """For a transformers module: ``(kind, new class, note)`` to swap it, a reason string to leave
    it alone (reported), or None when it is not a candidate at all."""
    cls = type(module)
    if not cls.__module__.startswith("transformers."):
        return None
    form = _form_of(cls)
    if form is None:
        if cls.__name__.endswith(_SUGGESTIVE) and next(module.parameters(), None) is not None:
            return (f"{cls.__name__}.forward is none of the forms lightllm knows "
                    f"({', '.join(t[1] for t in _FORMS.values())})")
        return None
    _, template, kind, _, check = _FORMS[form]
    reason = check(module)
    if reason is not None:
        return f"{cls.__name__} has {template}'s form but {reason}"
    return kind, _swapped_class(cls, form), f"{template} form"


def is_swapped_class(cls: type) -> bool:
    return "_lightllm_form" in cls.__dict__
