"""LayerNorm, RMSNorm and their Add & Norm: validation, dispatch, autograd and torch.library
registration.

Six custom ops carry the work on 2-D (rows, features) views:
  lightllm::layer_norm_fwd(x, weight?, bias?, eps)               -> (y, mean, rstd)
  lightllm::add_layer_norm_fwd(x, residual, weight?, bias?, eps) -> (y, s, mean, rstd)
  lightllm::layer_norm_bwd(dy, x, weight?, mean, rstd, ds?, need_dw, need_db) -> (dx, dw, db)
  lightllm::rms_norm_fwd(x, weight?, eps, cast_before_weight)               -> (y, rstd)
  lightllm::add_rms_norm_fwd(x, residual, weight?, eps, cast_before_weight) -> (y, s, rstd)
  lightllm::rms_norm_bwd(dy, x, weight?, rstd, ds?, need_dw)                -> (dx, dw)
``mean``/``rstd`` are fp32 statistics saved for the backward; unused gradients come back empty.

One set of kernels serves both norms, RMSNorm by its RMS flag (``IS_RMS`` in kernels/norm.py,
``kRms`` in csrc/norm.cpp): fp32 statistics, no mean, no bias, rstd saved for the backward.

Each op has two launchers with one signature: the Triton kernels (``lightllm.kernels.norm``:
CUDA, and CPU under the interpreter) and the C++ CPU kernels of ``lightllm._C``
(``layer_norm_{fwd,bwd}_cpu``, ``rms_norm_{fwd,bwd}_cpu``). The public functions pick one per call
and, in plain eager mode, call it directly (through an ``autograd.Function`` when a gradient is
needed); under ``torch.compile`` or a dispatch mode they call the custom ops, whose bodies pick the
same launcher. The autograd functions are shared by both routes. Inputs neither serves (float64,
empty tensors, a float64 weight beside a narrower input for RMSNorm, a build without the
extension) run PyTorch's own ``F.layer_norm`` / ``F.rms_norm``.

RMSNorm's casting order. ``F.rms_norm`` (torch 2.14.1, CPU and CUDA alike) multiplies the fp32
normalised value by the weight and rounds once, to the input's dtype. Hugging Face's
``LlamaRMSNorm`` (and Mistral's, Qwen's, ...) rounds the normalised value to the input dtype first
and then multiplies by the weight, in ``torch.result_type(weight, input)``: up to one ulp apart in
float16/bfloat16, and a float32 output beside a float32 weight. ``rms_norm`` follows
``F.rms_norm``; ``cast_before_weight=True`` gives LlamaRMSNorm's order, bit for bit, for the
integrations.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import FLOAT_DTYPES, dtype_error, shape_error, tensor_error
from lightllm.kernels import norm as kernel

# ------------------------------------------------------------------------------------------------
# Launchers: the Triton kernels, or the C++ CPU kernels (the same signature)
# ------------------------------------------------------------------------------------------------


def _has_cpu_kernels() -> bool:
    """Whether lightllm._C holds the C++ LayerNorm and RMSNorm kernels (one source file builds
    them all; a LIGHTLLM_SKIP_EXT=1 build has none)."""
    try:
        from lightllm import _C  # noqa: F401  (importing it registers torch.ops.lightllm.*)
    except ImportError:
        return False
    return all(hasattr(torch.ops.lightllm, op) for op in (
        "layer_norm_fwd_cpu", "layer_norm_bwd_cpu", "rms_norm_fwd_cpu", "rms_norm_bwd_cpu"))


HAS_CPU_KERNELS = _has_cpu_kernels()
# The C++ kernels convert float16/bfloat16 with F16C / AVX2 instructions; on a CPU without them
# the conversions run in software and PyTorch's own op is faster for those dtypes.
_CPU_HALF_KERNELS = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _cpu_layer_norm_fwd(x, residual, weight, bias, eps: float):
    y, s, mean, rstd = torch.ops.lightllm.layer_norm_fwd_cpu(x, residual, weight, bias, eps)
    return y, (s if residual is not None else None), mean, rstd


def _cpu_layer_norm_bwd(dy, x, weight, mean, rstd, ds, need_dw: bool, need_db: bool):
    dx, dw, db = torch.ops.lightllm.layer_norm_bwd_cpu(dy, x, weight, mean, rstd, ds, need_dw,
                                                       need_db)
    return dx, (dw if need_dw else None), (db if need_db else None)


def _out_dtype(x: Tensor, weight: Tensor | None, cast_before_weight: bool) -> torch.dtype:
    if cast_before_weight and weight is not None:
        return torch.promote_types(x.dtype, weight.dtype)
    return x.dtype


def _cpu_rms_norm_fwd(x, residual, weight, eps: float, cast_before_weight: bool, out_dtype):
    # The C++ op derives the output dtype itself (promote(x, weight) when casting before the weight).
    y, s, rstd = torch.ops.lightllm.rms_norm_fwd_cpu(x, residual, weight, eps, cast_before_weight)
    return y, (s if residual is not None else None), rstd


def _cpu_rms_norm_bwd(dy, x, weight, rstd, ds, need_dw: bool):
    if dy.dtype is not x.dtype:  # a float32 output beside a half input (cast before the weight)
        dy = dy.to(x.dtype)
    dx, dw = torch.ops.lightllm.rms_norm_bwd_cpu(dy, x, weight, rstd, ds, need_dw)
    return dx, (dw if need_dw else None)


_CPU = SimpleNamespace(layer_norm_fwd=_cpu_layer_norm_fwd, layer_norm_bwd=_cpu_layer_norm_bwd,
                       rms_norm_fwd=_cpu_rms_norm_fwd, rms_norm_bwd=_cpu_rms_norm_bwd)

if HAS_CPU_KERNELS:
    @torch.library.register_fake("lightllm::layer_norm_fwd_cpu")
    def _(x, residual, weight, bias, eps):
        rows = x.shape[0]
        s = x.new_empty(x.shape if residual is not None else (0,))
        return (x.new_empty(x.shape), s, x.new_empty((rows,), dtype=torch.float32),
                x.new_empty((rows,), dtype=torch.float32))

    @torch.library.register_fake("lightllm::layer_norm_bwd_cpu")
    def _(dy, x, weight, mean, rstd, ds, need_dw, need_db):
        n = x.shape[1]
        return (x.new_empty(x.shape), x.new_empty((n if need_dw else 0,), dtype=torch.float32),
                x.new_empty((n if need_db else 0,), dtype=torch.float32))

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


@torch.library.custom_op("lightllm::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    y, _, mean, rstd = _launcher(x).layer_norm_fwd(x, None, weight, bias, eps)
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
    return _launcher(x).layer_norm_fwd(x, residual, weight, bias, eps)


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    rows = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty(x.shape),
            x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))


def _empty_grad(x: Tensor) -> Tensor:
    # A fresh tensor each: custom-op outputs may not alias one another.
    return x.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("lightllm::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
    ds: Tensor | None, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _launcher(x).layer_norm_bwd(dy, x, weight, mean, rstd, ds, need_dw, need_db)
    return dx, _empty_grad(x) if dw is None else dw, _empty_grad(x) if db is None else db


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, ds, need_dw, need_db):
    n = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((n if need_dw else 0,), dtype=torch.float32),
            x.new_empty((n if need_db else 0,), dtype=torch.float32))


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
    return dx, _empty_grad(x) if dw is None else dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, ds, need_dw):
    return x.new_empty(x.shape), x.new_empty((x.shape[1] if need_dw else 0,), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Autograd, shared by the custom ops and the eager autograd.Functions
# ------------------------------------------------------------------------------------------------


def _layer_norm_grads(ctx, dy, ds):
    src, weight, mean, rstd = ctx.saved_tensors
    args = (dy, src, weight, mean, rstd, ds, ctx.need_dw, ctx.need_db)
    if _dispatch.direct(src):
        dx, dw, db = _launcher(src).layer_norm_bwd(*args)
    else:
        dx, dw, db = _layer_norm_bwd(*args)
    return (dx, dw.to(ctx.weight_dtype) if ctx.need_dw else None,
            db.to(ctx.bias_dtype) if ctx.need_db else None)


def _layer_norm_save(ctx, src: Tensor, weight, bias, mean, rstd, weight_index: int):
    ctx.save_for_backward(src, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, never zeros
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.need_dw = weight is not None and ctx.needs_input_grad[weight_index]
    ctx.need_db = bias is not None and ctx.needs_input_grad[weight_index + 1]


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    _layer_norm_save(ctx, x, weight, bias, mean, rstd, weight_index=1)


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    dx, dw, db = _layer_norm_grads(ctx, dy, None)
    return dx, dw, db, None


def _add_layer_norm_setup(ctx, inputs, output):
    _, _, weight, bias, _ = inputs
    _, s, mean, rstd = output
    _layer_norm_save(ctx, s, weight, bias, mean, rstd, weight_index=2)


def _add_layer_norm_backward(ctx, dy, ds, _dmean, _drstd):
    if dy is None:  # only the sum was used: its gradient passes to both inputs
        return ds, ds, None, None, None
    dx, dw, db = _layer_norm_grads(ctx, dy, ds)
    return dx, dx, dw, db, None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)
_add_layer_norm_fwd.register_autograd(_add_layer_norm_backward, setup_context=_add_layer_norm_setup)


def _layer_norm_eager(x, weight, bias, eps):
    y, _, mean, rstd = _launcher(x).layer_norm_fwd(x, None, weight, bias, eps)
    return y, mean, rstd


def _add_layer_norm_eager(x, residual, weight, bias, eps):
    return _launcher(x).layer_norm_fwd(x, residual, weight, bias, eps)


_LayerNorm = _dispatch.autograd_function("layer_norm", _layer_norm_eager, _layer_norm_setup,
                                         _layer_norm_backward)
_AddLayerNorm = _dispatch.autograd_function("add_layer_norm", _add_layer_norm_eager,
                                            _add_layer_norm_setup, _add_layer_norm_backward)


def _rms_norm_grads(ctx, dy, ds):
    src, weight, rstd = ctx.saved_tensors
    args = (dy, src, weight, rstd, ds, ctx.need_dw)
    if _dispatch.direct(src):
        dx, dw = _launcher(src).rms_norm_bwd(*args)
    else:
        dx, dw = _rms_norm_bwd(*args)
    return dx, dw.to(ctx.weight_dtype) if ctx.need_dw else None


def _rms_norm_save(ctx, src: Tensor, weight, rstd, weight_index: int):
    ctx.save_for_backward(src, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, never zeros
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.need_dw = weight is not None and ctx.needs_input_grad[weight_index]


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _rms_norm_save(ctx, x, weight, output[1], weight_index=1)


def _rms_norm_backward(ctx, dy, _drstd):
    if dy is None:
        return None, None, None, None
    dx, dw = _rms_norm_grads(ctx, dy, None)
    return dx, dw, None, None


def _add_rms_norm_setup(ctx, inputs, output):
    _, _, weight, _, _ = inputs
    _, s, rstd = output
    _rms_norm_save(ctx, s, weight, rstd, weight_index=2)


def _add_rms_norm_backward(ctx, dy, ds, _drstd):
    if dy is None:  # only the sum was used: its gradient passes to both inputs
        return ds, ds, None, None, None
    dx, dw = _rms_norm_grads(ctx, dy, ds)
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

_DTYPES = (*FLOAT_DTYPES, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_F32_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's eps=None for float32/float16/bfloat16


def _normalized_shape(op: str, normalized_shape) -> tuple[int, ...]:
    if type(normalized_shape) is int:
        return (normalized_shape,)
    if isinstance(normalized_shape, (tuple, list, torch.Size)) and all(
        type(d) is int for d in normalized_shape
    ):
        if not normalized_shape:
            raise ValueError(f"{op}: normalized_shape must have at least one dimension, got []")
        return tuple(normalized_shape)
    raise TypeError(f"{op}: normalized_shape must be an int or a sequence of ints, got "
                    f"{normalized_shape!r}")


def _check_param(op: str, name: str, p, x: Tensor, shape: tuple, any_float: bool = False) -> None:
    if type(p) is not torch.nn.Parameter and not isinstance(p, Tensor):
        raise tensor_error(op, name, p)
    dt = p.dtype
    if any_float:  # F.rms_norm promotes any floating weight
        if dt not in _DTYPES:
            raise dtype_error(op, name, dt, _DTYPES)
    # F.layer_norm's rule: a parameter has the input's dtype, or float32 beside a half input.
    elif dt is not x.dtype and not (dt is torch.float32 and x.dtype in _HALF):
        if dt not in _DTYPES:
            raise dtype_error(op, name, dt, _DTYPES)
        raise TypeError(f"{op}: {name} has dtype {dt} but input has {x.dtype}; a parameter must "
                        f"have the input's dtype (or float32 beside a float16/bfloat16 input), as "
                        f"in torch.nn.functional.layer_norm")
    if p.shape != shape:
        raise shape_error(op, name, p, shape)
    if p.device != x.device:
        raise RuntimeError(f"{op}: expected all tensors on one device, got input={x.device}, "
                           f"{name}={p.device}")


def _check(op: str, x, normalized_shape, weight, bias, residual=None,
           any_float_params: bool = False) -> tuple[int, ...]:
    """Everything checked before any launch; returns normalized_shape as a tuple.
    ``any_float_params``: parameters of any float dtype (RMSNorm), else F.layer_norm's rule."""
    if not isinstance(x, Tensor):
        raise tensor_error(op, "input", x)
    if x.dtype not in _DTYPES:
        raise dtype_error(op, "input", x.dtype, _DTYPES)
    shape = _normalized_shape(op, normalized_shape)
    if x.dim() < len(shape) or x.shape[x.dim() - len(shape):] != shape:
        raise ValueError(f"{op}: normalized_shape {list(shape)} does not match the trailing "
                         f"dimensions of input of shape {tuple(x.shape)}")
    if weight is not None:
        _check_param(op, "weight", weight, x, shape, any_float_params)
    if bias is not None:
        _check_param(op, "bias", bias, x, shape)
        if weight is not None and bias.dtype is not weight.dtype:
            raise TypeError(f"{op}: weight ({weight.dtype}) and bias ({bias.dtype}) must share a "
                            "dtype")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise tensor_error(op, "residual", residual)
        if residual.shape != x.shape:
            raise shape_error(op, "residual", residual, x.shape)
        if residual.dtype is not x.dtype:
            raise TypeError(f"{op}: residual has dtype {residual.dtype} but input has {x.dtype}: "
                            "expected one dtype")
        if residual.device != x.device:
            raise RuntimeError(f"{op}: expected all tensors on one device, got input={x.device}, "
                               f"residual={residual.device}")
    return shape


