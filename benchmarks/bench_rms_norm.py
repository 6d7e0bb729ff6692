"""RMSNorm and Add & RMSNorm: forward, backward and both, hidden 512 ... 16384.

Ideal traffic (e = element size, M rows of N features; the weight and rstd are negligible):
  rms_norm      fwd 2·M·N·e (x in, y out)        bwd 3·M·N·e (x, dy in, dx out)
  add_rms_norm  fwd 4·M·N·e (x, r in, y, s out)  bwd 4·M·N·e (s, dy, ds in, dx out)
Memory-bound, so figures are GB/s and % of the measured copy bandwidth. Providers: lightllm, PyTorch's
own F.rms_norm, the eager reference and torch.compile of it.

    python -m benchmarks --ops rms_norm [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.reference import norm as reference

OPS = ("rms_norm", "add_rms_norm")  # the op names of its cases

TRAFFIC = {"rms_norm": (2, 3), "add_rms_norm": (4, 4)}
EPS = 1e-6


def _torch_add_rms_norm(x, r, w):
    s = x + r
    return F.rms_norm(s, s.shape[-1:], w, EPS), s


def _providers(op: str):
    if op == "rms_norm":
        eager = lambda x, w: reference.rms_norm(x, x.shape[-1:], w, EPS)  # noqa: E731
        return {
            "eager": eager,
            "torch": lambda x, w: F.rms_norm(x, x.shape[-1:], w, EPS),
            "compile": compiled(eager),
            "lightllm": lambda x, w: LF.rms_norm(x, x.shape[-1:], w, EPS),
            **peers.rms_norm_providers(residual=False, eps=EPS),
        }
    eager = lambda x, r, w: reference.add_rms_norm(x, r, x.shape[-1:], w, EPS)  # noqa: E731
    return {
        "eager": eager,
        "torch": _torch_add_rms_norm,
        "compile": compiled(eager),
        "lightllm": lambda x, r, w: LF.add_rms_norm(x, r, x.shape[-1:], w, EPS),
        **peers.rms_norm_providers(residual=True, eps=EPS),
    }


def build_cases(quick: bool) -> list[Case]:
    if HAS_CUDA:
        hiddens = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
        dtypes = [torch.bfloat16]
    else:  # the C++ CPU kernels, 4096 rows (the docs/design.md §5 CPU target shape is 4096 x 1024)
        hiddens = [1024, 4096] if quick else [512, 1024, 2048, 4096]
        dtypes = [torch.float32, torch.bfloat16]
    cases = []
    for op, n, dtype in [(op, n, dt) for op in ("rms_norm", "add_rms_norm")
                         for n in hiddens for dt in dtypes]:
        fwd, bwd = TRAFFIC[op]
        m = (1 << 25) // n if HAS_CUDA else 4096  # GPU: 32M elements, 64 MiB per bf16 tensor

        def make(device, m=m, n=n, op=op, dtype=dtype):
            x = torch.randn(m, n, device=device, dtype=dtype)
            w = torch.randn(n, device=device, dtype=dtype)
            return (x, w) if op == "rms_norm" else (x, torch.randn_like(x), w)

        size = m * n * dtype.itemsize
        cases.append(Case(
            op=op, label=f"{m}x{n} {str(dtype)[6:]}", params={"M": m, "N": n},
            make_inputs=make, providers=_providers(op), modes=("fwd", "bwd", "fwd+bwd"),
            grad_inputs=(0, 1) if op == "rms_norm" else (0, 1, 2), dtype=dtype, x="N",
            bytes={"fwd": fwd * size, "bwd": bwd * size, "fwd+bwd": (fwd + bwd) * size},
        ))
    return cases
