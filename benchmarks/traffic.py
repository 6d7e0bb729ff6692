"""Memory traffic and kernel launches of every op and of a transformer block, counted.

For each op and two decoder blocks, forward and backward, the bytes read and written and the
kernel launches of lightllm, of eager PyTorch (the references the benchmarks call "eager"), of
PyTorch's own fused op ("torch", where there is one) and, for the blocks, of ``torch.compile``
("compile"), with lightllm / eager and lightllm / compile ratios. The blocks:

  transformer_block  GPT-2's pre-norm block (LayerNorm -> attention -> Add & Norm -> GeLU
                     feed-forward -> add) as ``torch.nn.TransformerEncoderLayer`` (causal, no
                     dropout): eager is PyTorch's layer, lightllm the same layer after
                     ``lightllm.patch``. GPT-2 medium's sizes in the scaled table.
  llama_block        the Llama layout (RMSNorm -> q/k/v -> rotary -> causal GQA attention -> o_proj
                     -> Add & RMSNorm -> SwiGLU MLP -> add): eager is transformers'
                     ``LlamaDecoderLayer`` (``attn_implementation="sdpa"``), lightllm lightllm's own
                     Llama block on the same weights (``_llama_block_case`` says why that one).
                     SmolLM2-135M's and Llama-3-8B's sizes, batch 1, 2048 tokens.
  compile            ``torch.compile`` (inductor) of the eager block, counted from inductor's
                     scheduler (``compile_count``) at both tables' shapes. This machine has no GPU,
                     so inductor plans C++ kernels for a CPU: their fusion is the proxy counted for
                     its GPU fusion (both fuse a reduction with its pointwise neighbours; matmuls
                     and SDPA stay extern kernels on both).
A block's backward differentiates its input and every parameter (a training step's weight
gradients), in every provider.

How (``benchmarks.counting`` has the two instruments and their rules):
  counted  tiny shapes on the CPU, float16 (bfloat16's code path in every provider, 2-byte
           elements; the interpreter cannot multiply bfloat16). lightllm's Triton kernels run in
           Triton's interpreter, their loads and stores counted lane by lane; every aten op
           lightllm's Python performs (copies, zero-fills, sums of partials) counts too. Eager and
           torch: every aten op they dispatch, its inputs read and outputs written, one launch each.
  scaled   real sizes, bfloat16, on meta tensors (nothing is computed): the aten ops of every
           provider are counted there exactly as above, and each Triton launch lightllm makes is
           priced by its kernel's formula (``KERNEL_FORMULAS``, a function of the launch's own
           arguments, grid and block sizes) — the formulas the counted launches confirm launch by
           launch (tests/test_traffic.py). The launch plans are lightllm's own; SM-dependent plans
           take an H200's 132 SMs, and attention kernels the block sizes of their GPU default
           configs (``GPU_BLOCKS``) in place of the interpreter's single config.
           PyTorch's SDPA, which takes its math backend on meta tensors, counts there as the fused
           kernel it is on a GPU (``_fused_sdpa``: one launch at its ideal bytes).
Modes: ``fwd`` is the training forward (inputs require grad, so what a backward saves is
written); ``bwd`` the backward alone (``torch.autograd.grad`` with a random output gradient).
Softmax's lightllm kernel is CUDA C++ the interpreter cannot run: its records give the traffic of
the kernel's design (csrc/softmax_kernels.cuh) with ``counted: false``.
Bytes are what each kernel's loads and stores request: a K/V tile re-read by every query block,
a weight re-read by every row's program, counts each time (on a GPU L2 serves some of it); an
aten op, and an inductor kernel, counts each input and output once, its ideal. So a block's
lightllm bytes include its matmuls' tile re-reads, eager's and compile's do not: the scaled
lightllm block records also carry ``bytes_matmul_ideal`` (lightllm's matmul launches with each
operand read once, ``matmul_ideal``), the figure comparable with theirs.

    python -m benchmarks.traffic --out DIR [--quick] [--no-compile]

writes ``DIR/traffic.json`` and ``DIR/traffic.md``. JSON schema::

    {"environment": {"torch", "triton", "python", "date", "counted_dtype", "scaled_dtype",
                     "sms", "gpu_blocks", "goals"},
     "counted": [{"op", "case", "shape": {...}, "dtype", "mode", "provider", "bytes_read",
                  "bytes_written", "launches", "per_kernel": {name: {"bytes_read",
                  "bytes_written", "launches"}}, "counted": bool, "note"?}],
     "scaled":  [{"op", "case", "shape", "dtype", "mode", "provider", "bytes_read",
                  "bytes_written", "launches", "exact": bool, "formula": str, "per_kernel",
                  "bytes_matmul_ideal"? (lightllm blocks)}],
     "ratios":  [{"table": "counted" | "scaled", "op", "case", "mode", "provider",
                  "baseline": "eager" | "compile", "bytes_ratio", "launch_ratio"}]}

``ratios`` give provider / baseline of (bytes read + written) and of launches: every provider
against eager, and lightllm against compile. The markdown opens with the blocks' table (the
goals: launches <= 0.6x and bytes <= 0.25x eager's, forward and backward) and where
lightllm's block launches and bytes go, per kernel. ``run(out_dir, quick, compiled)`` returns
the dict; ``markdown(traffic)`` renders the tables.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before lightllm's kernels are defined: Triton decides at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402

import lightllm  # noqa: E402
import lightllm.functional as LF  # noqa: E402
from benchmarks.counting import Counter, Launch, Tally  # noqa: E402
from lightllm import _dispatch  # noqa: E402
from lightllm.kernels import _device as kernel_device  # noqa: E402
from lightllm.kernels import _utils as kernel_utils  # noqa: E402
from lightllm.kernels import fused_linear as fused_linear_kernels  # noqa: E402
from lightllm.reference import fused_linear as fused_linear_reference  # noqa: E402
from lightllm.reference import softmax as softmax_reference  # noqa: E402

cdiv = kernel_utils.cdiv

if not _dispatch.TRITON_INTERPRET:
    raise RuntimeError("benchmarks.traffic counts lightllm's kernels in Triton's interpreter: set "
                       "TRITON_INTERPRET=1 before lightllm is imported (running the module as "
                       "`python -m benchmarks.traffic` does)")

COUNTED_DTYPE = torch.float16
SCALED_DTYPE = torch.bfloat16
H200_SMS = 132
# Block sizes of each attention kernel's GPU default config for 16-bit head dims <= 128: the first
# entry of its GPU list in kernels/attention.py (_FWD, _DKDV, _DQ) and attention_decode.py (_SPLIT).
# The interpreter runs one config per kernel; the scaled figures take these instead.
GPU_BLOCKS = {
    "_attention_fwd": {"BLOCK_M": 128, "BLOCK_N": 64},
    "_attention_bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 128},
    "_attention_bwd_dq": {"BLOCK_M": 128, "BLOCK_N": 32},
    "_attention_decode_split": {"BLOCK_N": 128},
}


# ------------------------------------------------------------------------------------------------
# Kernel formulas: (bytes read, bytes written) of one launch from its arguments, grid and blocks
# ------------------------------------------------------------------------------------------------


def _e(t) -> int:
    """Element size of a kernel argument (a tensor, or a tensor descriptor's base)."""
    return (t.base if hasattr(t, "block_shape") else t).element_size()


def _layer_norm_fwd(a: dict, grid) -> tuple[int, int]:
    # Per row (one program each): x (+ residual) in, y (+ the sum s) out; w and b per program;
    # mean and rstd (fp32) out. Rows past MAX_FUSED_FWD re-read their source in a second pass.
    # (RMSNorm's overflow rescue, a third pass taken only when a row's squares overflow, is not
    # modelled: random data never takes it.)
    rows, n = grid[0], a["N"]
    read, written = n * _e(a["X"]), n * _e(a["Y"])
    if a["HAS_RESIDUAL"]:
        read += n * _e(a["R"])
        written += n * _e(a["S"])
    read += n * (_e(a["W"]) * a["HAS_WEIGHT"] + _e(a["B"]) * a["HAS_BIAS"])
    if not a["SINGLE_TILE"]:
        read += n * _e(a["S"] if a["HAS_RESIDUAL"] else a["X"])
    written += 4 if a["IS_RMS"] else 8
    return rows * read, rows * written


def _layer_norm_bwd(a: dict, grid) -> tuple[int, int]:
    # G programs over contiguous runs of rows. Per row: x, dy (and ds) in, dx out, its mean and
    # rstd in. Short rows: w once per program, dw/db partials (fp32) stored once per program.
    # Long rows: two passes each reading x, dy, w; pass 1 read-modify-writes the partial rows.
    programs, m, n = grid[0], a["M"], a["N"]
    xdy = n * (_e(a["X"]) + _e(a["DY"]))
    w = n * _e(a["W"]) * a["HAS_WEIGHT"]
    stats = 4 if a["IS_RMS"] else 8
    partials = a["NEED_DW"] + a["NEED_DB"]
    ds = n * _e(a["DS"]) * a["HAS_DS"]
    if a["SINGLE_TILE"]:
        read = programs * w + m * (xdy + ds + stats)
        written = m * n * _e(a["DX"]) + programs * partials * n * 4
    else:
        read = m * (2 * (xdy + w) + ds + stats + partials * n * 4)
        written = m * (n * _e(a["DX"]) + partials * n * 4)
    return read, written


def _epilogue_bytes(a: dict, m: int, n: int, row_tiles: int) -> tuple[int, int]:
    # Bias (per output tile, so once per row tile), pre-activations saved or re-read, residual,
    # the output(s).
    read = row_tiles * n * (_e(a["Bias"]) * a["HAS_BIAS"] + _e(a["Bias2"]) * a["HAS_BIAS2"])
    written = m * n * _e(a["Out"])
    if a["AUX"] == fused_linear_kernels.AUX_STORE_PRE:
        written += m * n * (_e(a["Aux"]) + _e(a["Aux2"]) * a["GATED"])
    elif a["AUX"] == fused_linear_kernels.AUX_ACT_GRAD:
        read += m * n * _e(a["Aux"])
    elif a["AUX"] == fused_linear_kernels.AUX_GATE_GRAD:
        read += m * n * (_e(a["Aux"]) + _e(a["Aux2"]))
        written += m * n * _e(a["Out2"])
    read += m * n * _e(a["Res"]) * a["HAS_RESIDUAL"]
    return read, written


def _linear_gelu_mm_tma(a: dict, grid) -> tuple[int, int]:
    # TMA boxes past the edges are zero-filled, not read: A once per column tile, B (and B2) once
    # per row tile, K whole.
    m, n, k = a["M"], a["N"], a["K"]
    row_tiles, col_tiles = cdiv(m, a["BLOCK_M"]), cdiv(n, a["BLOCK_N"])
    b = _e(a["BDesc"]) + _e(a["B2Desc"]) * a["GATED"]
    read, written = _epilogue_bytes(a, m, n, row_tiles)
    return read + m * k * col_tiles * _e(a["ADesc"]) + n * k * row_tiles * b, written


def _linear_gelu_mm(a: dict, grid) -> tuple[int, int]:
    # Pointer loads: rows and columns past the edge wrap (they read real data), so every tile
    # reads BLOCK_M rows of A and BLOCK_N columns of B (and B2) over the whole K.
    m, n, k = a["M"], a["N"], a["K"]
    row_tiles, col_tiles = cdiv(m, a["BLOCK_M"]), cdiv(n, a["BLOCK_N"])
    b = _e(a["B"]) + _e(a["B2"]) * a["GATED"]
    tiles = row_tiles * col_tiles
    read, written = _epilogue_bytes(a, m, n, row_tiles)
    return read + tiles * k * (a["BLOCK_M"] * _e(a["A"]) + a["BLOCK_N"] * b), written


def matmul_ideal(launch: Launch) -> tuple[int, int] | None:
    """(read, written) of a lightllm matmul launch with every operand read once (A, B, B2 and
    the bias whole, as an aten matmul counts), or None for a kernel that is no matmul: what the
    launch's design requests past that is tile re-reads, which L2 serves in part on a GPU."""
    if launch.kernel not in ("_linear_gelu_mm_tma", "_linear_gelu_mm"):
        return None
    a, tma = launch.args, launch.kernel.endswith("_tma")
    m, n, k = a["M"], a["N"], a["K"]
    e_a = _e(a["ADesc"] if tma else a["A"])
    e_b = _e(a["BDesc"] if tma else a["B"]) + _e(a["B2Desc"] if tma else a["B2"]) * a["GATED"]
    read, written = _epilogue_bytes(a, m, n, 1)
    return read + m * k * e_a + n * k * e_b, written


def _linear_gelu_bwd(a: dict, grid) -> tuple[int, int]:
    # Elementwise: dy and pre (and u) in, dpre (and du) out; db partials (fp32) per row group.
    m, n, groups, gated = a["M"], a["N"], grid[1], a["GATED"]
    read = m * n * (_e(a["DY"]) + _e(a["Pre"]) + _e(a["Up"]) * gated)
    written = m * n * (_e(a["DPre"]) + _e(a["DUp"]) * gated)
    written += a["NEED_DB"] * groups * n * 4 * (1 + gated)
    return read, written


def _rotary_fwd(a: dict, grid) -> tuple[int, int]:
    # Per (position, head block) tile: the position's cos and sin rows; each head of q and k:
    # its rotary dims (and the pass-through dims unless in place) in and out.
    tiles, half = a["n_tiles"], a["HALF"]
    positions = tiles // a["n_head_blocks"]
    per_head = 2 * half + a["PASS"] * a["HAS_PASS"]
    read = tiles * 2 * half * (_e(a["Cos"]) + _e(a["Sin"]))
    read += positions * per_head * (a["HQ"] * _e(a["Q"]) + a["HK"] * _e(a["K"]))
    written = positions * per_head * (a["HQ"] * _e(a["QO"]) + a["HK"] * _e(a["KO"]))
    return read, written


def keys_per_query_block(block: int, block_m: int, block_n: int, n_k: int, causal: bool) -> int:
    """Keys whose K and V rows one query block loads (forward and dQ): the full tiles below the
    block's diagonal, then the last segment's tiles, each up to the key bound."""
    if causal:
        hi = min((block + 1) * block_m, n_k)
        full = min(block * block_m, n_k) // block_n * block_n
    else:
        hi, full = n_k, n_k // block_n * block_n
    return min(full + cdiv(hi - full, block_n) * block_n, n_k) if hi > full else full


def _attention_common(a: dict) -> None:
    if a["HAS_MASK"] or a["HAS_DROPOUT"]:
        raise NotImplementedError("traffic formulas cover attention without a mask or dropout")


def _query_blocks(a: dict, block_m: int):
    """(rows, keys loaded) of each query block of one head."""
    n_q, n_k = a["n_q"], a["n_k"]
    for block in range(cdiv(n_q, block_m)):
        rows = min(block_m, n_q - block * block_m)
        yield rows, keys_per_query_block(block, block_m, a["BLOCK_N"], n_k, a["IS_CAUSAL"])


def _attention_fwd(a: dict, grid) -> tuple[int, int]:
    # Per (query block, head): Q rows once, K and V rows of every visited key tile, out and lse.
    _attention_common(a)
    d, dv, bm = a["HEAD_DIM"], a["HEAD_DIM_V"], a["BLOCK_M"]
    heads = grid[0] // cdiv(a["n_q"], bm)
    kv = d * _e(a["K"]) + dv * _e(a["V"])
    read = sum(rows * d * _e(a["Q"]) + keys * kv for rows, keys in _query_blocks(a, bm))
    return heads * read, heads * a["n_q"] * (dv * _e(a["Out"]) + 4)


def _attention_bwd_preprocess(a: dict, grid) -> tuple[int, int]:
    # delta = rowsum(dO * O): O and dO in, delta (fp32) out, per query row.
    rows = grid[0] // cdiv(a["n_q"], a["BLOCK_M"]) * a["n_q"]
    return rows * a["HEAD_DIM_V"] * (_e(a["Out"]) + _e(a["DO"])), rows * 4


def _attention_bwd_dkdv(a: dict, grid) -> tuple[int, int]:
    # Per (key block, kv head): its K and V rows once; for each query head of the group, the
    # query rows that can see the block (causal: from the block's first row tile on): Q, dO, lse
    # and delta. dK and dV out.
    _attention_common(a)
    d, dv, bm, bn = a["HEAD_DIM"], a["HEAD_DIM_V"], a["BLOCK_M"], a["BLOCK_N"]
    n_q, n_k = a["n_q"], a["n_k"]
    kv_heads = grid[0] // cdiv(n_k, bn)
    per_row = d * _e(a["Q"]) + dv * _e(a["DO"]) + 8
    read = written = 0
    for block in range(cdiv(n_k, bn)):
        cols = min(bn, n_k - block * bn)
        rows = max(0, n_q - block * bn // bm * bm) if a["IS_CAUSAL"] else n_q
        read += cols * (d * _e(a["K"]) + dv * _e(a["V"])) + a["group"] * rows * per_row
        written += cols * (d * _e(a["DK"]) + dv * _e(a["DV"]))
    return kv_heads * read, kv_heads * written


def _attention_bwd_dq(a: dict, grid) -> tuple[int, int]:
    # Per (query block, head): Q, dO, lse, delta of its rows; K and V of the forward's key tiles.
    _attention_common(a)
    d, dv, bm = a["HEAD_DIM"], a["HEAD_DIM_V"], a["BLOCK_M"]
    heads = grid[0] // cdiv(a["n_q"], bm)
    per_row = d * _e(a["Q"]) + dv * _e(a["DO"]) + 8
    kv = d * _e(a["K"]) + dv * _e(a["V"])
    read = sum(rows * per_row + keys * kv for rows, keys in _query_blocks(a, bm))
    return heads * read, heads * a["n_q"] * d * _e(a["DQ"])


def _attention_decode_split(a: dict, grid) -> tuple[int, int]:
    # Per (key chunk, row block of (group head, token) rows, kv head): the block's query rows,
    # the chunk's K and V rows; the partial output and log-sum-exp (fp32) of its rows out.
    if a["HAS_MASK"]:
        raise NotImplementedError("traffic formulas cover decoding without a mask")
    d, dv, bm = a["HEAD_DIM"], a["HEAD_DIM_V"], a["BLOCK_M"]
    splits, chunk, n_k = a["num_splits"], a["chunk"], a["n_k"]
    rows = a["group"] * a["n_q"]
    kv_heads = grid[0] // (splits * cdiv(rows, bm))
    keys = sum(max(0, min(chunk, n_k - s * chunk)) for s in range(splits))
    read = splits * rows * d * _e(a["Q"]) + cdiv(rows, bm) * keys * (d * _e(a["K"]) + dv * _e(a["V"]))
    written = splits * rows * (_e(a["LsePart"]) + dv * _e(a["OPart"]))
    return kv_heads * read, kv_heads * written


def _attention_decode_combine(a: dict, grid) -> tuple[int, int]:
    # Per query row: its chunks' partial outputs and lse in; out and lse out.
    rows, splits, dv = grid[0], a["num_splits"], a["HEAD_DIM_V"]
    read = rows * splits * (_e(a["LsePart"]) + dv * _e(a["OPart"]))
    return read, rows * (_e(a["Lse"]) + dv * _e(a["Out"]))


KERNEL_FORMULAS: dict[str, Callable[[dict, tuple], tuple[int, int]]] = {
    f.__name__: f for f in (
        _layer_norm_fwd, _layer_norm_bwd, _linear_gelu_mm_tma, _linear_gelu_mm, _linear_gelu_bwd,
        _rotary_fwd, _attention_fwd, _attention_bwd_preprocess, _attention_bwd_dkdv,
        _attention_bwd_dq, _attention_decode_split, _attention_decode_combine)
}


def kernel_traffic(launch: Launch) -> tuple[int, int]:
    """(bytes read, bytes written) of one Triton launch by its kernel's formula."""
    if launch.kernel not in KERNEL_FORMULAS:
        raise KeyError(f"no traffic formula for the Triton kernel {launch.kernel}")
    return KERNEL_FORMULAS[launch.kernel](launch.args, launch.grid)


# ------------------------------------------------------------------------------------------------
# Cases: an op, its shape, a maker of inputs on a device and dtype, and its providers
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    case: str
    shape: dict
    make: Callable[[str, torch.dtype], tuple]  # (device, dtype) -> inputs
    providers: dict[str, Callable]
    modes: tuple[str, ...] = ("fwd", "bwd")
    grad_inputs: tuple[int, ...] | None = None  # positions that require grad (None: all)
    # provider -> the module whose parameters the backward differentiates as well (a training
    # step's weight gradients); providers without one differentiate their inputs only
    modules: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)
    compiled: str | None = None  # the provider torch.compile compiles for the "compile" records


def _randn(device, dtype, *shape):
    return torch.randn(*shape, device=device, dtype=dtype)


def _norm_case(op: str, m: int, n: int) -> Case:
    from benchmarks.bench_norm import _providers

    def make(device, dtype):
        x = _randn(device, dtype, m, n)
        params = (_randn(device, dtype, n),) if "rms" in op else (_randn(device, dtype, n),) * 2
        if "add" in op:
            return (x, _randn(device, dtype, m, n), *map(torch.clone, params))
        return (x, *map(torch.clone, params))

    providers = _providers(op)
    return Case(op, f"{m}x{n}", {"M": m, "N": n}, make,
                {k: providers[k] for k in ("lightllm", "eager", "torch")})


def _linear_case(op: str, m: int, k: int, n: int) -> Case:
    def make(device, dtype):
        return _randn(device, dtype, m, k), _randn(device, dtype, n, k), _randn(device, dtype, n)

    if op == "linear_gelu":
        from benchmarks.bench_fused_linear import _linear_gelu_providers
        providers = _linear_gelu_providers("none", "fwd")
        # On a CPU the bench's "torch" is the eager reference (addmm, then GeLU).
        providers = {"lightllm": providers["lightllm"], "eager": providers.get("eager", providers["torch"])}
    else:
        providers = {"lightllm": LF.linear_relu, "eager": fused_linear_reference.linear_relu}
    return Case(op, f"{m}x{k}->{n}", {"M": m, "K": k, "N": n}, make, providers)


def _swiglu_case(m: int, k: int, n: int) -> Case:
    from benchmarks.bench_fused_linear import _swiglu_providers

    def make(device, dtype):
        return _randn(device, dtype, m, k), _randn(device, dtype, n, k), _randn(device, dtype, n, k)

    providers = _swiglu_providers()
    return Case("linear_swiglu", f"{m}x{k}->{n}", {"M": m, "K": k, "N": n}, make,
                {"lightllm": providers["lightllm"], "eager": providers.get("eager", providers["torch"])})


def _rotary_case(b: int, s: int, h: int, hkv: int, d: int) -> Case:
    from benchmarks.bench_rotary import _providers

    def make(device, dtype):
        cos, sin = LF.rotary_cos_sin(torch.arange(s).expand(b, s), d, dtype=dtype)
        return (_randn(device, dtype, b, h, s, d), _randn(device, dtype, b, hkv, s, d),
                cos.to(device), sin.to(device))

    providers = _providers()
    return Case("rotary", f"B{b} S{s} H{h}/{hkv} D{d}", {"B": b, "S": s, "H": h, "H_kv": hkv, "D": d},
                make, {"lightllm": providers["lightllm"], "eager": providers["eager"],
                       "torch": providers["torch_transformers"]}, grad_inputs=(0, 1))


def _attention_case(b: int, h: int, hkv: int, n_q: int, n_k: int, d: int, causal: bool) -> Case:
    from benchmarks.bench_attention import providers

    def make(device, dtype):
        return (_randn(device, dtype, b, h, n_q, d), _randn(device, dtype, b, hkv, n_k, d),
                _randn(device, dtype, b, hkv, n_k, d))

    decode = n_q == 1
    found = providers(causal, hkv != h, n_k)
    label = f"B{b} H{h}/{hkv} N{n_q}x{n_k} D{d}{' causal' if causal else ''}"
    return Case("attention_decode" if decode else "attention", label,
                {"B": b, "H": h, "H_kv": hkv, "N_q": n_q, "N_k": n_k, "D": d, "causal": causal},
                make, {k: found[k] for k in ("lightllm", "eager", "torch")},
                ("fwd",) if decode else ("fwd", "bwd"))


def _softmax_case(m: int, n: int) -> Case:
    def make(device, dtype):
        return (_randn(device, dtype, m, n),)

    return Case("softmax", f"{m}x{n}", {"M": m, "N": n}, make,
                {"eager": lambda x: softmax_reference.softmax(x, -1),
                 "torch": lambda x: torch.softmax(x, -1)})


def _block_case(batch: int, seq: int, d: int, heads: int) -> Case:
    """GPT-2's pre-norm block as torch.nn.TransformerEncoderLayer (causal, GeLU, no dropout):
    eager is PyTorch's layer in training mode, lightllm the same layer after lightllm.patch."""
    layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                             norm_first=True, activation="gelu")
    ours = copy.deepcopy(layer)
    lightllm.patch(ours)

    def make(device, dtype):
        _place(layer, device, dtype)
        _place(ours, device, dtype)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(seq, device=device, dtype=dtype)
        return _randn(device, dtype, batch, seq, d), mask

    def call(module):
        return lambda x, mask: module(x, src_mask=mask, is_causal=True)

    return Case("transformer_block", f"B{batch} N{seq} d{d} h{heads}",
                {"B": batch, "N": seq, "d_model": d, "heads": heads, "d_ff": 4 * d}, make,
                {"lightllm": call(ours), "eager": call(layer)}, grad_inputs=(0,),
                modules={"lightllm": ours, "eager": layer}, compiled="eager")


