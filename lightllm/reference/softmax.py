"""Eager references for softmax and the fused scaled + masked softmax.

The user-level semantics written as plain tensor ops: the "eager" baseline of the benchmarks, in
float64 the oracle of the tests, and what runs where the extension cannot (autograd by PyTorch).
"""

from __future__ import annotations

import torch


def softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.softmax``: a row of all -inf gives NaN, as PyTorch does."""
    return torch.softmax(x, dim, dtype=dtype)


def causal_keep(nq: int, nk: int, device=None) -> torch.Tensor:
    """(nq, nk) bool, True where key j <= query i: top-left aligned, as SDPA's ``is_causal``."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def scaled_masked_softmax(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """``softmax(scale * x + mask)`` over the last dim; rows with nothing left give 0.

    ``mask`` broadcasts to ``x``: bool (True = keep, like SDPA's bool masks) or additive. The mask
    is applied first, then the causal mask (key j > query i dropped). A row whose scores are all
    -inf gives zeros (as SDPA does), with zero gradient, instead of softmax's NaN.
    """
    z = x * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask
    if is_causal:
        z = z.masked_fill(~causal_keep(x.shape[-2], x.shape[-1], x.device), float("-inf"))
    # Shift empty rows to 0 before the softmax so that neither the output nor the gradient is NaN.
    empty = (z == float("-inf")).all(-1, keepdim=True)
    return torch.softmax(z.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
