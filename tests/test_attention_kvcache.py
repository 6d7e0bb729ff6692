"""flash_attn_with_kvcache (dense and paged caches, in-place append) and nn.PagedKVCache.

Parity: the float64 reference (``reference.attention.flash_attn_with_kvcache``) as the oracle,
PyTorch's SDPA per sequence in the test dtype as the budget (docs/design.md §4); the caches after
the append equal the reference's caches exactly (a copy). Each case runs the kernels (in the
interpreter without a GPU) and, on CPU, the native path. Split-KV is forced and planned; lengths
include 0 and odd values, pages of odd sizes are shuffled, windows both ways.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, dtype_params

import lightllm.functional as LF
import lightllm.nn as LN
from lightllm import _dispatch
from lightllm.kernels import _device
from lightllm.kernels import attention_decode as decode_kernel
from lightllm.kernels import attention_kvcache as kvcache_kernel
from lightllm.reference import attention as reference
from lightllm.testing import DispatchedOps, assert_parity

# ------------------------------------------------------------------------------------------------
# nn.PagedKVCache: the allocator
# ------------------------------------------------------------------------------------------------


def test_paged_cache_allocates_in_order_and_grows():
    cache = LN.PagedKVCache(num_pages=6, page_size=4, num_kv_heads=2, head_dim=8, num_layers=3)
    assert cache.k.shape == (3, 6, 4, 2, 8) and cache.layer(1)[0].shape == (6, 4, 2, 8)
    assert cache.layer(2)[1].data_ptr() == cache.v[2].data_ptr()
    cache.reserve("a", 5)  # 2 pages
    cache.reserve("b", 1)
    assert cache.pages("a") == [0, 1] and cache.pages("b") == [2]
    cache.reserve("a", 8)  # still 2 pages: nothing taken
    assert cache.pages("a") == [0, 1] and cache.num_free_pages == 3
    cache.reserve("a", 9)
    assert cache.pages("a") == [0, 1, 3] and cache.capacity("a") == 12
    cache.reserve("a", 2)  # never shrinks
    assert cache.pages("a") == [0, 1, 3]


def test_paged_cache_refuses_when_short_without_taking_pages():
    cache = LN.PagedKVCache(num_pages=3, page_size=4, num_kv_heads=1, head_dim=8)
    cache.reserve("a", 8)
    with pytest.raises(RuntimeError, match="need 2 more pages of 4, but 1 of 3 are free"):
        cache.reserve("b", 5)
    assert cache.pages("b") == [] and cache.num_free_pages == 1
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="n_tokens"):
            cache.reserve("a", bad)


def test_paged_cache_free_returns_pages_for_reuse():
    cache = LN.PagedKVCache(num_pages=4, page_size=2, num_kv_heads=1, head_dim=8)
    cache.reserve("a", 4)
    cache.reserve("b", 2)
    cache.free("a")
    cache.free("unknown")  # a no-op
    assert cache.num_free_pages == 3 and cache.pages("a") == []
    cache.reserve("c", 6)  # a's pages first, in their order, then the untouched one
    assert cache.pages("c") == [0, 1, 3]


def test_paged_cache_keeps_a_sequence_on_consecutive_pages_where_it_can():
    """A sequence grows into the page after its last when that one is free, and a new one takes
    the first run of free pages long enough for it, so its keys stay one slice of the buffers."""
    cache = LN.PagedKVCache(num_pages=10, page_size=2, num_kv_heads=1, head_dim=8)
    for name, tokens in (("a", 4), ("b", 2), ("c", 6), ("d", 2)):
        cache.reserve(name, tokens)
    assert [cache.pages(n) for n in "abcd"] == [[0, 1], [2], [3, 4, 5], [6]]
    cache.free("a")
    cache.free("c")  # free: 0 1 | 3 4 5 | 7 8 9
    cache.reserve("e", 6)  # skips the run of two for the first run of three
    assert cache.pages("e") == [3, 4, 5]
    cache.reserve("d", 6)  # continues after page 6
    assert cache.pages("d") == [6, 7, 8]
    cache.reserve("f", 6)  # no run of three is left: the lowest pages
    assert cache.pages("f") == [0, 1, 9] and cache.num_free_pages == 0


def test_paged_cache_block_table_pads_and_checks_width():
    cache = LN.PagedKVCache(num_pages=5, page_size=2, num_kv_heads=1, head_dim=8)
    cache.reserve("a", 5)
    cache.reserve("b", 1)
    table = cache.block_table(["b", "a", "new"])
    assert table.dtype == torch.int32 and table.tolist() == [[3, 0, 0], [0, 1, 2], [0, 0, 0]]
    assert cache.block_table(["b"], width=4).tolist() == [[3, 0, 0, 0]]
    assert cache.block_table([]).shape == (0, 0)
    with pytest.raises(ValueError, match="width 2 is less than the 3 pages"):
        cache.block_table(["a"], width=2)


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------


def _paths():
    """The kernels (interpreted on CPU), and the native CPU path when there is no GPU."""
    return ["kernel"] if HAS_CUDA else ["kernel", "native"]


def _run(path, *args, **kwargs):
    if path == "native":
        with _dispatch.native_cpu():
            return LF.flash_attn_with_kvcache(*args, **kwargs)
    return LF.flash_attn_with_kvcache(*args, **kwargs)


def _make(b, sq, h, hkv, d, sn, lengths, page_size, dtype, dv=None, spare=3):
    """Random q, caches, new k/v, int32 lengths and (page_size given) a shuffled block table
    with room for every sequence's lengths + sn."""
    dv = d if dv is None else dv
    cap = max(lengths) + sn + spare
    gen = dict(device=DEVICE, dtype=dtype)
    if page_size:
        blocks = -(-cap // page_size)
        n_pages = b * blocks + 2
        k_cache = torch.randn(n_pages, page_size, hkv, d, **gen)
        v_cache = torch.randn(n_pages, page_size, hkv, dv, **gen)
        table = torch.randperm(n_pages, device=DEVICE)[:b * blocks].view(b, blocks).int()
    else:
        k_cache, v_cache, table = torch.randn(b, cap, hkv, d, **gen), torch.randn(
            b, cap, hkv, dv, **gen), None
    q = torch.randn(b, sq, h, d, **gen)
    k = torch.randn(b, sn, hkv, d, **gen) if sn else None
    v = torch.randn(b, sn, hkv, dv, **gen) if sn else None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, k, v, seqlens, table


def _torch_kvcache(q, k_cache, v_cache, seqlens, table, n_new, causal, window, scale=None):
    """PyTorch's SDPA per sequence in q's dtype over caches already appended to (the budget)."""
    outs = []
    for b in range(q.shape[0]):
        n = int(seqlens[b]) + n_new
        pos = torch.arange(n, device=q.device)
        if table is None:
            kb, vb = k_cache[b, :n], v_cache[b, :n]
        else:
            page = k_cache.shape[1]
            blocks, rows = table[b].long()[pos // page], pos % page
            kb, vb = k_cache[blocks, rows], v_cache[blocks, rows]
        mask = reference.window_mask(q.shape[1], n, window, causal, device=q.device)
        out = F.scaled_dot_product_attention(q[b].transpose(0, 1), kb.transpose(0, 1),
                                             vb.transpose(0, 1), mask, scale=scale,
                                             enable_gqa=True)
        outs.append(out.transpose(0, 1).nan_to_num(0.0))
    return torch.stack(outs)


def check_kvcache(path, q, k_cache, v_cache, k, v, seqlens, table, causal=True,
                  window=(-1, -1), int_seqlens=False, scale=None):
    """Output vs the float64 reference (PyTorch's error as the budget), caches vs its caches."""
    ref_caches = k_cache.double(), v_cache.double()
    new = [None if t is None else t.double() for t in (k, v)]
    expected = reference.flash_attn_with_kvcache(
        q.double(), *ref_caches, *new, seqlens, table, scale, causal, window)
    given = int(seqlens[0]) if int_seqlens else seqlens
    out = _run(path, q, k_cache, v_cache, k, v, cache_seqlens=given, block_table=table,
               softmax_scale=scale, causal=causal, window_size=window)
    assert out.shape == (*q.shape[:3], v_cache.shape[-1]) and out.dtype == q.dtype
    assert torch.equal(k_cache.double(), ref_caches[0]), "k_cache after the append"
    assert torch.equal(v_cache.double(), ref_caches[1]), "v_cache after the append"
    n_new = 0 if k is None else k.shape[1]
    theirs = _torch_kvcache(q, k_cache, v_cache, seqlens, table, n_new, causal, window, scale)
    assert_parity(out, expected, theirs)
    return out


# (B, Sq, H, Hkv, D, Sn, lengths, page_size: 0 = dense)
CASES = [
    (3, 1, 4, 2, 32, 1, [5, 0, 40], 16),  # decode over a paged cache, one empty sequence
    (3, 1, 6, 2, 64, 0, [7, 1, 33], 16),  # no new tokens
    (2, 1, 4, 4, 40, 1, [17, 63], 0),  # dense, MHA, head dim 40
    (2, 9, 6, 3, 16, 9, [0, 30], 32),  # a chunk (prefill of a new sequence and a continued one)
    (2, 13, 9, 3, 64, 13, [3, 50], 48),  # SmolLM2's heads, page size 48
    (1, 5, 2, 1, 32, 5, [21], 8),  # odd pages of 8: tiles straddle pages
    (2, 4, 4, 2, 16, 0, [3, 11], 0),  # more queries than... dense, queries over the cache only
]


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"p{c[7]}")
def test_kvcache_parity(case, dtype, path):
    b, sq, h, hkv, d, sn, lengths, page_size = case
    check_kvcache(path, *_make(b, sq, h, hkv, d, sn, lengths, page_size, dtype))


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("window, causal", [((5, -1), True), ((3, 2), False), ((-1, 1), False),
                                            ((0, 0), False), ((-1, -1), False)],
                         ids=["left5-causal", "3,2", "right1", "0,0", "full"])
def test_kvcache_windows(window, causal, path):
    check_kvcache(path, *_make(2, 6, 4, 2, 16, 3, [4, 40], 16, torch.float32), causal=causal,
                  window=window)


@pytest.mark.parametrize("path", _paths())
def test_kvcache_int_seqlens_scale_and_value_dim(path):
    """An int cache_seqlens, a softmax_scale, Dv != D, strided (non-contiguous) q and caches."""
    q, k_cache, v_cache, k, v, seqlens, table = _make(2, 3, 4, 2, 32, 2, [9, 9], 16,
                                                      torch.float32, dv=16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Sq, H, D) with heads outermost
    check_kvcache(path, q, k_cache, v_cache, k, v, seqlens, table, int_seqlens=True, scale=0.3)
    big = torch.randn(2, 30, 2, 48, device=DEVICE)
    dense_k, dense_v = big[..., :32], big[..., 32:]  # strided views of one buffer
    check_kvcache(path, q, dense_k, dense_v, k, v, seqlens, None)


@pytest.mark.parametrize("path", _paths())
def test_kvcache_whole_cache_when_seqlens_is_none(path):
    q, k_cache, v_cache, _, _, _, table = _make(2, 2, 4, 2, 16, 0, [30, 30], 16, torch.float32,
                                                spare=2)
    expected = reference.flash_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(),
                                                 block_table=table)
    torch.testing.assert_close(_run(path, q, k_cache, v_cache, block_table=table),
                               expected.float(), atol=2e-5, rtol=1e-5)


