"""Every Triton launch keeps CUDA's grid limits (docs/design.md §3 "Launch limits"), shown without a GPU.

CUDA refuses a launch whose grid has x >= 2^31 or y, z > 65535 ("invalid argument"); the interpreter
does not enforce that. Here the public functions run under ``lightllm.testing.stub_launches``: no
kernel runs (outputs are garbage), each launch is recorded with its grid for every config its
autotuner could pick, and each grid is checked against the limits. The shapes are the ones that
break a naive grid yet cost little memory: batch x heads = 4096 x 17 = 69632 (> 65535) with tiny
sequences and head dims, 70000 rows of 8 features, a decode over 2^20 keys read through stride 0.
Each call names the kernels it must launch, so an empty recording cannot pass.
"""

import pytest
import torch
from conftest import DEVICE

import lightllm.functional as LF
from lightllm.kernels import attention as attention_kernel
from lightllm.kernels import attention_decode as decode_kernel
from lightllm.kernels import attention_kvcache as kvcache_kernel
from lightllm.testing import stub_launches

MAX_X = 2**31 - 1
MAX_YZ = 65535

BATCH, HEADS = 4096, 17  # batch x heads past 65535 (a ViT at large batch)
ROWS = 70000  # more rows than 65535
LONG_KEYS = 2**20

ATTN_FWD = ["_attention_fwd"]
ATTN_BWD = ["_attention_bwd_preprocess", "_attention_bwd_dkdv", "_attention_bwd_dq"]
DECODE_FWD = ["_attention_decode_split", "_attention_decode_combine"]
LN_FWD, LN_BWD = ["_layer_norm_fwd"], ["_layer_norm_bwd"]


def _mm(dtype):
    # fp16 with 16-byte aligned rows takes the TMA matmul, fp32 the pointer one.
    return ["_linear_gelu_mm_tma" if dtype == torch.float16 else "_linear_gelu_mm"]


