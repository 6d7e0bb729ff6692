"""Attention decoding: 1 query token over a KV cache of 1k ... 32k keys (forward only).

lightllm serves these shapes with its split-KV kernel (kernels/attention_decode.py). Decoding is
bound by reading the cache, so figures are GB/s of ideal traffic — K and V once per kv head, plus q
and the output (2·B·Hkv·Nk·D + 2·B·Hq·D elements) — and % of the measured copy bandwidth; the FLOPs
(4·B·Hq·Nk·D) are small. Cases: batch 1 and 8, 32 query heads over 32 (MHA) or 8 (GQA) kv heads,
head dim 128, bf16.

Providers as in bench_attention: "eager", "torch-flash" / "torch-efficient" / "torch-cudnn" /
"torch-math", "compile", "lightllm", "flash-attn" when importable.

    python -m benchmarks --ops attention_decode [--quick]
"""

from __future__ import annotations

import torch

from benchmarks.bench_attention import providers
from benchmarks.harness import HAS_CUDA, Case

OPS = ("attention_decode",)  # the op names of its cases


def _case(batch: int, n_k: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype) -> Case:
    def make(device):
        q = torch.randn(batch, heads, 1, d, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, n_k, d, device=device, dtype=dtype)
        v = torch.randn(batch, kv_heads, n_k, d, device=device, dtype=dtype)
        return q, k, v

    elems = 2 * batch * kv_heads * n_k * d + 2 * batch * heads * d
    label = f"B{batch} H{heads}/{kv_heads} Nk{n_k} D{d} {str(dtype).removeprefix('torch.')}"
    return Case(
        op="attention_decode", label=label,
        params={"B": batch, "H": heads, "H_kv": kv_heads, "Nq": 1, "Nk": n_k, "D": d},
        make_inputs=make, providers=providers(False, kv_heads != heads, 1),
        modes=("fwd",), bytes={"fwd": elems * dtype.itemsize},
        flops={"fwd": 4.0 * batch * heads * n_k * d}, dtype=dtype, x="Nk",
        series=f"B{batch} H{heads}/{kv_heads} D{d}",
    )


def build_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the CPU path: one sequence, a 4k cache, GQA
        return [_case(1, 4096, 32, 8, 128, torch.float32)]
    dtype = torch.bfloat16
    lengths = (1024, 8192, 32768) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
    batches = (1,) if quick else (1, 8)
    return [_case(b, n, 32, kv, 128, dtype) for b in batches for kv in (32, 8) for n in lengths]