def _place(module: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
    """``module.to(device, dtype)``; a module on the meta device gets uninitialised storage on
    another device (its values never matter where it goes from meta: torch.compile's count)."""
    if device != "meta" and any(p.is_meta for p in module.parameters()):
        module.to_empty(device=device)
    module.to(device, dtype)


def _llama_block_case(model: str, batch: int, seq: int, d: int, heads: int, kv_heads: int,
                      head_dim: int, ffn: int, rope_theta: float = 10000.0) -> Case:
    """The Llama layout's decoder layer (RMSNorm -> q/k/v -> rotary -> causal GQA attention ->
    o_proj -> residual add -> RMSNorm -> SwiGLU MLP -> residual add), one function of x in every
    provider, on the same parameter tensors:

    eager     transformers' ``LlamaDecoderLayer`` with ``attn_implementation="sdpa"`` (transformers'
              default: PyTorch's fused SDPA, grouped heads as ``enable_gqa``), training mode;
    lightllm  lightllm's own Llama block (``lightllm.models.gpt.Block`` of
              ``GPTConfig.llama``) run as ``GPT.forward`` runs a layer: ``rms_norm``, the q/k/v/o
              projections, ``rotary_embedding``, lightllm's SDPA, ``add_rms_norm`` (the residual
              add fused into the second norm), the SwiGLU feed-forward, and a plain residual add
              closing the block (in a stack ``GPT.forward`` fuses that add into the next layer's
              norm, one launch fewer per layer than counted here);
    compile   ``torch.compile`` of the eager layer.

    lightllm's block rather than the patched transformers layer: ``lightllm.patch`` swaps the
    layer's RMSNorms and MLP (and attention, through ``attn_implementation="lightllm"``, set on a
    whole model), but leaves transformers' rotary (rotate_half: slices, neg, cat, mul, add per
    q and k) and its separate residual adds in place; lightllm's block is the Llama layout as
    lightllm runs it (lightllm's GPT, ``GPT.from_hf`` of a transformers checkpoint), so its
    counts are the ones the block goals are about. Both compute the same function of the same
    weights (tests/test_traffic.py checks the outputs at the counted shape).
    ``cos``/``sin`` (transformers' position embeddings) and lightllm's rotary table are inputs
    made once per forward outside the layers in both models, so neither is counted."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from lightllm.models.gpt import Block, GPTConfig, _add_norm, _plain_norm

    config = LlamaConfig(hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, intermediate_size=ffn, rope_theta=rope_theta,
                         attn_implementation="sdpa")
    ours_config = GPTConfig.llama(n_layer=1, n_embd=d, n_head=heads, n_kv_head=kv_heads,
                                  head_dim=head_dim, intermediate_size=ffn,
                                  norm_eps=config.rms_norm_eps, rope_base=rope_theta)
    real_size = d * ffn > 1 << 20  # real sizes: parameters on the meta device, never filled
    with torch.device("meta" if real_size else "cpu"):
        layer = LlamaDecoderLayer(config, layer_idx=0).train()
        block = Block(ours_config).train()
    attn, mlp = layer.self_attn, layer.mlp
    shared = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj,
              "out_proj": attn.o_proj}
    for name, linear in shared.items():
        getattr(block.attn, name).weight = linear.weight
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(block.mlp, name).weight = getattr(mlp, name).weight
    block.norm_attn.weight = layer.input_layernorm.weight
    block.norm_mlp.weight = layer.post_attention_layernorm.weight

    def make(device, dtype):
        _place(layer, device, dtype)
        _place(block, device, dtype)
        x = _randn(device, dtype, batch, seq, d)
        positions = torch.arange(seq).expand(batch, seq)
        cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions)
        table = LF.rotary_cos_sin(positions, head_dim, base=rope_theta, dtype=dtype)
        return x, *(t.to(device, dtype) for t in (cos, sin, *table))

    def eager(x, cos, sin, rope_cos, rope_sin):
        return layer(x, position_embeddings=(cos, sin))

    def ours(x, cos, sin, rope_cos, rope_sin):
        h = _plain_norm(LF, x, block.norm_attn)
        h, x = _add_norm(LF, block.attn(h, rope=(rope_cos, rope_sin)), x, block.norm_mlp)
        return x + block.mlp(h)

    return Case("llama_block", f"{model} B{batch} N{seq}",
                {"model": model, "B": batch, "N": seq, "d_model": d, "heads": heads,
                 "kv_heads": kv_heads, "head_dim": head_dim, "d_ff": ffn}, make,
                {"lightllm": ours, "eager": eager}, grad_inputs=(0,),
                modules={"lightllm": block, "eager": layer}, compiled="eager")


def counted_cases(quick: bool) -> list[Case]:
    """Tiny odd shapes: every kernel path runs in the interpreter in seconds."""
    cases = [_norm_case(op, 7, 33) for op in ("layer_norm", "add_layer_norm", "rms_norm",
                                               "add_rms_norm")]
    cases += [_linear_case("linear_gelu", 5, 24, 40), _linear_case("linear_relu", 5, 24, 40),
              _swiglu_case(5, 24, 40), _rotary_case(1, 5, 4, 2, 16),
              _attention_case(1, 2, 2, 37, 37, 16, False), _attention_case(1, 2, 2, 37, 37, 16, True),
              _attention_case(1, 4, 2, 37, 37, 16, True), _attention_case(1, 4, 2, 1, 300, 16, False),
              _softmax_case(7, 33), _block_case(1, 9, 32, 2),
              _llama_block_case("tiny", 1, 13, 48, 3, 1, 16, 72)]
    if not quick:
        cases.append(_attention_case(1, 1, 1, 150, 150, 16, True))
    return cases


def scaled_cases() -> list[Case]:
    """Real sizes: the benchmarks' GPU shapes (H200, bf16)."""
    return [*(_norm_case(op, 4096, 4096) for op in ("layer_norm", "add_layer_norm", "rms_norm",
                                                    "add_rms_norm")),
            _linear_case("linear_gelu", 8192, 1024, 4096), _linear_case("linear_relu", 8192, 1024, 4096),
            _swiglu_case(8192, 2048, 8192), _rotary_case(4, 2048, 32, 8, 128),
            _attention_case(4, 16, 16, 2048, 2048, 64, False),
            _attention_case(4, 16, 16, 2048, 2048, 64, True),
            _attention_case(4, 16, 4, 2048, 2048, 64, True),
            _attention_case(1, 32, 8, 1, 4096, 128, False),
            _softmax_case(4096, 4096), _block_case(1, 2048, 1024, 16),
            *(_llama_block_case(*size, rope_theta=theta) for *size, theta in LLAMA_SIZES)]


# (model, batch, seq, d_model, heads, kv heads, head dim, d_ff, rope theta) of the scaled table
LLAMA_SIZES = [("SmolLM2-135M", 1, 2048, 576, 9, 3, 64, 1536, 100000.0),
               ("Llama-3-8B", 1, 2048, 4096, 32, 8, 128, 14336, 500000.0)]
BLOCK_OPS = ("transformer_block", "llama_block")
# Issue 21's goals for a block against eager, forward and backward (the scaled table).
GOALS = {"launch_ratio": 0.6, "bytes_ratio": 0.25}


# ------------------------------------------------------------------------------------------------
# Counting one (case, mode, provider)
# ------------------------------------------------------------------------------------------------


def _floating(outputs) -> list[torch.Tensor]:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.requires_grad]


