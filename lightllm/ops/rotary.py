"""Rotary position embedding: validation, dispatch, autograd and torch.library registration.

Two custom ops carry the work:
  lightllm::rotary_embedding(q, k, cos, sin, heads_dim, inverse) -> (q_rot, k_rot)
  lightllm::rotary_embedding_(q!, k!, cos, sin, heads_dim) -> ()          (in place)
``heads_dim`` is where q and k hold their heads (1: (B, H, S, D), 2: (B, S, H, D)); ``inverse``
applies the transpose of the rotation, which is the backward: the gradient of the op is the op with
``inverse`` flipped (so it is differentiable to any order).

Each has two launchers with one signature: the Triton kernel (``lightllm.kernels.rotary``: CUDA, and
CPU under the interpreter) and the native CPU one, PyTorch ops writing straight into the output
(``torch.mul(x, cos, out=)``, then one ``addcmul_`` per half: no temporary of q's size, where
transformers' ``apply_rotary_pos_emb`` makes four per tensor). The public functions pick one per call and, in
plain eager mode, call it directly (through an ``autograd.Function`` when a gradient is needed);
under ``torch.compile`` or a dispatch mode they call the custom ops, whose bodies pick the same
launcher. float64 runs the eager reference. Gradients of cos and sin (rarely wanted: tables come
from positions) are PyTorch reductions over the heads, computed only when asked for.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import FLOAT_DTYPES, check_same, dtype_error, shape_error, tensor_error
from lightllm.kernels import rotary as kernel
from lightllm.kernels._utils import empty
from lightllm.reference import rotary as reference

# ------------------------------------------------------------------------------------------------
# Launchers: the Triton kernel, or PyTorch ops on the native CPU path
# ------------------------------------------------------------------------------------------------


def _native_rotate(x: Tensor, y: Tensor, c: Tensor, s1: Tensor, s2: Tensor, rotary: int,
                   inverse: bool, in_place: bool) -> None:
    """y = rotation of x (y may be x), as in the kernel's docstring: y = x * cos over the rotary
    dims, then each half gains its sine term in place (three ops, no temporary of x's size).
    At decode sizes the cost is PyTorch's per-op overhead: a full rotary dim takes no slices,
    and each pair of halves comes from one ``chunk``."""
    partial = rotary < x.shape[-1]
    src, dst = (x[..., :rotary], y[..., :rotary]) if partial else (x, y)
    if in_place:
        src = src.clone()  # y overwrites it before the sine terms read it
    torch.mul(src, c, out=dst)
    x1, x2 = src.chunk(2, -1)
    y1, y2 = dst.chunk(2, -1)
    if inverse:  # the transpose: y1 += x2 s2, y2 -= x1 s1
        y1.addcmul_(x2, s2)
        y2.addcmul_(x1, s1, value=-1)
    else:  # y1 -= x2 s1, y2 += x1 s2
        y1.addcmul_(x2, s1, value=-1)
        y2.addcmul_(x1, s2)
    if partial and not in_place:
        y[..., rotary:].copy_(x[..., rotary:])


def _native_fwd(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, heads_dim: int, inverse: bool,
                out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``kernel.rotary_fwd`` with PyTorch's CPU ops (any device works: it is plain torch)."""
    in_place = out is not None
    if out is None:
        out = (empty(q.shape, dtype=q.dtype, device=q.device),
               empty(k.shape, dtype=k.dtype, device=k.device))
    c = cos.unsqueeze(heads_dim)
    s1, s2 = sin.unsqueeze(heads_dim).chunk(2, -1)
    rotary = cos.shape[-1]
    _native_rotate(q, out[0], c, s1, s2, rotary, inverse, in_place)
    _native_rotate(k, out[1], c, s1, s2, rotary, inverse, in_place)
    return out


def _launcher(x: Tensor):
    """The Triton launcher where the kernels run, else the native one (looked up per call, so a
    test can wrap a launcher)."""
    return kernel.rotary_fwd if _dispatch.runs_triton(x) else _native_fwd


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.compile, tracing, dispatch modes)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("lightllm::rotary_embedding", mutates_args=())
def _rotary_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, heads_dim: int,
               inverse: bool) -> tuple[Tensor, Tensor]:
    return _launcher(q)(q, k, cos, sin, heads_dim, inverse)


