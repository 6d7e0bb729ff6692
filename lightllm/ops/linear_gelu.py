"""Linear + GeLU and the GeLU feed-forward: validation, dispatch, autograd, torch.library registration.

Four custom ops carry the work on 2-D (rows, features) views:
  lightllm::linear_gelu_fwd(x, weight, bias?, approximate, save_pre)        -> (y, pre)
  lightllm::linear_gelu_bwd(dy, x, weight, pre, approximate, need_dx, need_dw, need_db)
                                                                            -> (dx, dw, db)
  lightllm::feed_forward_fwd(x, w1, b1?, w2, b2?, residual?, approximate, save) -> (y, h, pre)
  lightllm::feed_forward_bwd(dy, x, w1, w2, h, pre, approximate, need_dx, need_dw1, need_db1,
                             need_dw2, need_db2)                  -> (dx, dw1, db1, dw2, db2)
``pre``/``h`` are returned only when a backward will need them (else empty; a backward reached
anyway recomputes them) and are marked non-differentiable; unneeded gradients come back empty.

Backward design: the forward *saves* the pre-activation (one extra (M, N) write, only when a gradient
is required) instead of recomputing it. Saving costs a write and a read of M·N elements (2·M·N·e
bytes); recomputing costs a matmul, 2·M·N·K FLOPs (a third of the layer's training work). Saving
wins whenever K > e · (matmul rate) / (bandwidth), about 470 for bf16 on an H100 (~700 TFLOP/s,
~3 TB/s); every target width (d_model >= 768) is above that. Eager PyTorch keeps the same tensor
for F.gelu's backward, so peak memory matches eager. Then:
  linear_gelu:   dPre = dY * gelu'(pre) (one elementwise Triton pass, db's partial sums fused),
                 dX = dPre @ W, dW = dPre^T @ X (cuBLAS via torch.matmul: plain matmuls).
  feed_forward:  dW2 = dY^T @ H, db2 = sum(dY), dR = dY;
                 dPre = (dY @ W2) * gelu'(pre) in the Triton matmul's epilogue (dH never stored);
                 dX = dPre @ W1, dW1 = dPre^T @ X, db1 = sum(dPre).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import (
    check_broadcastable,
    check_optional_tensor,
    check_same,
    check_shape,
    check_tensor,
)
from lightllm.kernels import linear_gelu as kernel
from lightllm.reference import linear_gelu as reference

APPROXIMATIONS = ("none", "tanh")
# float64 is accepted and served by the eager reference (the kernel has no float64 path).
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _impl(x: Tensor):
    """The kernel launchers, or their eager mirrors where the kernels cannot serve ``x``."""
    ok, why = True, ""
    if x.dtype == torch.float64:
        ok, why = False, "float64 has no Triton path"
    return kernel if _dispatch.use_triton("linear_gelu", x, dtype_ok=ok, why=why) else reference


def _none(x: Tensor) -> Tensor:
    return x.new_empty((0,))


# ------------------------------------------------------------------------------------------------
# linear_gelu
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("lightllm::linear_gelu_fwd", mutates_args=())
def _linear_gelu_fwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str, save_pre: bool
) -> tuple[Tensor, Tensor]:
    y, pre = _impl(x).linear_gelu_fwd(x, weight, bias, approximate, save_pre)
    return y, pre if pre is not None else _none(x)


@_linear_gelu_fwd.register_fake
def _(x, weight, bias, approximate, save_pre):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_pre else (0,))


@torch.library.custom_op("lightllm::linear_gelu_bwd", mutates_args=())
def _linear_gelu_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, pre: Tensor, approximate: str,
    need_dx: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dpre, db = _impl(pre).gelu_bwd(dy, pre, approximate, need_db)
    dx = torch.matmul(dpre, weight) if need_dx else _none(x)
    dw = torch.matmul(dpre.t(), x) if need_dw else _none(x)
    return dx, dw, db.to(pre.dtype) if need_db else _none(x)


@_linear_gelu_bwd.register_fake
def _(dy, x, weight, pre, approximate, need_dx, need_dw, need_db):
    return (x.new_empty(x.shape if need_dx else (0,)),
            x.new_empty(weight.shape if need_dw else (0,)),
            x.new_empty((weight.shape[0],) if need_db else (0,)))


def _linear_gelu_setup(ctx, inputs, output):
    x, weight, bias, approximate, save_pre = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.save_for_backward(x, weight, bias, pre)
    ctx.approximate = approximate
    ctx.saved_pre = save_pre
    ctx.has_bias = bias is not None


def _linear_gelu_backward(ctx, dy, _dpre):
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    x, weight, bias, pre = ctx.saved_tensors
    if not ctx.saved_pre:  # called without save_pre (never by linear_gelu): recompute it
        _, pre = _linear_gelu_fwd(x, weight, bias, ctx.approximate, True)
    dx, dw, db = _linear_gelu_bwd(dy, x, weight, pre, ctx.approximate, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None)


_linear_gelu_fwd.register_autograd(_linear_gelu_backward, setup_context=_linear_gelu_setup)


# ------------------------------------------------------------------------------------------------
# feed_forward
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("lightllm::feed_forward_fwd", mutates_args=())
def _feed_forward_fwd(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
    residual: Tensor | None, approximate: str, save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _impl(x)
    h, pre = impl.linear_gelu_fwd(x, w1, b1, approximate, save)
    y = impl.linear_fwd(h, w2, b2, residual)
    if not save:
        return y, _none(x), _none(x)
    return y, h, pre


@_feed_forward_fwd.register_fake
def _(x, w1, b1, w2, b2, residual, approximate, save):
    hidden = (x.shape[0], w1.shape[0]) if save else (0,)
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty(hidden), x.new_empty(hidden)


@torch.library.custom_op("lightllm::feed_forward_bwd", mutates_args=())
def _feed_forward_bwd(
    dy: Tensor, x: Tensor, w1: Tensor, w2: Tensor, h: Tensor, pre: Tensor, approximate: str,
    need_dx: bool, need_dw1: bool, need_db1: bool, need_dw2: bool, need_db2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dw2 = torch.matmul(dy.t(), h) if need_dw2 else _none(x)
    db2 = dy.sum(0) if need_db2 else _none(x)
    dx, dw1, db1 = _none(x), _none(x), _none(x)  # distinct: outputs may not alias each other
    if need_dx or need_dw1 or need_db1:
        dpre = _impl(x).matmul_gelu_grad(dy, w2, pre, approximate)
        if need_dx:
            dx = torch.matmul(dpre, w1)
        if need_dw1:
            dw1 = torch.matmul(dpre.t(), x)
        if need_db1:
            db1 = dpre.sum(0)
    return dx, dw1, db1, dw2, db2


@_feed_forward_bwd.register_fake
def _(dy, x, w1, w2, h, pre, approximate, need_dx, need_dw1, need_db1, need_dw2, need_db2):
    def out(need, shape):
        return x.new_empty(shape if need else (0,))

    return (out(need_dx, x.shape), out(need_dw1, w1.shape), out(need_db1, (w1.shape[0],)),
            out(need_dw2, w2.shape), out(need_db2, (w2.shape[0],)))


def _feed_forward_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, approximate, save = inputs
    _, h, pre = output
    ctx.mark_non_differentiable(h, pre)
    ctx.save_for_backward(x, w1, b1, w2, h, pre)
    ctx.approximate = approximate
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
        if not ctx.saved:  # called without save (never by feed_forward): recompute h and pre
            h, pre = _linear_gelu_fwd(x, w1, b1, ctx.approximate, True)
        grads = _feed_forward_bwd(dy, x, w1, w2, h, pre, ctx.approximate, *need[:5])
        grads = [g if n else None for g, n in zip(grads, need[:5])]
    # The residual is added to the output: its gradient is dY itself.
    return (*grads, dy if need[5] else None, None, None)


_feed_forward_fwd.register_autograd(_feed_forward_backward, setup_context=_feed_forward_setup)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def _check_approximate(op: str, approximate) -> None:
    if not isinstance(approximate, str) or approximate not in APPROXIMATIONS:
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")


def _check_weight(op: str, wn: str, weight, bn: str, bias, in_features: int, source: str) -> None:
    """``weight`` is a 2-D (out_features, in_features) tensor whose in_features equals
    ``in_features`` (the size of ``source``, named in messages); ``bias`` is None or
    (out_features,)."""
    check_tensor(wn, weight, dtypes=_DTYPES, op=op)
    if weight.dim() != 2:
        raise ValueError(f"{op}: {wn} must be 2-D (out_features, in_features), got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != in_features:
        raise ValueError(f"{op}: {wn} of shape {tuple(weight.shape)} expects in_features="
                         f"{weight.shape[1]}, but {source} is {in_features}")
    check_optional_tensor(bn, bias, dtypes=_DTYPES, op=op)
    check_shape(op, bn, bias, (weight.shape[0],))


def _requires_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                approximate: str = "none") -> Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate=approximate)`` as one Triton matmul whose
    epilogue adds the bias and applies GeLU (exact erf form, or ``approximate="tanh"``).

    ``x`` is (..., in_features) with any leading dims and strides: a layout that cannot be
    viewed as 2-D is copied by ``reshape``, and a 2-D view with no unit stride (e.g. a strided
    slice) is copied by the launcher, so the kernels' loads stay contiguous. ``weight`` is
    (out_features, in_features), ``bias`` (out_features,); all of one floating dtype and device
    (float64 and, on CPU, bfloat16 run the eager reference). Forward and backward.
    """
    op = "linear_gelu"
    check_tensor("x", x, dtypes=_DTYPES, min_dim=1, op=op)
    _check_weight(op, "weight", weight, "bias", bias, x.shape[-1],
                  f"the last dimension of x (shape {tuple(x.shape)})")
    _check_approximate(op, approximate)
    check_same(op, "device", x=x, weight=weight, bias=bias)
    check_same(op, "dtype", x=x, weight=weight, bias=bias)
    n, k = weight.shape
    lead = x.shape[:-1]
    x2d = x.reshape(math.prod(lead), k)
    y, _ = _linear_gelu_fwd(x2d, weight, bias, approximate, _requires_grad(x, weight, bias))
    return y.view(*lead, n)


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                 approximate: str = "none", residual: Tensor | None = None) -> Tensor:
    """The GeLU feed-forward ``F.linear(F.gelu(F.linear(x, w1, b1), approximate), w2, b2)``
    ``(+ residual)``: two Triton matmuls, the first with bias + GeLU in its epilogue, the second
    adding b2 and the residual in its epilogue.

    ``w1`` is (d_ff, d_model), ``w2`` (d_model, d_ff) (the ``nn.Linear`` layouts); ``residual``
    broadcasts to the output (..., d_model) and has the dtype of ``x``.
    """
    op = "feed_forward"
    check_tensor("x", x, dtypes=_DTYPES, min_dim=1, op=op)
    _check_weight(op, "w1", w1, "b1", b1, x.shape[-1],
                  f"the last dimension of x (shape {tuple(x.shape)})")
    _check_weight(op, "w2", w2, "b2", b2, w1.shape[0], "w1's out_features (d_ff)")
    _check_approximate(op, approximate)
    d_model = w2.shape[0]
    out_shape = (*x.shape[:-1], d_model)
    if residual is not None:
        check_tensor("residual", residual, dtypes=_DTYPES, op=op)
        check_broadcastable(op, "residual", residual, out_shape)
    check_same(op, "device", x=x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    check_same(op, "dtype", x=x, w1=w1, b1=b1, w2=w2, b2=b2, residual=residual)
    m = math.prod(x.shape[:-1])
    x2d = x.reshape(m, x.shape[-1])
    r2d = residual.expand(out_shape).reshape(m, d_model) if residual is not None else None
    y, _, _ = _feed_forward_fwd(x2d, w1, b1, w2, b2, r2d, approximate,
                                _requires_grad(x, w1, b1, w2, b2))
    return y.view(out_shape)
