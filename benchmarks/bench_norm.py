"""LayerNorm and Add & Norm: forward, backward and both, hidden 512 ... 16384.

Ideal traffic (e = element size, M rows of N features; parameters and statistics are negligible):
  layer_norm      fwd 2·M·N·e (x in, y out)        bwd 3·M·N·e (x, dy in, dx out)
  add_layer_norm  fwd 4·M·N·e (x, r in, y, s out)  bwd 4·M·N·e (s, dy, ds in, dx out)
Memory-bound, so figures are GB/s and % of the measured copy bandwidth.

    python -m benchmarks --ops layer_norm [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.reference import norm as reference

OPS = ("layer_norm", "add_layer_norm")  # the op names of its cases

TRAFFIC = {"layer_norm": (2, 3), "add_layer_norm": (4, 4)}


def _torch_add_layer_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, s.shape[-1:], w, b), s


def _providers(op: str):
    if op == "layer_norm":
        eager = lambda x, w, b: reference.layer_norm(x, x.shape[-1:], w, b)  # noqa: E731
        return {
            "eager": eager,
            "torch": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
            "compile": compiled(eager),
            "lightllm": lambda x, w, b: LF.layer_norm(x, x.shape[-1:], w, b),
            **peers.layer_norm_providers(residual=False),
        }
    eager = lambda x, r, w, b: reference.add_layer_norm(x, r, x.shape[-1:], w, b)  # noqa: E731
    return {
        "eager": eager,
        "torch": _torch_add_layer_norm,
        "compile": compiled(eager),
        "lightllm": lambda x, r, w, b: LF.add_layer_norm(x, r, x.shape[-1:], w, b),
        **peers.layer_norm_providers(residual=True),
    }


def build_cases(quick: bool) -> list[Case]:
    if HAS_CUDA:
        hiddens = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        dtypes = [torch.bfloat16]
    else:  # the C++ CPU kernels, 4096 rows (the docs/design.md §5 CPU target shape is 4096 x 1024)
        hiddens = [1024, 4096] if quick else [512, 1024, 2048, 4096]
        dtypes = [torch.float32, torch.bfloat16]
    cases = []
    for op, n, dtype in [(op, n, dt) for op in ("layer_norm", "add_layer_norm")
                         for n in hiddens for dt in dtypes]:
        fwd, bwd = TRAFFIC[op]
        m = (1 << 25) // n if HAS_CUDA else 4096  # GPU: 32M elements, 64 MiB per bf16 tensor

        def make(device, m=m, n=n, op=op, dtype=dtype):
            x = torch.randn(m, n, device=device, dtype=dtype)
            w = torch.randn(n, device=device, dtype=dtype)
            b = torch.randn(n, device=device, dtype=dtype)
            if op == "layer_norm":
                return x, w, b
            return x, torch.randn_like(x), w, b

        size = m * n * dtype.itemsize
        cases.append(Case(
            op=op, label=f"{m}x{n} {str(dtype)[6:]}", params={"M": m, "N": n},
            make_inputs=make, providers=_providers(op), modes=("fwd", "bwd", "fwd+bwd"),
            dtype=dtype, x="N",
            grad_inputs=(0, 1, 2) if op == "layer_norm" else (0, 1, 2, 3),
            bytes={"fwd": fwd * size, "bwd": bwd * size, "fwd+bwd": (fwd + bwd) * size},
        ))
    return cases
