"""The fused-linear family: linear + bias + GeLU (and the whole GeLU feed-forward), GPT-2 and
Llama-like sizes (d_model 768 ... 8192, d_ff = 4·d_model, tokens 1 ... 16k); SwiGLU, the gated
projection silu(x Wg^T) * (x Wu^T) and the whole Llama feed-forward, Llama sizes (d_model 2048 ...
8192, d_ff the Llama widths, tokens 1 ... 16k). Forward and backward.

Work: y = gelu(x W^T + b) with x (M, K), W (N, K): 2·M·N·K FLOPs forward, twice that backward
(dX and dW); the feed-forward is two such products (4·M·d_model·d_ff forward, 8· backward).
h = silu(x Wg^T) * (x Wu^T) with Wg and Wu (N, K): 4·M·N·K FLOPs forward, twice that backward
(dX and both dW); its feed-forward adds the down projection (6·M·d_model·d_ff forward, 12·
backward). Compute-bound beyond a few hundred tokens, so figures are TFLOP/s and % of the measured
bf16 matmul rate; decode (M = 1) is bound by reading the weights, so there TFLOP/s is low for
everyone.

Providers of linear_gelu / feed_forward:
  eager     F.linear then F.gelu (two kernels: cuBLAS addmm, then an elementwise pass)
  torch     torch._addmm_activation(b, x, W^T, use_gelu=True): cuBLASLt's fused GELU_BIAS
            epilogue. On CUDA it computes the *tanh* GeLU (every GPU path of that op uses tanh,
            pytorch/pytorch#104061; on CPU it is the exact erf form) and it has no backward, so it
            appears in the forward of the approximate="tanh" cases only: like is compared with like.
  compile   torch.compile of the eager reference
  lightllm  lightllm.functional.linear_gelu / feed_forward
  matmul    torch.matmul(x, W^T) of the same shape, no bias, no activation: the ceiling.
Providers of linear_swiglu / swiglu_feed_forward:
  eager     F.silu(F.linear(x, Wg)) * F.linear(x, Wu) (then F.linear(., Wd) + residual): transformers'
            LlamaMLP, two cuBLAS matmuls and two elementwise passes over (M, d_ff)
  compile   torch.compile of the eager reference
  lightllm  lightllm.functional.linear_swiglu / swiglu_feed_forward (one gated matmul)
  matmul    the two (three) torch.matmul's of the same shapes, no activation: the ceiling.
On a CPU "torch" is the eager form (PyTorch's own best there) beside lightllm's native CPU path.

    python -m benchmarks --ops fused_linear [--quick]      (or one op: --ops linear_swiglu)
"""

from __future__ import annotations

import torch

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.reference import fused_linear as reference

OPS = ("linear_gelu", "feed_forward", "linear_swiglu", "swiglu_feed_forward")  # the op names of its cases

GPT2 = [768, 1024, 1600]  # small, medium, XL
LLAMA = [4096, 8192]  # 7B-like, 70B-like widths (d_ff = 4·d_model here, not SwiGLU's 8/3)

# (d_model, d_ff) of SwiGLU: Llama-3.2-1B, Llama-2-7B, Llama-3-8B, Llama-2-70B
LLAMA_SWIGLU = [(2048, 8192), (4096, 11008), (4096, 14336), (8192, 28672)]


def _ceiling(y, *biases):
    """The matmul ceiling's output; with autograd on, also views of the biases: the backward
    harness differentiates every input, and a view's gradient costs no kernel."""
    return (y, *(b.view_as(b) for b in biases)) if torch.is_grad_enabled() else y


def _linear_gelu_providers(approximate: str, mode: str):
    def eager(x, w, b):
        return reference.linear_gelu(x, w, b, approximate)

    providers = {"eager": eager}
    if mode == "fwd" and approximate == "tanh" and HAS_CUDA:
        providers["torch"] = lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    if not HAS_CUDA:  # on a CPU the eager form is PyTorch's own best: addmm, then GeLU
        providers = {"torch": eager}
    providers.update({
        "compile": compiled(eager),
        "lightllm": lambda x, w, b: LF.linear_gelu(x, w, b, approximate),
        "matmul": lambda x, w, b: _ceiling(torch.matmul(x, w.t()), b),
    })
    return providers


def _feed_forward_providers(approximate: str):
    def eager(x, w1, b1, w2, b2):
        return reference.feed_forward(x, w1, b1, w2, b2, approximate, residual=x)

    if not HAS_CUDA:
        return {
            "torch": eager,
            "lightllm": lambda x, w1, b1, w2, b2: LF.feed_forward(x, w1, b1, w2, b2, approximate,
                                                                  residual=x),
        }
    return {
        "eager": eager,
        "compile": compiled(eager),
        "lightllm": lambda x, w1, b1, w2, b2: LF.feed_forward(x, w1, b1, w2, b2, approximate,
                                                              residual=x),
        "matmul": lambda x, w1, b1, w2, b2: _ceiling(torch.matmul(torch.matmul(x, w1.t()), w2.t()),
                                                     b1, b2),
    }


