"""Scaled dot-product attention: validation, dispatch, autograd and torch.library registration.

Two custom ops carry the work on 4-D (batch, heads, seq, head_dim) tensors of any strides:
  lightllm::sdpa_fwd(q, k, v, mask?, dropout_p, is_causal, scale, seed?, lower_right)
      -> (out, lse)
  lightllm::sdpa_bwd(dout, q, k, v, out, lse, mask?, dropout_p, is_causal, scale, seed?,
      lower_right) -> (dq, dk, dv)
``lse`` is the fp32 natural-log log-sum-exp of each query row's scores (+inf for a row with no
visible key), saved for the backward, which recomputes the probabilities from it. ``mask`` is 4-D
with every dimension full or 1 (the kernels read size-1 dimensions through stride 0); ``seed`` is
a one-element int64 tensor on the inputs' device, present only with dropout, drawn from torch's
generator of that device (so a CUDA graph replay draws a fresh one), from which the kernels draw
(forward) and redraw (backward) the same Philox keep-mask. The kernels load it: no host sync.
``lower_right`` aligns ``is_causal``'s diagonal to the last key (PyTorch's ``causal_lower_right``
bias: query i sees keys up to i + Nk - Nq), which a chunk of queries over a KV cache needs.

The forward picks its kernel by shape (``use_split_kv``): 1-16 queries over at least 256 keys
without ``is_causal`` or dropout run the split-KV decode kernel (``kernels/attention_decode.py``),
everything else the flash-style kernel (``kernels/attention.py``). Both return the same (out,
lse), so the backward is the same either way.

Dispatch happens once, in the public function. Inputs the kernels serve run them: in plain eager
mode the launchers are called directly (through an ``autograd.Function`` when a gradient is needed),
under ``torch.compile`` or a dispatch mode through the custom ops; both share the autograd functions.
Everything else (CPU tensors on the native path, float64, empty tensors, an additive mask that
requires grad) runs PyTorch's own ``F.scaled_dot_product_attention`` after lightllm's validation,
which gives the same semantics (rows with every key masked give 0, as here).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, CausalVariant

from lightllm import _dispatch
from lightllm._validation import FLOAT_DTYPES, dtype_error, tensor_error
from lightllm.kernels import attention as kernel
from lightllm.kernels import attention_decode as decode
from lightllm.reference import attention as reference

_OP = "scaled_dot_product_attention"
_DTYPES = (*FLOAT_DTYPES, torch.float64)
MAX_HEAD_DIM = kernel.MAX_HEAD_DIM
DECODE_MAX_Q = 16  # longest query the split-KV path serves
DECODE_MIN_K = 256  # shortest key sequence worth splitting

# ------------------------------------------------------------------------------------------------
# Launchers, custom ops and autograd
# ------------------------------------------------------------------------------------------------


def use_split_kv(n_q: int, n_k: int, is_causal: bool, dropout_p: float) -> bool:
    """Whether the forward of these lengths and flags runs the split-KV decode path."""
    return 1 <= n_q <= DECODE_MAX_Q and n_k >= DECODE_MIN_K and not is_causal and dropout_p == 0.0


def _forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right,
             window_left=-1, window_right=-1):
    """(out, lse) from the split-KV decode kernel or the flash kernel, by shape; a window runs
    the flash kernel, which skips the tiles outside it."""
    window = (window_left, window_right)
    if window == (-1, -1) and use_split_kv(q.shape[2], k.shape[2], is_causal, dropout_p):
        return decode.attention_decode_fwd(q, k, v, attn_mask, scale)
    if window == (-1, -1):
        return kernel.attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, seed,
                                    lower_right)
    return kernel.attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, seed,
                                lower_right, window=window)


@torch.library.custom_op("lightllm::sdpa_fwd", mutates_args=())
def _sdpa_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
    is_causal: bool, scale: float, seed: Tensor | None, lower_right: bool,
    window_left: int = -1, window_right: int = -1,
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right,
                    window_left, window_right)


@_sdpa_fwd.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right, window_left=-1,
      window_right=-1):
    B, H, N = q.shape[:3]
    return q.new_empty((B, H, N, v.shape[-1])), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("lightllm::sdpa_bwd", mutates_args=())
def _sdpa_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Tensor | None, dropout_p: float, is_causal: bool, scale: float, seed: Tensor | None,
    lower_right: bool, window_left: int = -1, window_right: int = -1,
) -> tuple[Tensor, Tensor, Tensor]:
    # Contiguous gradients: the fake below must know their strides from the shapes alone.
    return kernel.attention_bwd(dout, q, k, v, out, lse, attn_mask, scale, is_causal, dropout_p,
                                seed, lower_right, window=(window_left, window_right),
                                like_inputs=False)


@_sdpa_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, lower_right,
      window_left=-1, window_right=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right, *window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.lower_right = (dropout_p, is_causal, scale,
                                                                lower_right)
    ctx.window = tuple(window) or (-1, -1)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient arrives as None, never as zeros


def _backward(ctx, dout, _dlse):
    if dout is None:
        return (None,) * len(ctx.needs_input_grad)
    q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
    if _dispatch.direct(dout):
        band = {} if ctx.window == (-1, -1) else {"window": ctx.window}
        dq, dk, dv = kernel.attention_bwd(dout, q, k, v, out, lse, attn_mask, ctx.scale,
                                          ctx.is_causal, ctx.dropout_p, seed, ctx.lower_right,
                                          **band)
    else:
        dq, dk, dv = _sdpa_bwd(dout, q, k, v, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal,
                               ctx.scale, seed, ctx.lower_right, *ctx.window)
    return (dq, dk, dv) + (None,) * (len(ctx.needs_input_grad) - 3)


_sdpa_fwd.register_autograd(_backward, setup_context=_setup_context)


_Attention = _dispatch.autograd_function("scaled_dot_product_attention", _forward,
                                         _setup_context, _backward)


def dropout_seed(device=None) -> Tensor:
    """The seed of one dropout draw: a one-element int64 tensor on ``device``, drawn from torch's
    generator there (``torch.manual_seed`` reproduces it; under CUDA-graph capture each replay
    draws anew, as PyTorch's own dropout does)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------------
# Validation and shapes
# ------------------------------------------------------------------------------------------------


def _broadcast(name: str, a: tuple, b: tuple) -> tuple:
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        raise ValueError(f"{_OP}: the batch dimensions of {name} {b} do not broadcast with "
                         f"query's {a}") from None


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise tensor_error(_OP, name, t)
    if t.dtype not in _DTYPES:
        raise dtype_error(_OP, name, t.dtype, _DTYPES)
    if t.dim() < 2:
        raise ValueError(f"{_OP}: {name} must have at least 2 dimensions, got shape "
                         f"{tuple(t.shape)}")


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Validate everything before any launch. Returns (batch, Hq, Hkv, rank): the broadcast batch
    dims, the heads, and the rank of the output (the largest input rank, as PyTorch's matmul)."""
    _check_tensor("query", query)
    _check_tensor("key", key)
    _check_tensor("value", value)
    if not (query.dtype is key.dtype is value.dtype):
        raise TypeError(f"{_OP}: expected all tensors of one dtype, got query={query.dtype}, "
                        f"key={key.dtype}, value={value.dtype}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_OP}: attn_mask must be a torch.Tensor or None, got "
                        f"{type(attn_mask).__name__}")
    dev = query.device
    if key.device != dev or value.device != dev or (attn_mask is not None
                                                    and attn_mask.device != dev):
        listing = ", ".join(f"{n}={t.device}" for n, t in (("query", query), ("key", key),
                            ("value", value), ("attn_mask", attn_mask)) if t is not None)
        raise RuntimeError(f"{_OP}: expected all tensors on one device, got {listing}")
    qs, ks, vs = query.shape, key.shape, value.shape
    d, dv = qs[-1], vs[-1]
    if ks[-1] != d:
        raise ValueError(f"{_OP}: key head dim {ks[-1]} must equal query head dim {d}")
    if vs[-2] != ks[-2]:
        raise ValueError(f"{_OP}: value has {vs[-2]} positions but key has {ks[-2]}: they must "
                         "be equal")
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"{_OP}: head dim {d} (query/key) / {dv} (value) is unsupported: the "
                         f"kernels hold a head in registers, at most {MAX_HEAD_DIM}")
    if dropout_p != 0.0 and (isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real)
                             or not 0.0 <= float(dropout_p) <= 1.0):
        raise ValueError(f"{_OP}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and not isinstance(scale, numbers.Real):
        raise TypeError(f"{_OP}: scale must be a float or None, got {type(scale).__name__}")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{_OP}: attn_mask and is_causal=True cannot be given together (as in "
                         "PyTorch); fold the causal mask into attn_mask")

    # -- heads and batch dims, right-aligned as in PyTorch: (..., H, N, D); a 2-D input has one
    #    head; ranks may differ (missing leading dims are 1) --
    rank = max(len(qs), len(ks), len(vs))
    hq = qs[-3] if len(qs) > 2 else 1
    hkv = ks[-3] if len(ks) > 2 else 1
    if (vs[-3] if len(vs) > 2 else 1) != hkv:
        raise ValueError(f"{_OP}: value has {vs[-3] if len(vs) > 2 else 1} heads but key has "
                         f"{hkv}")
    if len(qs) == len(ks) == len(vs) and qs[:-3] == ks[:-3] == vs[:-3]:
        batch = tuple(qs[:-3])
    else:
        batch = _broadcast("key", tuple(qs[:-3]), tuple(ks[:-3]))
        batch = _broadcast("value", batch, tuple(vs[:-3]))
    if enable_gqa:
        if hq % hkv != 0:
            raise ValueError(f"{_OP}: with enable_gqa the number of key/value heads ({hkv}) must "
                             f"divide the number of query heads ({hq})")
    elif hkv != hq and hkv != 1 and hq != 1:
        raise ValueError(f"{_OP}: query has {hq} heads but key/value have {hkv}; pass "
                         "enable_gqa=True for grouped-query attention")
    if attn_mask is not None:
        if attn_mask.dtype is not torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{_OP}: attn_mask must be bool (True = attend) or floating (added "
                            f"to the scores), got {attn_mask.dtype}")
        heads = max(hq, hkv) if not enable_gqa else hq
        target = (*batch, heads, qs[-2], ks[-2])[-max(rank, 2):]
        ms = attn_mask.shape
        if len(ms) > len(target) or any(
            m != 1 and m != t for m, t in zip(reversed(ms), reversed(target))
        ):
            raise ValueError(f"{_OP}: attn_mask of shape {tuple(ms)} is not broadcastable to "
                             f"{tuple(target)}")
    return batch, hq, hkv, rank


def _causal_bias(bias: CausalBias, query: Tensor, key: Tensor,
                 is_causal: bool) -> tuple[None, bool, bool]:
    """(mask, is_causal, lower_right) for PyTorch's causal bias object as ``attn_mask``."""
    _check_tensor("query", query)
    _check_tensor("key", key)
    if is_causal:
        raise ValueError(f"{_OP}: attn_mask and is_causal=True cannot be given together (as in "
                         "PyTorch); the causal bias already is the causal mask")
    n_q, n_k = query.shape[-2], key.shape[-2]
    if (bias.seq_len_q, bias.seq_len_kv) != (n_q, n_k):
        raise ValueError(f"{_OP}: attn_mask is a causal bias for {bias.seq_len_q} queries and "
                         f"{bias.seq_len_kv} keys, but query has {n_q} and key {n_k}")
    if bias.variant == CausalVariant.UPPER_LEFT or n_q == n_k:
        return None, True, False
    if n_q == 1:
        return None, False, False  # the last query sees every key: no mask at all (decode)
    return None, True, True


def _to_4d(t: Tensor, batch: tuple, heads: int) -> Tensor:
    """(batch..., heads, N, D) as a 4-D tensor: itself when it already is one, else a view where
    possible (broadcast dims have stride 0; merging them may copy)."""
    if t.dim() == 4 and len(batch) == 1 and t.shape[0] == batch[0] and t.shape[1] == heads:
        return t
    n, d = t.shape[-2:]
    t = t.expand(*batch, heads, n, d)
    return t.reshape(math.prod(batch), heads, n, d)


def _mask_4d(mask: Tensor, batch: tuple, rank: int) -> Tensor:
    """The mask as 4-D with each dim full or 1 (size-1 dims stay unexpanded: read at stride 0)."""
    rank = max(rank, 3)
    mask = mask.reshape((1,) * (rank - mask.dim()) + tuple(mask.shape))
    if rank == 3:
        return mask[None]
    lead = mask.shape[:-3]
    if all(s == 1 for s in lead):
        return mask.reshape(1, *mask.shape[-3:])
    return mask.expand(*batch, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])