def _kernel_serves(op: str, x: Tensor, weight: Tensor | None = None) -> bool:
    """True when lightllm's kernels (Triton or C++) serve ``x``; else PyTorch's own op runs.
    ``weight``: RMSNorm's (of any float dtype); a float64 weight beside a narrower input is
    multiplied in float64 by PyTorch, which the fp32 kernels do not do."""
    if weight is not None and weight.dtype is torch.float64 and x.dtype is not torch.float64:
        return False
    if x.dtype is torch.float64:
        if _dispatch.triton_runs_on(x.device):
            _dispatch.warn_once(f"{op}:float64", f"{op}: float64 has no kernel (statistics are "
                                "fp32); running PyTorch's own op instead")
        return False
    if x.numel() == 0:
        return False
    if _dispatch.runs_triton(x):
        return True
    return HAS_CPU_KERNELS and x.is_cpu and (x.dtype is torch.float32 or _CPU_HALF_KERNELS)


def _rows_of(x: Tensor, shape: tuple[int, ...]) -> tuple[int, bool]:
    """(features per row, whether ``x`` must be reshaped to (rows, features))."""
    if len(shape) == 1:
        return shape[0], x.dim() != 2
    return math.prod(shape), True


def _flat(p: Tensor | None, n: int) -> Tensor | None:
    return p if p is None or p.dim() == 1 else p.reshape(n)


