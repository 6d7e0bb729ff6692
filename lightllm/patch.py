"""``lightllm.patch(model)``: switch an existing model onto lightllm's kernels in place.

Every submodule (the model itself included) that lightllm knows is swapped by class: its
``__class__`` becomes a lightllm subclass of its own class that replaces only ``forward``, so the
module object, parameters, buffers, hooks and ``state_dict`` stay as they are and no weight is
copied. What is known lives per ecosystem in ``lightllm.integrations``: PyTorch's modules
(``torch_nn``: LayerNorm, RMSNorm, Softmax, MultiheadAttention, the Transformer layers and
encoder stack) and Hugging Face models (``hugging_face``: the "lightllm" attention implementation,
norms and feed-forwards). ``unpatch(model)`` restores exactly what ``patch`` changed.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from . import integrations
from .integrations import torch_nn

KINDS = ("attention", "layer", "norm", "feed-forward", "softmax")
_ORIGINAL = "_lightllm_original_class"  # set on each swapped module: the class to restore
_PREVIOUS_ATTENTION = "_lightllm_previous_attn_implementation"


@dataclass
class Swap:
    old: str  # class names, qualified by package: "torch.nn.LayerNorm", "transformers.BertOutput"
    new: str
    kind: str  # one of KINDS
    note: str = ""


@dataclass
class PatchReport:
    """What ``patch`` did: modules swapped (qualified name -> :class:`Swap`), modules left alone
    (name -> reason), and the attention implementation set on a Hugging Face model."""

    swapped: dict[str, Swap] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)
    attn_implementation: str | None = None
    previous_attn_implementation: str | None = None

    def __len__(self) -> int:
        return len(self.swapped)

    def by_kind(self) -> dict[str, list[str]]:
        """Swapped module names per kind, in model order."""
        out: dict[str, list[str]] = {}
        for name, swap in self.swapped.items():
            out.setdefault(swap.kind, []).append(name)
        return out

    def __str__(self) -> str:
        lines = []
        if self.attn_implementation is not None:
            lines.append(f"lightllm.patch: attention implementation {self.attn_implementation!r} "
                         f"(was {self.previous_attn_implementation!r})")
        if not self.swapped:
            lines.append("lightllm.patch: no supported module found")
        else:
            lines.append(f"lightllm.patch: swapped {len(self.swapped)} module(s)")
            by_kind = self.by_kind()
            for kind in sorted(by_kind, key=KINDS.index):
                lines.append(f"  {kind}:")
                lines += [f"    {line}" for line in _grouped(by_kind[kind], self.swapped)]
        if self.left_alone:
            lines.append(f"  left alone ({len(self.left_alone)}):")
            groups = defaultdict(list)
            for name, reason in self.left_alone.items():
                groups[reason].append(name)
            for reason, names in groups.items():
                lines.append(f"    {_names(names)}: {reason}")
        return "\n".join(lines)


def _names(names: list[str]) -> str:
    """``encoder.layer.*.output`` (x6) for the same path repeated over layer indices."""
    patterns: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name or "<root>")
        patterns[pattern] = patterns.get(pattern, 0) + 1
    return ", ".join(p if n == 1 else f"{p} (x{n})" for p, n in patterns.items())


def _grouped(names: list[str], swapped: dict[str, Swap]) -> list[str]:
    groups = defaultdict(list)
    for name in names:
        s = swapped[name]
        groups[(s.old, s.new, s.note)].append(name)
    return [f"{_names(ns)}: {old} -> {new}" + (f" [{note}]" if note else "")
            for (old, new, note), ns in groups.items()]


def _qualname(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn.") or module.startswith("lightllm.nn."):
        return f"{module.split('.')[0]}.nn.{cls.__name__}"
    return f"{module.split('.')[0]}.{cls.__name__}"


def _hugging_face():
    """The Hugging Face integration once transformers is imported (a model of its exists only
    then), else None."""
    if "transformers" not in sys.modules:
        return None
    from .integrations import hugging_face

    return hugging_face


def _set_attention(model: nn.Module, hf, report: PatchReport) -> None:
    """Every transformers model in ``model`` (itself or wrapped) gets the "lightllm" attention;
    each remembers the implementation it had for ``unpatch``."""
    for module in model.modules():
        if not hf.is_hf_model(module):
            continue
        previous = hf.set_attention(module, hf.ATTENTION)
        if previous != hf.ATTENTION:
            module.__dict__.setdefault(_PREVIOUS_ATTENTION, previous)
        report.attn_implementation = hf.ATTENTION
        if report.previous_attn_implementation is None:
            report.previous_attn_implementation = module.__dict__.get(_PREVIOUS_ATTENTION,
                                                                      previous)


def patch(model: nn.Module, *, attention: bool = True, verbose: bool = False) -> PatchReport:
    """Switch ``model`` onto lightllm's kernels in place and report what changed.

    - PyTorch modules, by exact class: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.Softmax``,
      ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``/``DecoderLayer`` (the whole layer:
      fused Add & Norm, the feed-forward with its activation in the matmul epilogue, no inference
      fast path) and ``nn.TransformerEncoder`` (dense tensors instead of nested ones).
    - A Hugging Face ``PreTrainedModel``: the attention implementation becomes ``"lightllm"``
      (``attention=False`` keeps the model's), and its norms and feed-forwards whose code is one
      of the forms lightllm knows (LlamaRMSNorm, BertIntermediate/BertOutput, GPT2MLP, LlamaMLP)
      are swapped.
    Anything else is left alone; the report names the candidates it skipped and why. Patching a
    patched model changes nothing; ``unpatch(model)`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lightllm.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    hf = _hugging_face()
    if hf is not None and attention:
        integrations.install()
        _set_attention(model, hf, report)
    planners = [torch_nn.plan_module] + ([hf.plan_module] if hf is not None else [])
    absorbed = None  # a swapped Hugging Face block's prefix: its own forward reads its children
    for name, module in model.named_modules():
        if absorbed is not None and name.startswith(absorbed):
            continue
        absorbed = None
        for plan_module in planners:
            plan = plan_module(module)
            if plan is None:
                continue
            if isinstance(plan, str):
                report.left_alone[name] = plan
            else:
                kind, new, note = plan
                old = type(module)
                report.swapped[name] = Swap(_qualname(old), _qualname(new), kind, note)
                module.__dict__[_ORIGINAL] = old
                module.__class__ = new
                if plan_module is not torch_nn.plan_module:
                    absorbed = name + "."
            break
    if verbose:
        print(report)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore every class ``patch`` swapped in ``model`` and its previous attention
    implementation; returns how many modules changed."""
    count = 0
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL, None)
        if original is not None:
            module.__class__ = original
            count += 1
        previous = module.__dict__.pop(_PREVIOUS_ATTENTION, None)
        if previous is not None:
            _hugging_face().set_attention(module, previous)
    return count
