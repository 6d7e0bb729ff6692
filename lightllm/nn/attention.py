"""Attention modules built on ``lightllm.functional.scaled_dot_product_attention``.

- :class:`MultiheadAttention` is a drop-in for ``torch.nn.MultiheadAttention``: it *is* one (a
  subclass), so its constructor, parameters and ``state_dict`` keys are PyTorch's and a checkpoint
  loads unchanged; only ``forward`` differs. With ``need_weights=False`` the attention runs in
  lightllm's fused kernel. ``need_weights=True`` (PyTorch's default) asks for the ``(L, S)``
  probability matrix, which a flash kernel never forms: that call returns PyTorch's own computation
  with a one-time warning. Pass ``need_weights=False`` for the fast path.
- :class:`KVCache` and :class:`CausalSelfAttention` serve decoder models (lightllm's GPT is built
  from them): causal self-attention with separate q/k/v/out projections, grouped-query attention
  (``num_kv_heads < num_heads``, passed to the kernel as ``enable_gqa`` so K/V are never repeated in
  memory), rotary embeddings, padding masks (:func:`decoder_mask`), and an optional preallocated
  cache written in place for incremental decoding.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from .. import functional as LF
from .._dispatch import triton_runs_on, warn_once
from .._validation import check_same, check_tensor
from ..ops.attention import scaled_dot_product_attention as _sdpa
from ..reference import functional as reference_functional

# What a module's ``backend`` names: lightllm's ops, or their eager references (plain PyTorch, the
# oracle of the tests and the "eager" provider of the benchmarks). Both have the same functions.
BACKENDS = {"lightllm": LF, "reference": reference_functional}

_MHA = "lightllm.nn.MultiheadAttention"
_CSA = "lightllm.nn.CausalSelfAttention"
_CACHE = "lightllm.nn.KVCache"
_PAGED = "lightllm.nn.PagedKVCache"
_MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _mask_kind_ok(name: str, mask: torch.Tensor | None) -> None:
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"{_MHA}: {name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask is not None and mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{_MHA}: {name} must be a bool or floating-point tensor, got {mask.dtype}")


def _merge_masks(masks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
    """One SDPA mask from PyTorch-MHA masks (bool: True = ignore; float: added to the scores).

    All-bool inputs stay bool (SDPA convention: True = may attend), which the kernel reads as one
    byte per element; otherwise each mask becomes additive in ``dtype`` (-inf where a bool mask says
    ignore) and they are summed, as PyTorch's MHA does. Shapes broadcast to (B, H, L, S).
    """
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        blocked = masks[0]
        for m in masks[1:]:
            blocked = blocked | m
        return ~blocked
    merged = None
    for m in masks:
        additive = (m.to(dtype) if m.is_floating_point()
                    else torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf")))
        merged = additive if merged is None else merged + additive
    return merged


def _pad_key_column(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Append one key column every query may attend (bias_k/bias_v, add_zero_attn)."""
    return [F.pad(m, (0, 1), value=False if m.dtype == torch.bool else 0.0) for m in masks]


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose attention runs in lightllm's fused kernel.

    Same constructor, parameters, ``state_dict`` and ``forward`` signature as PyTorch's module (it is
    a subclass, so ``isinstance(m, torch.nn.MultiheadAttention)`` holds and checkpoints load
    unchanged). Supported: ``batch_first`` both ways, unbatched 2-D inputs, ``kdim``/``vdim``,
    ``add_bias_kv``, ``add_zero_attn``, ``key_padding_mask`` (bool, True = ignore, or float, added),
    ``attn_mask`` of shape ``(L, S)`` or ``(N*num_heads, L, S)`` (bool, True = NOT allowed, or float),
    ``is_causal`` as PyTorch's hint (it requires ``attn_mask``; with no ``key_padding_mask`` the
    kernel's causal mask replaces ``attn_mask``), dropout in training.

    ``need_weights=False`` is the fast path. ``need_weights=True`` (the default, as in PyTorch)
    returns the attention weights too; they are never formed by a flash kernel, so that call runs
    PyTorch's own computation and warns once.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None) -> None:
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"{_MHA}: num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(embed_dim, int) or embed_dim <= 0 or embed_dim % num_heads:
            raise ValueError(f"{_MHA}: embed_dim must be a positive multiple of num_heads "
                             f"({num_heads}), got {embed_dim!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{_MHA}: dropout must be in [0, 1], got {dropout}")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
                         batch_first=batch_first, device=device, dtype=dtype)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError(f"{_MHA}: is_causal=True is a hint that attn_mask is the causal mask "
                               "and needs attn_mask (as in torch.nn.MultiheadAttention); build one "
                               "with nn.Transformer.generate_square_subsequent_mask")
        if need_weights:
            return self._forward_with_weights(query, key, value, key_padding_mask, attn_mask,
                                              average_attn_weights, is_causal, batched)
        # Work batch-first, keeping `key is value` / `query is key` (they select fused projections).
        same_kv, same_qkv = key is value, query is key and key is value
        if batched and not self.batch_first:
            query = query.transpose(0, 1)
            key = query if same_qkv else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        out = self._forward_fused(query, key, value, key_padding_mask, attn_mask, is_causal, batched,
                                  same_kv, same_qkv)
        return (out.transpose(0, 1) if batched and not self.batch_first else out), None

    def _forward_fused(self, query, key, value, key_padding_mask, attn_mask, is_causal, batched,
                       same_kv, same_qkv):
        """The fast path; inputs are batch-first (N, L, E) or unbatched (L, E)."""
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        n, tgt_len, _ = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        # As PyTorch: the causal hint replaces attn_mask unless a padding mask must be merged into it.
        causal = is_causal and key_padding_mask is None
        masks = []
        if attn_mask is not None and not causal:
            masks.append(attn_mask.view(n, heads, tgt_len, -1) if attn_mask.dim() == 3
                         else attn_mask.view(1, 1, tgt_len, -1))
        if key_padding_mask is not None:
            masks.append(key_padding_mask.view(n, 1, 1, -1))

        q, k, v = self._in_projection(query, key, value, same_kv, same_qkv)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            masks = _pad_key_column(masks)
        # (N, L, E) -> (N, H, L, D): a strided view, read in place by the kernel.
        q = q.view(n, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.view(n, -1, heads, head_dim).transpose(1, 2)
        v = v.view(n, -1, heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(n, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            masks = _pad_key_column(masks)

        out = _sdpa(q, k, v, attn_mask=_merge_masks(masks, q.dtype),
                    dropout_p=self.dropout if self.training else 0.0, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return out if batched else out.squeeze(0)

    def _in_projection(self, query, key, value, same_kv, same_qkv):
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        if same_qkv:
            return F.linear(query, w, b).chunk(3, dim=-1)
        if same_kv:
            k, v = F.linear(key, w[e:], b[e:] if b is not None else None).chunk(2, dim=-1)
            return F.linear(query, w[:e], bq), k, v
        wq, wk, wv = w.chunk(3)
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    def _forward_with_weights(self, query, key, value, key_padding_mask, attn_mask,
                              average_attn_weights, is_causal, batched):
        """need_weights=True: PyTorch's computation, which forms the weights."""
        if triton_runs_on(query.device):
            warn_once(f"{_MHA}:need_weights",
                      f"{_MHA}: need_weights=True returns the attention weights, which the fused "
                      "kernel never forms; running PyTorch's computation instead. Pass "
                      "need_weights=False for the fast path")
        transpose = batched and self.batch_first  # F.multi_head_attention_forward takes (L, N, E)
        if transpose:
            q_t = query.transpose(0, 1)
            k_t = q_t if key is query else key.transpose(0, 1)
            value = k_t if value is key else value.transpose(0, 1)
            query, key = q_t, k_t
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight,
            self.in_proj_bias, self.bias_k, self.bias_v, self.add_zero_attn, self.dropout,
            self.out_proj.weight, self.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
            use_separate_proj_weight=separate, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if transpose else out), weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate shapes, dtypes and devices; return whether the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(name, t, op=_MHA)
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        check_same(_MHA, "dtype", query=query, key=key, value=value, weight=weight)
        check_same(_MHA, "device", query=query, key=key, value=value, weight=weight,
                   key_padding_mask=key_padding_mask, attn_mask=attn_mask)
        if query.dim() not in (2, 3):
            raise ValueError(f"{_MHA}: query must be 2-D (L, E) unbatched or 3-D batched, got shape "
                             f"{tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{_MHA}: key and value must have query's {query.dim()} dimensions, "
                             f"got key {tuple(key.shape)}, value {tuple(value.shape)}")
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{_MHA}: {name} must have last dimension {dim}, got shape "
                                 f"{tuple(t.shape)}")
        seq_dim = 1 if batched and self.batch_first else 0
        if batched and not query.shape[1 - seq_dim] == key.shape[1 - seq_dim] == value.shape[1 - seq_dim]:
            raise ValueError(f"{_MHA}: query, key and value must have one batch size, got shapes "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(f"{_MHA}: key and value must have one sequence length, got shapes "
                             f"{tuple(key.shape)}, {tuple(value.shape)}")
        tgt_len, src_len = query.shape[seq_dim], key.shape[seq_dim]
        batch = query.shape[1 - seq_dim] if batched else None

        _mask_kind_ok("key_padding_mask", key_padding_mask)
        _mask_kind_ok("attn_mask", attn_mask)
        if key_padding_mask is not None:
            expected = (batch, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"{_MHA}: key_padding_mask must have shape {expected} (batch, "
                                 f"source length), got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            shapes = [(tgt_len, src_len), ((batch if batched else 1) * self.num_heads, tgt_len, src_len)]
            if tuple(attn_mask.shape) not in shapes:
                raise ValueError(f"{_MHA}: attn_mask must have shape {shapes[0]} or "
                                 f"{shapes[1]} (batch * num_heads, L, S), got {tuple(attn_mask.shape)}")
        return batched


def chunk_causal_mask(n_q: int, n_k: int, device=None):
    """The causal mask of ``n_q`` new queries at the end of ``n_k`` keys (query i sees keys up to
    i + n_k - n_q): PyTorch's lower-right causal bias, which lightllm's SDPA runs as a kernel flag
    without a mask tensor; under ``torch.compile`` the equivalent boolean (n_q, n_k) mask, since
    dynamo cannot build the bias object inside a graph."""
    if not torch.compiler.is_compiling():
        return causal_lower_right(n_q, n_k)
    rows = torch.arange(n_q, device=device).unsqueeze(1)
    return torch.arange(n_k, device=device) <= rows + (n_k - n_q)


def window_size_of(window: int | None) -> tuple[int, int]:
    """FlashAttention's ``window_size`` of a decoder's sliding window of ``window`` positions: as
    transformers' Mistral, a query sees itself and the ``window - 1`` keys before it."""
    return (-1, -1) if window is None else (window - 1, 0)


def decoder_mask(batch: int, seq: int, start_pos: int | Tensor, key_mask: Tensor | None,
                 cached: bool, device=None, window: int | None = None
                 ) -> tuple[Tensor | None, bool, tuple[int, int]]:
    """``(attn_mask, is_causal, window_size)`` for ``seq`` new queries of a decoder at
    ``start_pos``, one mask for every layer.

    Without padding a fresh prefix is causal (``is_causal``), one new token over a cache needs no
    mask, and a chunk over a cache is causal aligned to the last key (:func:`chunk_causal_mask`: a
    kernel flag, no mask tensor, outside torch.compile). ``key_mask`` (batch, keys: True for real
    positions) folds padding into a boolean (batch, 1, seq, keys) mask. A tensor ``start_pos`` is
    the CUDA-graph decode step over a whole static cache: ``key_mask`` then marks its written
    slots. ``window`` (a sliding window of that many positions, :func:`window_size_of`): a fresh
    causal prefix passes it to the kernel as ``window_size`` (top-left, like ``is_causal``); every
    other case folds it into a boolean mask aligned to the queries' cache positions."""
    no_window = (-1, -1)
    if isinstance(start_pos, Tensor):
        mask = key_mask[:, None, None, :]
        if window is not None:
            slots = torch.arange(key_mask.shape[1], device=key_mask.device)
            mask = mask & (slots > start_pos - window)
        return mask, False, no_window
    if key_mask is None:
        if start_pos == 0 or not cached:
            return None, seq > 1, window_size_of(window)
        if window is None:
            if seq == 1:
                return None, False, no_window
            return chunk_causal_mask(seq, start_pos + seq, device), False, no_window
    keys = start_pos + seq if cached else seq
    q_pos = torch.arange(start_pos, start_pos + seq, device=device)[:, None]
    k_pos = torch.arange(keys, device=device)[None, :]
    visible = k_pos <= q_pos  # (seq, keys)
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    if key_mask is None:
        return visible, False, no_window
    return visible & key_mask[:, None, None, :keys], False, no_window


class KVCache(nn.Module):
    """Preallocated key/value buffers ``(batch_size, num_kv_heads, max_seq_len, head_dim)``.

    ``update(k, v, start_pos)`` writes ``k``/``v`` of shape ``(B, num_kv_heads, T, head_dim)``
    (``B <= batch_size``) at positions ``start_pos .. start_pos+T-1`` in place and returns views of
    the filled prefix ``[:B, :, :start_pos+T]``. A one-element int64 tensor ``start_pos`` (a
    CUDA-graph decode step, whose position changes between replays) writes the whole batch's
    single token there and returns the whole buffers: the caller's mask hides the unwritten
    slots. The buffers are non-persistent (not in the ``state_dict``) and follow ``.to()``. Meant
    for inference: run decoding under ``torch.no_grad()`` (writes into the buffers are recorded by
    autograd like any in-place copy otherwise).
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        for name, n in (("batch_size", batch_size), ("max_seq_len", max_seq_len),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"{_CACHE}: {name} must be a positive int, got {n!r}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def update(self, k: torch.Tensor, v: torch.Tensor,
               start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache_k, cache_v = self._buffers["k"], self._buffers["v"]
        if isinstance(start_pos, torch.Tensor):
            # Shapes and dtypes only: reading the position's value would synchronise the step.
            if start_pos.shape != (1,) or start_pos.dtype != torch.int64:
                raise ValueError(f"{_CACHE}: a tensor start_pos must be one int64 element, got "
                                 f"shape {tuple(start_pos.shape)} {start_pos.dtype}")
            if k.shape != v.shape or tuple(k.shape) != (*cache_k.shape[:2], 1, cache_k.shape[3]):
                raise ValueError(f"{_CACHE}: with a tensor start_pos, k and v must be one token of "
                                 f"the whole batch, shape {(*cache_k.shape[:2], 1, cache_k.shape[3])}"
                                 f", got {tuple(k.shape)} and {tuple(v.shape)}")
            cache_k.index_copy_(2, start_pos, k)
            cache_v.index_copy_(2, start_pos, v)
            return cache_k, cache_v
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            check_tensor("k", k, op=_CACHE)
            check_tensor("v", v, op=_CACHE)
        if k.dtype is not cache_k.dtype or v.dtype is not cache_k.dtype:
            check_same(_CACHE, "dtype", k=k, v=v, cache=cache_k)
        if k.device != cache_k.device or v.device != cache_k.device:
            check_same(_CACHE, "device", k=k, v=v, cache=cache_k)
        if k.shape != v.shape:
            raise ValueError(f"{_CACHE}: k and v must have one shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        size = cache_k.shape
        if k.dim() != 4 or k.shape[0] > size[0] or k.shape[1] != size[1] or k.shape[3] != size[3]:
            raise ValueError(f"{_CACHE}: k and v must have shape (B <= {size[0]}, {size[1]}, T, "
                             f"{size[3]}), got {tuple(k.shape)}")
        if type(start_pos) is not int or start_pos < 0:
            raise ValueError(f"{_CACHE}: start_pos must be a non-negative int, got {start_pos!r}")
        batch, new = k.shape[0], k.shape[2]
        end = start_pos + new
        if end > size[2]:
            raise ValueError(f"{_CACHE}: overflow: writing {new} tokens at start_pos "
                             f"{start_pos} needs {end} positions, the cache holds max_seq_len="
                             f"{size[2]}")
        if batch != size[0]:
            cache_k, cache_v = cache_k.narrow(0, 0, batch), cache_v.narrow(0, 0, batch)
        cache_k.narrow(2, start_pos, new).copy_(k)
        cache_v.narrow(2, start_pos, new).copy_(v)
        return cache_k.narrow(2, 0, end), cache_v.narrow(2, 0, end)

    def extra_repr(self) -> str:
        return (f"batch_size={self.batch_size}, max_seq_len={self.max_seq_len}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.k.dtype}")


class PagedKVCache(nn.Module):
    """Keys and values of many sequences in fixed-size pages, FlashAttention's paged layout.

    Buffers ``k`` and ``v`` of shape ``(num_layers, num_pages, page_size, num_kv_heads, head_dim)``;
    :meth:`layer` gives one layer's ``(num_pages, page_size, num_kv_heads, head_dim)`` views, the
    ``k_cache`` / ``v_cache`` of ``lightllm.functional.flash_attn_with_kvcache``. Every layer shares
    one page allocation: sequence ``seq`` (any hashable id) owns a list of pages, token ``t`` of it
    sits in page ``pages(seq)[t // page_size]`` at row ``t % page_size``, and
    :meth:`block_table` lays the lists of a batch out as the kernel's ``(B, max_blocks)`` int32
    table. :meth:`reserve` grows a sequence's pages to hold a number of tokens (a ``RuntimeError``
    when too few pages are free, and nothing is taken then; consecutive pages where the pool has
    them), :meth:`free` returns them. The
    allocator is host-side bookkeeping; the caller tracks how many tokens each sequence has written
    (``cache_seqlens``). The buffers are non-persistent and follow ``.to()``.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 num_layers: int = 1, dtype: torch.dtype | None = None, device=None) -> None:
        super().__init__()
        for name, n in (("num_pages", num_pages), ("page_size", page_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("num_layers", num_layers)):
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"{_PAGED}: {name} must be a positive int, got {n!r}")
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._free = list(range(num_pages))  # ascending
        self._pages: dict = {}

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of layer ``i``: ``(num_pages, page_size, num_kv_heads, head_dim)``."""
        return self._buffers["k"][i], self._buffers["v"][i]

    def pages_for(self, n_tokens: int) -> int:
        """Pages that hold ``n_tokens`` tokens."""
        return -(-n_tokens // self.page_size)

    def pages(self, seq) -> list[int]:
        """The pages of ``seq``, in token order (empty for an unknown sequence)."""
        return list(self._pages.get(seq, ()))

    def capacity(self, seq) -> int:
        """Tokens ``seq``'s pages hold."""
        return len(self._pages.get(seq, ())) * self.page_size

    def reserve(self, seq, n_tokens: int) -> None:
        """Grow ``seq``'s pages to hold ``n_tokens`` tokens in all (never shrinks)."""
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
            raise ValueError(f"{_PAGED}: n_tokens must be a non-negative int, got {n_tokens!r}")
        have = self._pages.get(seq, [])
        more = self.pages_for(n_tokens) - len(have)
        if more <= 0:
            return
        if more > len(self._free):
            raise RuntimeError(f"{_PAGED}: {n_tokens} tokens of sequence {seq!r} need {more} more "
                               f"pages of {self.page_size}, but {len(self._free)} of "
                               f"{self.num_pages} are free")
        self._pages[seq] = have + self._take(more, have[-1] + 1 if have else None)

    def _take(self, n: int, after: int | None) -> list[int]:
        """``n`` free pages, consecutive where possible, so that a sequence's keys stay one
        slice of the buffers (the native CPU path then reads them in place, with no gather):
        the pages right after the sequence's last one if they are free, else the first run of
        ``n`` consecutive free pages, else the lowest free pages."""
        free = self._free
        start = None
        if after is not None:
            i = bisect.bisect_left(free, after)
            if i + n <= len(free) and free[i] == after and free[i + n - 1] == after + n - 1:
                start = i
        if start is None:
            run = 0
            for j, page in enumerate(free):
                run = run + 1 if j and page == free[j - 1] + 1 else 1
                if run == n:
                    start = j - n + 1
                    break
        start = 0 if start is None else start
        taken = free[start:start + n]
        del free[start:start + n]
        return taken

    def free(self, seq) -> None:
        """Return ``seq``'s pages to the pool (a no-op for an unknown sequence)."""
        for page in self._pages.pop(seq, []):
            bisect.insort(self._free, page)

    def block_table(self, seqs, width: int | None = None) -> torch.Tensor:
        """``(len(seqs), width)`` int32 page table on the buffers' device (``width`` defaults to the
        longest list); entries past a sequence's pages are 0 and never read by the kernels, which
        stop at each sequence's length."""
        lists = [self._pages.get(s, []) for s in seqs]
        longest = max((len(p) for p in lists), default=0)
        width = longest if width is None else width
        if width < longest:
            raise ValueError(f"{_PAGED}: width {width} is less than the {longest} pages of the "
                             "longest sequence")
        table = torch.zeros(len(seqs), max(width, 1), dtype=torch.int32)
        for row, p in zip(table, lists):
            row[:len(p)] = torch.tensor(p, dtype=torch.int32)
        return table[:, :width].to(self.k.device)

    def extra_repr(self) -> str:
        return (f"num_pages={self.num_pages}, page_size={self.page_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_layers={self.num_layers}, dtype={self.k.dtype}")


@dataclass
class RaggedBatch:
    """The layout of one packed step of many sequences over a :class:`PagedKVCache`, shared by every
    layer (:meth:`CausalSelfAttention.forward_ragged`).

    The N tokens come in three groups, in this order: ``n_decode`` decode tokens (one per
    sequence), then the prompts that start at position 0 (``fresh``), then chunks that continue
    a prompt already partly cached (``chunks``).

    - ``slots`` (N,) int64: the cache row of each token's key/value, ``page * page_size + offset``.
    - ``decode_seqlens`` (n_decode,) int32 and ``decode_table`` (n_decode, W) int32: each decode
      sequence's length including its new token, and its pages.
    - ``fresh``: ``(start, end, cu_seqlens, max_seqlen)``: tokens ``start:end`` of the batch, int32
      ``cu_seqlens`` of those prompts (or chunks of them); None when there are none.
    - ``chunks``: ``(start, end, cache_seqlens (1,) int32, block_table (1, W) int32)`` each, the
      sequence's length including the chunk.
    """

    slots: Tensor
    n_decode: int = 0
    decode_seqlens: Tensor | None = None
    decode_table: Tensor | None = None
    fresh: tuple[int, int, Tensor, int] | None = None
    chunks: tuple[tuple[int, int, Tensor, Tensor], ...] = ()


class CausalSelfAttention(nn.Module):
    """Causal self-attention for decoder models, with grouped-query attention, rotary embeddings
    and a KV cache.

    Parameters: ``q_proj`` (E -> num_heads * head_dim), ``k_proj`` and ``v_proj`` (E ->
    num_kv_heads * head_dim), ``out_proj`` (num_heads * head_dim -> E), each an ``nn.Linear``;
    ``bias`` for the q/k/v projections, ``out_bias`` (default ``bias``) for ``out_proj``;
    ``head_dim`` defaults to E // num_heads. ``forward(x, kv_cache=None, start_pos=0, *,
    rope=None, mask=None)`` takes ``x`` of shape ``(B, T, E)`` and returns ``(B, T, E)``. Without
    a cache it is causal self-attention over ``x``. With a cache, the new keys/values are written
    at ``start_pos`` and token ``i`` of ``x`` (absolute position ``start_pos + i``) attends keys
    ``0 .. start_pos + i``. ``sliding_window`` (Mistral's local attention): a query sees only
    itself and the ``sliding_window - 1`` positions before it. ``rope`` is ``(cos, sin)`` of
    ``lightllm.functional.rotary_cos_sin`` for the new tokens, applied to q and k before the cache
    write. ``mask`` is the ``(attn_mask, is_causal, window_size)`` of :func:`decoder_mask`
    (padding, a CUDA-graph decode step, the window), which a model computes once for all its
    layers; it replaces the rule above. :meth:`forward_ragged` serves a packed batch of many
    sequences over a :class:`PagedKVCache`. ``backend`` is ``"lightllm"`` (the kernels) or
    ``"reference"`` (the eager references, see ``BACKENDS``).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 bias: bool = True, dropout: float = 0.0, device=None, dtype=None, *,
                 head_dim: int | None = None, out_bias: bool | None = None,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"{_CSA}: num_heads must be a positive int, got {num_heads!r}")
        if head_dim is None and (not isinstance(embed_dim, int) or embed_dim <= 0
                                 or embed_dim % num_heads):
            raise ValueError(f"{_CSA}: embed_dim must be a positive multiple of num_heads "
                             f"({num_heads}), got {embed_dim!r}")
        if head_dim is not None and (not isinstance(head_dim, int) or head_dim <= 0):
            raise ValueError(f"{_CSA}: head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(num_kv_heads, int) or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"{_CSA}: num_kv_heads must be a positive divisor of num_heads "
                             f"({num_heads}), got {num_kv_heads!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{_CSA}: dropout must be in [0, 1], got {dropout}")
        if sliding_window is not None and (not isinstance(sliding_window, int)
                                           or isinstance(sliding_window, bool)
                                           or sliding_window <= 0):
            raise ValueError(f"{_CSA}: sliding_window must be a positive int or None, got "
                             f"{sliding_window!r}")
        self.sliding_window = sliding_window
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads if head_dim is None else head_dim
        self.dropout = dropout
        self.backend = "lightllm"
        factory = {"device": device, "dtype": dtype}
        q_dim, kv_dim = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, q_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(q_dim, embed_dim, bias=bias if out_bias is None else out_bias,
                                  **factory)

    def make_kv_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """A cache matching this module's heads, dtype and device."""
        w = self.k_proj.weight
        return KVCache(batch_size, max_seq_len, self.num_kv_heads, self.head_dim, dtype=w.dtype,
                       device=w.device)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None,
                start_pos: int | torch.Tensor = 0, *, rope: tuple[Tensor, Tensor] | None = None,
                mask: tuple[Tensor | None, bool] | None = None) -> torch.Tensor:
        check_tensor("x", x, op=_CSA)
        weight = self.q_proj.weight
        if x.dtype is not weight.dtype or x.device != weight.device:
            check_same(_CSA, "dtype", x=x, weight=weight)
            check_same(_CSA, "device", x=x, weight=weight)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{_CSA}: x must have shape (batch, seq, {self.embed_dim}), got "
                             f"{tuple(x.shape)}")
        if kv_cache is None and not (isinstance(start_pos, int) and start_pos == 0):
            raise ValueError(f"{_CSA}: start_pos={start_pos!r} needs a kv_cache holding the "
                             "earlier positions")
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"{_CSA}: kv_cache must be a lightllm.nn.KVCache, got "
                                f"{type(kv_cache).__name__}")
            cached = kv_cache._buffers["k"].shape
            if cached[1] != self.num_kv_heads or cached[3] != self.head_dim:
                raise ValueError(f"{_CSA}: kv_cache holds {kv_cache.num_kv_heads} heads of dim "
                                 f"{kv_cache.head_dim}; this module needs {self.num_kv_heads} of "
                                 f"dim {self.head_dim}")
        ops = BACKENDS[self.backend]
        batch, seq, _ = x.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        # (B, T, E) -> (B, heads, T, D): strided views, read in place by the kernel
        q = self.q_proj(x).view(batch, seq, heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        if rope is not None:
            q, k = ops.rotary_embedding(q, k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)
        if mask is None:
            mask = decoder_mask(batch, seq, start_pos, None, kv_cache is not None, x.device,
                                self.sliding_window)
        attn_mask, causal = mask[0], mask[1]
        window = {} if len(mask) < 3 or mask[2] == (-1, -1) else {"window_size": mask[2]}
        out = ops.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal, enable_gqa=kv_heads != heads, **window)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, heads * head_dim))

    def forward_ragged(self, x: torch.Tensor, cache: tuple[Tensor, Tensor], batch: RaggedBatch,
                       *, rope: tuple[Tensor, Tensor] | None = None) -> torch.Tensor:
        """Attention of a packed batch of many sequences over a paged cache (no padding).

        ``x`` (1, N, E): the N new tokens of a :class:`RaggedBatch` step, ``cache`` this layer's
        ``(k_cache, v_cache)`` of a :class:`PagedKVCache` (``layer(i)``), ``rope`` the tokens'
        ``(cos, sin)``. The new keys and values are written at ``batch.slots``; then the decode
        tokens attend in one ``flash_attn_with_kvcache`` call over their block table, the prompts
        that start at position 0 in one ``flash_attn_varlen_func`` call over their own keys, and
        each chunk that continues a cached prompt in a ``flash_attn_with_kvcache`` call. Causal,
        with this module's sliding window. Returns (1, N, E). Inference only (no dropout)."""
        ops = BACKENDS[self.backend]
        n = x.shape[1]
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(1, n, heads, head_dim)
        k = self.k_proj(x).view(1, n, kv_heads, head_dim)
        v = self.v_proj(x).view(1, n, kv_heads, head_dim)
        if rope is not None:  # the rotary ops take (B, heads, T, D): views, no copy
            q, k = ops.rotary_embedding(q.transpose(1, 2), k.transpose(1, 2), *rope)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k, v = q[0], k[0], v[0]  # (N, heads, D)
        k_cache, v_cache = cache
        rows = k_cache.shape[0] * k_cache.shape[1]
        k_cache.view(rows, kv_heads, head_dim).index_copy_(0, batch.slots, k)
        v_cache.view(rows, kv_heads, head_dim).index_copy_(0, batch.slots, v)
        window = window_size_of(self.sliding_window)
        outs = []
        d = batch.n_decode
        if d:
            outs.append(ops.flash_attn_with_kvcache(
                q[:d, None], k_cache, v_cache, cache_seqlens=batch.decode_seqlens,
                block_table=batch.decode_table, causal=True, window_size=window)[:, 0])
        if batch.fresh is not None:
            start, end, cu_seqlens, longest = batch.fresh
            outs.append(ops.flash_attn_varlen_func(
                q[start:end], k[start:end], v[start:end], cu_seqlens, cu_seqlens, longest,
                longest, causal=True, window_size=window))
        for start, end, seqlens, table in batch.chunks:
            outs.append(ops.flash_attn_with_kvcache(
                q[None, start:end], k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                causal=True, window_size=window)[0])
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.out_proj(out.reshape(1, n, heads * head_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}")