def _torch_rms_norm(x, shape, weight, eps, cast_before_weight: bool) -> Tensor:
    """PyTorch's own op, in the requested casting order (LlamaRMSNorm's: weight * normed)."""
    if cast_before_weight and weight is not None:
        return weight * F.rms_norm(x, shape, None, eps)
    return F.rms_norm(x, shape, weight, eps)


def layer_norm(
    input: Tensor,
    normalized_shape: int | tuple[int, ...] | list[int] | torch.Size,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``torch.nn.functional.layer_norm`` on lightllm's fused kernels (forward and backward).

    Statistics are computed in fp32 whatever the input dtype; weight and bias have the input's
    dtype, or float32 beside a float16/bfloat16 input (PyTorch's rule); the output has the input's
    dtype. float64 and empty inputs run PyTorch's own op.
    """
    shape = _check("layer_norm", input, normalized_shape, weight, bias)
    if not _kernel_serves("layer_norm", input):
        return F.layer_norm(input, shape, weight, bias, eps)
    n, flat = _rows_of(input, shape)
    x2d = input.reshape(-1, n) if flat else input
    w, b, eps = _flat(weight, n), _flat(bias, n), float(eps)
    if not _dispatch.direct(input):
        y = _layer_norm_fwd(x2d, w, b, eps)[0]
    elif _dispatch.needs_grad(input, weight, bias):
        y = _LayerNorm.apply(x2d, w, b, eps)[0]
    else:
        y = _launcher(input).layer_norm_fwd(x2d, None, w, b, eps)[0]
    return y.view(input.shape) if flat else y


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: int | tuple[int, ...] | list[int] | torch.Size,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """Add & Norm: ``(layer_norm(input + residual), input + residual)`` in one pass.

    Each input is read once and each output written once; the sum is rounded to the input dtype
    and that rounded sum is what gets normalised, exactly as the unfused PyTorch code does.
    """
    if not isinstance(residual, Tensor):  # None would read as "no residual" below
        raise tensor_error("add_layer_norm", "residual", residual)
    shape = _check("add_layer_norm", input, normalized_shape, weight, bias, residual)
    if not _kernel_serves("add_layer_norm", input):
        s = input + residual
        return F.layer_norm(s, shape, weight, bias, eps), s
    n, flat = _rows_of(input, shape)
    x2d, r2d = (input.reshape(-1, n), residual.reshape(-1, n)) if flat else (input, residual)
    w, b, eps = _flat(weight, n), _flat(bias, n), float(eps)
    if not _dispatch.direct(input):
        y, s, _, _ = _add_layer_norm_fwd(x2d, r2d, w, b, eps)
    elif _dispatch.needs_grad(input, residual, weight, bias):
        y, s, _, _ = _AddLayerNorm.apply(x2d, r2d, w, b, eps)
    else:
        y, s, _, _ = _launcher(input).layer_norm_fwd(x2d, r2d, w, b, eps)
    return (y.view(input.shape), s.view(input.shape)) if flat else (y, s)


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
    shape = _check("rms_norm", input, normalized_shape, weight, None, any_float_params=True)
    cast = cast_before_weight and weight is not None  # without a weight the orders agree
    if not _kernel_serves("rms_norm", input, weight):
        return _torch_rms_norm(input, shape, weight, eps, cast)
    n, flat = _rows_of(input, shape)
    x2d = input.reshape(-1, n) if flat else input
    w = _flat(weight, n)
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
    shape = _check("add_rms_norm", input, normalized_shape, weight, None, residual,
                   any_float_params=True)
    cast = cast_before_weight and weight is not None
    if not _kernel_serves("add_rms_norm", input, weight):
        s = input + residual
        return _torch_rms_norm(s, shape, weight, eps, cast), s
    n, flat = _rows_of(input, shape)
    x2d, r2d = (input.reshape(-1, n), residual.reshape(-1, n)) if flat else (input, residual)
    w = _flat(weight, n)
    eps = _F32_EPS if eps is None else float(eps)
    if not _dispatch.direct(input):
        y, s, _ = _add_rms_norm_fwd(x2d, r2d, w, eps, cast)
    elif _dispatch.needs_grad(input, residual, weight):
        y, s, _ = _AddRMSNorm.apply(x2d, r2d, w, eps, cast)
    else:
        y, s, _ = _launcher(input).rms_norm_fwd(x2d, r2d, w, eps, cast, _out_dtype(input, w, cast))
    return (y.view(input.shape), s.view(input.shape)) if flat else (y, s)
