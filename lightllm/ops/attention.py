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


def _forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right):
    """(out, lse) from the split-KV decode kernel or the flash kernel, by shape."""
    if use_split_kv(q.shape[2], k.shape[2], is_causal, dropout_p):
        return decode.attention_decode_fwd(q, k, v, attn_mask, scale)
    return kernel.attention_fwd(q, k, v, attn_mask, scale, is_causal, dropout_p, seed,
                                lower_right)


@torch.library.custom_op("lightllm::sdpa_fwd", mutates_args=())
def _sdpa_fwd(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float,
    is_causal: bool, scale: float, seed: Tensor | None, lower_right: bool,
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right)


@_sdpa_fwd.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right):
    B, H, N = q.shape[:3]
    return q.new_empty((B, H, N, v.shape[-1])), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("lightllm::sdpa_bwd", mutates_args=())
def _sdpa_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    attn_mask: Tensor | None, dropout_p: float, is_causal: bool, scale: float, seed: Tensor | None,
    lower_right: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernel.attention_bwd(dout, q, k, v, out, lse, attn_mask, scale, is_causal, dropout_p,
                                seed, lower_right)


@_sdpa_bwd.register_fake
def _(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, lower_right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, seed, lower_right = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.lower_right = (dropout_p, is_causal, scale,
                                                                lower_right)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
    if _dispatch.direct(dout):
        dq, dk, dv = kernel.attention_bwd(dout, q, k, v, out, lse, attn_mask, ctx.scale,
                                          ctx.is_causal, ctx.dropout_p, seed, ctx.lower_right)
    else:
        dq, dk, dv = _sdpa_bwd(dout, q, k, v, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal,
                               ctx.scale, seed, ctx.lower_right)
    return dq, dk, dv, None, None, None, None, None, None


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
    """
    lower_right = False
    if isinstance(attn_mask, CausalBias):
        bias = attn_mask
        attn_mask, is_causal, lower_right = _causal_bias(bias, query, key, is_causal)
    batch, hq, hkv, rank = _check(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa)
    if not _kernel_serves(query, key, value, attn_mask):
        if lower_right:  # PyTorch's op takes the bias object only without enable_gqa: a mask
            attn_mask, is_causal = bias._materialize(query.device), False
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
    if not _dispatch.direct(query):
        out = _sdpa_fwd(*args)[0]
    elif _dispatch.needs_grad(query, key, value):
        out = _Attention.apply(*args)[0]
    else:
        out = _forward(*args)[0]
    if rank == 4 and len(batch) == 1:
        return out
    return out.view(*batch, hq, *out.shape[-2:]) if rank > 2 else out.view(out.shape[-2:])
