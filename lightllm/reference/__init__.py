"""Eager PyTorch references of every op: the parity oracle of the tests, the baseline of the
benchmarks, and the fallback where a kernel cannot run. One file per op."""
from . import attention, fused_linear, norm, rotary, softmax  # noqa: F401
