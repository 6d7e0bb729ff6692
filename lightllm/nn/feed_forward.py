"""The GeLU feed-forward block of a transformer layer as one module."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightllm.ops.linear_gelu import APPROXIMATIONS, feed_forward, linear_gelu


class FeedForward(nn.Module):
    """``linear2(dropout(gelu(linear1(x)))) (+ residual)``: the feed-forward block of
    ``torch.nn.TransformerEncoderLayer(activation="gelu")`` (its ``_ff_block`` minus the outer
    ``dropout2``), on lightllm's fused kernels.

    ``linear1`` (d_model -> d_ff) and ``linear2`` (d_ff -> d_model) are plain ``nn.Linear``
    modules, so the ``linear1.*``/``linear2.*`` entries of a TransformerEncoderLayer state dict
    load unchanged. In eval mode, or with ``dropout=0``, the whole block is
    ``lightllm.functional.feed_forward`` (bias + GeLU in the first matmul's epilogue, bias +
    residual in the second's). With dropout active in training it runs ``linear_gelu`` (fused),
    then dropout on the activations, then ``F.linear`` (cuBLAS) and the residual add.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, approximate: str = "none",
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if approximate not in APPROXIMATIONS:
            raise ValueError(f"FeedForward: approximate must be 'none' or 'tanh', got "
                             f"{approximate!r}")
        factory = {"device": device, "dtype": dtype}
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, **factory)
        self.approximate = approximate

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.training and self.dropout.p > 0:
            h = self.dropout(linear_gelu(x, self.linear1.weight, self.linear1.bias,
                                         self.approximate))
            y = F.linear(h, self.linear2.weight, self.linear2.bias)
            return y if residual is None else y + residual
        return feed_forward(x, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                            self.linear2.bias, self.approximate, residual)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"