def _kernel_serves(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None) -> bool:
    if not _dispatch.runs_triton(query):
        return False
    if query.dtype is torch.float64:
        why = "float64 has no kernel"
    elif attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
        why = "the kernels give no gradient for attn_mask"
    elif query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return False
    else:
        return True
    _dispatch.warn_once(f"{_OP}:{why}", f"{_OP}: {why}; running PyTorch's own "
                        "F.scaled_dot_product_attention instead")
    return False


def _check_window(op: str, window_size, unbounded: int) -> tuple[int, int]:
    """``window_size`` as (left, right) ints, -1 for unbounded: a bound of at least
    ``unbounded`` (the query plus key lengths) hides nothing, so it is dropped (and the kernels'
    32-bit shifts cannot overflow)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool)
                       for w in window_size)):
        raise TypeError(f"{op}: window_size must be a pair of ints (left, right), negative for "
                        f"unbounded, got {window_size!r}")
    return tuple(-1 if w < 0 or w >= unbounded else int(w) for w in window_size)


def _window_mask(query, key, attn_mask, is_causal, window, lower_right):
    """``attn_mask`` (None, boolean or additive) restricted to the causal / local band, for
    PyTorch's op on the native path."""
    n_q, n_k = query.shape[-2], key.shape[-2]
    band = reference.window_mask(n_q, n_k, window, is_causal or lower_right,
                                 shift=n_k - n_q if lower_right else 0, device=query.device)
    if attn_mask is None:
        return band
    if attn_mask.dtype is torch.bool:
        return attn_mask & band
    return attn_mask.masked_fill(~band, float("-inf"))


