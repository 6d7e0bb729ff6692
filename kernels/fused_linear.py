"""Linear + bias + activation (GeLU, its tanh form, ReLU) fused into the matmul epilogue, and the
gated form SwiGLU (two weights, one matmul), forward and backward.

One tiled matmul, ``C = A @ B`` for a 2-D ``A`` (M, K) and ``B`` (K, N), in two flavours sharing
their tile order and epilogue:
  * ``_linear_gelu_mm_tma``: fp16/bf16 operands with 16-byte aligned rows (Hopper+ and the
    interpreter). Operand tiles arrive by TMA through host tensor descriptors; the copy engine
    zero-fills boxes past the edges, so the loop has no address arithmetic and no masks. ``B`` is
    read either in the weight layout (N, K) (its tile transposed for the product) or as (K, N).
  * ``_linear_gelu_mm``: pointer loads, any strides and alignment (fp32, K = 1023 in fp16, views);
    rows/columns past the edge wrap so loads stay in bounds, the K edge is masked. fp32 operands
    use ``input_precision="ieee"`` so the result matches PyTorch rather than TF32.
Both: programs walk (BLOCK_M, BLOCK_N) output tiles in grouped order (GROUP_M row tiles share
the B column panels while they are hot in L2); the K loop accumulates in fp32 and is
software-pipelined by Triton (``num_stages``); autotuned per (M bucket, N, K, dtype, epilogue),
beside split-K candidates for decode (below).
The epilogue works on the fp32 tile before the single store:
    pre = acc + bias                                   (HAS_BIAS)
    AUX_STORE_PRE: also store pre (the saved pre-activation of the backward)
    out = gelu(pre) | gelu_tanh(pre) | relu(pre) | silu(pre) | pre (ACTIVATION)
    AUX_ACT_GRAD: out = acc * act'(aux), aux = a saved pre-activation (backward dH -> dPre)
    out += residual                                     (HAS_RESIDUAL)
GATED (SwiGLU): the program reads a second weight B2 (N, K) beside B with the *same* A tile and
keeps a second fp32 accumulator: g = A B^T + bias, u = A B2^T + bias2 (HAS_BIAS2), and the
epilogue writes out = act(g) * u (AUX_STORE_PRE also writes g to Aux and u to Aux2). A is read
once for both products and the two pre-activations never reach memory unless a backward saves
them. Two accumulators double the registers per tile, so gated launches prune to their own
(smaller) tile lists. AUX_GATE_GRAD is its backward through a matmul: acc = dH, Aux = g,
Aux2 = u; Out = dG = dH * u * act'(g), Out2 = dU = dH * act(g) (two outputs, one accumulator).
Memory traffic of the forward: A and B from DRAM once (tiles re-read through L2), C written once
(plus pre once when a backward needs it); eager PyTorch writes pre, reads it and writes gelu(pre)
(SwiGLU in eager: g and u written, read, silu(g) written and read, h written).

Split-K (decode, M <= 32; both kernels, ``SPLIT_K`` > 1): with a handful of rows one row tile
covers M, and N = 4096 makes only 32-64 programs (BLOCK_N 128 / 64), so a 132-SM H100/H200
streams the weight -- the whole cost at this size -- from a fraction of its SMs. The split-K
candidates launch a (tiles, SPLIT_K) grid: program (t, s) runs the K loop over slice s of
SPLIT_K near-equal slices of the K blocks, adds its fp32 partial into an fp32 workspace tile with
``tl.atomic_add`` (in L2), then increments the tile's int32 arrival counter (acq_rel, after a
barrier so every thread's adds precede the release). The last of the SPLIT_K to arrive reads the
full sum back from L2, zeroes the workspace tile and the counter, and runs the epilogue above
unchanged on it; the others stop. Extra traffic: SPLIT_K x M x N x 4 bytes of atomic adds plus
M x N x 4 bytes read back and as many zeroed (GATED: twice), all on an L2-resident workspace;
at M = 32, SPLIT_K = 8, K = 4096 the adds are an eighth of the bf16 weight's N x K x 2 bytes.
The workspace is cached per device and grown as needed, never filled per call (the last arrival
leaves it zero): no allocation or fill on the hot path once it exists at the needed size, so a
split-K launch can be captured in a CUDA graph (see ``_split_k_workspace`` for its limitation:
concurrent streams). The order of the atomic adds varies between runs, so the sums are not
bitwise reproducible: under ``torch.use_deterministic_algorithms`` the launcher passes
MAX_SPLIT_K = 1 and the pruning drops the split-K candidates, as it does above 32 rows.
They come after the unsplit tiles in every list, so the default config (LIGHTLLM_AUTOTUNE=0, the
interpreter) is never split, and the autotuner picks split-K only where it measures faster.

Persistent (TMA kernel, ``PERSISTENT``; training and prefill sizes): min(tiles, SMs) programs,
each walking output tiles pid, pid + programs, ... in the same grouped order through one loop
that Triton flattens with the K loop (``tl.range(..., flatten=True)``), so the next tile's TMA
loads are issued while this tile's epilogue runs and no program is launched after the first
wave. Offered only where the output has more tiles than the GPU has SMs, after the tiles of one
program each (the autotuner chooses); not gated (two accumulators spill at 128 x 128) and not
split. The epilogue still stores through pointers: its fused outputs (pre, g, u, dG/dU) are
masked at the edges as in the one-tile form.

Uses of the one matmul:
  linear_gelu forward       y = gelu(x @ W^T + b)                 (+ pre when saving for backward)
  feed_forward forward      h = gelu(x @ W1^T + b1);  y = h @ W2^T + b2 + residual
  feed_forward backward     dPre = (dY @ W2) * act'(pre)          (dH never reaches memory)
  linear_swiglu forward     h = silu(x Wg^T + bg) * (x Wu^T + bu)  (GATED; + g, u when saving)
  swiglu_feed_forward bwd   dG, dU from dH = dY @ Wd               (AUX_GATE_GRAD)
The plain matmuls of the backward (dX = dPre @ W, dW = dPre^T @ X) are left to cuBLAS by the op.

``_linear_gelu_bwd`` is the elementwise backward of ``linear_gelu`` alone (no matmul produces its
dY): dPre = dY * act'(pre), with db's per-program column partial sums in the same pass
(dY and pre read once, dPre written once, db from a (G, N) fp32 partial buffer). GATED, that of
``linear_swiglu``: dG = dH * u * act'(g), dU = dH * act(g), both db's.

GeLU forms: exact ``0.5 x (1 + erf(x / sqrt 2))``; tanh ``0.5 x (1 + tanh(u))``, u =
sqrt(2/pi) (x + 0.044715 x^3), computed as ``x * sigmoid(2u)`` (the same value; no libdevice tanh,
which the interpreter lacks, and no cancellation in 1 + tanh(u) for large negative x). ReLU's
derivative is taken as 0 at 0, as PyTorch's ``threshold_backward`` does. SiLU is
``x * sigmoid(x)``, its derivative ``s + x s (1 - s)``: for |x| large sigmoid saturates to exactly
0 or 1 (exp overflows to inf, 1 / (1 + inf) = 0), so neither overflows.
Offsets are 64-bit (row offsets are cast before multiplying by strides, K steps are int64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _device
from ._device import sm_count
from ._utils import (
    INTERPRET,
    autotune,
    autotune_configs,
    cdiv,
    empty,
    next_pow2,
)

# ACTIVATION codes; the ops name them by the strings of ACTIVATIONS.
ACT_NONE = 0
ACT_GELU = 1
ACT_GELU_TANH = 2
ACT_RELU = 3
ACT_SILU = 4  # the gate of SwiGLU: the gated launchers pass it, linear_act does not offer it
ACTIVATIONS = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU}

# AUX codes: what the epilogue does with the auxiliary (M, N) tensor.
AUX_NONE = 0
AUX_STORE_PRE = 1  # write the pre-activation there
AUX_ACT_GRAD = 2  # read a pre-activation there and multiply the tile by act'(pre)
AUX_GATE_GRAD = 3  # read g (Aux) and u (Aux2); write dH * u * act'(g) and dH * act(g) (Out2)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # exact GeLU
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:  # tanh GeLU
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 3:  # ReLU (NaN stays NaN, as torch.relu)
        return tl.where(x < 0.0, 0.0, x)
    elif ACTIVATION == 4:  # SiLU
        return x * tl.sigmoid(x)
    else:
        return x


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        # Phi(x) + x phi(x)
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        return cdf + x * pdf
    elif ACTIVATION == 2:
        # d/dx [x s(2u)] = s + 2 x s (1 - s) u',  u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        du = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        return s + 2.0 * x * s * (1.0 - s) * du
    elif ACTIVATION == 3:
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACTIVATION == 4:
        s = tl.sigmoid(x)
        return s + x * s * (1.0 - s)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


# Tiles as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K | PERSISTENT]). The first
# is the interpreter's one config and a sound H100 default for fp16/bf16.
_SPLITS = (2, 4, 8)
_SPLIT_K_MAX_M = 32  # split-K only for M <= 32: above, the row tiles fill the SMs themselves
PERSISTENT = "persistent"  # the TMA kernel's persistent form: one program per SM over the tiles


def _persistent(*tiles) -> list:
    """Persistent candidates (TMA kernel, training/prefill sizes): ``tiles`` walked by one program
    per SM, the next tile's loads overlapping this one's epilogue."""
    return [t + (PERSISTENT,) for t in tiles]


def _split_k(*tiles) -> list:
    """Split-K candidates (decode): ``tiles`` with K cut into SPLIT_K slices, one program per
    (tile, slice), so N = 4096 makes 128-512 programs instead of 32-64 thin tiles' worth."""
    return [t + (s,) for s in _SPLITS for t in tiles]


