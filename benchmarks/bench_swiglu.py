"""SwiGLU: the gated projection silu(x Wg^T) * (x Wu^T) and the whole Llama feed-forward, forward
and backward, Llama sizes (d_model 2048 ... 8192, d_ff the Llama widths, tokens 1 ... 16k).

Work: h = silu(x Wg^T) * (x Wu^T) with x (M, K), Wg and Wu (N, K): 4·M·N·K FLOPs forward, twice
that backward (dX and both dW); the feed-forward adds the down projection (6·M·d_model·d_ff
forward, 12· backward). Compute-bound beyond a few hundred tokens, so figures are TFLOP/s and % of
the measured bf16 matmul rate; decode (M = 1) is bound by reading the weights.

Providers:
  eager     F.silu(F.linear(x, Wg)) * F.linear(x, Wu) (then F.linear(., Wd) + residual): transformers'
            LlamaMLP, two cuBLAS matmuls and two elementwise passes over (M, d_ff)
  compile   torch.compile of the eager reference
  lightllm  lightllm.functional.linear_swiglu / swiglu_feed_forward (one gated matmul)
  matmul    the two (three) torch.matmul's of the same shapes, no activation: the ceiling.
On a CPU "torch" is the eager form (PyTorch's own best there) beside lightllm's native CPU path.

    python -m benchmarks --ops swiglu [--quick]
"""

from __future__ import annotations

import torch

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.reference import fused_linear as reference

OPS = ("linear_swiglu", "swiglu_feed_forward")  # the op names of its cases

# (d_model, d_ff): Llama-3.2-1B, Llama-2-7B, Llama-3-8B, Llama-2-70B
LLAMA = [(2048, 8192), (4096, 11008), (4096, 14336), (8192, 28672)]


def _swiglu_providers():
    def eager(x, wg, wu):
        return reference.linear_swiglu(x, wg, wu)

    providers = {"torch": eager} if not HAS_CUDA else {"eager": eager, "compile": compiled(eager)}
    providers["lightllm"] = LF.linear_swiglu
    providers.update(peers.swiglu_providers(feed_forward=False))
    if HAS_CUDA:
        providers["matmul"] = lambda x, wg, wu: (torch.matmul(x, wg.t()), torch.matmul(x, wu.t()))
    return providers


def _feed_forward_providers():
    def eager(x, wg, wu, wd):
        return reference.swiglu_feed_forward(x, wg, wu, wd, residual=x)

    def ours(x, wg, wu, wd):
        return LF.swiglu_feed_forward(x, wg, wu, wd, residual=x)

    if not HAS_CUDA:
        return {"torch": eager, "lightllm": ours, **peers.swiglu_providers(feed_forward=True)}
    return {
        **peers.swiglu_providers(feed_forward=True),
        "eager": eager,
        "compile": compiled(eager),
        "lightllm": ours,
        # The three products alone (the up product as a second output, so the backward also
        # runs all six of its matmuls).
        "matmul": lambda x, wg, wu, wd: (torch.matmul(torch.matmul(x, wg.t()), wd.t()),
                                         torch.matmul(x, wu.t())),
    }


def _swiglu_case(tokens: int, d_model: int, d_ff: int, dtype) -> Case:
    m, k, n = tokens, d_model, d_ff

    def make(device):
        return (torch.randn(m, k, device=device, dtype=dtype),
                torch.randn(n, k, device=device, dtype=dtype) / k**0.5,
                torch.randn(n, k, device=device, dtype=dtype) / k**0.5)

    flops = 4 * m * n * k
    return Case(op="linear_swiglu", label=f"{m}x{k}->2x{n} {str(dtype)[6:]}",
                params={"M": m, "K": k, "N": n}, make_inputs=make, providers=_swiglu_providers(),
                modes=("fwd", "bwd"), grad_inputs=(0, 1, 2),
                flops={"fwd": flops, "bwd": 2 * flops}, dtype=dtype, x="K", series=f"M={m}")


def _feed_forward_case(tokens: int, d_model: int, d_ff: int, dtype) -> Case:
    m, d, f = tokens, d_model, d_ff

    def make(device):
        return (torch.randn(m, d, device=device, dtype=dtype),
                torch.randn(f, d, device=device, dtype=dtype) / d**0.5,
                torch.randn(f, d, device=device, dtype=dtype) / d**0.5,
                torch.randn(d, f, device=device, dtype=dtype) / f**0.5)

    flops = 6 * m * d * f
    return Case(op="swiglu_feed_forward", label=f"ffn {m}x{d}->2x{f}->{d} +res {str(dtype)[6:]}",
                params={"M": m, "d_model": d, "d_ff": f}, make_inputs=make,
                providers=_feed_forward_providers(), modes=("fwd", "bwd"),
                grad_inputs=(0, 1, 2, 3), flops={"fwd": flops, "bwd": 2 * flops}, dtype=dtype,
                x="d_model", series=f"M={m}")


def build_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the CPU path at the docs/design.md §5 CPU target shape (d_ff = 8/3 d_model)
        return [_swiglu_case(1024, 1024, 2816, torch.float32),
                _feed_forward_case(1024, 1024, 2816, torch.float32)]
    dtype = torch.bfloat16
    if quick:
        return [_swiglu_case(4096, 4096, 11008, dtype), _swiglu_case(1, 4096, 11008, dtype),
                _feed_forward_case(2048, 2048, 8192, dtype)]
    cases: list[Case] = []
    for d, f in LLAMA:
        for tokens in (1, 128, 2048, 16384):
            cases.append(_swiglu_case(tokens, d, f, dtype))
        cases.append(_feed_forward_case(4096, d, f, dtype))
    cases.append(_swiglu_case(4096, 4096, 11008, torch.float16))
    return cases
