"""Scaled dot-product attention: validation, dispatch, autograd and torch.library registration.

Two custom ops carry the work on 4-D (batch, heads, seq, head_dim) tensors of any strides:
  lightllm::sdpa_fwd(q, k, v, mask?, dropout_p, is_causal, scale, seed?) -> (out, lse)
  lightllm::sdpa_bwd(dout, q, k, v, out, lse, mask?, dropout_p, is_causal, scale, seed?)
      -> (dq, dk, dv)
``lse`` is the fp32 natural-log log-sum-exp of each query row's scores (+inf for a row with no
visible key), saved for the backward, which recomputes the probabilities from it. ``mask`` is 4-D
with every dimension full or 1 (the kernels read size-1 dimensions through stride 0); ``seed`` is
a 0-d int64 CPU tensor, present only with dropout, from which the kernels draw (forward) and redraw
(backward) the same Philox keep-mask.

The forward picks its kernel by shape: 1-16 queries over at least 256 keys without ``is_causal`` or
dropout run the split-KV decode kernel (``kernels/attention_decode.py``), everything else the
flash-style kernel (``kernels/attention.py``). Both return the same (out, lse), so the backward is
the same either way.

Dispatch happens once, in the public function: inputs the kernels serve go through the custom ops;
everything else (CPU tensors without the interpreter, float64, empty tensors, an additive mask that
requires grad) runs the eager reference, whose autograd is PyTorch's.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from lightllm import _dispatch
from lightllm._validation import FLOAT_DTYPES, check_broadcastable, check_same, check_tensor
from lightllm.kernels import attention as kernel
from lightllm.kernels import attention_decode as decode
from lightllm.reference import attention as reference

_OP = "scaled_dot_product_attention"
_DTYPES = (*FLOAT_DTYPES, torch.float64)
MAX_HEAD_DIM = kernel.MAX_HEAD_DIM


@torch.library.custom_op("lightllm::sdpa_fwd", mutates_args=())
def _sdpa_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
    is_causal: bool, scale: float, seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    if decode.use_split_kv(q.shape[2], k.shape[2], is_causal, dropout_p):
        return decode.attention_decode_fwd(q, k, v, attn_mask, scale)
    return kernel.attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, _seed(seed))


@_sdpa_fwd.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    B, H, N = q.shape[:3]
    return q.new_empty((B, H, N, v.shape[-1])), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("lightllm::sdpa_bwd", mutates_args=())
def _sdpa_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Tensor | None, dropout_p: float, is_causal: bool, scale: float, seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernel.attention_bwd(dout, q, k, v, out, lse, attn_mask, scale, is_causal, dropout_p,
                                _seed(seed))


@_sdpa_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _seed(seed: Tensor | None) -> int:
    return 0 if seed is None else int(seed)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _sdpa_bwd(dout, q, k, v, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal,
                           ctx.scale, seed)
    return dq, dk, dv, None, None, None, None, None


_sdpa_fwd.register_autograd(_backward, setup_context=_setup_context)


def dropout_seed() -> Tensor:
    """The seed of one dropout draw, from PyTorch's default CPU generator (so ``torch.manual_seed``
    makes lightllm's dropout reproducible)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)


# ------------------------------------------------------------------------------------------------
# Validation and shapes
# ------------------------------------------------------------------------------------------------


