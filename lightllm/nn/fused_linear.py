"""The feed-forward block of a transformer layer as one module: the GeLU/ReLU block of
``torch.nn.TransformerEncoderLayer`` and the SwiGLU block of Llama."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightllm.ops.fused_linear import (
    APPROXIMATIONS,
    FEED_FORWARD_ACTIVATIONS,
    feed_forward,
    linear_act,
    swiglu_feed_forward,
)


class FeedForward(nn.Module):
    """``linear2(dropout(act(linear1(x)))) (+ residual)``: the feed-forward block of
    ``torch.nn.TransformerEncoderLayer`` (its ``_ff_block`` minus the outer ``dropout2``) with
    ``activation`` "gelu" (``approximate`` as in ``F.gelu``) or "relu", on lightllm's fused
    kernels.

    ``linear1`` (d_model -> d_ff) and ``linear2`` (d_ff -> d_model) are plain ``nn.Linear``
    modules, so the ``linear1.*``/``linear2.*`` entries of a TransformerEncoderLayer state dict
    load unchanged. In eval mode, or with ``dropout=0``, the whole block is
    ``lightllm.functional.feed_forward`` (bias + activation in the first matmul's epilogue, bias +
    residual in the second's). With dropout active in training it runs the fused linear +
    activation, then dropout on the activations, then ``F.linear`` (cuBLAS) and the residual add.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, approximate: str = "none",
                 bias: bool = True, device=None, dtype=None, activation: str = "gelu") -> None:
        super().__init__()
        if approximate not in APPROXIMATIONS:
            raise ValueError(f"FeedForward: approximate must be 'none' or 'tanh', got "
                             f"{approximate!r}")
        if activation not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"FeedForward: activation must be 'gelu' or 'relu', got "
                             f"{activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, **factory)
        self.approximate = approximate
        self.activation = activation

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return feed_forward_block(x, self.linear1, self.linear2, self.dropout.p, self.training,
                                  self.activation, self.approximate, residual)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, approximate={self.approximate!r}"


def feed_forward_block(x: Tensor, linear1: nn.Module, linear2: nn.Module, dropout: float,
                       training: bool, activation: str = "gelu", approximate: str = "none",
                       residual: Tensor | None = None) -> Tensor:
    """``linear2(dropout(act(linear1(x)))) (+ residual)`` on the weights of two ``nn.Linear``
    modules: the fused feed-forward unless dropout is active, else the fused first linear,
    dropout and cuBLAS for the second. Shared by :class:`FeedForward` and the patched layers."""
    if training and dropout > 0:
        act = "relu" if activation == "relu" else ("gelu_tanh" if approximate == "tanh" else "gelu")
        h = F.dropout(linear_act(x, linear1.weight, linear1.bias, act), dropout, True)
        y = F.linear(h, linear2.weight, linear2.bias)
        return y if residual is None else y + residual
    return feed_forward(x, linear1.weight, linear1.bias, linear2.weight, linear2.bias, approximate,
                        residual, activation)


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x)) (+ residual)``: the feed-forward of Llama
    (transformers' ``LlamaMLP`` with ``hidden_act="silu"``) on lightllm's fused kernels — one
    gated matmul for gate and up (silu(g) * u in its epilogue), then the down projection with its
    bias and the residual in its epilogue (``lightllm.functional.swiglu_feed_forward``).

    ``gate_proj``, ``up_proj`` (hidden_size -> intermediate_size) and ``down_proj``
    (intermediate_size -> hidden_size) are plain ``nn.Linear`` modules with ``bias`` as
    ``config.mlp_bias``, so a ``LlamaMLP`` state dict loads unchanged.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias, **factory)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        return swiglu_feed_forward(x, gate.weight, up.weight, down.weight, gate.bias, up.bias,
                                   down.bias, residual)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"