@contextlib.contextmanager
def _real_outputs():
    """Kernel outputs as plain ``torch.empty`` even under the tests' NaN poisoning (a test aid,
    not traffic)."""
    saved, kernel_utils.POISON_OUTPUTS = kernel_utils.POISON_OUTPUTS, False
    try:
        yield
    finally:
        kernel_utils.POISON_OUTPUTS = saved


def _gpu_plans():
    """Launch plans of a GPU (an H200's SMs) for the kernels whose plans depend on it; the copy
    engine stays as the interpreter has it, so the counted loads and stores are the pointer path's
    for attention."""
    return kernel_device.pretend(dataclasses.replace(kernel_device.INTERPRETER, sms=H200_SMS))


_TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """PyTorch's SDPA on meta tensors as its fused kernel: on the meta device
    ``F.scaled_dot_product_attention`` takes the math backend (the N x N scores written, read
    and soft-maxed), which no GPU run of PyTorch takes; routed to
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (what the counted table's CPU run
    takes) it counts as one launch reading q, k, v (and a mask) and writing out and lse, its
    backward one launch reading q, k, v, out, dout, lse and writing dq, dk, dv: the ideal of a
    fused attention kernel (on a GPU FlashAttention's backward adds a preprocess launch)."""
    if not query.is_meta:
        return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale,
                           enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _meta_sdpa_fused():
    """``F.scaled_dot_product_attention`` is ``_fused_sdpa`` for the duration (the module global
    that ``F.multi_head_attention_forward`` and transformers' SDPA attention call)."""
    from unittest import mock

    return mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa)