def test_kvcache_split_kv_forced_and_planned():
    """600 keys: forced split counts (one chunk wholly past the short sequence) equal the
    reference, and the plan splits a long cache."""
    q, k_cache, v_cache, k, v, seqlens, table = _make(2, 2, 4, 2, 32, 2, [598, 40], 64,
                                                      torch.float32, spare=120)
    expected = reference.flash_attn_with_kvcache(
        q.double(), k_cache.double().clone(), v_cache.double().clone(), k.double(), v.double(),
        seqlens, table)
    for splits in (3, 1):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = kvcache_kernel.attention_kvcache_fwd(q, kc, vc, k, v, seqlens, 0, table,
                                                 1 / math.sqrt(32), -1, 0, num_splits=splits)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    plan = decode_kernel.plan(1, 32, 8, 1, 16, 128, 128, 2, _device.HOPPER, None)
    assert plan[0] > 1  # one sequence of 4096 cache slots on 132 SMs splits


def test_kvcache_kernel_clamps_bad_lengths():
    """Lengths past the cache (only the kernels see them on CUDA): nothing is written outside
    the cache and every read stays inside it; the output is finite."""
    q, k_cache, v_cache, k, v, _, table = _make(2, 1, 2, 1, 16, 1, [10, 10], 16, torch.float32)
    bad = torch.tensor([10_000, -50], dtype=torch.int32, device=DEVICE)
    before = k_cache.clone(), v_cache.clone()
    out = kvcache_kernel.attention_kvcache_fwd(q, k_cache, v_cache, k, v, bad, 0, table, 0.25,
                                             -1, 0)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # length -50 + 1: nothing to see


