"""The two instruments of ``benchmarks.traffic``: bytes moved and kernel launches, counted.

``Counter`` is one context manager holding both:

* **Triton kernels, in the interpreter** (``TRITON_INTERPRET=1``): the interpreter's builder is
  patched so every load and store a program issues adds its bytes. Masked accesses count only
  their active lanes; ``create_load``/``create_store``, tensor-descriptor loads/stores (TMA) and
  gathers/scatters all reach ``create_masked_load``/``create_masked_store`` in triton 3.8, so those
  two methods see every plain access exactly once; atomics (``create_atomic_rmw`` / ``_cas``) count
  a read and a write per active lane. Each grid launch (``GridExecutor.__call__``) is one launch.
  What is counted is what the kernel's loads request: a tile re-read by a later program counts
  again (on a GPU it may come from L2), which is what a kernel's design decides.
  With ``execute=False`` (a "dry" launch) the kernel does not run: its traffic is given by
  ``formula(launch)`` instead, so lightllm runs on meta tensors at sizes the interpreter could
  never execute, every launch priced by the formula the executed launches confirm.
* **aten ops, by a ``TorchDispatchMode``**: each op that moves memory reads its input tensors and
  writes its outputs, once each, and is one launch. A tensor's bytes are those of the elements it
  addresses: a stride-0 (expanded) dimension touches one element, not ``size`` of them, so an
  expanded view costs what its storage holds (``distinct_bytes``). Destinations that are only
  written (``copy_``'s self, ``fill_``/``zero_``, ``out=``) are not read. An input passed twice is
  read once. Free ops — views (outputs aliasing an input by their schema), ``_unsafe_view``,
  allocation without initialisation (``empty*``, ``new_empty*``), metadata (``set_``, ``resize_``,
  ``lift_fresh``, ``sym_*``) and ops that touch no tensor at all (``promote_types``, which
  lightllm's Python calls on dtypes) — count nothing.
  Ops of lightllm's own ``torch.library`` custom ops (``torch.ops.lightllm.*``) are not counted as
  such: their Python body runs again under the mode, so its aten ops and Triton launches count
  instead (a dispatch mode otherwise sees only the custom op, its body running with the mode
  popped). A custom op without a Python body (the C++ kernels of ``lightllm._C``) counts as one
  aten op. aten ops the interpreter itself performs to run a kernel are not counted.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Allocation without initialisation and metadata: no memory moves.
_FREE_OPS = {
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.empty_like.default, aten._unsafe_view.default,
    aten.lift_fresh.default, aten.resize_.default, aten.set_.source_Storage_storage_offset,
    aten.set_.source_Storage, aten.set_.source_Tensor, aten.sym_size.int, aten.sym_stride.int,
    aten.sym_numel.default, aten.sym_storage_offset.default, aten.is_same_size.default,
}
# Ops whose ``self`` is overwritten without being read.
_OVERWRITES_SELF = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_",
                    "exponential_"}


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: stride-0 dimensions count one element."""
    if t.numel() == 0:
        return 0
    return t.element_size() * math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0)


def _tensor_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write
                                 for r in returns)


def _tensors(values) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(_tensors(v))
    return out


def aten_op_bytes(func, args, kwargs, outputs) -> tuple[int, int]:
    """(read, written) bytes of one aten op, by the rules of the module docstring."""
    schema = func._schema
    write_only = set()
    for i, arg in enumerate(schema.arguments):
        overwritten = (arg.name == "self" and func._schema.name.split("::")[-1] in _OVERWRITES_SELF)
        if arg.alias_info is not None and arg.alias_info.is_write and (overwritten or arg.kwarg_only):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            write_only.update(_tensor_key(t) for t in _tensors([value]))
    reads, seen = 0, set()
    for t in _tensors(list(args) + list(kwargs.values())):
        key = _tensor_key(t)
        if key not in seen and key not in write_only:
            seen.add(key)
            reads += distinct_bytes(t)
    writes, seen = 0, set()
    for t in _tensors([outputs]):
        key = _tensor_key(t)
        if key not in seen:
            seen.add(key)
            writes += distinct_bytes(t)
    return reads, writes


@dataclass
class Launch:
    """One Triton grid launch: the kernel, its named arguments (tensors, scalars, constexprs),
    the 3-D grid, and the bytes it read and wrote (counted, or the formula's when dry)."""

    kernel: str
    args: dict[str, Any]
    grid: tuple[int, int, int]
    read: int = 0
    written: int = 0