_HALF_TILES = [
    (128, 128, 64, 8, 3),
    # Large tiles for prefill/training sizes (wgmma over two warpgroups).
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),
    # Few rows (decode, M <= 32): thin tiles, many programs along N, deep K steps.
    (16, 64, 128, 4, 4),
    (16, 128, 128, 4, 3),
    (32, 64, 128, 4, 4),
    (32, 128, 64, 4, 4),
    # Split-K twins of the thin tiles that compile clean in both kernels (16x128 spills 720
    # bytes in the pointer kernel at K = 1023, as its SPLIT_K = 1 form does: ptxas sm_90a).
    *_split_k((16, 64, 128, 4, 4), (32, 64, 128, 4, 4)),
    # Persistent twins of the big tiles (TMA kernel only; 187 registers at 128x128 on 8 warps,
    # no spill; the gated form's two accumulators spill there, so it has none).
    *_persistent((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)),
]
# fp32 runs the exact ("ieee") product on CUDA cores: small K steps and at most 64 accumulators
# per thread, or the tile spills (ptxas, sm_90: 128x128 on 4 warps spills ~2.5 KB).
_FP32_TILES = [
    (64, 64, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 4, 3),
    (128, 128, 32, 8, 3),
    (32, 64, 32, 4, 3),
    (16, 64, 64, 4, 3),
    *_split_k((16, 64, 64, 4, 3), (32, 64, 32, 4, 3)),
]
# Two accumulators (GATED): at most 128 fp32 accumulator values per thread, e.g. 128x128 over 8
# warps (2 x 64): no 128x256 / 256x128 tiles, and 128x64 / 64x128 on 8 warps, not 4 (there they
# spill 44 / 28 bytes saving g and u, ptxas sm_90a); shared memory holds two B tiles per stage.
# The TMA default, 128x128 on 8 warps, takes 184 registers saving g and u, 255 without (ptxas,
# sm_90a; no spill).
_GATED_HALF_TILES = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 8, 4),
    (64, 128, 64, 8, 4),
    (64, 64, 64, 4, 4),
    (16, 64, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (32, 64, 64, 4, 4),
    *_split_k((16, 64, 128, 4, 4), (32, 64, 128, 4, 4)),
]
# Below 128x128 for the gated pointer kernel (rows that are not 16-byte aligned stage operands
# through registers: 128x128 spills 1.3 KB there) and for AUX_GATE_GRAD (its epilogue holds dH,
# g and dU or u: 128x128 spills 76 bytes). No split-K there: the gated pointer kernel's thin tiles
# spill already (16x64: 972 bytes, 32x64: 6.5 KB at K = 1023), their split-K twins as much.
_GATED_HALF_TILES_SMALL = [t for t in _GATED_HALF_TILES if t[0] * t[1] < 128 * 128 and len(t) == 5]
_GATED_FP32_TILES = [
    (64, 64, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (32, 64, 32, 4, 3),
    (16, 64, 64, 4, 3),
    *_split_k((16, 64, 64, 4, 3)),
]


def _unique(*lists) -> list:
    """The tiles of ``lists`` in order, each once (one autotune list serves every epilogue)."""
    return list(dict.fromkeys(t for tiles in lists for t in tiles))


_POINTER_TILES = [t for t in _unique(_HALF_TILES, _FP32_TILES, _GATED_HALF_TILES,
                                     _GATED_FP32_TILES) if PERSISTENT not in t]
_TMA_TILES = _unique(_HALF_TILES, _GATED_HALF_TILES)
# The smallest split-K (BLOCK_M, BLOCK_N): the most output tiles, so the most arrival counters.
_SPLIT_K_MIN_TILE = tuple(min(t[i] for t in _POINTER_TILES if len(t) == 6) for i in (0, 1))


def _config(tile, pre_hook=None) -> triton.Config:
    bm, bn, bk, warps, stages, *extra = tile
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
            "SPLIT_K": extra[0] if extra and extra[0] != PERSISTENT else 1}
    if PERSISTENT in extra:
        meta["PERSISTENT"] = True
    return triton.Config(meta, num_warps=warps, num_stages=stages, pre_hook=pre_hook)


