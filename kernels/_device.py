"""The facts of the device a kernel launches on: one table that every launcher and config pruner
reads (SMs, registers, shared memory, the copy engine).

On a GPU the facts come from the driver (``torch.cuda.get_device_properties``). Everywhere else a
Triton kernel only runs in the interpreter, and there the table is Hopper's (H100 / H200, sm_90,
the configs' target) with a small SM count, so the interpreter prunes configs as an H100 does while
its grids stay small. Tools that plan launches for a GPU without one (``tests/sm90_compile.py``,
the traffic model) replace :func:`facts` for the duration (:func:`pretend`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    name: str
    sms: int  # streaming multiprocessors
    regs_per_sm: int  # 32-bit registers in one SM's register file
    max_regs_per_thread: int  # ptxas' ceiling (allocated per warp in units of 8 a thread: 256)
    smem_per_sm: int  # bytes of shared memory in one SM
    smem_per_block: int  # bytes one program may opt into
    tma: bool  # host tensor descriptors for the copy engine (Hopper and later)


HOPPER = DeviceFacts("sm_90 (H100 / H200)", sms=132, regs_per_sm=64 * 1024, max_regs_per_thread=255,
                     smem_per_sm=228 * 1024, smem_per_block=227 * 1024, tma=True)
# Hopper's limits (the interpreter emulates tensor descriptors) with a few SMs: grids sized by the
# SM count stay small, and every grid-splitting path still runs more than one program.
INTERPRETER = dataclasses.replace(HOPPER, name="Triton interpreter", sms=4)


@functools.cache
def _cuda_facts(index: int) -> DeviceFacts:
    p = torch.cuda.get_device_properties(index)
    return DeviceFacts(p.name, sms=p.multi_processor_count, regs_per_sm=p.regs_per_multiprocessor,
                       max_regs_per_thread=255, smem_per_sm=p.shared_memory_per_multiprocessor,
                       smem_per_block=p.shared_memory_per_block_optin, tma=p.major >= 9)


def facts(device: torch.device) -> DeviceFacts:
    """The facts of ``device``: the driver's for a CUDA device, else the interpreter's."""
    if device.type == "cuda":
        return _cuda_facts(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


def sm_count(t: torch.Tensor) -> int:
    """The SMs of the device ``t`` lives on."""
    return facts(t.device).sms


@contextlib.contextmanager
def pretend(device_facts: DeviceFacts):
    """Within, every launcher plans for ``device_facts`` whatever its tensors' device."""
    global facts
    saved = facts
    facts = lambda device: device_facts  # noqa: E731
    try:
        yield
    finally:
        facts = saved
