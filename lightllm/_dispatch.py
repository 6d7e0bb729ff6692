"""Where an op runs: the one place that decides between the Triton kernels, the CPU path and the
reference, and whether a call may skip the ``torch.library`` custom op.

docs/design.md §3:
- CUDA tensors run the Triton kernels.
- CPU tensors run the same Triton kernels through the interpreter when ``TRITON_INTERPRET=1`` was set
  before lightllm was imported (tests), except bfloat16, which the interpreter cannot multiply.
- CPU tensors otherwise run the **native** CPU path: lightllm's C++ kernels where they beat PyTorch,
  else PyTorch's own native op behind lightllm's validation and edge semantics.
- The eager reference is the oracle of the tests and the last resort for an input nothing else
  serves, with a one-time warning.

Every op makes that decision once, in its public function, and then calls its launcher directly in
plain eager mode (:func:`direct`); under ``torch.compile``, tracing, fake tensors or any
``TorchDispatchMode`` (an op counter, say) it goes through its custom op instead, which runs the same
launcher. Either way the autograd is the same functions.
"""

from __future__ import annotations

import contextlib
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

# Whether CPU tensors go to the interpreter. Tests switch it off with `native_cpu()` to exercise the
# native CPU path in the same process (the kernels stay interpreted either way).
_cpu_interprets: bool = TRITON_INTERPRET and HAS_TRITON

_warned: set[str] = set()

_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def warn_once(key: str, message: str) -> None:
    """Warn once per process for each ``key`` (a fallback the user should know about)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"lightllm: {message}", RuntimeWarning, stacklevel=3)


def cpu_interprets() -> bool:
    """True when CPU tensors run the Triton kernels in the interpreter."""
    return _cpu_interprets


@contextlib.contextmanager
def native_cpu():
    """Inside, CPU tensors take the native CPU path even under ``TRITON_INTERPRET=1`` (for tests)."""
    global _cpu_interprets
    saved, _cpu_interprets = _cpu_interprets, False
    try:
        yield
    finally:
        _cpu_interprets = saved


def triton_runs_on(device: torch.device) -> bool:
    """True when the Triton kernels run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _cpu_interprets)


def runs_triton(t: torch.Tensor) -> bool:
    """True when ``t`` (a float32/float16/bfloat16 tensor) goes to the Triton kernels: CUDA and meta
    tensors, and CPU tensors under the interpreter except bfloat16 (its ``tl.dot`` multiplies raw
    bits: a wrong answer is never served). Everything else takes the native CPU path."""
    if t.is_cpu:
        return _cpu_interprets and t.dtype != torch.bfloat16
    return HAS_TRITON


def direct(t: torch.Tensor) -> bool:
    """True when an op may call its launcher straight from Python: plain eager mode, a real tensor.

    Under ``torch.compile`` (or export), fake tensors, tracing, or any active ``TorchDispatchMode``
    the op goes through its ``torch.library`` custom op instead, so that tracers and op counters see
    ``torch.ops.lightllm.*``. ``is_compiling`` comes first: dynamo folds it to True.
    """
    return not _compiling() and not _dispatch_modes() and not t.is_meta


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd must record the op (grad mode on and some input requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def describe() -> str:
    """One line naming the dispatch path active in this process."""
    if not HAS_TRITON:
        return "triton missing: CUDA tensors run the reference; CPU tensors -> native CPU path"
    cuda = "CUDA tensors -> Triton kernels" if torch.cuda.is_available() else "no CUDA device"
    cpu = ("CPU tensors -> Triton interpreter (bfloat16: native CPU path)" if _cpu_interprets
           else "CPU tensors -> native CPU path (C++ kernels / PyTorch's native ops)")
    return f"{cuda}; {cpu}"


def autograd_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """The eager twin of a custom op: an ``autograd.Function`` running ``forward`` and recording with
    the op's own ``setup_context`` and ``backward`` (so both routes share one autograd).

    It is written ctx-first on purpose: a Function with a separate ``setup_context`` staticmethod
    binds its arguments through ``inspect.signature`` on every call (~30 µs).
    """
    def run(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(run), "backward": staticmethod(backward),
        "__doc__": f"Eager twin of the custom op behind {name}, with the same autograd.",
    })