def _tile_of(c: triton.Config) -> tuple:
    k = c.kwargs
    extra = ((k["SPLIT_K"],) if k["SPLIT_K"] > 1 else
             (PERSISTENT,) if k.get("PERSISTENT") else ())
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages, *extra)


def _set_tma_blocks(nargs) -> None:
    """Autotune pre-hook of the TMA kernel: the descriptors' boxes follow the chosen tile."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["ADesc"].block_shape = [bm, bk]
    nargs["BDesc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]
    nargs["B2Desc"].block_shape = nargs["BDesc"].block_shape  # the same object unless GATED


# Shared memory a config's pipelined operand tiles may take: a program's share less room for the
# epilogue (200 KiB of an H100's 227).
_EPILOGUE_SMEM = 27 * 1024


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tiles meant for this dtype and epilogue (two accumulators or one) whose pipelined
    operand tiles fit in shared memory, and drop row tiles far taller than M (they would only
    compute wrapped rows), split-K tiles beyond the launcher's MAX_SPLIT_K (1 above
    _SPLIT_K_MAX_M rows, under deterministic algorithms, or without a workspace) and persistent
    tiles where the output has no more tiles than the GPU has SMs (one wave either way)."""
    esize = named_args["Out"].element_size()
    gated = kwargs["GATED"]
    if not gated and kwargs["AUX"] != AUX_GATE_GRAD:
        tiles = _FP32_TILES if esize == 4 else _HALF_TILES
    elif esize == 4:
        tiles = _GATED_FP32_TILES
    else:
        tma = "ADesc" in named_args
        tiles = _GATED_HALF_TILES if gated and tma else _GATED_HALF_TILES_SMALL
    b_tiles = 2 if gated else 1
    m_bucket, max_split = named_args["M_BUCKET"], named_args["MAX_SPLIT_K"]
    device = _device.facts(named_args["Out"].device)
    sms, smem_budget = device.sms, device.smem_per_block - _EPILOGUE_SMEM
    kept = []
    for c in configs:
        bm, bn, bk, _, stages = _tile_of(c)[:5]
        smem = (bm * bk + b_tiles * bk * bn) * esize * stages
        if _tile_of(c) not in tiles or smem > smem_budget:
            continue
        if bm > max(16, 2 * m_bucket) or c.kwargs["SPLIT_K"] > max_split:
            continue
        if c.kwargs.get("PERSISTENT") and cdiv(m_bucket, bm) * cdiv(named_args["N"], bn) <= sms:
            continue
        kept.append(c)
    # In the order of the epilogue's own list: its first fitting tile is the default.
    return sorted(kept, key=lambda c: tiles.index(_tile_of(c))) or configs[:1]


