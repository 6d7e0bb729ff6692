"""lightllm.models.Engine: continuous batching over a paged cache. Greedy tokens equal per-prompt
transformers ``generate`` (SmolLM2 on the native CPU path, a tiny Llama in the kernels with the
lightllm attention ops counted), with small pages, a pool so small that requests wait, chunked
prefill, per-prompt limits, EOS, streaming, the order of results and bad requests."""

import pytest
import torch
from conftest import DEVICE, tiny_llama

from lightllm import _dispatch
from lightllm.models import GPT, Engine
from lightllm.testing import DispatchedOps

transformers = pytest.importorskip("transformers")

TEXT = (
    "The river rose slowly through the night, and by morning the low fields near the village "
    "were under a sheet of brown water. Farmers moved their animals to the hill behind the "
    "church, where the old stone wall kept the ground dry. Children carried buckets, baskets and "
    "chairs up the narrow path while their parents argued about whether the bridge would hold. "
    "The miller, who had seen three floods in his life, said the water would fall by the evening "
    "if the rain stopped in the mountains. Nobody believed him, but they listened anyway, because "
    "he was usually right about such things. At noon the sun came out for the first time in a "
    "week. The baker opened her shop and gave away bread to anyone who had lost their kitchen. "
    "A teacher organised the older students into teams that checked on every house along the "
    "river, writing down who needed blankets, medicine or a place to sleep. By the afternoon a "
    "truck arrived from the town with drinking water and a doctor. The doctor set up a table in "
    "the school hall and saw patients until late at night: mostly cuts, colds and a few sprained "
    "ankles from people who had slipped in the mud. When the water finally began to go down, it "
    "left behind a thick layer of silt, broken branches and, in one garden, a confused fish. "
    "Cleaning up took a month. The village council decided to raise the bank of the river and "
    "to plant willows along it, and the miller was asked to lead the work, which he did with "
    "great seriousness and a notebook full of measurements that nobody else could read."
)


def _hf_greedy(hf, prompt, n, eos=None):
    ids = torch.tensor([prompt], device=DEVICE)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                      do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


@pytest.mark.xdist_group("smollm2")
def test_smollm2_engine_equals_transformers_per_prompt(smollm2):
    """16 prompts of 1-300 tokens with mixed limits; pages of 8 tokens, a pool of 80 where all
    requests at once need 201 (prompts wait), prefill chunks of 128 tokens in steps of 160 (long
    prompts span steps). Native CPU path on a CPU machine, the kernels on a GPU."""
    tok, hf = smollm2
    hf = hf.to(DEVICE)
    model = GPT.from_hf(hf)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 300
    lengths = [1, 300, 7, 64, 2, 150, 33, 250, 5, 99, 180, 12, 3, 210, 45, 128]
    limits = [6, 3, 8, 5, 2, 7, 4, 6, 8, 1, 5, 3, 7, 2, 6, 4]
    prompts = [ids[(7 * i) % 40:][:n] for i, n in enumerate(lengths)]
    want = [_hf_greedy(hf, p, n, tok.eos_token_id) for p, n in zip(prompts, limits)]
    engine = Engine(model, max_batch_tokens=160, num_pages=80, page_size=8, prefill_chunk=128)
    route = _dispatch.native_cpu() if DEVICE == "cpu" else torch.no_grad()
    with route:
        got = engine.generate(prompts, limits, eos_token_id=tok.eos_token_id)
    assert got == want
    assert engine.cache.num_free_pages == 80  # every page came back


@pytest.fixture(scope="module")
def llama():
    hf = tiny_llama(max_position_embeddings=128)
    hf.generation_config.eos_token_id = None  # the engine stops at an EOS only when given one
    return hf, GPT.from_hf(hf)


def test_tiny_llama_kernels_equal_transformers_and_count_the_ops(llama):
    """In the Triton kernels (the interpreter on a CPU machine): a decode batch, a fresh prefill
    and a chunk continuing a cached prompt in the same steps; pages of 4 tokens."""
    hf, model = llama
    lengths, limits = [9, 1, 23, 5], [4, 6, 3, 5]
    prompts = [torch.randint(3, 193, (n,)).tolist() for n in lengths]
    want = [_hf_greedy(hf, p, n) for p, n in zip(prompts, limits)]
    engine = Engine(model, max_batch_tokens=16, num_pages=24, page_size=4, prefill_chunk=12)
    with DispatchedOps() as ops:
        got = engine.generate(prompts, limits)
    assert got == want
    layers = hf.config.num_hidden_layers
    assert ops.lightllm["varlen_fwd"] >= layers  # fresh prompts, packed
    assert ops.lightllm["attention_kvcache"] >= 2 * layers  # decode batches, continuing chunks
    assert ops.lightllm["sdpa_fwd"] == 0
    assert ops.lightllm["swiglu_feed_forward_fwd"] > 0


