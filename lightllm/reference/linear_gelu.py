"""Eager references for linear + GeLU and the GeLU feed-forward.

``linear_gelu``/``feed_forward`` are the user-level semantics in plain PyTorch (the "eager" baseline
of the benchmarks, and in float64 the oracle of the tests). ``linear_gelu_fwd``, ``linear_fwd``,
``matmul_gelu_grad`` and ``gelu_bwd`` return exactly what the Triton launchers of
``lightllm.kernels.linear_gelu`` return, for the dispatch fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_gelu(x, weight, bias=None, approximate: str = "none"):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def feed_forward(x, w1, b1, w2, b2, approximate: str = "none", residual=None):
    y = F.linear(F.gelu(F.linear(x, w1, b1), approximate=approximate), w2, b2)
    return y if residual is None else y + residual


def linear_gelu_fwd(x, weight, bias, approximate: str, save_pre: bool):
    """Mirror of ``lightllm.kernels.linear_gelu.linear_gelu_fwd``."""
    pre = F.linear(x, weight, bias)
    return F.gelu(pre, approximate=approximate), (pre if save_pre else None)


def linear_fwd(x, weight, bias, residual):
    """Mirror of ``lightllm.kernels.linear_gelu.linear_fwd``."""
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def matmul_gelu_grad(dy, w2, pre, approximate: str):
    """Mirror of ``lightllm.kernels.linear_gelu.matmul_gelu_grad``."""
    return torch.ops.aten.gelu_backward(dy @ w2, pre, approximate=approximate)


def gelu_bwd(dy, pre, approximate: str, need_db: bool):
    """Mirror of ``lightllm.kernels.linear_gelu.gelu_bwd`` (db in fp32)."""
    dpre = torch.ops.aten.gelu_backward(dy, pre, approximate=approximate)
    return dpre, (dpre.sum(0, dtype=torch.float32) if need_db else None)
