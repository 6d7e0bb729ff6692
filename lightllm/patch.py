"""``lightllm.patch(model)``: switch an existing model onto lightllm's kernels in place.

Every submodule whose type is exactly one of the supported ``torch.nn`` classes has its class
swapped for lightllm's subclass of it. The subclasses add no parameters or buffers and keep the
constructor state of their parents, so the swap keeps the module object, its parameters, hooks and
``state_dict`` untouched and only changes ``forward``. Subclasses of the torch classes (a model's
own variants) are left alone: their ``forward`` may do something else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import nn as lnn


def _swaps() -> dict[type[torch.nn.Module], type[torch.nn.Module]]:
    return {
        torch.nn.LayerNorm: lnn.LayerNorm,
        torch.nn.Softmax: lnn.Softmax,
        torch.nn.MultiheadAttention: lnn.MultiheadAttention,
    }


@dataclass
class PatchReport:
    """What ``patch`` swapped: qualified module name -> (old class, new class)."""

    swapped: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.swapped)

    def __str__(self) -> str:
        if not self.swapped:
            return "lightllm.patch: no supported module found"
        lines = [f"lightllm.patch: swapped {len(self.swapped)} module(s)"]
        lines += [f"  {name or '<root>'}: {old} -> {new}" for name, (old, new) in self.swapped.items()]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.nn.{cls.__name__}"


def patch(model: torch.nn.Module, *, verbose: bool = False) -> PatchReport:
    """Swap supported submodules of ``model`` (itself included) for lightllm's, in place.

    Supported: ``torch.nn.LayerNorm``, ``torch.nn.Softmax``, ``torch.nn.MultiheadAttention``.
    Returns a :class:`PatchReport`; ``unpatch(model)`` undoes the swap.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"lightllm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    swaps = _swaps()
    report = PatchReport()
    for name, module in model.named_modules():
        new = swaps.get(type(module))
        if new is not None:
            report.swapped[name] = (_qualname(type(module)), _qualname(new))
            module.__class__ = new
    if verbose:
        print(report)
    return report


def unpatch(model: torch.nn.Module) -> int:
    """Restore the torch classes that ``patch`` swapped; returns how many modules changed."""
    back = {new: old for old, new in _swaps().items()}
    count = 0
    for module in model.modules():
        old = back.get(type(module))
        if old is not None:
            module.__class__ = old
            count += 1
    return count
