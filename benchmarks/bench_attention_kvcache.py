"""Attention over a KV cache: ``flash_attn_with_kvcache`` (kernels/attention_kvcache.py).

One decode step of a ragged batch (each sequence its own length, one new token appended in
place) through ``flash_attn_with_kvcache`` over a paged cache (pages of 16 / 64 / 256, shuffled
as a long-running allocator leaves them) and over a dense
``(B, max_len, Hkv, D)`` cache, against SDPA over the padded ``(B, Hkv, Lmax, D)`` cache with a
key mask (PyTorch's, and lightllm's split-KV decode kernel on a GPU). Bytes count the keys each
sequence really has. CPU: SmolLM2's heads (9 : 3, head dim 64), 16 sequences of 50-600 keys,
fp32 (the engine's decode step); GPU: 32 : 8 heads of 128, 16 sequences of 256-8192 keys, bf16.

    python -m benchmarks --ops attention_kvcache
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lightllm.functional as LF
from benchmarks.harness import HAS_CUDA, Case

OPS = ("attention_kvcache",)  # the op names of its cases


def _kvcache_case(lengths: list[int], heads: int, kv_heads: int, d: int, page: int,
                  dtype: torch.dtype) -> Case:
    """A decode step of ``len(lengths)`` sequences (each appends one token at its length)."""
    b, lmax = len(lengths), max(lengths) + 1

    def make(device):
        gen = torch.Generator().manual_seed(0)
        blocks = -(-lmax // page)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device, dtype)

        q, k, v = rand(b, 1, heads, d), rand(b, 1, kv_heads, d), rand(b, 1, kv_heads, d)
        k_pages, v_pages = rand(b * blocks, page, kv_heads, d), rand(b * blocks, page, kv_heads, d)
        table = torch.randperm(b * blocks, generator=gen).view(b, blocks).int().to(device)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        k_dense, v_dense = rand(b, lmax, kv_heads, d), rand(b, lmax, kv_heads, d)
        k_pad, v_pad = rand(b, kv_heads, lmax, d), rand(b, kv_heads, lmax, d)
        keep = torch.arange(lmax, device=device)[None, :] <= seqlens[:, None]
        return (q, k, v, seqlens, k_pages, v_pages, table, k_dense, v_dense, k_pad, v_pad,
                keep[:, None, None, :])

    def paged(q, k, v, seqlens, k_pages, v_pages, table, *_):
        return LF.flash_attn_with_kvcache(q, k_pages, v_pages, k, v, seqlens, table)

    def dense(q, k, v, seqlens, _kp, _vp, _t, k_dense, v_dense, *_):
        return LF.flash_attn_with_kvcache(q, k_dense, v_dense, k, v, seqlens)

    def padded(sdpa):
        def run(q, k, v, seqlens, _kp, _vp, _t, _kd, _vd, k_pad, v_pad, keep):
            # the padded cache's write of the new token (at the end, as a stand-in), then SDPA
            k_pad[:, :, -1:] = k.transpose(1, 2)
            v_pad[:, :, -1:] = v.transpose(1, 2)
            return sdpa(q.transpose(1, 2), k_pad, v_pad, attn_mask=keep, enable_gqa=True)
        return run

    provs = {"torch-padded": padded(F.scaled_dot_product_attention)}
    if HAS_CUDA:
        provs["lightllm-padded"] = padded(LF.scaled_dot_product_attention)
    provs.update({"lightllm-dense": dense, "lightllm": paged})
    keys = sum(lengths) + b
    elems = 2 * kv_heads * keys * d + 2 * b * heads * d
    label = (f"B{b} H{heads}/{kv_heads} keys {min(lengths)}-{max(lengths)} D{d} page {page} "
             f"{str(dtype).removeprefix('torch.')}")
    return Case(
        op="attention_kvcache", label=label,
        params={"B": b, "H": heads, "H_kv": kv_heads, "keys": keys, "D": d, "page": page},
        make_inputs=make, providers=provs, modes=("fwd",),
        bytes={"fwd": elems * dtype.itemsize}, flops={"fwd": 4.0 * heads * keys * d},
        dtype=dtype, x="page", series=f"B{b} H{heads}/{kv_heads} D{d}",
    )


def _mixed(n: int, lo: int, hi: int) -> list[int]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()


def build_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the engine's decode step on the CPU path
        return [_kvcache_case(_mixed(16, 50, 600), 9, 3, 64, page, torch.float32)
                for page in (16, 64, 256)]
    pages = (16, 256) if quick else (16, 64, 256)
    return [_kvcache_case(_mixed(16, 256, 8192), 32, 8, 128, page, torch.bfloat16)
            for page in pages]
