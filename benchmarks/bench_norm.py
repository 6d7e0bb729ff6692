"""LayerNorm, RMSNorm and their Add & Norm: forward, backward and both, hidden 512 ... 16384.

Ideal traffic (e = element size, M rows of N features; parameters and statistics are negligible):
  layer_norm, rms_norm          fwd 2·M·N·e (x in, y out)        bwd 3·M·N·e (x, dy in, dx out)
  add_layer_norm, add_rms_norm  fwd 4·M·N·e (x, r in, y, s out)  bwd 4·M·N·e (s, dy, ds in, dx out)
Memory-bound, so figures are GB/s and % of the measured copy bandwidth. Providers: lightllm,
PyTorch's own F.layer_norm / F.rms_norm, the eager reference, torch.compile of it and the peers.

    python -m benchmarks --ops norm [--quick]         (all four)
    python -m benchmarks --ops rms_norm [--quick]     (RMSNorm and Add & RMSNorm; as layer_norm)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import lightllm.functional as LF
from benchmarks import peers
from benchmarks.harness import HAS_CUDA, Case, compiled
from lightllm.reference import norm as reference

OPS = ("layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm")  # the op names of its cases
# --ops layer_norm (rms_norm) selects that norm with its Add & Norm (benchmarks/__main__.py).
GROUPS = {"layer_norm": ("layer_norm", "add_layer_norm"), "rms_norm": ("rms_norm", "add_rms_norm")}

TRAFFIC = {"layer_norm": (2, 3), "add_layer_norm": (4, 4), "rms_norm": (2, 3),
           "add_rms_norm": (4, 4)}
GRAD_INPUTS = {"layer_norm": (0, 1, 2), "add_layer_norm": (0, 1, 2, 3), "rms_norm": (0, 1),
               "add_rms_norm": (0, 1, 2)}  # every input takes a gradient
EPS = 1e-6  # RMSNorm's; LayerNorm runs with its default 1e-5


def _torch_add_layer_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, s.shape[-1:], w, b), s


def _torch_add_rms_norm(x, r, w):
    s = x + r
    return F.rms_norm(s, s.shape[-1:], w, EPS), s


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
    if op == "add_layer_norm":
        eager = lambda x, r, w, b: reference.add_layer_norm(x, r, x.shape[-1:], w, b)  # noqa: E731
        return {
            "eager": eager,
            "torch": _torch_add_layer_norm,
            "compile": compiled(eager),
            "lightllm": lambda x, r, w, b: LF.add_layer_norm(x, r, x.shape[-1:], w, b),
            **peers.layer_norm_providers(residual=True),
        }
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
    for op, n, dtype in [(op, n, dt) for op in OPS for n in hiddens for dt in dtypes]:
        fwd, bwd = TRAFFIC[op]
        m = (1 << 25) // n if HAS_CUDA else 4096  # GPU: 32M elements, 64 MiB per bf16 tensor

        def make(device, m=m, n=n, op=op, dtype=dtype):
            x = torch.randn(m, n, device=device, dtype=dtype)
            w = torch.randn(n, device=device, dtype=dtype)
            params = (w,) if "rms" in op else (w, torch.randn(n, device=device, dtype=dtype))
            return (x, torch.randn_like(x), *params) if op.startswith("add_") else (x, *params)

        size = m * n * dtype.itemsize
        cases.append(Case(
            op=op, label=f"{m}x{n} {str(dtype)[6:]}", params={"M": m, "N": n},
            make_inputs=make, providers=_providers(op), modes=("fwd", "bwd", "fwd+bwd"),
            dtype=dtype, x="N", grad_inputs=GRAD_INPUTS[op],
            bytes={"fwd": fwd * size, "bwd": bwd * size, "fwd+bwd": (fwd + bwd) * size},
        ))
    return cases