@_dispatch.native_cpu()  # scheduling is the engine's logic: the kernels' parity is checked above
def test_scheduling_small_pools_chunks_and_limits(llama):
    hf, model = llama
    lengths = [30, 1, 17, 44, 8, 2, 25, 11]
    limits = [5, 9, 0, 7, 3, 12, 1, 6]
    prompts = [torch.randint(3, 193, (n,)).tolist() for n in lengths]
    want = [_hf_greedy(hf, p, n) if n else [] for p, n in zip(prompts, limits)]
    # A roomy engine, one whose pool holds only the longest request (every prompt waits for the
    # one before it), and one with tiny steps (prefill in chunks of 5 beside the decodes).
    for kwargs in (dict(max_batch_tokens=256, num_pages=64, page_size=16),
                   dict(max_batch_tokens=64, num_pages=13, page_size=4),
                   dict(max_batch_tokens=8, num_pages=40, page_size=2, prefill_chunk=5)):
        engine = Engine(model, **kwargs)
        assert engine.generate(prompts, limits) == want, kwargs
        assert engine.cache.num_free_pages == kwargs["num_pages"]
    # The order of results is the prompts', whatever order they finish in.
    reordered = engine.generate(prompts[::-1], limits[::-1])
    assert reordered == want[::-1]


@_dispatch.native_cpu()
def test_continuous_batching_refills_a_finished_slot_the_next_step(llama):
    hf, model = llama
    prompts = [torch.randint(3, 193, (n,)).tolist() for n in (6, 4, 5, 3)]
    limits = [2, 6, 3, 4]
    engine = Engine(model, max_batch_tokens=32, num_pages=32, page_size=4, max_seqs=2)
    steps = [dict(step) for step in engine.steps(prompts, limits)]
    first = {i: next(t for t, s in enumerate(steps) if i in s) for i in range(4)}
    last = {i: max(t for t, s in enumerate(steps) if i in s) for i in range(4)}
    assert first[0] == first[1] == 0 and all(len(s) <= 2 for s in steps)
    assert first[2] == last[0] + 1  # prompt 0 finished: prompt 2 took its slot at once
    assert first[3] == min(last[1], last[2]) + 1
    assert [sum(i in s for s in steps) for i in range(4)] == limits


@_dispatch.native_cpu()
def test_streaming_eos_and_sampling(llama):
    hf, model = llama
    prompts = [torch.randint(3, 193, (n,)).tolist() for n in (5, 9, 3)]
    engine = Engine(model, max_batch_tokens=64, num_pages=16, page_size=8)
    free = engine.generate(prompts, 10)
    streamed = [[] for _ in prompts]
    order = []
    for index, token in engine.stream(prompts, 10):
        streamed[index].append(token)
        order.append(index)
    assert streamed == free
    assert order[:3] == [0, 1, 2] and order[3:6] == [0, 1, 2]  # one token of each per step
    eos = free[1][3]
    stop = free[1].index(eos)
    got = engine.generate(prompts, 10, eos_token_id=eos)
    assert got[1] == free[1][:stop + 1]  # stops after its EOS, which it keeps
    for i in (0, 2):
        assert got[i] == (free[i][:free[i].index(eos) + 1] if eos in free[i] else free[i])
    # Sampling: top_k=1 is greedy; a seeded generator repeats itself.
    assert engine.generate(prompts, 6, temperature=0.7, top_k=1) == [f[:6] for f in free]
    runs = [engine.generate(prompts, 6, temperature=1.0,
                            generator=torch.Generator(DEVICE).manual_seed(3)) for _ in range(2)]
    assert runs[0] == runs[1]
    # Closing a stream early gives its pages back.
    stream = engine.stream(prompts, 10)
    next(stream)
    stream.close()
    assert engine.cache.num_free_pages == 16


@pytest.mark.parametrize("call, error, match", [
    (lambda e: e.generate([[5] * 40], 10), ValueError, r"need 7 pages of 8 tokens, the pool has 6"),
    (lambda e: e.generate([[5, 6], [5] * 120], 10), ValueError,
     r"prompt 1: 120 tokens \+ max_new_tokens=10 exceed the model's context of 128"),
    (lambda e: e.generate([[5], []], 3), ValueError, "prompt 1 is empty"),
    (lambda e: e.generate([[5, 999]], 3), ValueError, r"must lie in \[0, 193\)"),
    (lambda e: e.generate([[5], [6]], [3]), ValueError, "1 entries for 2 prompts"),
    (lambda e: e.generate([[5]], -1), ValueError, "non-negative int"),
    (lambda e: e.generate([[5]], 3, top_p=0.0), ValueError, "top_p"),
    (lambda e: e.generate(torch.tensor([[5]]), 3), TypeError, "list of lists"),
])
def test_impossible_requests_are_clear_errors_before_any_step(llama, call, error, match):
    _, model = llama
    engine = Engine(model, max_batch_tokens=32, num_pages=6, page_size=8)
    with DispatchedOps() as ops, pytest.raises(error, match=match):
        call(engine)
    assert not ops.lightllm  # nothing ran
    assert engine.cache.num_free_pages == 6


def test_engine_arguments():
    model = GPT.from_hf(tiny_llama())
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive int"):
        Engine(model, max_batch_tokens=0)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        Engine(model, page_size=2.5)
