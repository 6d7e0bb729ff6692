"""End to end: one transformer block, forward (inference, no grad) and a training step (zero_grad,
forward, a random-projection loss, backward through every parameter).

Cases:

* ``block`` — lightllm's decoder (``lightllm.models.GPT``, one layer, a 256-token vocabulary so the
  embedding and output head are negligible) in the GPT-2 layout (LayerNorm, GeLU-tanh feed-forward,
  learned positions) and the Llama layout (RMSNorm, SwiGLU, rotary, grouped-query attention):
  ``lightllm`` beside ``eager`` (the same model with every lightllm op replaced by its eager
  reference, ``lightllm.testing.reference_backend``) and ``compile`` (torch.compile of that).
* ``transformer_encoder`` — ``torch.nn.TransformerEncoder`` (``torch``; its inference fast path in
  the forward) against the same model after ``lightllm.patch`` (``lightllm``).

GPU: GPT-2-medium widths (d_model 1024, 16 heads, d_ff 4096) and Llama-3.2-1B widths (d_model
2048, 32 / 8 heads, d_ff 8192), sequence 2048, bfloat16. CPU: d_model 256, 4 heads (2 key-value
heads for the Llama layout), d_ff 1024, batch 4 x 128 tokens, float32, the native CPU path.
FLOPs count the matmuls (2 per multiply-add, attention halved by causality); a step is 3x the
forward.

    python -m benchmarks --ops transformer [--quick]
"""

from __future__ import annotations

import copy

import torch

import lightllm
from benchmarks.harness import DEVICE, HAS_CUDA, Case, compiled
from lightllm.models import GPT, GPTConfig
from lightllm.testing import reference_backend

OPS = ("block", "transformer_encoder")  # the op names of its cases

VOCAB = 256


def _train_step(forward, model):
    def call(*inputs):
        model.zero_grad(set_to_none=True)
        y = forward(*inputs)
        (y * torch.randn_like(y)).sum().backward()

    return call


def _block_flops(tokens: int, batch: int, seq: int, d: int, heads: int, kv_heads: int, d_ff: int,
                 gated: bool) -> float:
    head_dim = d // heads
    projections = d * d * 2 + 2 * d * kv_heads * head_dim  # q, o and k, v
    ffn = (3 if gated else 2) * d * d_ff
    attention = 4 * batch * heads * seq * seq * head_dim * 0.5  # causal
    return 2 * tokens * (projections + ffn) + attention


def _block_case(layout: str, d: int, heads: int, kv_heads: int, d_ff: int, batch: int, seq: int,
                dtype: torch.dtype) -> Case:
    preset = GPTConfig.gpt2 if layout == "GPT-2" else GPTConfig.llama
    config = preset(vocab_size=VOCAB, n_layer=1, n_embd=d, n_head=heads, n_kv_head=kv_heads,
                    intermediate_size=d_ff, block_size=max(seq, 1024))
    torch.manual_seed(0)
    model = GPT(config).to(DEVICE, dtype)

    def ours(ids):
        return model(ids)

    def eager(ids):
        with reference_backend(model):
            return model(ids)

    def make(device):
        return (torch.randint(0, VOCAB, (batch, seq), device=device),)

    fwd = _block_flops(batch * seq, batch, seq, d, heads, kv_heads, d_ff, layout == "Llama")
    providers = {"lightllm": ours, "eager": eager, "compile": compiled(eager)}
    step_providers = {name: _train_step(fn, model) for name, fn in providers.items()}
    label = f"{layout} block d{d} h{heads}/{kv_heads} ff{d_ff} B{batch} N{seq} {str(dtype)[6:]}"
    params = {"layout": layout, "d_model": d, "heads": heads, "kv_heads": kv_heads, "d_ff": d_ff,
              "B": batch, "N": seq}
    common = dict(op="block", label=label, params=params, make_inputs=make, grad_inputs=(),
                  dtype=dtype, series=layout)
    return [Case(**common, providers=providers, modes=("fwd",), flops={"fwd": fwd}),
            Case(**common, providers=step_providers, modes=("step",), flops={"step": 3 * fwd})]


def _encoder_case(d: int, heads: int, layers: int, batch: int, seq: int, dtype,
                  norm_first: bool) -> list[Case]:
    layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                             norm_first=norm_first, activation="gelu")
    torch_model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    torch_model = torch_model.to(DEVICE, dtype)
    ours = copy.deepcopy(torch_model)
    lightllm.patch(ours)
    # Inference copies in eval mode (PyTorch's fast path applies there), training copies in train
    # mode; the same weights.
    torch_eval, ours_eval = copy.deepcopy(torch_model).eval(), copy.deepcopy(ours).eval()

    def make(device):
        return (torch.randn(batch, seq, d, device=device, dtype=dtype),)

    tokens = batch * seq
    fwd = layers * (2 * tokens * 12 * d * d + 4 * batch * heads * seq * seq * (d // heads))
    label = (f"{layers}x(d{d} h{heads}) B{batch} N{seq} {'pre' if norm_first else 'post'}-norm "
             f"{str(dtype)[6:]}")
    params = {"d_model": d, "heads": heads, "layers": layers, "B": batch, "N": seq,
              "norm_first": norm_first}
    common = dict(op="transformer_encoder", label=label, params=params, make_inputs=make,
                  grad_inputs=(), dtype=dtype, series="pre-norm" if norm_first else "post-norm")
    return [
        Case(**common, providers={"torch": torch_eval, "lightllm": ours_eval}, modes=("fwd",),
             flops={"fwd": fwd}),
        Case(**common, providers={"torch": _train_step(torch_model, torch_model),
                                  "lightllm": _train_step(ours, ours)},
             modes=("step",), flops={"step": 3 * fwd}),
    ]


def build_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:
        dtype, batch, seq = torch.float32, 4, 128
        blocks = [("GPT-2", 256, 4, 4, 1024), ("Llama", 256, 4, 2, 1024)]
        encoders = [(256, 4, 2, 8, 128, nf) for nf in (False, True)]
    else:
        dtype, batch, seq = torch.bfloat16, 1 if quick else 4, 2048
        blocks = [("GPT-2", 1024, 16, 16, 4096), ("Llama", 2048, 32, 8, 8192)]
        encoders = [(1024, 16, 2 if quick else 4, 4, 2048, nf) for nf in (False, True)]
    cases = []
    for layout, d, heads, kv_heads, d_ff in blocks:
        cases += _block_case(layout, d, heads, kv_heads, d_ff, batch, seq, dtype)
    for d, heads, layers, b, s, norm_first in encoders:
        cases += _encoder_case(d, heads, layers, b, s, dtype, norm_first)
    return cases
