"""lightllm's decoder language model: the GPT-2 and Llama families in one parametrised block.

    GPT-2 style  LayerNorm, GeLU feed-forward, learned positions, tied output head
    Llama style  RMSNorm, SwiGLU feed-forward, rotary positions, grouped-query attention

Every hot op is a lightllm kernel: attention (flash prefill, split-KV decode), the residual add
fused into the next norm, the feed-forward with its activation in the matmul epilogue, rotary
embeddings. One block serves both families; per layer the residual stream makes two fused
Add & Norm passes (after attention, and after the feed-forward into the *next* layer's norm):

    h = norm_attn[0](x)
    for each layer i:
        h, x = add_norm(attn_i(h), x, norm_mlp[i])            # x += attn(h); h = norm(x)
        h, x = add_norm(mlp_i(h), x, norm_attn[i+1] or norm_f)
    logits = lm_head(h)

Built from ``lightllm.nn`` blocks: ``CausalSelfAttention`` (projections, rotary, cache write,
masks), ``LayerNorm`` / ``RMSNorm`` parameters, the fused feed-forwards. ``backend="reference"``
(constructor or attribute) runs every op as its eager reference instead, on the same parameters:
the oracle of the tests and the "eager" provider of the benchmarks. Generation
(``lightllm.models.generation``, ``GPT.generate``) is one prefill and one token per step over a
preallocated KV cache; on a GPU the decode step is captured in a CUDA graph.
Shapes: B batch, S new tokens, T cache length, D model width, H / Hkv query / key-value heads,
hd head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..nn import CausalSelfAttention, KVCache, LayerNorm, RMSNorm
from ..nn.attention import BACKENDS, PagedKVCache, RaggedBatch, decoder_mask
from ..nn.fused_linear import feed_forward_block
from . import generation

NORMS = ("layer_norm", "rms_norm")
MLPS = ("gelu", "gelu_tanh", "relu", "swiglu")
POSITIONS = ("learned", "rope")


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # grouped-query attention; None: n_head
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 4 * n_embd
    block_size: int = 1024  # the longest context (positions)
    norm: str = "layer_norm"
    norm_eps: float = 1e-5
    mlp: str = "gelu_tanh"
    positions: str = "learned"
    rope_base: float = 10000.0
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    sliding_window: int | None = None  # Mistral's local attention: a query sees this many positions
    extra: dict = field(default_factory=dict)  # e.g. the source architecture

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head "
                             f"({self.n_kv_head})")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig: {name} must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if self.sliding_window is not None and (type(self.sliding_window) is not int
                                                or self.sliding_window <= 0):
            raise ValueError(f"GPTConfig: sliding_window must be a positive int or None, got "
                             f"{self.sliding_window!r}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rotary positions need an even head_dim, got "
                             f"{self.head_dim}")

    @classmethod
    def gpt2(cls, **overrides) -> GPTConfig:
        """GPT-2 small by default (124M); override any field."""
        return cls(**overrides)

    @classmethod
    def llama(cls, **overrides) -> GPTConfig:
        """The Llama layout (SmolLM2-135M's sizes by default); override any field."""
        base = dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                    intermediate_size=1536, block_size=8192, norm="rms_norm", norm_eps=1e-5,
                    mlp="swiglu", positions="rope", rope_base=100000.0, qkv_bias=False,
                    out_bias=False, mlp_bias=False, tie_embeddings=True)
        return cls(**{**base, **overrides})


def _norm(c: GPTConfig) -> nn.Module:
    if c.norm == "layer_norm":
        return LayerNorm(c.n_embd, eps=c.norm_eps)
    norm = RMSNorm(c.n_embd, eps=c.norm_eps)
    norm.cast_before_weight = True  # the Llama family's rounding order (transformers' LlamaRMSNorm)
    return norm


