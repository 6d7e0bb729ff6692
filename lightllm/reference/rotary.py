"""Eager reference for the rotary position embedding (RoPE) and its cos/sin tables.

transformers' ``apply_rotary_pos_emb`` (the partial-rotary form of GPT-NeoX / Phi: the leading
``R = cos.shape[-1]`` dims of each head rotate, the trailing ``D - R`` pass through) written as plain
tensor ops: the "eager" baseline of the benchmarks, in float64 the oracle of the tests, and what runs
for float64 inputs (autograd by PyTorch). The outputs take q's dtype.
"""

from __future__ import annotations

import torch


def rotate_half(x):
    """``cat(-x2, x1)`` of the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]

    def rotate(x):
        rot, passed = x[..., :rotary_dim], x[..., rotary_dim:]
        y = (rot * cos + rotate_half(rot) * sin).to(x.dtype)
        return torch.cat((y, passed), dim=-1) if passed.shape[-1] else y

    return rotate(q), rotate(k)


def rotary_cos_sin(positions, dim: int, base: float = 10000.0, dtype=torch.float32):
    """cos, sin of shape ``positions.shape + (dim,)`` exactly as transformers'
    ``LlamaRotaryEmbedding`` (default rope type) computes them: fp32, then cast to ``dtype``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