def _linear_gelu_cases(tokens: int, d_model: int, approximate: str, dtype) -> list[Case]:
    m, k, n = tokens, d_model, 4 * d_model

    def make(device):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / k**0.5
        b = torch.randn(n, device=device, dtype=dtype)
        return x, w, b

    flops = 2 * m * n * k
    label = f"{m}x{k}->{n} {approximate} {str(dtype)[6:]}"
    params = {"M": m, "K": k, "N": n, "approximate": approximate}
    # Two cases with one label: the forward (with cuBLASLt's fused epilogue where it computes the
    # same function) and the backward (which that op does not have).
    return [
        Case(op="linear_gelu", label=label, params=params, make_inputs=make,
             providers=_linear_gelu_providers(approximate, "fwd"),
             modes=("fwd",), flops={"fwd": flops}, dtype=dtype, x="K", series=f"M={m} {approximate}"),
        Case(op="linear_gelu", label=label, params=params, make_inputs=make,
             providers=_linear_gelu_providers(approximate, "bwd"),
             modes=("bwd",), grad_inputs=(0, 1, 2), flops={"bwd": 2 * flops}, dtype=dtype, x="K",
             series=f"M={m} {approximate}"),
    ]


def _feed_forward_case(tokens: int, d_model: int, approximate: str, dtype) -> Case:
    m, d, f = tokens, d_model, 4 * d_model

    def make(device):
        return (torch.randn(m, d, device=device, dtype=dtype),
                torch.randn(f, d, device=device, dtype=dtype) / d**0.5,
                torch.randn(f, device=device, dtype=dtype),
                torch.randn(d, f, device=device, dtype=dtype) / f**0.5,
                torch.randn(d, device=device, dtype=dtype))

    flops = 4 * m * d * f
    return Case(op="feed_forward", label=f"ffn {m}x{d}->{f}->{d} +res {approximate} "
                f"{str(dtype)[6:]}", params={"M": m, "d_model": d, "d_ff": f,
                                             "approximate": approximate},
                make_inputs=make, providers=_feed_forward_providers(approximate),
                modes=("fwd", "bwd"), grad_inputs=(0, 1, 2, 3, 4),
                flops={"fwd": flops, "bwd": 2 * flops}, dtype=dtype, x="d_model",
                series=f"M={m} {approximate}")


def _gelu_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the CPU path at the docs/design.md §5 CPU target shape
        return (_linear_gelu_cases(1024, 1024, "none", torch.float32)
                + [_feed_forward_case(1024, 1024, "none", torch.float32)])
    dtype = torch.bfloat16
    cases: list[Case] = []
    if quick:
        for tokens, d in [(2048, 768), (4096, 4096), (1, 4096)]:
            cases += _linear_gelu_cases(tokens, d, "tanh", dtype)
        cases.append(_feed_forward_case(2048, 1024, "tanh", dtype))
        return cases
    for d in GPT2 + LLAMA:
        for tokens in (1, 128, 2048, 16384):
            cases += _linear_gelu_cases(tokens, d, "tanh", dtype)
    for d in (1024, 4096):  # the exact (erf) form, as nn.GELU() and TransformerEncoderLayer use
        cases += _linear_gelu_cases(4096, d, "none", dtype)
        cases.append(_feed_forward_case(4096, d, "none", dtype))
    cases.append(_feed_forward_case(16384, 1024, "tanh", dtype))
    cases += _linear_gelu_cases(4096, 4096, "tanh", torch.float16)
    return cases


def _swiglu_providers():
    def eager(x, wg, wu):
        return reference.linear_swiglu(x, wg, wu)

    providers = {"torch": eager} if not HAS_CUDA else {"eager": eager, "compile": compiled(eager)}
    providers["lightllm"] = LF.linear_swiglu
    providers.update(peers.swiglu_providers(feed_forward=False))
    if HAS_CUDA:
        providers["matmul"] = lambda x, wg, wu: (torch.matmul(x, wg.t()), torch.matmul(x, wu.t()))
    return providers


def _swiglu_feed_forward_providers():
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


def _swiglu_feed_forward_case(tokens: int, d_model: int, d_ff: int, dtype) -> Case:
    m, d, f = tokens, d_model, d_ff

    def make(device):
        return (torch.randn(m, d, device=device, dtype=dtype),
                torch.randn(f, d, device=device, dtype=dtype) / d**0.5,
                torch.randn(f, d, device=device, dtype=dtype) / d**0.5,
                torch.randn(d, f, device=device, dtype=dtype) / f**0.5)

    flops = 6 * m * d * f
    return Case(op="swiglu_feed_forward", label=f"ffn {m}x{d}->2x{f}->{d} +res {str(dtype)[6:]}",
                params={"M": m, "d_model": d, "d_ff": f}, make_inputs=make,
                providers=_swiglu_feed_forward_providers(), modes=("fwd", "bwd"),
                grad_inputs=(0, 1, 2, 3), flops={"fwd": flops, "bwd": 2 * flops}, dtype=dtype,
                x="d_model", series=f"M={m}")


def _swiglu_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the CPU path at the docs/design.md §5 CPU target shape (d_ff = 8/3 d_model)
        return [_swiglu_case(1024, 1024, 2816, torch.float32),
                _swiglu_feed_forward_case(1024, 1024, 2816, torch.float32)]
    dtype = torch.bfloat16
    if quick:
        return [_swiglu_case(4096, 4096, 11008, dtype), _swiglu_case(1, 4096, 11008, dtype),
                _swiglu_feed_forward_case(2048, 2048, 8192, dtype)]
    cases: list[Case] = []
    for d, f in LLAMA_SWIGLU:
        for tokens in (1, 128, 2048, 16384):
            cases.append(_swiglu_case(tokens, d, f, dtype))
        cases.append(_swiglu_feed_forward_case(4096, d, f, dtype))
    cases.append(_swiglu_case(4096, 4096, 11008, torch.float16))
    return cases


def build_cases(quick: bool) -> list[Case]:
    return _gelu_cases(quick) + _swiglu_cases(quick)
