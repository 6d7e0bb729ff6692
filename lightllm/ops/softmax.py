"""Softmax and the fused scaled + masked softmax on the C++/CUDA extension ``lightllm._C``.

The extension (csrc/) defines four ops with ``TORCH_LIBRARY`` and registers CPU and CUDA kernels:
  lightllm::softmax_fwd(x) -> y                                     softmax over the last dim
  lightllm::softmax_bwd(grad_y, y) -> grad_x                        y * (grad_y - sum(grad_y * y))
  lightllm::scaled_masked_softmax_fwd(x, mask?, scale, is_causal) -> y
  lightllm::scaled_masked_softmax_bwd(grad_y, y, scale) -> grad_x   scale * softmax_bwd
This module registers their fake tensors and autograd, checks inputs before any kernel runs (the
C++ side checks again), and moves ``dim`` last as a view. Inputs the extension cannot serve
(float64, a device without a kernel, or no extension at all) run the eager reference, with a
one-time warning.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from lightllm import _dispatch
from lightllm._dispatch import warn_once
from lightllm._validation import FLOAT_DTYPES, check_broadcastable, check_same, check_tensor
from lightllm.reference import softmax as reference

try:
    from lightllm import _C  # noqa: F401  (importing it registers torch.ops.lightllm.*softmax*)

    HAS_EXTENSION = True
    _MISSING = ""
except ImportError as e:  # built with LIGHTLLM_SKIP_EXT=1, or the build failed
    HAS_EXTENSION = False
    _MISSING = f"lightllm._C is not available ({e})"

_OPS = ("softmax_fwd", "softmax_bwd", "scaled_masked_softmax_fwd", "scaled_masked_softmax_bwd")


def _kernel_devices() -> frozenset[str]:
    """Device types with a kernel for every op ("cuda" only when the .cu was built)."""
    if not HAS_EXTENSION:
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(d for d in ("cpu", "cuda")
                     if all(has(f"lightllm::{op}", d.upper()) for op in _OPS))


KERNEL_DEVICES = _kernel_devices()

# Plain eager calls that need no gradient enter the extension's kernels below the autograd key: the
# Python autograd registered below would otherwise cost ~3 µs a call for nothing.
_BELOW_AUTOGRAD = {
    "cpu": torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
    "cuda": torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA),
}


def _call(op: str, x: Tensor, *args, mask: Tensor | None = None):
    """``torch.ops.lightllm.<op>(x, *args)``; ``mask`` (also among ``args``) is the other input
    whose gradient may be needed."""
    overload = getattr(torch.ops.lightllm, op).default
    if _dispatch.direct(x) and not _dispatch.needs_grad(x, mask):
        keys = _BELOW_AUTOGRAD.get(x.device.type)
        if keys is not None:
            return overload.redispatch(keys, x, *args)
    return overload(x, *args)


# ------------------------------------------------------------------------------------------------
# Fake tensors and autograd of the extension's ops
# ------------------------------------------------------------------------------------------------


def _like(t: Tensor) -> Tensor:
    # The kernels return fresh contiguous tensors of the input's shape.
    return t.new_empty(t.shape)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _softmax_backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    return torch.ops.lightllm.softmax_bwd(grad_y, y)


def _masked_setup(ctx, inputs, output):
    _, mask, scale, _ = inputs
    ctx.save_for_backward(output)
    ctx.scale = scale
    ctx.mask_shape = None if mask is None else mask.shape


def _masked_backward(ctx, grad_y):
    (y,) = ctx.saved_tensors
    grad_x = grad_mask = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lightllm.scaled_masked_softmax_bwd(grad_y, y, ctx.scale)
    if ctx.needs_input_grad[1]:  # an additive mask that requires grad (a learned bias)
        grad_z = torch.ops.lightllm.scaled_masked_softmax_bwd(grad_y, y, 1.0)
        grad_mask = grad_z.sum_to_size(ctx.mask_shape)
    return grad_x, grad_mask, None, None


if HAS_EXTENSION:
    torch.library.register_fake("lightllm::softmax_fwd")(lambda x: _like(x))
    torch.library.register_fake("lightllm::softmax_bwd")(lambda grad_y, y: _like(y))
    torch.library.register_fake("lightllm::scaled_masked_softmax_fwd")(
        lambda x, mask, scale, is_causal: _like(x))
    torch.library.register_fake("lightllm::scaled_masked_softmax_bwd")(
        lambda grad_y, y, scale: _like(y))
    torch.library.register_autograd("lightllm::softmax_fwd", _softmax_backward,
                                    setup_context=_softmax_setup)
    torch.library.register_autograd("lightllm::scaled_masked_softmax_fwd", _masked_backward,
                                    setup_context=_masked_setup)

# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _kernel_serves(op: str, x: Tensor) -> bool:
    """True when the extension serves ``x``; otherwise warn once and use the reference."""
    if x.dtype not in FLOAT_DTYPES:
        warn_once(f"{op}:{x.dtype}", f"{op}: {x.dtype} has no kernel (fp32 arithmetic); running "
                  "the eager reference instead")
        return False
    if x.device.type in KERNEL_DEVICES or x.device.type == "meta":
        return True
    why = _MISSING or f"lightllm._C has no kernel for {x.device.type} tensors"
    warn_once(f"{op}:{x.device.type}", f"{op}: {why}; running the eager reference instead")
    return False


def _check_dim(op: str, x: Tensor, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {type(dim).__name__}")
    rank = max(x.dim(), 1)
    if not -rank <= dim < rank:
        raise IndexError(f"{op}: dim {dim} is out of range for x with {x.dim()} dimensions "
                         f"(expected in [{-rank}, {rank - 1}])")
    return dim % rank


def softmax(x: Tensor, dim: int = -1, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.softmax(x, dim, dtype)`` on the extension's kernels (forward and backward); on the
    native CPU path (CPU tensors without the interpreter) PyTorch's own softmax, which is faster.

    fp32 arithmetic for fp32, fp16 and bf16; any ``dim`` (moved last as a view: no copy when
    ``x`` is contiguous along ``dim``; a copy otherwise). A row of all -inf gives NaN, as in PyTorch.
    """
    op = "softmax"
    check_tensor("x", x, dtypes=_DTYPES, op=op)
    if dtype is not None:
        if dtype not in _DTYPES:
            raise TypeError(f"{op}: dtype must be a floating dtype, got {dtype}")
        x = x.to(dtype)
    dim = _check_dim(op, x, dim)
    if x.is_cpu and not _dispatch.cpu_interprets():
        # The native CPU path: PyTorch's own softmax, measured at 0.64-1.03x of it for the C++
        # kernel on the 2-core CPU machine (README). The C++ kernel stays what the tests check.
        return torch.softmax(x, dim)
    if not _kernel_serves(op, x):
        return reference.softmax(x, dim)
    if x.dim() == 0:
        return _call("softmax_fwd", x.reshape(1)).reshape(())
    if dim == x.dim() - 1:
        return _call("softmax_fwd", x)
    return _call("softmax_fwd", x.movedim(dim, -1)).movedim(-1, dim)


