"""What the attention family's kernel files share: ``attention.py`` (the flash forward and
backward) and ``attention_decode.py`` (the split-KV decode forward).

* the tiles: ``load_tile`` (a 2-D load masked only where it can run out of bounds), ``scores`` and
  ``score_tile`` (Q Kᵀ of one key tile in log2 units with the user's mask, the causal mask and the
  key bound applied), ``apply_mask``;
* the tuning: ``tuned`` (the autotuner's configs and pruning of a config list), ``gpu_candidates``,
  ``config`` (a tile config, pointer or TMA), ``fits_smem``, ``seq_bucket``;
* the launch helpers: ``head_block``, ``dot_precision``, ``mask_args`` and the tensor descriptors
  of the TMA configs (``descriptors``, ``has_tma``, ``TMA_MIN_WORK``).

This module launches nothing; like ``_utils`` and ``_device`` its name starts with an underscore,
so ``tests/sm90_compile.py`` compiles it through the kernel files that use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _device
from ._utils import INTERPRET, cdiv, next_pow2

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)


# ------------------------------------------------------------------------------------------------
# Tuning
#
# Under the interpreter each kernel runs one config (its first, big tiles: the fewest numpy steps),
# or its TMA twin when the launcher passed descriptors (tests). On a GPU the autotuner times every
# config that suits the head dim, keyed on the head dims, the feature flags, the dtypes and the
# power-of-two bucket of each length (a launch with descriptors has its own key: descriptors carry
# no dtype). LIGHTLLM_AUTOTUNE=0 skips the timing and takes the first suitable config of each list
# (its pointer default): a test suite that meets a new key at every case would otherwise pay a
# dozen compilations per key.
# ------------------------------------------------------------------------------------------------


# The descriptor arguments of the kernels and the (rows, columns) constexprs of their boxes: a
# query-side tile has BLOCK_M rows, a key-side tile BLOCK_N; Q, K and their gradients are
# BLOCK_D wide, V, O, dO and dV BLOCK_DV. Descriptors are 4-D (B, H, N, D) with a (1, 1, rows,
# columns) box, so the copy engine zero-fills rows past N and head-dim columns past D.
_BOXES = {
    "QDesc": ("BLOCK_M", "BLOCK_D"), "KDesc": ("BLOCK_N", "BLOCK_D"),
    "VDesc": ("BLOCK_N", "BLOCK_DV"), "ODesc": ("BLOCK_M", "BLOCK_DV"),
    "DODesc": ("BLOCK_M", "BLOCK_DV"), "DQDesc": ("BLOCK_M", "BLOCK_D"),
    "DKDesc": ("BLOCK_N", "BLOCK_D"), "DVDesc": ("BLOCK_N", "BLOCK_DV"),
}


def _set_boxes(nargs) -> None:
    """Autotune pre-hook of a TMA config: the descriptors' boxes follow the config's tiles."""
    for name, (rows, cols) in _BOXES.items():
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, nargs[rows], nargs[cols]]


def config(block_m: int, block_n: int, warps: int, stages: int, tma: bool = False) -> triton.Config:
    """A tile config; ``tma`` loads (and stores) tiles through tensor descriptors (the copy engine)
    instead of pointer arithmetic (cp.async)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "USE_TMA": tma},
                         num_warps=warps, num_stages=stages, pre_hook=_set_boxes if tma else None)


def uses_tma(c: triton.Config) -> bool:
    return c.kwargs.get("USE_TMA", False)


