"""Parity checking by the tolerance rule of docs/design.md §4 (the FlashAttention rule).

The reference is computed in float64; PyTorch's own op runs in the test dtype. The kernel's largest
error against the reference may be at most ``factor`` times PyTorch's (2 for outputs, 3 for gradients)
plus a small absolute floor for the case where PyTorch happens to be exact.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Absolute floors: a few units in the last place of each dtype at magnitude 1.
ATOL_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference, treating matching NaNs and matching infinities as equal."""
    a = actual.detach().to(torch.float64)
    r = reference.detach().to(torch.float64)
    if a.shape != r.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference shape {tuple(r.shape)}")
    same = (a == r) | (a.isnan() & r.isnan())
    diff = (a - r).abs().masked_fill(same, 0.0)
    # A NaN where the reference has a number (or the reverse) is an infinite error.
    diff = diff.nan_to_num(nan=float("inf"))
    return diff.max().item() if diff.numel() else 0.0


def assert_parity(
    actual: torch.Tensor,
    reference: torch.Tensor,
    torch_result: torch.Tensor,
    *,
    grad: bool = False,
    atol: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``actual`` is within the tolerance rule of ``reference`` (float64).

    ``torch_result`` is PyTorch's own result in the test dtype; its error sets the budget.
    """
    if actual.dtype != torch_result.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != PyTorch's {torch_result.dtype}")
    factor = 3.0 if grad else 2.0
    floor = ATOL_FLOOR[actual.dtype] if atol is None else atol
    err = max_error(actual, reference)
    torch_err = max_error(torch_result, reference)
    scale = reference.detach().abs().nan_to_num(posinf=0, neginf=0).max().item() if reference.numel() else 0
    budget = factor * torch_err + floor * max(1.0, scale)
    if not err <= budget:
        raise AssertionError(
            f"{name}: max error {err:.3e} exceeds {factor:g} x PyTorch's {torch_err:.3e} "
            f"+ floor {floor:.1e} (budget {budget:.3e}, reference max |x| {scale:.3e})"
        )


def leaves(*tensors, dtype=None) -> list:
    """Detached copies that require grad (``None`` stays ``None``), optionally cast to ``dtype``:
    one independent set of inputs for each implementation under comparison."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)
            for t in tensors]


def grads(outputs, inputs, grad_outputs) -> list:
    """``torch.autograd.grad`` over the non-``None`` inputs, with ``None`` kept in place."""
    live = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outputs, live, grad_outputs))
    return [None if t is None else next(got) for t in inputs]


# ------------------------------------------------------------------------------------------------
# Launch stubs: what the launchers would launch, without running a kernel
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One Triton launch seen by ``stub_launches``.

    ``grids``: the grid as CUDA would get it, (x, y, z) with missing axes 1, once per config the
    autotuner could pick (every entry of ``Autotuner.configs``, merged with the launch's keyword
    arguments) for an autotuned kernel with a grid function; a single entry otherwise.
    ``args``/``kwargs``: the launch's own arguments (the autotuner's config not merged in)."""

    kernel: str
    grids: list[tuple[int, int, int]]
    args: tuple = dataclasses.field(repr=False)
    kwargs: dict = dataclasses.field(repr=False)


def _grid3(grid) -> tuple[int, int, int]:
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


def _grids(grid, meta: dict, configs) -> list[tuple[int, int, int]]:
    if not callable(grid):
        return [_grid3(grid)]
    if not configs:
        return [_grid3(grid(meta))]
    return [_grid3(grid({**meta, **c.all_kwargs()})) for c in configs]


@contextlib.contextmanager
def stub_launches(record: bool = True):
    """No Triton kernel runs inside; yields a list that receives one Launch per launch when record.

    Patches, at class level and restored on exit, ``Autotuner.run`` (an autotuned kernel: no
    tuning, no pre-hook, nothing compiled), ``JITFunction.run`` and the interpreter's
    ``InterpretedFunction.run``. Outputs of the launchers are left as allocated (garbage or NaN):
    only what would be launched is observed. With ``record=False`` every launch returns None at
    once, leaving the launchers' own host work (for timing it) and nothing else.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    if record:
        def tuner_run(tuner, *args, grid, warmup=False, **kwargs):
            if not warmup:
                meta = {**dict(zip(tuner.arg_names, args)), **kwargs}
                launches.append(Launch(tuner.base_fn.__name__,
                                       _grids(grid, meta, tuner.configs), args, kwargs))

        def jit_run(fn, *args, grid, warmup=False, **kwargs):
            if not warmup:
                meta = {**dict(zip(fn.arg_names, args)), **kwargs}
                launches.append(Launch(fn.__name__, _grids(grid, meta, None), args, kwargs))
    else:
        def tuner_run(*args, **kwargs):
            return None

        jit_run = tuner_run

    saved = Autotuner.run, JITFunction.run, InterpretedFunction.run
    Autotuner.run, JITFunction.run, InterpretedFunction.run = tuner_run, jit_run, jit_run
    try:
        yield launches
    finally:
        Autotuner.run, JITFunction.run, InterpretedFunction.run = saved


