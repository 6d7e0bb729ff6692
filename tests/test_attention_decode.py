"""The split-KV decode path of scaled_dot_product_attention (1-16 queries over >= 256 keys).

Checked three ways: through the public function against the float64 reference with PyTorch's SDPA
in the test dtype as the budget (so dispatch, output and the backward from the decode path's
log-sum-exp are covered); against the main flash kernel on the same inputs (out and lse); and with
forced split counts, including chunks where nothing is visible. Routing: what the path does not
serve goes to the main kernel.
"""

import math

import pytest
import torch
from conftest import DEVICE, dtype_params
from test_attention import _qkv, check_sdpa

import lightllm.functional as LF
from lightllm.kernels import attention as kernel
from lightllm.kernels import attention_decode as decode
from lightllm.kernels._utils import sm_count


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts forward launches of the decode path (and still runs it)."""
    calls = []
    real = decode.attention_decode_fwd
    monkeypatch.setattr(decode, "attention_decode_fwd",
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    return calls


# (B, Hq, Hkv, Nq, Nk, D, Dv)
CASES = [
    (1, 4, 4, 1, 256, 64, 64),
    (2, 8, 2, 1, 1000, 128, 128),
    (1, 6, 2, 3, 517, 80, 48),
    (2, 4, 1, 16, 300, 40, 40),
    (1, 8, 1, 12, 300, 32, 32),  # 96 (head, token) rows: two row blocks per kv head
    (1, 2, 2, 5, 2053, 96, 96),
]


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_decode_parity(case, dtype, decode_calls):
    b, hq, hkv, nq, nk, d, dv = case
    check_sdpa(*_qkv(b, hq, hkv, nq, nk, d, dv, dtype=dtype), enable_gqa=hq != hkv)
    assert len(decode_calls) == 1


def _padding_mask(b, nk, kind, dtype):
    lengths = torch.tensor([nk - 37, 0, nk][:b], device=DEVICE)  # the second sequence is empty
    keep = torch.arange(nk, device=DEVICE)[None, :] < lengths[:, None]
    keep = keep[:, None, None, :]
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_decode_key_padding(kind, dtype, decode_calls):
    """KV-cache batches of different lengths; an empty sequence gives 0 (and gradient 0)."""
    q, k, v = _qkv(2, 4, 2, 2, 400, 64, dtype=dtype)
    mask = _padding_mask(2, 400, kind, dtype)
    out = check_sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert decode_calls


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
def test_decode_full_and_offset_causal_masks(dtype, decode_calls):
    """A per-head additive mask, and the bottom-right causal mask a KV cache passes for several
    new tokens (query i sits at position Nk - Nq + i)."""
    b, h, nq, nk = 1, 3, 6, 333
    q, k, v = _qkv(b, h, h, nq, nk, 32, dtype=dtype)
    check_sdpa(q, k, v, attn_mask=torch.randn(b, h, nq, nk, device=DEVICE, dtype=dtype))
    pos = torch.arange(nk, device=DEVICE)
    offset_causal = pos[None, :] <= (nk - nq + torch.arange(nq, device=DEVICE))[:, None]
    check_sdpa(q, k, v, attn_mask=offset_causal)
    assert len(decode_calls) == 2


def test_decode_reads_a_kv_cache_in_place(decode_calls):
    """K/V as the filled prefix of a preallocated cache, in (B, H, L, D) and in (B, L, H, D)."""
    b, h, lmax, n, d = 2, 4, 700, 450, 64
    q = torch.randn(b, h, 1, d, device=DEVICE)
    cache_bhld = torch.randn(2, b, h, lmax, d, device=DEVICE)
    check_sdpa(q, cache_bhld[0, :, :, :n], cache_bhld[1, :, :, :n])
    cache_blhd = torch.randn(2, b, lmax, h, d, device=DEVICE)
    k, v = (c[:, :n].transpose(1, 2) for c in cache_blhd)
    check_sdpa(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)
    assert len(decode_calls) == 2


@pytest.mark.parametrize("splits", [1, 2, 5, 40])
def test_forced_split_counts_match_the_main_kernel(splits):
    """Any chunking gives the main kernel's out and lse; with a mask that hides whole chunks."""
    b, hq, hkv, nq, nk, d = 2, 4, 2, 3, 1500, 64
    q, k, v = _qkv(b, hq, hkv, nq, nk, d)
    keep = torch.rand(b, 1, nq, nk, device=DEVICE) > 0.5
    keep[:, :, :, 256:1300] = False  # several chunks see nothing at all
    keep[1, :, 2] = False  # and one row sees nothing anywhere
    for mask in (None, keep):
        out, lse = decode.attention_decode_fwd(q, k, v, mask, 1 / math.sqrt(d), num_splits=splits)
        out_main, lse_main = kernel.attention_fwd(q, k, v, mask, 1 / math.sqrt(d), False, 0.0, 0)
        torch.testing.assert_close(out, out_main, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, lse_main, atol=2e-6, rtol=1e-5)
    assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))
    assert torch.isinf(lse[1, :, 2]).all() and (lse[1, :, 2] > 0).all()


def test_split_count_fills_the_gpu():
    sms = sm_count(torch.empty(0, device=DEVICE))
    for programs, nk in [(1, 32768), (8, 4096), (64, 1024), (1000, 100000), (3, 256)]:
        # one query, one head per batch entry: one program per chunk and batch entry
        splits, chunk, _, row_blocks, _, _ = decode._plan(programs, 1, 1, 1, nk, 64, 64, sms, None)
        assert row_blocks == 1
        assert chunk % decode.SPLIT_ALIGN == 0 and splits * chunk >= nk > (splits - 1) * chunk
        assert splits == 1 or programs * (splits - 1) < 2 * sms


@pytest.mark.parametrize(
    "nq, nk, kwargs, decodes",
    [
        (1, 256, {}, True),
        (16, 4096, {}, True),
        (17, 4096, {}, False),  # too many queries
        (1, 255, {}, False),  # too few keys
        (4, 1000, {"is_causal": True}, False),  # top-left causal: the main kernel's skipping
        (4, 1000, {"dropout_p": 0.2}, False),  # dropout lives in the main kernel
    ],
)
def test_routing(nq, nk, kwargs, decodes, decode_calls):
    assert decode.use_split_kv(nq, nk, kwargs.get("is_causal", False),
                               kwargs.get("dropout_p", 0.0)) == decodes
    q, k, v = _qkv(1, 1, 1, nq, nk, 16)
    LF.scaled_dot_product_attention(q, k, v, **kwargs)
    assert bool(decode_calls) == decodes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_cache_on_gpu(dtype):
    check_sdpa(*_qkv(2, 32, 8, 1, 32768, 128, dtype=dtype), enable_gqa=True)
    check_sdpa(*_qkv(1, 8, 8, 16, 5000, 64, dtype=dtype))