@dataclass
class Tally:
    """Totals and the split per kernel (Triton kernel name, or aten op name)."""

    read: int = 0
    written: int = 0
    launches: int = 0
    per_kernel: dict[str, dict[str, int]] = field(default_factory=dict)
    triton_launches: list[Launch] = field(default_factory=list)

    def add(self, name: str, read: int, written: int, launches: int) -> None:
        self.read += read
        self.written += written
        self.launches += launches
        entry = self.per_kernel.setdefault(name, {"bytes_read": 0, "bytes_written": 0,
                                                  "launches": 0})
        entry["bytes_read"] += read
        entry["bytes_written"] += written
        entry["launches"] += launches


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counter: Counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counter.in_kernel:  # the interpreter's own copies around a launch
            return func(*args, **kwargs)
        if func.namespace == "lightllm":
            opdef = torch._library.custom_ops._maybe_get_opdef(func)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func in _FREE_OPS or _is_view(func):
            return out
        if not _tensors(list(args) + list(kwargs.values()) + [out]):
            return out  # dtype/shape arithmetic (aten.promote_types): no memory moves
        read, written = aten_op_bytes(func, args, kwargs, out)
        self.counter.tally.add(f"aten.{func._schema.name.split('::')[-1]}", read, written, 1)
        return out


def _active(mask: np.ndarray, shape) -> int:
    return int(np.broadcast_to(mask, shape).sum())


def _itemsize(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


class Counter:
    """Count aten ops and Triton launches inside ``with Counter() as c:``; then ``c.tally``.

    ``execute=False`` prices each Triton launch by ``formula(launch) -> (read, written)`` without
    running it; ``overrides`` maps a kernel name to constexprs replacing the launch's own (the
    block sizes a GPU config would take), applied to dry launches only.
    """

    def __init__(self, *, execute: bool = True,
                 formula: Callable[[Launch], tuple[int, int]] | None = None,
                 overrides: dict[str, dict[str, int]] | None = None):
        if not execute and formula is None:
            raise ValueError("Counter(execute=False) needs a formula to price the launches")
        self.execute = execute
        self.formula = formula
        self.overrides = overrides or {}
        self.tally = Tally()
        self.in_kernel = False
        self._launch: Launch | None = None
        self._stack = contextlib.ExitStack()

    # -- the interpreter's memory ops --

    def _patch_builder(self, builder) -> None:
        cls = type(builder)
        counter = self

        def masked_load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
            counter._launch.read += _active(mask.data, ptrs.data.shape) * _itemsize(ptrs)
            return cls.create_masked_load(builder, ptrs, mask, other, cache_modifier,
                                          eviction_policy, is_volatile)

        def masked_store(ptrs, value, mask, cache_modifier, eviction_policy):
            counter._launch.written += _active(mask.data, ptrs.data.shape) * _itemsize(ptrs)
            return cls.create_masked_store(builder, ptrs, value, mask, cache_modifier,
                                           eviction_policy)

        def atomic_rmw(rmw_op, ptr, val, mask, sem, scope):
            n = _active(mask.data, ptr.data.shape) * _itemsize(ptr)
            counter._launch.read += n
            counter._launch.written += n
            return cls.create_atomic_rmw(builder, rmw_op, ptr, val, mask, sem, scope)

        def atomic_cas(ptr, cmp, val, sem, scope):
            n = ptr.data.size * _itemsize(ptr)
            counter._launch.read += n
            counter._launch.written += n
            return cls.create_atomic_cas(builder, ptr, cmp, val, sem, scope)

        for name, fn in (("create_masked_load", masked_load), ("create_masked_store", masked_store),
                         ("create_atomic_rmw", atomic_rmw), ("create_atomic_cas", atomic_cas)):
            self._stack.enter_context(_instance_attr(builder, name, fn))

    def _patch_launch(self, executor_cls) -> None:
        original = executor_cls.__call__
        counter = self

        def call(executor, *args, **kwargs):
            names = inspect.getfullargspec(executor.fn).args
            kwargs = {k: v for k, v in kwargs.items() if k in names}
            name = executor.fn.__name__
            if not counter.execute:
                kwargs.update(counter.overrides.get(name, {}))
            named = inspect.getcallargs(executor.fn, *args, **kwargs)
            grid = executor.grid(named) if callable(executor.grid) else executor.grid
            grid = tuple(grid) + (1,) * (3 - len(grid))
            launch = Launch(name, named, grid)
            if counter.execute:
                counter._launch, counter.in_kernel = launch, True
                try:
                    original(executor, *args, **kwargs)
                finally:
                    counter._launch, counter.in_kernel = None, False
            else:
                launch.read, launch.written = counter.formula(launch)
            counter.tally.triton_launches.append(launch)
            counter.tally.add(name, launch.read, launch.written, 1)

        self._stack.enter_context(_instance_attr(executor_cls, "__call__", call))

    def __enter__(self) -> Counter:
        from triton.runtime import interpreter

        try:
            self._patch_builder(interpreter.interpreter_builder)
            self._patch_launch(interpreter.GridExecutor)
            self._stack.enter_context(_AtenCounter(self))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@contextlib.contextmanager
def _instance_attr(obj, name: str, value):
    """Set ``obj.name`` for the duration (restoring the class's own lookup, or the old value)."""
    had = name in vars(obj)
    saved = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, saved)
        else:
            delattr(obj, name)
