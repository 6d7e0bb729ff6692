"""Eager references for linear + activation and the feed-forward.

``linear_gelu``/``linear_relu``/``feed_forward`` are the user-level semantics in plain PyTorch (the
"eager" baseline of the benchmarks, and in float64 the oracle of the tests). ``linear_act_fwd``,
``linear_fwd``, ``matmul_act_grad`` and ``act_bwd`` return exactly what the Triton launchers of
``lightllm.kernels.fused_linear`` return, for the dispatch fallback. Activations are named as in
``lightllm.kernels.fused_linear.ACTIVATIONS``: "gelu", "gelu_tanh", "relu".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activate(x, activation: str):
    if activation == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")


def activation_backward(dy, pre, activation: str):
    if activation == "relu":
        return torch.ops.aten.threshold_backward(dy, pre, 0)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(dy, pre, approximate=approximate)


def linear_gelu(x, weight, bias=None, approximate: str = "none"):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def linear_relu(x, weight, bias=None):
    return F.relu(F.linear(x, weight, bias))


def feed_forward(x, w1, b1, w2, b2, approximate: str = "none", residual=None,
                 activation: str = "gelu"):
    h = F.linear(x, w1, b1)
    h = F.relu(h) if activation == "relu" else F.gelu(h, approximate=approximate)
    y = F.linear(h, w2, b2)
    return y if residual is None else y + residual


def linear_act_fwd(x, weight, bias, activation: str, save_pre: bool):
    """Mirror of ``lightllm.kernels.fused_linear.linear_act_fwd``."""
    pre = F.linear(x, weight, bias)
    return activate(pre, activation), (pre if save_pre else None)


def linear_fwd(x, weight, bias, residual):
    """Mirror of ``lightllm.kernels.fused_linear.linear_fwd``."""
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def matmul_act_grad(dy, w2, pre, activation: str):
    """Mirror of ``lightllm.kernels.fused_linear.matmul_act_grad``."""
    return activation_backward(dy @ w2, pre, activation)


def act_bwd(dy, pre, activation: str, need_db: bool):
    """Mirror of ``lightllm.kernels.fused_linear.act_bwd`` (db in fp32)."""
    dpre = activation_backward(dy, pre, activation)
    return dpre, (dpre.sum(0, dtype=torch.float32) if need_db else None)
