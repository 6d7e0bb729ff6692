"""flash_attn_varlen_func (packed variable-length batches) and the window_size keyword of
scaled_dot_product_attention: parity with the float64 reference (outputs, lse, gradients through a
random projection), odd and empty lengths, bottom-right causal alignment, GQA, Dv != D, windows,
dropout with the kernel's own keep-mask, skipped tiles, registration, the native CPU path, errors.

The yardstick of each parity check is PyTorch's own attention in the test dtype, one sequence at a
time. In the interpreter shapes stay small (lengths <= ~300, head dims 16-40).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, dtype_params
from torch.nn.attention.bias import causal_lower_right

import lightllm.functional as LF
from lightllm import _dispatch
from lightllm.kernels import attention as kernel
from lightllm.ops import attention as op
from lightllm.reference import attention as reference
from lightllm.testing import assert_parity, leaves


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def _packed(lq, lk, h, hkv, d, dv=None, dtype=torch.float32):
    q = torch.randn(sum(lq), h, d, device=DEVICE, dtype=dtype)
    k = torch.randn(sum(lk), hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(sum(lk), hkv, dv or d, device=DEVICE, dtype=dtype)
    return q, k, v, _cu(lq), _cu(lk)


def _torch_varlen(q, k, v, cu_q, cu_k, causal=False, window=(-1, -1), scale=None):
    """PyTorch's own SDPA per sequence (the error budget), the band as a boolean mask."""
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for s in range(len(cq) - 1):
        qs = q[cq[s]:cq[s + 1]].transpose(0, 1)
        ks, vs = k[ck[s]:ck[s + 1]].transpose(0, 1), v[ck[s]:ck[s + 1]].transpose(0, 1)
        if ks.shape[1] == 0:
            outs.append(q.new_zeros(qs.shape[1], q.shape[1], v.shape[-1]))
            continue
        mask = reference.window_mask(qs.shape[1], ks.shape[1], window, causal, device=q.device)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, mask, scale=scale,
                                                   enable_gqa=True).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(0, q.shape[1], v.shape[-1])


def check_varlen(lq, lk, h, hkv, d, dv=None, dtype=torch.float32, causal=False, window=(-1, -1),
                 scale=None):
    """Output, lse and dQ/dK/dV of lightllm vs float64, PyTorch per sequence as the budget."""
    q, k, v, cu_q, cu_k = _packed(lq, lk, h, hkv, d, dv, dtype)
    args = (cu_q, cu_k, max(lq, default=0), max(lk, default=0))
    kw = dict(softmax_scale=scale, causal=causal, window_size=window)
    ours = leaves(q, k, v)
    out, lse = LF.flash_attn_varlen_func(*ours, *args, **kw, return_lse=True)
    ref = leaves(q, k, v, dtype=torch.float64)
    out_ref, lse_ref = reference.flash_attn_varlen_func(*ref, *args, **kw, return_lse=True)
    theirs = leaves(q, k, v)
    out_torch = _torch_varlen(*theirs, cu_q, cu_k, causal, window, scale)
    assert out.shape == out_torch.shape and out.dtype == dtype
    assert lse.dtype == torch.float32 and lse.shape == (h, sum(lq))
    assert_parity(out, out_ref, out_torch, name="out")
    assert torch.equal(lse.isinf(), lse_ref.isinf()), "rows without keys: lse must be +inf"
    finite = lse_ref.isfinite()
    torch.testing.assert_close(lse[finite], lse_ref[finite].float(), atol=2e-3, rtol=1e-3)
    if not out_torch.requires_grad:
        return out
    r = torch.randn_like(out)
    for name, g, g_ref, g_torch in zip(
        ("dq", "dk", "dv"),
        torch.autograd.grad((out * r).sum(), ours),
        torch.autograd.grad((out_ref * r.double()).sum(), ref),
        torch.autograd.grad((out_torch * r).sum(), theirs),
    ):
        assert_parity(g, g_ref, g_torch, grad=True, name=name)
    return out