def test_kvcache_float64_and_empty():
    q, k_cache, v_cache, k, v, seqlens, table = _make(2, 3, 4, 2, 16, 3, [0, 5], 16,
                                                      torch.float64)
    check_kvcache("kernel", q, k_cache, v_cache, k, v, seqlens, table)
    out = LF.flash_attn_with_kvcache(q[:, :0], k_cache, v_cache, k, v, seqlens, table)
    assert out.shape == (2, 0, 4, 16)
    e = _make(1, 1, 4, 2, 16, 1, [0], 16, torch.float32)
    empty = LF.flash_attn_with_kvcache(e[0][:0], e[1], e[2], e[3][:0], e[4][:0], e[5][:0],
                                       e[6][:0])
    assert empty.shape == (0, 1, 4, 16)


def test_kvcache_refuses_autograd():
    q, k_cache, v_cache, *_ = _make(1, 1, 2, 1, 16, 0, [4], 0, torch.float32)
    with pytest.raises(RuntimeError, match="not differentiable"):
        LF.flash_attn_with_kvcache(q.requires_grad_(), k_cache, v_cache, cache_seqlens=4)
    with torch.no_grad():
        LF.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)


# ------------------------------------------------------------------------------------------------
# PyTorch integration
# ------------------------------------------------------------------------------------------------


