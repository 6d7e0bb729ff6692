"""CUDA-graph capture (docs/design.md §3 host cost): every CUDA path runs inside ``torch.cuda.graph``
with no host synchronisation, ``.item()`` or per-call CPU tensor, and a replay equals eager.

All of these need an NVIDIA GPU (marked ``cuda``); on the CPU machine they are skipped.
"""

import pytest
import torch

import lightllm
import lightllm.functional as LF
import lightllm.nn as LN

pytestmark = pytest.mark.cuda


def _capture(fn, *static_inputs):
    """Warm up ``fn`` on a side stream (compilation and autotuning happen there), then capture one
    call; returns (graph, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_inputs)
    return graph, out


class DecodeBlock(torch.nn.Module):
    """One decoder step: attention over a KV cache, Add & Norm, feed-forward with the residual."""

    def __init__(self, d=256, heads=8, kv_heads=2, max_len=512):
        super().__init__()
        self.attn = LN.CausalSelfAttention(d, heads, num_kv_heads=kv_heads)
        self.norm = LN.AddLayerNorm(d)
        self.ff = LN.FeedForward(d, 4 * d, approximate="tanh")
        self.cache = self.attn.make_kv_cache(1, max_len)

    def forward(self, x, pos: int):
        h = self.attn(x, kv_cache=self.cache, start_pos=pos)
        y, s = self.norm(h, x)
        return self.ff(y, residual=s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_step_replays_like_eager(dtype):
    torch.manual_seed(0)
    block = DecodeBlock().to("cuda", dtype).eval()
    with torch.no_grad():
        block.attn(torch.randn(1, 300, 256, device="cuda", dtype=dtype), kv_cache=block.cache,
                   start_pos=0)
        static_x = torch.randn(1, 1, 256, device="cuda", dtype=dtype)
        graph, static_out = _capture(lambda x: block(x, 300), static_x)
        for _ in range(3):
            x = torch.randn(1, 1, 256, device="cuda", dtype=dtype)
            static_x.copy_(x)
            graph.replay()
            expected = block(x, 300)
            torch.testing.assert_close(static_out, expected, atol=2e-2, rtol=2e-2)


def test_prefill_ops_capture_with_autograd_off():
    """The flash forward, LayerNorm, linear_gelu and softmax kernels all capture."""
    q = torch.randn(2, 4, 333, 64, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(333, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16) / 32

    def step(q, x):
        a = LF.scaled_dot_product_attention(q, q, q, is_causal=True)
        y, s = LF.add_layer_norm(x, x, (1024,), w)
        return a, LF.linear_gelu(y, w1), LF.softmax(s, -1)

    with torch.no_grad():
        graph, outs = _capture(step, q, x)
        graph.replay()
        for got, expected in zip(outs, step(q, x)):
            torch.testing.assert_close(got, expected)


def test_dropout_draws_a_new_mask_at_each_replay():
    """The Philox seed is drawn on the device (torch's CUDA generator): a replay advances it like
    PyTorch's own dropout does, so two replays differ; eager stays reproducible by manual_seed."""
    q = torch.randn(1, 2, 64, 32, device="cuda", dtype=torch.float16)
    torch.manual_seed(3)
    a = LF.scaled_dot_product_attention(q, q, q, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(a, LF.scaled_dot_product_attention(q, q, q, dropout_p=0.3))
    graph, out = _capture(lambda q: LF.scaled_dot_product_attention(q, q, q, dropout_p=0.3), q)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


def test_reduce_overhead_compile_of_a_patched_block():
    layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True,
                                             norm_first=True).cuda().half()
    lightllm.patch(layer)
    x = torch.randn(2, 64, 256, device="cuda", dtype=torch.half)
    compiled = torch.compile(layer, mode="reduce-overhead")
    expected = layer(x)
    for _ in range(3):
        got = compiled(x)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)


def test_paged_kvcache_decode_replays_new_lengths():
    """flash_attn_with_kvcache over a paged cache: the lengths stay on the device, so a captured
    step replays with other cache_seqlens (and appends there) exactly like an eager call."""
    from lightllm.reference import attention as reference

    torch.manual_seed(0)
    b, h, hkv, d, page, blocks = 4, 8, 2, 64, 16, 40
    k_cache = torch.randn(b * blocks, page, hkv, d, device="cuda", dtype=torch.float16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(b * blocks, device="cuda").view(b, blocks).int()
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.float16)
    k = torch.randn(b, 1, hkv, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    seqlens = torch.tensor([5, 300, 0, 639], dtype=torch.int32, device="cuda")

    def step(q, k, v, seqlens):
        return LF.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, seqlens, table)

    with torch.no_grad():
        graph, out = _capture(step, q, k, v, seqlens)
        for lengths in ([7, 1, 600, 17], [0, 639, 300, 2]):
            seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
            q.normal_(), k.normal_(), v.normal_()
            ref_caches = k_cache.double(), v_cache.double()
            expected = reference.flash_attn_with_kvcache(q.double(), *ref_caches, k.double(),
                                                         v.double(), seqlens, table)
            graph.replay()
            torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(k_cache.double(), ref_caches[0])
