"""Rotary position embedding (RoPE) of queries and keys in one launch, forward and backward.

The semantics of transformers' ``apply_rotary_pos_emb`` (partial-rotary form): per head, the leading
``R`` dims split into halves x1 = x[:R/2], x2 = x[R/2:R] and, with c1, c2, s1, s2 the same halves of
the position's cos and sin rows,
  y1 = x1 * c1 - x2 * s1,   y2 = x2 * c2 + x1 * s2,   y[R:D] = x[R:D]    (x * cos + rotate_half(x) * sin)
in fp32, rounded once to the output dtype. The backward is the transpose of that rotation,
  dx1 = dy1 * c1 + dy2 * s2,   dx2 = dy2 * c2 - dy1 * s1,
which is the same code with the sine halves swapped and negated (``INVERSE``): sa = -s2, sb = -s1
in place of sa = s1, sb = s2. (For Llama's tables, where both halves are equal, that is rotating
by -sin.) One kernel serves both, and the inverse of the inverse is the forward.

Tiles: q and k are addressed as (B, H, S, D) through four strides each (any layout: views of a
fused qkv projection, (B, S, H, D) transposed, stride 0). A program owns one position (b, s) and
one block of heads of q *and* of k: ``BLOCK_HQ`` query heads, ``BLOCK_HK`` key heads, each a
(heads, R/2) tile per half plus a (heads, D - R) pass-through tile. The position's cos and sin rows
(R values each) are loaded once and reused across every head of both tensors. The blocks are sized
so that the heads of a position usually fit one program (``TILE`` elements per half-tile): then
the program count is B * S, and each head block of a position sits next to the others in the
launch order (cos/sin reread from L2 when a position takes several).

Memory traffic (e = element size of q/k, e_c of cos/sin), the ideal, which the kernel moves when a
position's heads fit one program:
  read  B·S·(H + Hkv)·D·e (q, k) + 2·B·S·R·e_c (cos, sin, once per position and head block)
  write B·S·(H + Hkv)·D·e (the rotated q, k; in place: only the R rotary dims)
The in-place form (``y`` is ``x``) skips the pass-through dims entirely: each element is loaded
before any element of its row is stored, by the one program that owns it.

Grid: the B·S·(head blocks) tiles on axis 0; past 2^31 - 1 tiles they fold onto axis 1
(``MAX_GRID_X`` per row of the grid, at most 65535 rows), and programs past the last tile do
nothing. Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cdiv, empty, next_pow2, warps_for_block

TILE = 1024  # elements of one (heads, R/2) half-tile: heads of a position per program
MAX_GRID_X = 2**31 - 1  # grid axis 0; more tiles fold onto axis 1
MAX_GRID_Y = 65535


@triton.jit
def _rotate_heads(X, Y, b, s, heads, n_heads, live,
                  stride_xb, stride_xh, stride_xs, stride_xd,
                  stride_yb, stride_yh, stride_ys, stride_yd,
                  c1, c2, sa, sb, cols, HALF, PASS,
                  BLOCK_PASS: tl.constexpr, HAS_PASS: tl.constexpr):
    """Rotate one (heads, R) tile of x into y; copy its (heads, D - R) pass-through dims."""
    rows = (heads < n_heads) & live
    X += b * stride_xb + s * stride_xs
    Y += b * stride_yb + s * stride_ys
    x_rows = heads[:, None] * stride_xh
    y_rows = heads[:, None] * stride_yh
    mask = rows[:, None] & (cols[None, :] < HALF)
    # -- both halves in fp32, loaded before either is stored (the in-place form relies on it) --
    x1 = tl.load(X + x_rows + cols[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_rows + (cols[None, :] + HALF) * stride_xd, mask=mask,
                 other=0.0).to(tl.float32)
    # -- the rotation, rounded once --
    y1 = x1 * c1[None, :] - x2 * sa[None, :]
    y2 = x2 * c2[None, :] + x1 * sb[None, :]
    tl.store(Y + y_rows + cols[None, :] * stride_yd, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_rows + (cols[None, :] + HALF) * stride_yd, y2.to(Y.dtype.element_ty),
             mask=mask)
    if HAS_PASS:
        # -- the trailing D - R dims unchanged --
        pcols = tl.arange(0, BLOCK_PASS)
        pmask = rows[:, None] & (pcols[None, :] < PASS)
        xp = tl.load(X + x_rows + (pcols[None, :] + 2 * HALF) * stride_xd, mask=pmask)
        tl.store(Y + y_rows + (pcols[None, :] + 2 * HALF) * stride_yd, xp, mask=pmask)


@triton.jit
def _rotary_fwd(
    Q, K, QO, KO, Cos, Sin,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_qob, stride_qoh, stride_qos, stride_qod,
    stride_kob, stride_koh, stride_kos, stride_kod,
    stride_cb, stride_cs, stride_cd,
    stride_sb, stride_ss, stride_sd,
    S, HQ, HK, HALF, PASS, n_head_blocks, n_tiles,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    HAS_PASS: tl.constexpr,
    INVERSE: tl.constexpr,
):
    # -- this program's tile: (position, head block), folded over grid axes 0 and 1 --
    tile = tl.program_id(0).to(tl.int64) + tl.program_id(1).to(tl.int64) * tl.num_programs(0)
    live = tile < n_tiles
    tile = tl.minimum(tile, n_tiles - 1)  # programs past the end read in bounds, store nothing
    block = tile % n_head_blocks
    pos = tile // n_head_blocks
    b = pos // S
    s = pos - b * S

    # -- the position's cos and sin rows, once for every head of q and k --
    cols = tl.arange(0, BLOCK_HALF)
    cmask = (cols < HALF) & live
    Cos += b * stride_cb + s * stride_cs
    Sin += b * stride_sb + s * stride_ss
    c1 = tl.load(Cos + cols * stride_cd, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + (cols + HALF) * stride_cd, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + cols * stride_sd, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + (cols + HALF) * stride_sd, mask=cmask, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of the rotation
        sa = -s2
        sb = -s1
    else:
        sa = s1
        sb = s2

    # -- the query heads of the block, then the key heads --
    _rotate_heads(Q, QO, b, s, block * BLOCK_HQ + tl.arange(0, BLOCK_HQ), HQ, live,
                  stride_qb, stride_qh, stride_qs, stride_qd,
                  stride_qob, stride_qoh, stride_qos, stride_qod,
                  c1, c2, sa, sb, cols, HALF, PASS, BLOCK_PASS, HAS_PASS)
    _rotate_heads(K, KO, b, s, block * BLOCK_HK + tl.arange(0, BLOCK_HK), HK, live,
                  stride_kb, stride_kh, stride_ks, stride_kd,
                  stride_kob, stride_koh, stride_kos, stride_kod,
                  c1, c2, sa, sb, cols, HALF, PASS, BLOCK_PASS, HAS_PASS)


def grid_for(n_tiles: int) -> tuple[int, int]:
    """(x, y) covering ``n_tiles`` programs within CUDA's limits; x * y may exceed n_tiles."""
    if n_tiles <= MAX_GRID_X:
        return (n_tiles, 1)
    rows = cdiv(n_tiles, MAX_GRID_X)
    if rows > MAX_GRID_Y:
        raise ValueError(f"rotary_embedding: {n_tiles} (position, head block) tiles exceed the "
                         f"{MAX_GRID_X} x {MAX_GRID_Y} grid")
    return (cdiv(n_tiles, rows), rows)


