"""LayerNorm and RMSNorm, each with the fused residual add ("Add & Norm"), forward and backward.

One kernel source serves both norms; the constexpr ``IS_RMS`` selects RMSNorm (no mean, no bias).
Forward, one program per row of ``N`` features:
  s    = x + residual                      (only with a residual; written once, rounded to x's dtype)
  LayerNorm: mean = sum(s) / N,  var = sum((s - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
             y    = (s - mean) * rstd * w + b
  RMSNorm:   rstd = 1 / sqrt(sum(s^2) / N + eps),  y = s * rstd * w   (mean = 0, not stored)
With ``CAST_BEFORE_WEIGHT`` (RMSNorm only) s * rstd is rounded to x's dtype before the weight
multiplies it, the casting order of Hugging Face's LlamaRMSNorm; y may then have another dtype than
x (torch.result_type(x, w)). A row whose sum of squares overflows fp32 (|s| past ~1e17) takes it
again in units of the row's largest magnitude, so large inputs normalise instead of giving 0.
A row of up to ``MAX_FUSED_FWD`` elements is held in registers: one read of each input, one write of
each output, plus 8 bytes of statistics per row. Longer rows stream through ``CHUNK`` wide tiles:
the statistics come from one pass that merges per-tile (mean, M2) pairs (Chan et al.), then a second
pass normalises, so such rows are read twice (the second read mostly from L2).

Backward, with xhat = (s - mean) * rstd and g = w * dy:
  ds = rstd * (g - xhat * mean(g * xhat) - mean(g))  (+ the gradient of the returned sum, if any)
  dw = sum_rows(dy * xhat),  db = sum_rows(dy)
RMSNorm is the same with mean = 0 and without the mean(g) term (its mean was never subtracted).
Each of ``G`` programs owns a contiguous run of rows and accumulates its dw/db in fp32 (registers for
short rows, its own row of the partial buffer for long rows); the ``G`` partials are then summed. The
reduction is deterministic and never serialises on a lock across the grid. Traffic per row: x, dy
(and ds) read, dx written, 8 bytes of statistics (4 for RMSNorm); per program: w read once, its
fp32 dw/db partial rows written once and read again by the sum (long rows: two passes over x, dy, w,
and pass 1 read-modify-writes the partial row in place, zero-filled beforehand).

Backward tuning. The plan gives G = 2 x SMs programs (few bytes in flight per SM for short rows:
at hidden 1024 that is 8 warps on an SM, each with one row of 2 KiB loads outstanding). The GPU
autotunes, keyed on the power-of-two bucket of M, BLOCK_N (the bucket of N; one for all long rows),
the flags and the dtypes, over candidates for short rows that keep more rows in flight:
  ROW_SPLIT in (1, 2, 4): each program takes 1/ROW_SPLIT of the plan's run of rows, so 2, 4 or
      8 programs per SM (FlashAttention's LayerNorm launches 8 x SMs to hide memory latency);
      offered while a program keeps >= MIN_SPLIT_ROWS rows, since every program adds a partial row
      to the sum (which the autotuner does not time).
  num_warps: warps_for_block's (about 8 elements per thread), half or double, in 1..16.
  ROW_STAGES = 2: the row loop software-pipelined by Triton, the next row's x and dy (and ds)
      loaded asynchronously while this row is reduced.
Long rows keep the default alone: their partials are zero-filled and accumulated in place, so more
programs would make every call zero more, and timed runs would add into each other's sums.
The first candidate (ROW_SPLIT 1, warps_for_block's warps, no ROW_STAGES) is the default, the
plain row loop: ROW_SPLIT 1 and ROW_STAGES None generate no instructions, and rows_per_program
stays a host-planned argument (computing it in the kernel, or pipelining by default, costs
registers and occupancy).
It is what the interpreter and LIGHTLLM_AUTOTUNE=0 run; tests launch the others through the
launchers' ``config`` argument.

Grids: the forward's M programs and the backward's G <= 8 x SMs lie on axis 0. M past axis 0's
2^31 - 1 is possible only for rows of a few features (2^31 rows of 32 fp16 features are 128 GiB
with the output): the launcher refuses it with a ValueError rather than a launch error.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._device import sm_count
from ._utils import (
    autotune,
    autotune_configs,
    cdiv,
    empty,
    next_pow2,
    row_block,
    warps_for_block,
)

MAX_FUSED_FWD = 16384  # longest row the forward keeps in registers
MAX_ROWS = 2**31 - 1  # the forward's one program per row, on grid axis 0
MAX_FUSED_BWD = 8192  # the backward holds more per element (x, dy, w, dw, db)
CHUNK = 4096  # tile width for rows longer than that
BWD_PROGRAMS_PER_SM = 2  # the backward plan's programs (its candidates split their runs further)
ROW_SPLITS = (1, 2, 4)  # 2, 4, 8 programs per SM
MIN_SPLIT_ROWS = 4  # a split run keeps at least this many rows (each program adds a partial row)


@triton.jit
def _load_input(X, R, S, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """x (fp32) at ``offs``; with a residual, x + r rounded to the output dtype and stored to S,
    so what is normalised is exactly the sum that is returned (and saved for the backward)."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + offs, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _affine(y, W, B, offs, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
            ROUND_TO: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr):
    if CAST_BEFORE_WEIGHT:  # the normalised value in the input's dtype, then the weight
        y = y.to(ROUND_TO).to(tl.float32)
    if HAS_WEIGHT:
        y = y * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _overflowed(ssq, amax):
    """RMSNorm: the fp32 sum of squares overflowed although every element is finite (an inf or
    NaN element keeps PyTorch's answer)."""
    return (ssq == float("inf")) & (amax < float("inf"))


