"""Generation: decode tokens/s and prefill tokens/s of lightllm's GPT against transformers'
``generate`` on the same weights.

Providers: ``lightllm`` (``GPT.from_hf(model).generate``; the decode step is a CUDA-graph replay on
a GPU), ``torch`` (transformers' eager ``generate``, SDPA attention, dynamic cache), ``compile``
(transformers with its static cache and ``torch.compile``; GPU only) and ``eager`` (lightllm's GPT
with every op replaced by its eager reference). Weights are random (speed does not depend on
them), laid out as SmolLM2-135M and GPT-2-medium (GPU) / GPT-2 small (CPU).

A decode step's time is the difference between generating ``n + k`` and ``n`` tokens, divided by
``k`` (prefill and set-up cancel); tokens/s counts every sequence of the batch. Its memory
roofline (``pct_roofline``, printed beside tokens/s) is the step's unavoidable traffic — every
weight matrix read once (the input embedding's few rows aside; a tied head counts once) and the
KV cache of the batch read once at the step's context — at the copy bandwidth measured in the
same run: ``decode_bytes`` / bandwidth over the measured step time. Prefill is one forward over
the prompt. GPU: context 2048, batch 1 and 16, bfloat16. CPU: context 128, batch 1
and 4, float32 (the native CPU path).

    python -m benchmarks --ops generate [--quick]
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.harness import DEVICE, HAS_CUDA, measure_ceilings
from lightllm.models import GPT
from lightllm.testing import reference_backend

OPS = ("generate",)  # the op names of its cases


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _seconds(gen, ids, tokens: int, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``gen(ids, tokens)`` after a warm-up call."""
    gen(ids, tokens)  # warm-up: graphs, autotuning, compilation
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        gen(ids, tokens)
        _sync()
        times.append(time.perf_counter() - start)
    return times


def _quantiles_ms(seconds: list[float]) -> dict[str, float]:
    q = statistics.quantiles(seconds, n=10, method="inclusive")
    return {"median_ms": statistics.median(seconds) * 1e3, "p20_ms": q[1] * 1e3,
            "p80_ms": q[7] * 1e3}


def _models(quick: bool, dtype):
    import transformers

    llama = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                     num_hidden_layers=30, num_attention_heads=9,
                                     num_key_value_heads=3, max_position_embeddings=8192,
                                     tie_word_embeddings=True)
    if HAS_CUDA:
        gpt2 = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=4096)
        name = "GPT-2-medium"
    else:
        gpt2 = transformers.GPT2Config(n_positions=1024)
        name = "GPT-2"
    out = [("SmolLM2-135M", transformers.LlamaForCausalLM, llama)]
    if not quick:
        out.append((name, transformers.GPT2LMHeadModel, gpt2))
    for label, cls, config in out:
        torch.manual_seed(0)
        yield label, cls(config).to(DEVICE, dtype).eval()


def decode_bytes(hf, batch: int, context: int) -> int:
    """Bytes one decode step of ``batch`` sequences at ``context`` positions must read: every
    parameter once (a matrix the step only gathers rows from — the input embedding when it is
    not also the output head, learned positions — is left out) and each layer's K and V cache."""
    config = hf.config
    gathered = {id(hf.get_input_embeddings().weight)}
    head = hf.get_output_embeddings()
    if head is not None and head.weight is hf.get_input_embeddings().weight:
        gathered.clear()  # tied: the head reads the whole matrix
    for name, p in hf.named_parameters():
        if name.endswith("wpe.weight"):
            gathered.add(id(p))
    weights = sum(p.numel() * p.element_size() for p in hf.parameters()
                  if id(p) not in gathered)
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    item = next(hf.parameters()).element_size()
    return weights + 2 * layers * batch * heads * head_dim * context * item


def _providers(hf, ours):
    def lightllm_gen(ids, n):
        return ours.generate(ids, n)

    def eager_gen(ids, n):
        with reference_backend(ours):
            return ours.generate(ids, n, cuda_graph=False)

    def torch_gen(ids, n):
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

    providers = {"lightllm": lightllm_gen, "torch": torch_gen, "eager": eager_gen}
    if HAS_CUDA:
        compiled = {}

        def compile_gen(ids, n):
            if "model" not in compiled:
                hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
                compiled["model"] = True
            return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0, cache_implementation="static")

        providers["compile"] = compile_gen
    return providers


def measure(quick: bool, only=()) -> list[dict]:
    """Decode and prefill rows of every model and provider (``only``: a provider subset)."""
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    context = 2048 if HAS_CUDA else 128
    batches = (1, 16) if HAS_CUDA else (1, 4)
    n, k = (8, 32) if HAS_CUDA else (2, 8)
    repeats = 3 if HAS_CUDA else 2
    bandwidth = measure_ceilings()["copy_bytes_per_s"]
    rows = []
    with torch.no_grad():
        for label, hf in _models(quick, dtype):
            ours = GPT.from_hf(hf)
            for provider, gen in _providers(hf, ours).items():
                if only and provider not in only:
                    continue
                for batch in batches:
                    ids = torch.randint(0, hf.config.vocab_size, (batch, context - n - k),
                                        device=DEVICE)
                    case = f"{label} B{batch} ctx{context} {str(dtype)[6:]}"
                    base = dict(op="generate", case=case, dtype=str(dtype)[6:], provider=provider,
                                device=DEVICE, model=label, B=batch, context=context,
                                series=label, x="B")
                    try:
                        short = _seconds(gen, ids, n, repeats)
                        long = _seconds(gen, ids, n + k, repeats)
                        steps = [(b - a) / k for a, b in zip(short, long)]  # per decode step
                        decode = _quantiles_ms(steps)
                        floor_ms = decode_bytes(hf, batch, context) / bandwidth * 1e3
                        rows.append({**base, "mode": "decode", "status": "ok", **decode,
                                     "tokens/s": batch / (decode["median_ms"] * 1e-3),
                                     "roofline_ms": floor_ms,
                                     "pct_roofline": 100 * floor_ms / decode["median_ms"]})
                        prefill = _quantiles_ms(_seconds(gen, ids, 1, repeats))
                        rows.append({**base, "mode": "prefill", "status": "ok", **prefill,
                                     "tokens/s": batch * ids.shape[1] / (prefill["median_ms"] * 1e-3)})
                    except Exception as e:  # reported, not fatal: one provider may not run here
                        rows.append({**base, "mode": "decode", "status": "error", "median_ms": None,
                                     "p20_ms": None, "p80_ms": None,
                                     "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            del ours, hf
            if HAS_CUDA:
                torch.cuda.empty_cache()
    return rows