def tuned(interpreter: triton.Config, gpu: list[triton.Config],
          suits: Callable[[triton.Config, dict], bool], tma: list[triton.Config] = ()) -> dict:
    """``triton.autotune`` arguments for the configs ``gpu`` (pointer loads) and ``tma`` (the
    same kernel loading through tensor descriptors, only when the launcher passed them).

    On a GPU the configs for which ``suits(config, meta)`` holds (meta: the constexprs plus ITEM,
    the element size of Q, and SMEM, the shared memory a program may stage in) are all timed, or
    only the first with LIGHTLLM_AUTOTUNE=0 (``_utils.autotune``): the first pointer config stays
    the default. Under the interpreter,
    ``interpreter`` runs, or its TMA twin when descriptors were passed (and ``tma`` is not empty).
    """
    if INTERPRET:
        configs = [interpreter]
        if tma:
            k = interpreter.kwargs
            configs.append(config(k["BLOCK_M"], k["BLOCK_N"], interpreter.num_warps,
                                  interpreter.num_stages, tma=True))
    else:
        configs = [*gpu, *tma]

    def prune(configs, named_args, **kwargs):
        use_tma = isinstance(named_args.get("QDesc"), TensorDescriptor)
        if INTERPRET:
            return [c for c in configs if uses_tma(c) == use_tma]
        q = named_args["Q"]
        meta = {**kwargs, "ITEM": q.element_size(),
                "SMEM": _device.facts(q.device).smem_per_block - SMEM_RESERVE}
        return gpu_candidates(configs, use_tma, meta, suits)

    return {"configs": configs, "prune_configs_by": {"early_config_prune": prune}}


def gpu_candidates(configs: list[triton.Config], use_tma: bool, meta: dict,
                   suits: Callable[[triton.Config, dict], bool]) -> list[triton.Config]:
    """The GPU configs a launch times: those that suit ``meta``, TMA configs only with
    descriptors; the last pointer config (which fits anything) when none suits."""
    candidates = [c for c in configs if use_tma or not uses_tma(c)]
    fit = [c for c in candidates if suits(c, meta)]
    return fit or [c for c in candidates if not uses_tma(c)][-1:]


SMEM_RESERVE = 3 * 1024  # of a program's shared memory, left to the compiler (224 of 227 KiB)


def fits_smem(c: triton.Config, per_stage: int, fixed: int, meta: dict) -> bool:
    # Compiling for sm_90 shows fp32 dots staging ~15 % more (layout conversions): keep headroom.
    item = meta["ITEM"]
    return (c.num_stages * per_stage + fixed) * (1.15 if item == 4 else 1.0) <= meta["SMEM"]


def seq_bucket(n: int) -> int:
    """The autotuning key of a sequence length: its power-of-two bucket in [128, 16384]."""
    return min(max(next_pow2(n), 128), 16384)


# ------------------------------------------------------------------------------------------------
# Tiles shared by the kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def load_tile(ptrs, row_ok, col_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A 2-D load masked only along the dimensions that can run out of bounds (zeros there)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def apply_mask(s, mask_ptrs, valid, MASK_IS_BOOL: tl.constexpr):
    """Scores (log2 units) with the user's mask tile applied: -inf where a boolean mask is False, the
    additive mask (natural-log units) added otherwise. ``valid`` guards the mask load."""
    mk = tl.load(mask_ptrs, mask=valid, other=0)
    if MASK_IS_BOOL:
        s = tl.where(mk != 0, s, float("-inf"))
    else:
        s = s + mk.to(tl.float32) * _LOG2E
    return s


@triton.jit
def scores(q, k, mask_ptrs, cols, last_key, row_ok, col_ok, qk_scale, CHECK_KEYS: tl.constexpr,
           APPLY_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
           INPUT_PRECISION: tl.constexpr):
    """Scores q·kᵀ of one key tile in log2 units with the user's mask, the causal mask (row r sees
    keys up to ``last_key[r]``) and the key bound applied (-inf where hidden)."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if HAS_MASK:
        if CHECK_KEYS:
            s = apply_mask(s, mask_ptrs, row_ok[:, None] & col_ok[None, :], MASK_IS_BOOL)
        else:
            s = apply_mask(s, mask_ptrs, row_ok[:, None], MASK_IS_BOOL)
    if APPLY_CAUSAL:
        s = tl.where(cols[None, :] <= last_key[:, None], s, float("-inf"))
    if CHECK_KEYS:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def score_tile(q, k_ptrs, mask_ptrs, cols, offs_m, row_ok, col_ok, d_ok, qk_scale,
               CHECK_KEYS: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               MASK_IS_BOOL: tl.constexpr, PAD_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``scores`` of the key tile at ``k_ptrs`` (loaded through pointers); returns them with the
    loaded key tile."""
    k = load_tile(k_ptrs, col_ok, d_ok, CHECK_KEYS, PAD_D)
    s = scores(q, k, mask_ptrs, cols, offs_m, row_ok, col_ok, qk_scale, CHECK_KEYS,
               APPLY_CAUSAL, HAS_MASK, MASK_IS_BOOL, INPUT_PRECISION)
    return s, k


