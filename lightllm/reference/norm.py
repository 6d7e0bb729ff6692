"""Eager references for LayerNorm, RMSNorm and their Add & Norm.

The user-level semantics written as plain tensor ops: the "eager" baseline of the benchmarks, in
float64 the oracle of the tests, and what runs where the kernels cannot (autograd by PyTorch).
``cast_before_weight`` is Hugging Face LlamaRMSNorm's casting order (the normalised value rounded
to the input dtype, then times the weight); without it the weight multiplies in fp32 and the
product is rounded once, as ``F.rms_norm`` does.
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


def rms_norm(x, normalized_shape, weight=None, eps=None, cast_before_weight: bool = False):
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    if eps is None:
        eps = torch.finfo(xf.dtype).eps
    y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    if weight is None:
        return y.to(x.dtype)
    if cast_before_weight:
        return weight * y.to(x.dtype)
    return (y * weight).to(x.dtype)


def add_rms_norm(x, residual, normalized_shape, weight=None, eps=None,
                 cast_before_weight: bool = False):
    s = x + residual
    return rms_norm(s, normalized_shape, weight, eps, cast_before_weight), s