@triton.jit
def _rms_rstd(ssq, amax, scaled, N, eps):
    """1 / sqrt(ssq / N + eps), where a ``scaled`` ssq is in units of amax^2 (amax > 1e17 then, so
    neither 1 / amax nor eps / amax^2 overflows)."""
    unit = tl.maximum(amax, 1.0)  # = amax where it is used; no 0 / 0 in the other lanes
    rstd_scaled = 1.0 / (tl.sqrt(ssq / N + eps / unit / unit) * unit)
    return tl.where(scaled, rstd_scaled, 1.0 / tl.sqrt(ssq / N + eps))


@triton.jit
def _layer_norm_fwd(
    X, R, W, B, Y, S, Mean, Rstd,
    stride_x, stride_r, stride_y, stride_s,
    N, eps,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_RMS: tl.constexpr,
    CAST_BEFORE_WEIGHT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    R += row * stride_r
    S += row * stride_s
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_TILE:
        # -- the row in registers: load, add the residual, statistics, normalise, store --
        mask = cols < N
        x = _load_input(X, R, S, cols, mask, HAS_RESIDUAL)
        if IS_RMS:
            mean = 0.0
            xc = x  # 0 outside the row
            ssq = tl.sum(xc * xc, axis=0)
            amax = tl.max(tl.abs(xc), axis=0)
            scaled = _overflowed(ssq, amax)
            if scaled:  # -- only then: the squares again, in units of amax --
                ssq = tl.sum((xc / amax) * (xc / amax), axis=0)
            rstd = _rms_rstd(ssq, amax, scaled, N, eps)
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / N
            rstd = 1.0 / tl.sqrt(var + eps)
        y = _affine(xc * rstd, W, B, cols, mask, HAS_WEIGHT, HAS_BIAS, X.dtype.element_ty,
                    CAST_BEFORE_WEIGHT)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # The source of passes after the first: the sum, when there is one, is re-read from S.
        if HAS_RESIDUAL:
            SRC = S
        else:
            SRC = X
        if IS_RMS:
            # -- pass 1: the sum of squares and the largest magnitude --
            mean = 0.0
            ssq = 0.0
            amax = 0.0
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                x = _load_input(X, R, S, offs, offs < N, HAS_RESIDUAL)
                ssq += tl.sum(x * x, axis=0)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
            scaled = _overflowed(ssq, amax)
            if scaled:  # -- only then: the squares again, in units of amax --
                ssq = 0.0
                for start in range(0, N, BLOCK_N):
                    offs = start + cols
                    x = tl.load(SRC + offs, mask=offs < N, other=0.0).to(tl.float32) / amax
                    ssq += tl.sum(x * x, axis=0)
            rstd = _rms_rstd(ssq, amax, scaled, N, eps)
        else:
            # -- pass 1: per-tile (mean, M2), merged into the row's running statistics --
            count = 0.0
            mean = 0.0
            m2 = 0.0
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                mask = offs < N
                x = _load_input(X, R, S, offs, mask, HAS_RESIDUAL)
                n_tile = tl.minimum(N - start, BLOCK_N).to(tl.float32)
                mean_tile = tl.sum(x, axis=0) / n_tile
                xc = tl.where(mask, x - mean_tile, 0.0)
                m2_tile = tl.sum(xc * xc, axis=0)
                total = count + n_tile
                delta = mean_tile - mean
                mean += delta * (n_tile / total)
                m2 += m2_tile + delta * delta * (count * n_tile / total)
                count = total
            rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # -- pass 2: normalise tile by tile --
        for start in range(0, N, BLOCK_N):
            offs = start + cols
            mask = offs < N
            x = tl.load(SRC + offs, mask=mask, other=0.0).to(tl.float32)
            y = _affine((x - mean) * rstd, W, B, offs, mask, HAS_WEIGHT, HAS_BIAS,
                        X.dtype.element_ty, CAST_BEFORE_WEIGHT)
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    if not IS_RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _bwd_tile(X, DY, W, offs, mask, mean, rstd, HAS_WEIGHT: tl.constexpr):
    """xhat (0 outside the row), dy and g = w * dy of one tile, in fp32."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    if HAS_WEIGHT:
        g = dy * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = dy
    return xhat, dy, g


@triton.jit
def _store_dx(DX, DS, offs, mask, dx, HAS_DS: tl.constexpr):
    """Store dx, plus the gradient of the returned sum when there is one."""
    if HAS_DS:
        dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _row_mean(Mean, IS_RMS: tl.constexpr):
    """The row's saved mean; RMSNorm has none (its xhat is s * rstd)."""
    if IS_RMS:
        return 0.0
    else:
        return tl.load(Mean)


@triton.jit
def _mean_g(g, N, IS_RMS: tl.constexpr):
    """mean(g), the term of dx that comes from subtracting the mean (none for RMSNorm)."""
    if IS_RMS:
        return 0.0
    else:
        return tl.sum(g, axis=0) / N


def _bwd_config(row_split: int, warps: int, row_stages: int | None = None) -> triton.Config:
    return triton.Config({"ROW_SPLIT": row_split, "ROW_STAGES": row_stages}, num_warps=warps)


# Every candidate the pruning may keep; the first is the interpreter's (its warps do not matter
# there). _bwd_offered picks and orders those of a launch, the default first.
BWD_CONFIGS = [_bwd_config(split, warps, stages) for split in ROW_SPLITS for stages in (None, 2)
               for warps in (1, 2, 4, 8, 16)]


def _bwd_warps(block: int) -> list[int]:
    """warps_for_block's warps for ``block``, then half and double of them (in 1..16)."""
    default = warps_for_block(block)
    return list(dict.fromkeys(max(1, min(16, w)) for w in (default, default // 2, default * 2)))


def _bwd_offered(configs, block: int, single: bool, rows_per_program: int) -> list[triton.Config]:
    """The candidates of ``configs`` for one launch, in the order (split, stages, warps) with the
    default first: short rows only (long rows keep the default), a split while its runs keep
    MIN_SPLIT_ROWS rows."""
    warps = _bwd_warps(block)

    def offered(c):
        split, stages = c.kwargs["ROW_SPLIT"], c.kwargs["ROW_STAGES"]
        if not single:  # accumulates in place: a timed run would leave its sums to the next
            return split == 1 and stages is None and c.num_warps == warps[0]
        return c.num_warps in warps and (split == 1
                                         or cdiv(rows_per_program, split) >= MIN_SPLIT_ROWS)

    def order(c):
        return (c.kwargs["ROW_SPLIT"], c.kwargs["ROW_STAGES"] is not None,
                warps.index(c.num_warps))

    return sorted(filter(offered, configs), key=order)


def _bwd_prune(configs, named_args, **kwargs):
    return _bwd_offered(configs, kwargs["BLOCK_N"], kwargs["SINGLE_TILE"],
                        named_args["rows_per_program"])


@autotune(configs=autotune_configs(BWD_CONFIGS),
          key=["M_BUCKET", "BLOCK_N", "SINGLE_TILE", "HAS_WEIGHT", "HAS_DS", "NEED_DW", "NEED_DB",
               "IS_RMS"],
          prune_configs_by={"early_config_prune": _bwd_prune})
@triton.jit
def _layer_norm_bwd(
    DY, X, W, Mean, Rstd, DS, DX, DW, DB,
    stride_dy, stride_x, stride_ds, stride_dx,
    M, N, rows_per_program,
    M_BUCKET,  # read by the autotuner's key only
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DS: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    IS_RMS: tl.constexpr,
    ROW_SPLIT: tl.constexpr,
    ROW_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    if ROW_SPLIT > 1:  # a candidate: 1/ROW_SPLIT of the run the host planned for each program
        rows_per_program = tl.cdiv(rows_per_program, ROW_SPLIT)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    # Row pointers advance by one stride per row: 64-bit pointer arithmetic, no int32 products.
    first = row_start.to(tl.int64)
    X += first * stride_x
    DY += first * stride_dy
    DS += first * stride_ds
    DX += first * stride_dx
    Mean += first
    Rstd += first
    # This program's row of the (G, N) fp32 partial sums of dw and db.
    DW += pid.to(tl.int64) * N
    DB += pid.to(tl.int64) * N

    if SINGLE_TILE:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        # ROW_STAGES None: Triton's own choice (a plain loop); 2: the next row's loads in flight.
        for _ in tl.range(row_start, row_end, num_stages=ROW_STAGES):
            # -- recompute xhat from the saved statistics --
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
            mean = _row_mean(Mean, IS_RMS)
            rstd = tl.load(Rstd)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_WEIGHT:
                g = dy * w
            else:
                g = dy
            # -- dx from the two row reductions (one for RMSNorm) --
            c1 = tl.sum(xhat * g, axis=0) / N
            c2 = _mean_g(g, N, IS_RMS)
            _store_dx(DX, DS, cols, mask, (g - (xhat * c1 + c2)) * rstd, HAS_DS)
            # -- accumulate this program's share of dw, db --
            dw_acc += dy * xhat
            db_acc += dy
            X += stride_x
            DY += stride_dy
            DS += stride_ds
            DX += stride_dx
            Mean += 1
            Rstd += 1
        if NEED_DW:
            tl.store(DW + cols, dw_acc, mask=mask)
        if NEED_DB:
            tl.store(DB + cols, db_acc, mask=mask)
    else:
        for _ in range(row_start, row_end):
            mean = _row_mean(Mean, IS_RMS)
            rstd = tl.load(Rstd)
            # -- pass 1: the row reductions, and dw/db into this program's partial row --
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                mask = offs < N
                xhat, dy, g = _bwd_tile(X, DY, W, offs, mask, mean, rstd, HAS_WEIGHT)
                c1 += tl.sum(xhat * g, axis=0)
                if not IS_RMS:
                    c2 += tl.sum(g, axis=0)
                if NEED_DW:
                    tl.store(DW + offs, tl.load(DW + offs, mask=mask) + dy * xhat, mask=mask)
                if NEED_DB:
                    tl.store(DB + offs, tl.load(DB + offs, mask=mask) + dy, mask=mask)
            c1 = c1 / N
            c2 = c2 / N
            # -- pass 2: dx tile by tile --
            for start in range(0, N, BLOCK_N):
                offs = start + cols
                mask = offs < N
                xhat, dy, g = _bwd_tile(X, DY, W, offs, mask, mean, rstd, HAS_WEIGHT)
                _store_dx(DX, DS, offs, mask, (g - (xhat * c1 + c2)) * rstd, HAS_DS)
            X += stride_x
            DY += stride_dy
            DS += stride_ds
            DX += stride_dx
            Mean += 1
            Rstd += 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view whose rows are contiguous (the row stride may be anything)."""
    return t if t.stride(1) == 1 else t.contiguous()


@functools.cache
def _fwd_plan(n: int) -> tuple[int, bool, int]:
    """(BLOCK_N, SINGLE_TILE, num_warps) of the forward for rows of ``n`` features."""
    single = n <= MAX_FUSED_FWD
    block = row_block(n, MAX_FUSED_FWD if single else CHUNK)
    return block, single, warps_for_block(block)


@functools.cache
def _bwd_plan(m: int, n: int, sms: int) -> tuple[int, bool, int, dict[int, int], int]:
    """(BLOCK_N, SINGLE_TILE, rows_per_program, programs, partial_rows) of the backward: enough
    programs to fill the GPU twice over, each owning a contiguous run of rows; ``programs`` maps
    each ROW_SPLIT to the programs its candidates launch, ``partial_rows`` is the most of them
    the path can launch (the rows of the dw/db partial buffers)."""
    single = n <= MAX_FUSED_BWD
    block = row_block(n, MAX_FUSED_BWD if single else CHUNK)
    planned = max(1, min(m, BWD_PROGRAMS_PER_SM * sms))
    rows_per_program = cdiv(m, planned) if m else 0
    programs = {split: cdiv(m, cdiv(rows_per_program, split)) if m else 1 for split in ROW_SPLITS}
    partial_rows = max(programs.values()) if single else programs[1]
    return block, single, rows_per_program, programs, partial_rows


@functools.cache
def bwd_candidates(n: int) -> list[triton.Config]:
    """The backward's candidates for rows of ``n`` features at any number of rows (every split),
    default first: what tests may pass as ``config``."""
    block, single, *_ = _bwd_plan(1, n, 1)
    return _bwd_offered(BWD_CONFIGS, block, single, MAX_ROWS)


def _fwd(x, residual, weight, bias, eps: float, is_rms: bool, cast_before_weight: bool,
         out_dtype: torch.dtype):
    """Launch the forward of either norm on a 2-D ``x`` (M, N): ``(y, s, mean, rstd)``; ``mean`` is
    None for RMSNorm, ``s`` None without a residual."""
    x = _rows(x)
    M, N = x.shape
    if M > MAX_ROWS:
        name = "rms_norm" if is_rms else "layer_norm"
        raise ValueError(f"{name}: the input has {M} rows of {N} features; at most "
                         f"{MAX_ROWS} rows are supported (one program per row)")
    dev = x.device
    y = empty((M, N), dtype=out_dtype, device=dev)
    mean = None if is_rms else empty((M,), dtype=torch.float32, device=dev)
    rstd = empty((M,), dtype=torch.float32, device=dev)
    if residual is None:
        s = None
        r, stride_r, stride_s = x, 0, 0
    else:
        r = _rows(residual)
        s = empty((M, N), dtype=x.dtype, device=dev)
        stride_r, stride_s = r.stride(0), N
    if M == 0:
        return y, s, mean, rstd
    block, single, warps = _fwd_plan(N)
    _layer_norm_fwd[(M,)](
        x, r, x if weight is None else weight, x if bias is None else bias,
        y, y if s is None else s, rstd if mean is None else mean, rstd,
        x.stride(0), stride_r, N, stride_s,
        N, eps,
        BLOCK_N=block, SINGLE_TILE=single, HAS_RESIDUAL=s is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        IS_RMS=is_rms, CAST_BEFORE_WEIGHT=cast_before_weight,
        num_warps=warps,
    )
    return y, s, mean, rstd


def _bwd(dy, x, weight, mean, rstd, ds, need_dw: bool, need_db: bool, is_rms: bool,
         config: triton.Config | None = None):
    """Launch the backward of either norm (``mean`` is None for RMSNorm): ``(dx, dw, db)``.

    ``config``: for tests, one of ``bwd_candidates(N)`` launched as given instead of the
    autotuner's choice (the interpreter's autotuner only ever runs the first)."""
    dy, x = _rows(dy), _rows(x)
    ds = _rows(ds) if ds is not None else None
    M, N = x.shape
    dev = x.device
    dx = empty((M, N), dtype=x.dtype, device=dev)
    block, single, rows_per_program, programs, partial_rows = _bwd_plan(M, N, sm_count(x))
    alloc = empty if single else torch.zeros  # the long-row path accumulates in place
    dw_partial = alloc((partial_rows, N), dtype=torch.float32, device=dev) if need_dw else None
    db_partial = alloc((partial_rows, N), dtype=torch.float32, device=dev) if need_db else None
    # The chosen candidate's programs: the autotuner calls the grid with its config's constexprs.
    launched = [programs[1]]

    def grid(meta):
        launched[0] = programs[meta["ROW_SPLIT"]]
        return (launched[0],)

    if config is None:
        kernel, tuning = _layer_norm_bwd, {}
    else:
        if config not in bwd_candidates(N):
            raise ValueError(f"layer_norm backward: {config} is not a candidate for rows of {N}")
        kernel, tuning = _layer_norm_bwd.fn, config.all_kwargs()
    if M > 0:
        kernel[grid](
            dy, x, x if weight is None else weight, rstd if mean is None else mean, rstd,
            dy if ds is None else ds, dx,
            dw_partial if need_dw else dx, db_partial if need_db else dx,
            dy.stride(0), x.stride(0), 0 if ds is None else ds.stride(0), N,
            M, N, rows_per_program, next_pow2(M),
            BLOCK_N=block, SINGLE_TILE=single, HAS_WEIGHT=weight is not None,
            HAS_DS=ds is not None, NEED_DW=need_dw, NEED_DB=need_db, IS_RMS=is_rms,
            **tuning,
        )
    used = launched[0]
    if used < partial_rows:  # a slice costs host time: only when rows were left unwritten
        dw_partial = dw_partial[:used] if need_dw else None
        db_partial = db_partial[:used] if need_db else None
    dw = dw_partial.sum(0) if need_dw else None
    db = db_partial.sum(0) if need_db else None
    return dx, dw, db


def layer_norm_fwd(x, residual, weight, bias, eps: float):
    """LayerNorm's forward on a 2-D ``x`` (M, N). Returns ``(y, s, mean, rstd)``; ``s`` (the sum
    x + residual) is None without a residual. ``mean``/``rstd`` are fp32 of shape (M,)."""
    return _fwd(x, residual, weight, bias, eps, False, False, x.dtype)


def layer_norm_bwd(dy, x, weight, mean, rstd, ds, need_dw: bool, need_db: bool, config=None):
    """LayerNorm's backward on 2-D ``dy``/``x`` (M, N); ``x`` is what was normalised (the sum for
    Add & Norm) and ``ds`` the gradient of the returned sum, or None. Returns ``(dx, dw, db)`` with
    dw/db fp32 of shape (N,), or None where not needed. ``config``: tests only (see ``_bwd``)."""
    return _bwd(dy, x, weight, mean, rstd, ds, need_dw, need_db, False, config)


def rms_norm_fwd(x, residual, weight, eps: float, cast_before_weight: bool, out_dtype: torch.dtype):
    """RMSNorm's forward on a 2-D ``x`` (M, N): ``(y, s, rstd)``, y of ``out_dtype``, s None
    without a residual, rstd fp32 (M,). ``cast_before_weight``: round x * rstd to x's dtype before
    the weight multiplies it (LlamaRMSNorm's order)."""
    y, s, _, rstd = _fwd(x, residual, weight, None, eps, True, cast_before_weight, out_dtype)
    return y, s, rstd


def rms_norm_bwd(dy, x, weight, rstd, ds, need_dw: bool, config=None):
    """RMSNorm's backward on 2-D ``dy``/``x`` (M, N), as layer_norm_bwd: ``(dx, dw)``."""
    dx, dw, _ = _bwd(dy, x, weight, None, rstd, ds, need_dw, False, True, config)
    return dx, dw