def _t(*shape, dtype=torch.float16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _leaf(*shape, dtype=torch.float16):
    return _t(*shape, dtype=dtype).requires_grad_(True)


def _problems(launches, expected, phase) -> list[str]:
    """What is wrong with ``launches``: an expected kernel not launched, a grid past the limits."""
    names = {launch.kernel for launch in launches}
    problems = [f"{phase}: {name} was not launched (saw {sorted(names)})"
                for name in expected if name not in names]
    for launch in launches:
        for grid in launch.grids:
            x, y, z = grid
            if not (1 <= x <= MAX_X and 1 <= y <= MAX_YZ and 1 <= z <= MAX_YZ):
                problems.append(f"{phase}: {launch.kernel} grid {grid} breaks CUDA's limits "
                                "(x < 2^31, y and z <= 65535)")
    return problems


def _check(launches, expected, phase):
    problems = _problems(launches, expected, phase)
    assert not problems, "\n".join(problems)


def _run(forward, backward_inputs, fwd_expected, bwd_expected):
    """``forward()`` then, when ``bwd_expected``, the gradient of every tensor it returns
    w.r.t. ``backward_inputs``; each phase's launches are checked on their own."""
    with stub_launches() as launches:
        outs = forward()
        outs = outs if isinstance(outs, tuple) else (outs,)
        n_fwd = len(launches)
        if bwd_expected:
            torch.autograd.grad(outs, backward_inputs, [torch.ones_like(o) for o in outs])
    problems = _problems(launches[:n_fwd], fwd_expected, "forward")
    if bwd_expected:
        problems += _problems(launches[n_fwd:], bwd_expected, "backward")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Attention: the flash-style kernels (batch x heads past 65535)
# ------------------------------------------------------------------------------------------------

NQ, NK, D = 5, 7, 16


@pytest.mark.parametrize("case", ["plain", "causal", "bool mask", "additive mask", "dropout",
                                  "gqa"])
def test_attention_batch_heads(case):
    hq = 2 * HEADS if case == "gqa" else HEADS
    q, k, v = _leaf(BATCH, hq, NQ, D), _leaf(BATCH, HEADS, NK, D), _leaf(BATCH, HEADS, NK, D)
    kwargs = {
        "plain": {},
        "causal": {"is_causal": True},
        "bool mask": {"attn_mask": torch.rand(BATCH, 1, NQ, NK, device=DEVICE) > 0.3},
        "additive mask": {"attn_mask": _t(1, HEADS, NQ, NK)},
        "dropout": {"dropout_p": 0.1},
        "gqa": {"enable_gqa": True},
    }[case]
    _run(lambda: LF.scaled_dot_product_attention(q, k, v, **kwargs), (q, k, v),
         ATTN_FWD, ATTN_BWD)


@pytest.mark.parametrize("case", ["plain", "causal+window", "gqa+dropout"])
def test_varlen_attention_sequences_heads(case):
    """4096 packed sequences x 17 heads (x 2 with GQA): programs on axis 0 only."""
    hq = 2 * HEADS if case == "gqa+dropout" else HEADS
    cu = torch.arange(0, BATCH + 1, dtype=torch.int32, device=DEVICE)
    q, k, v = _leaf(BATCH, hq, D), _leaf(BATCH, HEADS, D), _leaf(BATCH, HEADS, D)
    kwargs = {"plain": {}, "causal+window": {"causal": True, "window_size": (3, -1)},
              "gqa+dropout": {"dropout_p": 0.1}}[case]
    _run(lambda: LF.flash_attn_varlen_func(q, k, v, cu, cu, 1, 1, **kwargs), (q, k, v),
         ATTN_FWD, ATTN_BWD)


def test_dropout_keep_mask_batch_heads():
    with stub_launches() as launches:
        attention_kernel.dropout_keep_mask(BATCH, HEADS, NQ, NK, 0.1, 1234, DEVICE)
    _check(launches, ["_dropout_keep_mask"], "keep mask")


# ------------------------------------------------------------------------------------------------
# Attention: the split-KV decode (one query token over >= 256 keys)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa+mask"])
def test_decode_batch_heads(gqa):
    # K/V are one head's keys read through stride 0: 4096 x 17 x 256 keys cost 8 KiB.
    hq = 2 * HEADS if gqa else HEADS
    q = _t(BATCH, hq, 1, D)
    k = _t(1, 1, 256, D).expand(BATCH, HEADS, 256, D)
    v = _t(1, 1, 256, D).expand(BATCH, HEADS, 256, D)
    mask = (torch.rand(BATCH, 1, 1, 256, device=DEVICE) > 0.1) if gqa else None
    _run(lambda: LF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa), (),
         DECODE_FWD, None)


def test_decode_long_keys():
    """2^20 keys (stride 0 along the sequence): the chosen split count, and the backward that the
    decode path's lse feeds."""
    q = _leaf(1, 2, 1, D)
    k_base, v_base = _leaf(1, 2, 1, D), _leaf(1, 2, 1, D)
    _run(lambda: LF.scaled_dot_product_attention(q, k_base.expand(1, 2, LONG_KEYS, D),
                                                 v_base.expand(1, 2, LONG_KEYS, D)),
         (q, k_base, v_base), DECODE_FWD, ATTN_BWD)


def test_decode_many_splits():
    # The most chunks 2^20 keys allow (one per SPLIT_ALIGN keys: 4096).
    q = _t(1, 2, 1, D)
    k = _t(1, 2, 1, D).expand(1, 2, LONG_KEYS, D)
    with stub_launches() as launches:
        decode_kernel.attention_decode_fwd(q, k, k, None, D ** -0.5, num_splits=LONG_KEYS)
    _check(launches, DECODE_FWD, "decode, 4096 splits")


# ------------------------------------------------------------------------------------------------
# Attention over a KV cache (flash_attn_with_kvcache): batch x kv heads past 65535
# ------------------------------------------------------------------------------------------------

KVCACHE = ["_kvcache_append", "_attention_kvcache_split"]


