"""Where an op runs: the one place that decides between the Triton kernels and the reference.

DESIGN.md §3: CUDA tensors run the kernels; CPU tensors run the same Triton kernels through the
interpreter when ``TRITON_INTERPRET=1`` is set before lightllm is imported, otherwise the eager
reference. A path that cannot serve an input falls back to the reference with a one-time warning.
"""

from __future__ import annotations

import os
import warnings

import torch

# Triton decides at decoration time whether a @triton.jit function is interpreted, so the choice is
# read once, when lightllm (and with it every kernel module) is imported.
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with every CUDA build of torch
    HAS_TRITON = False

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn once per process for each ``key`` (a fallback the user should know about)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"lightllm: {message}", RuntimeWarning, stacklevel=3)


def triton_runs_on(device: torch.device) -> bool:
    """True when the Triton kernels can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and TRITON_INTERPRET


def use_triton(op: str, *tensors: torch.Tensor | None, dtype_ok: bool = True, why: str = "") -> bool:
    """Decide whether ``op`` runs its Triton kernel on ``tensors`` (else the reference).

    ``dtype_ok=False`` (with ``why``) marks an input the kernel cannot serve: on a device where the
    kernels would otherwise run, that is a fallback and is reported once.
    """
    device = next(t.device for t in tensors if t is not None)
    if not triton_runs_on(device):
        return False
    if device.type == "cpu" and any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
        # The interpreter multiplies bfloat16's raw bits in tl.dot: a wrong answer, never served.
        dtype_ok, why = False, "Triton's interpreter cannot do bfloat16 arithmetic"
    if not dtype_ok:
        warn_once(f"{op}:{why}", f"{op}: {why}; running the eager reference instead")
        return False
    return True


def describe() -> str:
    """One line naming the dispatch path active in this process."""
    if not HAS_TRITON:
        return "triton missing: every op runs the eager reference"
    cuda = "CUDA tensors -> Triton kernels" if torch.cuda.is_available() else "no CUDA device"
    cpu = "CPU tensors -> Triton interpreter" if TRITON_INTERPRET else "CPU tensors -> eager reference"
    return f"{cuda}; {cpu}"
