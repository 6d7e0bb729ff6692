"""Generation over a static KV cache, for any decoder with lightllm GPT's forward signature.

The model needs ``model(input_ids, positions, caches=..., start_pos=..., key_mask=...,
last_only=...) -> logits`` (see ``GPT.forward``), ``make_caches(batch, length)`` (one
``lightllm.nn.KVCache`` per layer), ``vocab_size`` and ``context_length``. Generation is one
prefill of the prompt and one token per step. On a GPU the decode step is captured in a CUDA graph
over the static cache (as gpt-fast): a step then costs one graph replay instead of its dozens of
kernel launches. A left-padded batch comes with ``attention_mask``; a model with
``forward_ragged`` and ``make_paged_cache`` (lightllm's GPT) then prefills only the real tokens,
packed, and decodes over a paged cache (``lightllm.models.engine``), never attending to padding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..nn import KVCache


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None,
             attention_mask: Tensor | None = None, stream: Callable[[Tensor], None] | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool = True) -> Tensor:
    """Prompt + new tokens as one (B, T + n) tensor.

    Greedy when ``temperature`` is 0, else sampling from softmax(logits / temperature),
    restricted to the ``top_k`` most likely tokens and to the smallest set whose probability
    reaches ``top_p``. A batch of prompts of different lengths comes left-padded with
    ``attention_mask`` (B, T). Each sequence stops at ``eos_token_id``; the others go on and
    finished ones are filled with ``pad_token_id`` (default: the EOS id). Generation ends when all
    have finished or after ``max_new_tokens``. ``stream`` is called with each step's (B,) tokens;
    :func:`generate_iter` is the iterator form.
    """
    out = [input_ids]
    for tokens in generate_iter(
            model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id, attention_mask=attention_mask,
            generator=generator, cuda_graph=cuda_graph):
        if stream is not None:
            stream(tokens)
        out.append(tokens[:, None])
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_iter(model, input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None,
                  eos_token_id: int | None = None, pad_token_id: int | None = None,
                  attention_mask: Tensor | None = None, generator: torch.Generator | None = None,
                  cuda_graph: bool = True) -> Iterator[Tensor]:
    """Yields the (B,) new tokens of each step (see :func:`generate`)."""
    B, T = check_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                          attention_mask)
    if max_new_tokens == 0:
        return
    pad = eos_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else pad
    if (attention_mask is not None and hasattr(model, "forward_ragged")
            and not bool(attention_mask.all())):
        yield from _ragged_iter(model, input_ids, attention_mask, max_new_tokens, temperature,
                                top_k, top_p, eos_token_id, pad, generator)
        return
    device = input_ids.device
    total = T + max_new_tokens
    caches = model.make_caches(B, total)
    key_mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        key_mask = torch.ones(B, total, dtype=torch.bool, device=device)
        key_mask[:, :T] = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(T, device=device).expand(B, T)
    logits = model(input_ids, positions, caches=caches, start_pos=0,
                   key_mask=None if key_mask is None else key_mask[:, :T], last_only=True)[:, -1]
    next_pos = positions[:, -1:] + 1  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    step = decode_step(model, B, total, caches, key_mask, cuda_graph and device.type == "cuda")
    for i in range(max_new_tokens):
        tokens = sample(logits, temperature, top_k, top_p, generator)
        tokens = tokens.masked_fill(finished, pad)
        yield tokens
        if eos_token_id is not None:
            finished |= tokens == eos_token_id
            if bool(finished.all()):
                return
        if i + 1 < max_new_tokens:
            logits = step(tokens[:, None], next_pos, T + i)
            next_pos = next_pos + 1


def _ragged_iter(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                 eos_token_id, pad, generator) -> Iterator[Tensor]:
    """A padded batch without computing on its padding: the real tokens of every row are packed
    into one prefill step (variable-length attention) and decoded over a paged cache, by an
    :class:`~lightllm.models.engine.Engine` that runs every sequence from the first step."""
    from .engine import Engine

    real = attention_mask.bool()
    prompts = [row[keep].tolist() for row, keep in zip(input_ids, real)]
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: row {i} of attention_mask has no real token")
    page_size = 16
    pages = sum(-(-(len(p) + max_new_tokens) // page_size) for p in prompts)
    engine = Engine(model, max_batch_tokens=max(sum(map(len, prompts)), len(prompts)),
                    num_pages=pages, page_size=page_size, max_seqs=len(prompts))
    B, device = input_ids.shape[0], input_ids.device
    for step in engine.steps(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_token_id=eos_token_id, generator=generator):
        tokens = torch.full((B,), pad, dtype=input_ids.dtype, device=device)
        rows, new = zip(*step)
        tokens[torch.tensor(rows, device=device)] = torch.tensor(new, dtype=tokens.dtype,
                                                                 device=device)
        yield tokens


def decode_step(model, batch: int, total: int, caches: list[KVCache], key_mask: Tensor | None,
                graph: bool):
    """A function ``(tokens (B, 1), positions (B, 1), start_pos) -> logits (B, V)`` for one decode
    step: eager, or replaying a CUDA graph of the step over the static cache."""
    if not graph:
        def eager(tokens, positions, start_pos):
            keys = None if key_mask is None else key_mask[:, :start_pos + 1]
            return model(tokens, positions, caches=caches, start_pos=start_pos,
                         key_mask=keys)[:, -1]
        return eager
    return GraphedDecode(model, batch, total, caches, key_mask)


def check_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p,
                   attention_mask) -> tuple[int, int]:
    """(B, T) of a valid request; a clear ValueError / TypeError otherwise."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError("generate: input_ids must be a (batch, tokens) tensor of token ids, "
                         f"got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"generate: input_ids must be int64 token ids, got {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"generate: the prompt is empty (input_ids of shape {(B, T)})")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= model.vocab_size:
        raise ValueError(f"generate: token ids must lie in [0, {model.vocab_size}), got "
                         f"[{lo}, {hi}]")
    if type(max_new_tokens) is not int or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be a non-negative int, got "
                         f"{max_new_tokens!r}")
    if T + max_new_tokens > model.context_length:
        raise ValueError(f"generate: {T} prompt tokens + max_new_tokens={max_new_tokens} "
                         f"exceed the model's context of {model.context_length} positions")
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


def sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
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


class GraphedDecode:
    """One decode step captured in a CUDA graph: static token/position/step inputs, the static
    cache, attention over every cache position with a mask of the written ones. Replaying costs
    one graph launch instead of the step's dozens of kernel launches (batch 1 decode is launch
    bound)."""

    def __init__(self, model, batch: int, total: int, caches: list[KVCache],
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