def _add_norm(ops, x: Tensor, residual: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` in one pass."""
    if isinstance(norm, LayerNorm):
        return ops.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias,
                                  norm.eps)
    return ops.add_rms_norm(x, residual, norm.normalized_shape, norm.weight, norm.eps,
                            cast_before_weight=norm.cast_before_weight)


def _plain_norm(ops, x: Tensor, norm: nn.Module) -> Tensor:
    if isinstance(norm, LayerNorm):
        return ops.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return ops.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps,
                        cast_before_weight=norm.cast_before_weight)


# The GeLU/ReLU block on two nn.Linear modules (dropout in training) of each backend.
_FEED_FORWARD_BLOCKS = {"lightllm": feed_forward_block,
                        "reference": BACKENDS["reference"].feed_forward_block}


class MLP(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.kind = c.mlp
        self.dropout = c.dropout
        if c.mlp == "swiglu":
            self.gate_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=c.mlp_bias)
            self.up_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=c.mlp_bias)
            self.down_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.mlp_bias)
        else:
            self.fc = nn.Linear(c.n_embd, c.intermediate_size, bias=c.mlp_bias)
            self.proj = nn.Linear(c.intermediate_size, c.n_embd, bias=c.mlp_bias)

    def forward(self, x: Tensor, backend: str = "lightllm") -> Tensor:
        if self.kind == "swiglu":
            g, u, d = self.gate_proj, self.up_proj, self.down_proj
            return BACKENDS[backend].swiglu_feed_forward(x, g.weight, u.weight, d.weight, g.bias,
                                                         u.bias, d.bias)
        activation = "relu" if self.kind == "relu" else "gelu"
        approximate = "tanh" if self.kind == "gelu_tanh" else "none"
        return _FEED_FORWARD_BLOCKS[backend](x, self.fc, self.proj, self.dropout, self.training,
                                             activation, approximate)


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.norm_attn = _norm(c)
        self.attn = CausalSelfAttention(c.n_embd, c.n_head, c.n_kv_head, bias=c.qkv_bias,
                                        dropout=c.dropout, head_dim=c.head_dim,
                                        out_bias=c.out_bias, sliding_window=c.sliding_window)
        self.norm_mlp = _norm(c)
        self.mlp = MLP(c)


class GPT(nn.Module):
    """A decoder-only language model on lightllm's kernels (module docstring)."""

    def __init__(self, config: GPTConfig, backend: str = "lightllm") -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm_f = _norm(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.backend = backend

    @property
    def backend(self) -> str:
        """``"lightllm"`` (the kernels) or ``"reference"`` (every op's eager reference)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"GPT: backend must be one of {tuple(BACKENDS)}, got {name!r}")
        self._backend = name
        for block in self.blocks:
            block.attn.backend = name

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def context_length(self) -> int:
        """The most positions a sequence may have (a sliding window does not bound it)."""
        return self.config.block_size

    # -- the forward pass ------------------------------------------------------------------

    def forward(self, input_ids: Tensor, positions: Tensor | None = None,
                attention_mask: Tensor | None = None, caches: list[KVCache] | None = None,
                start_pos: int | Tensor = 0, key_mask: Tensor | None = None,
                last_only: bool = False) -> Tensor:
        """Logits (B, S, V) of ``input_ids`` (B, S) (``last_only``: of the last position only,
        (B, 1, V); generation needs no more and the output head is a large matmul).

        ``positions`` (B, S): each token's position (default ``start_pos + arange(S)``; with left
        padding, the position within its own sequence). ``attention_mask`` (B, S): 1 for real
        tokens, 0 for padding (training and plain forwards). With ``caches`` (one
        :class:`KVCache` per layer) the keys and values are written at ``start_pos`` and the
        queries attend to the whole cached prefix; ``key_mask`` (B, T) then marks the cache's
        real positions.
        """
        B, S = input_ids.shape
        c, ops = self.config, BACKENDS[self._backend]
        if positions is None:
            if attention_mask is not None:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                offset = start_pos if isinstance(start_pos, int) else 0
                positions = torch.arange(offset, offset + S, device=input_ids.device).expand(B, S)
        x = self.wte(input_ids)  # (B, S, D)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = None
        if c.positions == "rope":
            rope = ops.rotary_cos_sin(positions, c.head_dim, base=c.rope_base, dtype=x.dtype)
        if key_mask is None and attention_mask is not None:
            key_mask = attention_mask.bool()
        mask = decoder_mask(B, S, start_pos, key_mask, caches is not None, input_ids.device,
                            c.sliding_window)

        def attend(i: int, block: Block, h: Tensor) -> Tensor:
            cache = caches[i] if caches is not None else None
            return block.attn(h, cache, start_pos, rope=rope, mask=mask)

        h = self._blocks(ops, x, attend)
        return self.lm_head(h[:, -1:] if last_only else h)

    def forward_ragged(self, input_ids: Tensor, positions: Tensor, cache: PagedKVCache,
                       batch: RaggedBatch, logits_at: Tensor | None = None) -> Tensor:
        """Logits of a packed step of many sequences over a paged cache, without padding.

        ``input_ids`` and ``positions`` (1, N): the step's tokens and each one's position in its
        own sequence, laid out as ``batch`` says (:class:`lightllm.nn.RaggedBatch`); their keys and
        values are written into ``cache`` (:meth:`make_paged_cache`). The embeddings, norms,
        projections and feed-forwards run once on all N tokens; per layer the attention is grouped
        by :meth:`CausalSelfAttention.forward_ragged`. Returns (M, V): the logits of the tokens
        ``logits_at`` (M,) (default: all N)."""
        c, ops = self.config, BACKENDS[self._backend]
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = None
        if c.positions == "rope":
            rope = ops.rotary_cos_sin(positions, c.head_dim, base=c.rope_base, dtype=x.dtype)

        def attend(i: int, block: Block, h: Tensor) -> Tensor:
            return block.attn.forward_ragged(h, cache.layer(i), batch, rope=rope)

        h = self._blocks(ops, x, attend)[0]
        return self.lm_head(h if logits_at is None else h[logits_at])

    def _blocks(self, ops, x: Tensor, attend) -> Tensor:
        """The normed output of the blocks on the embeddings ``x``; ``attend(i, block, h)`` is
        layer i's attention."""
        blocks = self.blocks
        h = _plain_norm(ops, x, blocks[0].norm_attn)
        for i, block in enumerate(blocks):
            h, x = _add_norm(ops, attend(i, block, h), x, block.norm_mlp)
            following = blocks[i + 1].norm_attn if i + 1 < len(blocks) else self.norm_f
            h, x = _add_norm(ops, block.mlp(h, self._backend), x, following)
        return h

    def make_caches(self, batch_size: int, max_seq_len: int) -> list[KVCache]:
        return [block.attn.make_kv_cache(batch_size, max_seq_len) for block in self.blocks]

    def make_paged_cache(self, num_pages: int, page_size: int) -> PagedKVCache:
        """A :class:`lightllm.nn.PagedKVCache` for every layer, in the model's dtype and device."""
        c, w = self.config, self.blocks[0].attn.k_proj.weight
        return PagedKVCache(num_pages, page_size, c.n_kv_head, c.head_dim, num_layers=c.n_layer,
                            dtype=w.dtype, device=w.device)

    # -- generation (lightllm.models.generation) -------------------------------------------

    def generate(self, input_ids: Tensor, max_new_tokens: int, **options) -> Tensor:
        """Prompt + new tokens as one (B, T + n) tensor: :func:`generation.generate`."""
        return generation.generate(self, input_ids, max_new_tokens, **options)

    def generate_iter(self, input_ids: Tensor, max_new_tokens: int, **options) -> Iterator[Tensor]:
        """The (B,) new tokens of each step: :func:`generation.generate_iter`."""
        return generation.generate_iter(self, input_ids, max_new_tokens, **options)

    # -- from transformers -----------------------------------------------------------------

    @classmethod
    def from_hf(cls, model: nn.Module) -> GPT:
        """A GPT sharing the weights of a transformers ``GPT2LMHeadModel`` or a Llama-layout
        causal LM (``LlamaForCausalLM``, Mistral, Qwen2, SmolLM): the parameters are the same
        tensors (GPT-2's fused ``c_attn`` and ``Conv1D`` weights as views), so no second copy is
        made and training one trains the other."""
        from .hf import from_hf

        return from_hf(cls, model)