# ------------------------------------------------------------------------------------------------
# Variable-length attention (FlashAttention's flash_attn_varlen_func)
#
#   lightllm::varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
#       dropout_p, causal, scale, window_left, window_right, seed?) -> (out, lse)
#   lightllm::varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
#       max_seqlen_k, dropout_p, causal, scale, window_left, window_right, seed?) -> (dq, dk, dv)
# on packed q (total_q, H, D), k / v (total_k, Hkv, D / Dv); lse (H, total_q) fp32.
# ------------------------------------------------------------------------------------------------

_VAROP = "flash_attn_varlen_func"


def _varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, window_left,
                    window_right, seed):
    return kernel.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal,
                             (window_left, window_right), dropout_p, seed)


@torch.library.custom_op("lightllm::varlen_fwd", mutates_args=())
def _varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, causal: bool, scale: float,
    window_left: int, window_right: int, seed: Tensor | None,
) -> tuple[Tensor, Tensor]:
    return _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p, causal, scale, window_left, window_right, seed)


@_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale,
      window_left, window_right, seed):
    total, heads = q.shape[:2]
    return (q.new_empty((total, heads, v.shape[-1])),
            q.new_empty((heads, total), dtype=torch.float32))


@torch.library.custom_op("lightllm::varlen_bwd", mutates_args=())
def _varlen_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    dropout_p: float, causal: bool, scale: float, window_left: int, window_right: int,
    seed: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernel.varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, scale, causal, (window_left, window_right), dropout_p,
                             seed, like_inputs=False)  # contiguous, as the fake says


@_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
      causal, scale, window_left, window_right, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, scale, wl, wr, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, dropout_p, causal, scale, wl, wr)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse's gradient arrives as None, never as zeros


def _varlen_backward(ctx, dout, _dlse):
    if dout is None:
        return (None,) * 13
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, dropout_p, causal, scale, wl, wr = ctx.args
    if _dispatch.direct(dout):
        dq, dk, dv = kernel.varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale,
                                       causal, (wl, wr), dropout_p, seed)
    else:
        dq, dk, dv = _varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p,
                                 causal, scale, wl, wr, seed)
    return (dq, dk, dv) + (None,) * 10


_varlen_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)

_VarlenAttention = _dispatch.autograd_function(_VAROP, _varlen_forward, _varlen_setup_context,
                                               _varlen_backward)


