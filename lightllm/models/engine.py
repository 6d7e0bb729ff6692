"""Continuous batching: many prompts through one model over a paged KV cache, without padding.

    engine = Engine(model, max_batch_tokens=512, num_pages=1024, page_size=16)
    answers = engine.generate(prompts, max_new_tokens=[32, 64, ...], eos_token_id=eos)
    for index, token in engine.stream(prompts, max_new_tokens=32):
        ...  # prompt ``index``'s next token, as soon as it is sampled

Each step packs up to ``max_batch_tokens`` tokens of many sequences into one (1, N) batch: the
next token of every sequence that is decoding, then chunks of the prompts being prefilled (those
admitted earlier first, then new ones from the queue). The embeddings, norms, projections and
feed-forwards run once on all N tokens; per layer the attention is grouped by
``CausalSelfAttention.forward_ragged`` (the decode tokens in one ``flash_attn_with_kvcache`` call
over their block table, prompts from position 0 in one ``flash_attn_varlen_func`` call, a chunk
continuing a cached prompt in its own ``flash_attn_with_kvcache`` call). A sequence that finishes
(its EOS or its ``max_new_tokens``) frees its pages at once, and the next waiting prompt takes its
place in the next step.

Admission is first come, first served, by pages: a prompt is admitted when the pool's free pages
hold its longest possible sequence (prompt + ``max_new_tokens`` - 1 tokens), and it takes them
at once, consecutive where the pool has them (the native CPU path then reads a sequence's keys in
place instead of gathering its pages). A running sequence can therefore never run short, so
nothing is preempted or dropped; one that stops early at its EOS returns its pages then. A request
that could never fit (the pool, or the model's context) is a ``ValueError`` before anything runs;
one that must wait waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..nn.attention import RaggedBatch
from .generation import sample

_ENGINE = "lightllm.models.Engine"


class _Seq:
    """One request: its prompt, the tokens generated so far, and its place in the cache."""

    __slots__ = ("index", "prompt", "max_new", "out", "cached", "slot", "pages", "need")

    def __init__(self, index: int, prompt: list[int], max_new: int, need: int) -> None:
        self.index, self.prompt, self.max_new, self.need = index, prompt, max_new, need
        self.out: list[int] = []
        self.cached = 0  # tokens whose keys/values are in the cache
        self.slot = -1  # row of the engine's block table
        self.pages = 0  # pages held


class Engine:
    """Continuous batching over a model with ``GPT.forward_ragged`` (module docstring).

    ``model``: a :class:`lightllm.models.GPT` (in eval mode; its dtype and device are the
    cache's). ``max_batch_tokens``: the most tokens one step runs (decode tokens + prefill
    chunks); ``num_pages`` / ``page_size``: the pool of the :class:`lightllm.nn.PagedKVCache`
    (default: pages for 16384 tokens); ``max_seqs``: the most sequences running at once (default
    ``min(256, max_batch_tokens)``); ``prefill_chunk``: the most prompt tokens of one sequence in
    a step (default ``max_batch_tokens``). The engine keeps its cache between calls; one call runs
    at a time.
    """

    def __init__(self, model, max_batch_tokens: int = 512, num_pages: int | None = None,
                 page_size: int = 16, *, max_seqs: int | None = None,
                 prefill_chunk: int | None = None) -> None:
        for name, value in (("max_batch_tokens", max_batch_tokens), ("page_size", page_size),
                            ("num_pages", num_pages), ("max_seqs", max_seqs),
                            ("prefill_chunk", prefill_chunk)):
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"{_ENGINE}: {name} must be a positive int, got {value!r}")
        self.model = model
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = min(max_seqs or 256, max_batch_tokens)
        self.prefill_chunk = prefill_chunk or max_batch_tokens
        num_pages = num_pages or -(-16384 // page_size)
        self.cache = model.make_paged_cache(num_pages, page_size)
        self.page_size = page_size
        self.device = self.cache.k.device
        # The pages of each running sequence by its slot, on the host (rows are updated when a
        # sequence takes a page; a step's tables are row gathers of it).
        self._width = self.cache.pages_for(model.context_length)
        self._table = torch.zeros(self.max_seqs, self._width, dtype=torch.int32)

    @property
    def num_pages(self) -> int:
        return self.cache.num_pages

    # -- the public API ---------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 128,
                 *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """The new tokens of each prompt, in the prompts' order.

        ``prompts``: token ids, one list per request. ``max_new_tokens``: one int for all, or one
        per prompt. A sequence stops after its ``eos_token_id`` (included in its answer) or its
        ``max_new_tokens``. Greedy when ``temperature`` is 0, else sampled from
        softmax(logits / temperature) within ``top_k`` / ``top_p`` (``generator``: the random
        stream). Raises ``ValueError`` for a request that could never run."""
        out: list[list[int]] = [[] for _ in prompts]
        for index, token in self.stream(prompts, max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                        generator=generator):
            out[index].append(token)
        return out

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 128,
               *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, eos_token_id: int | None = None,
               generator: torch.Generator | None = None) -> Iterator[tuple[int, int]]:
        """Yields ``(prompt_index, token)`` as each token is sampled (the arguments of
        :meth:`generate`): a step's tokens together, each prompt's tokens in order. The requests
        are checked before the first step; closing the iterator early frees their pages."""
        for step in self.steps(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, eos_token_id=eos_token_id, generator=generator):
            yield from step

    def steps(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 128,
              *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
              eos_token_id: int | None = None, generator: torch.Generator | None = None
              ) -> Iterator[list[tuple[int, int]]]:
        """Yields each step's ``[(prompt_index, token), ...]`` (see :meth:`stream`)."""
        seqs = self._requests(prompts, max_new_tokens, temperature, top_k, top_p)
        return self._run(seqs, temperature, top_k, top_p, eos_token_id, generator)

    # -- checks -----------------------------------------------------------------------------

    def _requests(self, prompts, max_new_tokens, temperature, top_k, top_p) -> list[_Seq]:
        if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence):
            raise TypeError(f"{_ENGINE}: prompts must be a list of lists of token ids, got "
                            f"{type(prompts).__name__}")
        n = len(prompts)
        if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
            limits = [max_new_tokens] * n
        else:
            limits = list(max_new_tokens)
            if len(limits) != n:
                raise ValueError(f"{_ENGINE}: max_new_tokens has {len(limits)} entries for {n} "
                                 "prompts")
        if not temperature >= 0:
            raise ValueError(f"{_ENGINE}: temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise ValueError(f"{_ENGINE}: top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"{_ENGINE}: top_p must lie in (0, 1], got {top_p!r}")
        vocab, context = self.model.vocab_size, self.model.context_length
        seqs = []
        for i, (prompt, limit) in enumerate(zip(prompts, limits)):
            if type(limit) is not int or limit < 0:
                raise ValueError(f"{_ENGINE}: max_new_tokens of prompt {i} must be a "
                                 f"non-negative int, got {limit!r}")
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise ValueError(f"{_ENGINE}: prompt {i} is empty")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"{_ENGINE}: token ids of prompt {i} must lie in [0, {vocab}), "
                                 f"got [{min(prompt)}, {max(prompt)}]")
            if len(prompt) + limit > context:
                raise ValueError(f"{_ENGINE}: prompt {i}: {len(prompt)} tokens + max_new_tokens="
                                 f"{limit} exceed the model's context of {context} positions")
            # The last new token is never fed back: the cache holds at most this many tokens.
            need = self.cache.pages_for(len(prompt) + max(limit, 1) - 1)
            if need > self.num_pages:
                raise ValueError(f"{_ENGINE}: prompt {i}: {len(prompt)} tokens + max_new_tokens="
                                 f"{limit} need {need} pages of {self.page_size} tokens, the pool "
                                 f"has {self.num_pages}")
            seqs.append(_Seq(i, prompt, limit, need))
        return seqs

    # -- the loop ---------------------------------------------------------------------------

    @torch.no_grad()
    def _run(self, seqs, temperature, top_k, top_p, eos, generator):
        waiting = deque(s for s in seqs if s.max_new > 0)
        running: list[_Seq] = []
        free_slots = list(range(self.max_seqs - 1, -1, -1))
        cache, table = self.cache, self._table
        try:
            while waiting or running:
                # Admit from the head of the queue while the pages of its longest sequence are
                # free; it takes them at once (consecutive where the pool has them).
                while waiting and free_slots and waiting[0].need <= cache.num_free_pages:
                    s = waiting.popleft()
                    s.slot = free_slots.pop()
                    cache.reserve(s.index, s.need * self.page_size)
                    pages = cache.pages(s.index)
                    table[s.slot, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
                    s.pages = len(pages)
                    running.append(s)
                plan = self._plan(running)
                logits = self.model.forward_ragged(*plan)
                tokens = (sample(logits, temperature, top_k, top_p, generator).tolist()
                          if plan.emit else [])
                for s, n in zip(running, plan.counts):
                    s.cached += n
                produced, done = [], set()
                for i, token in zip(plan.emit, tokens):
                    s = running[i]
                    s.out.append(token)
                    produced.append((s.index, token))
                    if token == eos or len(s.out) >= s.max_new:
                        cache.free(s.index)
                        free_slots.append(s.slot)
                        done.add(i)
                if done:
                    running = [s for i, s in enumerate(running) if i not in done]
                yield produced
        finally:
            for s in running:
                self.cache.free(s.index)

    def _plan(self, running: list[_Seq]) -> _Plan:
        """The step's tokens: every decoding sequence's next token, then prompt chunks within
        ``max_batch_tokens`` (fresh prompts, which start at position 0, before continuing ones)."""
        ps = self.page_size
        counts = [0] * len(running)
        decode, fresh, cont = [], [], []
        budget = self.max_batch_tokens
        for i, s in enumerate(running):
            if s.cached >= len(s.prompt):
                decode.append(i)
                counts[i] = 1
        budget -= len(decode)
        for i, s in enumerate(running):
            if budget <= 0:
                break
            left = len(s.prompt) - s.cached
            if left > 0:
                n = min(left, budget, self.prefill_chunk)
                counts[i] = n
                budget -= n
                (fresh if s.cached == 0 else cont).append(i)
        table = self._table
        ids: list[int] = []
        pos: list[int] = []
        rows: list[int] = []
        for i in decode:
            s = running[i]
            ids.append(s.out[-1])
            pos.append(s.cached)
            rows.append(s.slot)
        logits_at = list(range(len(decode)))
        emit = list(decode)  # the running index of each row of logits_at
        cu = [0]
        longest = 0
        chunks = []
        for group in (fresh, cont):
            for i in group:
                s, n = running[i], counts[i]
                start = len(ids)
                ids.extend(s.prompt[s.cached:s.cached + n])
                pos.extend(range(s.cached, s.cached + n))
                rows.extend([s.slot] * n)
                if s.cached + n == len(s.prompt):
                    logits_at.append(start + n - 1)
                    emit.append(i)
                if group is fresh:
                    cu.append(cu[-1] + n)
                    longest = max(longest, n)
                else:
                    chunks.append((start, start + n, s, n))
        positions = torch.tensor(pos)
        slot_rows = torch.tensor(rows)
        slots = table[slot_rows, positions // ps].long() * ps + positions % ps
        dev = self.device
        batch = RaggedBatch(slots=slots.to(dev))
        if decode:
            d = len(decode)
            width = max(running[i].pages for i in decode)
            batch.n_decode = d
            batch.decode_seqlens = (positions[:d] + 1).to(dev, torch.int32)
            batch.decode_table = table[slot_rows[:d], :width].to(dev)
        if fresh:
            start = len(decode)
            batch.fresh = (start, start + cu[-1], torch.tensor(cu, dtype=torch.int32, device=dev),
                           longest)
        batch.chunks = tuple(
            (start, end, torch.tensor([s.cached + n], dtype=torch.int32, device=dev),
             table[s.slot:s.slot + 1, :s.pages].to(dev))
            for start, end, s, n in chunks)
        return _Plan(torch.tensor([ids], device=dev), positions[None].to(dev), self.cache, batch,
                     torch.tensor(logits_at, dtype=torch.long, device=dev), counts, emit)


class _Plan(tuple):
    """``GPT.forward_ragged``'s arguments for one step, plus each running sequence's token count
    (``counts``) and the running sequence of each row of logits (``emit``)."""

    def __new__(cls, ids, positions, cache, batch, logits_at, counts, emit):
        plan = super().__new__(cls, (ids, positions, cache, batch, logits_at))
        plan.counts, plan.emit = counts, emit
        return plan