# (lengths q, lengths k, H, Hkv, D, Dv, causal, window)
CASES = {
    "odd-lengths": ([0, 1, 7, 37, 113], [0, 1, 7, 37, 113], 2, 2, 32, None, False, (-1, -1)),
    "causal-square": ([1, 7, 37, 113], [1, 7, 37, 113], 2, 1, 16, None, True, (-1, -1)),
    "causal-q<k-gqa": ([1, 7, 37, 20], [5, 7, 80, 113], 4, 2, 16, None, True, (-1, -1)),
    "causal-q>k": ([9, 40, 3], [3, 17, 0], 2, 2, 16, None, True, (-1, -1)),
    "dv-differs": ([13, 50], [29, 71], 3, 1, 16, 40, False, (-1, -1)),
    "window-causal-left": ([200, 61, 1], [200, 130, 90], 2, 1, 16, None, True, (40, -1)),
    "window-both": ([150, 33], [150, 170], 2, 2, 16, None, False, (30, 9)),
    "window-right-only": ([97, 5], [140, 5], 2, 1, 16, None, False, (-1, 20)),
    "window-zero": ([70, 3], [70, 9], 2, 2, 16, None, False, (0, 0)),
}


@pytest.mark.parametrize("case", CASES)
def test_varlen(case):
    lq, lk, h, hkv, d, dv, causal, window = CASES[case]
    check_varlen(lq, lk, h, hkv, d, dv, causal=causal, window=window)


@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16))
@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (True, (24, -1))])
def test_varlen_half(causal, window, dtype):
    check_varlen([31, 0, 90], [45, 2, 90], 4, 2, 32, dtype=dtype, causal=causal, window=window)


def test_varlen_scale_and_single_token_sequences():
    check_varlen([1] * 6, [1, 2, 3, 4, 5, 6], 2, 2, 16, scale=0.3, causal=True)


def test_varlen_empty_batch_and_empty_sequences():
    for lq, lk in (([], []), ([0, 0], [0, 0]), ([0, 3], [4, 0])):
        q, k, v, cu_q, cu_k = _packed(lq, lk, 2, 1, 16)
        ours = leaves(q, k, v)
        out, lse = LF.flash_attn_varlen_func(*ours, cu_q, cu_k, max(lq, default=0),
                                             max(lk, default=0), causal=True, return_lse=True)
        assert out.shape == (sum(lq), 2, 16) and lse.shape == (2, sum(lq))
        assert (out == 0).all() and (lse == float("inf")).all()
        if out.numel():
            dq, dk, dv = torch.autograd.grad(out.sum(), ours, allow_unused=True)
            assert dq is None or (dq == 0).all()