def _check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, window_size):
    """Validate everything before any launch; returns the window as (left, right) ints.

    The values of ``cu_seqlens_*`` are read only where that costs no device synchronisation
    (CPU tensors)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise tensor_error(_VAROP, name, t)
        if t.dtype not in _DTYPES:
            raise dtype_error(_VAROP, name, t.dtype, _DTYPES)
        if t.dim() != 3:
            raise ValueError(f"{_VAROP}: {name} must be 3-D (total_tokens, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (q.dtype is k.dtype is v.dtype):
        raise TypeError(f"{_VAROP}: expected q, k, v of one dtype, got q={q.dtype}, "
                        f"k={k.dtype}, v={v.dtype}")
    for name, t in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(t, Tensor):
            raise tensor_error(_VAROP, name, t)
        if t.dtype is not torch.int32:
            raise TypeError(f"{_VAROP}: {name} must be int32, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{_VAROP}: {name} must be 1-D with batch + 1 >= 1 entries, got "
                             f"shape {tuple(t.shape)}")
    if cu_q.shape[0] != cu_k.shape[0]:
        raise ValueError(f"{_VAROP}: cu_seqlens_q has {cu_q.shape[0]} entries but cu_seqlens_k "
                         f"{cu_k.shape[0]}: both must be batch + 1")
    dev = q.device
    if k.device != dev or v.device != dev or cu_q.device != dev or cu_k.device != dev:
        raise RuntimeError(f"{_VAROP}: expected all tensors on one device, got q={q.device}, "
                           f"k={k.device}, v={v.device}, cu_seqlens_q={cu_q.device}, "
                           f"cu_seqlens_k={cu_k.device}")
    (tq, h, d), (tk, hkv, dk), (tv, hv, dv) = q.shape, k.shape, v.shape
    if dk != d:
        raise ValueError(f"{_VAROP}: k head dim {dk} must equal q head dim {d}")
    if (tv, hv) != (tk, hkv):
        raise ValueError(f"{_VAROP}: v has shape {tuple(v.shape)} but k {tuple(k.shape)}: tokens "
                         "and heads must agree")
    if hkv == 0 or h % hkv:
        raise ValueError(f"{_VAROP}: the number of k/v heads ({hkv}) must divide the number of "
                         f"q heads ({h})")
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"{_VAROP}: head dim {d} (q/k) / {dv} (v) is unsupported: the kernels "
                         f"hold a head in registers, at most {MAX_HEAD_DIM}")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0:
            raise ValueError(f"{_VAROP}: {name} must be a non-negative int, got {m!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not (
            0.0 <= float(dropout_p) <= 1.0):
        raise ValueError(f"{_VAROP}: dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{_VAROP}: softmax_scale must be a float or None, got "
                        f"{type(scale).__name__}")
    window = _check_window(_VAROP, window_size, max_q + max_k)
    # Values: free on the host in eager mode; a device sync on CUDA and data-dependent under
    # torch.compile (the kernels clamp every bound there).
    if cu_q.is_cpu and _dispatch.direct(cu_q):
        for name, cu, total, m in (("cu_seqlens_q", cu_q, tq, max_q),
                                   ("cu_seqlens_k", cu_k, tk, max_k)):
            _check_cu_values(name, cu, total, m, "q" if name.endswith("q") else "k")
    return window


def _check_cu_values(name, cu, total, max_len, tensor):
    if cu[0].item() != 0:
        raise ValueError(f"{_VAROP}: {name} must start at 0, got {cu[0].item()}")
    lengths = cu.diff()
    if lengths.numel() and (lengths < 0).any():
        raise ValueError(f"{_VAROP}: {name} must be non-decreasing, got {cu.tolist()}")
    if cu[-1].item() != total:
        raise ValueError(f"{_VAROP}: {name} ends at {cu[-1].item()} but {tensor} has {total} "
                         "tokens: the last entry must be the total")
    if lengths.numel() and lengths.max().item() > max_len:
        raise ValueError(f"{_VAROP}: {name} has a sequence of {lengths.max().item()} tokens, "
                         f"longer than max_seqlen_{tensor}={max_len}")


def _varlen_native(q, k, v, cu_q, cu_k, dropout_p, causal, scale, window, return_lse):
    """The native CPU path: PyTorch's own attention on each sequence's views (no copies of q, k,
    v; GQA without repeating), autograd through PyTorch; ``lse`` from its flash kernel."""
    h, hkv = q.shape[1], k.shape[1]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    outs, lses = [], []
    for s in range(len(cq) - 1):
        a, b, c, e = cq[s], cq[s + 1], ck[s], ck[s + 1]
        lq, lk = b - a, e - c
        if lq == 0:
            continue
        qs = q[a:b].transpose(0, 1)
        ks, vs = k[c:e].transpose(0, 1), v[c:e].transpose(0, 1)
        if lk == 0:  # no key at all: output 0 (still a function of q for autograd), lse +inf
            outs.append((qs[..., :1] * 0.0).expand(h, lq, v.shape[-1]).transpose(0, 1))
            lses.append(q.new_full((h, lq), float("inf"), dtype=torch.float32))
            continue
        plain_causal = causal and lq == lk and window == (-1, -1)
        band = None
        if (causal or window != (-1, -1)) and not plain_causal:
            band = reference.window_mask(lq, lk, window, causal, device=q.device)
        out, lse = _sequence_native(flash, qs, ks, vs, band, plain_causal, dropout_p, scale,
                                    h != hkv, return_lse)
        outs.append(out.transpose(0, 1))
        if return_lse:  # a row that sees no key gets +inf, as the kernels'
            lse = lse.float()
            lses.append(lse if band is None else lse.masked_fill(~band.any(-1), float("inf")))
    out = torch.cat(outs) if outs else q.new_empty((0, h, v.shape[-1]))
    if not return_lse:
        return out
    lse = torch.cat(lses, dim=1) if lses else q.new_empty((h, 0), dtype=torch.float32)
    return out, lse


def _sequence_native(flash, qs, ks, vs, band, is_causal, dropout_p, scale, gqa, return_lse):
    """(out (H, L, Dv), lse (H, L) or None) of one sequence by PyTorch's CPU attention."""
    if (return_lse and dropout_p == 0.0 and qs.dtype is not torch.float64
            and qs.shape[-1] == vs.shape[-1]):
        mask = None if band is None else torch.zeros(band.shape, dtype=qs.dtype).masked_fill(
            ~band, float("-inf"))
        out, lse = flash(qs[None], ks[None], vs[None], 0.0, is_causal, attn_mask=mask,
                         scale=scale)
        return out[0], lse[0]
    out = F.scaled_dot_product_attention(qs, ks, vs, band, dropout_p, is_causal, scale=scale,
                                         enable_gqa=gqa)
    if not return_lse:
        return out, None
    scores = reference.attention_scores(qs, ks, band, is_causal, scale, enable_gqa=gqa)
    return out, torch.logsumexp(scores.float(), dim=-1)