@_rotary_op.register_fake
def _(q, k, cos, sin, heads_dim, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("lightllm::rotary_embedding_", mutates_args=("q", "k"))
def _rotary_inplace_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, heads_dim: int) -> None:
    _launcher(q)(q, k, cos, sin, heads_dim, False, (q, k))


@_rotary_inplace_op.register_fake
def _(q, k, cos, sin, heads_dim):
    return None


# ------------------------------------------------------------------------------------------------
# Autograd, shared by the custom op and the eager autograd.Function
# ------------------------------------------------------------------------------------------------


def _apply(q, k, cos, sin, heads_dim: int, inverse: bool) -> tuple[Tensor, Tensor]:
    """The rotation by the route this call may take (the backward comes back through here)."""
    if not _dispatch.direct(q):
        return _rotary_op(q, k, cos, sin, heads_dim, inverse)
    if _dispatch.needs_grad(q, k, cos, sin):
        return _Rotary.apply(q, k, cos, sin, heads_dim, inverse)
    return _launcher(q)(q, k, cos, sin, heads_dim, inverse)


def _setup(ctx, inputs, output):
    q, k, cos, sin, heads_dim, inverse = inputs
    ctx.heads_dim, ctx.inverse = heads_dim, inverse
    ctx.table_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.save_for_backward(cos, sin, *((q, k) if ctx.table_grads else ()))


def _table_grads(ctx, dq, dk, q, k, cos, sin) -> tuple[Tensor, Tensor]:
    """d cos = sum over heads of dy * x; d sin = sum of dy * rotate_half(x) (forward) or of
    x * rotate_half(dy) (inverse), over q and k, and over the batch where one table serves it."""
    rotary, heads = cos.shape[-1], ctx.heads_dim
    dcos = dsin = 0
    for dy, x in ((dq, q), (dk, k)):
        dy, x = dy[..., :rotary].float(), x[..., :rotary].float()
        rotated = x * reference.rotate_half(dy) if ctx.inverse else dy * reference.rotate_half(x)
        dcos = dcos + (dy * x).sum(heads)
        dsin = dsin + rotated.sum(heads)
    if cos.shape[0] == 1:
        dcos, dsin = dcos.sum(0, keepdim=True), dsin.sum(0, keepdim=True)
    return dcos.to(cos.dtype), dsin.to(sin.dtype)


def _backward(ctx, dq, dk):
    cos, sin, *saved = ctx.saved_tensors
    gq, gk = _apply(dq, dk, cos, sin, ctx.heads_dim, not ctx.inverse)
    dcos = dsin = None
    if ctx.table_grads:
        dcos, dsin = _table_grads(ctx, dq, dk, *saved, cos, sin)
    return (gq, gk, dcos if ctx.needs_input_grad[2] else None,
            dsin if ctx.needs_input_grad[3] else None, None, None)


_rotary_op.register_autograd(_backward, setup_context=_setup)
_Rotary = _dispatch.autograd_function(
    "rotary_embedding", lambda *inputs: _launcher(inputs[0])(*inputs), _setup, _backward)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

_DTYPES = (*FLOAT_DTYPES, torch.float64)
_HEADS_DIM = {1: 1, -3: 1, 2: 2, -2: 2}  # unsqueeze_dim -> where q and k hold their heads
_LAYOUT = {1: "(B, H, S, D)", 2: "(B, S, H, D)"}


