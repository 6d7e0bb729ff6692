"""Serving many prompts: output tokens/s of lightllm's continuous-batching ``Engine`` against
padded static batches, on a mixed workload.

The workload (fixed seed): 64 prompts of 16-512 tokens with ``max_new_tokens`` of 16-128 each
(``--quick``: 16 prompts of 16-128 tokens, 8-32 new tokens), no EOS, so every prompt makes exactly
its own number of tokens. Providers:

- ``lightllm`` (the "engine" rows): ``lightllm.models.Engine`` on all 64 at once (continuous
  batching over a paged KV cache, chunked prefill mixed with decode steps).
- ``torch``: transformers' ``generate`` in left-padded batches of 16 (in prompt order); a batch
  runs to its largest ``max_new_tokens``, but only each prompt's own count is output.
- ``padded``: ``GPT.generate`` in the same batches of 16 with their ``attention_mask`` (it packs
  the real tokens and decodes over a paged cache, but a batch still waits for its longest member).

Weights are random with SmolLM2-135M's layout (speed does not depend on them); float32 on CPU
(the native CPU path), bfloat16 on a GPU. Each provider runs once after a small warm-up (every
provider makes the same tokens, so time ratios are throughput ratios: the lightllm row's
``x_vs_best``, and the printed ratios against ``torch``).

    python -m benchmarks --ops engine [--quick]
    python -m benchmarks.bench_engine [--quick] [--providers lightllm,torch,padded]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.harness import DEVICE, HAS_CUDA
from lightllm.models import GPT, Engine

OPS = ("engine",)
BATCH = 16  # the padded providers' batch size
PAGE_SIZE = 16


def workload(quick: bool, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(prompts, max_new_tokens) of the mixed workload."""
    rng = random.Random(seed)
    n, (lo, hi), (new_lo, new_hi) = (16, (16, 128), (8, 32)) if quick else (64, (16, 512),
                                                                              (16, 128))
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    limits = [rng.randint(new_lo, new_hi) for _ in range(n)]
    prompts = [[rng.randrange(3, vocab) for _ in range(length)] for length in lengths]
    return prompts, limits


def _model(dtype):
    import transformers

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9,
                                      num_key_value_heads=3, max_position_embeddings=8192,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).to(DEVICE, dtype).eval()
    hf.generation_config.eos_token_id = None  # every prompt makes its own max_new_tokens
    return hf


def _padded_batches(prompts, limits):
    """Left-padded (ids, mask, largest limit, own limits) batches of BATCH prompts, in order."""
    for at in range(0, len(prompts), BATCH):
        group, own = prompts[at:at + BATCH], limits[at:at + BATCH]
        width = max(map(len, group))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, p in enumerate(group):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        yield ids.to(DEVICE), mask.to(DEVICE), max(own), own


def providers(hf, ours, max_batch_tokens: int):
    def engine(prompts, limits):
        pages = sum(-(-(len(p) + n) // PAGE_SIZE) for p, n in zip(prompts, limits))
        runner = Engine(ours, max_batch_tokens=max_batch_tokens, num_pages=pages,
                        page_size=PAGE_SIZE)
        return sum(map(len, runner.generate(prompts, limits)))

    def torch_batches(prompts, limits):
        made = 0
        for ids, mask, most, own in _padded_batches(prompts, limits):
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=most, min_new_tokens=most,
                              do_sample=False, pad_token_id=0)
            assert out.shape[1] == ids.shape[1] + most
            made += sum(own)
        return made

    def padded(prompts, limits):
        made = 0
        for ids, mask, most, own in _padded_batches(prompts, limits):
            out = ours.generate(ids, most, attention_mask=mask)
            assert out.shape[1] == ids.shape[1] + most
            made += sum(own)
        return made

    return {"lightllm": engine, "torch": torch_batches, "padded": padded}


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def measure(quick: bool, only=(), max_batch_tokens: int | None = None) -> list[dict]:
    """One row per provider: output tokens/s on the workload."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    max_batch_tokens = max_batch_tokens or (2048 if HAS_CUDA else 512)
    hf = _model(dtype)
    ours = GPT.from_hf(hf)
    prompts, limits = workload(quick, hf.config.vocab_size)
    warm_prompts, warm_limits = [p[:16] for p in prompts[:4]], [2] * 4
    label = f"SmolLM2-135M {len(prompts)} prompts {str(dtype)[6:]}"
    rows = []
    with torch.no_grad():
        for provider, run in providers(hf, ours, max_batch_tokens).items():
            if only and provider not in only:
                continue
            base = dict(op="engine", case=label, mode="serve", dtype=str(dtype)[6:],
                        provider=provider, device=DEVICE, model="SmolLM2-135M",
                        prompts=len(prompts), prompt_tokens=sum(map(len, prompts)),
                        max_batch_tokens=max_batch_tokens, series="SmolLM2-135M", x="prompts")
            try:
                run(warm_prompts, warm_limits)  # warm-up: allocations, autotuning, graphs
                _sync()
                start = time.perf_counter()
                made = run(prompts, limits)
                _sync()
                seconds = time.perf_counter() - start
                rows.append({**base, "status": "ok", "median_ms": seconds * 1e3,
                             "p20_ms": seconds * 1e3, "p80_ms": seconds * 1e3,
                             "output_tokens": made, "tokens/s": made / seconds})
            except Exception as e:  # reported, not fatal: one provider may not run here
                rows.append({**base, "status": "error", "median_ms": None, "p20_ms": None,
                             "p80_ms": None,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"[engine] {provider}: " + (f"{rows[-1]['tokens/s']:.1f} output tokens/s in "
                                              f"{rows[-1]['median_ms'] / 1e3:.1f} s"
                                              if rows[-1]["status"] == "ok" else
                                              rows[-1]["error"]), flush=True)
    speed = {r["provider"]: r["tokens/s"] for r in rows if r["status"] == "ok"}
    if "torch" in speed:
        for name in ("lightllm", "padded"):
            if name in speed:
                print(f"[engine] {name} / torch padded batches: "
                      f"{speed[name] / speed['torch']:.2f}x", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--providers", default="", help="comma-separated: lightllm,torch,padded")
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    only = tuple(p for p in args.providers.split(",") if p)
    measure(args.quick, only, args.max_batch_tokens)


if __name__ == "__main__":
    main()
