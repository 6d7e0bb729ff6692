"""Eager references for LayerNorm and Add & Norm.

The user-level semantics written as plain tensor ops: the "eager" baseline of the benchmarks, in
float64 the oracle of the tests, and what runs where the kernels cannot (autograd by PyTorch).
"""

from __future__ import annotations

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    mean = xf.mean(dims, keepdim=True)
    var = (xf - mean).pow(2).mean(dims, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def add_layer_norm(x, residual, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    s = x + residual
    return layer_norm(s, normalized_shape, weight, bias, eps), s