def _varlen_kernel_serves(q: Tensor) -> bool:
    if not _dispatch.runs_triton(q):
        return False
    if q.dtype is torch.float64:
        _dispatch.warn_once(f"{_VAROP}:float64", f"{_VAROP}: float64 has no kernel; running "
                            "PyTorch's attention per sequence instead")
        return False
    return True


def flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
    softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), return_lse: bool = False,
):
    """FlashAttention's ``flash_attn_varlen_func``: attention over a batch of sequences packed
    without padding.

    ``q`` ``(total_q, H, D)``, ``k`` ``(total_k, Hkv, D)``, ``v`` ``(total_k, Hkv, Dv)``
    (float16/bfloat16/float32; float64 runs PyTorch's attention), Hkv dividing H (grouped-query
    attention; K/V are never repeated). Sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]``
    of q and ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of k/v: ``cu_seqlens_*`` are int32 1-D
    tensors of batch + 1 entries starting at 0, on the inputs' device; sequences may be empty.
    ``max_seqlen_q`` / ``max_seqlen_k`` (host ints) are the longest lengths, which size the
    launch. ``causal`` and ``window_size=(left, right)`` (negative = unbounded) are aligned
    bottom-right per sequence, as FlashAttention >= 2.1: query i of a sequence with Lq queries
    and Lk keys sees key j iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``, ``causal``
    making ``right`` 0. A row with no visible key gives 0. ``dropout_p``: dropout on the
    probabilities (Philox, keyed per sequence and head; pass 0.0 outside training).
    ``softmax_scale`` defaults to ``1 / sqrt(D)``.

    Returns ``out`` ``(total_q, H, Dv)`` in q's dtype, and with ``return_lse`` also the fp32
    natural-log log-sum-exp ``(H, total_q)`` (+inf for a row with no visible key; it carries no
    gradient).

    Validation before any launch: tensors, dtypes, devices, shapes, head counts, window and
    scalars always; the values of ``cu_seqlens_*`` (start at 0, non-decreasing, last entry equal
    to the token count, no length above ``max_seqlen_*``) only for CPU tensors in eager mode, as
    reading them from a GPU would synchronise the host (and under ``torch.compile`` they are
    data). Elsewhere the kernels clamp every bound they derive
    from them into the tensors, so inconsistent values give wrong numbers (rows no sequence
    covers are left unwritten) but never an access outside q, k, v or the outputs.
    """
    window = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p, softmax_scale, window_size)
    dropout_p = float(dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not _varlen_kernel_serves(q):
        return _varlen_native(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, bool(causal),
                              scale, window, return_lse)
    seed = dropout_seed(q.device) if dropout_p > 0.0 else None
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), dropout_p,
            bool(causal), scale, *window, seed)
    if not _dispatch.direct(q):
        out, lse = _varlen_fwd(*args)
    elif _dispatch.needs_grad(q, k, v):
        out, lse = _VarlenAttention.apply(*args)
    else:
        out, lse = _varlen_forward(*args)
    return (out, lse) if return_lse else out


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
    *,
    window_size: tuple[int, int] = (-1, -1),
) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` on fused Triton kernels.

    Layout ``(..., heads, seq, head_dim)`` (2-D ``(seq, head_dim)`` too); batch dims broadcast
    right-aligned as in PyTorch (inputs may differ in rank), and without ``enable_gqa`` a single
    key/value (or query) head broadcasts. ``attn_mask``: boolean (True = attend) or additive
    float, broadcastable to ``(..., Hq, Nq, Nk)``, or PyTorch's causal bias
    (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``), served without a
    mask tensor. ``is_causal`` uses PyTorch's top-left alignment; ``causal_lower_right`` aligns
    the diagonal to the last key (a chunk of queries over a KV cache). A row whose keys are all
    masked gives 0. ``enable_gqa``: Hkv divides Hq; K/V are
    never repeated in memory. ``dropout_p > 0`` applies dropout to the attention probabilities
    (always, as PyTorch does: pass 0.0 outside training) with a Philox mask seeded from torch's
    generator of the inputs' device. Head dims up to 256 (query/key and value may differ).
    float16/bfloat16/float32 run the kernels (fp32 accumulation); on the native CPU path, and
    for float64, PyTorch's own op runs behind the same validation.

    ``window_size=(left, right)`` (keyword-only, lightllm's beyond PyTorch; negative =
    unbounded): query i also sees only keys ``i - left .. i + right``, aligned like the causal
    mask: query i at key i (top-left), or at key ``i + Nk - Nq`` with ``causal_lower_right`` as
    ``attn_mask``; ``is_causal`` makes ``right`` 0. It combines with any ``attn_mask``. The
    kernels never visit the key tiles outside the band (forward and backward); on the native
    CPU path the band is a boolean mask for PyTorch's op.
    """
    lower_right = False
    if isinstance(attn_mask, CausalBias):
        bias = attn_mask
        attn_mask, is_causal, lower_right = _causal_bias(bias, query, key, is_causal)
    batch, hq, hkv, rank = _check(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa)
    window = _check_window(_OP, window_size, query.shape[-2] + key.shape[-2])
    if not _kernel_serves(query, key, value, attn_mask):
        if lower_right:  # PyTorch's op takes the bias object only without enable_gqa: a mask
            attn_mask, is_causal = bias._materialize(query.device), False
        if window != (-1, -1):
            attn_mask, is_causal = _window_mask(query, key, attn_mask, is_causal, window,
                                                lower_right), False
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                              is_causal, scale=scale, enable_gqa=enable_gqa)
    dropout_p = float(dropout_p)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if hq == 1 and hkv > 1 and not enable_gqa:
        hq = hkv  # one query head against many: the query is read at stride 0
    # A single key/value head without enable_gqa broadcasts like PyTorch's matmul; the kernels
    # serve it as a group of all query heads (dK/dV summed in-kernel, never expanded).
    batch4 = batch or (1,)
    q4 = _to_4d(query, batch4, hq)
    k4 = _to_4d(key, batch4, hkv)
    v4 = _to_4d(value, batch4, hkv)
    mask4 = None if attn_mask is None else _mask_4d(attn_mask, batch, rank)
    seed = dropout_seed(query.device) if dropout_p > 0.0 else None
    args = (q4, k4, v4, mask4, dropout_p, bool(is_causal), scale, seed, lower_right)
    if window != (-1, -1):
        args += window
    if not _dispatch.direct(query):
        out = _sdpa_fwd(*args)[0]
    elif _dispatch.needs_grad(query, key, value):
        out = _Attention.apply(*args)[0]
    else:
        out = _forward(*args)[0]
    if rank == 4 and len(batch) == 1:
        return out
    return out.view(*batch, hq, *out.shape[-2:]) if rank > 2 else out.view(out.shape[-2:])


# ================================================================================================
# KV-cache attention: FlashAttention's flash_attn_with_kvcache (dense or paged cache, in-place
# append of new keys/values, each sequence attending over its own cached length)
#
#   lightllm::attention_kvcache(q, k_cache!, v_cache!, k?, v?, cache_seqlens?, seqlen,
#       block_table?, scale, causal, window_left, window_right) -> out
#
# q (B, Sq, H, D); the caches (B, max_len, Hkv, D) or pages (num_blocks, page_size, Hkv, D) with
# block_table (B, max_blocks) int32; cache_seqlens an int32 (B,) tensor, or None with the
# length ``seqlen`` for every sequence. The op writes k / v (B, Sn, Hkv, D) into the caches at
# positions cache_seqlens[b] .. + Sn - 1 (declared in mutates_args) and returns the attention of
# the Sq queries, the last Sq positions of each sequence, over its cache_seqlens[b] + Sn keys.
# CUDA (and the interpreter) run kernels/attention_kvcache.py: one append launch, then split-KV
# programs that read each sequence's length on the device (no host sync: CUDA-graph capturable).
# The native CPU path appends with one index_put_ per cache and runs PyTorch's SDPA per sequence
# on a view of its keys (a slice of the dense cache; a run of consecutive pages; else a gather of
# its pages). Inference only: a call that autograd would record is refused.
# ================================================================================================

from lightllm.kernels import attention_kvcache as kvcache_kernel  # noqa: E402
from lightllm.reference import attention as _reference  # noqa: E402

_KV = "flash_attn_with_kvcache"


def _kv_tensor(name: str, t, dims: int, dtypes=_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise tensor_error(_KV, name, t)
    if t.dtype not in dtypes:
        raise dtype_error(_KV, name, t.dtype, dtypes)
    if t.dim() != dims:
        raise ValueError(f"{_KV}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{_KV}: {name} must have a unit stride in its last (head) dimension, "
                         f"got strides {t.stride()}")


def _check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal,
                   window_size):
    """Validate everything before any launch; returns (paged, capacity, n_new, left, right):
    whether the cache is paged, the keys a sequence can hold, the new tokens, the window."""
    _kv_tensor("q", q, 4)
    _kv_tensor("k_cache", k_cache, 4)
    _kv_tensor("v_cache", v_cache, 4)
    if not (q.dtype is k_cache.dtype is v_cache.dtype):
        raise TypeError(f"{_KV}: expected q, k_cache and v_cache of one dtype, got q={q.dtype}, "
                        f"k_cache={k_cache.dtype}, v_cache={v_cache.dtype}")
    if (k is None) != (v is None):
        raise ValueError(f"{_KV}: k and v must be given together (both or neither)")
    named = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
             ("cache_seqlens", cache_seqlens if isinstance(cache_seqlens, Tensor) else None),
             ("block_table", block_table if isinstance(block_table, Tensor) else None)]
    dev = q.device
    if any(t is not None and t.device != dev for _, t in named):
        listing = ", ".join(f"{n}={t.device}" for n, t in named if t is not None)
        raise RuntimeError(f"{_KV}: expected all tensors on one device, got {listing}")
    B, Sq, H, D = q.shape
    nb, page, hkv, dk = k_cache.shape
    dv = v_cache.shape[-1]
    if dk != D:
        raise ValueError(f"{_KV}: k_cache head dim {dk} must equal q's head dim {D}")
    if tuple(v_cache.shape[:3]) != (nb, page, hkv):
        raise ValueError(f"{_KV}: v_cache {tuple(v_cache.shape)} must match k_cache "
                         f"{tuple(k_cache.shape)} in all but the head dim")
    if D > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        raise ValueError(f"{_KV}: head dim {D} (q/k) / {dv} (v) is unsupported: the kernels hold "
                         f"a head in registers, at most {MAX_HEAD_DIM}")
    if hkv == 0 or H % hkv:
        raise ValueError(f"{_KV}: the caches' {hkv} key/value heads must divide q's {H} heads")
    paged_ = block_table is not None
    if paged_:
        if not isinstance(block_table, Tensor):
            raise tensor_error(_KV, "block_table", block_table)
        if block_table.dtype is not torch.int32 or block_table.dim() != 2 or (
                block_table.shape[0] != B):
            raise ValueError(f"{_KV}: block_table must be a 2-D int32 tensor with {B} rows (one "
                             f"per sequence), got {block_table.dtype} of shape "
                             f"{tuple(block_table.shape)}")
        if page < 1:
            raise ValueError(f"{_KV}: page_size (k_cache.shape[1]) must be positive, got {page}")
        capacity = block_table.shape[1] * page
    else:
        if nb != B:
            raise ValueError(f"{_KV}: without block_table, k_cache must be (B={B}, max_len, Hkv, "
                             f"D), got {tuple(k_cache.shape)}")
        capacity = page
    n_new = 0
    if k is not None:
        _kv_tensor("k", k, 4)
        _kv_tensor("v", v, 4)
        if k.dtype is not q.dtype or v.dtype is not q.dtype:
            raise TypeError(f"{_KV}: k and v must have q's dtype {q.dtype}, got {k.dtype} and "
                            f"{v.dtype}")
        n_new = k.shape[1]
        if tuple(k.shape) != (B, n_new, hkv, D) or tuple(v.shape) != (B, n_new, hkv, dv):
            raise ValueError(f"{_KV}: k and v must be (B={B}, Sn, Hkv={hkv}, D) with the caches' "
                             f"head dims, got {tuple(k.shape)} and {tuple(v.shape)}")
    if isinstance(cache_seqlens, Tensor):
        if cache_seqlens.dtype is not torch.int32 or tuple(cache_seqlens.shape) != (B,):
            raise ValueError(f"{_KV}: cache_seqlens must be an int32 tensor of shape ({B},), got "
                             f"{cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}")
    elif cache_seqlens is not None and (isinstance(cache_seqlens, bool)
                                        or not isinstance(cache_seqlens, int)):
        raise TypeError(f"{_KV}: cache_seqlens must be an int, an int32 tensor or None, got "
                        f"{type(cache_seqlens).__name__}")
    elif isinstance(cache_seqlens, int) and not 0 <= cache_seqlens <= capacity - n_new:
        raise ValueError(f"{_KV}: cache_seqlens={cache_seqlens} with {n_new} new tokens needs "
                         f"room for {cache_seqlens + n_new} keys; the cache holds {capacity} a "
                         "sequence")
    if cache_seqlens is None and n_new:
        raise ValueError(f"{_KV}: new k/v need cache_seqlens (where to write them); None means "
                         "the whole cache is filled")
    if softmax_scale is not None and (isinstance(softmax_scale, bool)
                                      or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"{_KV}: softmax_scale must be a float or None, got "
                        f"{type(softmax_scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"{_KV}: causal must be a bool, got {type(causal).__name__}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"{_KV}: window_size must be a pair of ints (left, right), got "
                        f"{window_size!r}")
    left, right = window_size
    left, right = max(left, -1), (0 if causal else max(right, -1))
    if B * max(n_new, 1) * hkv > 2**31 - 1 or B * hkv * max(Sq, 1) * (H // hkv) > 2**31 - 1:
        raise ValueError(f"{_KV}: B x tokens x heads past 2^31 - 1 rows is unsupported")
    # -- values: read on the CPU only (on CUDA they stay on the device; the kernels clamp), and
    #    not while tracing (data-dependent) --
    if dev.type == "cpu" and _dispatch.direct(q):
        if isinstance(cache_seqlens, Tensor) and B:
            lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
            if lo < 0 or hi + n_new > capacity:
                raise ValueError(f"{_KV}: cache_seqlens must lie in [0, {capacity - n_new}] "
                                 f"(the cache holds {capacity} keys a sequence, {n_new} are new), "
                                 f"got values in [{lo}, {hi}]")
        if paged_ and block_table.numel():
            lo, hi = int(block_table.min()), int(block_table.max())
            if lo < 0 or hi >= nb:
                raise ValueError(f"{_KV}: block_table entries must be page indices in "
                                 f"[0, {nb}), got values in [{lo}, {hi}]")
    return paged_, capacity, n_new, left, right


def _lengths(cache_seqlens: Tensor | None, seqlen: int, batch: int) -> list[int]:
    return [seqlen] * batch if cache_seqlens is None else cache_seqlens.tolist()


def _append_native(k_cache, v_cache, k, v, cache_seqlens, seqlen, block_table):
    """Write k / v (B, Sn, Hkv, D) at each sequence's length: one index_put_ per cache."""
    B, n_new = k.shape[:2]
    dev = k.device
    if block_table is None and cache_seqlens is None:
        k_cache.narrow(1, seqlen, n_new).copy_(k)
        v_cache.narrow(1, seqlen, n_new).copy_(v)
        return
    start = (torch.full((B, 1), seqlen, dtype=torch.long, device=dev) if cache_seqlens is None
             else cache_seqlens.to(torch.long)[:, None])
    pos = start + torch.arange(n_new, device=dev)
    if block_table is None:
        index = (torch.arange(B, device=dev)[:, None].expand(B, n_new), pos)
    else:
        page = k_cache.shape[1]
        index = (block_table.to(torch.long).gather(1, pos // page), pos % page)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def _paged_views(k_cache: Tensor, v_cache: Tensor, tables: list[list[int]], ends: list[int]):
    """Per sequence, (n, Hkv, D) views of its first ``ends[b]`` keys and values: a slice of the
    caches where its pages are consecutive (and the caches' pages packed), else a slice of one
    gather (one ``index_select`` per cache) of the pages of all the other sequences."""
    page = k_cache.shape[1]
    packed = (k_cache.stride(0) == page * k_cache.stride(1)
              and v_cache.stride(0) == page * v_cache.stride(1))
    spans, gather = [], []
    for pages, n in zip(tables, ends):
        used = pages[:-(-n // page)] if n > 0 else []
        first = used[0] if used else 0
        if packed and used == list(range(first, first + len(used))):
            spans.append((False, first * page))
        else:
            spans.append((True, len(gather) * page))
            gather.extend(used)
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    if gather:
        idx = torch.tensor(gather, dtype=torch.long, device=k_cache.device)
        gk = k_cache.index_select(0, idx).flatten(0, 1)
        gv = v_cache.index_select(0, idx).flatten(0, 1)
    views = []
    for (gathered, start), n in zip(spans, ends):
        kb, vb = (gk, gv) if gathered else (flat_k, flat_v)
        views.append((kb[start:start + max(n, 0)], vb[start:start + max(n, 0)]))
    return views


def _kvcache_native(q, k_cache, v_cache, k, v, cache_seqlens, seqlen, block_table, scale,
                    causal, left, right):
    """The native CPU path (and float64 anywhere): PyTorch's SDPA per sequence."""
    B, Sq, H, D = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[-1]
    group = H // hkv
    n_new = 0 if k is None else k.shape[1]
    if n_new and B:
        _append_native(k_cache, v_cache, k, v, cache_seqlens, seqlen, block_table)
    out = q.new_empty((B, Sq, H, dv))
    if not B or not Sq:
        return out
    lengths = [n + n_new for n in _lengths(cache_seqlens, seqlen, B)]
    # keys any query of a sequence can see: query i sits at key position i + n - Sq
    bounds = [(0 if left < 0 else max(0, n - Sq - left), n if right < 0 else min(n, n + right))
              for n in lengths]
    if block_table is not None:
        views = _paged_views(k_cache, v_cache, block_table.tolist(), [hi for _, hi in bounds])
    for b in range(B):
        n, (lo, hi) = lengths[b], bounds[b]
        if hi <= lo:
            out[b].zero_()
            continue
        if block_table is None:
            kb, vb = k_cache[b, lo:hi], v_cache[b, lo:hi]
        else:
            kb, vb = views[b][0][lo:], views[b][1][lo:]
        # rows = (group head, query token) pairs of one kv head: no GQA expansion
        qb = q[b].view(Sq, hkv, group, D).permute(1, 2, 0, 3).reshape(hkv, group * Sq, D)
        mask = None
        if Sq > 1 and (left >= 0 or right >= 0):  # one query sees exactly lo..hi
            mask = _reference.window_mask(Sq, hi - lo, (left, right), False, shift=n - Sq - lo,
                                          device=q.device)
            mask = mask.repeat(group, 1)
        ob = F.scaled_dot_product_attention(qb, kb.transpose(0, 1), vb.transpose(0, 1), mask,
                                            scale=scale)
        if mask is not None:  # a query with no visible key gives 0
            ob = ob.masked_fill(~mask.any(-1)[None, :, None], 0.0)
        out[b] = ob.view(hkv, group, Sq, dv).permute(2, 0, 1, 3).reshape(Sq, H, dv)
    return out


def _kvcache_forward(q, k_cache, v_cache, k, v, cache_seqlens, seqlen, block_table, scale,
                     causal, left, right):
    if _dispatch.runs_triton(q) and q.dtype is not torch.float64:
        return kvcache_kernel.attention_kvcache_fwd(q, k_cache, v_cache, k, v, cache_seqlens, seqlen,
                                           block_table, scale, left, right)
    return _kvcache_native(q, k_cache, v_cache, k, v, cache_seqlens, seqlen, block_table, scale,
                           causal, left, right)


@torch.library.custom_op("lightllm::attention_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None, v: Tensor | None,
    cache_seqlens: Tensor | None, seqlen: int, block_table: Tensor | None, scale: float,
    causal: bool, window_left: int, window_right: int,
) -> Tensor:
    return _kvcache_forward(q, k_cache, v_cache, k, v, cache_seqlens, seqlen, block_table, scale,
                            causal, window_left, window_right)


@_attention_kvcache.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, seqlen, block_table, scale, causal, window_left,
      window_right):
    return q.new_empty((*q.shape[:3], v_cache.shape[-1]))


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
) -> Tensor:
    """FlashAttention's ``flash_attn_with_kvcache``: attention of new queries over a KV cache,
    dense or paged, appending new keys/values in place first.

    ``q`` ``(B, Sq, H, D)``. ``k_cache`` / ``v_cache``: ``(B, max_len, Hkv, D)`` (a static
    cache), or pages ``(num_blocks, page_size, Hkv, D)`` with ``block_table`` ``(B,
    max_blocks)`` int32 listing each sequence's pages in order (any page size; entries past a
    sequence's length are never read). Any strides with a unit stride in the head dim.
    ``cache_seqlens``: int or int32 ``(B,)`` tensor, the keys each sequence has cached (None:
    the whole cache). ``k`` / ``v`` ``(B, Sn, Hkv, D)``, both or neither, are written into the
    caches in place at positions ``cache_seqlens[b] .. + Sn - 1`` (``cache_seqlens`` itself is
    not advanced). The Sq queries are the last Sq positions of their sequence and attend to its
    ``cache_seqlens[b] + Sn`` keys; ``causal`` aligns the mask bottom-right and ``window_size=
    (left, right)`` limits query i (at key position p) to keys ``p - left .. p + right``
    (negative: unbounded). GQA (Hkv divides H) without repeating K/V. A query with no visible
    key gives 0. Returns ``(B, Sq, H, Dv)``.

    Lengths are checked against the cache on the CPU; on CUDA they stay on the device (no host
    synchronisation, so a call can be captured in a CUDA graph) and the kernels clamp them to
    the cache, so a bad value cannot read or write outside it. Inference only: the op is not
    differentiable, and a call that autograd would record raises a ``RuntimeError`` (run it
    under ``torch.no_grad()`` / ``torch.inference_mode()``).
    """
    paged_, capacity, n_new, left, right = _check_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, block_table, softmax_scale, causal, window_size)
    if _dispatch.needs_grad(q, k_cache, v_cache, k, v):
        raise RuntimeError(f"{_KV}: the op is not differentiable (inference only); call it under "
                           "torch.no_grad() or torch.inference_mode(), or pass detached tensors")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    seqlens, seqlen = ((cache_seqlens, 0) if isinstance(cache_seqlens, Tensor)
                       else (None, capacity - n_new if cache_seqlens is None else cache_seqlens))
    if q.dtype is torch.float64 and _dispatch.runs_triton(q) and not q.is_cpu:
        _dispatch.warn_once(f"{_KV}:float64", f"{_KV}: float64 has no kernel; running PyTorch's "
                            "SDPA per sequence instead")
    args = (q, k_cache, v_cache, k, v, seqlens, seqlen, block_table, scale, causal, left, right)
    if not _dispatch.direct(q):
        return _attention_kvcache(*args)
    return _kvcache_forward(*args)