class DispatchedOps(TorchDispatchMode):
    """Counts the ops dispatched while active, by name: ``lightllm`` (``torch.ops.lightllm.*``)
    and ``aten``. The ops a lightllm custom op runs inside itself are not seen (the mode is off
    while an op it intercepted runs), so ``aten`` holds what ran *outside* lightllm: a model whose
    LayerNorms were all swapped dispatches no ``native_layer_norm``.

    Inside the mode lightllm's public functions take their custom-op route (the plain-eager route
    computes the same, bit for bit: tests/test_dispatch.py)."""

    def __init__(self):
        super().__init__()
        self.lightllm: collections.Counter[str] = collections.Counter()
        self.aten: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if func.namespace == "lightllm":
            self.lightllm[name] += 1
        elif func.namespace == "aten":
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def gpt_eager_reference():
    """``lightllm.models.GPT`` with every lightllm op replaced by its eager reference (plain
    PyTorch) while active: the oracle model of the convergence test and the "eager" provider of
    the generation benchmark."""
    import types

    from lightllm.models import gpt
    from lightllm.reference import attention, layer_norm, rms_norm, rotary
    from lightllm.reference import fused_linear as linear_gelu
    from lightllm.reference import fused_linear as swiglu

    ops = types.SimpleNamespace(
        layer_norm=layer_norm.layer_norm, add_layer_norm=layer_norm.add_layer_norm,
        rms_norm=rms_norm.rms_norm, add_rms_norm=rms_norm.add_rms_norm,
        scaled_dot_product_attention=attention.scaled_dot_product_attention,
        swiglu_feed_forward=swiglu.swiglu_feed_forward,
        rotary_embedding=rotary.rotary_embedding, rotary_cos_sin=rotary.rotary_cos_sin)

    def feed_forward_block(x, linear1, linear2, dropout, training, activation="gelu",
                           approximate="none", residual=None):
        h = linear_gelu.activate(torch.nn.functional.linear(x, linear1.weight, linear1.bias),
                                 "gelu_tanh" if activation == "gelu" and approximate == "tanh"
                                 else activation)
        y = torch.nn.functional.linear(torch.nn.functional.dropout(h, dropout, training),
                                       linear2.weight, linear2.bias)
        return y if residual is None else y + residual

    saved = gpt.LF, gpt.feed_forward_block
    gpt.LF, gpt.feed_forward_block = ops, feed_forward_block
    try:
        yield
    finally:
        gpt.LF, gpt.feed_forward_block = saved


def patched_three_way(model: torch.nn.Module, forward, inputs=(), *, grad: bool = False,
                      train: bool | None = None):
    """Run ``forward(m, *inputs)`` on three copies of ``model``: patched by ``lightllm.patch``
    ("ours", under :class:`DispatchedOps`), the model as it is (PyTorch's result in its dtype) and
    a float64 copy (the reference). Floating ``inputs`` are cast to each copy's dtype. With
    ``grad``, each entry also holds the gradients of one random projection of the output w.r.t.
    the floating inputs, then the parameters (in ``named_parameters`` order). ``train`` sets the
    mode of all three (None keeps the model's).

    Returns ``([(y, grads) ours, torch, reference], ops, report)``."""
    import copy

    import lightllm

    ours = copy.deepcopy(model)
    report = lightllm.patch(ours)
    reference = copy.deepcopy(model).double()
    results, projection, ops = [], None, None
    for m in (ours, model, reference):
        if train is not None:
            m.train(train)
        dtype = torch.float64 if m is reference else next(model.parameters()).dtype
        xs = [t.detach().to(dtype).requires_grad_(grad) if t.is_floating_point() else t
              for t in inputs]
        with torch.set_grad_enabled(grad):
            if m is ours:
                with DispatchedOps() as ops:
                    y = forward(m, *xs)
            else:
                y = forward(m, *xs)
        g = None
        if grad:
            if projection is None:
                projection = torch.randn(y.shape, device=y.device, dtype=torch.float64)
            wrt = [t for t in xs if t.is_floating_point()] + list(m.parameters())
            g = torch.autograd.grad((y * projection.to(y.dtype)).sum(), wrt, allow_unused=True)
        results.append((y, g))
    return results, ops, report


def assert_three_way(results, names=()) -> None:
    """The tolerance rule on :func:`patched_three_way`'s output and (named) gradients."""
    (y, g), (y_torch, g_torch), (y_ref, g_ref) = results
    assert_parity(y, y_ref, y_torch, name="output")
    if g is not None:
        for name, a, b, c in zip(names, g, g_torch, g_ref):
            if c is not None:
                assert_parity(a, c, b, grad=True, name=name)