def test_kvcache_dispatch_mode_runs_the_custom_op_bitwise_equal():
    inputs = _make(2, 3, 4, 2, 16, 3, [2, 9], 16, torch.float32)
    caches = inputs[1].clone(), inputs[2].clone()
    direct = LF.flash_attn_with_kvcache(*inputs)
    with DispatchedOps() as seen:
        routed = LF.flash_attn_with_kvcache(inputs[0], *caches, *inputs[3:])
    assert seen.lightllm["attention_kvcache"] == 1
    assert torch.equal(direct, routed) and torch.equal(caches[0], inputs[1])


def test_kvcache_opcheck():
    q, k_cache, v_cache, k, v, seqlens, table = _make(2, 3, 4, 2, 16, 3, [2, 9], 16,
                                                      torch.float32)
    op = torch.ops.lightllm.attention_kvcache.default
    torch.library.opcheck(op, (q, k_cache, v_cache, k, v, seqlens, 0, table, 0.25, True, -1, 0))
    torch.library.opcheck(op, (q, k_cache[:2], v_cache[:2], None, None, None, 7, None, 0.25,
                               False, 2, 1))


def test_kvcache_compile_fullgraph():
    def step(q, k_cache, v_cache, k, v, seqlens, table):
        out = LF.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, seqlens, table)
        return out.sigmoid() * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = _make(2, 1, 4, 2, 16, 1, [3, 20], 16, torch.float32)
    caches = inputs[1].clone(), inputs[2].clone()
    got = compiled(*inputs)
    expected = step(inputs[0], *caches, *inputs[3:])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(inputs[1], caches[0])  # the compiled call appended too


