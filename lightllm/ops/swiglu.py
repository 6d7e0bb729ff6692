"""SwiGLU: the gated projection ``silu(x Wg^T + bg) * (x Wu^T + bu)`` and the Llama feed-forward
``(silu(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd (+ residual)``: validation, dispatch, autograd,
torch.library registration.

A file of its own beside ``lightllm/ops/fused_linear.py`` (four more custom ops would make that one
hard to read), but not a copy of it: the kernels are that file's matmul with its GATED epilogue
(``lightllm.kernels.fused_linear``), and the checks, the launcher choice, the row flattening and
the residual handling are its helpers. ``w_gate`` and ``w_up`` stay separate (the ``nn.Linear``
layouts of ``gate_proj``/``up_proj``): the gated matmul reads both, never a concatenated copy.

Four custom ops carry the work on 2-D (rows, features) views:
  lightllm::linear_swiglu_fwd(x, w_gate, w_up, b_gate?, b_up?, save)          -> (h, g, u)
  lightllm::linear_swiglu_bwd(dh, x, w_gate, w_up, g, u, need_dx, need_dw_gate, need_dw_up,
                              need_db_gate, need_db_up)   -> (dx, dw_gate, dw_up, db_gate, db_up)
  lightllm::swiglu_feed_forward_fwd(x, w_gate, w_up, w_down, b_gate?, b_up?, b_down?, residual?,
                                    save)                                      -> (y, h, g, u)
  lightllm::swiglu_feed_forward_bwd(dy, x, w_gate, w_up, w_down, h, g, u, need_dx, need_dw_gate,
                                    need_dw_up, need_dw_down, need_db_gate, need_db_up,
                                    need_db_down)
                       -> (dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down)
``g``/``u`` (and the feed-forward's ``h``) come back only when a backward will need them (else
empty; a backward reached anyway recomputes them) and are marked non-differentiable; unneeded
gradients come back empty. Dispatch and the eager-direct route are those of fused_linear: Triton
launchers on CUDA and under the interpreter, PyTorch's ops on the native CPU path (two addmm's and
silu applied in place when no backward needs the pre-activations) and for float64.

Backward design: the forward *saves* g and u (two extra (M, d_ff) writes, only when a gradient is
required) instead of recomputing them. Saving costs a write and a read of 2·M·F elements
(4·M·F·e bytes); recomputing costs the gated matmul again, 4·M·F·K FLOPs (a third of the
projection's training work). Saving wins whenever K > e · (matmul rate) / (bandwidth), about 470
for bf16 on an H100 (~700 TFLOP/s, ~3 TB/s); Llama widths (d_model >= 2048) are far above it.
Eager PyTorch keeps more: g (silu's input), silu(g) and u (the product's inputs) and h. The
feed-forward also keeps h = silu(g) * u, the down projection's input, which its forward writes
anyway (dW_down = dY^T H needs it as a matmul operand). Then, with s = sigmoid(g):
  linear_swiglu:  dG = dH * u * (s + g s (1 - s)), dU = dH * g s — one elementwise Triton pass
                  reading dH, g, u once, with both db's partial sums fused;
  feed-forward:   dW_down = dY^T H, db_down = sum(dY), dR = dY; dG and dU in the epilogue of the
                  Triton matmul dH = dY @ W_down (dH never stored: one accumulator, two outputs);
  both:           dX = dG @ Wg + dU @ Wu (the second product accumulated onto the first by addmm),
                  dWg = dG^T X, dWu = dU^T X, db's as column sums (cuBLAS via torch.matmul).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightllm import _dispatch
from lightllm.ops.fused_linear import (
    check_weight,
    check_x,
    empty,
    launchers,
    native_linear_fwd,
    rows,
)
from lightllm.reference import fused_linear as reference

# ------------------------------------------------------------------------------------------------
# Launchers: the Triton kernels (lightllm.kernels.fused_linear), or PyTorch's native ops
# ------------------------------------------------------------------------------------------------


def _native_linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save: bool):
    g = F.linear(x, w_gate, b_gate)
    u = F.linear(x, w_up, b_up)
    if save:
        return F.silu(g) * u, g, u
    return torch._C._nn.silu_(g).mul_(u), None, None


_NATIVE = SimpleNamespace(
    linear_swiglu_fwd=_native_linear_swiglu_fwd, linear_fwd=native_linear_fwd,
    matmul_swiglu_grad=reference.matmul_swiglu_grad, swiglu_bwd=reference.swiglu_bwd,
)
_WHAT = "SwiGLU"


def _input_grads(x, w_gate, w_up, dg, du, need_dx, need_dwg, need_dwu):
    """dX = dG Wg + dU Wu, dWg = dG^T X, dWu = dU^T X (cuBLAS), empty where not needed."""
    dx = torch.matmul(dg, w_gate).addmm_(du, w_up) if need_dx else empty(x)
    dwg = torch.matmul(dg.t(), x) if need_dwg else empty(x)
    dwu = torch.matmul(du.t(), x) if need_dwu else empty(x)
    return dx, dwg, dwu


# ------------------------------------------------------------------------------------------------
# linear_swiglu
# ------------------------------------------------------------------------------------------------


def _linear_swiglu_fwd_impl(x, w_gate, w_up, b_gate, b_up, save):
    h, g, u = launchers(x, _NATIVE, _WHAT).linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save)
    return (h, g, u) if save else (h, empty(x), empty(x))


def _linear_swiglu_bwd_impl(dh, x, w_gate, w_up, g, u, need_dx, need_dwg, need_dwu, need_dbg,
                            need_dbu):
    dg, du, dbg, dbu = launchers(g, _NATIVE, _WHAT).swiglu_bwd(dh, g, u, need_dbg or need_dbu)
    dx, dwg, dwu = _input_grads(x, w_gate, w_up, dg, du, need_dx, need_dwg, need_dwu)
    return (dx, dwg, dwu, dbg.to(g.dtype) if need_dbg else empty(x),
            dbu.to(g.dtype) if need_dbu else empty(x))


@torch.library.custom_op("lightllm::linear_swiglu_fwd", mutates_args=())
def _linear_swiglu_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_swiglu_fwd_impl(x, w_gate, w_up, b_gate, b_up, save)


@_linear_swiglu_fwd.register_fake
def _(x, w_gate, w_up, b_gate, b_up, save):
    shape = (x.shape[0], w_gate.shape[0])
    saved = shape if save else (0,)
    return x.new_empty(shape), x.new_empty(saved), x.new_empty(saved)


@torch.library.custom_op("lightllm::linear_swiglu_bwd", mutates_args=())
def _linear_swiglu_bwd(
    dh: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, g: Tensor, u: Tensor,
    need_dx: bool, need_dw_gate: bool, need_dw_up: bool, need_db_gate: bool, need_db_up: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _linear_swiglu_bwd_impl(dh, x, w_gate, w_up, g, u, need_dx, need_dw_gate, need_dw_up,
                                   need_db_gate, need_db_up)


def _fake_grads(x, weights, needs):
    """Fake gradients of (x, *weights, *their biases) in that order; empty where not needed."""
    shapes = [x.shape] + [w.shape for w in weights] + [(w.shape[0],) for w in weights]
    return tuple(x.new_empty(s if n else (0,)) for s, n in zip(shapes, needs))


@_linear_swiglu_bwd.register_fake
def _(dh, x, w_gate, w_up, g, u, *needs):
    return _fake_grads(x, (w_gate, w_up), needs)


def _linear_swiglu_setup(ctx, inputs, output):
    x, w_gate, w_up, b_gate, b_up, save = inputs
    _, g, u = output
    ctx.mark_non_differentiable(g, u)
    ctx.save_for_backward(x, w_gate, w_up, b_gate, b_up, g, u)
    ctx.saved = save
    ctx.has_biases = (b_gate is not None, b_up is not None)


def _linear_swiglu_backward(ctx, dh, _dg, _du):
    need = list(ctx.needs_input_grad[:5])  # x, w_gate, w_up, b_gate, b_up
    need[3] = need[3] and ctx.has_biases[0]
    need[4] = need[4] and ctx.has_biases[1]
    if not any(need):
        return None, None, None, None, None, None
    x, w_gate, w_up, b_gate, b_up, g, u = ctx.saved_tensors
    direct = _dispatch.direct(dh)
    if not ctx.saved:  # called without save (never by linear_swiglu): recompute g and u
        fwd = _linear_swiglu_fwd_impl if direct else _linear_swiglu_fwd
        _, g, u = fwd(x, w_gate, w_up, b_gate, b_up, True)
    bwd = _linear_swiglu_bwd_impl if direct else _linear_swiglu_bwd
    grads = bwd(dh, x, w_gate, w_up, g, u, *need)
    return (*(gr if n else None for gr, n in zip(grads, need)), None)


_linear_swiglu_fwd.register_autograd(_linear_swiglu_backward, setup_context=_linear_swiglu_setup)

_LinearSwiGLU = _dispatch.autograd_function("linear_swiglu", _linear_swiglu_fwd_impl,
                                             _linear_swiglu_setup, _linear_swiglu_backward)


# ------------------------------------------------------------------------------------------------
# swiglu_feed_forward
# ------------------------------------------------------------------------------------------------


def _swiglu_ff_fwd_impl(x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save):
    launcher = launchers(x, _NATIVE, _WHAT)
    h, g, u = launcher.linear_swiglu_fwd(x, w_gate, w_up, b_gate, b_up, save)
    y = launcher.linear_fwd(h, w_down, b_down, residual)
    if not save:
        return y, empty(x), empty(x), empty(x)
    return y, h, g, u


def _swiglu_ff_bwd_impl(dy, x, w_gate, w_up, w_down, h, g, u, need_dx, need_dwg, need_dwu,
                        need_dwd, need_dbg, need_dbu, need_dbd):
    dwd = torch.matmul(dy.t(), h) if need_dwd else empty(x)
    dbd = dy.sum(0) if need_dbd else empty(x)
    # distinct empties: op outputs may not alias each other
    dx, dwg, dwu, dbg, dbu = empty(x), empty(x), empty(x), empty(x), empty(x)
    if need_dx or need_dwg or need_dwu or need_dbg or need_dbu:
        dg, du = launchers(x, _NATIVE, _WHAT).matmul_swiglu_grad(dy, w_down, g, u)
        dx, dwg, dwu = _input_grads(x, w_gate, w_up, dg, du, need_dx, need_dwg, need_dwu)
        if need_dbg:
            dbg = dg.sum(0)
        if need_dbu:
            dbu = du.sum(0)
    return dx, dwg, dwu, dwd, dbg, dbu, dbd


@torch.library.custom_op("lightllm::swiglu_feed_forward_fwd", mutates_args=())
def _swiglu_ff_fwd(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, b_gate: Tensor | None,
    b_up: Tensor | None, b_down: Tensor | None, residual: Tensor | None, save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _swiglu_ff_fwd_impl(x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save)


@_swiglu_ff_fwd.register_fake
def _(x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save):
    hidden = (x.shape[0], w_gate.shape[0]) if save else (0,)
    return (x.new_empty((x.shape[0], w_down.shape[0])), x.new_empty(hidden), x.new_empty(hidden),
            x.new_empty(hidden))


@torch.library.custom_op("lightllm::swiglu_feed_forward_bwd", mutates_args=())
def _swiglu_ff_bwd(
    dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, h: Tensor, g: Tensor,
    u: Tensor, need_dx: bool, need_dw_gate: bool, need_dw_up: bool, need_dw_down: bool,
    need_db_gate: bool, need_db_up: bool, need_db_down: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _swiglu_ff_bwd_impl(dy, x, w_gate, w_up, w_down, h, g, u, need_dx, need_dw_gate,
                               need_dw_up, need_dw_down, need_db_gate, need_db_up, need_db_down)


@_swiglu_ff_bwd.register_fake
def _(dy, x, w_gate, w_up, w_down, h, g, u, *needs):
    return _fake_grads(x, (w_gate, w_up, w_down), needs)


def _swiglu_ff_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual, save = inputs
    _, h, g, u = output
    ctx.mark_non_differentiable(h, g, u)
    ctx.save_for_backward(x, w_gate, w_up, w_down, b_gate, b_up, h, g, u)
    ctx.saved = save
    ctx.has_biases = (b_gate is not None, b_up is not None, b_down is not None)


def _swiglu_ff_backward(ctx, dy, _dh, _dg, _du):
    need = list(ctx.needs_input_grad[:8])  # x, w_gate, w_up, w_down, 3 biases, residual
    for i, has in enumerate(ctx.has_biases, 4):
        need[i] = need[i] and has
    grads = [None] * 7
    if any(need[:7]):
        x, w_gate, w_up, w_down, b_gate, b_up, h, g, u = ctx.saved_tensors
        direct = _dispatch.direct(dy)
        if not ctx.saved:  # called without save (never by swiglu_feed_forward): recompute
            fwd = _linear_swiglu_fwd_impl if direct else _linear_swiglu_fwd
            h, g, u = fwd(x, w_gate, w_up, b_gate, b_up, True)
        bwd = _swiglu_ff_bwd_impl if direct else _swiglu_ff_bwd
        grads = bwd(dy, x, w_gate, w_up, w_down, h, g, u, *need[:7])
        grads = [gr if n else None for gr, n in zip(grads, need[:7])]
    # The residual is added to the output: its gradient is dY itself.
    return (*grads, dy if need[7] else None, None)


_swiglu_ff_fwd.register_autograd(_swiglu_ff_backward, setup_context=_swiglu_ff_setup)

_SwiGLUFeedForward = _dispatch.autograd_function("swiglu_feed_forward", _swiglu_ff_fwd_impl,
                                                  _swiglu_ff_setup, _swiglu_ff_backward)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def _check_gate_up(op: str, x: Tensor, w_gate, w_up, b_gate, b_up) -> None:
    """w_gate (d_ff, d_model) and w_up of the same shape, their biases (d_ff,), all like x."""
    check_x(op, x)
    check_weight(op, "w_gate", w_gate, "b_gate", b_gate, x, x.shape[-1])
    # Before w_up's own checks: a w_up of another d_ff is named as such, not by its bias.
    if isinstance(w_up, Tensor) and w_up.dim() == 2 and w_up.shape[0] != w_gate.shape[0]:
        raise ValueError(f"{op}: w_up must have w_gate's shape {tuple(w_gate.shape)}, got "
                         f"{tuple(w_up.shape)}")
    check_weight(op, "w_up", w_up, "b_up", b_up, x, x.shape[-1])


def linear_swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None = None,
                  b_up: Tensor | None = None) -> Tensor:
    """``F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up)`` as one Triton matmul:
    each program reads its x tile once for both weights, keeps two fp32 accumulators, and its
    epilogue adds the biases and writes silu(g) * u (g and u reach memory only when a backward
    needs them).

    ``x`` is (..., d_model) with any leading dims and strides; ``w_gate`` and ``w_up`` are two
    separate (d_ff, d_model) tensors (the ``nn.Linear`` layouts of ``gate_proj``/``up_proj``, any
    strides; never concatenated), ``b_gate``/``b_up`` (d_ff,) or None each; all of one floating
    dtype and device. On the native CPU path (and for float64) it is PyTorch's addmm and SiLU.
    Forward and backward.
    """
    op = "linear_swiglu"
    _check_gate_up(op, x, w_gate, w_up, b_gate, b_up)
    flat = x.dim() != 2
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if flat else x
    if not _dispatch.direct(x):
        save = _dispatch.needs_grad(x, w_gate, w_up, b_gate, b_up)
        h = _linear_swiglu_fwd(x2d, w_gate, w_up, b_gate, b_up, save)[0]
    elif _dispatch.needs_grad(x, w_gate, w_up, b_gate, b_up):
        h = _LinearSwiGLU.apply(x2d, w_gate, w_up, b_gate, b_up, True)[0]
    else:
        h = launchers(x, _NATIVE, _WHAT).linear_swiglu_fwd(x2d, w_gate, w_up, b_gate, b_up,
                                                           False)[0]
    return h.view(*x.shape[:-1], w_gate.shape[0]) if flat else h


def swiglu_feed_forward(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                        b_gate: Tensor | None = None, b_up: Tensor | None = None,
                        b_down: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """The SwiGLU feed-forward of Llama (transformers' ``LlamaMLP``):
    ``F.linear(F.silu(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up), w_down, b_down)
    (+ residual)`` as two Triton matmuls — the gated one (:func:`linear_swiglu`), then the down
    projection with b_down and the residual in its epilogue.

    ``w_gate``/``w_up`` are (d_ff, d_model), ``w_down`` (d_model, d_ff) (the ``nn.Linear``
    layouts, any strides); ``residual`` broadcasts to the output (..., d_model) and has the dtype
    of ``x``.
    """
    op = "swiglu_feed_forward"
    _check_gate_up(op, x, w_gate, w_up, b_gate, b_up)
    check_weight(op, "w_down", w_down, "b_down", b_down, x, w_gate.shape[0],
                  "w_gate's out_features (d_ff)")
    d_model = w_down.shape[0]
    x2d, r2d, flat = rows(op, x, residual, d_model)
    # h, g and u are saved only when a weight-side gradient needs them (the residual's is dY).
    save = _dispatch.needs_grad(x, w_gate, w_up, w_down, b_gate, b_up, b_down)
    if not _dispatch.direct(x):
        y = _swiglu_ff_fwd(x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, r2d, save)[0]
    elif save or _dispatch.needs_grad(residual):
        y = _SwiGLUFeedForward.apply(x2d, w_gate, w_up, w_down, b_gate, b_up, b_down, r2d,
                                     save)[0]
    else:
        launcher = launchers(x, _NATIVE, _WHAT)
        h = launcher.linear_swiglu_fwd(x2d, w_gate, w_up, b_gate, b_up, False)[0]
        y = launcher.linear_fwd(h, w_down, b_down, r2d)
    return y.view(*x.shape[:-1], d_model) if flat else y