def _prepare(inputs: tuple, grad_inputs: tuple[int, ...] | None, params) -> tuple[tuple, list]:
    wanted = range(len(inputs)) if grad_inputs is None else grad_inputs
    inputs = tuple(t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs))
    return inputs, [t for t in inputs if t.requires_grad] + [p for p in params if p.requires_grad]


def count(fn: Callable, inputs: tuple, mode: str, *, dry: bool = False,
          grad_inputs: tuple[int, ...] | None = None,
          params: tuple[torch.Tensor, ...] = ()) -> Tally:
    """The tally of ``fn(*inputs)``'s forward (``mode="fwd"``) or of its backward alone (``"bwd"``)
    with respect to the inputs at ``grad_inputs`` (None: all) and ``params`` (a module's
    parameters: the weight gradients of a training step). ``dry``: Triton launches are priced
    by their formulas, not run (meta tensors), and PyTorch's SDPA counts as its fused kernel
    (``_fused_sdpa``)."""
    inputs, differentiable = _prepare(inputs, grad_inputs, params)
    counter = (Counter(execute=False, formula=kernel_traffic, overrides=GPU_BLOCKS) if dry
               else Counter())
    with _real_outputs(), (_gpu_plans() if dry else contextlib.nullcontext()), (
            _meta_sdpa_fused() if dry else contextlib.nullcontext()):
        if mode == "fwd":
            with counter:
                fn(*inputs)
            return counter.tally
        outputs = _floating(fn(*inputs))
        grads = [torch.randn_like(t) for t in outputs]
        with counter:
            torch.autograd.grad(outputs, differentiable, grads, allow_unused=True)
        return counter.tally


