"""Attention over a KV cache, dense or paged (FlashAttention's ``flash_attn_with_kvcache``).

The caches are ``(B, max_len, Hkv, D)`` (dense: the "page" of sequence b is b itself) or pages
``(num_pages, page_size, Hkv, D)`` with a ``(B, max_blocks)`` int32 block table. Two launches:

  1. ``_kvcache_append`` (only with new keys/values): one program per (sequence, new token, kv
     head) row copies that row of k and of v into the caches at position ``len[b] + t``, where
     ``len[b]`` is loaded from ``cache_seqlens`` on the device; a position outside the cache is
     not written. It runs before the attention on the same stream, so no program of (2) reads a
     key before it is written.
  2. ``_attention_kvcache_split``: the split-KV forward of ``attention_decode.py`` over the
     cache. One program per (key chunk, block of query rows, batch * kv head), all on grid axis 0
     (chunks fastest). A program's rows are (query token, head of the kv head's group) pairs,
     token-major, so K/V tiles are read once per GQA group and a row block covers a contiguous
     range of query tokens. The grid is sized from host-known numbers only (B, the cache's
     capacity per sequence, Sq); each program loads its sequence's length ``n_k = len[b] + Sn``
     (clamped to [0, capacity]) and walks only the key tiles of its chunk below ``n_k`` that the
     causal / local window of its rows can see (queries sit at the last Sq positions: token i at
     key position i + n_k - Sq). A chunk past the sequence runs no tile. Key tiles are gathered
     per row through the block table (each key row's page and offset), so a tile may straddle
     pages: any page size works; the page index read from the table is clamped to the cache, so a
     bad table cannot read outside it. With one chunk the program writes the output directly;
     otherwise it writes its chunk's normalised partial and log2-sum-exp, and
  3. ``attention_decode.combine_splits`` merges them (one program per query row).

No host synchronisation anywhere (lengths stay on the device): CUDA-graph capturable, and a replay
with other ``cache_seqlens`` attends over the new lengths. The split count comes from
``attention_decode``'s wave planning on the capacity (``cdiv(capacity, SPLIT_ALIGN)`` blocks),
cached per shape.

Grid sizes: the append has B·Sn·Hkv programs, the split kernel S·row blocks·B·Hkv (at most one
program per SPLIT_ALIGN cached key slots per row block and kv head), the combine B·H·Sq: each is
bounded by an element count of a tensor the caller passed (the op layer refuses past 2^31 - 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _device
from ._attention import (
    LOG2E,
    dot_precision,
    head_block,
    load_tile,
    seq_bucket,
    split_program,
    tuned,
)
from ._utils import autotune, cdiv, empty
from .attention_decode import (
    SPLIT_ALIGN,
    SPLIT_CONFIGS,
    combine_splits,
    plan,
    split_fits,
)

_KVCACHE = tuned(triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2), SPLIT_CONFIGS,
                 split_fits)


@triton.jit
def _sequence_length(Seqlens, off_b, seqlen, n_new, capacity, HAS_SEQLENS: tl.constexpr):
    """Keys of sequence ``off_b`` after the append: its cached length + n_new, within the cache."""
    if HAS_SEQLENS:
        start = tl.load(Seqlens + off_b)
    else:
        start = seqlen
    return start, tl.minimum(tl.maximum(start + n_new, 0), capacity)


@triton.jit
def _slots(Table, off_b, stride_tb, stride_tj, pos, ok, page_size, num_pages,
           PAGED: tl.constexpr):
    """(page, row within the page) of key positions ``pos`` of sequence ``off_b`` (int64);
    positions where ``ok`` is False give page 0 (they are never dereferenced)."""
    if PAGED:
        page = tl.load(Table + off_b * stride_tb + (pos // page_size).to(tl.int64) * stride_tj,
                       mask=ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        row = (pos % page_size).to(tl.int64)
    else:
        page = off_b + tl.zeros_like(pos).to(tl.int64)
        row = pos.to(tl.int64)
    return page, row


@triton.jit(do_not_specialize=["n_new", "seqlen", "page_size", "capacity", "num_pages"])
def _kvcache_append(
    K, V, KCache, VCache, Seqlens, Table,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_cp, stride_cr, stride_ch, stride_cd,
    stride_wp, stride_wr, stride_wh, stride_wd,
    stride_tb, stride_tj,
    n_new, n_kv_heads, seqlen, page_size, capacity, num_pages,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr,
):
    # -- this program: row (sequence b, new token t, kv head h), heads fastest --
    pid = tl.program_id(0)
    off_h = (pid % n_kv_heads).to(tl.int64)
    tok = ((pid // n_kv_heads) % n_new).to(tl.int64)
    off_b = (pid // n_kv_heads // n_new).to(tl.int64)
    start, _ = _sequence_length(Seqlens, off_b, seqlen, n_new, capacity, HAS_SEQLENS)
    pos = start + tok + tl.zeros([1], dtype=tl.int64)
    ok = (pos >= 0) & (pos < capacity)
    page, row = _slots(Table, off_b, stride_tb, stride_tj, pos, ok, page_size, num_pages, PAGED)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # -- copy the key row and the value row (nothing outside the cache) --
    d_ok = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + off_b * stride_kb + tok * stride_kn + off_h * stride_kh
                + offs_d[None, :] * stride_kd, mask=d_ok)
    tl.store(KCache + page[:, None] * stride_cp + row[:, None] * stride_cr + off_h * stride_ch
             + offs_d[None, :] * stride_cd, k, mask=d_ok)
    dv_ok = ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    v = tl.load(V + off_b * stride_vb + tok * stride_vn + off_h * stride_vh
                + offs_dv[None, :] * stride_vd, mask=dv_ok)
    tl.store(VCache + page[:, None] * stride_wp + row[:, None] * stride_wr + off_h * stride_wh
             + offs_dv[None, :] * stride_wd, v, mask=dv_ok)


@autotune(key=["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "CHUNK_KEY", "PAGED", "SPLIT"], **_KVCACHE)
@triton.jit(do_not_specialize=["n_q", "n_new", "seqlen", "page_size", "capacity", "num_pages",
                               "chunk", "num_splits", "window_left", "window_right", "CHUNK_KEY"])
def _attention_kvcache_split(
    Q, K, V, Seqlens, Table, Out, OPart, LsePart,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kp, stride_kr, stride_kh, stride_kd,
    stride_vp, stride_vr, stride_vh, stride_vd,
    stride_tb, stride_tj,
    stride_ob, stride_om, stride_oh, stride_od,
    n_heads, n_kv_heads, group, n_q, n_new, seqlen, page_size, capacity, num_pages,
    chunk, num_splits, window_left, window_right, qk_scale, CHUNK_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SPLIT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # -- this program: one key chunk of one kv head, a block of (query token, group head) rows --
    split, row_start, off_b, off_hkv = split_program(num_splits, group * n_q, n_kv_heads,
                                                     BLOCK_M)
    r = row_start + tl.arange(0, BLOCK_M)
    row_ok = r < group * n_q
    tok = r // group
    off_h = off_hkv * group + (r % group).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q_rows = off_b * stride_qb + tok.to(tl.int64) * stride_qm + off_h * stride_qh
    q = load_tile(Q + q_rows[:, None] + offs_d[None, :] * stride_qd, row_ok, d_ok, True,
                  BLOCK_D != HEAD_DIM)

    # -- the keys this chunk and these rows can see: [lo, hi) --
    _, n_k = _sequence_length(Seqlens, off_b, seqlen, n_new, capacity, HAS_SEQLENS)
    shift = n_k - n_q  # query token i sits at key position i + shift
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_k)
    first_tok = row_start // group
    last_tok = tl.minimum((row_start + BLOCK_M - 1) // group, n_q - 1)
    if HAS_RIGHT:
        hi = tl.minimum(hi, last_tok + shift + window_right + 1)
    if HAS_LEFT:
        lo = tl.maximum(lo, first_tok + shift - window_left)
    q_pos = tok + shift

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    K += off_hkv * stride_kh
    V += off_hkv * stride_vh
    # -- online softmax over the visible key tiles, each key row gathered through its page --
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        page, row = _slots(Table, off_b, stride_tb, stride_tj, cols, col_ok, page_size,
                           num_pages, PAGED)
        kv_rows = page * stride_kp + row * stride_kr
        k = load_tile(K + kv_rows[:, None] + offs_d[None, :] * stride_kd, col_ok, d_ok, True,
                      BLOCK_D != HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        visible = col_ok[None, :]
        if HAS_RIGHT:
            visible = visible & (cols[None, :] <= (q_pos + window_right)[:, None])
        if HAS_LEFT:
            visible = visible & (cols[None, :] >= (q_pos - window_left)[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = page * stride_vp + row * stride_vr
        v = load_tile(V + v_rows[:, None] + offs_dv[None, :] * stride_vd, col_ok, dv_ok, True,
                      BLOCK_DV != HEAD_DIM_V)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    tok64 = tok.to(tl.int64)
    if SPLIT:
        # -- this chunk's normalised partial output and log2-sum-exp (-inf: nothing visible) --
        part = ((off_b * n_heads + off_h) * n_q + tok64) * num_splits + split
        tl.store(LsePart + part, tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe)),
                 mask=row_ok)
        tl.store(OPart + part[:, None] * HEAD_DIM_V + offs_dv[None, :], acc / l_safe[:, None],
                 mask=row_ok[:, None] & dv_ok[None, :])
    else:
        # -- the one chunk: the output itself (0 for a row that sees no key) --
        o_rows = off_b * stride_ob + tok64 * stride_om + off_h * stride_oh
        tl.store(Out + o_rows[:, None] + offs_dv[None, :] * stride_od,
                 (acc / l_safe[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])


def attention_kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, seqlen: int, block_table,
                          scale: float, window_left: int, window_right: int,
                          num_splits: int | None = None):
    """Append k / v (B, Sn, Hkv, D) into the caches at each sequence's length, then attend.

    q (B, Sq, H, D); caches (B, max_len, Hkv, D) or, with ``block_table`` (B, max_blocks) int32,
    (num_pages, page_size, Hkv, D); ``cache_seqlens`` int32 (B,) on the device or None (then
    every sequence has ``seqlen``); ``window_left`` / ``window_right`` negative for unbounded
    (causal: right 0). Returns out (B, Sq, H, Dv). ``num_splits`` forces a split count (tests)."""
    B, Sq, H, D = q.shape
    n_pages, page_size, Hkv, _ = k_cache.shape
    Dv = v_cache.shape[-1]
    paged = block_table is not None
    capacity = block_table.shape[1] * page_size if paged else page_size
    n_new = 0 if k is None else k.shape[1]
    dev = q.device
    out = empty((B, Sq, H, Dv), dtype=q.dtype, device=dev)
    has_len = cache_seqlens is not None
    seqlens = cache_seqlens if has_len else q
    table = block_table if paged else q
    ts = block_table.stride() if paged else (0, 0)
    if B and n_new and Hkv:
        # -- 1. the new keys / values into the caches --
        _kvcache_append[(B * n_new * Hkv,)](
            k, v, k_cache, v_cache, seqlens, table,
            *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *ts,
            n_new, Hkv, seqlen, page_size, capacity, n_pages,
            HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=head_block(D), BLOCK_DV=head_block(Dv),
            HAS_SEQLENS=has_len, PAGED=paged, num_warps=1,
        )
    if not out.numel():
        return out
    num_splits, chunk, _, row_blocks, split_meta, combine_meta = plan(
        B, H, Hkv, Sq, max(1, cdiv(capacity, SPLIT_ALIGN)), D, Dv, q.element_size(),
        _device.facts(dev), num_splits)
    split = num_splits > 1
    if split:
        o_part = empty((B * H * Sq, num_splits, Dv), dtype=torch.float32, device=dev)
        lse_part = empty((B * H * Sq, num_splits), dtype=torch.float32, device=dev)
    else:
        o_part = lse_part = out
    os_ = out.stride()
    # -- 2. attention over each sequence's own keys (partials per chunk when split) --
    _attention_kvcache_split[(num_splits * row_blocks * B * Hkv,)](
        q, k_cache, v_cache, seqlens, table, out, o_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *ts, *os_,
        H, Hkv, H // Hkv, Sq, n_new, seqlen, page_size, capacity, n_pages,
        chunk, num_splits, window_left, window_right, scale * LOG2E, seq_bucket(chunk),
        HAS_SEQLENS=has_len, PAGED=paged, HAS_LEFT=window_left >= 0,
        HAS_RIGHT=window_right >= 0, SPLIT=split, INPUT_PRECISION=dot_precision(q.dtype),
        **split_meta,
    )
    if split:
        # -- 3. merge the chunks of each query row (out read as (B, H, Sq, Dv)) --
        lse = torch.empty((B * H * Sq,), dtype=torch.float32, device=dev)
        combine_splits(o_part, lse_part, out, lse, (os_[0], os_[2], os_[1], os_[3]), H, Sq,
                       num_splits, combine_meta)
    return out
