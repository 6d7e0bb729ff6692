"""Rotary position embedding of q and k: forward and backward, prefill and decode shapes.

Ideal traffic (e = element size; B batch, S positions, H / Hkv query / key heads, D head dim, R
rotary dim): read q, k and write their rotations, 2·B·S·(H + Hkv)·D·e, plus the tables once per
position, 2·B·S·R·e; the backward moves the same. q and k are views of a fused qkv projection
(B, S, H, D) transposed to (B, H, S, D), as a Llama attention hands them over. Providers: lightllm,
transformers' apply_rotary_pos_emb (``torch_transformers``), the eager reference and torch.compile
of it.

    python -m benchmarks --ops rotary [--quick]
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.reference import rotary as reference

OPS = ("rotary_embedding",)  # the op names of its cases


def _providers():
    return {
        "eager": reference.rotary_embedding,
        "torch_transformers": apply_rotary_pos_emb,
        "compile": compiled(reference.rotary_embedding),
        "lightllm": LF.rotary_embedding,
        **peers.rotary_providers(),
    }


def _shapes(quick: bool):
    """(label, B, S, H, Hkv, D)."""
    if HAS_CUDA:
        shapes = [("llama-8b prefill", 4, 2048, 32, 8, 128), ("llama-8b decode", 64, 1, 32, 8, 128),
                  ("smollm2 prefill", 8, 1024, 9, 3, 64)]
        return shapes[:2] if quick else shapes
    return [("smollm2 prefill", 2, 512, 9, 3, 64), ("llama-8b prefill", 1, 256, 32, 8, 128),
            ("smollm2 decode", 8, 1, 9, 3, 64)]


def build_cases(quick: bool) -> list[Case]:
    dtypes = [torch.bfloat16] if HAS_CUDA else [torch.float32, torch.bfloat16]
    cases = []
    for (name, b, s, h, hkv, d), dtype in [(sh, dt) for sh in _shapes(quick) for dt in dtypes]:

        def make(device, b=b, s=s, h=h, hkv=hkv, d=d, dtype=dtype):
            qkv = torch.randn(b, s, (h + 2 * hkv) * d, device=device, dtype=dtype)
            q = qkv[..., : h * d].view(b, s, h, d).transpose(1, 2)
            k = qkv[..., h * d: (h + hkv) * d].view(b, s, hkv, d).transpose(1, 2)
            positions = torch.arange(s, device=device).expand(b, s) + 7
            return (q, k, *LF.rotary_cos_sin(positions, d, dtype=dtype))

        e = dtype.itemsize
        traffic = 2 * b * s * (h + hkv) * d * e + 2 * b * s * d * e
        cases.append(Case(
            op="rotary_embedding", label=f"{name} {b}x{s} {h}:{hkv}x{d} {str(dtype)[6:]}",
            params={"B": b, "S": s, "H": h, "Hkv": hkv, "D": d}, make_inputs=make,
            providers=_providers(), modes=("fwd", "bwd"), grad_inputs=(0, 1),
            bytes={"fwd": traffic, "bwd": traffic}, dtype=dtype, x="S",
            series=f"{name.split()[0]} {h}:{hkv}x{d}",
        ))
    return cases