# ------------------------------------------------------------------------------------------------
# torch.compile: the kernels inductor generates, counted from its scheduler
# ------------------------------------------------------------------------------------------------


def _inductor_tally(graph) -> Tally:
    """One inductor graph's kernels: every scheduler node after fusion that launches (a fused
    kernel, or an extern kernel such as mm / addmm / bmm / SDPA; not a no-op or the
    ``MultiOutput`` that names one output of a multi-output kernel), its bytes inductor's own
    count of the buffers it reads and writes (``get_read_buffer_sizes`` /
    ``get_write_buffer_sizes``: each buffer once, an extern matmul's ideal)."""
    from torch._inductor import ir
    from torch._inductor import scheduler as inductor_scheduler
    from torch._inductor.utils import get_fused_kernel_name

    tally = Tally()
    for node in graph.scheduler.nodes:
        if isinstance(node, inductor_scheduler.NopKernelSchedulerNode) or isinstance(
                getattr(node, "node", None), ir.MultiOutput):
            continue
        if isinstance(node, inductor_scheduler.ExternKernelSchedulerNode):
            name = node.node.python_kernel_name or type(node.node).__name__
            name = name.replace("torch.ops.", "").replace(".default", "")
        else:
            name = "inductor." + get_fused_kernel_name(node.get_nodes(), "original_aten")
        tally.add(name, int(node.get_read_buffer_sizes()), int(node.get_write_buffer_sizes()), 1)
    return tally