@pytest.mark.parametrize("sq", [1, 40], ids=["decode", "chunk"])
def test_kvcache_batch_heads(sq):
    # 4096 sequences x 17 kv heads, pages of 16 shared through the block table (all rows name
    # page 0: the table costs 4096 ints), new keys appended; the long cache plans several splits.
    pages = _t(1, 16, HEADS, D)
    table = torch.zeros(BATCH, 64, dtype=torch.int32, device=DEVICE)
    q, new = _t(BATCH, sq, 2 * HEADS, D), _t(BATCH, sq, HEADS, D)
    seqlens = torch.zeros(BATCH, dtype=torch.int32, device=DEVICE)
    with stub_launches() as launches, torch.no_grad():
        LF.flash_attn_with_kvcache(q, pages, pages, new, new, seqlens, table)
    _check(launches, KVCACHE, f"kvcache Sq={sq}")


def test_kvcache_many_splits():
    """One sequence of 2^20 cache slots read through 2^16 pages of 16, every split."""
    pages = _t(1, 16, 2, D)
    table = torch.zeros(1, LONG_KEYS // 16, dtype=torch.int32, device=DEVICE)
    q = _t(1, 1, 2, D)
    seqlens = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with stub_launches() as launches:
        kvcache_kernel.attention_kvcache_fwd(q, pages, pages, None, None, seqlens, 0, table,
                                           D ** -0.5, -1, 0, num_splits=LONG_KEYS)
    _check(launches, ["_attention_kvcache_split", "_attention_decode_combine"], "4096 splits")


# ------------------------------------------------------------------------------------------------
# LayerNorm and the GeLU matmuls (rows past 65535)
# ------------------------------------------------------------------------------------------------


def test_layer_norm_rows():
    x = _leaf(ROWS, 8, dtype=torch.float32)
    w, b = _leaf(8, dtype=torch.float32), _leaf(8, dtype=torch.float32)
    _run(lambda: LF.layer_norm(x, (8,), w, b), (x, w, b), LN_FWD, LN_BWD)


def test_add_layer_norm_rows():
    x, r = _leaf(BATCH, HEADS, 8, dtype=torch.float32), _leaf(BATCH, HEADS, 8, dtype=torch.float32)
    w, b = _leaf(8, dtype=torch.float32), _leaf(8, dtype=torch.float32)
    _run(lambda: LF.add_layer_norm(x, r, (8,), w, b), (x, r, w, b), LN_FWD, LN_BWD)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear_gelu_rows(dtype):
    x, w, b = _leaf(ROWS, 8, dtype=dtype), _leaf(16, 8, dtype=dtype), _leaf(16, dtype=dtype)
    _run(lambda: LF.linear_gelu(x, w, b), (x, w, b), _mm(dtype), ["_linear_gelu_bwd"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_feed_forward_rows(dtype):
    x = _leaf(ROWS, 8, dtype=dtype)
    w1, b1 = _leaf(16, 8, dtype=dtype), _leaf(16, dtype=dtype)
    w2, b2 = _leaf(8, 16, dtype=dtype), _leaf(8, dtype=dtype)
    _run(lambda: LF.feed_forward(x, w1, b1, w2, b2), (x, w1, b1, w2, b2), _mm(dtype), _mm(dtype))


# ------------------------------------------------------------------------------------------------
# The stub itself
# ------------------------------------------------------------------------------------------------


def test_stub_restores_and_records_nothing_without_record():
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    before = Autotuner.run, JITFunction.run, InterpretedFunction.run
    x = _t(3, 8, dtype=torch.float32)
    with stub_launches(record=False) as launches:
        LF.layer_norm(x, (8,))
    assert launches == []
    assert (Autotuner.run, JITFunction.run, InterpretedFunction.run) == before


def test_layer_norm_refuses_rows_past_axis_0():
    # 2^31 rows read through stride 0: refused before anything is allocated or launched.
    x = _t(1, 8, dtype=torch.float32).expand(2**31, 8)
    with stub_launches() as launches, pytest.raises(ValueError, match="at most 2147483647 rows"):
        LF.layer_norm(x, (8,))
    assert launches == []
