"""Softmax and scaled + masked softmax (the C++/CUDA extension): forward and backward, rows of
128 ... 262144 elements, fp32 / fp16 / bf16.

Ideal traffic (e = element size, M rows of N elements):
  softmax                 fwd 2·M·N·e (x in, y out)    bwd 3·M·N·e (y, dy in, dx out)
  scaled_masked_softmax   the same, causal mask generated in the kernel (no mask bytes)
Memory-bound, so figures are GB/s and % of the measured copy bandwidth (target: >= 90 % at every
length, >= 1.2x torch.softmax). For plain softmax "eager" (the reference) is torch.softmax itself;
for the masked form "torch" is the usual unfused PyTorch code and "eager" the reference, which
also zeroes fully masked rows.

    python -m benchmarks --ops softmax [--quick]
"""

from __future__ import annotations

import torch

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.reference import softmax as reference

OPS = ("softmax", "scaled_masked_softmax")  # the op names of its cases

LENGTHS = [128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ELEMENTS = 1 << 25  # per tensor: 64 MiB in bf16, far beyond any L2
SCALE = 0.125


def _softmax_providers():
    eager = lambda x: reference.softmax(x, -1)  # noqa: E731
    return {
        "eager": eager,
        "torch": lambda x: torch.softmax(x, -1),
        "compile": compiled(eager),
        "lightllm": lambda x: LF.softmax(x, -1),
        **peers.softmax_providers(),
    }


def _torch_causal_softmax(x):
    n = x.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return torch.softmax((x * SCALE).masked_fill(~keep, float("-inf")), -1)


def _masked_providers():
    eager = lambda x: reference.scaled_masked_softmax(x, None, SCALE, True)  # noqa: E731
    return {
        "eager": eager,
        "torch": _torch_causal_softmax,
        "compile": compiled(eager),
        "lightllm": lambda x: LF.scaled_masked_softmax(x, None, SCALE, True),
    }


def _case(op, shape, dtype, providers):
    m, n = shape[0] if len(shape) == 2 else shape[0] * shape[1], shape[-1]
    size = m * n * dtype.itemsize

    def make(device):
        return (torch.randn(shape, device=device, dtype=dtype),)

    return Case(
        op=op, label=f"{'x'.join(map(str, shape))} {str(dtype)[6:]}",
        params={"M": m, "N": n}, make_inputs=make, providers=providers, modes=("fwd", "bwd"),
        grad_inputs=(0,), bytes={"fwd": 2 * size, "bwd": 3 * size}, dtype=dtype, x="N",
    )


def build_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:  # the C++ CPU kernels, 4M elements (the docs/design.md §5 target: 4096 x 1024)
        lengths = [1024, 8192] if quick else [256, 1024, 4096, 8192]
        return [_case("softmax", ((1 << 22) // n, n), dtype, _softmax_providers())
                for dtype in (torch.float32, torch.bfloat16) for n in lengths] + [
            _case("scaled_masked_softmax", (32, 512, 512), torch.float32, _masked_providers())]
    lengths = [1024, 32768, 262144] if quick else LENGTHS
    dtypes = [torch.float32, torch.bfloat16] if quick else DTYPES
    cases = [_case("softmax", (ELEMENTS // n, n), dtype, _softmax_providers())
             for dtype in dtypes for n in lengths]
    # Attention scores: (batch * heads, queries, keys), causal.
    for n in [1024] if quick else [1024, 4096]:
        cases += [_case("scaled_masked_softmax", (ELEMENTS // (n * n), n, n), dtype,
                        _masked_providers()) for dtype in dtypes]
    return cases