def test_window_tiles_are_skipped():
    """Keys in tiles wholly left of the window are never read: NaN there cannot leak. 50 queries
    at the end of 400 keys (bottom-right) with left = 30 see keys 320..399; every config's tiles
    (<= 128 keys) below 256 lie wholly outside."""
    q, k, v, cu_q, cu_k = _packed([50], [400], 2, 1, 16)
    k_clean, v_clean = k.clone(), v.clone()
    k[:256], v[:256] = float("nan"), float("nan")
    ours = leaves(q, k, v)
    out = LF.flash_attn_varlen_func(*ours, cu_q, cu_k, 50, 400, causal=True, window_size=(30, -1))
    expected = reference.flash_attn_varlen_func(q.double(), k_clean.double(), v_clean.double(),
                                                cu_q, cu_k, causal=True, window_size=(30, -1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    dq, dk, dv = torch.autograd.grad(out.sum(), ours)
    assert torch.isfinite(dq).all() and (dk[:256] == 0).all() and (dv[:256] == 0).all()


@pytest.mark.parametrize("p", [0.2])
def test_varlen_dropout_matches_reference_with_the_same_mask(p):
    """Sequence s, head h draws the keep-mask of (batch s, head h) of ``dropout_keep_mask`` at
    its own (query, key) positions; output and gradients agree with the reference fed it."""
    lq, lk, h, hkv = [30, 0, 57], [41, 5, 57], 2, 1
    q, k, v, cu_q, cu_k = _packed(lq, lk, h, hkv, 16)
    torch.manual_seed(99)
    ours = leaves(q, k, v)
    out = LF.flash_attn_varlen_func(*ours, cu_q, cu_k, max(lq), max(lk), dropout_p=p, causal=True,
                                    window_size=(20, -1))
    torch.manual_seed(99)
    seed = int(op.dropout_seed())
    keep = kernel.dropout_keep_mask(len(lq), h, max(lq), max(lk), p, seed, DEVICE)
    r = torch.randn_like(out)
    grads = torch.autograd.grad((out * r).sum(), ours)
    for dtype in (torch.float64, torch.float32):
        ref = leaves(q, k, v, dtype=dtype)
        outs = []
        for s in range(len(lq)):
            a, b, c, e = cu_q[s].item(), cu_q[s + 1].item(), cu_k[s].item(), cu_k[s + 1].item()
            qs, ks, vs = (t.transpose(0, 1) for t in (ref[0][a:b], ref[1][c:e], ref[2][c:e]))
            mask = reference.window_mask(b - a, e - c, (20, -1), True, device=DEVICE)
            outs.append(reference.scaled_dot_product_attention(
                qs, ks, vs, mask, p, enable_gqa=True,
                dropout_mask=keep[s, :, :b - a, :e - c]).transpose(0, 1))
        out_r = torch.cat(outs)
        g_r = torch.autograd.grad((out_r * r.to(dtype)).sum(), ref)
        if dtype is torch.float64:
            out_ref, g_ref = out_r, g_r
        else:
            assert_parity(out, out_ref, out_r, name="out")
            for name, g, gr, gl in zip(("dq", "dk", "dv"), grads, g_ref, g_r):
                assert_parity(g, gr, gl, grad=True, name=name)


@pytest.mark.parametrize("case", ["odd-lengths", "causal-q>k", "dv-differs", "window-both",
                                  "causal-q<k-gqa"])
def test_native_cpu_path_equals_reference(case):
    lq, lk, h, hkv, d, dv, causal, window = CASES[case]
    q, k, v, cu_q, cu_k = _packed(lq, lk, h, hkv, d, dv)
    q, k, v, cu_q, cu_k = (t.cpu() for t in (q, k, v, cu_q, cu_k))
    args = (cu_q, cu_k, max(lq), max(lk))
    kw = dict(causal=causal, window_size=window, return_lse=True)
    ours = leaves(q, k, v)
    with _dispatch.native_cpu():
        out, lse = LF.flash_attn_varlen_func(*ours, *args, **kw)
    ref = leaves(q, k, v, dtype=torch.float64)
    out_ref, lse_ref = reference.flash_attn_varlen_func(*ref, *args, **kw)
    torch.testing.assert_close(out.double(), out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref.float(), atol=1e-4, rtol=1e-5)
    r = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad((out * r).sum(), ours),
                        torch.autograd.grad((out_ref * r.double()).sum(), ref)):
        torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*float64 has no kernel")
def test_float64_runs_pytorch_per_sequence():
    q, k, v, cu_q, cu_k = _packed([5, 9], [7, 9], 2, 2, 8, dtype=torch.float64)
    out = LF.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 9, 9, causal=True)
    torch.testing.assert_close(out, reference.flash_attn_varlen_func(q, k, v, cu_q, cu_k,
                                                                     causal=True))


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------


def test_varlen_ops_pass_opcheck():
    q, k, v, cu_q, cu_k = _packed([5, 0, 12], [9, 3, 12], 2, 1, 16)
    fwd, bwd = torch.ops.lightllm.varlen_fwd.default, torch.ops.lightllm.varlen_bwd.default
    q, k, v = leaves(q, k, v)
    for causal, (wl, wr), p in ((True, (4, -1), 0.2),):
        seed = torch.tensor([3], device=DEVICE) if p else None
        args = (q, k, v, cu_q, cu_k, 12, 12, p, causal, 0.25, wl, wr, seed)
        torch.library.opcheck(fwd, args)
        out, lse = fwd(*(t.detach() if isinstance(t, torch.Tensor) else t for t in args))
        torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                    out, lse, cu_q, cu_k, 12, 12, p, causal, 0.25, wl, wr, seed))


