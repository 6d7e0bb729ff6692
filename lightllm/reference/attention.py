"""Eager reference of scaled dot-product attention (``torch.nn.functional.scaled_dot_product_attention``).

The user-level semantics written as plain tensor ops on the full score matrix: the "eager" baseline of
the benchmarks, in float64 the oracle of the tests, and what runs where the kernels cannot (autograd
by PyTorch). It follows PyTorch's math backend:

  scores = Q Kᵀ · scale (+ additive mask, or -inf where a boolean mask is False, or where the causal
           mask, aligned top-left, forbids: key j is visible to query i iff j <= i)
  P      = softmax(scores) over the keys; a row whose keys are all masked gives P = 0 (and so output
           0 and gradient 0), as PyTorch's ``_safe_softmax`` does
  out    = dropout(P) V
Half-precision inputs are computed in fp32 throughout and the output rounded once, as the math
backend does (multiplying Q Kᵀ in half precision first costs about 10x PyTorch's error).

With ``enable_gqa`` the key/value heads are repeated to the query heads (here only; the kernels map
head indices instead). ``dropout_mask`` (a keep-mask broadcastable to the scores) replaces the random
draw, so a test can check a kernel's dropout against this reference with the very same mask.
"""

from __future__ import annotations

import math

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """PyTorch's ``is_causal`` mask (True = attend): lower triangle aligned to the top-left corner."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def _repeat_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    if t.dim() < 3 or t.size(-3) == n_heads:
        return t
    return t.repeat_interleave(n_heads // t.size(-3), dim=-3)


def attention_scores(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The masked, scaled scores ``Q Kᵀ · scale + mask`` (fp32 for half inputs), -inf where masked."""
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa:
        key = _repeat_kv(key, query.size(-3))
    if query.dtype in _LOW_PRECISION:
        query, key = query.float(), key.float()
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = causal_mask(query.size(-2), key.size(-2), device=query.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    return scores


def _safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    # Rows with every key masked: softmax of a row of zeros (finite gradients), then zeroed.
    empty_row = (scores == float("-inf")).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1)
    return probs.masked_fill(empty_row, 0.0)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as plain tensor ops (``dropout_mask``: a fixed keep-mask)."""
    scores = attention_scores(query, key, attn_mask, is_causal, scale, enable_gqa)
    probs = _safe_softmax(scores)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p) if dropout_p < 1.0 else probs * 0.0
    elif dropout_p > 0.0:
        probs = torch.dropout(probs, dropout_p, train=True)
    if enable_gqa:
        value = _repeat_kv(value, query.size(-3))
    return (probs @ value.to(probs.dtype)).to(query.dtype)