def _check(op: str, q, k, cos, sin, unsqueeze_dim) -> int:
    """Everything checked before any launch; returns the heads dim (1 or 2)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise tensor_error(op, name, t)
    if q.dtype not in _DTYPES:
        raise dtype_error(op, "q", q.dtype, _DTYPES)
    if k.dtype is not q.dtype:
        raise TypeError(f"{op}: k has dtype {k.dtype} but q has {q.dtype}: expected one dtype")
    if cos.dtype not in _DTYPES:
        raise dtype_error(op, "cos", cos.dtype, _DTYPES)
    if sin.dtype is not cos.dtype:
        raise TypeError(f"{op}: sin has dtype {sin.dtype} but cos has {cos.dtype}: expected one "
                        "dtype")
    heads_dim = _HEADS_DIM.get(unsqueeze_dim) if type(unsqueeze_dim) is int else None
    if heads_dim is None:
        raise ValueError(f"{op}: unsqueeze_dim must be 1 (q, k as (B, H, S, D)) or 2 (as "
                         f"(B, S, H, D)), got {unsqueeze_dim!r}")
    qs, ks, cs = q.shape, k.shape, cos.shape
    if len(qs) != 4:
        raise ValueError(f"{op}: q must be 4-D {_LAYOUT[heads_dim]} for unsqueeze_dim="
                         f"{unsqueeze_dim}, got shape {tuple(qs)}")
    seq = 3 - heads_dim
    if len(ks) != 4 or ks[0] != qs[0] or ks[seq] != qs[seq] or ks[3] != qs[3]:
        raise ValueError(f"{op}: k must be 4-D {_LAYOUT[heads_dim]} with q's batch, sequence and "
                         f"head dim (q has shape {tuple(qs)}), got shape {tuple(ks)}")
    if len(cs) != 3 or cs[0] != qs[0] and cs[0] != 1 or cs[1] != qs[seq]:
        raise ValueError(f"{op}: cos must have shape ({qs[0]} or 1, {qs[seq]}, R) for q of shape "
                         f"{tuple(qs)} (unsqueeze_dim={unsqueeze_dim}), got {tuple(cs)}")
    if sin.shape != cs:
        raise shape_error(op, "sin", sin, cs)
    rotary = cs[2]
    if rotary % 2 or not 0 < rotary <= qs[3]:
        raise ValueError(f"{op}: the rotary dim R = cos.shape[-1] must be even, positive and at "
                         f"most the head dim {qs[3]}, got {rotary}")
    device = q.device
    if k.device != device or cos.device != device or sin.device != device:
        check_same(op, "device", q=q, k=k, cos=cos, sin=sin)
    return heads_dim


def _reference(op: str, q, k, cos, sin, heads_dim: int):
    """float64: the eager reference (the kernels compute in fp32)."""
    if _dispatch.triton_runs_on(q.device):
        _dispatch.warn_once(f"{op}:float64", f"{op}: float64 has no kernel (it computes in fp32); "
                            "running the eager reference instead")
    return reference.rotary_embedding(q, k, cos, sin, heads_dim)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                     unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`` in one fused kernel
    launch for q and k (forward and backward): ``x * cos + rotate_half(x) * sin``.

    q (B, H, S, D) and k (B, Hkv, S, D) — or (B, S, H, D) with ``unsqueeze_dim=2`` — of any
    strides, with their own head counts (grouped-query attention); cos, sin (B or 1, S, R) as
    ``LlamaRotaryEmbedding`` / :func:`rotary_cos_sin` return them. R < D rotates the leading R
    dims and passes the trailing D - R through (partial rotary, as GPT-NeoX and Phi). fp32
    arithmetic, rounded once; the outputs are new contiguous tensors of q's dtype (transformers
    promotes q with cos: the same unless cos has a wider dtype). float64 runs the reference.
    """
    heads_dim = _check("rotary_embedding", q, k, cos, sin, unsqueeze_dim)
    if q.dtype is torch.float64:
        return _reference("rotary_embedding", q, k, cos, sin, heads_dim)
    return _apply(q, k, cos, sin, heads_dim, False)


