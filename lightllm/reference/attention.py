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
    window_size: tuple[int, int] = (-1, -1),
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as plain tensor ops (``dropout_mask``: a fixed keep-mask).

    ``window_size=(left, right)``, lightllm's keyword beyond PyTorch: query i also sees only keys
    ``i - left .. i + right`` (negative: unbounded), aligned top-left like ``is_causal``."""
    if window_size != (-1, -1):
        local = window_mask(query.size(-2), key.size(-2), window_size, is_causal, shift=0,
                            device=query.device)
        if attn_mask is None:
            attn_mask = local
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & local
        else:
            attn_mask = attn_mask.masked_fill(~local, float("-inf"))
        is_causal = False
    scores = attention_scores(query, key, attn_mask, is_causal, scale, enable_gqa)
    probs = _safe_softmax(scores)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p) if dropout_p < 1.0 else probs * 0.0
    elif dropout_p > 0.0:
        probs = torch.dropout(probs, dropout_p, train=True)
    if enable_gqa:
        value = _repeat_kv(value, query.size(-3))
    return (probs @ value.to(probs.dtype)).to(query.dtype)



# ------------------------------------------------------------------------------------------------
# Local (sliding-window) masks, variable-length batches and KV caches (FlashAttention's API)
# ------------------------------------------------------------------------------------------------


def window_mask(n_q: int, n_k: int, window_size: tuple[int, int] = (-1, -1), causal: bool = False,
                shift: int | None = None, device=None) -> torch.Tensor:
    """(n_q, n_k) boolean mask (True = attend) of a causal and/or local window.

    Query i sits at key position ``i + shift`` (``shift`` defaults to ``n_k - n_q``: FlashAttention's
    bottom-right alignment, the queries being the last ``n_q`` positions) and sees key j iff
    ``i + shift - left <= j <= i + shift + right``; a negative ``left`` / ``right`` is unbounded and
    ``causal`` makes ``right`` 0."""
    left, right = window_size
    if causal:
        right = 0
    shift = n_k - n_q if shift is None else shift
    diag = torch.arange(n_q, device=device)[:, None] + shift
    cols = torch.arange(n_k, device=device)[None, :]
    mask = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= cols >= diag - left
    if right >= 0:
        mask &= cols <= diag + right
    return mask


def _lse(query, key, mask, scale):
    """(H, n_q) natural-log log-sum-exp of the masked scores (+inf for a row with nothing visible)."""
    scores = attention_scores(query, key, mask, False, scale, enable_gqa=True).float()
    lse = torch.logsumexp(scores, dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                           max_seqlen_k=None, dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), return_lse=False):
    """FlashAttention's ``flash_attn_varlen_func`` as a loop of per-sequence attention.

    q ``(total_q, H, D)``, k / v ``(total_k, Hkv, D)``; sequence s is rows
    ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q and ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of k/v.
    The causal / window mask is aligned bottom-right per sequence (:func:`window_mask`). Returns
    ``out`` ``(total_q, H, Dv)``, and with ``return_lse`` also the fp32 ``lse`` ``(H, total_q)``."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        qs = q[cq[s]:cq[s + 1]].transpose(0, 1)
        ks = k[ck[s]:ck[s + 1]].transpose(0, 1)
        vs = v[ck[s]:ck[s + 1]].transpose(0, 1)
        mask = window_mask(qs.shape[1], ks.shape[1], window_size, causal, device=q.device)
        out = scaled_dot_product_attention(qs, ks, vs, mask, dropout_p, scale=softmax_scale,
                                           enable_gqa=True)
        outs.append(out.transpose(0, 1))
        if return_lse:
            lses.append(_lse(qs, ks, mask, softmax_scale))
    out = torch.cat(outs) if outs else q.new_empty((0, *q.shape[1:-1], v.shape[-1]))
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else q.new_empty((q.shape[1], 0), dtype=torch.float32)
    return out, lse


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            block_table=None, softmax_scale=None, causal=True,
                            window_size=(-1, -1)):
    """FlashAttention's ``flash_attn_with_kvcache``, eager.

    q ``(B, Sq, H, D)``. ``k_cache`` / ``v_cache``: ``(B, max_len, Hkv, D)``, or pages
    ``(num_blocks, page_size, Hkv, D)`` with ``block_table`` ``(B, max_blocks)`` (int32: the
    pages of each sequence, in order). ``cache_seqlens`` (int or int32 ``(B,)``; default the whole
    cache) is each sequence's cached length; new ``k`` / ``v`` ``(B, Sn, Hkv, D)`` are written in
    place at positions ``cache_seqlens[b] ..`` first, and the queries (the last Sq positions)
    attend to the ``cache_seqlens[b] + Sn`` keys of their sequence, the mask aligned
    bottom-right. Returns ``(B, Sq, H, Dv)``."""
    B = q.shape[0]
    paged = block_table is not None
    page = k_cache.shape[1]
    if cache_seqlens is None:
        lengths = [block_table.shape[1] * page if paged else k_cache.shape[1]] * B
    elif isinstance(cache_seqlens, int):
        lengths = [cache_seqlens] * B
    else:
        lengths = cache_seqlens.tolist()

    def slots(b: int, start: int, n: int):
        pos = torch.arange(start, start + n, device=k_cache.device)
        if not paged:
            return torch.full_like(pos, b), pos
        return block_table[b].long()[pos // page], pos % page

    outs = []
    for b in range(B):
        n_new = 0 if k is None else k.shape[1]
        if n_new:
            blocks, offs = slots(b, lengths[b], n_new)
            k_cache[blocks, offs] = k[b]
            v_cache[blocks, offs] = v[b]
        n_k = lengths[b] + n_new
        blocks, offs = slots(b, 0, n_k)
        kb = k_cache[blocks, offs].transpose(0, 1)
        vb = v_cache[blocks, offs].transpose(0, 1)
        qb = q[b].transpose(0, 1)
        mask = window_mask(qb.shape[1], n_k, window_size, causal, device=q.device)
        out = scaled_dot_product_attention(qb, kb, vb, mask, scale=softmax_scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
    return torch.stack(outs)