@triton.jit
def split_program(num_splits, n_rows, n_kv_heads, BLOCK_M: tl.constexpr):
    """Which work a split-KV program owns, on the 1-D grid of (key chunk, block of ``n_rows``
    query rows, batch * kv head) with chunks fastest: ``(split, first row, off_b, off_hkv)``
    (64-bit batch and kv-head indices)."""
    pid = tl.program_id(0)
    split = pid % num_splits
    row_blocks = tl.cdiv(n_rows, BLOCK_M)
    row_start = (pid // num_splits) % row_blocks * BLOCK_M
    off_bkv = pid // num_splits // row_blocks
    return split, row_start, (off_bkv // n_kv_heads).to(tl.int64), (off_bkv % n_kv_heads).to(tl.int64)


# ------------------------------------------------------------------------------------------------
# Launch helpers
# ------------------------------------------------------------------------------------------------


def head_block(d: int) -> int:
    """The power-of-two register width of a head dim (at least 16, tl.dot's smallest)."""
    return max(16, next_pow2(d))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 dots must be true fp32 (PyTorch's result), never TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def mask_args(mask: torch.Tensor | None, fallback: torch.Tensor):
    """(pointer tensor, 4 strides, is_bool) of a 4-D mask whose size-1 dims broadcast (stride 0)."""
    if mask is None:
        return fallback, (0, 0, 0, 0), False
    strides = tuple(s if n > 1 else 0 for n, s in zip(mask.shape, mask.stride()))
    is_bool = mask.dtype == torch.bool
    return (mask.view(torch.uint8) if is_bool else mask), strides, is_bool


def has_tma(device: torch.device) -> bool:
    """Whether launches take tensor descriptors (the copy engine) by default: where the device
    has them, but not under the interpreter, which emulates them: there the default stays the
    pointer path (what LIGHTLLM_AUTOTUNE=0 runs on a GPU), and tests ask for descriptors."""
    return not INTERPRET and _device.facts(device).tma


def _descriptor(t: torch.Tensor) -> TensorDescriptor | None:
    """A 4-D descriptor of ``t`` (B, H, N, D) whose box the chosen config sets (``_set_boxes``),
    or None when the copy engine cannot address it: the head dim must be unit-strided, the base
    and the other strides 16-byte aligned. A dimension of size 1 may carry any stride (PyTorch
    keeps whatever a view left there); it gets a packed one, as its coordinate is always 0."""
    strides = list(t.stride())
    align = 16 // t.element_size()
    if strides[3] != 1 or t.data_ptr() % 16:
        return None
    shape = list(t.shape)
    for i in (2, 1, 0):
        if shape[i] == 1:
            strides[i] = cdiv(strides[i + 1] * shape[i + 1], align) * align
        elif strides[i] <= 0 or strides[i] % align:
            return None
    return TensorDescriptor(t, shape, strides, [1, 1, 16, 16])


# Building the descriptors costs host time (measured on the CPU machine: ~14 µs for the forward's
# 4, TensorDescriptor's own checks included; the backward builds 7), hidden only behind a kernel
# that runs longer: from 2^32 multiply-adds in Q Kᵀ (B·Hq·Nq·Nk·D, e.g. 32 heads of 2048 x 2048
# at D = 128 is 2^34; ~20 µs of an H100's tensor cores), below which the pointer configs serve
# alone.
TMA_MIN_WORK = 1 << 32


def descriptors(tma: bool | None, *tensors: torch.Tensor, work: int = 0) -> tuple:
    """Tensor descriptors of ``tensors`` for the TMA configs, or the tensors themselves (the TMA
    configs are then pruned). ``tma`` None takes descriptors for fp16/bf16 on Hopper+ when the
    launch does at least TMA_MIN_WORK multiply-adds (``work``) and every tensor allows them;
    True also under the interpreter, for fp32 and small launches (tests); False never."""
    t0 = tensors[0]
    if tma is None:
        tma = (work >= TMA_MIN_WORK and t0.dtype in (torch.float16, torch.bfloat16)
               and has_tma(t0.device))
    if not tma:
        return tensors
    descs = tuple(_descriptor(t) for t in tensors)
    return tensors if None in descs else descs
