"""RMSNorm and Add & RMSNorm: validation, dispatch, autograd and torch.library registration.

The kernels are LayerNorm's, with their RMS flag (``IS_RMS`` in kernels/norm.py, ``kRms`` in
csrc/norm.cpp): fp32 statistics, no mean, no bias, rstd saved for the backward. Three custom
ops carry the work on 2-D (rows, features) views:
  lightllm::rms_norm_fwd(x, weight?, eps, cast_before_weight)               -> (y, rstd)
  lightllm::add_rms_norm_fwd(x, residual, weight?, eps, cast_before_weight) -> (y, s, rstd)
  lightllm::rms_norm_bwd(dy, x, weight?, rstd, ds?, need_dw)                -> (dx, dw)
Dispatch and the two routes (the launcher called directly in plain eager mode, the custom op under
torch.compile or a dispatch mode, one autograd for both) are exactly lightllm.ops.norm's, whose
checks and helpers this module shares. float64, empty inputs and float64 weights run PyTorch's own
``F.rms_norm``.

Casting order. ``F.rms_norm`` (torch 2.14.1, CPU and CUDA alike) multiplies the fp32 normalised
value by the weight and rounds once, to the input's dtype. Hugging Face's ``LlamaRMSNorm`` (and
Mistral's, Qwen's, ...) rounds the normalised value to the input dtype first and then multiplies by
the weight, in ``torch.result_type(weight, input)``: up to one ulp apart in float16/bfloat16, and a
float32 output beside a float32 weight. ``rms_norm`` follows ``F.rms_norm``;
``cast_before_weight=True`` gives LlamaRMSNorm's order, bit for bit, for the integrations.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import tensor_error
from lightllm.kernels import norm as kernel
from lightllm.ops import norm as _ln

_F32_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps=None for float32/float16/bfloat16

# ------------------------------------------------------------------------------------------------
# Launchers: the Triton kernels, or the C++ CPU kernels (the same signature)
# ------------------------------------------------------------------------------------------------


def _out_dtype(x: Tensor, weight: Tensor | None, cast_before_weight: bool) -> torch.dtype:
    if cast_before_weight and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


def _cpu_fwd(x, residual, weight, eps: float, cast_before_weight: bool, out_dtype):
    # The C++ op derives the output dtype itself (promote(x, weight) when casting before the weight).
    y, s, rstd = torch.ops.lightllm.rms_norm_fwd_cpu(x, residual, weight, eps, cast_before_weight)
    return y, (s if residual is not None else None), rstd


def _cpu_bwd(dy, x, weight, rstd, ds, need_dw: bool):
    if dy.dtype is not x.dtype:  # a float32 output beside a half input (cast before the weight)
        dy = dy.to(x.dtype)
    dx, dw = torch.ops.lightllm.rms_norm_bwd_cpu(dy, x, weight, rstd, ds, need_dw)
    return dx, (dw if need_dw else None)


_CPU = SimpleNamespace(rms_norm_fwd=_cpu_fwd, rms_norm_bwd=_cpu_bwd)

if _ln.HAS_CPU_KERNELS:
    @torch.library.register_fake("lightllm::rms_norm_fwd_cpu")
    def _(x, residual, weight, eps, cast_before_weight):
        s = x.new_empty(x.shape if residual is not None else (0,))
        return (x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight)), s,
                x.new_empty((x.shape[0],), dtype=torch.float32))

    @torch.library.register_fake("lightllm::rms_norm_bwd_cpu")
    def _(dy, x, weight, rstd, ds, need_dw):
        return x.new_empty(x.shape), x.new_empty((x.shape[1] if need_dw else 0,),
                                                 dtype=torch.float32)


def _launcher(x: Tensor):
    """The Triton launchers where the kernels run, else the C++ CPU ones (looked up per call, so a
    test can wrap a launcher)."""
    return kernel if _dispatch.runs_triton(x) else _CPU


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.compile, tracing, dispatch modes)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("lightllm::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(
    x: Tensor, weight: Tensor | None, eps: float, cast_before_weight: bool
) -> tuple[Tensor, Tensor]:
    y, _, rstd = _launcher(x).rms_norm_fwd(x, None, weight, eps, cast_before_weight,
                                           _out_dtype(x, weight, cast_before_weight))
    return y, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, eps, cast_before_weight):
    return (x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight)),
            x.new_empty((x.shape[0],), dtype=torch.float32))


@torch.library.custom_op("lightllm::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, eps: float, cast_before_weight: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return _launcher(x).rms_norm_fwd(x, residual, weight, eps, cast_before_weight,
                                     _out_dtype(x, weight, cast_before_weight))


@_add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, cast_before_weight):
    return (x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight)),
            x.new_empty(x.shape), x.new_empty((x.shape[0],), dtype=torch.float32))


@torch.library.custom_op("lightllm::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor, ds: Tensor | None, need_dw: bool
) -> tuple[Tensor, Tensor]:
    dx, dw = _launcher(x).rms_norm_bwd(dy, x, weight, rstd, ds, need_dw)
    return dx, _ln._empty_grad(x) if dw is None else dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, ds, need_dw):
    return x.new_empty(x.shape), x.new_empty((x.shape[1] if need_dw else 0,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Autograd, shared by the custom ops and the eager autograd.Functions
# ------------------------------------------------------------------------------------------------


def _backward(ctx, dy, ds):
    src, weight, rstd = ctx.saved_tensors
    args = (dy, src, weight, rstd, ds, ctx.need_dw)
    if _dispatch.direct(src):
        dx, dw = _launcher(src).rms_norm_bwd(*args)
    else:
        dx, dw = _rms_norm_bwd(*args)
    return dx, dw.to(ctx.weight_dtype) if ctx.need_dw else None


def _setup(ctx, src: Tensor, weight, rstd, weight_index: int):
    ctx.save_for_backward(src, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.need_dw = weight is not None and ctx.needs_input_grad[weight_index]


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _setup(ctx, x, weight, output[1], weight_index=1)


def _rms_norm_backward(ctx, dy, _drstd):
    dx, dw = _backward(ctx, dy, None)
    return dx, dw, None, None


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    _, s, rstd = output
    _setup(ctx, s, weight, rstd, weight_index=2)


def _add_rms_norm_backward(ctx, dy, ds, _drstd):
    dx, dw = _backward(ctx, dy, ds)
    return dx, dx, dw, None, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_add_rms_norm_fwd.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


def _rms_norm_eager(x, weight, eps, cast_before_weight):
    y, _, rstd = _launcher(x).rms_norm_fwd(x, None, weight, eps, cast_before_weight,
                                           _out_dtype(x, weight, cast_before_weight))
    return y, rstd


def _add_rms_norm_eager(x, residual, weight, eps, cast_before_weight):
    return _launcher(x).rms_norm_fwd(x, residual, weight, eps, cast_before_weight,
                                     _out_dtype(x, weight, cast_before_weight))


_RMSNorm = _dispatch.autograd_function("rms_norm", _rms_norm_eager, _rms_norm_setup,
                                       _rms_norm_backward)
_AddRMSNorm = _dispatch.autograd_function("add_rms_norm", _add_rms_norm_eager,
                                          _add_rms_norm_setup, _add_rms_norm_backward)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def _served(op: str, x: Tensor, weight: Tensor | None) -> bool:
    """True when lightllm's kernels serve ``x``; a float64 weight beside a narrower input is
    multiplied in float64 by PyTorch, which the fp32 kernels do not do."""
    if weight is not None and weight.dtype is torch.float64 and x.dtype is not torch.float64:
        return False
    return _ln._served(op, x)


def _torch_rms_norm(x, shape, weight, eps, cast_before_weight: bool) -> Tensor:
    """PyTorch's own op, in the requested casting order (LlamaRMSNorm's: weight * normed)."""
    if cast_before_weight and weight is not None:
        return weight * F.rms_norm(x, shape, None, eps)
    return F.rms_norm(x, shape, weight, eps)


def rms_norm(
    input: Tensor,
    normalized_shape: int | tuple[int, ...] | list[int] | torch.Size,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    cast_before_weight: bool = False,
) -> Tensor:
    """``torch.nn.functional.rms_norm`` on lightllm's fused kernels (forward and backward).

    Statistics in fp32 whatever the input dtype; ``eps=None`` is float32's machine epsilon (float64
    inputs: float64's), as in PyTorch. The weight may have any float dtype; the output has the
    input's dtype. ``cast_before_weight=True``: Hugging Face LlamaRMSNorm's casting order,
    ``weight * normed.to(input.dtype)``, whose output dtype is ``torch.result_type(weight, input)``.
    float64 and empty inputs run PyTorch's own op.
    """
    shape = _ln._check("rms_norm", input, normalized_shape, weight, None, any_float_params=True)
    cast = cast_before_weight and weight is not None  # without a weight the orders agree
    if not _served("rms_norm", input, weight):
        return _torch_rms_norm(input, shape, weight, eps, cast)
    n, flat = _ln._rows_of(input, shape)
    x2d = input.reshape(-1, n) if flat else input
    w = _ln._flat(weight, n)
    eps = _F32_EPS if eps is None else float(eps)
    if not _dispatch.direct(input):
        y = _rms_norm_fwd(x2d, w, eps, cast)[0]
    elif _dispatch.needs_grad(input, weight):
        y = _RMSNorm.apply(x2d, w, eps, cast)[0]
    else:
        y = _launcher(input).rms_norm_fwd(x2d, None, w, eps, cast, _out_dtype(input, w, cast))[0]
    return y.view(input.shape) if flat else y


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | tuple[int, ...] | list[int] | torch.Size,
    weight: Tensor | None = None,
    eps: float | None = None,
    *,
    cast_before_weight: bool = False,
) -> tuple[Tensor, Tensor]:
    """Add & RMSNorm: ``(rms_norm(input + residual), input + residual)`` in one pass.

    Each input is read once and each output written once; the sum is rounded to the input dtype and
    that rounded sum is what gets normalised, exactly as the unfused PyTorch code does.
    """
    if not isinstance(residual, Tensor):  # None would read as "no residual" below
        raise tensor_error("add_rms_norm", "residual", residual)
    shape = _ln._check("add_rms_norm", input, normalized_shape, weight, None, residual,
                       any_float_params=True)
    cast = cast_before_weight and weight is not None
    if not _served("add_rms_norm", input, weight):
        s = input + residual
        return _torch_rms_norm(s, shape, weight, eps, cast), s
    n, flat = _ln._rows_of(input, shape)
    x2d, r2d = (input.reshape(-1, n), residual.reshape(-1, n)) if flat else (input, residual)
    w = _ln._flat(weight, n)
    eps = _F32_EPS if eps is None else float(eps)
    if not _dispatch.direct(input):
        y, s, _ = _add_rms_norm_fwd(x2d, r2d, w, eps, cast)
    elif _dispatch.needs_grad(input, residual, weight):
        y, s, _ = _AddRMSNorm.apply(x2d, r2d, w, eps, cast)
    else:
        y, s, _ = _launcher(input).rms_norm_fwd(x2d, r2d, w, eps, cast, _out_dtype(input, w, cast))
    return (y.view(input.shape), s.view(input.shape)) if flat else (y, s)
