"""Linear + activation and the feed-forward: validation, dispatch, autograd, torch.library
registration. The activation is GeLU (exact or tanh) or ReLU, named by the strings of
``lightllm.kernels.fused_linear.ACTIVATIONS`` ("gelu", "gelu_tanh", "relu").

Four custom ops carry the work on 2-D (rows, features) views:
  lightllm::linear_act_fwd(x, weight, bias?, activation, save_pre)         -> (y, pre)
  lightllm::linear_act_bwd(dy, x, weight, pre, activation, need_dx, need_dw, need_db)
                                                                            -> (dx, dw, db)
  lightllm::feed_forward_fwd(x, w1, b1?, w2, b2?, residual?, activation, save) -> (y, h, pre)
  lightllm::feed_forward_bwd(dy, x, w1, w2, h, pre, activation, need_dx, need_dw1, need_db1,
                             need_dw2, need_db2)                  -> (dx, dw1, db1, dw2, db2)
``pre``/``h`` are returned only when a backward will need them (else empty; a backward reached
anyway recomputes them) and are marked non-differentiable; unneeded gradients come back empty.

Launchers: the Triton kernels (``lightllm.kernels.fused_linear``: CUDA, and CPU under the
interpreter) or, on the native CPU path, the same four functions on PyTorch's own ops (addmm with
the activation applied in place when no backward needs the pre-activation). The public functions pick one
per call and, in plain eager mode, call it directly (through an ``autograd.Function`` when a
gradient is needed); under ``torch.compile`` or a dispatch mode they call the custom ops. Both
routes share the autograd functions below.

Backward design: the forward *saves* the pre-activation (one extra (M, N) write, only when a gradient
is required) instead of recomputing it. Saving costs a write and a read of M·N elements (2·M·N·e
bytes); recomputing costs a matmul, 2·M·N·K FLOPs (a third of the layer's training work). Saving
wins whenever K > e · (matmul rate) / (bandwidth), about 470 for bf16 on an H100 (~700 TFLOP/s,
~3 TB/s); every target width (d_model >= 768) is above that. Eager PyTorch keeps the same tensor
for F.gelu's backward, so peak memory matches eager. Then:
  linear_act:    dPre = dY * act'(pre) (one elementwise Triton pass, db's partial sums fused),
                 dX = dPre @ W, dW = dPre^T @ X (cuBLAS via torch.matmul: plain matmuls).
  feed_forward:  dW2 = dY^T @ H, db2 = sum(dY), dR = dY;
                 dPre = (dY @ W2) * act'(pre) in the Triton matmul's epilogue (dH never stored);
                 dX = dPre @ W1, dW1 = dPre^T @ X, db1 = sum(dPre).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import check_broadcastable, dtype_error, shape_error, tensor_error
from lightllm.kernels import fused_linear as kernel
from lightllm.reference import fused_linear as reference

ACTIVATIONS = tuple(kernel.ACTIVATIONS)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ------------------------------------------------------------------------------------------------
# Launchers: the Triton kernels, or PyTorch's native ops (same signatures)
# ------------------------------------------------------------------------------------------------


def _native_linear_act_fwd(x, weight, bias, activation: str, save_pre: bool):
    pre = F.linear(x, weight, bias)
    if save_pre:
        return reference.activate(pre, activation), pre
    if activation == "relu":
        return pre.relu_(), None
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch._C._nn.gelu_(pre, approximate=approximate), None


def native_linear_fwd(x, weight, bias, residual):
    y = F.linear(x, weight, bias)
    return y if residual is None else y.add_(residual)


_NATIVE = SimpleNamespace(
    linear_act_fwd=_native_linear_act_fwd, linear_fwd=native_linear_fwd,
    matmul_act_grad=reference.matmul_act_grad, act_bwd=reference.act_bwd,
)


def launchers(x: Tensor, native=_NATIVE, what: str = "linear + activation"):
    """The Triton launchers where the kernels serve ``x``, else ``native`` (the namespace of the
    same launchers on PyTorch's ops; looked up per call, so a test can wrap a launcher). float64
    has no Triton path: a one-time warning names ``what``. Shared with ``lightllm.ops.swiglu``."""
    if x.dtype is not torch.float64 and _dispatch.runs_triton(x):
        return kernel
    if x.dtype is torch.float64 and _dispatch.triton_runs_on(x.device):
        _dispatch.warn_once(f"{what}:float64", f"{what}: float64 has no Triton path; running "
                            "PyTorch's own ops instead")
    return native


def empty(x: Tensor) -> Tensor:
    return x.new_empty((0,))


# ------------------------------------------------------------------------------------------------
# linear + activation
# ------------------------------------------------------------------------------------------------


def _linear_act_fwd_impl(x, weight, bias, activation, save_pre):
    y, pre = launchers(x).linear_act_fwd(x, weight, bias, activation, save_pre)
    return y, pre if pre is not None else empty(x)


def _linear_act_bwd_impl(dy, x, weight, pre, activation, need_dx, need_dw, need_db):
    dpre, db = launchers(pre).act_bwd(dy, pre, activation, need_db)
    dx = torch.matmul(dpre, weight) if need_dx else empty(x)
    dw = torch.matmul(dpre.t(), x) if need_dw else empty(x)
    return dx, dw, db.to(pre.dtype) if need_db else empty(x)


@torch.library.custom_op("lightllm::linear_act_fwd", mutates_args=())
def _linear_act_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, save_pre: bool
) -> tuple[Tensor, Tensor]:
    return _linear_act_fwd_impl(x, weight, bias, activation, save_pre)


@_linear_act_fwd.register_fake
def _(x, weight, bias, activation, save_pre):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


@torch.library.custom_op("lightllm::linear_act_bwd", mutates_args=())
def _linear_act_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, pre: Tensor, activation: str,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _linear_act_bwd_impl(dy, x, weight, pre, activation, need_dx, need_dw, need_db)


@_linear_act_bwd.register_fake
def _(dy, x, weight, pre, activation, need_dx, need_dw, need_db):
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(weight.shape if need_dw else (0,)),
            x.new_empty((weight.shape[0],) if need_db else (0,)))


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, activation, save_pre = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, weight, bias, pre)
    ctx.activation = activation
    ctx.saved_pre = save_pre
    ctx.has_bias = bias is not None


def _linear_act_backward(ctx, dy, _dpre):
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    x, weight, bias, pre = ctx.saved_tensors
    direct = _dispatch.direct(dy)
    if not ctx.saved_pre:  # called without save_pre (never by linear_gelu): recompute it
        fwd = _linear_act_fwd_impl if direct else _linear_act_fwd
        _, pre = fwd(x, weight, bias, ctx.activation, True)
    bwd = _linear_act_bwd_impl if direct else _linear_act_bwd
    dx, dw, db = bwd(dy, x, weight, pre, ctx.activation, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None)


_linear_act_fwd.register_autograd(_linear_act_backward, setup_context=_linear_act_setup)


_LinearAct = _dispatch.autograd_function("linear_act", _linear_act_fwd_impl,
                                           _linear_act_setup, _linear_act_backward)


# ------------------------------------------------------------------------------------------------
# feed_forward
# ------------------------------------------------------------------------------------------------


def _feed_forward_fwd_impl(x, w1, b1, w2, b2, residual, activation, save):
    launcher = launchers(x)
    h, pre = launcher.linear_act_fwd(x, w1, b1, activation, save)
    y = launcher.linear_fwd(h, w2, b2, residual)
    if not save:
        return y, empty(x), empty(x)
    return y, h, pre


def _feed_forward_bwd_impl(dy, x, w1, w2, h, pre, activation,
                           need_dx, need_dw1, need_db1, need_dw2, need_db2):
    dw2 = torch.matmul(dy.t(), h) if need_dw2 else empty(x)
    db2 = dy.sum(0) if need_db2 else empty(x)
    dx, dw1, db1 = empty(x), empty(x), empty(x)  # distinct: outputs may not alias each other
    if need_dx or need_dw1 or need_db1:
        dpre = launchers(x).matmul_act_grad(dy, w2, pre, activation)
        if need_dx:
            dx = torch.matmul(dpre, w1)
        if need_dw1:
            dw1 = torch.matmul(dpre.t(), x)
        if need_db1:
            db1 = dpre.sum(0)
    return dx, dw1, db1, dw2, db2


@torch.library.custom_op("lightllm::feed_forward_fwd", mutates_args=())
def _feed_forward_fwd(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    residual: Tensor | None, activation: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _feed_forward_fwd_impl(x, w1, b1, w2, b2, residual, activation, save)


@_feed_forward_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, activation, save):
    hidden = (x.shape[0], w1.shape[0]) if save else (0,)
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden)


@torch.library.custom_op("lightllm::feed_forward_bwd", mutates_args=())
def _feed_forward_bwd(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, h: Tensor, pre: Tensor, activation: str,
    need_dx: bool, need_dw1: bool, need_db1: bool, need_dw2: bool, need_db2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _feed_forward_bwd_impl(dy, x, w1, w2, h, pre, activation,
                                  need_dx, need_dw1, need_db1, need_dw2, need_db2)


@_feed_forward_bwd.register_fake
def _(dy, x, w1, w2, h, pre, activation, need_dx, need_dw1, need_db1, need_dw2, need_db2):
    def out(need, shape):
        return x.new_empty(shape if need else (0,))

    return (out(need_dx, x.shape), out(need_dw1, w1.shape), out(need_db1, (w1.shape[0],)),
            out(need_dw2, w2.shape), out(need_db2, (w2.shape[0],)))


def _feed_forward_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, activation, save = inputs
    _, h, pre = output
    ctx.mark_non_differentiable(h, pre)
    ctx.save_for_backward(x, w1, b1, w2, h, pre)
    ctx.activation = activation
    ctx.saved = save
    ctx.has_b1 = b1 is not None
    ctx.has_b2 = b2 is not None


def _feed_forward_backward(ctx, dy, _dh, _dpre):
    need = list(ctx.needs_input_grad[:6])  # x, w1, b1, w2, b2, residual
    need[2] = need[2] and ctx.has_b1
    need[4] = need[4] and ctx.has_b2
    grads = [None] * 5
    if any(need[:5]):
        x, w1, b1, w2, h, pre = ctx.saved_tensors
        direct = _dispatch.direct(dy)
        if not ctx.saved:  # called without save (never by feed_forward): recompute h and pre
            fwd = _linear_act_fwd_impl if direct else _linear_act_fwd
            h, pre = fwd(x, w1, b1, ctx.activation, True)
        bwd = _feed_forward_bwd_impl if direct else _feed_forward_bwd
        grads = bwd(dy, x, w1, w2, h, pre, ctx.activation, *need[:5])
        grads = [g if n else None for g, n in zip(grads, need[:5])]
    # The residual is added to the output: its gradient is dY itself.
    return (*grads, dy if need[5] else None, None, None)


_feed_forward_fwd.register_autograd(_feed_forward_backward, setup_context=_feed_forward_setup)


_FeedForward = _dispatch.autograd_function("feed_forward", _feed_forward_fwd_impl,
                                            _feed_forward_setup, _feed_forward_backward)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


APPROXIMATIONS = ("none", "tanh")
FEED_FORWARD_ACTIVATIONS = ("gelu", "relu")


def _gelu_activation(op: str, approximate) -> str:
    """The activation name of ``F.gelu(approximate=...)``."""
    if approximate == "none":
        return "gelu"
    if approximate == "tanh":
        return "gelu_tanh"
    raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def _check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise tensor_error(op, name, t)
    if t.dtype not in _DTYPES:
        raise dtype_error(op, name, t.dtype, _DTYPES)


def _check_like(op: str, name: str, t: Tensor, x: Tensor) -> None:
    """``t`` has ``x``'s dtype and device (the message names both)."""
    if t.device != x.device:
        raise RuntimeError(f"{op}: expected all tensors on one device, got x={x.device}, "
                           f"{name}={t.device}")
    if t.dtype is not x.dtype:
        raise TypeError(f"{op}: expected all tensors of one dtype, got x={x.dtype}, "
                        f"{name}={t.dtype}")


def check_weight(op: str, wn: str, weight, bn: str, bias, x: Tensor, in_features: int,
                  source: str | None = None) -> None:
    """``weight`` is a 2-D (out_features, in_features) tensor like ``x`` whose in_features equals
    ``in_features`` (named ``source`` in messages; by default x's last dimension); ``bias`` is None
    or (out_features,)."""
    _check_tensor(op, wn, weight)
    if weight.dim() != 2:
        raise ValueError(f"{op}: {wn} must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != in_features:
        source = source or f"the last dimension of x (shape {tuple(x.shape)})"
        raise ValueError(f"{op}: {wn} of shape {tuple(weight.shape)} expects in_features="
                         f"{weight.shape[1]}, but {source} is {in_features}")
    _check_like(op, wn, weight, x)
    if bias is not None:
        _check_tensor(op, bn, bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise shape_error(op, bn, bias, (weight.shape[0],))
        _check_like(op, bn, bias, x)


def check_x(op: str, x) -> None:
    _check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dimensions, got shape {tuple(x.shape)}")


def rows(op: str, x: Tensor, residual, d_out: int):
    """``x`` as 2-D rows (m, in_features) and ``residual`` (checked: broadcastable to the output
    (..., d_out), x's dtype and device) as (m, d_out); and whether the result must be viewed back
    to x's leading dimensions. Shared by the feed-forwards."""
    flat = x.dim() != 2
    if residual is not None:
        _check_tensor(op, "residual", residual)
        out_shape = (*x.shape[:-1], d_out)
        if residual.shape != out_shape:
            check_broadcastable(op, "residual", residual, out_shape)
            residual = residual.expand(out_shape)
            flat = True
        _check_like(op, "residual", residual, x)
    m = math.prod(x.shape[:-1]) if flat else x.shape[0]
    x2d = x.reshape(m, x.shape[-1]) if flat else x
    r2d = residual.reshape(m, d_out) if flat and residual is not None else residual
    return x2d, r2d, flat


def _linear_act(op: str, x, weight, bias, activation: str) -> Tensor:
    check_x(op, x)
    check_weight(op, "weight", weight, "bias", bias, x, x.shape[-1])
    flat = x.dim() != 2
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if flat else x
    if not _dispatch.direct(x):
        save = _dispatch.needs_grad(x, weight, bias)
        y = _linear_act_fwd(x2d, weight, bias, activation, save)[0]
    elif _dispatch.needs_grad(x, weight, bias):
        y = _LinearAct.apply(x2d, weight, bias, activation, True)[0]
    else:
        y = launchers(x).linear_act_fwd(x2d, weight, bias, activation, False)[0]
    return y.view(*x.shape[:-1], weight.shape[0]) if flat else y


def linear_act(x: Tensor, weight: Tensor, bias: Tensor | None = None,
               activation: str = "gelu") -> Tensor:
    """``act(F.linear(x, weight, bias))`` for an activation named as in ``ACTIVATIONS`` ("gelu",
    "gelu_tanh", "relu"): the one entry the modules and ``lightllm.patch`` share."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"linear_act: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _linear_act("linear_act", x, weight, bias, activation)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                approximate: str = "none") -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)`` as one Triton matmul whose
    epilogue adds the bias and applies GeLU (exact erf form, or ``approximate="tanh"``).

    ``x`` is (..., in_features) with any leading dims and strides: a layout that cannot be
    viewed as 2-D is copied by ``reshape``, and a 2-D view with no unit stride (e.g. a strided
    slice) is copied by the launcher, so the kernels' loads stay contiguous. ``weight`` is
    (out_features, in_features) with any strides (a transposed (in, out) buffer such as GPT-2's
    ``Conv1D`` weight passes as ``weight.t()`` without a copy), ``bias`` (out_features,); all of
    one floating dtype and device. On the native CPU path (and for float64) it is PyTorch's addmm
    and GeLU. Forward and backward.
    """
    return _linear_act("linear_gelu", x, weight, bias, _gelu_activation("linear_gelu", approximate))


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.relu(F.linear(x, weight, bias))`` with the bias and ReLU in the matmul's epilogue;
    shapes, layouts and dispatch as :func:`linear_gelu`. Forward and backward."""
    return _linear_act("linear_relu", x, weight, bias, "relu")


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                 approximate: str = "none", residual: Tensor | None = None,
                 activation: str = "gelu") -> Tensor:
    """The feed-forward ``F.linear(act(F.linear(x, w1, b1)), w2, b2) (+ residual)``: two Triton
    matmuls, the first with bias + activation in its epilogue, the second adding b2 and the
    residual in its epilogue. ``activation`` is ``"gelu"`` (``approximate`` as in ``F.gelu``) or
    ``"relu"``.

    ``w1`` is (d_ff, d_model), ``w2`` (d_model, d_ff) (the ``nn.Linear`` layouts, any strides);
    ``residual`` broadcasts to the output (..., d_model) and has the dtype of ``x``.
    """
    op = "feed_forward"
    check_x(op, x)
    check_weight(op, "w1", w1, "b1", b1, x, x.shape[-1])
    check_weight(op, "w2", w2, "b2", b2, x, w1.shape[0], "w1's out_features (d_ff)")
    if activation == "relu":
        act = "relu"
    elif activation == "gelu":
        act = _gelu_activation(op, approximate)
    else:
        raise ValueError(f"{op}: activation must be 'gelu' or 'relu', got {activation!r}")
    d_model = w2.shape[0]
    x2d, r2d, flat = rows(op, x, residual, d_model)
    # h and pre are saved only when a weight-side gradient needs them (the residual's is dY).
    save = _dispatch.needs_grad(x, w1, b1, w2, b2)
    if not _dispatch.direct(x):
        y = _feed_forward_fwd(x2d, w1, b1, w2, b2, r2d, act, save)[0]
    elif save or _dispatch.needs_grad(residual):
        y = _FeedForward.apply(x2d, w1, b1, w2, b2, r2d, act, save)[0]
    else:
        launcher = launchers(x)
        h = launcher.linear_act_fwd(x2d, w1, b1, act, False)[0]
        y = launcher.linear_fwd(h, w2, b2, r2d)
    return y.view(*x.shape[:-1], d_model) if flat else y