def scaled_masked_softmax(
    x: Tensor,
    mask: Tensor | None = None,
    scale: float = 1.0,
    is_causal: bool = False,
) -> Tensor:
    """``softmax(scale * x + mask)`` over the last dim, fused in one kernel (and one backward).

    ``mask`` broadcasts to ``x``: bool (True = keep, like SDPA's bool masks) or additive with
    ``x``'s dtype (its gradient is computed when it requires grad). ``is_causal`` drops key j >
    query i, with queries on dim -2, top-left aligned as in SDPA, generated in the kernel; it may
    be combined with ``mask``. Rows with every key dropped give 0 (and a zero gradient).
    """
    op = "scaled_masked_softmax"
    check_tensor("x", x, dtypes=_DTYPES, min_dim=1, op=op)
    if not isinstance(is_causal, bool):
        raise TypeError(f"{op}: is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and x.dim() < 2:
        raise ValueError(f"{op}: is_causal=True needs x with at least 2 dimensions "
                         f"(..., queries, keys), got shape {tuple(x.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number, got {type(scale).__name__}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{op}: mask must be a torch.Tensor or None, got "
                            f"{type(mask).__name__}")
        if mask.dtype not in (torch.bool, x.dtype):
            raise TypeError(f"{op}: mask must be bool (True = keep) or additive with x's dtype "
                            f"{x.dtype}, got {mask.dtype}")
        check_same(op, "device", x=x, mask=mask)
        check_broadcastable(op, "mask", mask, x.shape)
    if not _kernel_serves(op, x):
        return reference.scaled_masked_softmax(x, mask, float(scale), is_causal)
    return _call("scaled_masked_softmax_fwd", x, mask, float(scale), is_causal, mask=mask)
