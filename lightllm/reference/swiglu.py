"""Eager references for the SwiGLU projection and the SwiGLU feed-forward (Llama's MLP).

``linear_swiglu``/``swiglu_feed_forward`` are the user-level semantics in plain PyTorch (the "eager"
baseline of the benchmarks, and in float64 the oracle of the tests): transformers' ``LlamaMLP``
computes ``down_proj(silu(gate_proj(x)) * up_proj(x))``. ``linear_swiglu_fwd``,
``matmul_swiglu_grad`` and ``swiglu_bwd`` return exactly what the launchers of the same names in
``lightllm.kernels.linear_gelu`` return.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_swiglu(x, w_gate, w_up, b_gate=None, b_up=None):
    return F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)


def swiglu_feed_forward(x, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None,
                        residual=None):
    y = F.linear(linear_swiglu(x, w_gate, w_up, b_gate, b_up), w_down, b_down)
    return y if residual is None else y + residual


def linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save: bool):
    """Mirror of ``lightllm.kernels.linear_gelu.linear_swiglu_fwd``: (h, g, u), g/u None unless
    ``save``."""
    g = F.linear(x, w_gate, b_gate)
    u = F.linear(x, w_up, b_up)
    return F.silu(g) * u, (g if save else None), (u if save else None)


def swiglu_grads(dh, g, u):
    """(dG, dU) of ``h = silu(g) * u``: PyTorch's own silu_backward for dG."""
    return torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g)


def matmul_swiglu_grad(dy, w_down, g, u):
    """Mirror of ``lightllm.kernels.linear_gelu.matmul_swiglu_grad``."""
    return swiglu_grads(dy @ w_down, g, u)


def swiglu_bwd(dh, g, u, need_db: bool):
    """Mirror of ``lightllm.kernels.linear_gelu.swiglu_bwd`` (db's in fp32)."""
    dg, du = swiglu_grads(dh, g, u)
    if not need_db:
        return dg, du, None, None
    return dg, du, dg.sum(0, dtype=torch.float32), du.sum(0, dtype=torch.float32)