def test_varlen_torch_compile_fullgraph():
    def block(q, k, v, cu_q, cu_k):
        out = LF.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20, causal=True,
                                        window_size=(6, -1))
        return out.sigmoid() * 2

    q, k, v, cu_q, cu_k = _packed([7, 20], [11, 20], 2, 2, 16)
    ours, eager = leaves(q, k, v), leaves(q, k, v)
    out = torch.compile(block, fullgraph=True)(*ours, cu_q, cu_k)
    out.sum().backward()
    expected = block(*eager, cu_q, cu_k)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _bad(**over):
    q, k, v, cu_q, cu_k = _packed([3, 4], [3, 4], 2, 1, 8)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=4,
                max_seqlen_k=4)
    args.update(over)
    return lambda: LF.flash_attn_varlen_func(**args)


# The values of cu_seqlens are checked only where that costs no device sync.
_CPU_VALUES = pytest.mark.skipif(DEVICE != "cpu", reason="cu_seqlens values are read on CPU only")


def _i32(*xs):
    return torch.tensor(xs, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("call, error, match", [
    (_bad(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (_bad(k=torch.randn(7, 1, 8, dtype=torch.float16, device=DEVICE)), TypeError, "one dtype"),
    (_bad(v=torch.zeros(7, 1, 8, dtype=torch.int64, device=DEVICE)), TypeError, "v must have dtype"),
    (_bad(q=torch.randn(1, 7, 2, 8, device=DEVICE)), ValueError, "q must be 3-D"),
    (_bad(k=torch.randn(7, 1, 16, device=DEVICE)), ValueError, "k head dim 16"),
    (_bad(v=torch.randn(6, 1, 8, device=DEVICE)), ValueError, "v has shape"),
    (_bad(q=torch.randn(7, 3, 8, device=DEVICE), k=torch.randn(7, 2, 8, device=DEVICE),
          v=torch.randn(7, 2, 8, device=DEVICE)), ValueError, "must divide"),
    (_bad(q=torch.randn(7, 2, 300, device=DEVICE), k=torch.randn(7, 1, 300, device=DEVICE),
          v=torch.randn(7, 1, 300, device=DEVICE)), ValueError, "head dim 300"),
    (_bad(cu_seqlens_q=_i32(0, 3, 7).long()), TypeError, "cu_seqlens_q must be int32"),
    (_bad(cu_seqlens_k=_i32(0, 3, 7)[None]), ValueError, "cu_seqlens_k must be 1-D"),
    (_bad(cu_seqlens_q=_i32()), ValueError, "cu_seqlens_q must be 1-D"),
    (_bad(cu_seqlens_q=_i32(0, 7)), ValueError, "batch \\+ 1"),
    (_bad(cu_seqlens_q=[0, 3, 7]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    (_bad(cu_seqlens_k=_i32(0, 3, 7).to("meta")), RuntimeError, "one device"),
    pytest.param(_bad(cu_seqlens_q=_i32(1, 3, 7)), ValueError, "must start at 0", marks=_CPU_VALUES),
    pytest.param(_bad(cu_seqlens_k=_i32(0, 5, 3)), ValueError, "non-decreasing", marks=_CPU_VALUES),
    pytest.param(_bad(cu_seqlens_q=_i32(0, 3, 6)), ValueError, "q has 7 tokens", marks=_CPU_VALUES),
    pytest.param(_bad(cu_seqlens_k=_i32(0, 1, 7)), ValueError, "longer than max_seqlen_k", marks=_CPU_VALUES),
    (_bad(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    (_bad(max_seqlen_k=2.5), ValueError, "max_seqlen_k"),
    (_bad(dropout_p=1.5), ValueError, "dropout_p"),
    (_bad(softmax_scale="x"), TypeError, "softmax_scale"),
    (_bad(window_size=(3,)), TypeError, "window_size"),
    (_bad(window_size=(1.5, 0)), TypeError, "window_size"),
])
def test_varlen_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# scaled_dot_product_attention(..., window_size=...)
# ------------------------------------------------------------------------------------------------


def _qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype),
            torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype),
            torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype))


def check_sdpa_window(q, k, v, window, is_causal=False, lower_right=False, attn_mask=None,
                      enable_gqa=False):
    nq, nk = q.shape[-2], k.shape[-2]
    band = reference.window_mask(nq, nk, window, is_causal or lower_right,
                                 shift=nk - nq if lower_right else 0, device=q.device)
    dense = band if attn_mask is None else attn_mask & band
    mask = causal_lower_right(nq, nk) if lower_right else attn_mask
    ours = leaves(q, k, v)
    out = LF.scaled_dot_product_attention(*ours, attn_mask=mask, is_causal=is_causal and not
                                          lower_right, enable_gqa=enable_gqa, window_size=window)
    ref = leaves(q, k, v, dtype=torch.float64)
    out_ref = reference.scaled_dot_product_attention(*ref, attn_mask=dense, enable_gqa=enable_gqa)
    theirs = leaves(q, k, v)
    out_torch = F.scaled_dot_product_attention(*theirs, attn_mask=dense, enable_gqa=enable_gqa)
    assert_parity(out, out_ref, out_torch, name="out")
    r = torch.randn_like(out)
    for name, g, g_ref, g_torch in zip(
        ("dq", "dk", "dv"), torch.autograd.grad((out * r).sum(), ours),
        torch.autograd.grad((out_ref * r.double()).sum(), ref),
        torch.autograd.grad((out_torch * r).sum(), theirs),
    ):
        assert_parity(g, g_ref, g_torch, grad=True, name=name)


SDPA_WINDOWS = [
    # (nq, nk, window, is_causal, lower_right)
    (150, 150, (32, -1), True, False),
    (97, 203, (20, 50), False, False),
    (130, 67, (-1, 10), False, False),
    (61, 260, (45, -1), True, True),
]


@pytest.mark.parametrize("native", [False, True], ids=["kernel", "native"])
@pytest.mark.parametrize("shape", SDPA_WINDOWS, ids=lambda s: f"{s[0]}x{s[1]}-{s[2]}-{s[3]}{s[4]}")
def test_sdpa_window(shape, native):
    nq, nk, window, is_causal, lower_right = shape
    q, k, v = _qkv(1, 2, 1, nq, nk, 16)
    if native:
        q, k, v = q.cpu(), k.cpu(), v.cpu()
        with _dispatch.native_cpu():
            check_sdpa_window(q, k, v, window, is_causal, lower_right, enable_gqa=True)
    else:
        check_sdpa_window(q, k, v, window, is_causal, lower_right, enable_gqa=True)


@pytest.mark.parametrize("nq", [1, 16])
def test_sdpa_window_decode_shapes_run_the_flash_kernel(nq, monkeypatch):
    """1-16 queries over >= 256 keys take the split-KV decode without a window; with one, the
    flash kernel, which honours it (forward and backward)."""
    from lightllm.kernels import attention_decode as decode

    called = []
    real = decode.attention_decode_fwd
    monkeypatch.setattr(decode, "attention_decode_fwd", lambda *a: called.append(1) or real(*a))
    q, k, v = _qkv(2, 2, 2, nq, 300, 16)
    mask = torch.rand(2, 1, 1, 300, device=DEVICE) > 0.2
    check_sdpa_window(q, k, v, (40, 3), attn_mask=mask)
    assert not called


def test_sdpa_window_errors():
    q, k, v = _qkv(1, 1, 1, 4, 4, 8)
    with pytest.raises(TypeError, match="window_size"):
        LF.scaled_dot_product_attention(q, k, v, window_size=(1, 2, 3))
    with pytest.raises(TypeError, match="window_size"):
        LF.scaled_dot_product_attention(q, k, v, window_size=None)