def _broadcast(name: str, a: tuple, b: tuple) -> tuple:
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        raise ValueError(f"{_OP}: the batch dimensions of {name} {b} do not broadcast with "
                         f"query's {a}") from None


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Validate everything before any launch; return (batch, Hq, Hkv) of the broadcast problem."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, dtypes=_DTYPES, min_dim=2, op=_OP)
    check_same(_OP, "dtype", query=query, key=key, value=value)
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_OP}: attn_mask must be a torch.Tensor or None, got "
                        f"{type(attn_mask).__name__}")
    check_same(_OP, "device", query=query, key=key, value=value, attn_mask=attn_mask)
    if not (key.dim() == value.dim() == query.dim()):
        raise ValueError(f"{_OP}: query, key and value must have the same number of dimensions, "
                         f"got {query.dim()}, {key.dim()} and {value.dim()}")
    d, dv = query.shape[-1], value.shape[-1]
    if key.shape[-1] != d:
        raise ValueError(f"{_OP}: key head dim {key.shape[-1]} must equal query head dim {d}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"{_OP}: value has {value.shape[-2]} positions but key has "
                         f"{key.shape[-2]}: they must be equal")
    if max(d, dv) > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim {d} (query/key) / {dv} (value) is unsupported: the "
                         f"kernels hold a head in registers, at most {MAX_HEAD_DIM}")
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"{_OP}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"{_OP}: scale must be a float or None, got {type(scale).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{_OP}: attn_mask and is_causal=True cannot be given together (as in "
                         "PyTorch); fold the causal mask into attn_mask")

    # -- heads and batch dims: query (..., Hq, Nq, D), key/value (..., Hkv, Nk, D|Dv) --
    if query.dim() == 2:
        batch, hq, hkv = (), 1, 1
    else:
        hq, hkv = query.shape[-3], key.shape[-3]
        if value.shape[-3] != hkv:
            raise ValueError(f"{_OP}: value has {value.shape[-3]} heads but key has {hkv}")
        batch = _broadcast("key", tuple(query.shape[:-3]), tuple(key.shape[:-3]))
        batch = _broadcast("value", batch, tuple(value.shape[:-3]))
        if enable_gqa:
            if hq % hkv != 0:
                raise ValueError(f"{_OP}: with enable_gqa the number of key/value heads ({hkv}) "
                                 f"must divide the number of query heads ({hq})")
        elif hkv != hq and hkv != 1:
            raise ValueError(f"{_OP}: query has {hq} heads but key/value have {hkv}; pass "
                             "enable_gqa=True for grouped-query attention")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{_OP}: attn_mask must be bool (True = attend) or floating "
                            f"(added to the scores), got {attn_mask.dtype}")
        target = (*batch, hq, query.shape[-2], key.shape[-2]) if query.dim() > 2 else (
            query.shape[-2], key.shape[-2])
        check_broadcastable(_OP, "attn_mask", attn_mask, target)
    return batch, hq, hkv


def _to_4d(t: Tensor, batch: tuple, heads: int) -> Tensor:
    """(batch..., heads, N, D) as a 4-D view where possible (expanded dims have stride 0)."""
    if t.dim() == 2:
        return t[None, None]
    t = t.expand(*batch, heads, *t.shape[-2:])
    return t.reshape(-1, *t.shape[-3:])


def _mask_4d(mask: Tensor, batch: tuple, rank: int) -> Tensor:
    """The mask as 4-D with each dim full or 1 (size-1 dims stay unexpanded: read at stride 0)."""
    mask = mask.reshape((1,) * (rank - mask.dim()) + tuple(mask.shape))
    if rank == 2:
        return mask[None, None]
    lead = mask.shape[:-3]
    if all(s == 1 for s in lead):
        return mask.reshape(1, *mask.shape[-3:])
    return mask.expand(*batch, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])


def _runs_kernel(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None) -> bool:
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return False
    if attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        return _dispatch.use_triton(_OP, query, dtype_ok=False,
                                    why="the kernels give no gradient for attn_mask")
    return _dispatch.use_triton(_OP, query, dtype_ok=query.dtype != torch.float64,
                                why="float64 has no kernel")


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on fused Triton kernels.

    Layout ``(..., heads, seq, head_dim)`` (2-D ``(seq, head_dim)`` too); key/value batch dims
    broadcast against query's, and without ``enable_gqa`` a single key/value head broadcasts.
    ``attn_mask``: boolean (True = attend) or additive float, broadcastable to
    ``(..., Hq, Nq, Nk)``. ``is_causal`` uses PyTorch's top-left alignment. A row whose keys are
    all masked gives 0. ``enable_gqa``: Hkv divides Hq; K/V are never repeated in memory.
    ``dropout_p > 0`` applies dropout to the attention probabilities (always, as PyTorch does:
    pass 0.0 outside training) with a Philox mask drawn from ``torch``'s default generator.
    Head dims up to 256 (query/key and value may differ). float16/bfloat16/float32 run the
    kernels (fp32 accumulation); float64 runs the reference with a one-time warning.
    """
    batch, hq, hkv = _check(query, key, value, attn_mask, dropout_p, is_causal, scale,
                            enable_gqa)
    dropout_p = float(dropout_p)
    if not _runs_kernel(query, key, value, attn_mask):
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                      is_causal, scale, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    # A single key/value head without enable_gqa broadcasts like PyTorch's matmul; the kernels
    # serve it as a group of all query heads (dK/dV summed in-kernel, never expanded).
    q4 = _to_4d(query, batch, hq)
    k4 = _to_4d(key, batch, hkv)
    v4 = _to_4d(value, batch, hkv)
    mask4 = None if attn_mask is None else _mask_4d(attn_mask, batch, query.dim())
    seed = dropout_seed() if dropout_p > 0.0 else None
    out, _ = _sdpa_fwd(q4, k4, v4, mask4, dropout_p, bool(is_causal), scale, seed)
    if query.dim() == 2:
        return out[0, 0]
    return out.view(*batch, hq, *out.shape[-2:])