def _heads_view(x: torch.Tensor, heads_dim: int) -> torch.Tensor:
    """``x`` as (B, H, S, D): itself when the heads are dim 1, else its (1, 2) transpose."""
    return x if heads_dim == 1 else x.transpose(1, 2)


def rotary_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               heads_dim: int, inverse: bool, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Rotate q and k (4-D, their heads on ``heads_dim``, 1 or 2; the sequence on the other) by the
    (B or 1, S, R) tables ``cos``/``sin``; ``inverse`` applies the transpose (the backward).
    Returns new contiguous tensors in q's and k's shapes, or writes into ``out`` (which may be
    ``(q, k)`` themselves: the in-place form, whose pass-through dims are left untouched)."""
    in_place = out is not None and out[0] is q and out[1] is k
    if out is None:
        out = (empty(q.shape, dtype=q.dtype, device=q.device),
               empty(k.shape, dtype=k.dtype, device=k.device))
    qv, kv = _heads_view(q, heads_dim), _heads_view(k, heads_dim)
    qo, ko = _heads_view(out[0], heads_dim), _heads_view(out[1], heads_dim)
    B, HQ, S, D = qv.shape
    HK = kv.shape[1]
    R = cos.shape[-1]
    half, n_pass = R // 2, (0 if in_place else D - R)
    block_half = next_pow2(half)
    per_tile = max(1, TILE // block_half)
    block_hq, block_hk = min(next_pow2(HQ), per_tile), min(next_pow2(HK), per_tile)
    n_head_blocks = max(cdiv(HQ, block_hq), cdiv(HK, block_hk))
    n_tiles = B * S * n_head_blocks
    if n_tiles == 0:
        return out
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0  # one table for every batch row
    stride_sb = sin.stride(0) if sin.shape[0] > 1 else 0
    _rotary_fwd[grid_for(n_tiles)](
        qv, kv, qo, ko, cos, sin,
        *qv.stride(), *kv.stride(), *qo.stride(), *ko.stride(),
        stride_cb, cos.stride(1), cos.stride(2), stride_sb, sin.stride(1), sin.stride(2),
        S, HQ, HK, half, n_pass, n_head_blocks, n_tiles,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        BLOCK_PASS=next_pow2(n_pass), HAS_PASS=n_pass > 0, INVERSE=inverse,
        num_warps=warps_for_block(2 * max(block_hq, block_hk) * block_half),
    )
    return out
