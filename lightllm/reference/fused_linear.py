"""Eager references of the fused-linear family: linear + activation, the feed-forward, the SwiGLU
projection and the SwiGLU feed-forward (Llama's MLP).

``linear_gelu``/``linear_relu``/``feed_forward``/``linear_swiglu``/``swiglu_feed_forward`` are the
user-level semantics in plain PyTorch (the "eager" baseline of the benchmarks, and in float64 the
oracle of the tests); for SwiGLU, transformers' ``LlamaMLP`` computes
``down_proj(silu(gate_proj(x)) * up_proj(x))``. ``linear_act_fwd``, ``linear_fwd``,
``matmul_act_grad``, ``act_bwd``, ``linear_swiglu_fwd``, ``matmul_swiglu_grad`` and ``swiglu_bwd``
return exactly what the Triton launchers of the same names in ``lightllm.kernels.fused_linear``
return, for the dispatch fallback. Activations are named as in
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


def feed_forward_block(x, linear1, linear2, dropout: float, training: bool,
                       activation: str = "gelu", approximate: str = "none", residual=None):
    """Mirror of ``lightllm.nn.fused_linear.feed_forward_block``:
    ``linear2(dropout(act(linear1(x)))) (+ residual)`` on two ``nn.Linear`` modules' weights."""
    act = "relu" if activation == "relu" else ("gelu_tanh" if approximate == "tanh" else "gelu")
    h = F.dropout(activate(F.linear(x, linear1.weight, linear1.bias), act), dropout, training)
    y = F.linear(h, linear2.weight, linear2.bias)
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


def linear_swiglu(x, w_gate, w_up, b_gate=None, b_up=None):
    return F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)


def swiglu_feed_forward(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None,
                        residual=None):
    y = F.linear(linear_swiglu(x, w_gate, w_up, b_gate, b_up), w_down, b_down)
    return y if residual is None else y + residual


def linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save: bool):
    """Mirror of ``lightllm.kernels.fused_linear.linear_swiglu_fwd``: (h, g, u), g/u None unless
    ``save``."""
    g = F.linear(x, w_gate, b_gate)
    u = F.linear(x, w_up, b_up)
    return F.silu(g) * u, (g if save else None), (u if save else None)


def swiglu_grads(dh, g, u):
    """(dG, dU) of ``h = silu(g) * u``: PyTorch's own silu_backward for dG."""
    return torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g)


def matmul_swiglu_grad(dy, w_down, g, u):
    """Mirror of ``lightllm.kernels.fused_linear.matmul_swiglu_grad``."""
    return swiglu_grads(dy @ w_down, g, u)


def swiglu_bwd(dh, g, u, need_db: bool):
    """Mirror of ``lightllm.kernels.fused_linear.swiglu_bwd`` (db's in fp32)."""
    dg, du = swiglu_grads(dh, g, u)
    if not need_db:
        return dg, du, None, None
    return dg, du, dg.sum(0, dtype=torch.float32), du.sum(0, dtype=torch.float32)
