"""LayerNorm and Add & Norm: validation, dispatch, autograd and torch.library registration.

Three custom ops carry the work on 2-D (rows, features) views:
  lightllm::layer_norm_fwd(x, weight?, bias?, eps)               -> (y, mean, rstd)
  lightllm::add_layer_norm_fwd(x, residual, weight?, bias?, eps) -> (y, s, mean, rstd)
  lightllm::layer_norm_bwd(dy, x, weight?, mean, rstd, ds?, need_dw, need_db) -> (dx, dw, db)
``mean``/``rstd`` are fp32 statistics saved for the backward; unused gradients come back empty.

Dispatch happens once, in the public functions: inputs the kernels serve go through the custom ops;
everything else (CPU tensors without the interpreter, float64, empty tensors) runs the eager
reference, whose autograd is PyTorch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import (
    FLOAT_DTYPES,
    check_optional_tensor,
    check_same,
    check_shape,
    check_tensor,
)
from lightllm.kernels import layer_norm as kernel
from lightllm.reference import layer_norm as reference


@torch.library.custom_op("lightllm::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = kernel.layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    rows = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("lightllm::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernel.layer_norm_fwd(x, residual, weight, bias, eps)


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty(x.shape),
            x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("lightllm::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    ds: Tensor | None, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = kernel.layer_norm_bwd(dy, x, weight, mean, rstd, ds, need_dw, need_db)
    def empty():  # a fresh tensor each: custom-op outputs may not alias one another
        return x.new_empty((0,), dtype=torch.float32)

    return dx, empty() if dw is None else dw, empty() if db is None else db


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, ds, need_dw, need_db):
    n = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((n if need_dw else 0,), dtype=torch.float32),
            x.new_empty((n if need_db else 0,), dtype=torch.float32))


def _param_grads(ctx, dw: Tensor, db: Tensor):
    return (dw.to(ctx.weight_dtype) if ctx.need_dw else None,
            db.to(ctx.bias_dtype) if ctx.need_db else None)


def _setup(ctx, src: Tensor, weight, bias, mean, rstd, weight_index: int):
    ctx.save_for_backward(src, weight, mean, rstd)
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.need_dw = weight is not None and ctx.needs_input_grad[weight_index]
    ctx.need_db = bias is not None and ctx.needs_input_grad[weight_index + 1]


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    _setup(ctx, x, weight, bias, mean, rstd, weight_index=1)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd, None, ctx.need_dw, ctx.need_db)
    return (dx, *_param_grads(ctx, dw, db), None)


def _add_layer_norm_setup(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    _, s, mean, rstd = output
    _setup(ctx, s, weight, bias, mean, rstd, weight_index=2)


def _add_layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, s, weight, mean, rstd, ds, ctx.need_dw, ctx.need_db)
    return (dx, dx, *_param_grads(ctx, dw, db), None)


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)
_add_layer_norm_fwd.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _check(op: str, x, normalized_shape, weight, bias, residual=None) -> tuple[int, ...]:
    check_tensor("input", x, dtypes=_DTYPES, op=op)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, Sequence | torch.Size) or not all(
        isinstance(d, int) for d in normalized_shape
    ):
        raise TypeError(f"{op}: normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}")
    shape = tuple(normalized_shape)
    if len(shape) == 0:
        raise ValueError(f"{op}: normalized_shape must have at least one dimension, got []")
    if x.dim() < len(shape) or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"{op}: normalized_shape {list(shape)} does not match the trailing "
                         f"dimensions of input of shape {tuple(x.shape)}")
    check_optional_tensor("weight", weight, dtypes=_DTYPES, op=op)
    check_optional_tensor("bias", bias, dtypes=_DTYPES, op=op)
    check_shape(op, "weight", weight, shape)
    check_shape(op, "bias", bias, shape)
    if residual is not None:
        check_tensor("residual", residual, dtypes=_DTYPES, op=op)
        check_shape(op, "residual", residual, x.shape)
        check_same(op, "dtype", input=x, residual=residual)
    check_same(op, "device", input=x, residual=residual, weight=weight, bias=bias)
    return shape


def _runs_kernel(op: str, x: Tensor) -> bool:
    if x.numel() == 0:
        return False
    return _dispatch.use_triton(op, x, dtype_ok=x.dtype != torch.float64,
                                why="float64 has no kernel (statistics are fp32)")


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.layer_norm`` on fused Triton kernels (forward and backward).

    Statistics are computed in fp32 whatever the input dtype; weight and bias may be of another
    floating dtype than the input (as on CUDA in PyTorch); the output has the input's dtype.
    """
    shape = _check("layer_norm", input, normalized_shape, weight, bias)
    n = math.prod(shape)
    if not _runs_kernel("layer_norm", input):
        return reference.layer_norm(input, shape, weight, bias, eps)
    x2d = input.reshape(-1, n)
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    y, _, _ = _layer_norm_fwd(x2d, w, b, float(eps))
    return y.view(input.shape)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Add & Norm: ``(layer_norm(input + residual), input + residual)`` in one pass.

    Each input is read once and each output written once; the sum is rounded to the input dtype
    and that rounded sum is what gets normalised, exactly as the unfused PyTorch code does.
    """
    shape = _check("add_layer_norm", input, normalized_shape, weight, bias, residual)
    n = math.prod(shape)
    if not _runs_kernel("add_layer_norm", input):
        return reference.add_layer_norm(input, residual, shape, weight, bias, eps)
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    y, s, _, _ = _add_layer_norm_fwd(input.reshape(-1, n), residual.reshape(-1, n), w, b,
                                     float(eps))
    return y.view(input.shape), s.view(input.shape)