# M by power-of-two bucket: a new token count does not trigger a new tuning run. The autotuner
# appends the dtype of every tensor argument to this key.
_KEY = ["M_BUCKET", "MAX_SPLIT_K", "N", "K", "ACTIVATION", "AUX", "GATED", "HAS_BIAS",
        "HAS_BIAS2", "HAS_RESIDUAL"]
_PRUNE = None if INTERPRET else {"early_config_prune": _prune_configs}


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program's output tile."""
    return _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``pid`` in grouped order: GROUP_M row tiles sweep the column
    tiles together, so each B column panel is reused from L2 by GROUP_M programs."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _k_slice(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K blocks [first, last) of this program's slice (program_id(1)) of SPLIT_K near-equal
    slices; a trailing slice may be empty (it still arrives in _split_k_sum)."""
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_slice = tl.cdiv(k_blocks, SPLIT_K)
    first = tl.program_id(1) * per_slice
    return first, tl.minimum(first + per_slice, k_blocks)


@triton.jit
def _split_k_sum(acc, acc2, pid_m, pid_n, M, N, Partials, Arrivals, GATED: tl.constexpr,
                 SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Add this K slice's fp32 partial(s) into the workspace tile(s) and arrive at the tile's
    counter. Returns the full sum(s) and whether this program arrived last: only that one holds
    the sums, and it has reset the workspace tile(s) and the counter to zero for the next call.
    Partials: (M, N) fp32 (GATED: a second (M, N) for acc2 after it); Arrivals: one int32 per
    output tile (program_id(0))."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    offs2 = offs + M * N
    tl.atomic_add(Partials + offs, acc, mask=mask, sem="relaxed")
    if GATED:
        tl.atomic_add(Partials + offs2, acc2, mask=mask, sem="relaxed")
    # Every thread's adds come before the counter's release (one thread performs the atomic);
    # the last arrival's acquire makes all slices' adds visible to its loads below.
    tl.debug_barrier()
    counter = Arrivals + tl.program_id(0)
    last = tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1
    # The last arrival reads the sums (".cg": from L2, where the adds were performed; L1 is not
    # kept coherent with them) and zeroes the tile and its counter.
    mask &= last
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.load(Partials + offs, mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(Partials + offs, zero, mask=mask)
    if GATED:
        acc2 = tl.load(Partials + offs2, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(Partials + offs2, zero, mask=mask)
    tl.store(counter, 0, mask=last)
    return acc, acc2, last


@triton.jit
def _epilogue(
    acc, acc2, pid_m, pid_n, M, N, Bias, Bias2, Res, Aux, Aux2, Out, Out2,
    stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, AUX: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BIAS2: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Bias(es), pre-activation(s), activation (gated: act(g) * u) or its gradient, residual, on
    the fp32 tile(s); one store (two for AUX_GATE_GRAD). Aux2 shares Aux's strides, Out2 Out's."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS2:
        acc2 += tl.load(Bias2 + cols, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    aux_offs = rows[:, None] * stride_xm + cols[None, :] * stride_xn
    out_offs = rows[:, None] * stride_om + cols[None, :] * stride_on
    if AUX == 1:  # AUX_STORE_PRE (gated: g and u)
        tl.store(Aux + aux_offs, acc.to(Aux.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(Aux2 + aux_offs, acc2.to(Aux2.dtype.element_ty), mask=mask)
    if AUX == 2:  # AUX_ACT_GRAD
        pre = tl.load(Aux + aux_offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * _activation_grad(pre, ACTIVATION)
    elif AUX == 3:  # AUX_GATE_GRAD: acc is dH; dU = dH * act(g) to Out2, dG = dH * u * act'(g)
        # dU is stored before u is loaded: three tiles live at most (registers, sm_90)
        g = tl.load(Aux + aux_offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Out2 + out_offs, (acc * _activation(g, ACTIVATION)).to(Out2.dtype.element_ty),
                 mask=mask)
        acc = acc * _activation_grad(g, ACTIVATION)
        acc = acc * tl.load(Aux2 + aux_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        if ACTIVATION != 0:
            acc = _activation(acc, ACTIVATION)
        if GATED:
            acc = acc * acc2
    if HAS_RESIDUAL:
        res_ptrs = Res + rows[:, None] * stride_rm + cols[None, :] * stride_rn
        acc += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + out_offs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc += a @ b; fp32 operands exactly (``ieee``) where PyTorch's result is to be matched."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@autotune(configs=autotune_configs([_config(t) for t in _POINTER_TILES]),
                 key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _linear_gelu_mm(
    A, B, B2, Bias, Bias2, Res, Aux, Aux2, Out, Out2, Partials, Arrivals,
    M, N, K, M_BUCKET, MAX_SPLIT_K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_b2k, stride_b2n,
    stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
    ACTIVATION: tl.constexpr,
    AUX: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Pointer loads: any strides, any alignment (B2, GATED only, has strides of its own)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # -- operand pointers; rows/columns past the edge wrap (loads stay in bounds, no M/N mask in
    #    the loop; the epilogue's store is masked) --
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_am = (offs_m % M).to(tl.int64)
    offs_bn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_am[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
    b_ptrs = B + offs_k[:, None].to(tl.int64) * stride_bk + offs_bn[None, :] * stride_bn
    b2_ptrs = B2 + offs_k[:, None].to(tl.int64) * stride_b2k + offs_bn[None, :] * stride_b2n
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    b2_step = tl.cast(stride_b2k, tl.int64) * BLOCK_K
    k_first, k_last = 0, tl.cdiv(K, BLOCK_K)
    if SPLIT_K > 1:  # this program's K slice
        k_first, k_last = _k_slice(K, BLOCK_K, SPLIT_K)
        a_ptrs += k_first * a_step
        b_ptrs += k_first * b_step
        b2_ptrs += k_first * b2_step

    # -- main loop: fp32 accumulation (two accumulators from one A tile when GATED), K edge
    #    masked, pipelined over num_stages --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # stays unused (and is dropped) ungated
    for k in range(k_first, k_last):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _mma(a, b, acc, IEEE)
        if GATED:
            b2 = tl.load(b2_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc2 = _mma(a, b2, acc2, IEEE)
            b2_ptrs += b2_step
        a_ptrs += a_step
        b_ptrs += b_step

    # -- split-K: the slices' sum in the workspace; the last slice to arrive runs the epilogue --
    last = True
    if SPLIT_K > 1:
        acc, acc2, last = _split_k_sum(acc, acc2, pid_m, pid_n, M, N, Partials, Arrivals, GATED,
                                       SPLIT_K, BLOCK_M, BLOCK_N)
    if last:
        _epilogue(acc, acc2, pid_m, pid_n, M, N, Bias, Bias2, Res, Aux, Aux2, Out, Out2,
                  stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
                  ACTIVATION, AUX, GATED, HAS_BIAS, HAS_BIAS2, HAS_RESIDUAL, BLOCK_M, BLOCK_N)


@autotune(configs=autotune_configs([_config(t, _set_tma_blocks) for t in _TMA_TILES]),
                 key=_KEY + ["B_NK"], prune_configs_by=_PRUNE)
@triton.jit
def _linear_gelu_mm_tma(
    ADesc, BDesc, B2Desc, Bias, Bias2, Res, Aux, Aux2, Out, Out2, Partials, Arrivals,
    M, N, K, M_BUCKET, MAX_SPLIT_K,
    stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
    B_NK: tl.constexpr,
    ACTIVATION: tl.constexpr,
    AUX: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIAS2: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PERSISTENT: tl.constexpr = False,
):
    """TMA loads through host tensor descriptors (fp16/bf16, 16-byte aligned rows): the copy
    engine fills the pipeline's shared-memory stages and zero-fills out-of-bounds boxes, so
    there is no address arithmetic or masking in the loop. ``B_NK``: BDesc covers B as (N, K)
    (the weight layout; its tile is transposed for the product), else as (K, N); B2Desc (GATED)
    covers B2 in the same layout. ``PERSISTENT``: one program per SM over all the tiles."""
    if PERSISTENT:
        # -- one program per SM walks the output tiles (grouped order) in a single loop whose
        #    K steps Triton flattens across tiles: the next tile's loads are in flight while this
        #    one's epilogue runs, and no program launches after the first wave --
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=True):
            pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            acc, acc2 = _tma_products(ADesc, BDesc, B2Desc, pid_m * BLOCK_M, pid_n * BLOCK_N, 0,
                                      tl.cdiv(K, BLOCK_K), B_NK, GATED, BLOCK_M, BLOCK_N,
                                      BLOCK_K)
            _epilogue(acc, acc2, pid_m, pid_n, M, N, Bias, Bias2, Res, Aux, Aux2, Out, Out2,
                      stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
                      ACTIVATION, AUX, GATED, HAS_BIAS, HAS_BIAS2, HAS_RESIDUAL, BLOCK_M,
                      BLOCK_N)
    else:
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        k_first, k_last = 0, tl.cdiv(K, BLOCK_K)
        if SPLIT_K > 1:  # this program's K slice
            k_first, k_last = _k_slice(K, BLOCK_K, SPLIT_K)
        acc, acc2 = _tma_products(ADesc, BDesc, B2Desc, pid_m * BLOCK_M, pid_n * BLOCK_N,
                                  k_first, k_last, B_NK, GATED, BLOCK_M, BLOCK_N, BLOCK_K)
        # -- split-K: the slices' sum in the workspace; the last slice to arrive runs the
        #    epilogue --
        last = True
        if SPLIT_K > 1:
            acc, acc2, last = _split_k_sum(acc, acc2, pid_m, pid_n, M, N, Partials, Arrivals,
                                           GATED, SPLIT_K, BLOCK_M, BLOCK_N)
        if last:
            _epilogue(acc, acc2, pid_m, pid_n, M, N, Bias, Bias2, Res, Aux, Aux2, Out, Out2,
                      stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
                      ACTIVATION, AUX, GATED, HAS_BIAS, HAS_BIAS2, HAS_RESIDUAL, BLOCK_M,
                      BLOCK_N)


@triton.jit
def _tma_products(ADesc, BDesc, B2Desc, off_m, off_n, k_first, k_last, B_NK: tl.constexpr,
                  GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The K blocks [k_first, k_last) of one output tile: fp32 accumulation (two from one A tile
    when GATED), pipelined TMA loads."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # stays unused (and is dropped) ungated
    for k in range(k_first, k_last):
        off_k = k * BLOCK_K
        a = ADesc.load([off_m, off_k])
        if B_NK:
            b = BDesc.load([off_n, off_k]).T
        else:
            b = BDesc.load([off_k, off_n])
        acc = tl.dot(a, b, acc)
        if GATED:
            if B_NK:
                b2 = B2Desc.load([off_n, off_k]).T
            else:
                b2 = B2Desc.load([off_k, off_n])
            acc2 = tl.dot(a, b2, acc2)
    return acc, acc2


@triton.jit
def _linear_gelu_bwd(
    DY, Pre, Up, DPre, DUp, DB, DB2,
    M, N, rows_per_program,
    stride_dym, stride_dyn, stride_pm, stride_pn, stride_dm, stride_dn,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dPre = dY * act'(pre) and db; GATED (Pre = g, Up = u with Pre's strides, DUp with DPre's):
    dG = dY * u * act'(g) to DPre, dU = dY * act(g) to DUp, and both db's (DB, DB2)."""
    # Program (pid_n, g) owns columns [pid_n * BLOCK_N, +BLOCK_N) of a contiguous run of rows.
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < N
    cols = offs_n.to(tl.int64)
    row_start = g * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db2_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)  # GATED only
    for start in range(row_start, row_end, BLOCK_M):
        # -- dPre = dY * act'(pre) (gated: dG and dU) on a (BLOCK_M, BLOCK_N) tile --
        offs_m = start + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        mask = (offs_m < row_end)[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=mask, other=0.0).to(tl.float32)
        pre_offs = rows[:, None] * stride_pm + cols[None, :] * stride_pn
        d_offs = rows[:, None] * stride_dm + cols[None, :] * stride_dn
        pre = tl.load(Pre + pre_offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            u = tl.load(Up + pre_offs, mask=mask, other=0.0).to(tl.float32)
            dup = dy * _activation(pre, ACTIVATION)
            tl.store(DUp + d_offs, dup.to(DUp.dtype.element_ty), mask=mask)
            dpre = dy * u * _activation_grad(pre, ACTIVATION)
            if NEED_DB:
                db2_acc += tl.sum(dup, axis=0)
        else:
            dpre = dy * _activation_grad(pre, ACTIVATION)
        tl.store(DPre + d_offs, dpre.to(DPre.dtype.element_ty), mask=mask)
        # -- this program's share of db (masked entries are exactly 0) --
        if NEED_DB:
            db_acc += tl.sum(dpre, axis=0)
    if NEED_DB:
        tl.store(DB + g.to(tl.int64) * N + cols, db_acc, mask=col_mask)
        if GATED:
            tl.store(DB2 + g.to(tl.int64) * N + cols, db2_acc, mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Launchers (2-D tensors; validation is the op's job)
# ------------------------------------------------------------------------------------------------


def _has_tma(device: torch.device) -> bool:
    """The copy engine's tensor descriptors: on Hopper and later, and emulated by the interpreter
    (whose tests run the TMA kernel for aligned fp16 as a GPU does)."""
    return _device.facts(device).tma


def _tma_view(t: torch.Tensor) -> bool:
    """``t`` (2-D, non-empty) can back a tensor descriptor: unit last stride, 16-byte aligned
    base and row stride."""
    return (t.stride(1) == 1 and t.shape[0] > 0 and t.shape[1] > 0 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def uses_tma(a: torch.Tensor, b_t: torch.Tensor, b2_t: torch.Tensor | None = None) -> bool:
    """Whether ``a @ b_t^T`` (gated: and ``a @ b2_t^T``) takes the TMA kernel: fp16/bf16 operands
    whose rows are 16-byte aligned (on Hopper+, or the interpreter), ``b2_t`` in ``b_t``'s
    layout. Anything else (fp32, K = 1023 in fp16, odd strides) takes the pointer kernel."""
    b_view = b_t if b_t.stride(1) == 1 else b_t.t()
    ok = (a.dtype in (torch.float16, torch.bfloat16) and _has_tma(a.device)
          and _tma_view(a) and _tma_view(b_view))
    if ok and b2_t is not None:
        b_nk = b_t.stride(1) == 1
        ok = (b2_t.stride(1) == 1) == b_nk and _tma_view(b2_t if b_nk else b2_t.t())
    return ok


def _unit_strided(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy when no stride is 1 (a strided slice, a stride-0 gradient):
    its loads could not be vectorised or pipelined (sm_90: no cp.async, spills), and the copy is
    one pass over an operand the product reads K/BLOCK_K times anyway."""
    return t if 1 in t.stride() else t.contiguous()


# Split-K workspace per device: fp32 partial sums for _SPLIT_K_MAX_M rows of the widest (gated:
# two) outputs seen, and one int32 arrival counter per output tile. Zeroed once when allocated;
# every split-K launch leaves it zeroed (the last slice of each tile resets its part), so no call
# fills it. It grows (never shrinks) when a wider N arrives, outside CUDA-graph capture only (a
# buffer allocated during capture would never be zeroed: capture does not run the fill), and
# the buffers it outgrew stay alive: a captured graph keeps using the one it recorded.
# Limitation: one workspace per device, not per stream. Split-K launches that overlap on two
# streams of one device may corrupt each other's sums; use one stream, deterministic algorithms
# (no split-K), or LIGHTLLM_AUTOTUNE=0 (the default tiles, never split) there.
_WORKSPACES: dict = {}  # device -> [(partials, arrivals), ...], the last one current


def _split_k_workspace(device: torch.device, n: int, gated: bool):
    """(partials, arrivals) large enough for any split-K tile of an (M <= _SPLIT_K_MAX_M, n)
    output, or None where it would need an allocation during CUDA-graph capture."""
    partials_len = (2 if gated else 1) * _SPLIT_K_MAX_M * n
    arrivals_len = cdiv(_SPLIT_K_MAX_M, _SPLIT_K_MIN_TILE[0]) * cdiv(n, _SPLIT_K_MIN_TILE[1])
    buffers = _WORKSPACES.setdefault(device, [])
    if buffers:
        partials, arrivals = buffers[-1]
        if partials.numel() >= partials_len and arrivals.numel() >= arrivals_len:
            return buffers[-1]
        partials_len = max(partials_len, partials.numel())  # grow to the larger of each
        arrivals_len = max(arrivals_len, arrivals.numel())
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    buffers.append((torch.zeros(partials_len, dtype=torch.float32, device=device),
                    torch.zeros(arrivals_len, dtype=torch.int32, device=device)))
    return buffers[-1]


def _mm(a, b_t, bias, residual, aux, out, activation: int, aux_mode: int, tma=None, *,
        b2_t=None, bias2=None, aux2=None, out2=None, tile=None) -> None:
    """out = epilogue(a @ b_t^T): ``a`` (M, K), ``b_t`` (N, K) — the weight layout — any strides.
    ``b2_t`` (N, K), any strides, makes it GATED (``bias2``: its bias; ``aux2``: where u is
    stored, with ``aux``'s strides). ``out2`` (``out``'s strides) is AUX_GATE_GRAD's second output.
    Tests only: ``tma`` overrides ``uses_tma``; ``tile`` (an entry of the tile lists) launches
    that candidate without the autotuner (the interpreter would run only each list's first)."""
    M, K = a.shape
    N = b_t.shape[0]
    if M == 0 or N == 0:
        return
    a, b_t = _unit_strided(a), _unit_strided(b_t)
    sa, sb = a.stride(), b_t.stride()
    gated = b2_t is not None
    if gated:
        b2_t = _unit_strided(b2_t)
    dummy = out  # never dereferenced when its flag is off
    b_nk = sb[1] == 1
    if tma is None:
        tma = uses_tma(a, b_t, b2_t)

    def grid(meta):
        tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
        if meta.get("PERSISTENT"):
            return (min(tiles, sm_count(a)), 1)
        return (tiles, meta["SPLIT_K"])

    # Split-K candidates only for few rows, with a workspace, and not when bitwise-reproducible
    # results are asked for (the order of the atomic adds varies from run to run).
    workspace = None
    if M <= _SPLIT_K_MAX_M and not torch.are_deterministic_algorithms_enabled():
        workspace = _split_k_workspace(a.device, N, gated)
    max_split = _SPLITS[-1] if workspace is not None else 1
    partials, arrivals = workspace if workspace is not None else (dummy, dummy)

    common = dict(ACTIVATION=activation, AUX=aux_mode, GATED=gated, HAS_BIAS=bias is not None,
                  HAS_BIAS2=bias2 is not None, HAS_RESIDUAL=residual is not None)
    so = out.stride()
    sr = residual.stride() if residual is not None else so
    sx = aux.stride() if aux is not None else so
    epilogue_args = (sr[0], sr[1], sx[0], sx[1], so[0], so[1])
    res = residual if residual is not None else dummy
    aux_t = aux if aux is not None else dummy
    bias_t = bias if bias is not None else dummy
    tensors2 = (bias2 if bias2 is not None else dummy, res, aux_t,
                aux2 if aux2 is not None else dummy, out, out2 if out2 is not None else dummy,
                partials, arrivals)
    sizes = (M, N, K, next_pow2(M), max_split)
    meta = _config(tile).all_kwargs() if tile is not None else {}
    assert meta.get("SPLIT_K", 1) <= max_split, "split-K needs M <= 32 and a workspace"
    if tma:
        # Boxes are placeholders until the autotune pre-hook sets them from the chosen tile.
        a_desc = TensorDescriptor.from_tensor(a, [16, 16])
        b_desc = TensorDescriptor.from_tensor(b_t if b_nk else b_t.t(), [16, 16])
        b2_desc = (TensorDescriptor.from_tensor(b2_t if b_nk else b2_t.t(), [16, 16]) if gated
                   else b_desc)
        kernel = _linear_gelu_mm_tma
        if meta:
            _set_tma_blocks({"ADesc": a_desc, "BDesc": b_desc, "B2Desc": b2_desc, "B_NK": b_nk,
                             **meta})
        args = (a_desc, b_desc, b2_desc, bias_t, *tensors2, *sizes, *epilogue_args)
        common["B_NK"] = b_nk
    else:
        kernel = _linear_gelu_mm
        sb2 = b2_t.stride() if gated else sb
        args = (a, b_t, b2_t if gated else b_t, bias_t, *tensors2, *sizes,
                sa[0], sa[1], sb[1], sb[0], sb2[1], sb2[0], *epilogue_args)
        common["IEEE"] = a.dtype == torch.float32
    # The autotuner, or (tests) the JIT function under it with the given tile's meta-parameters.
    (kernel.fn if meta else kernel)[grid](*args, **common, **meta)


def linear_act_fwd(x, weight, bias, activation: str, save_pre: bool):
    """``y = act(x @ weight^T + bias)`` on a 2-D ``x`` (M, K), ``weight`` (N, K); ``activation``
    is a key of ACTIVATIONS. Returns ``(y, pre)``; ``pre`` (the pre-activation, for the
    backward) is None unless ``save_pre``."""
    M, N = x.shape[0], weight.shape[0]
    y = empty((M, N), dtype=x.dtype, device=x.device)
    pre = empty((M, N), dtype=x.dtype, device=x.device) if save_pre else None
    _mm(x, weight, bias, None, pre, y, ACTIVATIONS[activation],
        AUX_STORE_PRE if save_pre else AUX_NONE)
    return y, pre


def linear_fwd(x, weight, bias, residual):
    """``x @ weight^T + bias + residual`` (no activation): the feed-forward's second matmul."""
    y = empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    _mm(x, weight, bias, residual, None, y, ACT_NONE, AUX_NONE)
    return y


def matmul_act_grad(dy, w2, pre, activation: str):
    """``dPre = (dy @ w2) * act'(pre)``: ``dy`` (M, D), ``w2`` (D, F) — the second linear's
    weight — ``pre`` (M, F). The product dH is consumed in the epilogue, never stored."""
    M, F = pre.shape
    dpre = empty((M, F), dtype=pre.dtype, device=pre.device)
    _mm(dy, w2.t(), None, None, pre, dpre, ACTIVATIONS[activation], AUX_ACT_GRAD)
    return dpre


def _same_strides(g: torch.Tensor, u: torch.Tensor):
    """``g`` and ``u`` with one set of strides (the kernels address u with g's): as they come
    from the gated forward, else contiguous copies."""
    return (g, u) if g.stride() == u.stride() else (g.contiguous(), u.contiguous())


def linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save: bool):
    """``h = silu(x @ w_gate^T + b_gate) * (x @ w_up^T + b_up)`` on a 2-D ``x`` (M, K), weights
    (N, K) each, as one gated matmul. Returns ``(h, g, u)``; the pre-activations ``g`` and ``u``
    (for the backward) are None unless ``save``."""
    M, N = x.shape[0], w_gate.shape[0]
    h = empty((M, N), dtype=x.dtype, device=x.device)
    g = empty((M, N), dtype=x.dtype, device=x.device) if save else None
    u = empty((M, N), dtype=x.dtype, device=x.device) if save else None
    _mm(x, w_gate, b_gate, None, g, h, ACT_SILU, AUX_STORE_PRE if save else AUX_NONE,
        b2_t=w_up, bias2=b_up, aux2=u)
    return h, g, u


def matmul_swiglu_grad(dy, w_down, g, u):
    """``dH = dy @ w_down`` consumed in the epilogue: returns ``(dG, dU)`` = (dH * u * silu'(g),
    dH * silu(g)); ``dy`` (M, D), ``w_down`` (D, F), ``g``/``u`` (M, F). dH is never stored."""
    g, u = _same_strides(g, u)
    M, F = g.shape
    dg = empty((M, F), dtype=g.dtype, device=g.device)
    du = empty((M, F), dtype=g.dtype, device=g.device)
    _mm(dy, w_down.t(), None, None, g, dg, ACT_SILU, AUX_GATE_GRAD, aux2=u, out2=du)
    return dg, du


_BWD_BLOCK_M = 32
_BWD_BLOCK_N = 128


def _elementwise_bwd(dy, pre, up, activation: int, need_db: bool):
    """The launch of ``_linear_gelu_bwd``: (dPre, dUp or None, db, db2 or None); db's in fp32."""
    M, N = pre.shape
    gated = up is not None
    dpre = empty((M, N), dtype=pre.dtype, device=pre.device)
    dup = empty((M, N), dtype=pre.dtype, device=pre.device) if gated else None
    if M == 0 or N == 0:
        def zeros():
            return torch.zeros(N, dtype=torch.float32, device=pre.device) if need_db else None

        return dpre, dup, zeros(), zeros() if gated else None
    col_blocks = cdiv(N, _BWD_BLOCK_N)
    # Enough row groups for about four programs per SM; each group is whole BLOCK_M tiles.
    groups = max(1, min(cdiv(4 * sm_count(pre), col_blocks), cdiv(M, _BWD_BLOCK_M)))
    rows_per_program = cdiv(cdiv(M, groups), _BWD_BLOCK_M) * _BWD_BLOCK_M
    groups = cdiv(M, rows_per_program)
    db_partial = (empty((2 if gated else 1, groups, N), dtype=torch.float32, device=pre.device)
                  if need_db else None)
    db_args = (db_partial[0], db_partial[-1]) if need_db else (dpre, dpre)
    _linear_gelu_bwd[(col_blocks, groups)](
        dy, pre, up if gated else pre, dpre, dup if gated else dpre, *db_args,
        M, N, rows_per_program,
        dy.stride(0), dy.stride(1), pre.stride(0), pre.stride(1), dpre.stride(0), dpre.stride(1),
        ACTIVATION=activation, GATED=gated, NEED_DB=need_db,
        BLOCK_M=_BWD_BLOCK_M, BLOCK_N=_BWD_BLOCK_N, num_warps=4,
    )
    if not need_db:
        return dpre, dup, None, None
    # One reduction per bias: the two db's are separate tensors (op outputs may not alias).
    return dpre, dup, db_partial[0].sum(0), db_partial[1].sum(0) if gated else None


def act_bwd(dy, pre, activation: str, need_db: bool):
    """``dPre = dy * act'(pre)`` on 2-D tensors (any strides, e.g. a stride-0 ``dy``), and
    ``db = dPre.sum(0)`` in fp32 when ``need_db`` (else None)."""
    dpre, _, db, _ = _elementwise_bwd(dy, pre, None, ACTIVATIONS[activation], need_db)
    return dpre, db


def swiglu_bwd(dh, g, u, need_db: bool):
    """The backward of ``h = silu(g) * u`` on 2-D tensors (any strides for ``dh``): returns
    ``(dG, dU, db_gate, db_up)`` with dG = dh * u * silu'(g), dU = dh * silu(g) and the column
    sums in fp32 when ``need_db`` (else None)."""
    g, u = _same_strides(g, u)
    return _elementwise_bwd(dh, g, u, ACT_SILU, need_db)
