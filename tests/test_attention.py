"""scaled_dot_product_attention: parity (docs/design.md §4), masks, GQA, dropout, edge numerics,
registration, errors.

Every parity check runs lightllm in the test dtype, the reference in float64 (the oracle) and
PyTorch's own ``F.scaled_dot_product_attention`` in the test dtype (the error budget), for the output
and for dQ, dK, dV. On CPU the kernels run in Triton's interpreter: shapes stay small (B <= 2,
H <= 6, N <= ~256); the decode path has its own file (test_attention_decode.py).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, dtype_params

import lightllm.functional as LF
from lightllm import _dispatch
from lightllm.kernels import _attention as common
from lightllm.kernels import attention as kernel
from lightllm.kernels import attention_decode as kernel_decode
from lightllm.kernels._device import HOPPER
from lightllm.ops import attention as op
from lightllm.reference import attention as reference
from lightllm.testing import assert_parity

DTYPES = dtype_params(torch.float32, torch.float16, torch.bfloat16)


def _leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def _qkv(b, hq, hkv, nq, nk, d, dv=None, dtype=torch.float32, scale=1.0):
    q = torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype) * scale
    k = torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype) * scale
    v = torch.randn(b, hkv, nk, dv or d, device=DEVICE, dtype=dtype)
    return q, k, v


def check_sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dout=None,
               grad=True, dense_mask=None):
    """Output and dQ/dK/dV of lightllm vs float64, PyTorch's SDPA in q's dtype as the budget.
    ``dense_mask``: the boolean mask the reference applies in place of ``attn_mask`` (for
    PyTorch's causal bias objects)."""
    kw = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    ours = _leaves(q, k, v)
    out = LF.scaled_dot_product_attention(*ours, **kw)
    theirs = _leaves(q, k, v)
    out_torch = F.scaled_dot_product_attention(*theirs, **kw)
    ref = _leaves(q, k, v, dtype=torch.float64)
    if dense_mask is not None:
        kw["attn_mask"] = dense_mask
    out_ref = reference.scaled_dot_product_attention(*ref, **kw)
    assert out.shape == out_torch.shape and out.dtype == q.dtype
    assert_parity(out, out_ref, out_torch, name="out")
    if not grad:
        return out
    dout = torch.randn_like(out) if dout is None else dout
    for name, g, g_ref, g_torch in zip(
        ("dq", "dk", "dv"),
        torch.autograd.grad(out, ours, dout),
        torch.autograd.grad(out_ref, ref, dout.double()),
        torch.autograd.grad(out_torch, theirs, dout),
    ):
        assert_parity(g, g_ref, g_torch, grad=True, name=name)
    return out


# (B, Hq, Nq, Nk, D): odd lengths, Nq != Nk both ways, length 1, the odd head dims next to 64/128.
SHAPES = [
    (1, 1, 1, 1, 64),
    (2, 3, 97, 97, 64),
    (1, 2, 113, 203, 40),
    (1, 2, 203, 113, 80),
    (2, 1, 1, 97, 96),
    (1, 2, 130, 67, 112),
    (1, 1, 61, 77, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa(shape, is_causal, dtype):
    b, h, nq, nk, d = shape
    check_sdpa(*_qkv(b, h, h, nq, nk, d, dtype=dtype), is_causal=is_causal)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("d", [8, 256])
def test_head_dim_extremes(d, dtype):
    check_sdpa(*_qkv(1, 2, 2, 37, 70, d, dtype=dtype), is_causal=True)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("d, dv", [(64, 40), (40, 128), (16, 24)])
def test_value_head_dim_differs(d, dv, dtype):
    check_sdpa(*_qkv(2, 2, 2, 45, 83, d, dv, dtype=dtype))


def _mask(kind, b, h, nq, nk, dtype):
    """Masks of each supported kind; every bool mask leaves at least one key for most rows."""
    if kind == "bool-key-padding":  # (B, 1, 1, Nk)
        m = torch.rand(b, 1, 1, nk, device=DEVICE) > 0.3
        m[..., 0] = True
        return m
    if kind == "bool-full":  # (B, H, Nq, Nk)
        return torch.rand(b, h, nq, nk, device=DEVICE) > 0.5
    if kind == "bool-2d":  # (Nq, Nk), broadcast over batch and heads
        return torch.rand(nq, nk, device=DEVICE) > 0.2
    if kind == "float-full":
        return torch.randn(b, h, nq, nk, device=DEVICE, dtype=dtype)
    if kind == "float-key-padding":  # additive with -inf for padded keys
        m = torch.zeros(b, 1, 1, nk, device=DEVICE, dtype=dtype)
        m[..., nk // 2:] = float("-inf")
        return m
    if kind == "float-head-row":  # (1, H, Nq, 1): broadcast along the keys (stride 0 there)
        return torch.randn(1, h, nq, 1, device=DEVICE, dtype=dtype)
    raise ValueError(kind)


MASKS = ["bool-key-padding", "bool-full", "bool-2d", "float-full", "float-key-padding",
         "float-head-row"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASKS)
def test_attn_mask(kind, dtype):
    b, h, nq, nk = 2, 2, 77, 150
    q, k, v = _qkv(b, h, h, nq, nk, 64, dtype=dtype)
    check_sdpa(q, k, v, attn_mask=_mask(kind, b, h, nq, nk, dtype))


def test_float_mask_of_another_dtype():
    """An fp32 additive mask with fp16 inputs (PyTorch accepts it): read and added in fp32."""
    q, k, v = _qkv(1, 2, 2, 40, 90, 32, dtype=torch.float16)
    check_sdpa(q, k, v, attn_mask=torch.randn(1, 2, 40, 90, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masking", ["bool", "float"])
def test_fully_masked_rows_give_zero(masking, dtype):
    q, k, v = _qkv(2, 2, 2, 50, 70, 32, dtype=dtype)
    keep = torch.rand(2, 2, 50, 70, device=DEVICE) > 0.4
    keep[:, :, [0, 7, 49]] = False  # three rows see no key at all
    keep[1, 0, 20] = False
    mask = keep if masking == "bool" else torch.zeros(keep.shape, dtype=dtype, device=DEVICE
                                                       ).masked_fill(~keep, float("-inf"))
    ours = _leaves(q, k, v)
    out = LF.scaled_dot_product_attention(*ours, attn_mask=mask)
    out.sum().backward()
    assert torch.equal(out[:, :, [0, 7, 49]], torch.zeros_like(out[:, :, [0, 7, 49]]))
    assert torch.equal(out[1, 0, 20], torch.zeros_like(out[1, 0, 20]))
    assert torch.equal(ours[0].grad[:, :, [0, 7, 49]], torch.zeros_like(ours[0].grad[:, :, :3]))
    assert all(torch.isfinite(t.grad).all() for t in ours)
    check_sdpa(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal, masked", [(False, False), (True, False), (False, True)],
                         ids=["full", "causal", "mask"])
@pytest.mark.parametrize("hq, hkv", [(6, 2), (4, 1), (3, 3)])
def test_gqa(hq, hkv, is_causal, masked, dtype):
    b, nq, nk = 2, 70, 101
    q, k, v = _qkv(b, hq, hkv, nq, nk, 48, dtype=dtype)
    mask = _mask("bool-full", b, hq, nq, nk, dtype) if masked else None
    check_sdpa(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


def test_single_kv_head_broadcasts_without_gqa():
    """k/v with one head broadcast against query's heads (as PyTorch's matmul does)."""
    check_sdpa(*_qkv(2, 3, 1, 33, 47, 32))


@pytest.mark.parametrize("q_shape, kv_shape", [((3, 5, 16), (2, 3, 7, 16)), ((5, 16), (2, 3, 7, 16)),
                                               ((2, 3, 5, 16), (3, 7, 16)),
                                               ((2, 1, 5, 16), (2, 3, 7, 16))],
                         ids=["3d-q", "2d-q", "3d-kv", "one-query-head"])
def test_inputs_of_different_ranks_broadcast_as_pytorch(q_shape, kv_shape):
    """Batch and head dims broadcast right-aligned across ranks, as PyTorch's SDPA (and matmul)."""
    q = torch.randn(q_shape, device=DEVICE)
    k, v = torch.randn(kv_shape, device=DEVICE), torch.randn(kv_shape, device=DEVICE)
    check_sdpa(q, k, v)
    check_sdpa(q, k, v, is_causal=True)


def test_gqa_never_repeats_kv(monkeypatch):
    """The kernel receives K/V with Hkv heads: no repeat_interleave, no expand."""
    seen = []
    real = kernel.attention_fwd
    monkeypatch.setattr(kernel, "attention_fwd", lambda q, k, *a: seen.append(k.shape) or
                        real(q, k, *a))
    q, k, v = _qkv(1, 6, 2, 9, 17, 32)
    LF.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert seen == [(1, 2, 17, 32)]


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_scale(scale, dtype):
    check_sdpa(*_qkv(1, 2, 2, 65, 65, 32, dtype=dtype), scale=scale, is_causal=True)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
def test_large_magnitudes(dtype):
    """Scores in the thousands: max-subtracted exp2 in fp32 must neither overflow nor lose rows."""
    q, k, v = _qkv(1, 2, 2, 80, 120, 64, dtype=dtype, scale=12.0)
    out = check_sdpa(q, k, v)
    assert torch.isfinite(out).all()
    check_sdpa(q, k, v * 100, is_causal=True)


def test_non_contiguous_inputs_and_gradients():
    """q/k/v transposed from (B, N, H, D), the stride-0 gradient of out.sum(), and a transposed
    gradient; the kernels read all of them through their strides."""
    b, h, nq, nk, d = 2, 3, 41, 90, 40
    q = torch.randn(b, nq, h, d, device=DEVICE).transpose(1, 2)
    k = torch.randn(b, nk, h, d, device=DEVICE).transpose(1, 2)
    v = torch.randn(b, h, d, nk, device=DEVICE).transpose(2, 3)  # head dim not the inner one
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_sdpa(q, k, v)
    check_sdpa(q, k, v, is_causal=True, dout=torch.ones(1, device=DEVICE).expand(b, h, nq, d))
    check_sdpa(q, k, v, dout=torch.randn(b, nq, h, d, device=DEVICE).transpose(1, 2))


def test_leading_dims_and_batch_broadcast():
    # 5-D (two batch dims), 3-D (heads, seq, dim) and 2-D (seq, dim)
    q5, k5, v5 = (torch.randn(2, 2, 3, n, 32, device=DEVICE) for n in (19, 33, 33))
    check_sdpa(q5, k5, v5, attn_mask=torch.rand(2, 1, 1, 19, 33, device=DEVICE) > 0.3)
    check_sdpa(*(t[0, 0] for t in (q5, k5, v5)), is_causal=True)
    check_sdpa(*(t[0, 0, 0] for t in (q5, k5, v5)))
    # key/value batch dims broadcast against query's
    check_sdpa(q5, k5[:1], v5[:1])


def test_causal_skips_tiles_above_the_diagonal():
    """Keys past every query's reach are never read: NaN there cannot leak into the output."""
    q, k, v = _qkv(1, 2, 2, 50, 300, 32)
    # 50 queries fit one query block (BLOCK_M <= 128 in every config): keys from 128 on are past
    # the diagonal's last tile.
    k[:, :, 128:] = float("nan")
    v[:, :, 128:] = float("nan")
    out = LF.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = reference.scaled_dot_product_attention(
        q.double(), k[:, :, :50].double(), v[:, :, :50].double(), is_causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_nan_propagates():
    q, k, v = _qkv(1, 1, 1, 20, 30, 16)
    q[0, 0, 3, 5] = float("nan")
    out = LF.scaled_dot_product_attention(q, k, v)
    assert out[0, 0, 3].isnan().all()
    assert torch.isfinite(out[0, 0, [0, 1, 2, 4]]).all()
    k[0, 0, 7, 0] = float("nan")
    assert LF.scaled_dot_product_attention(q, k, v).isnan().all()


@pytest.mark.parametrize("shape_q, shape_kv", [((2, 2, 0, 16), (2, 2, 5, 16)),
                                               ((2, 2, 4, 16), (2, 2, 0, 16)),
                                               ((0, 2, 4, 16), (0, 2, 5, 16))])
def test_empty_inputs(shape_q, shape_kv):
    q = torch.randn(shape_q, device=DEVICE, requires_grad=True)
    k = torch.randn(shape_kv, device=DEVICE, requires_grad=True)
    v = torch.randn(shape_kv, device=DEVICE, requires_grad=True)
    out = LF.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_the_same_mask(p, is_causal):
    """The kernel's Philox mask, regenerated by ``dropout_keep_mask``, fed to the reference: output
    and gradients agree (the backward redraws exactly the forward's mask)."""
    b, h, nq, nk = 2, 2, 70, 90
    q, k, v = _qkv(b, h, h, nq, nk, 32)
    torch.manual_seed(1234)
    ours = _leaves(q, k, v)
    out = LF.scaled_dot_product_attention(*ours, dropout_p=p, is_causal=is_causal)
    torch.manual_seed(1234)
    seed = int(op.dropout_seed())
    keep = kernel.dropout_keep_mask(b, h, nq, nk, p, seed, DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    ref = _leaves(q, k, v, dtype=torch.float64)
    out_ref = reference.scaled_dot_product_attention(*ref, dropout_p=p, is_causal=is_causal,
                                                     dropout_mask=keep)
    low = _leaves(q, k, v)  # the reference in fp32 with the same mask sets the budget
    out_low = reference.scaled_dot_product_attention(*low, dropout_p=p, is_causal=is_causal,
                                                     dropout_mask=keep)
    assert_parity(out, out_ref, out_low, name="out")
    dout = torch.randn_like(out)
    for name, g, g_ref, g_low in zip(("dq", "dk", "dv"), torch.autograd.grad(out, ours, dout),
                                     torch.autograd.grad(out_ref, ref, dout.double()),
                                     torch.autograd.grad(out_low, low, dout)):
        assert_parity(g, g_ref, g_low, grad=True, name=name)


def test_dropout_statistics_and_reproducibility():
    p = 0.3
    keep = kernel.dropout_keep_mask(2, 3, 64, 128, p, 77, DEVICE)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) < 0.02, frac  # 49152 draws: 0.02 is > 9 standard deviations
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0], keep[1])
    assert torch.equal(keep, kernel.dropout_keep_mask(2, 3, 64, 128, p, 77, DEVICE))
    assert not torch.equal(keep, kernel.dropout_keep_mask(2, 3, 64, 128, p, 78, DEVICE))
    # Through the op: the same torch seed gives the same output, a new draw a different one;
    # p = 1 drops everything (as torch.dropout does).
    q, k, v = _qkv(1, 2, 2, 30, 40, 16)
    torch.manual_seed(5)
    a = LF.scaled_dot_product_attention(q, k, v, dropout_p=p)
    b = LF.scaled_dot_product_attention(q, k, v, dropout_p=p)
    torch.manual_seed(5)
    assert torch.equal(a, LF.scaled_dot_product_attention(q, k, v, dropout_p=p))
    assert not torch.equal(a, b)
    out = LF.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(out, torch.zeros_like(out))
    # The expectation is unchanged by dropout: the mean over many draws nears the clean output.
    clean = LF.scaled_dot_product_attention(q, k, v)
    mean = torch.stack([LF.scaled_dot_product_attention(q, k, v, dropout_p=p)
                        for _ in range(40)]).mean(0)
    assert (mean - clean).abs().mean() < 0.25 * clean.abs().mean()


# ------------------------------------------------------------------------------------------------
# PyTorch's causal bias objects: the lower-right diagonal as a kernel flag
# ------------------------------------------------------------------------------------------------


def _spy_masks(monkeypatch) -> list:
    """The masks the flash kernel's launcher receives."""
    seen, real = [], kernel.attention_fwd
    monkeypatch.setattr(kernel, "attention_fwd", lambda q, k, v, mask, *a: seen.append(mask) or
                        real(q, k, v, mask, *a))
    return seen


@pytest.mark.filterwarnings("ignore:Lower right causal bias")  # PyTorch's, for Nq > Nk
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("nq, nk", [(37, 203), (64, 64), (97, 130), (130, 97), (5, 300)])
def test_causal_lower_right(nq, nk, dtype, monkeypatch):
    """Query i sees keys up to i + Nk - Nq (a chunk over a KV cache); with Nq > Nk the first rows
    see nothing and give 0, as PyTorch. No mask tensor reaches the kernel."""
    from torch.nn.attention.bias import causal_lower_right

    seen = _spy_masks(monkeypatch)
    q, k, v = _qkv(2, 4, 2, nq, nk, 40, dtype=dtype)
    bias = causal_lower_right(nq, nk)
    out = check_sdpa(q, k, v, attn_mask=bias, enable_gqa=True, dense_mask=bias._materialize())
    assert seen == [None]
    if nq > nk:
        assert out[:, :, : nq - nk].abs().max() == 0


def test_causal_upper_left_bias_is_is_causal(monkeypatch):
    from torch.nn.attention.bias import causal_upper_left

    seen = _spy_masks(monkeypatch)
    q, k, v = _qkv(1, 2, 2, 70, 45, 32)
    bias = causal_upper_left(70, 45)
    check_sdpa(q, k, v, attn_mask=bias, dense_mask=bias._materialize())
    assert seen == [None]


def test_causal_lower_right_one_query_needs_no_mask(monkeypatch):
    """The last query sees every key: the split-KV decode kernel serves it, unmasked."""
    from torch.nn.attention.bias import causal_lower_right

    calls = []
    real = kernel_decode.attention_decode_fwd
    monkeypatch.setattr(kernel_decode, "attention_decode_fwd",
                        lambda q, k, v, mask, *a: calls.append(mask) or real(q, k, v, mask, *a))
    q, k, v = _qkv(1, 2, 2, 1, 300, 32)
    bias = causal_lower_right(1, 300)
    check_sdpa(q, k, v, attn_mask=bias, dense_mask=bias._materialize())
    assert calls == [None]


def test_causal_bias_errors():
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = _qkv(1, 2, 2, 8, 16, 32)
    with pytest.raises(ValueError, match="causal bias for 8 queries and 12 keys"):
        LF.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(8, 12))
    with pytest.raises(ValueError, match="is_causal=True"):
        LF.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(8, 16),
                                        is_causal=True)


# ------------------------------------------------------------------------------------------------
# The TMA configs (tensor descriptors), forced on: the interpreter emulates the copy engine
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def tma(monkeypatch):
    """fp16/bf16 launches take tensor descriptors as on Hopper; yields a check that every kernel
    of the last call really ran a TMA config."""
    monkeypatch.setattr(common, "has_tma", lambda device: True)
    monkeypatch.setattr(common, "TMA_MIN_WORK", 0)
    # On a GPU the pruning keeps the pointer configs too (first, the default): time only the TMA
    # ones (the interpreter already runs the TMA twin alone).
    kept = common.gpu_candidates
    monkeypatch.setattr(common, "gpu_candidates", lambda configs, use_tma, meta, suits: [
        c for c in kept(configs, use_tma, meta, suits) if common.uses_tma(c)])

    def ran(*kernels):
        return all(k.best_config.kwargs["USE_TMA"] for k in kernels)

    return ran


FWD_BWD = (kernel._attention_fwd, kernel._attention_bwd_dkdv, kernel._attention_bwd_dq)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 3, 97, 97, 64), (1, 2, 113, 203, 40), (1, 2, 203, 113, 80),
                                   (2, 1, 1, 97, 96), (1, 2, 130, 67, 112)],
                         ids=lambda s: "x".join(map(str, s)))
def test_tma_sdpa(shape, is_causal, tma):
    """Rows past N and head-dim columns past D come from the copy engine's zero fill."""
    b, h, nq, nk, d = shape
    check_sdpa(*_qkv(b, h, h, nq, nk, d, dtype=torch.float16), is_causal=is_causal)
    assert tma(*FWD_BWD)


def test_tma_causal_lower_right(tma):
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = _qkv(1, 2, 2, 77, 140, 64, dtype=torch.float16)
    bias = causal_lower_right(77, 140)
    check_sdpa(q, k, v, attn_mask=bias, dense_mask=bias._materialize())
    assert tma(*FWD_BWD)


@pytest.mark.parametrize("kind", ["bool-full", "float-key-padding"])
def test_tma_gqa_mask_and_layouts(kind, tma):
    """GQA (the kv head's coordinate), masks, and q/k/v as (B, N, H, D) transposed views."""
    b, hq, hkv, nq, nk, d = 2, 6, 2, 70, 101, 48
    q = torch.randn(b, nq, hq, d, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(b, nk, hkv, d, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    v = torch.randn(b, nk, hkv, d, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    mask = _mask(kind, b, hq, nq, nk, torch.float16)
    check_sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    assert tma(*FWD_BWD)


def test_tma_dropout_equals_the_pointer_path(tma, monkeypatch):
    """The same Philox draws on both load paths: equal outputs and gradients."""
    q, k, v = _qkv(2, 2, 2, 70, 90, 32, dtype=torch.float16)
    dout = torch.randn(2, 2, 70, 32, device=DEVICE, dtype=torch.float16)
    results = []
    for use_tma in (False, True):
        monkeypatch.setattr(common, "has_tma", lambda device, use_tma=use_tma: use_tma)
        torch.manual_seed(5)
        leaves = _leaves(q, k, v)
        out = LF.scaled_dot_product_attention(*leaves, dropout_p=0.3, is_causal=True)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
        assert tma(*FWD_BWD) == use_tma
    for ptr, desc in zip(*results):
        torch.testing.assert_close(desc, ptr, rtol=0, atol=0)


def test_tma_only_where_the_copy_engine_can_address_the_tensors():
    """Descriptors need a unit-stride head dim and 16-byte aligned base and strides; a size-1
    dimension's stride does not matter. Anything else keeps the pointer configs."""
    x = torch.randn(2, 3, 5, 64, dtype=torch.float16)
    assert all(isinstance(t, common.TensorDescriptor) for t in common.descriptors(True, x, x))
    assert common.descriptors(False, x) == (x,)
    odd = torch.randn(2, 3, 5, 36, dtype=torch.float16)  # rows of 72 bytes
    shifted = torch.randn(2, 3, 5, 72, dtype=torch.float16)[..., 8:]  # base 16 B in, rows 144 B
    misaligned = torch.randn(2, 3, 5, 65, dtype=torch.float16)[..., 1:]  # base 2 bytes in
    stride0 = torch.ones(()).to(torch.float16).expand(2, 3, 5, 64)  # the gradient of out.sum()
    for bad in (odd, misaligned, stride0, x.transpose(2, 3)):
        assert common.descriptors(True, x, bad) == (x, bad)
    one = torch.randn(1, 3, 1, 64, dtype=torch.float16).as_strided((1, 3, 1, 64), (7, 64, 3, 1))
    desc = common.descriptors(True, shifted, one)
    assert [type(d) for d in desc] == [common.TensorDescriptor] * 2
    assert desc[1].strides == [192, 64, 64, 1]


# ------------------------------------------------------------------------------------------------
# Dispatch, fallbacks, registration
# ------------------------------------------------------------------------------------------------


def test_kernel_is_what_runs(monkeypatch):
    calls = []
    real_fwd, real_bwd = kernel.attention_fwd, kernel.attention_bwd
    monkeypatch.setattr(kernel, "attention_fwd", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(kernel, "attention_bwd", lambda *a: calls.append("bwd") or real_bwd(*a))
    q, k, v = _leaves(*_qkv(1, 2, 2, 9, 9, 16))
    LF.scaled_dot_product_attention(q, k, v).sum().backward()
    assert calls == ["fwd", "bwd"]


def test_float64_falls_back_to_the_reference():
    q, k, v = _leaves(*_qkv(1, 2, 2, 9, 11, 16, dtype=torch.float64))
    _dispatch._warned.discard("scaled_dot_product_attention:float64 has no kernel")
    with pytest.warns(RuntimeWarning, match="float64"):
        out = LF.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_mask_requiring_grad_falls_back_and_gets_its_gradient():
    q, k, v = _qkv(1, 2, 2, 9, 11, 16)
    mask = torch.randn(1, 2, 9, 11, device=DEVICE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = LF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    mask2 = mask.detach().requires_grad_(True)
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask2).sum().backward()
    torch.testing.assert_close(mask.grad, mask2.grad)


def test_tuning_keeps_the_configs_that_suit_the_head_dim():
    """On a GPU: every suitable config is timed (LIGHTLLM_AUTOTUNE=0: the first suitable), the TMA
    configs only when the launcher passed descriptors."""
    gpu = [common.config(128, 64, 8, 3), common.config(128, 64, 8, 2), common.config(64, 32, 4, 2)]
    tma = [common.config(128, 64, 8, 3, tma=True), common.config(64, 32, 4, 2, tma=True)]

    def kept(use_tma, item, **heads):
        meta = {"ITEM": item, "SMEM": HOPPER.smem_per_block - common.SMEM_RESERVE, **heads}
        return common.gpu_candidates([*gpu, *tma], use_tma, meta, kernel._fwd_suits)

    small, large = dict(BLOCK_D=128, BLOCK_DV=64), dict(BLOCK_D=256, BLOCK_DV=256)
    assert kept(False, 2, **small) == gpu
    assert kept(True, 2, **small) == gpu + tma
    assert kept(True, 2, **large) == gpu[1:] + tma[1:]  # wide heads: two stages at most
    # fp32 dots hold fp32 operands in registers: the smallest tiles only
    assert kept(False, 4, **small) == gpu[2:]
    # nothing suits: the last pointer config, never a TMA one
    assert common.gpu_candidates([*gpu, *tma], True, {"ITEM": 4, "SMEM": 0, **small},
                                 lambda c, meta: False) == gpu[-1:]
    # LIGHTLLM_AUTOTUNE=0 keeps the first of these: kernels._utils.autotune (tests/test__utils.py)


def _op_args(causal=False, mask=None, dropout=0.0, lower_right=False):
    q, k, v = _leaves(*_qkv(1, 2, 1, 20, 24, 16))
    seed = torch.tensor(3) if dropout else None
    return q, k, v, mask, dropout, causal, 0.25, seed, lower_right


def test_registered_ops_pass_opcheck():
    fwd, bwd = torch.ops.lightllm.sdpa_fwd.default, torch.ops.lightllm.sdpa_bwd.default
    torch.library.opcheck(fwd, _op_args())
    torch.library.opcheck(fwd, _op_args(causal=True, dropout=0.2))
    torch.library.opcheck(fwd, _op_args(causal=True, lower_right=True))
    mask = torch.rand(1, 1, 20, 24, device=DEVICE) > 0.3
    torch.library.opcheck(fwd, _op_args(mask=mask))
    for lower_right in (False, True):
        q, k, v, _, p, causal, scale, seed, _ = _op_args(causal=True, dropout=0.2)
        out, lse = torch.ops.lightllm.sdpa_fwd(q.detach(), k.detach(), v.detach(), None, p,
                                               causal, scale, seed, lower_right)
        dout = torch.randn_like(out)
        torch.library.opcheck(bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, None, p,
                                    causal, scale, seed, lower_right))


def test_torch_compile_fullgraph():
    def block(q, k, v, mask):
        return LF.scaled_dot_product_attention(q, k, v, attn_mask=mask).sigmoid() * 2

    compiled = torch.compile(block, fullgraph=True)
    q, k, v = _leaves(*_qkv(1, 2, 2, 12, 20, 16))
    mask = torch.rand(1, 1, 1, 20, device=DEVICE) > 0.2
    out = compiled(q, k, v, mask)
    out.sum().backward()
    q2, k2, v2 = _leaves(q, k, v)
    expected = block(q2, k2, v2, mask)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 4, 8).half(),
                                                 _x(1, 2, 4, 8)), TypeError, "dtype"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 4, 8).to("meta"),
                                                 _x(1, 2, 4, 8)), RuntimeError, "device"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 4, 8), _x(1, 2, 4, 8),
                                                 attn_mask=_x(4, 4).to("meta")),
         RuntimeError, "device"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 4, 16),
                                                 _x(1, 2, 4, 8)), ValueError, "key head dim"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 5, 8),
                                                 _x(1, 2, 4, 8)), ValueError, "value has 4"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 5, 8), _x(1, 2, 5, 8),
                                                 attn_mask=_x(1, 2, 4, 4) > 0),
         ValueError, "attn_mask .* not broadcastable"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 5, 8), _x(1, 2, 5, 8),
                                                 attn_mask=torch.ones(4, 5, dtype=torch.int32)),
         TypeError, "attn_mask must be bool"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 6, 4, 8), _x(1, 4, 5, 8), _x(1, 4, 5, 8),
                                                 enable_gqa=True), ValueError, "must divide"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 6, 4, 8), _x(1, 2, 5, 8), _x(1, 2, 5, 8)),
         ValueError, "enable_gqa=True"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 6, 4, 8), _x(1, 2, 5, 8), _x(1, 3, 5, 8),
                                                 enable_gqa=True), ValueError, "value has 3 heads"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 300), _x(1, 2, 4, 300),
                                                 _x(1, 2, 4, 300)), ValueError, "head dim 300"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 64), _x(1, 2, 4, 64),
                                                 _x(1, 2, 4, 512)), ValueError, "unsupported"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 4, 8), _x(1, 2, 4, 8),
                                                 attn_mask=_x(4, 4) > 0, is_causal=True),
         ValueError, "is_causal"),
        (lambda: LF.scaled_dot_product_attention(_x(1, 2, 4, 8), _x(1, 2, 4, 8), _x(1, 2, 4, 8),
                                                 dropout_p=1.5), ValueError, "dropout_p"),
        (lambda: LF.scaled_dot_product_attention(_x(3, 4, 8), _x(2, 2, 4, 8), _x(2, 2, 4, 8)),
         ValueError, "query has 3 heads"),
        (lambda: LF.scaled_dot_product_attention(_x(2, 2, 4, 8), _x(3, 2, 4, 8), _x(3, 2, 4, 8)),
         ValueError, "batch dimensions of key"),
        (lambda: LF.scaled_dot_product_attention(_x(8), _x(8), _x(8)), ValueError,
         "at least 2 dimensions"),
        (lambda: LF.scaled_dot_product_attention(_x(2, 4, 8).long(), _x(2, 4, 8), _x(2, 4, 8)),
         TypeError, "query must have dtype"),
        (lambda: LF.scaled_dot_product_attention([1.0], _x(2, 4, 8), _x(2, 4, 8)), TypeError,
         "torch.Tensor"),
        (lambda: LF.scaled_dot_product_attention(_x(2, 4, 8), _x(2, 4, 8), _x(2, 4, 8),
                                                 attn_mask=[[True]]), TypeError, "attn_mask"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("is_causal, gqa", [(False, False), (True, True)])
def test_backward_is_bitwise_deterministic_on_gpu(is_causal, gqa):
    b, hq, nq, d = 2, 8, 1000, 128
    q, k, v = _leaves(*_qkv(b, hq, 2 if gqa else hq, nq, nq, d, dtype=torch.bfloat16))
    dout = torch.randn(b, hq, nq, d, device="cuda", dtype=torch.bfloat16)

    def grads():
        out = LF.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)
        return torch.autograd.grad(out, (q, k, v), dout)

    first = grads()
    for _ in range(50):
        assert all(torch.equal(a, g) for a, g in zip(first, grads()))


@pytest.mark.cuda
def test_int64_offsets_on_gpu():
    """More than 2^31 elements per tensor: batch/head offsets must be 64-bit."""
    b, h, n, d = 2**31 // (1024 * 128) + 2, 1, 1024, 128
    try:
        q, k, v = _qkv(b, h, h, n, n, d, dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for three 2^31-element tensors")
    out = LF.scaled_dot_product_attention(q, k, v, is_causal=True)
    tail = slice(b - 2, b)
    expected = F.scaled_dot_product_attention(q[tail], k[tail], v[tail], is_causal=True)
    torch.testing.assert_close(out[tail], expected, atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_sequences_on_gpu(dtype):
    check_sdpa(*_qkv(1, 4, 4, 4097, 4097, 128, dtype=dtype), is_causal=True)
    check_sdpa(*_qkv(2, 8, 2, 1031, 2053, 64, dtype=dtype), enable_gqa=True)