def compile_count(fn: Callable, inputs: tuple, *, grad_inputs: tuple[int, ...] | None = None,
                  params: tuple[torch.Tensor, ...] = ()) -> dict[str, Tally]:
    """``{"fwd": Tally, "bwd": Tally}`` of ``torch.compile(fn)`` (inductor, ``fullgraph``,
    static shapes): AOTAutograd's split of the training graph, the forward (which writes what the
    backward saves) and the backward (gradients of the inputs at ``grad_inputs`` and of
    ``params``), each lowered and scheduled by inductor for the inputs' device and counted by
    ``_inductor_tally``. Nothing is compiled to machine code or run: the generated wrapper is
    replaced by one returning uninitialised outputs of the graph's shapes, so any size costs only
    the tracing, lowering and fusion. On a CPU inductor generates C++ kernels: their fusion is the
    proxy counted for its GPU (Triton) fusion."""
    import types
    from unittest import mock

    import torch._inductor.config as inductor_config
    from torch._inductor.graph import GraphLowering

    tallies: dict[str, Tally] = {}

    def lowered(graph, wrapper_code):
        tallies["bwd" if graph.is_backward else "fwd"] = _inductor_tally(graph)
        output = next(n for n in graph.module.graph.nodes if n.op == "output")
        values = [o.meta.get("val") if isinstance(o, torch.fx.Node) else o
                  for o in output.args[0]]

        def call(args):
            args.clear()
            return [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                    if isinstance(v, torch.Tensor) else v for v in values]

        return types.SimpleNamespace(call=call, runner=None,
                                     __file__="<benchmarks.traffic: not compiled>")

    inputs, differentiable = _prepare(inputs, grad_inputs, params)
    torch._dynamo.reset()
    with mock.patch.object(GraphLowering, "_compile_to_module_lines", lowered), \
            inductor_config.patch(fx_graph_cache=False, force_disable_caches=True), \
            _real_outputs():
        compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=False)
        outputs = _floating(compiled(*inputs))
        torch.autograd.grad(outputs, differentiable, [torch.empty_like(t) for t in outputs],
                            allow_unused=True)
    torch._dynamo.reset()
    return tallies


def _record(case: Case, mode: str, provider: str, dtype: torch.dtype, tally: Tally) -> dict:
    return {"op": case.op, "case": case.case, "shape": case.shape, "dtype": str(dtype)[6:],
            "mode": mode, "provider": provider, "bytes_read": tally.read,
            "bytes_written": tally.written, "launches": tally.launches}


def softmax_design(m: int, n: int, itemsize: int, mode: str) -> tuple[int, int, int]:
    """(read, written, launches) of lightllm's CUDA softmax by its design (csrc/softmax_kernels.cuh):
    rows that fit shared memory (n <= 48 KiB / 4 B) are read once and written once (backward: y
    and dy read, dx written), one launch; longer rows take the split path, which reads its inputs
    twice over two launches."""
    split = n * 4 > 48 * 1024
    reads = (1 if mode == "fwd" else 2) * (2 if split else 1)
    return reads * m * n * itemsize, m * n * itemsize, 2 if split else 1


