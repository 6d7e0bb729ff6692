"""Split-KV attention forward for short queries over long keys (decoding with a KV cache).

With 1-16 query tokens, the main kernel runs one program per (query block, head): a single sequence
then occupies a handful of SMs while each of them streams the whole key/value cache. Here the keys
are cut into chunks and every chunk gets its own program:

  1. ``_attention_decode_split``: one program per (key chunk, block of query rows, batch * kv head),
     all on grid axis 0 (chunks fastest; batch * kv heads passes the 65535 of axes 1 and 2).
     Its query rows are every (query head of the kv head's group, query token) pair, so K/V of the
     chunk are read once for the whole GQA group. It runs the same online softmax as the main
     forward (fp32, exp2) over the chunk's key tiles and writes the chunk's normalised partial
     output and its log-sum-exp (log2 units, -inf when nothing in the chunk is visible) to fp32
     scratch of shape (B·Hq·Nq, S, Dv) and (B·Hq·Nq, S).
  2. ``_attention_decode_combine``: one program per query row (grid axis 0) merges the S partials:
     out = Σ_s 2^(lse_s − m) · out_s / Σ_s 2^(lse_s − m), lse = m + log2 Σ_s 2^(lse_s − m),
     with m = max_s lse_s; a row with no visible key in any chunk gets 0 and lse = +inf, like the
     main kernel (whose backward then recomputes from this lse unchanged).

Traffic: K and V once per kv head (not once per query head), plus S·(Dv + 1) fp32 per query row of
scratch written and read back once.

The split count S (``wave_splits``): the split kernel's P·S programs (P = B·Hkv·row blocks) run
in waves of ``slots`` = SMs × the programs one SM holds at once, which ``ctas_per_sm`` derives from
the config's resources: its threads against the register file at ptxas' ceiling of 255 registers
a thread (the binding limit of the 8-warp default, which compiles to 128-212 registers), and its
(stages - 1) × BLOCK_N × (BLOCK_D + BLOCK_DV) staged K/V elements against a program's shared
memory (227 KiB on Hopper), both from the device's facts (``_device``). Chunks take about
equally long, so a grid runs for ceil(P·S / slots) waves and keeps P·S / (ceil(P·S / slots) ·
slots) of the slots busy (its wave efficiency); S is the count, among
those ``chunking`` realises up to one chunk per SPLIT_ALIGN keys, of the best efficiency, the
fewest chunks within WAVE_SLACK of it (less scratch and combine work), and never below one full
wave of programs when the keys allow one (the HBM stream needs programs in flight, not only busy
SMs). A rule of about 2 × SMs programs, whatever a program holds and whatever the last wave,
would run batch 3 × 8 kv heads over 4096 keys on 132 SMs as 8 chunks: 192 programs of 512 keys in
2 waves (73 % busy); 16 chunks run 384 of 256 keys in 3 waves (97 %), 3/4 of the time. S sets
the grid and the scratch, so it is decided on the host before the autotuner picks a config: from
the resources of the config a launch takes with LIGHTLLM_AUTOTUNE=0 (the first that fits);
another config chosen by tuning runs the same grid. The plan depends on the keys only through
cdiv(Nk, SPLIT_ALIGN) and is cached on it: one new plan every SPLIT_ALIGN decoded tokens.

Grid sizes: the split kernel's S x row blocks x B·Hkv has at most one program per SPLIT_ALIGN
keys of each (row block, batch, kv head): past 2^31 - 1 it would take 2^39 (key, row block)
pairs, with the most row blocks (32: 16 tokens of a 128-head group) 2^34 cached keys, 512 GiB of
K alone at D = 16 in fp16. The combine's B·Hq·Nq is the number of query rows: 2^31 of them need
136 GiB of scratch at S = 1, Dv = 16. Both outgrow a GPU: not guarded.

Served (the op layer decides: ``use_split_kv`` in lightllm/ops/attention.py): 1 <= Nq <=
DECODE_MAX_Q, Nk >= DECODE_MIN_K, no ``is_causal`` (PyTorch's top-left causal alignment lets query
i see only keys 0..i, which the main kernel's causal tile skipping already serves in one tile; a
KV-cache caller passes an explicit mask instead), no dropout. Masks (boolean or additive, broadcast
through stride 0), GQA, different head dims of Q/K and V, any strides. Everything else goes to the
main kernel.

The tiles, ``tuned`` and the launch helpers come from ``_attention.py``, shared with the main
kernel (``attention.py``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _device
from ._attention import (
    LOG2E,
    dot_precision,
    head_block,
    load_tile,
    mask_args,
    score_tile,
    seq_bucket,
    split_program,
    tuned,
)
from ._device import DeviceFacts
from ._utils import autotune, cdiv, empty, next_pow2

SPLIT_ALIGN = 256  # chunk lengths are multiples of this, so every BLOCK_N below divides them
WAVE_SLACK = 0.01  # efficiencies this close count as equal: the fewer chunks win
_LN2 = tl.constexpr(0.6931471805599453)


def _cfg(block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def split_fits(c: triton.Config, meta: dict) -> bool:
    # K and V tiles of the stages in flight stay well inside an SM's shared memory (fp32 included),
    # and the fp32 score tile within 1024 elements a warp: compiled for sm_90a, the 64-row blocks
    # of a filled GQA group spill past that (N=128 at 4 warps, N=256 at 8).
    staged = (c.num_stages - 1) * c.kwargs["BLOCK_N"] * (meta["BLOCK_D"] + meta["BLOCK_DV"])
    scores = meta["BLOCK_M"] * c.kwargs["BLOCK_N"]
    return staged * meta["ITEM"] <= 160 * 1024 and scores <= 1024 * c.num_warps


# Memory-bound: the GPU default keeps 2 x 128 keys in flight per program; see _attention.tuned.
SPLIT_CONFIGS = [
    _cfg(128, 8, 3), _cfg(64, 4, 3), _cfg(64, 4, 4), _cfg(128, 4, 2), _cfg(128, 4, 3),
    _cfg(256, 8, 2), _cfg(64, 4, 2),
]
_SPLIT = tuned(_cfg(64, 4, 2), SPLIT_CONFIGS, split_fits)


@autotune(key=["HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "CHUNK_KEY", "HAS_MASK"], **_SPLIT)
@triton.jit(do_not_specialize=["n_q", "n_k", "chunk", "num_splits", "CHUNK_KEY"])
def _attention_decode_split(
    Q, K, V, Mask, OPart, LsePart,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    n_heads, n_kv_heads, group, n_q, n_k, chunk, num_splits,
    qk_scale, CHUNK_KEY,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # -- this program: one key chunk of one kv head, a block of (group head, query token) rows;
    #    on the grid's one axis chunks run fastest, then row blocks, then batch * kv heads --
    split, row_start, off_b, off_hkv = split_program(num_splits, group * n_q, n_kv_heads,
                                                     BLOCK_M)
    r = row_start + tl.arange(0, BLOCK_M)
    row_ok = r < group * n_q
    off_h = off_hkv * group + (r // n_q).to(tl.int64)
    tok = (r % n_q).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    q_rows = off_b * stride_qb + off_h * stride_qh + tok * stride_qm
    q = load_tile(Q + q_rows[:, None] + offs_d[None, :] * stride_qd, row_ok, d_ok, True,
                  BLOCK_D != HEAD_DIM)

    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_k)
    cols64 = (lo + offs_n).to(tl.int64)
    K += off_b * stride_kb + off_hkv * stride_kh
    V += off_b * stride_vb + off_hkv * stride_vh
    k_ptrs = K + cols64[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + cols64[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_rows = off_b * stride_mb + off_h * stride_mh + tok * stride_mm
    mask_ptrs = Mask + mask_rows[:, None] + cols64[None, :] * stride_mn

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # -- online softmax over the chunk's key tiles (the same update as the main forward) --
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        s, _ = score_tile(q, k_ptrs, mask_ptrs, cols, cols, row_ok, col_ok, d_ok, qk_scale,
                          True, False, HAS_MASK, MASK_IS_BOOL, BLOCK_D != HEAD_DIM,
                          INPUT_PRECISION)
        mask_ptrs += BLOCK_N * stride_mn
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_ptrs, col_ok, dv_ok, True, BLOCK_DV != HEAD_DIM_V)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    # -- this chunk's normalised partial output and log2-sum-exp (-inf: nothing visible) --
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    part = ((off_b * n_heads + off_h) * n_q + tok) * num_splits + split
    tl.store(LsePart + part, tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe)),
             mask=row_ok)
    tl.store(OPart + part[:, None] * HEAD_DIM_V + offs_dv[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _attention_decode_combine(
    OPart, LsePart, Out, Lse,
    stride_ob, stride_oh, stride_om, stride_od,
    n_heads, n_q, num_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # -- one query row: weights of its chunks relative to the largest log-sum-exp --
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LsePart + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_use)
    total = tl.sum(w, 0)
    # -- the weighted sum of the partial outputs --
    o = tl.load(OPart + (row * num_splits + offs_s)[:, None] * HEAD_DIM_V + offs_dv[None, :],
                mask=s_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :], other=0.0)
    empty_row = total == 0.0
    total_safe = tl.where(empty_row, 1.0, total)
    out = tl.sum(w[:, None] * o, 0) / total_safe
    tl.store(Lse + row, tl.where(empty_row, float("inf"), (m_use + tl.math.log2(total_safe)) * _LN2))
    off_b = row // (n_heads * n_q)
    off_h = (row // n_q) % n_heads
    tok = row % n_q
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + tok * stride_om + offs_dv * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)


def chunking(blocks: int, splits: int) -> tuple[int, int]:
    """(number of chunks, chunk length) for about ``splits`` chunks of a multiple of SPLIT_ALIGN
    over keys of ``blocks`` SPLIT_ALIGN blocks (cdiv(cdiv(Nk, s), A) = cdiv(cdiv(Nk, A), s): the
    chunking of Nk keys is that of its blocks)."""
    per_chunk = cdiv(blocks, splits)
    return cdiv(blocks, per_chunk), per_chunk * SPLIT_ALIGN


def ctas_per_sm(config: triton.Config, meta: dict, device: DeviceFacts) -> int:
    """Split programs of ``config`` resident at once on one SM of ``device`` (meta: BLOCK_D,
    BLOCK_DV, ITEM): its register file at ptxas' ceiling a thread (the 8-warp defaults compile to
    128-212 registers on sm_90a and, with their shared memory, hold an SM alone) and the staged
    tiles in a program's shared memory; an SM's warp and program limits bind later than those
    registers at any warp count."""
    threads = config.num_warps * 32
    regs_per_thread = cdiv(device.max_regs_per_thread, 8) * 8  # allocated in units of 8
    smem = (config.num_stages - 1) * config.kwargs["BLOCK_N"] * (
        meta["BLOCK_D"] + meta["BLOCK_DV"]) * meta["ITEM"]
    return max(1, min(device.regs_per_sm // (threads * regs_per_thread),
                      device.smem_per_block // max(smem, 1)))


def default_config(meta: dict) -> triton.Config:
    """The config a GPU launch takes with LIGHTLLM_AUTOTUNE=0: the first that fits (else the
    last, as ``_attention.tuned`` prunes)."""
    return next((c for c in SPLIT_CONFIGS if split_fits(c, meta)), SPLIT_CONFIGS[-1])


def wave_efficiency(programs: int, slots: int) -> float:
    """The fraction of ``slots`` (SMs x programs per SM) busy over the waves ``programs`` take."""
    return programs / (cdiv(programs, slots) * slots)


def wave_splits(programs: int, slots: int, blocks: int) -> int:
    """The chunk count of the best wave efficiency for ``programs`` programs per chunk, ``slots``
    resident programs and keys of ``blocks`` SPLIT_ALIGN blocks: among the counts that give at
    least one full wave (all counts up to ``blocks`` when none does), the fewest chunks within
    WAVE_SLACK of the best. Chunks of j blocks make cdiv(blocks, j) of them, exactly the counts
    ``chunking`` realises."""
    counts = sorted({cdiv(blocks, j) for j in range(1, blocks + 1)})
    counts = [s for s in counts if programs * s >= slots] or counts
    efficiency = [wave_efficiency(programs * s, slots) for s in counts]
    best = max(efficiency)
    return next(s for s, e in zip(counts, efficiency) if e >= best - WAVE_SLACK)


@functools.lru_cache(maxsize=4096)
def plan(batch: int, heads: int, kv_heads: int, n_q: int, blocks: int, d: int, dv: int,
          item: int, device: DeviceFacts, num_splits: int | None
          ) -> tuple[int, int, int, int, dict, dict]:
    """(num_splits, chunk, BLOCK_M, row blocks, constexprs of the split kernel, of the combine):
    the split count of ``wave_splits`` for the programs the default config keeps on an SM unless
    ``num_splits`` forces a count. Keys count as their ``blocks`` of SPLIT_ALIGN, so a decode
    loop meets a new plan once every SPLIT_ALIGN tokens. Shared by the family's split-KV
    kernels (the KV-cache kernel plans over its cache's capacity)."""
    group = heads // kv_heads
    block_m = min(64, max(16, next_pow2(group * n_q)))
    row_blocks = cdiv(group * n_q, block_m)
    split_meta = dict(HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=head_block(d), BLOCK_DV=head_block(dv),
                      BLOCK_M=block_m)
    if num_splits is None:
        meta = {**split_meta, "ITEM": item}
        slots = device.sms * ctas_per_sm(default_config(meta), meta, device)
        num_splits = wave_splits(batch * kv_heads * row_blocks, slots, blocks)
    num_splits, chunk = chunking(blocks, num_splits)
    combine_meta = dict(HEAD_DIM_V=dv, BLOCK_S=max(2, next_pow2(num_splits)),
                        BLOCK_DV=head_block(dv), num_warps=4)
    return num_splits, chunk, block_m, row_blocks, split_meta, combine_meta


def attention_decode_fwd(q, k, v, mask, scale: float, num_splits: int | None = None):
    """Split-KV forward on 4-D q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), mask 4-D or
    None. Returns ``(out, lse)`` exactly like ``attention.attention_fwd`` (``num_splits`` forces a
    split count, for tests)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    num_splits, chunk, _, row_blocks, split_meta, combine_meta = plan(
        B, Hq, Hkv, Nq, cdiv(Nk, SPLIT_ALIGN), D, Dv, q.element_size(), _device.facts(q.device),
        num_splits)
    dev = q.device
    out = empty((B, Hq, Nq, Dv), dtype=q.dtype, device=dev)
    lse = empty((B, Hq, Nq), dtype=torch.float32, device=dev)
    o_part = empty((B * Hq * Nq, num_splits, Dv), dtype=torch.float32, device=dev)
    lse_part = empty((B * Hq * Nq, num_splits), dtype=torch.float32, device=dev)
    mask_t, ms, mask_is_bool = mask_args(mask, q)
    # -- 1. partial results per key chunk --
    _attention_decode_split[(num_splits * row_blocks * B * Hkv,)](
        q, k, v, mask_t, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(), *ms,
        Hq, Hkv, Hq // Hkv, Nq, Nk, chunk, num_splits,
        scale * LOG2E, seq_bucket(chunk),
        HAS_MASK=mask is not None, MASK_IS_BOOL=mask_is_bool,
        INPUT_PRECISION=dot_precision(q.dtype), **split_meta,
    )
    # -- 2. merge the chunks of each query row --
    combine_splits(o_part, lse_part, out, lse, out.stride(), Hq, Nq, num_splits, combine_meta)
    return out, lse


def combine_splits(o_part, lse_part, out, lse, out_strides, heads: int, n_q: int,
                   num_splits: int, meta: dict) -> None:
    """Merge the fp32 partials ``o_part`` (rows, S, Dv) / ``lse_part`` (rows, S) of the S key
    chunks of each of the ``batch * heads * n_q`` query rows into ``out`` (read through
    ``out_strides`` as (batch, heads, n_q, Dv)) and the natural-log ``lse`` (rows,): the combine
    launch of every split-KV kernel of the family (``meta``: their plan's combine meta)."""
    rows = o_part.shape[0]
    _attention_decode_combine[(rows,)](
        o_part, lse_part, out, lse, *out_strides, heads, n_q, num_splits, **meta,
    )

