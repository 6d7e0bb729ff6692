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

``attention_varlen``: ``flash_attn_varlen_func`` on a packed batch of mixed lengths against
"torch-loop" (PyTorch's ``F.scaled_dot_product_attention`` once per sequence on views, outputs
concatenated: what a user without a varlen kernel writes); on CUDA also "lightllm-dense", the dense
kernel on the same tokens as (B, H, N, D) when every sequence has one length (equal total tokens:
the varlen overhead). Work counts only the visible (query, key) pairs. ``attention_window``
(CUDA): ``scaled_dot_product_attention(..., window_size=(W, -1))`` causal against the dense causal
kernel ("lightllm-dense") on the same inputs; TFLOP/s of both use the windowed work, so the ratio
of times is the gain from skipping tiles.

    python -m benchmarks --ops attention_varlen,attention_window
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

OPS = ("attention", "attention_varlen", "attention_window")  # the op names of its cases

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
    return _dense_cases(quick) + build_varlen_cases(quick)


def _dense_cases(quick: bool) -> list[Case]:
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


# ------------------------------------------------------------------------------------------------
# Variable-length batches and sliding windows
# ------------------------------------------------------------------------------------------------


def _visible_pairs(lq, lk, causal: bool, window=(-1, -1)) -> int:
    """(query, key) pairs the mask leaves visible, summed over the sequences."""
    return sum(int(reference.window_mask(a, b, window, causal).sum()) for a, b in zip(lq, lk)
               if a and b)


def _torch_loop(cu, causal: bool, gqa: bool):
    """PyTorch's SDPA once per sequence (host lengths), on views, outputs concatenated."""
    def call(q, k, v, cu_q, cu_k):
        outs = []
        for a, b in zip(cu[:-1], cu[1:]):
            out = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                                 v[a:b].transpose(0, 1), is_causal=causal,
                                                 enable_gqa=gqa)
            outs.append(out.transpose(0, 1))
        return torch.cat(outs)

    return call


def _varlen_case(lengths, h: int, h_kv: int, d: int, causal: bool, dtype, tag: str) -> Case:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    total, max_len = cu[-1], max(lengths)

    def make(device):
        q = torch.randn(total, h, d, device=device, dtype=dtype)
        k = torch.randn(total, h_kv, d, device=device, dtype=dtype)
        v = torch.randn(total, h_kv, d, device=device, dtype=dtype)
        cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
        return q, k, v, cu_t, cu_t

    def ours(q, k, v, cu_q, cu_k):
        return LF.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_len, max_len, causal=causal)

    provs = {"lightllm": ours, "torch-loop": _torch_loop(cu, causal, h != h_kv)}
    if HAS_CUDA and len(set(lengths)) == 1:
        b = len(lengths)

        def dense(q, k, v, cu_q, cu_k):  # the same tokens as (B, H, N, D) views
            def view(t):
                return t.view(b, max_len, t.shape[1], d).transpose(1, 2)
            out = LF.scaled_dot_product_attention(view(q), view(k), view(v), is_causal=causal,
                                                  enable_gqa=h != h_kv)
            return out.transpose(1, 2).reshape(total, h, d)

        provs["lightllm-dense"] = dense
    fwd = 4.0 * h * d * _visible_pairs(lengths, lengths, causal)
    label = (f"{tag} B{len(lengths)} T{total} H{h}/{h_kv} D{d} {'causal' if causal else 'full'} "
             f"{str(dtype).removeprefix('torch.')}")
    return Case(
        op="attention_varlen", label=label,
        params={"B": len(lengths), "T": total, "H": h, "H_kv": h_kv, "D": d, "causal": causal},
        make_inputs=make, providers=provs, modes=("fwd", "bwd", "fwd+bwd"), grad_inputs=(0, 1, 2),
        flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}, dtype=dtype, x="T",
        series=f"{tag} D{d} H{h}/{h_kv} {'causal' if causal else 'full'}",
    )


def _mixed_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()


def _window_case(seq: int, window: int, d: int, dtype) -> Case:
    b, h = max(1, TOKENS // seq), WIDTH // d

    def make(device):
        return tuple(torch.randn(b, h, seq, d, device=device, dtype=dtype) for _ in range(3))

    def ours(q, k, v):
        return LF.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=(window, -1))

    def dense(q, k, v):
        return LF.scaled_dot_product_attention(q, k, v, is_causal=True)

    fwd = 4.0 * b * h * d * _visible_pairs([seq], [seq], True, (window, -1))
    return Case(
        op="attention_window", label=f"B{b} H{h} N{seq} D{d} causal W{window} "
        f"{str(dtype).removeprefix('torch.')}",
        params={"B": b, "H": h, "N": seq, "D": d, "W": window},
        make_inputs=make, providers={"lightllm": ours, "lightllm-dense": dense},
        modes=("fwd", "bwd", "fwd+bwd"), grad_inputs=(0, 1, 2),
        flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}, dtype=dtype, x="N",
        series=f"D{d} causal W{window}",
    )


def build_varlen_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the CPU goal: 16-32 sequences of 16-512 tokens, fp32
        mixed = _mixed_lengths(24, 16, 512)
        return [_varlen_case(mixed, 9, 3, 64, c, torch.float32, "mixed") for c in (False, True)]
    dtype = torch.bfloat16
    cases = [_varlen_case([n] * (TOKENS // n), 16, 16, 128, c, dtype, "equal")
             for n in ((1024,) if quick else (512, 1024, 4096)) for c in (False, True)]
    cases += [_varlen_case(_mixed_lengths(32, 64, 1024), 16, 4, 128, True, dtype, "mixed")]
    windows = [(4096, 512)] if quick else [(2048, 256), (4096, 512), (16384, 1024)]
    cases += [_window_case(n, w, 128, dtype) for n, w in windows]
    return cases