# ------------------------------------------------------------------------------------------------
# Bad input: errors that name the argument, before any launch
# ------------------------------------------------------------------------------------------------


def _bad(**over):
    q, k_cache, v_cache, k, v, seqlens, table = _make(2, 1, 4, 2, 16, 1, [3, 5], 16,
                                                      torch.float32)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=seqlens,
                block_table=table)
    args.update({name: f(args) for name, f in over.items()})
    return lambda: LF.flash_attn_with_kvcache(**args)


BAD = [
    (dict(q=lambda a: a["q"][0]), ValueError, "q must be 4-D"),
    (dict(q=lambda a: a["q"].half()), TypeError, "one dtype"),
    (dict(q=lambda a: a["q"].int()), TypeError, "q must have dtype"),
    (dict(q=lambda a: a["q"].to("meta")), RuntimeError, "one device"),
    (dict(q=lambda a: a["q"][..., :8]), ValueError, "head dim 16 must equal q's head dim 8"),
    (dict(q=lambda a: a["q"][:, :, :3]), ValueError, "2 key/value heads must divide q's 3"),
    (dict(v=lambda a: None), ValueError, "both or neither"),
    (dict(k=lambda a: a["k"][:, :, :1]), ValueError, "k and v must be"),
    (dict(k=lambda a: a["k"].double()), TypeError, "k and v must have q's dtype"),
    (dict(k=lambda a: a["k"].transpose(1, 3).contiguous().transpose(1, 3)), ValueError,
     "unit stride"),
    (dict(block_table=lambda a: a["block_table"].long()), ValueError, "block_table must be"),
    (dict(block_table=lambda a: a["block_table"][:1]), ValueError, "with 2 rows"),
    (dict(block_table=lambda a: a["block_table"] + 1000), ValueError, "page indices"),
    (dict(block_table=lambda a: None), ValueError, "without block_table"),
    (dict(cache_seqlens=lambda a: a["cache_seqlens"].long()), ValueError, "cache_seqlens must"),
    (dict(cache_seqlens=lambda a: a["cache_seqlens"] + 10_000), ValueError, "must lie in"),
    (dict(cache_seqlens=lambda a: -1), ValueError, "cache_seqlens=-1"),
    (dict(cache_seqlens=lambda a: 2.0), TypeError, "cache_seqlens must be an int"),
    (dict(cache_seqlens=lambda a: None), ValueError, "new k/v need cache_seqlens"),
    (dict(v_cache=lambda a: a["v_cache"][:, :8]), ValueError, "v_cache"),
    (dict(k_cache=lambda a: a["k_cache"].new_empty(2, 16, 2, 300),
          v_cache=lambda a: a["v_cache"].new_empty(2, 16, 2, 300),
          q=lambda a: a["q"].new_empty(2, 1, 4, 300), k=lambda a: None, v=lambda a: None),
     ValueError, "at most 256"),
]


@pytest.mark.parametrize("over, error, match", BAD, ids=[b[2] for b in BAD])
def test_kvcache_bad_input(over, error, match):
    with pytest.raises(error, match=match):
        _bad(**over)()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window_size=(1,)), TypeError, "window_size"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale="x"), TypeError, "softmax_scale"),
])
def test_kvcache_bad_flags(kwargs, error, match):
    q, k_cache, v_cache, *_ = _make(1, 1, 2, 1, 16, 0, [4], 0, torch.float32)
    with pytest.raises(error, match=match):
        LF.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4, **kwargs)
