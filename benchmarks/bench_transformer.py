"""End to end: a ``torch.nn.TransformerEncoder`` training step, PyTorch's layers against the same
model switched onto lightllm with ``lightllm.patch`` (whole layers: attention, the fused Add & Norm
and the fused GeLU feed-forward).

One step is zero_grad, forward, a random-projection loss and backward (every parameter's gradient).
GPU: GPT-2-medium widths (d_model 1024, 16 heads, d_ff 4096), sequence 2048, bfloat16. CPU: a
small model (d_model 256, 4 heads, d_ff 1024, 2 layers, batch 8 x 128 tokens, float32), the native
CPU path.

    python -m benchmarks.bench_transformer [--quick] [--out DIR]
"""

from __future__ import annotations

import copy

import torch

import lightllm
from benchmarks.harness import HAS_CUDA, Case, main, pytest_benchmark


def _step(model):
    def call(x, r):
        model.zero_grad(set_to_none=True)
        (model(x) * r).sum().backward()

    return call


def _case(d: int, heads: int, layers: int, batch: int, seq: int, dtype, norm_first: bool) -> Case:
    device = "cuda" if HAS_CUDA else "cpu"
    layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                             norm_first=norm_first, activation="gelu")
    torch_model = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    torch_model = torch_model.to(device, dtype).train()
    ours = copy.deepcopy(torch_model)
    lightllm.patch(ours)

    def make(device):
        x = torch.randn(batch, seq, d, device=device, dtype=dtype)
        return x, torch.randn_like(x)

    # Matmul work of one step (forward 2·tokens·params-ish, backward twice that), for TFLOP/s.
    tokens = batch * seq
    fwd = layers * (2 * tokens * 12 * d * d + 4 * batch * heads * seq * seq * (d // heads))
    return Case(
        op="transformer_step", label=f"{layers}x(d{d} h{heads}) B{batch} N{seq} "
        f"{'pre' if norm_first else 'post'}-norm {str(dtype)[6:]}",
        params={"d_model": d, "heads": heads, "layers": layers, "B": batch, "N": seq},
        make_inputs=make, providers={"torch": _step(torch_model), "lightllm": _step(ours)},
        modes=("step",), flops={"step": 3 * fwd},
    )


def build_cases(quick: bool) -> list[Case]:
    if not HAS_CUDA:
        return [_case(256, 4, 2, 8, 128, torch.float32, nf) for nf in (False, True)]
    return [_case(1024, 16, 2 if quick else 4, 4, 2048, torch.bfloat16, nf)
            for nf in (False, True)]


def test_transformer_step_benchmark(benchmark):
    pytest_benchmark(benchmark, build_cases(quick=True)[0], "lightllm", "step")


if __name__ == "__main__":
    main("transformer", build_cases)