def _softmax_records(case: Case, dtype: torch.dtype, scaled: bool) -> list[dict]:
    out = []
    for mode in case.modes:
        read, written, launches = softmax_design(case.shape["M"], case.shape["N"], dtype.itemsize,
                                                 mode)
        rec = {"op": case.op, "case": case.case, "shape": case.shape, "dtype": str(dtype)[6:],
               "mode": mode, "provider": "lightllm", "bytes_read": read, "bytes_written": written,
               "launches": launches}
        reason = ("lightllm's softmax is a CUDA C++ kernel (lightllm._C) that Triton's "
                  "interpreter cannot run: traffic of its design, csrc/softmax_kernels.cuh")
        if scaled:
            rec.update(exact=False, formula=softmax_design.__doc__.split(":")[0] + ": " + reason)
        else:
            rec.update(per_kernel={}, counted=False, note=reason)
        out.append(rec)
    return out


_FORMULA_TEXT = {
    "lightllm": ("aten ops counted on meta tensors; each Triton launch priced by its kernel's "
                 "formula (KERNEL_FORMULAS: {kernels}), the formulas the counted launches "
                 "confirm launch by launch"),
    "eager": "every aten op counted on meta tensors at this shape (inputs read, outputs written)",
    "torch": "every aten op counted on meta tensors at this shape (inputs read, outputs written)",
}


# PyTorch's SDPA on meta tensors would take its math backend; _FusedSDPA counts the fused kernel
# PyTorch takes on a GPU (and on the CPU of the counted table) by its ideal.
_META_SDPA = ("; F.scaled_dot_product_attention counted as its fused kernel (benchmarks.traffic."
              "_fused_sdpa: one launch, q, k, v in, out and lse out; backward one launch): the "
              "ideal of the fused kernel PyTorch takes on a GPU, not a count of it")


_COMPILE_TEXT = ("torch.compile (inductor, fullgraph, static shapes) of the eager provider, "
                 "counted from inductor's scheduler after fusion for a CPU device: each fused C++ "
                 "kernel (the proxy of its GPU fusion) and each extern kernel (mm/addmm/bmm, SDPA) "
                 "one launch, bytes inductor's own count of the buffers each reads and writes; "
                 "forward and backward are AOTAutograd's split; not compiled or run")


def _params(case: Case, provider: str) -> tuple[torch.Tensor, ...]:
    module = case.modules.get(provider)
    return tuple(module.parameters()) if module is not None else ()


def _count_case(case: Case, dtype: torch.dtype, device: str, compiled: bool) -> list[tuple]:
    """(mode, provider, tally, exact note) of every count of one case."""
    dry = device == "meta"
    out = []
    if compiled and case.compiled is not None:
        inputs = case.make("cpu", dtype)
        tallies = compile_count(case.providers[case.compiled], inputs,
                                grad_inputs=case.grad_inputs, params=_params(case, case.compiled))
        out += [(mode, "compile", tallies[mode]) for mode in case.modes]
    for mode in case.modes:
        for provider, fn in case.providers.items():
            inputs = case.make(device, dtype)
            out.append((mode, provider, count(fn, inputs, mode, dry=dry,
                                              grad_inputs=case.grad_inputs,
                                              params=_params(case, provider))))
    return out


def _matmul_ideal_bytes(tally: Tally) -> int:
    """Bytes read + written with lightllm's matmul launches at their ideal (``matmul_ideal``),
    every other launch as counted: the figure comparable with eager's and compile's aten
    matmuls, which count each operand once."""
    total = tally.read + tally.written
    for launch in tally.triton_launches:
        ideal = matmul_ideal(launch)
        if ideal is not None:
            total += sum(ideal) - launch.read - launch.written
    return total


def run(out_dir: str | os.PathLike | None = None, quick: bool = False,
        compiled: bool = True) -> dict:
    """Count everything, scale to real sizes, and write ``traffic.json`` and ``traffic.md`` to
    ``out_dir`` (when given). ``compiled``: add the torch.compile records of the blocks. Returns
    the JSON dict."""
    torch.manual_seed(0)
    counted, scaled = [], []
    for case in counted_cases(quick):
        if case.op == "softmax":
            counted += _softmax_records(case, COUNTED_DTYPE, scaled=False)
        for mode, provider, tally in _count_case(case, COUNTED_DTYPE, "cpu", compiled):
            rec = _record(case, mode, provider, COUNTED_DTYPE, tally)
            rec.update(per_kernel=tally.per_kernel, counted=True)
            if provider == "compile":
                rec["note"] = _COMPILE_TEXT
            counted.append(rec)
    for case in scaled_cases():
        if case.op == "softmax":
            scaled += _softmax_records(case, SCALED_DTYPE, scaled=True)
        for mode, provider, tally in _count_case(case, SCALED_DTYPE, "meta", compiled):
            rec = _record(case, mode, provider, SCALED_DTYPE, tally)
            if provider == "compile":
                formula, exact = _COMPILE_TEXT, True
            else:
                kernels = ", ".join(sorted({launch.kernel for launch in tally.triton_launches}))
                formula = _FORMULA_TEXT[provider].format(kernels=kernels)
                exact = not any(k.startswith("aten._scaled_dot_product_flash_attention_for_cpu")
                                for k in tally.per_kernel)
                if not exact:
                    formula += _META_SDPA
            rec.update(exact=exact, formula=formula, per_kernel=tally.per_kernel)
            if provider == "lightllm" and case.op in BLOCK_OPS:
                rec["bytes_matmul_ideal"] = _matmul_ideal_bytes(tally)
            scaled.append(rec)
    traffic = {
        "environment": {
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "counted_dtype": str(COUNTED_DTYPE)[6:], "scaled_dtype": str(SCALED_DTYPE)[6:],
            "sms": H200_SMS, "gpu_blocks": GPU_BLOCKS, "goals": GOALS,
        },
        "counted": counted, "scaled": scaled,
        "ratios": _ratios("counted", counted) + _ratios("scaled", scaled),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "traffic.json").write_text(json.dumps(traffic, indent=1) + "\n")
        (out / "traffic.md").write_text(markdown(traffic))
    return traffic


