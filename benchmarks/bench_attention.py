"""Scaled dot-product attention: forward, backward and both; head dim 64 and 128; sequence
512 ... 16384; causal and not; GQA.

Work (FlashAttention's convention): forward 4·B·H·Nq·Nk·D FLOPs, halved under ``is_causal``;
backward 2.5x the forward; forward+backward 3.5x. Matmul-bound, so figures are TFLOP/s and % of the
measured bf16 matmul rate. Batch x sequence is held at 16k tokens and heads x head dim at 2048
(B = 16384 / N, H = 2048 / D), so every case carries the same number of tokens.

Providers: "eager" (the reference: the N x N score matrix in memory), "torch-flash",
"torch-efficient", "torch-cudnn", "torch-math" (``F.scaled_dot_product_attention`` pinned to one
backend with ``torch.nn.attention.sdpa_kernel``; a backend that cannot serve a case is reported as an
error row), "compile" (torch.compile of the reference), "lightllm" (its autotuner choosing among
the pointer and, on Hopper, the TMA configs), "lightllm-pointer" (CUDA: the pointer configs alone,
without tensor descriptors), and the peers "flash-attn" and "xformers"
(``benchmarks/peers.py``; listed as not installed when missing). The O(N²)-memory
providers (eager, compile, torch-math) are left out above 4096.

    python -m benchmarks --ops attention [--quick] [--providers lightllm,torch-flash]
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.kernels import _attention as common
from lightllm.reference import attention as reference

OPS = ("attention",)  # the op names of its cases

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = sdpa_kernel = None

TOKENS, WIDTH = 16384, 2048  # batch x sequence, heads x head dim
QUADRATIC_MAX_SEQ = 4096  # longest sequence given to providers that build the N x N matrix
TORCH_BACKENDS = {"torch-flash": "FLASH_ATTENTION", "torch-efficient": "EFFICIENT_ATTENTION",
                  "torch-cudnn": "CUDNN_ATTENTION", "torch-math": "MATH"}


def attention_flops(b: int, h: int, n_q: int, n_k: int, d: int, causal: bool) -> dict[str, float]:
    fwd = 4.0 * b * h * n_q * n_k * d * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}


def _torch_backend(name: str, causal: bool, gqa: bool):
    backend = getattr(SDPBackend, TORCH_BACKENDS[name], None) if SDPBackend else None

    def call(q, k, v):
        ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        with ctx:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return call


def providers(causal: bool, gqa: bool, seq: int) -> dict:
    def eager(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    quadratic = seq <= QUADRATIC_MAX_SEQ or not HAS_CUDA
    out = {"eager": eager} if quadratic else {}
    if HAS_CUDA:
        for name in TORCH_BACKENDS:
            if name != "torch-math" or quadratic:
                out[name] = _torch_backend(name, causal, gqa)
    else:  # PyTorch's CPU SDPA picks its own fused CPU kernel
        out["torch"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                      enable_gqa=gqa)
    if quadratic:
        out["compile"] = compiled(eager)
    def ours(q, k, v):
        return LF.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    out["lightllm"] = ours
    if HAS_CUDA:
        out["lightllm-pointer"] = _pointer_configs(ours)
    out.update(peers.attention_providers(causal))
    return out


def _pointer_configs(fn):
    """``fn`` with the TMA configs out of reach (no tensor descriptors are built)."""

    def call(*args):
        saved, common.TMA_MIN_WORK = common.TMA_MIN_WORK, float("inf")
        try:
            return fn(*args)
        finally:
            common.TMA_MIN_WORK = saved

    return call


def _case(seq: int, d: int, causal: bool, kv_group: int, dtype: torch.dtype, batch=None,
          heads=None) -> Case:
    b = batch or max(1, TOKENS // seq)
    h = heads or WIDTH // d
    h_kv = h // kv_group

    def make(device):
        q = torch.randn(b, h, seq, d, device=device, dtype=dtype)
        k = torch.randn(b, h_kv, seq, d, device=device, dtype=dtype)
        v = torch.randn(b, h_kv, seq, d, device=device, dtype=dtype)
        return q, k, v

    gqa = kv_group > 1
    label = (f"B{b} H{h}/{h_kv} N{seq} D{d} {'causal' if causal else 'full'} "
             f"{str(dtype).removeprefix('torch.')}")
    return Case(
        op="attention", label=label,
        params={"B": b, "H": h, "H_kv": h_kv, "N": seq, "D": d, "causal": causal},
        make_inputs=make, providers=providers(causal, gqa, seq),
        modes=("fwd", "bwd", "fwd+bwd"), grad_inputs=(0, 1, 2),
        flops=attention_flops(b, h, seq, seq, d, causal), dtype=dtype, x="N",
        series=f"D{d} H{h}/{h_kv} {'causal' if causal else 'full'}",
    )


def build_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the CPU path at the docs/design.md §5 CPU target shape
        return [_case(512, 64, c, 1, torch.float32, batch=4, heads=8) for c in (False, True)]
    dtype = torch.bfloat16
    if quick:
        return [_case(n, 128, c, 1, dtype) for n in (1024, 4096) for c in (False, True)] + [
            _case(4096, 64, True, 1, dtype), _case(4096, 128, True, 4, dtype)]
    cases = [_case(n, d, c, 1, dtype) for d in (64, 128) for c in (False, True)
             for n in (512, 1024, 2048, 4096, 8192, 16384)]
    cases += [_case(n, 128, c, 4, dtype) for c in (False, True) for n in (1024, 4096, 16384)]
    return cases
