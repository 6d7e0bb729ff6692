"""Fused scaled dot-product attention (flash-style), forward and backward, in Triton.

Layout: Q (B, Hq, Nq, D), K (B, Hkv, Nk, D), V (B, Hkv, Nk, Dv), any strides (stride 0 included);
Hkv divides Hq and query head h reads key/value head h // (Hq / Hkv) (grouped-query attention without
repeating K/V in memory). The optional mask is 4-D with every dimension either full or 1 (read with
stride 0), boolean (stored as uint8, nonzero = attend) or additive (any float dtype).

Forward, one program per (query block of BLOCK_M rows, batch * query head):
  for each key tile of BLOCK_N keys:  s = Q Kᵀ · scale · log2(e)  (+ mask · log2(e), -inf where masked)
    online softmax in fp32 with exp2: m' = max(m, rowmax s), p = 2^(s - m'), l = l·2^(m - m') + Σp,
    acc = acc·2^(m - m') + dropout(p) V
  out = acc / l (0 for a row whose keys are all masked), lse = (m + log2 l)·ln 2 (natural log; +inf for
  such a row, so that the backward's 2^(s - lse) is exactly 0 there).
  Key tiles are split into a main segment needing no key-bounds or causal checks and a short last
  segment (the diagonal under ``is_causal``, the ragged end otherwise) that applies them; tiles above
  the causal diagonal are never visited. Causal masking is PyTorch's top-left alignment (key j is
  visible to query i iff j <= i, whatever Nq and Nk are) or, with ``lower_right``, aligned to the
  last key (j <= i + Nk - Nq: PyTorch's ``causal_lower_right``, a chunk of queries at the end of a
  KV cache), as the runtime shift ``causal_shift``: one compiled kernel serves both.
  Traffic: Q and O once; K and V once per query block (from L2 for neighbouring programs); the mask
  tile by tile through its strides; O(N) extra memory (the fp32 lse).

Backward, recomputing P from the saved lse (no N x N storage), with delta = rowsum(dO ∘ O):
  1. ``_attention_bwd_preprocess``: delta per query row.
  2. ``_attention_bwd_dkdv``: one program per (key block, batch * kv head) owns dK and dV of its keys
     in registers and loops over the query heads of its group and over their query blocks:
     dV += dropout(P)ᵀ dO,  dS = P ∘ (dropout(dO Vᵀ) − delta),  dK += dSᵀ Q · scale.
  3. ``_attention_bwd_dq``: one program per (query block, batch * query head):  dQ += dS K · scale.
  Every output element is written by exactly one program that sums in a fixed order: no atomics, and
  the result is bitwise reproducible (the sum over a GQA group happens in registers, in head order).

Dropout (``dropout_p > 0``): score (b, h, i, j) is kept when a Philox uniform >= p; one Philox call,
keyed by the seed with the counter (j // 4, i, b·Hq + h, 0), gives the four keys of a group (a
quarter of the registers of a draw per score, and no 64-bit counter even past 2^32 scores). The
backward regenerates exactly the forward's draws; kept probabilities are scaled by 1 / (1 - p).
``dropout_keep_mask`` materialises the same mask for tests.

Windows (``HAS_LEFT`` and a bounded right): row r sees keys r + left_shift .. r + causal_shift. The
right edge is the causal diagonal moved right (``IS_CAUSAL`` with a larger shift), the left edge
bounds each query block's key loop from below (``_key_range``) and each key block's query loop from
above: tiles wholly outside the band are never visited, only the tiles crossing an edge mask.

Variable-length batches (``VARLEN``, FlashAttention's packed layout (total, H, D) read as a
(1, H, total, D) view with batch stride 0): program "batch" b is sequence b, whose start and
length come from ``cu_seqlens`` in device memory (clamped into [0, total]); the grid is sized by
the longest sequence and programs past their sequence's length return at once. Causal and window
are aligned bottom-right per sequence (the shifts gain Lk - Lq); lse and delta are (H, total_q).
Dropout keys by (sequence, head): the counter (j // 4, i, s·H + h, 0) with i, j positions within
the sequence. No TMA there (a descriptor's clipping is per tensor, not per sequence).

Load paths (one kernel source, chosen by the config's ``USE_TMA`` constexpr):
  * pointers (every config list's default): 64-bit pointer tiles, masked loads, cp.async when
    pipelined;
  * tensor descriptors (TMA configs, Hopper+, fp16/bf16, when the launcher could build them: a
    unit-stride head dim, 16-byte aligned base and strides): Q, K, V, dO are read and O, dQ, dK,
    dV written by the copy engine through 4-D (B, H, N, D) descriptors with (1, 1, rows, head
    dim) boxes. Rows past N and head-dim columns past D arrive as zeros and stores are clipped,
    so no address arithmetic or bounds masks live in registers: compiled for sm_90a the forward
    at head dim 128 takes 142 registers against the pointer default's 211
    (``tests/sm90_compile.py``). They are timed beside the pointer configs, which are the
    defaults.
  Warp specialization (``tl.range(..., warp_specialize=True)``) is not used on the TMA forward:
  for sm_90a, triton 3.6 and 3.8 fail to compile it at 4 warps and leave the loop unspecialized
  at 8.

All offsets that can pass 2^31 (batch/head bases, row offsets) are 64-bit; loops advance 64-bit
pointers by one tile stride at a time; descriptor coordinates are 32-bit (batch, head, row < 2^31).

Grids are one-dimensional, (blocks of a head) x (batch * heads) programs on axis 0 with the blocks
of a head adjacent (``_program_block``): batch * heads alone passes the 65535 of grid axes 1 and 2
(a ViT at batch 4096 with 16 heads). Axis 0 takes 2^31 - 1 programs; more would take 2^31
(batch, head) pairs of fewer than BLOCK_M queries (64 GiB of Q at one query of head dim 16, as much
output, 8 GiB of lse) or 2^36 query rows: no realistic shape, so it is not guarded.

The tiles, the tuning machinery and the tensor descriptors these kernels share with the split-KV
decode kernel (``attention_decode.py``) are in ``_attention.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._attention import (
    LOG2E,
    apply_mask,
    config,
    descriptors,
    dot_precision,
    fits_smem,
    head_block,
    load_tile,
    mask_args,
    scores,
    seq_bucket,
    tuned,
)
from ._utils import autotune, cdiv, empty, empty_like

MAX_HEAD_DIM = 256
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------------
# Tuning (``_attention.tuned``): what each kernel's tiles need
# ------------------------------------------------------------------------------------------------


def _wide(meta: dict) -> bool:
    # fp16/bf16 head dims above 128, and fp32 (whose dots hold fp32 operands in registers):
    # registers run short with the big tiles.
    return meta["ITEM"] == 4 or max(meta["BLOCK_D"], meta["BLOCK_DV"]) > 128


def _row_tiles_suit(c: triton.Config, meta: dict, resident: int) -> bool:
    # Forward and dQ: a block of BLOCK_M query rows (``resident`` elements each: Q, or Q and dO)
    # stays resident while K/V tiles stream by.
    bm, bn, item = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], meta["ITEM"]
    heads = meta["BLOCK_D"] + meta["BLOCK_DV"]
    small = bm * bn <= (128 * 64 if item == 2 else 64 * 32) and c.num_stages <= 2
    return (small or not _wide(meta)) and fits_smem(c, bn * heads * item, bm * resident * item,
                                                    meta)


def _fwd_suits(c: triton.Config, meta: dict) -> bool:
    return _row_tiles_suit(c, meta, meta["BLOCK_D"])


def _dq_suits(c: triton.Config, meta: dict) -> bool:
    return _row_tiles_suit(c, meta, meta["BLOCK_D"] + meta["BLOCK_DV"])


def _key_tiles_suit(c: triton.Config, meta: dict) -> bool:
    # dK/dV: K, V and their gradients of BLOCK_N keys stay resident while query tiles stream by.
    bm, bn, item = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], meta["ITEM"]
    heads = meta["BLOCK_D"] + meta["BLOCK_DV"]
    small = bn <= 64 and c.num_stages <= 2
    return (small or not _wide(meta)) and fits_smem(c, bm * heads * item, bn * heads * item, meta)


# Each GPU list starts with its default for 16-bit head dims <= 128; the first entry that suits a
# wider head (or fp32) is its default there, and the last (one stage, 32 x 32) fits anything up to
# fp32 x 256. Registers and shared memory of each are checked by compiling for sm_90 without a GPU
# (tests/sm90_compile.py).
_FWD = tuned(config(128, 64, 4, 2), [
    config(128, 64, 8, 3), config(128, 64, 8, 2), config(128, 128, 8, 2), config(128, 128, 8, 3),
    config(128, 64, 8, 4), config(64, 64, 4, 3), config(64, 32, 8, 2), config(64, 32, 4, 2),
    config(32, 32, 4, 1),
], _fwd_suits, tma=[
    config(128, 64, 8, 3, True), config(128, 64, 8, 2, True), config(128, 128, 8, 2, True),
    config(64, 64, 4, 3, True), config(64, 32, 8, 2, True),
])
_DKDV = tuned(config(64, 128, 4, 2), [
    config(32, 128, 8, 3), config(32, 128, 8, 2), config(64, 128, 8, 2), config(32, 64, 4, 3),
    config(32, 64, 8, 2), config(64, 64, 4, 2), config(32, 32, 4, 2), config(32, 32, 4, 1),
], _key_tiles_suit, tma=[
    config(32, 128, 8, 3, True), config(32, 128, 8, 2, True), config(64, 128, 8, 2, True),
    config(32, 64, 8, 2, True),
])
_DQ = tuned(config(128, 64, 4, 2), [
    config(128, 32, 8, 3), config(64, 32, 8, 2), config(128, 64, 8, 2), config(128, 64, 8, 3),
    config(64, 32, 4, 3), config(64, 64, 4, 2), config(32, 32, 4, 1),
], _dq_suits, tma=[
    config(128, 32, 8, 3, True), config(64, 32, 8, 2, True), config(128, 64, 8, 2, True),
])
_KEY = ["HEAD_DIM", "HEAD_DIM_V", "SEQ_Q_KEY", "SEQ_K_KEY", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT",
        "HAS_LEFT", "VARLEN"]
# Lengths and length buckets enter kernels as runtime values, never specialised (to a
# constant 1, or on divisibility): every derived loop bound is a tensor that can be widened to
# 64 bits, and a new length never means a new compilation.
_LENGTHS = ["n_q", "n_k", "causal_shift", "left_shift", "total_q", "total_k", "SEQ_Q_KEY",
            "SEQ_K_KEY"]


# ------------------------------------------------------------------------------------------------
# Helpers of the kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _key_tile_pointers(K_base, V_base, Mask_base, stride_kn, stride_kd, stride_vn, stride_vd,
                       stride_mm, stride_mn, offs_m, lo, HEAD_DIM: tl.constexpr,
                       HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Pointers to the first K, V and mask tiles from key ``lo`` for query rows ``offs_m`` (64-bit
    offsets), the key offsets within a tile, and which head-dim lanes are real (not padding)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols64 = (lo + offs_n).to(tl.int64)
    k_ptrs = K_base + cols64[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V_base + cols64[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = Mask_base + offs_m.to(tl.int64)[:, None] * stride_mm + cols64[None, :] * stride_mn
    return offs_n, offs_d < HEAD_DIM, offs_dv < HEAD_DIM_V, k_ptrs, v_ptrs, mask_ptrs


@triton.jit
def _tile(Desc, b, h, row, ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr,
          CHECK_COLS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
          USE_TMA: tl.constexpr):
    """The (ROWS, COLS) tile of head (b, h) from row ``row``: through the tensor descriptor (the
    copy engine zero-fills past the tensor's rows and head dim) or the pointers ``ptrs``."""
    if USE_TMA:
        x = Desc.load([b, h, row, 0]).reshape(ROWS, COLS)
    else:
        x = load_tile(ptrs, row_ok, col_ok, CHECK_ROWS, CHECK_COLS)
    return x


@triton.jit
def _store_tile(Desc, b, h, row, ptrs, x, row_ok, col_ok, ROWS: tl.constexpr,
                COLS: tl.constexpr, USE_TMA: tl.constexpr):
    """Store the (ROWS, COLS) tile ``x`` (already in the output dtype) of head (b, h) at row
    ``row``: through the descriptor (clipped to the tensor) or the pointers ``ptrs``."""
    if USE_TMA:
        Desc.store([b, h, row, 0], x.reshape(1, 1, ROWS, COLS))
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dropout_seed(Seed, HAS_DROPOUT: tl.constexpr):
    """The Philox seed, read from device memory (drawn there per call, so a CUDA-graph replay
    draws anew); 0 without dropout, when ``Seed`` is never dereferenced."""
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0
    return seed


@triton.jit
def _keep(seed, off_bh, rows, start_n, drop_p, BLOCK_N: tl.constexpr):
    """Dropout's keep decisions for the (rows x BLOCK_N keys from start_n) tile of head ``off_bh``:
    Philox uniform >= p, identical wherever the same scores are drawn (forward, backward, tests).
    One Philox call per row and group of 4 keys; its four words are the group's four keys."""
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    zero = tl.zeros([rows.shape[0], BLOCK_N // 4], dtype=tl.uint32)
    c0 = zero + groups.to(tl.uint32)[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    c2 = zero + off_bh.to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, zero)
    words = tl.reshape(tl.join(tl.join(w0, w1), tl.join(w2, w3)), [rows.shape[0], BLOCK_N])
    return tl.random.uint_to_uniform_float(words) >= drop_p


@triton.jit
def _program_block(n_blocks, LAST_FIRST: tl.constexpr):
    """(block, batch * head) of this program on a 1-D grid of ``n_blocks`` blocks per head, the
    blocks of a head adjacent (the launch order of a (blocks, heads) grid); ``LAST_FIRST``
    numbers them from the end (the most loaded causal query blocks start first)."""
    pid = tl.program_id(0)
    block = pid % n_blocks
    if LAST_FIRST:
        block = n_blocks - 1 - block
    return block, pid // n_blocks


@triton.jit
def _sequence(Cu, seq, total):
    """(start, length) of sequence ``seq`` from the cumulative lengths ``Cu`` (device memory),
    clamped into [0, total]: whatever the values, the rows stay inside the tensor."""
    start = tl.minimum(tl.maximum(tl.load(Cu + seq), 0), total)
    end = tl.minimum(tl.maximum(tl.load(Cu + seq + 1), start), total)
    return start, end - start


@triton.jit
def _key_range(start_m, n_k, causal_shift, left_shift, IS_CAUSAL: tl.constexpr,
               HAS_LEFT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles of query block ``start_m`` (row r sees keys r + left_shift .. r +
    causal_shift, within [0, n_k)): [lo, left_end) crosses the window's left edge, [left_end,
    full_hi) needs no check, [full_hi, hi) crosses the causal diagonal (or is the ragged end).
    Tiles outside [lo, hi) are never visited."""
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum((start_m + 1) * BLOCK_M + causal_shift, n_k), 0)
        full_hi = tl.maximum(tl.minimum(start_m * BLOCK_M + causal_shift, n_k), 0)
        full_hi = full_hi // BLOCK_N * BLOCK_N
    else:
        hi = n_k
        full_hi = n_k // BLOCK_N * BLOCK_N
    lo = 0
    left_end = 0
    if HAS_LEFT:
        lo = tl.maximum(start_m * BLOCK_M + left_shift, 0) // BLOCK_N * BLOCK_N
        last_first = tl.maximum((start_m + 1) * BLOCK_M - 1 + left_shift, 0)  # of the last row
        left_end = tl.maximum(tl.minimum(tl.cdiv(last_first, BLOCK_N) * BLOCK_N, hi), lo)
        full_hi = tl.maximum(full_hi, left_end)
    return lo, left_end, full_hi, hi


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q,
    K_base, V_base, Mask_base, KDesc, VDesc, off_b, off_hkv,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, row_ok, lo, hi, n_k, causal_shift, left_shift,
    qk_scale, seed, off_bh, drop_p, drop_scale,
    CHECK_KEYS: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_LEFT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Online softmax over the key tiles [lo, hi) of one query block (see the module docstring)."""
    offs_n, d_ok, dv_ok, k_ptrs, v_ptrs, mask_ptrs = _key_tile_pointers(
        K_base, V_base, Mask_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
        stride_mn, offs_m, lo, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_k
        # -- scores of this tile, in log2 units --
        k = _tile(KDesc, off_b, off_hkv, start_n, k_ptrs, col_ok, d_ok, CHECK_KEYS,
                  BLOCK_D != HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
        s = scores(q, k, mask_ptrs, cols, offs_m + causal_shift, row_ok, col_ok, qk_scale,
                    CHECK_KEYS, APPLY_CAUSAL, HAS_MASK, MASK_IS_BOOL, INPUT_PRECISION)
        if APPLY_LEFT:
            s = tl.where(cols[None, :] >= (offs_m + left_shift)[:, None], s, float("-inf"))
        # -- online softmax update (a row with nothing visible yet keeps m = -inf, p = 0) --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            p = tl.where(_keep(seed, off_bh, offs_m, start_n, drop_p, BLOCK_N), p * drop_scale, 0.0)
        # -- accumulate P V --
        v = _tile(VDesc, off_b, off_hkv, start_n, v_ptrs, col_ok, dv_ok, CHECK_KEYS,
                  BLOCK_DV != HEAD_DIM_V, BLOCK_N, BLOCK_DV, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_mn
    return acc, l_i, m_i


@autotune(key=_KEY, **_FWD)
@triton.jit(do_not_specialize=_LENGTHS)
def _attention_fwd(
    Q, K, V, Mask, Out, Lse, QDesc, KDesc, VDesc, ODesc,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, group, n_q, n_k, causal_shift, left_shift,
    qk_scale, Seed, drop_p, drop_scale,
    CuQ, CuK, total_q, total_k,
    SEQ_Q_KEY, SEQ_K_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    # -- which query block and head; the last (most loaded, under causal) blocks start first --
    start_m, off_bh = _program_block(tl.cdiv(n_q, BLOCK_M), True)
    seed = _dropout_seed(Seed, HAS_DROPOUT)
    b32 = off_bh // n_heads  # the descriptors' (32-bit) coordinates; the sequence under VARLEN
    h32 = off_bh % n_heads
    off_b = b32.to(tl.int64)
    off_h = h32.to(tl.int64)
    off_hkv = off_h // group
    if VARLEN:  # this sequence's rows of q/out and k/v (batch strides are 0), lse (H, total_q)
        q0, n_q = _sequence(CuQ, b32, total_q)
        k0, n_k = _sequence(CuK, b32, total_k)
        if start_m * BLOCK_M >= n_q:
            return
        causal_shift += n_k - n_q  # aligned bottom-right
        left_shift += n_k - n_q
        Q += q0.to(tl.int64) * stride_qm
        Out += q0.to(tl.int64) * stride_om
        K += k0.to(tl.int64) * stride_kn
        V += k0.to(tl.int64) * stride_vn
        Lse += off_h * total_q + q0
    else:
        Lse += off_bh.to(tl.int64) * n_q
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_hkv * stride_kh
    V += off_b * stride_vb + off_hkv * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    Out += off_b * stride_ob + off_h * stride_oh

    # -- the query block, loaded once (padded rows and head-dim columns read as 0) --
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows64 = offs_m.to(tl.int64)
    q = _tile(QDesc, b32, h32, start_m * BLOCK_M,
              Q + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd,
              row_ok, offs_d < HEAD_DIM, True, BLOCK_D != HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # -- key tiles (``_key_range``): [lo, left_end) the window's left edge, [left_end, full_hi)
    #    no checks, [full_hi, hi) the causal diagonal or the ragged end; none outside [lo, hi) --
    lo, left_end, full_hi, hi = _key_range(start_m, n_k, causal_shift, left_shift, IS_CAUSAL,
                                           HAS_LEFT, BLOCK_M, BLOCK_N)
    hkv32 = h32 // group
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, K, V, Mask, KDesc, VDesc, b32, hkv32,
            stride_kn, stride_kd, stride_vn, stride_vd,
            stride_mm, stride_mn, offs_m, row_ok, lo, left_end, n_k, causal_shift, left_shift,
            qk_scale, seed, off_bh, drop_p, drop_scale,
            True, IS_CAUSAL, True, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, INPUT_PRECISION, USE_TMA)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K, V, Mask, KDesc, VDesc, b32, hkv32,
        stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mm, stride_mn, offs_m, row_ok, left_end, full_hi, n_k, causal_shift, left_shift,
        qk_scale, seed, off_bh, drop_p, drop_scale,
        False, False, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, INPUT_PRECISION, USE_TMA)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, K, V, Mask, KDesc, VDesc, b32, hkv32,
        stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mm, stride_mn, offs_m, row_ok, full_hi, hi, n_k, causal_shift, left_shift,
        qk_scale, seed, off_bh, drop_p, drop_scale,
        True, IS_CAUSAL, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, INPUT_PRECISION, USE_TMA)

    # -- normalise; a row with no visible key gets 0 and lse = +inf --
    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    lse = tl.where(empty_row, float("inf"),
                   (m_i + tl.math.log2(tl.where(empty_row, 1.0, l_i))) * _LN2)
    tl.store(Lse + offs_m, lse, mask=row_ok)
    o_ptrs = Out + rows64[:, None] * stride_om + offs_dv[None, :] * stride_od
    _store_tile(ODesc, b32, h32, start_m * BLOCK_M, o_ptrs, out.to(Out.dtype.element_ty), row_ok,
                offs_dv < HEAD_DIM_V, BLOCK_M, BLOCK_DV, USE_TMA)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_q"])
def _attention_bwd_preprocess(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    n_heads, n_q,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # delta_i = sum_d dO_id * O_id (fp32), the row term of softmax's backward
    start_m, off_bh = _program_block(tl.cdiv(n_q, BLOCK_M), False)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    rows64 = offs_m.to(tl.int64)
    mask = (offs_m < n_q)[:, None] & (offs_d < HEAD_DIM_V)[None, :]
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + rows64[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * n_q + offs_m, tl.sum(o * do, 1), mask=offs_m < n_q)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v,
    Q_base, DO_base, Lse_base, Delta_base, Mask_base, QDesc, DODesc, off_b, off_h,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
    start_n, cols, col_ok, lo, hi, n_q, causal_shift, left_shift,
    qk_scale, seed, off_bh, drop_p, drop_scale,
    CHECK_ROWS: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_LEFT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """dK, dV of one key block from the query blocks [lo, hi) of one head, in the transposed
    (keys x queries) orientation so that nothing needs a transpose of the accumulators."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    rows64 = (lo + offs_m).to(tl.int64)
    cols64 = cols.to(tl.int64)
    q_ptrs = Q_base + rows64[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_ptrs = DO_base + rows64[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    mask_ptrs = Mask_base + cols64[:, None] * stride_mn + rows64[None, :] * stride_mm
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < n_q
        # -- recompute Pᵀ of this tile from the saved lse (padded rows: lse = +inf -> P = 0) --
        q = _tile(QDesc, off_b, off_h, start_m, q_ptrs, row_ok, d_ok, CHECK_ROWS,
                  BLOCK_D != HEAD_DIM, BLOCK_M, BLOCK_D, USE_TMA)
        if CHECK_ROWS:
            lse2 = tl.load(Lse_base + rows, mask=row_ok, other=float("inf")) * _LOG2E
            delta = tl.load(Delta_base + rows, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(Lse_base + rows) * _LOG2E
            delta = tl.load(Delta_base + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        if HAS_MASK:
            s_t = apply_mask(s_t, mask_ptrs, col_ok[:, None] & row_ok[None, :], MASK_IS_BOOL)
        if APPLY_CAUSAL:
            s_t = tl.where(cols[:, None] <= (rows + causal_shift)[None, :], s_t, float("-inf"))
        if APPLY_LEFT:
            s_t = tl.where(cols[:, None] >= (rows + left_shift)[None, :], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        # -- dV += dropout(P)ᵀ dO --
        do = _tile(DODesc, off_b, off_h, start_m, do_ptrs, row_ok, dv_ok, CHECK_ROWS,
                   BLOCK_DV != HEAD_DIM_V, BLOCK_M, BLOCK_DV, USE_TMA)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = tl.trans(_keep(seed, off_bh, rows, start_n, drop_p, BLOCK_N))
            p_drop = tl.where(keep, p_t * drop_scale, 0.0)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            p_drop = p_t
        dv = tl.dot(p_drop.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        # -- dK += dSᵀ Q (scaled once at the end) --
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
        if HAS_MASK:
            mask_ptrs += BLOCK_M * stride_mm
    return dk, dv


@autotune(key=_KEY, **_DKDV)
@triton.jit(do_not_specialize=_LENGTHS)
def _attention_bwd_dkdv(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV, QDesc, KDesc, VDesc, DODesc, DKDesc, DVDesc,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    n_heads, n_kv_heads, group, n_q, n_k, causal_shift, left_shift,
    qk_scale, sm_scale, Seed, drop_p, drop_scale,
    CuQ, CuK, total_q, total_k,
    SEQ_Q_KEY, SEQ_K_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    # -- this program's key block, of one kv head (of one sequence under VARLEN) --
    block_n, off_bkv = _program_block(tl.cdiv(n_k, BLOCK_N), False)
    seed = _dropout_seed(Seed, HAS_DROPOUT)
    start_n = block_n * BLOCK_N
    b32 = off_bkv // n_kv_heads  # the descriptors' (32-bit) coordinates
    hkv32 = off_bkv % n_kv_heads
    off_b = b32.to(tl.int64)
    off_hkv = hkv32.to(tl.int64)
    if VARLEN:  # lse and delta are (H, total_q): a head's rows are total_q apart
        q0, n_q = _sequence(CuQ, b32, total_q)
        k0, n_k = _sequence(CuK, b32, total_k)
        if start_n >= n_k:
            return
        causal_shift += n_k - n_q
        left_shift += n_k - n_q
        Q += q0.to(tl.int64) * stride_qm
        DO += q0.to(tl.int64) * stride_dom
        K += k0.to(tl.int64) * stride_kn
        V += k0.to(tl.int64) * stride_vn
        DK += k0.to(tl.int64) * stride_dkn
        DV += k0.to(tl.int64) * stride_dvn
        row_base = q0.to(tl.int64)
        head_rows = total_q
    else:
        row_base = off_b * n_heads * n_q
        head_rows = n_q
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < n_k
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    k = _tile(KDesc, b32, hkv32, start_n,
              K + off_b * stride_kb + off_hkv * stride_kh + cols64[:, None] * stride_kn
              + offs_d[None, :] * stride_kd, col_ok, d_ok, True, BLOCK_D != HEAD_DIM,
              BLOCK_N, BLOCK_D, USE_TMA)
    v = _tile(VDesc, b32, hkv32, start_n,
              V + off_b * stride_vb + off_hkv * stride_vh + cols64[:, None] * stride_vn
              + offs_dv[None, :] * stride_vd, col_ok, dv_ok, True, BLOCK_DV != HEAD_DIM_V,
              BLOCK_N, BLOCK_DV, USE_TMA)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # -- query rows: [diag_lo, diag_hi) crosses the causal diagonal; [diag_hi, full_hi) needs no
    #    checks; [tail_lo, n_q) is the ragged end. Rows above lo see none of these keys (row r
    #    sees keys up to r + causal_shift). --
    full_hi = n_q // BLOCK_M * BLOCK_M
    if IS_CAUSAL:
        lo = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
        diag_lo = tl.minimum(lo, full_hi)
        diag_hi = tl.cdiv(tl.maximum(start_n + BLOCK_N - causal_shift, 0), BLOCK_M) * BLOCK_M
        diag_hi_all = diag_hi
        diag_hi = tl.minimum(diag_hi, full_hi)
        tail_lo = tl.maximum(lo, full_hi)
    else:
        lo = 0
        diag_hi_all = 0
        diag_hi = 0
        tail_lo = full_hi
    if HAS_LEFT:
        # With a left edge (row r sees keys from r + left_shift), rows past r_hi see none of
        # these keys: [lo, edge_lo) crosses the diagonal, [edge_lo, edge_hi) needs no check,
        # [edge_hi, r_hi) crosses the left edge (or is the ragged end); both edges check all.
        r_hi = tl.minimum(tl.maximum(start_n + BLOCK_N - left_shift, 0), n_q)
        edge_lo = tl.maximum(tl.minimum(diag_hi_all, r_hi), lo)
        left_ok = tl.maximum(start_n - left_shift + 1, 0) // BLOCK_M * BLOCK_M
        edge_hi = tl.maximum(tl.minimum(left_ok, full_hi), edge_lo)
    # -- sum over the query heads of this kv head's group, in order (deterministic) --
    for g in range(0, group):
        h32 = hkv32 * group + g
        off_h = off_hkv * group + g
        off_bh = off_b * n_heads + off_h
        Q_base = Q + off_b * stride_qb + off_h * stride_qh
        DO_base = DO + off_b * stride_dob + off_h * stride_doh
        Lse_base = Lse + row_base + off_h * head_rows
        Delta_base = Delta + row_base + off_h * head_rows
        Mask_base = Mask + off_b * stride_mb + off_h * stride_mh
        if HAS_LEFT:
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, Mask_base, QDesc, DODesc,
                b32, h32,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                start_n, cols, col_ok, lo, edge_lo, n_q, causal_shift, left_shift,
                qk_scale, seed, off_bh, drop_p, drop_scale,
                True, IS_CAUSAL, True, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                USE_TMA)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, Mask_base, QDesc, DODesc,
                b32, h32,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                start_n, cols, col_ok, edge_lo, edge_hi, n_q, causal_shift, left_shift,
                qk_scale, seed, off_bh, drop_p, drop_scale,
                False, False, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                USE_TMA)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, Mask_base, QDesc, DODesc,
                b32, h32,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                start_n, cols, col_ok, edge_hi, r_hi, n_q, causal_shift, left_shift,
                qk_scale, seed, off_bh, drop_p, drop_scale,
                True, IS_CAUSAL, True, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                USE_TMA)
        else:
            if IS_CAUSAL:
                dk, dv = _dkdv_tiles(
                    dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, Mask_base, QDesc,
                    DODesc, b32, h32,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                    start_n, cols, col_ok, diag_lo, diag_hi, n_q, causal_shift, left_shift,
                    qk_scale, seed, off_bh, drop_p, drop_scale,
                    False, True, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                    HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                    USE_TMA)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, Mask_base, QDesc, DODesc,
                b32, h32,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                start_n, cols, col_ok, diag_hi, full_hi, n_q, causal_shift, left_shift,
                qk_scale, seed, off_bh, drop_p, drop_scale,
                False, False, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                USE_TMA)
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, Q_base, DO_base, Lse_base, Delta_base, Mask_base, QDesc, DODesc,
                b32, h32,
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn,
                start_n, cols, col_ok, tail_lo, n_q, n_q, causal_shift, left_shift,
                qk_scale, seed, off_bh, drop_p, drop_scale,
                True, IS_CAUSAL, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, INPUT_PRECISION,
                USE_TMA)

    # -- write this key block's dK (with the softmax scale) and dV --
    dk_ptrs = (DK + off_b * stride_dkb + off_hkv * stride_dkh + cols64[:, None] * stride_dkn
               + offs_d[None, :] * stride_dkd)
    dv_ptrs = (DV + off_b * stride_dvb + off_hkv * stride_dvh + cols64[:, None] * stride_dvn
               + offs_dv[None, :] * stride_dvd)
    _store_tile(DKDesc, b32, hkv32, start_n, dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty),
                col_ok, d_ok, BLOCK_N, BLOCK_D, USE_TMA)
    _store_tile(DVDesc, b32, hkv32, start_n, dv_ptrs, dv.to(DV.dtype.element_ty), col_ok, dv_ok,
                BLOCK_N, BLOCK_DV, USE_TMA)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta,
    K_base, V_base, Mask_base, KDesc, VDesc, off_b, off_hkv,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    offs_m, row_ok, lo, hi, n_k, causal_shift, left_shift,
    qk_scale, seed, off_bh, drop_p, drop_scale,
    CHECK_KEYS: tl.constexpr, APPLY_CAUSAL: tl.constexpr, APPLY_LEFT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """dQ of one query block from the key tiles [lo, hi)."""
    offs_n, d_ok, dv_ok, k_ptrs, v_ptrs, mask_ptrs = _key_tile_pointers(
        K_base, V_base, Mask_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
        stride_mn, offs_m, lo, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_k
        # -- recompute P of this tile from the saved lse --
        k = _tile(KDesc, off_b, off_hkv, start_n, k_ptrs, col_ok, d_ok, CHECK_KEYS,
                  BLOCK_D != HEAD_DIM, BLOCK_N, BLOCK_D, USE_TMA)
        s = scores(q, k, mask_ptrs, cols, offs_m + causal_shift, row_ok, col_ok, qk_scale,
                    CHECK_KEYS, APPLY_CAUSAL, HAS_MASK, MASK_IS_BOOL, INPUT_PRECISION)
        if APPLY_LEFT:
            s = tl.where(cols[None, :] >= (offs_m + left_shift)[:, None], s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        # -- dS = P ∘ (dropout(dO Vᵀ) − delta);  dQ += dS K --
        v = _tile(VDesc, off_b, off_hkv, start_n, v_ptrs, col_ok, dv_ok, CHECK_KEYS,
                  BLOCK_DV != HEAD_DIM_V, BLOCK_N, BLOCK_DV, USE_TMA)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(_keep(seed, off_bh, offs_m, start_n, drop_p, BLOCK_N), dp * drop_scale,
                          0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_mn
    return dq


@autotune(key=_KEY, **_DQ)
@triton.jit(do_not_specialize=_LENGTHS)
def _attention_bwd_dq(
    Q, K, V, Mask, DO, Lse, Delta, DQ, QDesc, KDesc, VDesc, DODesc, DQDesc,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    n_heads, group, n_q, n_k, causal_shift, left_shift,
    qk_scale, sm_scale, Seed, drop_p, drop_scale,
    CuQ, CuK, total_q, total_k,
    SEQ_Q_KEY, SEQ_K_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, VARLEN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
):
    # -- this program's query block (heaviest causal blocks first) --
    start_m, off_bh = _program_block(tl.cdiv(n_q, BLOCK_M), True)
    seed = _dropout_seed(Seed, HAS_DROPOUT)
    b32 = off_bh // n_heads  # the descriptors' (32-bit) coordinates
    h32 = off_bh % n_heads
    off_b = b32.to(tl.int64)
    off_h = h32.to(tl.int64)
    off_hkv = off_h // group
    if VARLEN:
        q0, n_q = _sequence(CuQ, b32, total_q)
        k0, n_k = _sequence(CuK, b32, total_k)
        if start_m * BLOCK_M >= n_q:
            return
        causal_shift += n_k - n_q
        left_shift += n_k - n_q
        Q += q0.to(tl.int64) * stride_qm
        DO += q0.to(tl.int64) * stride_dom
        DQ += q0.to(tl.int64) * stride_dqm
        K += k0.to(tl.int64) * stride_kn
        V += k0.to(tl.int64) * stride_vn
        row_base = off_h * total_q + q0
    else:
        row_base = off_bh.to(tl.int64) * n_q
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_q
    rows64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    q = _tile(QDesc, b32, h32, start_m * BLOCK_M,
              Q + off_b * stride_qb + off_h * stride_qh + rows64[:, None] * stride_qm
              + offs_d[None, :] * stride_qd, row_ok, d_ok, True, BLOCK_D != HEAD_DIM,
              BLOCK_M, BLOCK_D, USE_TMA)
    do = _tile(DODesc, b32, h32, start_m * BLOCK_M,
               DO + off_b * stride_dob + off_h * stride_doh + rows64[:, None] * stride_dom
               + offs_dv[None, :] * stride_dod, row_ok, offs_dv < HEAD_DIM_V, True,
               BLOCK_DV != HEAD_DIM_V, BLOCK_M, BLOCK_DV, USE_TMA)
    lse2 = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    K += off_b * stride_kb + off_hkv * stride_kh
    V += off_b * stride_vb + off_hkv * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- the same key segments as the forward --
    lo, left_end, full_hi, hi = _key_range(start_m, n_k, causal_shift, left_shift, IS_CAUSAL,
                                           HAS_LEFT, BLOCK_M, BLOCK_N)
    if HAS_LEFT:
        dq = _dq_tiles(
            dq, q, do, lse2, delta, K, V, Mask, KDesc, VDesc, b32, h32 // group,
            stride_kn, stride_kd, stride_vn, stride_vd,
            stride_mm, stride_mn, offs_m, row_ok, lo, left_end, n_k, causal_shift, left_shift,
            qk_scale, seed, off_bh, drop_p, drop_scale,
            True, IS_CAUSAL, True, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, INPUT_PRECISION, USE_TMA)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K, V, Mask, KDesc, VDesc, b32, h32 // group,
        stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mm, stride_mn, offs_m, row_ok, left_end, full_hi, n_k, causal_shift, left_shift,
        qk_scale, seed, off_bh, drop_p, drop_scale,
        False, False, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, INPUT_PRECISION, USE_TMA)
    dq = _dq_tiles(
        dq, q, do, lse2, delta, K, V, Mask, KDesc, VDesc, b32, h32 // group,
        stride_kn, stride_kd, stride_vn, stride_vd,
        stride_mm, stride_mn, offs_m, row_ok, full_hi, hi, n_k, causal_shift, left_shift,
        qk_scale, seed, off_bh, drop_p, drop_scale,
        True, IS_CAUSAL, False, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, INPUT_PRECISION, USE_TMA)

    dq_ptrs = (DQ + off_b * stride_dqb + off_h * stride_dqh + rows64[:, None] * stride_dqm
               + offs_d[None, :] * stride_dqd)
    _store_tile(DQDesc, b32, h32, start_m * BLOCK_M, dq_ptrs,
                (dq * sm_scale).to(DQ.dtype.element_ty), row_ok, d_ok, BLOCK_M, BLOCK_D, USE_TMA)


@triton.jit(do_not_specialize=["n_q", "n_k"])
def _dropout_keep_mask(Keep, n_q, n_k, Seed, drop_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The keep-mask of one (batch, head), exactly as the attention kernels draw it; the grid's
    # one axis runs over row blocks, then key blocks, then batch * heads.
    row_block, rest = _program_block(tl.cdiv(n_q, BLOCK_M), False)
    n_col_blocks = tl.cdiv(n_k, BLOCK_N)
    off_bh = rest // n_col_blocks
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = (rest % n_col_blocks) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(Seed), off_bh, rows, start_n, drop_p, BLOCK_N)
    Keep += off_bh.to(tl.int64) * n_q * n_k
    offsets = rows.to(tl.int64)[:, None] * n_k + cols[None, :]
    ok = (rows < n_q)[:, None] & (cols < n_k)[None, :]
    tl.store(Keep + offsets, keep.to(tl.int8), mask=ok)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _dropout(dropout_p: float) -> tuple[bool, float, float]:
    if dropout_p <= 0.0:
        return False, 0.0, 1.0
    return True, float(dropout_p), (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))


@functools.cache
def _meta(d: int, dv: int, dtype: torch.dtype, is_causal: bool, has_mask: bool,
          mask_is_bool: bool, has_dropout: bool, has_left: bool = False,
          varlen: bool = False) -> dict:
    """The constexpr arguments every attention kernel shares, per specialisation (cached: the
    launch reads it, never mutates it)."""
    return dict(
        HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=head_block(d), BLOCK_DV=head_block(dv),
        IS_CAUSAL=is_causal, HAS_MASK=has_mask, MASK_IS_BOOL=mask_is_bool,
        HAS_DROPOUT=has_dropout, HAS_LEFT=has_left, VARLEN=varlen,
        INPUT_PRECISION=dot_precision(dtype),
    )


def _band(is_causal: bool, window: tuple[int, int], shift: int) -> tuple[bool, int, bool, int]:
    """(bounded right, causal_shift, bounded left, left_shift) of the visible band: row r sees
    keys r + left_shift .. r + causal_shift, where query r sits at key r + ``shift``. A right
    window bound is the causal diagonal moved right by ``right`` (``is_causal`` makes it 0)."""
    left, right = window
    if is_causal:
        right = 0
    return right >= 0, shift + max(right, 0), left >= 0, shift - max(left, 0)


def attention_fwd(q, k, v, mask, scale: float, is_causal: bool, dropout_p: float,
                  seed: torch.Tensor | None, lower_right: bool = False, tma: bool | None = None,
                  window: tuple[int, int] = (-1, -1)):
    """Forward on 4-D q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) and a 4-D mask or None;
    ``seed`` is the one-element int64 device tensor of the dropout draw (None without dropout);
    ``lower_right`` aligns ``is_causal``'s diagonal (and the window's) to the last key (query i
    sees keys up to i + Nk - Nq: a chunk of queries at the end of a KV cache); ``tma`` as in
    ``descriptors``; ``window`` (left, right): query i (at key position i, or i + Nk - Nq with
    ``lower_right``) also sees only keys i - left .. i + right (negative: unbounded).

    Returns ``out`` (B, Hq, Nq, Dv) in q's dtype and ``lse`` (B, Hq, Nq) fp32 (natural log; +inf
    for a row with no visible key).
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dev = q.device
    out = empty((B, Hq, Nq, Dv), dtype=q.dtype, device=dev)
    lse = empty((B, Hq, Nq), dtype=torch.float32, device=dev)
    if B * Hq * Nq * Dv == 0 or Nk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    has_dropout, drop_p, drop_scale = _dropout(dropout_p)
    mask_t, ms, mask_is_bool = mask_args(mask, q)
    causal, causal_shift, has_left, left_shift = _band(is_causal, window,
                                                       Nk - Nq if lower_right else 0)
    programs = B * Hq
    grid = lambda meta: (cdiv(Nq, meta["BLOCK_M"]) * programs,)  # noqa: E731
    _attention_fwd[grid](
        q, k, v, mask_t, out, lse, *descriptors(tma, q, k, v, out, work=B * Hq * Nq * Nk * D),
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        Hq, Hq // Hkv, Nq, Nk, causal_shift, left_shift,
        scale * LOG2E, lse if seed is None else seed, drop_p, drop_scale,
        lse, lse, 0, 0, seq_bucket(Nq), seq_bucket(Nk),
        **_meta(D, Dv, q.dtype, causal, mask is not None, mask_is_bool, has_dropout, has_left),
    )
    return out, lse


def attention_bwd(do, q, k, v, out, lse, mask, scale: float, is_causal: bool, dropout_p: float,
                  seed: torch.Tensor | None, lower_right: bool = False, tma: bool | None = None,
                  window: tuple[int, int] = (-1, -1), like_inputs: bool = True):
    """Backward: ``(dq, dk, dv)`` shaped like q, k, v in their dtype; with ``like_inputs`` in
    their dimension order (the gradient of a transposed view comes out transposed, so autograd's
    backward of the view copies nothing), else contiguous (a layout that depends on shapes alone,
    as a compiler's fake tensors need). ``do`` may have any strides, including the stride-0
    gradient of ``out.sum()`` (which keeps it off the TMA configs); ``seed``, ``lower_right``,
    ``tma`` and ``window`` as in the forward."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dq, dk, dv = _gradients(q, k, v, like_inputs)
    if Nq == 0 or Nk == 0 or B * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    causal, causal_shift, has_left, left_shift = _band(is_causal, window,
                                                       Nk - Nq if lower_right else 0)
    _backward(do, q, k, v, out, lse, dq, dk, dv, mask, scale, dropout_p, seed, tma,
              (B, Hq, Hkv, Nq, Nk, D, Dv), (causal, causal_shift, has_left, left_shift), None)
    return dq, dk, dv


def _gradients(q, k, v, like_inputs: bool):
    """Uninitialised dq, dk, dv: in the inputs' layouts, or contiguous."""
    if like_inputs:
        return empty_like(q), empty_like(k), empty_like(v)
    return tuple(empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _backward(do, q, k, v, out, lse, dq, dk, dv, mask, scale, dropout_p, seed, tma, dims, band,
              varlen):
    """The three backward launches on 4-D views; ``varlen`` is None or (cu_seqlens_q,
    cu_seqlens_k, total_q, total_k), with B the number of sequences and Nq / Nk their maxima."""
    B, Hq, Hkv, Nq, Nk, D, Dv = dims
    causal, causal_shift, has_left, left_shift = band
    has_dropout, drop_p, drop_scale = _dropout(dropout_p)
    mask_t, ms, mask_is_bool = mask_args(mask, q)
    meta = _meta(D, Dv, q.dtype, causal, mask is not None, mask_is_bool, has_dropout, has_left,
                 varlen is not None)
    cu = (lse, lse, 0, 0) if varlen is None else varlen

    # -- 1. delta = rowsum(dO * O), laid out as lse --
    delta = empty(lse.shape, dtype=torch.float32, device=q.device)
    rows = out.shape[2]  # total_q under varlen (out is (1, Hq, total_q, Dv) there)
    pre_block = 64
    _attention_bwd_preprocess[(cdiv(rows, pre_block) * out.shape[0] * Hq,)](
        out, do, delta, *out.stride(), *do.stride(), Hq, rows,
        HEAD_DIM_V=Dv, BLOCK_M=pre_block, BLOCK_DV=meta["BLOCK_DV"],
        num_warps=4 if meta["BLOCK_DV"] <= 128 else 8,
    )
    common = (Hq // Hkv, Nq, Nk, causal_shift, left_shift, scale * LOG2E, scale,
              lse if seed is None else seed, drop_p, drop_scale, *cu, seq_bucket(Nq),
              seq_bucket(Nk))
    if varlen is not None:  # one "batch" of packed rows, read per sequence: batch strides 0
        strides = [(0, *t.stride()[1:]) for t in (q, k, v, do, dq, dk, dv)]
    else:
        strides = [t.stride() for t in (q, k, v, do, dq, dk, dv)]
    sq, sk, sv, sdo, sdq, sdk, sdv = strides

    # -- 2. dK, dV: one program per key block of a kv head, summing over its query heads --
    grid_kv = lambda meta: (cdiv(Nk, meta["BLOCK_N"]) * B * Hkv,)  # noqa: E731
    qd, kd, vd, dod, dqd, dkd, dvd = descriptors(tma if varlen is None else False,
                                                 q, k, v, do, dq, dk, dv,
                                                 work=B * Hq * Nq * Nk * D)
    _attention_bwd_dkdv[grid_kv](
        q, k, v, mask_t, do, lse, delta, dk, dv, qd, kd, vd, dod, dkd, dvd,
        *sq, *sk, *sv, *ms, *sdo, *sdk, *sdv,
        Hq, Hkv, *common, **meta,
    )
    # -- 3. dQ: one program per query block --
    grid_q = lambda meta: (cdiv(Nq, meta["BLOCK_M"]) * B * Hq,)  # noqa: E731
    _attention_bwd_dq[grid_q](
        q, k, v, mask_t, do, lse, delta, dq, qd, kd, vd, dod, dqd,
        *sq, *sk, *sv, *ms, *sdo, *sdq,
        Hq, *common, **meta,
    )


# ------------------------------------------------------------------------------------------------
# Variable-length batches (FlashAttention's packed layout)
# ------------------------------------------------------------------------------------------------


def _packed(t: torch.Tensor) -> torch.Tensor:
    """(total, H, D) as the (1, H, total, D) view the kernels read (no copy)."""
    return t.unsqueeze(0).transpose(1, 2)


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
               scale: float, causal: bool, window: tuple[int, int], dropout_p: float,
               seed: torch.Tensor | None):
    """Forward of packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv,
    Dv); sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q and the same of k / v
    through ``cu_seqlens_k`` (int32 device tensors of B + 1 entries, read by the kernels; every
    bound derived from them is clamped into the tensors). The causal mask and the window are
    aligned bottom-right per sequence (query i sits at key i + Lk - Lq). One program per
    (sequence, query block of ``max_seqlen_q``, head); blocks past a sequence's length exit.

    Returns ``out`` (total_q, Hq, Dv) and ``lse`` (Hq, total_q) fp32 (+inf for a row with no
    visible key). Rows that no sequence covers (only with inconsistent ``cu_seqlens``) are
    left unwritten."""
    total_q, Hq, D = q.shape
    total_k, Hkv, Dv = k.shape[0], k.shape[1], v.shape[-1]
    B = cu_seqlens_q.shape[0] - 1
    out = empty((total_q, Hq, Dv), dtype=q.dtype, device=q.device)
    lse = empty((Hq, total_q), dtype=torch.float32, device=q.device)
    if total_q * Hq == 0 or B <= 0 or max_seqlen_q <= 0:
        return out.zero_(), lse.fill_(float("inf"))
    if total_k == 0 or max_seqlen_k <= 0:
        return out.zero_(), lse.fill_(float("inf"))
    has_dropout, drop_p, drop_scale = _dropout(dropout_p)
    causal, causal_shift, has_left, left_shift = _band(causal, window, 0)
    q4, k4, v4, o4 = _packed(q), _packed(k), _packed(v), _packed(out)
    grid = lambda meta: (cdiv(max_seqlen_q, meta["BLOCK_M"]) * B * Hq,)  # noqa: E731
    _attention_fwd[grid](
        q4, k4, v4, lse, o4, lse, q4, k4, v4, o4,
        0, *q4.stride()[1:], 0, *k4.stride()[1:], 0, *v4.stride()[1:], 0, 0, 0, 0,
        0, *o4.stride()[1:],
        Hq, Hq // Hkv, max_seqlen_q, max_seqlen_k, causal_shift, left_shift,
        scale * LOG2E, lse if seed is None else seed, drop_p, drop_scale,
        cu_seqlens_q, cu_seqlens_k, total_q, total_k,
        seq_bucket(max_seqlen_q), seq_bucket(max_seqlen_k),
        **_meta(D, Dv, q.dtype, causal, False, False, has_dropout, has_left, True),
    )
    return out, lse


def varlen_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
               max_seqlen_k: int, scale: float, causal: bool, window: tuple[int, int],
               dropout_p: float, seed: torch.Tensor | None, like_inputs: bool = True):
    """Backward of ``varlen_fwd``: ``(dq, dk, dv)`` shaped like q, k, v (``like_inputs`` as in
    ``attention_bwd``). dK / dV programs run
    over (sequence, key block of ``max_seqlen_k``, kv head), dQ programs as the forward's."""
    total_q, Hq, D = q.shape
    total_k, Hkv, Dv = k.shape[0], k.shape[1], v.shape[-1]
    B = cu_seqlens_q.shape[0] - 1
    dq, dk, dv = _gradients(q, k, v, like_inputs)
    if total_q * Hq == 0 or total_k == 0 or B <= 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    band = _band(causal, window, 0)
    _backward(_packed(do), _packed(q), _packed(k), _packed(v), _packed(out), lse[None],
              _packed(dq), _packed(dk), _packed(dv), None, scale, dropout_p, seed, False,
              (B, Hq, Hkv, max_seqlen_q, max_seqlen_k, D, Dv), band,
              (cu_seqlens_q, cu_seqlens_k, total_q, total_k))
    return dq, dk, dv


def dropout_keep_mask(batch: int, heads: int, n_q: int, n_k: int, dropout_p: float,
                      seed: int | torch.Tensor, device) -> torch.Tensor:
    """The boolean keep-mask (B, Hq, Nq, Nk) the kernels draw for ``seed`` (for tests)."""
    keep = empty((batch, heads, n_q, n_k), dtype=torch.int8, device=device)
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([seed], dtype=torch.int64, device=device)
    if keep.numel():
        grid = (cdiv(n_q, 64) * cdiv(n_k, 64) * batch * heads,)
        _dropout_keep_mask[grid](keep, n_q, n_k, seed, float(dropout_p), BLOCK_M=64, BLOCK_N=64)
    return keep.bool()