def _ratios(table: str, records: list[dict]) -> list[dict]:
    """provider / baseline of bytes (read + written) and launches: every provider against eager,
    and lightllm against compile where a compile record exists."""
    by_key = {(r["op"], r["case"], r["mode"], r["provider"]): r for r in records}
    out = []
    for r in records:
        for baseline in ("eager", "compile"):
            base = by_key.get((r["op"], r["case"], r["mode"], baseline))
            if base is None or r["provider"] in ("eager", baseline) or (
                    baseline == "compile" and r["provider"] != "lightllm"):
                continue
            moved = r["bytes_read"] + r["bytes_written"]
            base_moved = base["bytes_read"] + base["bytes_written"]
            out.append({"table": table, "op": r["op"], "case": r["case"], "mode": r["mode"],
                        "provider": r["provider"], "baseline": baseline,
                        "bytes_ratio": moved / base_moved if base_moved else math.nan,
                        "launch_ratio": (r["launches"] / base["launches"] if base["launches"]
                                         else math.nan)})
    return out


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _table(traffic: dict, table: str) -> list[str]:
    ratios = {(r["op"], r["case"], r["mode"], r["provider"]): r for r in traffic["ratios"]
              if r["table"] == table and r.get("baseline", "eager") == "eager"}
    lines = ["| op | case | mode | provider | read | written | launches | bytes / eager | "
             "launches / eager |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in traffic[table]:
        ratio = ratios.get((r["op"], r["case"], r["mode"], r["provider"]))
        flag = "" if r.get("counted", r.get("exact", True)) else " *"
        cells = [r["op"], r["case"], r["mode"], r["provider"] + flag, _size(r["bytes_read"]),
                 _size(r["bytes_written"]), str(r["launches"]),
                 f"{ratio['bytes_ratio']:.2f}" if ratio else "",
                 f"{ratio['launch_ratio']:.2f}" if ratio else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _block_table(traffic: dict, table: str) -> list[str]:
    """Per block and mode: launches and bytes of lightllm, eager and compile, lightllm / eager and
    lightllm / compile, and (scaled table) whether the block goals against eager are met
    (launches <= 0.6x, bytes <= 0.25x)."""
    records = {(r["op"], r["case"], r["mode"], r["provider"]): r for r in traffic[table]
               if r["op"] in BLOCK_OPS}
    ratios = {(r["op"], r["case"], r["mode"], r["baseline"]): r for r in traffic["ratios"]
              if r["table"] == table and r["op"] in BLOCK_OPS and r["provider"] == "lightllm"}
    goals = traffic["environment"].get("goals", GOALS)
    lines = ["| block | mode | launches lightllm / eager / compile | lightllm ÷ eager | "
             "lightllm ÷ compile | bytes lightllm / eager / compile | lightllm ÷ eager | "
             "lightllm ÷ compile | lightllm bytes, matmuls at ideal: ÷ eager / ÷ compile | "
             "goals (launches ≤ "
             f"{goals['launch_ratio']}x, bytes ≤ {goals['bytes_ratio']}x eager) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    cases = dict.fromkeys((op, case, mode) for op, case, mode, _ in records)
    for op, case, mode in cases:
        row = [records.get((op, case, mode, p)) for p in ("lightllm", "eager", "compile")]
        eager, compile_ = (ratios.get((op, case, mode, b)) for b in ("eager", "compile"))

        def ratio(r, key):
            return f"{r[key]:.2f}" if r else "—"

        launches = " / ".join(str(r["launches"]) if r else "—" for r in row)
        moved = " / ".join(_size(r["bytes_read"] + r["bytes_written"]) if r else "—" for r in row)
        met = "—"
        if table == "scaled" and eager:
            met = ", ".join(f"{what} {'met' if eager[key] <= goals[key] else 'not met'}"
                            for what, key in (("launches", "launch_ratio"),
                                              ("bytes", "bytes_ratio")))
        ideal = "—"
        if row[0] and "bytes_matmul_ideal" in row[0]:
            ideal = " / ".join(f"{row[0]['bytes_matmul_ideal'] / (r['bytes_read'] + r['bytes_written']):.2f}"
                               if r else "—" for r in row[1:])
        label = f"{'GPT-2' if op == 'transformer_block' else 'Llama'} {case}"
        lines.append(f"| {label} | {mode} | {launches} | {ratio(eager, 'launch_ratio')} | "
                     f"{ratio(compile_, 'launch_ratio')} | {moved} | {ratio(eager, 'bytes_ratio')}"
                     f" | {ratio(compile_, 'bytes_ratio')} | {ideal} | {met} |")
    return lines


def _block_kernels(traffic: dict) -> list[str]:
    """Where lightllm's block launches and bytes go at real sizes, per kernel, largest first."""
    lines = []
    for r in traffic["scaled"]:
        if r["op"] not in BLOCK_OPS or r["provider"] != "lightllm" or "per_kernel" not in r:
            continue
        total = r["bytes_read"] + r["bytes_written"]
        kernels = sorted(r["per_kernel"].items(),
                         key=lambda kv: -(kv[1]["bytes_read"] + kv[1]["bytes_written"]))
        cells = [f"{name} {k['launches']}x {_size(k['bytes_read'] + k['bytes_written'])}"
                 f" ({(k['bytes_read'] + k['bytes_written']) / total:.0%})"
                 for name, k in kernels]
        lines.append(f"- {r['op']} {r['case']} {r['mode']} ({r['launches']} launches, "
                     f"{_size(total)}): " + "; ".join(cells))
    return lines


def markdown(traffic: dict) -> str:
    """The block summary (lightllm vs eager vs torch.compile, the block goals), the counted
    table (tiny shapes) and the scaled table (real sizes), with lightllm / eager ratios of bytes
    (read + written) and launches; ``*`` marks figures not counted (softmax's CUDA kernel, from
    its design; PyTorch's SDPA on meta tensors, as its fused kernel's ideal)."""
    env = traffic["environment"]
    return "\n".join([
        "## Memory traffic and kernel launches",
        "",
        f"Counted on tiny shapes in {env['counted_dtype']} (lightllm's Triton kernels in the "
        "interpreter, every provider's aten ops by a dispatch mode); scaled to real sizes in "
        f"{env['scaled_dtype']} on meta tensors with the kernels' formulas ({env['sms']} SMs, "
        "attention blocks of the GPU default configs). `*`: not counted (softmax's CUDA kernel: "
        "its design; PyTorch's SDPA on meta tensors: its fused kernel's ideal). Backward: "
        "gradients of the inputs and, for the blocks, of every parameter. `compile`: "
        "torch.compile's inductor kernels, counted from its scheduler for a CPU device (C++ "
        "kernels as the proxy of its GPU fusion; extern matmuls and SDPA one launch each at their "
        "ideal bytes). torch "
        f"{env['torch']}, triton {env['triton']}, {env['date']}.",
        "",
        "### Blocks: lightllm vs eager vs torch.compile (real sizes)",
        "",
        *_block_table(traffic, "scaled"),
        "",
        "Where lightllm's block goes (real sizes), per kernel, largest bytes first:",
        "",
        *_block_kernels(traffic),
        "",
        "### Blocks at the counted (tiny) shapes",
        "",
        *_block_table(traffic, "counted"),
        "",
        "### Counted (tiny shapes)",
        "",
        *_table(traffic, "counted"),
        "",
        "### Scaled (real sizes)",
        "",
        *_table(traffic, "scaled"),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for traffic.json and traffic.md")
    parser.add_argument("--quick", action="store_true", help="skip the larger counted cases")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile records of the blocks")
    args = parser.parse_args(argv)
    traffic = run(args.out, args.quick, compiled=not args.no_compile)
    print(markdown(traffic))
    return 0


if __name__ == "__main__":
    sys.exit(main())
