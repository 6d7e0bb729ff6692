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

Generation (``GPT.generate``) is one prefill and one token per step over a preallocated KV cache;
on a GPU the decode step is captured in a CUDA graph (static cache, static shapes, as gpt-fast).
Shapes: B batch, S new tokens, T cache length, D model width, H / Hkv query / key-value heads,
hd head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import functional as LF
from ..nn import KVCache, LayerNorm, RMSNorm
from ..nn.attention import chunk_causal_mask
from ..nn.fused_linear import feed_forward_block

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
    sliding_window: int | None = None  # Mistral: generation refuses to go past it
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


def _add_norm(x: Tensor, residual: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` in one pass."""
    if isinstance(norm, LayerNorm):
        return LF.add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias,
                                 norm.eps)
    return LF.add_rms_norm(x, residual, norm.normalized_shape, norm.weight, norm.eps,
                           cast_before_weight=norm.cast_before_weight)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=c.out_bias)
        self.dropout = c.dropout

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, cache: KVCache | None,
                start_pos: int | Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = LF.rotary_embedding(q, k, *rope)
        if cache is not None:
            if isinstance(start_pos, Tensor):  # CUDA-graph decode: write at a tensor position
                cache.k.index_copy_(2, start_pos, k)
                cache.v.index_copy_(2, start_pos, v)
                k, v = cache.k, cache.v  # (B, Hkv, T, hd); the mask hides what is not written
            else:
                k, v = cache.update(k, v, start_pos)
        y = LF.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_head != self.n_kv_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim))


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

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            g, u, d = self.gate_proj, self.up_proj, self.down_proj
            return LF.swiglu_feed_forward(x, g.weight, u.weight, d.weight, g.bias, u.bias, d.bias)
        activation = "relu" if self.kind == "relu" else "gelu"
        approximate = "tanh" if self.kind == "gelu_tanh" else "none"
        return feed_forward_block(x, self.fc, self.proj, self.dropout, self.training, activation,
                                  approximate)


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.norm_attn = _norm(c)
        self.attn = Attention(c)
        self.norm_mlp = _norm(c)
        self.mlp = MLP(c)


class GPT(nn.Module):
    """A decoder-only language model on lightllm's kernels (module docstring)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd) if c.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm_f = _norm(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._graphs: dict = {}

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
        c = self.config
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
            rope = LF.rotary_cos_sin(positions, c.head_dim, base=c.rope_base, dtype=x.dtype)
        if key_mask is None and attention_mask is not None:
            key_mask = attention_mask.bool()
        mask, is_causal = _attention_mask(B, S, start_pos, key_mask, caches is not None,
                                          input_ids.device)
        blocks = self.blocks
        h = _plain_norm(x, blocks[0].norm_attn)
        for i, block in enumerate(blocks):
            cache = caches[i] if caches is not None else None
            a = block.attn(h, rope, cache, start_pos, mask, is_causal)
            h, x = _add_norm(a, x, block.norm_mlp)
            following = blocks[i + 1].norm_attn if i + 1 < len(blocks) else self.norm_f
            h, x = _add_norm(block.mlp(h), x, following)
        return self.lm_head(h[:, -1:] if last_only else h)

    def make_caches(self, batch_size: int, max_seq_len: int) -> list[KVCache]:
        c, p = self.config, self.wte.weight
        return [KVCache(batch_size, max_seq_len, c.n_kv_head, c.head_dim, dtype=p.dtype,
                        device=p.device) for _ in range(c.n_layer)]

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 attention_mask: Tensor | None = None,
                 stream: Callable[[Tensor], None] | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool = True) -> Tensor:
        """Prompt + new tokens as one (B, T + n) tensor.

        Greedy when ``temperature`` is 0, else sampling from softmax(logits / temperature),
        restricted to the ``top_k`` most likely tokens and to the smallest set whose probability
        reaches ``top_p``. A batch of prompts of different lengths comes left-padded with
        ``attention_mask`` (B, T). Each sequence stops at ``eos_token_id``; the others go on and
        finished ones are filled with ``pad_token_id`` (default: the EOS id). Generation ends
        when all have finished or after ``max_new_tokens``. ``stream`` is called with each step's
        (B,) tokens; :meth:`generate_iter` is the iterator form.
        """
        out = [input_ids]
        for tokens in self.generate_iter(
                input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                attention_mask=attention_mask, generator=generator, cuda_graph=cuda_graph):
            if stream is not None:
                stream(tokens)
            out.append(tokens[:, None])
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def generate_iter(self, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                      top_k: int | None = None, top_p: float | None = None,
                      eos_token_id: int | None = None, pad_token_id: int | None = None,
                      attention_mask: Tensor | None = None,
                      generator: torch.Generator | None = None,
                      cuda_graph: bool = True) -> Iterator[Tensor]:
        """Yields the (B,) new tokens of each step (see :meth:`generate`)."""
        B, T = self._check_generate(input_ids, max_new_tokens, temperature, top_k, top_p,
                                    attention_mask)
        if max_new_tokens == 0:
            return
        device = input_ids.device
        total = T + max_new_tokens
        caches = self.make_caches(B, total)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = torch.ones(B, total, dtype=torch.bool, device=device)
            key_mask[:, :T] = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(T, device=device).expand(B, T)
        logits = self(input_ids, positions, caches=caches, start_pos=0,
                      key_mask=None if key_mask is None else key_mask[:, :T], last_only=True)[:, -1]
        next_pos = positions[:, -1:] + 1  # (B, 1)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        pad = 0 if pad is None else pad
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        step = self._decoder(B, total, caches, key_mask, cuda_graph and device.type == "cuda")
        for i in range(max_new_tokens):
            tokens = _sample(logits, temperature, top_k, top_p, generator)
            tokens = tokens.masked_fill(finished, pad)
            yield tokens
            if eos_token_id is not None:
                finished |= tokens == eos_token_id
                if bool(finished.all()):
                    return
            if i + 1 < max_new_tokens:
                logits = step(tokens[:, None], next_pos, T + i)
                next_pos = next_pos + 1

    def _decoder(self, batch: int, total: int, caches: list[KVCache], key_mask: Tensor | None,
                 graph: bool):
        """A function ``(tokens (B, 1), positions (B, 1), start_pos) -> logits (B, V)`` for one
        decode step: eager, or replaying a CUDA graph of the step over the static cache."""
        if not graph:
            def eager(tokens, positions, start_pos):
                keys = None if key_mask is None else key_mask[:, :start_pos + 1]
                return self(tokens, positions, caches=caches, start_pos=start_pos,
                            key_mask=keys)[:, -1]
            return eager
        return _GraphedDecode(self, batch, total, caches, key_mask)

    def _check_generate(self, input_ids, max_new_tokens, temperature, top_k, top_p,
                        attention_mask) -> tuple[int, int]:
        c = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("generate: input_ids must be a (batch, tokens) tensor of token ids, "
                             f"got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"generate: input_ids must be int64 token ids, got {input_ids.dtype}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"generate: the prompt is empty (input_ids of shape {(B, T)})")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"generate: token ids must lie in [0, {c.vocab_size}), got "
                             f"[{lo}, {hi}]")
        if type(max_new_tokens) is not int or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be a non-negative int, got "
                             f"{max_new_tokens!r}")
        limit = min(c.block_size, c.sliding_window or c.block_size)
        if T + max_new_tokens > limit:
            raise ValueError(f"generate: {T} prompt tokens + max_new_tokens={max_new_tokens} "
                             f"exceed the model's context of {limit} positions")
        if not temperature >= 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise ValueError(f"generate: top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p!r}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"generate: attention_mask must have input_ids' shape {(B, T)}, got "
                             f"{tuple(attention_mask.shape)}")
        return B, T

    # -- from transformers -----------------------------------------------------------------

    @classmethod
    def from_hf(cls, model: nn.Module) -> GPT:
        """A GPT sharing the weights of a transformers ``GPT2LMHeadModel`` or a Llama-layout
        causal LM (``LlamaForCausalLM``, Mistral, Qwen2, SmolLM): the parameters are the same
        tensors (GPT-2's fused ``c_attn`` and ``Conv1D`` weights as views), so no second copy is
        made and training one trains the other."""
        from .hf import from_hf

        return from_hf(cls, model)


def _plain_norm(x: Tensor, norm: nn.Module) -> Tensor:
    if isinstance(norm, LayerNorm):
        return LF.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return LF.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps,
                       cast_before_weight=norm.cast_before_weight)


def _attention_mask(B: int, S: int, start_pos: int | Tensor, key_mask: Tensor | None,
                    cached: bool, device: torch.device) -> tuple[Tensor | None, bool]:
    """The SDPA mask (B, 1, S, keys) and causal flag for S queries at ``start_pos``.

    Without padding: a fresh prefix is causal (``is_causal``), one new token over a cache needs no
    mask, and a chunk over a cache is causal aligned to the last key (``chunk_causal_mask``:
    PyTorch's lower-right bias, a kernel flag without a mask tensor, outside torch.compile). With
    ``key_mask`` (B, keys: real positions) the padding is folded into a boolean mask."""
    if isinstance(start_pos, Tensor):  # graphed decode: key_mask covers the whole static cache
        return key_mask[:, None, None, :], False
    if key_mask is None:
        if start_pos == 0 or not cached:
            return None, S > 1
        if S == 1:
            return None, False
        return chunk_causal_mask(S, start_pos + S, device), False  # a kernel flag, no tensor
    keys = start_pos + S if cached else S
    q_pos = torch.arange(start_pos, start_pos + S, device=device)[:, None]
    causal = torch.arange(keys, device=device)[None, :] <= q_pos  # (S, keys)
    if key_mask is None:
        return causal, False
    return causal & key_mask[:, None, None, :keys], False


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> Tensor:
    """(B,) tokens from (B, V) logits."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _GraphedDecode:
    """One decode step captured in a CUDA graph: static token/position/step inputs, the static
    cache, attention over every cache position with a mask of the written ones. Replaying costs
    one graph launch instead of the step's dozens of kernel launches (batch 1 decode is launch
    bound)."""

    def __init__(self, model: GPT, batch: int, total: int, caches: list[KVCache],
                 key_mask: Tensor | None) -> None:
        device = caches[0].k.device
        self.model, self.caches = model, caches
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.real = (key_mask.clone() if key_mask is not None
                     else torch.ones(batch, total, dtype=torch.bool, device=device))
        self.slots = torch.arange(total, device=device)
        self.graph = None

    def _run(self) -> Tensor:
        written = self.real & (self.slots <= self.step)[None, :]
        return self.model(self.tokens, self.positions, caches=self.caches, start_pos=self.step,
                          key_mask=written)[:, -1]

    def __call__(self, tokens: Tensor, positions: Tensor, start_pos: int) -> Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.step.fill_(start_pos)
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (autotuning, allocations) off the graph
                self._run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._run()
        self.graph.replay()
        return self.logits