def rotary_embedding_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                      unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`rotary_embedding` in place, for the decode step: q and k are overwritten with their
    rotation (only the R rotary dims are touched) and returned. It records no autograd (a
    RuntimeError if a gradient would be needed) and refuses tensors whose elements overlap
    (stride 0): each element must be written once."""
    op = "rotary_embedding_"
    heads_dim = _check(op, q, k, cos, sin, unsqueeze_dim)
    if _dispatch.needs_grad(q, k, cos, sin):
        raise RuntimeError(f"{op}: the in-place rotation records no autograd; use "
                           "rotary_embedding where a gradient is needed")
    direct = _dispatch.direct(q)
    if direct:  # real tensors (a traced call is checked by functionalization instead)
        for name, t in (("q", q), ("k", k)):
            if torch._debug_has_internal_overlap(t) == 1:
                raise RuntimeError(f"{op}: {name} has overlapping elements (stride 0): it "
                                   "cannot be written in place")
        if q.numel() and q.data_ptr() == k.data_ptr():
            raise RuntimeError(f"{op}: q and k are the same memory: it would be rotated twice")
    if q.dtype is torch.float64:
        q_rot, k_rot = _reference(op, q, k, cos, sin, heads_dim)
        q.copy_(q_rot)
        k.copy_(k_rot)
    elif not direct:
        _rotary_inplace_op(q, k, cos, sin, heads_dim)
    else:
        _launcher(q)(q, k, cos, sin, heads_dim, False, (q, k))
    return q, k


_INV_FREQ: dict[tuple[int, float, torch.device], Tensor] = {}


def _inv_freq(dim: int, base: float, device: torch.device) -> Tensor:
    """1 / base^(2i / dim) as LlamaRotaryEmbedding computes it (on the CPU, in fp32), moved to
    ``device`` once and cached: no per-call host tensor or copy on a CUDA path (a traced call
    computes it in the graph instead)."""
    if torch.compiler.is_compiling():
        return inv_freq(dim, base).to(device)
    key = (dim, base, device)
    table = _INV_FREQ.get(key)
    if table is None:
        table = _INV_FREQ[key] = inv_freq(dim, base).to(device)
    return table


def inv_freq(dim: int, base: float = 10000.0) -> Tensor:
    """The default rope type's inverse frequencies (``dim // 2`` fp32 values, on the CPU)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def cos_sin_from(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``LlamaRotaryEmbedding.forward``'s tables for 2-D ``positions``: fp32, cast to ``dtype``."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_cos_sin(positions: Tensor, dim: int, base: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (B, S, dim) for the positions (B, S) of each token (a row per sequence:
    with left padding they differ per row), or (1, S, dim) for positions (S,), exactly as
    transformers' ``LlamaRotaryEmbedding`` (default rope type, attention scaling 1) computes them:
    inv_freq = 1 / base^(2i / dim), angles in fp32, then cast to ``dtype``. ``dim`` is the rotary
    dim R (the head dim, or less for partial rotary). The inverse frequencies are cached per
    (dim, base, device)."""
    op = "rotary_cos_sin"
    if not isinstance(positions, Tensor):
        raise tensor_error(op, "positions", positions)
    if positions.dtype.is_complex or positions.dtype is torch.bool:
        raise TypeError(f"{op}: positions must be an integer or floating tensor, got "
                        f"{positions.dtype}")
    if positions.dim() not in (1, 2):
        raise ValueError(f"{op}: positions must have shape (S,) or (B, S), got "
                         f"{tuple(positions.shape)}")
    if type(dim) is not int or dim <= 0 or dim % 2:
        raise ValueError(f"{op}: dim must be a positive even int, got {dim!r}")
    if not isinstance(dtype, torch.dtype) or dtype not in _DTYPES:
        raise TypeError(f"{op}: dtype must be one of {_DTYPES}, got {dtype!r}")
    if positions.dim() == 1:
        positions = positions[None]
    return cos_sin_from(positions, _inv_freq(dim, float(base), positions.device), dtype)
