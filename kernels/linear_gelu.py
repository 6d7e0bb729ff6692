"""Linear + bias + activation (GeLU, its tanh form, ReLU) fused into the matmul epilogue, forward
and backward.

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
software-pipelined by Triton (``num_stages``); autotuned per (M bucket, N, K, dtype, epilogue).
The epilogue works on the fp32 tile before the single store:
    pre = acc + bias                                   (HAS_BIAS)
    AUX_STORE_PRE: also store pre (the saved pre-activation of the backward)
    out = gelu(pre) | gelu_tanh(pre) | relu(pre) | pre (ACTIVATION)
    AUX_ACT_GRAD: out = acc * act'(aux), aux = a saved pre-activation (backward dH -> dPre)
    out += residual                                     (HAS_RESIDUAL)
Memory traffic of the forward: A and B from DRAM once (tiles re-read through L2), C written once
(plus pre once when a backward needs it); eager PyTorch writes pre, reads it and writes gelu(pre).

Uses of the one matmul:
  linear_gelu forward       y = gelu(x @ W^T + b)                 (+ pre when saving for backward)
  feed_forward forward      h = gelu(x @ W1^T + b1);  y = h @ W2^T + b2 + residual
  feed_forward backward     dPre = (dY @ W2) * act'(pre)          (dH never reaches memory)
The plain matmuls of the backward (dX = dPre @ W, dW = dPre^T @ X) are left to cuBLAS by the op.

``_linear_gelu_bwd`` is the elementwise backward of ``linear_gelu`` alone (no matmul produces its
dY): dPre = dY * act'(pre), with db's per-program column partial sums in the same pass
(dY and pre read once, dPre written once, db from a (G, N) fp32 partial buffer).

GeLU forms: exact ``0.5 x (1 + erf(x / sqrt 2))``; tanh ``0.5 x (1 + tanh(u))``, u =
sqrt(2/pi) (x + 0.044715 x^3), computed as ``x * sigmoid(2u)`` (the same value; no libdevice tanh,
which the interpreter lacks, and no cancellation in 1 + tanh(u) for large negative x). ReLU's
derivative is taken as 0 at 0, as PyTorch's ``threshold_backward`` does.
Offsets are 64-bit (row offsets are cast before multiplying by strides, K steps are int64).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._utils import (
    INTERPRET,
    autotune_configs,
    autotune_enabled,
    cdiv,
    empty,
    next_pow2,
    sm_count,
)

# ACTIVATION codes; the ops name them by the strings of ACTIVATIONS.
ACT_NONE = 0
ACT_GELU = 1
ACT_GELU_TANH = 2
ACT_RELU = 3
ACTIVATIONS = {"gelu": ACT_GELU, "gelu_tanh": ACT_GELU_TANH, "relu": ACT_RELU}

# AUX codes: what the epilogue does with the auxiliary (M, N) tensor.
AUX_NONE = 0
AUX_STORE_PRE = 1  # write the pre-activation there
AUX_ACT_GRAD = 2  # read a pre-activation there and multiply the tile by act'(pre)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # exact GeLU
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:  # tanh GeLU
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x * tl.sigmoid(2.0 * u)
    elif ACTIVATION == 3:  # ReLU (NaN stays NaN, as torch.relu)
        return tl.where(x < 0.0, 0.0, x)
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
    else:
        return tl.full(x.shape, 1.0, tl.float32)


# Tiles as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). The first is the interpreter's one
# config and a sound H100 default for fp16/bf16.
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
]


def _config(tile, pre_hook=None) -> triton.Config:
    bm, bn, bk, warps, stages = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages, pre_hook=pre_hook)


def _tile_of(c: triton.Config) -> tuple:
    k = c.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages)


def _set_tma_blocks(nargs) -> None:
    """Autotune pre-hook of the TMA kernel: the descriptors' boxes follow the chosen tile."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["ADesc"].block_shape = [bm, bk]
    nargs["BDesc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]


_SMEM_BYTES = 200 * 1024  # stay under the H100's 227 KiB per block with room for the epilogue


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tiles meant for this dtype whose pipelined operand tiles fit in shared memory,
    and drop row tiles far taller than M (they would only compute wrapped rows)."""
    esize = named_args["Out"].element_size()
    tiles = _FP32_TILES if esize == 4 else _HALF_TILES
    m_bucket = named_args["M_BUCKET"]
    kept = []
    for c in configs:
        bm, bn, bk, _, stages = _tile_of(c)
        if _tile_of(c) not in tiles or (bm * bk + bk * bn) * esize * stages > _SMEM_BYTES:
            continue
        if bm > max(16, 2 * m_bucket):
            continue
        kept.append(c)
    kept = kept or configs[:1]
    return kept if autotune_enabled() else kept[:1]


# M by power-of-two bucket: a new token count does not trigger a new tuning run. The autotuner
# appends the dtype of every tensor argument to this key.
_KEY = ["M_BUCKET", "N", "K", "ACTIVATION", "AUX", "HAS_BIAS", "HAS_RESIDUAL"]
_PRUNE = None if INTERPRET else {"early_config_prune": _prune_configs}


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row tiles sweep the column tiles
    together, so each B column panel is reused from L2 by GROUP_M programs."""
    pid = tl.program_id(0)
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
def _epilogue(
    acc, pid_m, pid_n, M, N, Bias, Res, Aux, Out,
    stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
    ACTIVATION: tl.constexpr, AUX: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Bias, pre-activation, activation or its gradient, residual, on the fp32 tile; one store."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    aux_ptrs = Aux + rows[:, None] * stride_xm + cols[None, :] * stride_xn
    if AUX == 1:  # AUX_STORE_PRE
        tl.store(aux_ptrs, acc.to(Aux.dtype.element_ty), mask=mask)
    if AUX == 2:  # AUX_ACT_GRAD
        pre = tl.load(aux_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * _activation_grad(pre, ACTIVATION)
    elif ACTIVATION != 0:
        acc = _activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        res_ptrs = Res + rows[:, None] * stride_rm + cols[None, :] * stride_rn
        acc += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    out_ptrs = Out + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.autotune(configs=autotune_configs([_config(t) for t in _HALF_TILES + _FP32_TILES]),
                 key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _linear_gelu_mm(
    A, B, Bias, Res, Aux, Out,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
    ACTIVATION: tl.constexpr,
    AUX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Pointer loads: any strides, any alignment."""
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
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K

    # -- main loop: fp32 accumulation, K edge masked, pipelined over num_stages --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += a_step
        b_ptrs += b_step

    _epilogue(acc, pid_m, pid_n, M, N, Bias, Res, Aux, Out,
              stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
              ACTIVATION, AUX, HAS_BIAS, HAS_RESIDUAL, BLOCK_M, BLOCK_N)


@triton.autotune(configs=autotune_configs([_config(t, _set_tma_blocks) for t in _HALF_TILES]),
                 key=_KEY + ["B_NK"], prune_configs_by=_PRUNE)
@triton.jit
def _linear_gelu_mm_tma(
    ADesc, BDesc, Bias, Res, Aux, Out,
    M, N, K, M_BUCKET,
    stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
    B_NK: tl.constexpr,
    ACTIVATION: tl.constexpr,
    AUX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """TMA loads through host tensor descriptors (fp16/bf16, 16-byte aligned rows): the copy
    engine fills the pipeline's shared-memory stages and zero-fills out-of-bounds boxes, so
    there is no address arithmetic or masking in the loop. ``B_NK``: BDesc covers B as (N, K)
    (the weight layout; its tile is transposed for the product), else as (K, N)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N

    # -- main loop: fp32 accumulation, pipelined TMA loads --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        off_k = k * BLOCK_K
        a = ADesc.load([off_m, off_k])
        if B_NK:
            b = BDesc.load([off_n, off_k]).T
        else:
            b = BDesc.load([off_k, off_n])
        acc = tl.dot(a, b, acc)

    _epilogue(acc, pid_m, pid_n, M, N, Bias, Res, Aux, Out,
              stride_rm, stride_rn, stride_xm, stride_xn, stride_om, stride_on,
              ACTIVATION, AUX, HAS_BIAS, HAS_RESIDUAL, BLOCK_M, BLOCK_N)


@triton.jit
def _linear_gelu_bwd(
    DY, Pre, DPre, DB,
    M, N, rows_per_program,
    stride_dym, stride_dyn, stride_pm, stride_pn, stride_dm, stride_dn,
    ACTIVATION: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Program (pid_n, g) owns columns [pid_n * BLOCK_N, +BLOCK_N) of a contiguous run of rows.
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = offs_n < N
    cols = offs_n.to(tl.int64)
    row_start = g * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(row_start, row_end, BLOCK_M):
        # -- dPre = dY * act'(pre) on a (BLOCK_M, BLOCK_N) tile --
        offs_m = start + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        mask = (offs_m < row_end)[:, None] & col_mask[None, :]
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
                     mask=mask, other=0.0).to(tl.float32)
        pre = tl.load(Pre + rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                      mask=mask, other=0.0).to(tl.float32)
        dpre = dy * _activation_grad(pre, ACTIVATION)
        tl.store(DPre + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                 dpre.to(DPre.dtype.element_ty), mask=mask)
        # -- this program's share of db (masked entries are exactly 0) --
        if NEED_DB:
            db_acc += tl.sum(dpre, axis=0)
    if NEED_DB:
        tl.store(DB + g.to(tl.int64) * N + cols, db_acc, mask=col_mask)


# ------------------------------------------------------------------------------------------------
# Launchers (2-D tensors; validation is the op's job)
# ------------------------------------------------------------------------------------------------


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """TMA (host tensor descriptors) on Hopper and later; the interpreter emulates it."""
    if device.type != "cuda":
        return INTERPRET
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_view(t: torch.Tensor) -> bool:
    """``t`` (2-D, non-empty) can back a tensor descriptor: unit last stride, 16-byte aligned
    base and row stride."""
    return (t.stride(1) == 1 and t.shape[0] > 0 and t.shape[1] > 0 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def uses_tma(a: torch.Tensor, b_t: torch.Tensor) -> bool:
    """Whether ``a @ b_t^T`` takes the TMA kernel: fp16/bf16 operands whose rows are 16-byte
    aligned (on Hopper+, or the interpreter). Anything else (fp32, K = 1023 in fp16, odd
    strides) takes the pointer kernel."""
    b_view = b_t if b_t.stride(1) == 1 else b_t.t()
    return (a.dtype in (torch.float16, torch.bfloat16) and _has_tma(a.device)
            and _tma_view(a) and _tma_view(b_view))


def _mm(a, b_t, bias, residual, aux, out, activation: int, aux_mode: int, tma=None) -> None:
    """out = epilogue(a @ b_t^T): ``a`` (M, K), ``b_t`` (N, K) — the weight layout — any strides.
    ``tma`` overrides ``uses_tma`` (tests)."""
    M, K = a.shape
    N = b_t.shape[0]
    if M == 0 or N == 0:
        return
    # An operand with no unit stride (a strided slice, a stride-0 gradient) is copied: its loads
    # could not be vectorised or pipelined (sm_90: no cp.async, spills), and the copy is one pass
    # over an operand the product reads K/BLOCK_K times anyway.
    sa, sb = a.stride(), b_t.stride()
    if 1 not in sa:
        a = a.contiguous()
        sa = a.stride()
    if 1 not in sb:
        b_t = b_t.contiguous()
        sb = b_t.stride()
    dummy = out  # never dereferenced when its flag is off
    b_nk = sb[1] == 1
    if tma is None:
        tma = uses_tma(a, b_t)

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)

    common = dict(ACTIVATION=activation, AUX=aux_mode, HAS_BIAS=bias is not None,
                  HAS_RESIDUAL=residual is not None)
    so = out.stride()
    sr = residual.stride() if residual is not None else so
    sx = aux.stride() if aux is not None else so
    epilogue_args = (sr[0], sr[1], sx[0], sx[1], so[0], so[1])
    res = residual if residual is not None else dummy
    aux_t = aux if aux is not None else dummy
    bias_t = bias if bias is not None else dummy
    m_bucket = next_pow2(M)
    if tma:
        # Boxes are placeholders until the autotune pre-hook sets them from the chosen tile.
        a_desc = TensorDescriptor.from_tensor(a, [16, 16])
        b_desc = TensorDescriptor.from_tensor(b_t if b_nk else b_t.t(), [16, 16])
        _linear_gelu_mm_tma[grid](
            a_desc, b_desc, bias_t, res, aux_t, out, M, N, K, m_bucket,
            *epilogue_args, B_NK=b_nk, **common,
        )
    else:
        _linear_gelu_mm[grid](
            a, b_t, bias_t, res, aux_t, out, M, N, K, m_bucket,
            sa[0], sa[1], sb[1], sb[0], *epilogue_args,
            IEEE=a.dtype == torch.float32, **common,
        )


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


_BWD_BLOCK_M = 32
_BWD_BLOCK_N = 128


def act_bwd(dy, pre, activation: str, need_db: bool):
    """``dPre = dy * act'(pre)`` on 2-D tensors (any strides, e.g. a stride-0 ``dy``), and
    ``db = dPre.sum(0)`` in fp32 when ``need_db`` (else None)."""
    M, N = pre.shape
    dpre = empty((M, N), dtype=pre.dtype, device=pre.device)
    if M == 0 or N == 0:
        return dpre, (torch.zeros(N, dtype=torch.float32, device=pre.device) if need_db else None)
    col_blocks = cdiv(N, _BWD_BLOCK_N)
    # Enough row groups for about four programs per SM; each group is whole BLOCK_M tiles.
    groups = max(1, min(cdiv(4 * sm_count(pre), col_blocks), cdiv(M, _BWD_BLOCK_M)))
    rows_per_program = cdiv(cdiv(M, groups), _BWD_BLOCK_M) * _BWD_BLOCK_M
    groups = cdiv(M, rows_per_program)
    db_partial = empty((groups, N), dtype=torch.float32, device=pre.device) if need_db else None
    _linear_gelu_bwd[(col_blocks, groups)](
        dy, pre, dpre, db_partial if need_db else dpre,
        M, N, rows_per_program,
        dy.stride(0), dy.stride(1), pre.stride(0), pre.stride(1), dpre.stride(0), dpre.stride(1),
        ACTIVATION=ACTIVATIONS[activation], NEED_DB=need_db,
        BLOCK_M=_BWD_BLOCK_M, BLOCK_N=_BWD_BLOCK_N, num_warps=4,
    )
    return dpre, (db_partial.sum(0) if need_db else None)
