"""The split-KV decode path of scaled_dot_product_attention (1-16 queries over >= 256 keys).

Checked three ways: through the public function against the float64 reference with PyTorch's SDPA
in the test dtype as the budget (so dispatch, output and the backward from the decode path's
log-sum-exp are covered); against the main flash kernel on the same inputs (out and lse); and with
forced split counts, including chunks where nothing is visible. Routing: what the path does not
serve goes to the main kernel.
"""

import dataclasses
import math

import pytest
import torch
from conftest import DEVICE, dtype_params
from test_attention import _qkv, check_sdpa

import lightllm.functional as LF
from lightllm.kernels import attention as kernel
from lightllm.kernels import attention_decode as decode
from lightllm.kernels._device import HOPPER
from lightllm.ops import attention as op


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
    (1, 12, 3, 9, 777, 112, 112),  # 36 rows in a 64-row block (wgmma on sm_90), 4 chunks here
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


def _slots(sms, d, item):
    meta = dict(BLOCK_D=d, BLOCK_DV=d, BLOCK_M=16, ITEM=item)
    return sms * decode.ctas_per_sm(decode.default_config(meta), meta, HOPPER)


def _blocks(nk):
    return math.ceil(nk / decode.SPLIT_ALIGN)


def _plan(b, hq, hkv, nq, nk, d, item=2, sms=132, num_splits=None):
    return decode.plan(b, hq, hkv, nq, _blocks(nk), d, d, item,
                        dataclasses.replace(HOPPER, sms=sms), num_splits)


def _two_wave_splits(programs, sms, nk):
    """The split count of the two-wave rule: about 2 x SMs programs."""
    return decode.chunking(_blocks(nk), max(1, min(math.ceil(2 * sms / programs), _blocks(nk))))[0]


def test_programs_per_sm_from_the_config():
    """Registers at 256 a thread: one 8-warp or two 4-warp programs; else shared memory."""
    meta = dict(BLOCK_D=128, BLOCK_DV=128, BLOCK_M=16, ITEM=2)
    assert decode.default_config(meta).num_warps == 8
    assert decode.ctas_per_sm(decode.default_config(meta), meta, HOPPER) == 1
    assert decode.ctas_per_sm(decode._cfg(64, 4, 2), meta, HOPPER) == 2  # 32 KiB staged
    assert decode.ctas_per_sm(decode._cfg(128, 4, 3), meta, HOPPER) == 1  # 128 KiB staged
    narrow = dict(meta, BLOCK_D=64, BLOCK_DV=64)
    assert decode.ctas_per_sm(decode._cfg(64, 1, 2), narrow, HOPPER) == 8
    assert decode.ctas_per_sm(decode._cfg(64, 1, 3), meta, HOPPER) == 3  # 64 KiB staged of 227


def test_wave_splits_on_an_h200():
    """Real numbers for 132 SMs, head dim 128, bf16 (one 8-warp program an SM)."""
    slots = _slots(132, 128, 2)
    assert slots == 132
    # batch 1, 8 kv heads, group 4, one token, 4096 keys: 16 blocks cannot make a wave of 8 x S;
    # every chunk (both rules), 128 of 132 slots busy
    splits, chunk, _, row_blocks, _, _ = _plan(1, 32, 8, 1, 4096, 128)
    assert (splits, chunk, row_blocks) == (16, 256, 1) == (_two_wave_splits(8, 132, 4096), 256, 1)
    assert decode.wave_efficiency(8 * splits, slots) == pytest.approx(128 / 132)
    # batch 3: 24 programs. Two waves' worth asks 11 chunks, realised as 8 of 512 keys: 192
    # programs in 2 waves; 16 chunks fill 3 waves to 384 / 396
    assert _two_wave_splits(24, 132, 4096) == 8
    assert _plan(3, 32, 8, 1, 4096, 128)[0] == 16
    assert decode.wave_efficiency(24 * 8, slots) == pytest.approx(192 / 264)
    assert decode.wave_efficiency(24 * 16, slots) == pytest.approx(384 / 396)
    # batch 8 over 5000 keys (20 blocks): 5 chunks make 320 programs in 3 waves; 4 make 256 in 2
    assert _two_wave_splits(64, 132, 5000) == 5
    assert _plan(8, 32, 8, 1, 5000, 128)[0] == 4
    # a group of 8 x 8 tokens fills a 64-row block: as many programs as with one token
    assert _plan(1, 64, 8, 8, 32768, 128)[:4] == (32, 1024, 64, 1)


def test_wave_splits_rules():
    # one full wave already at one chunk: no split at all
    assert decode.wave_splits(132, 132, 16) == 1
    # keys allow no full wave (8 x 16 < 132): every chunk there is
    assert decode.wave_splits(8, 132, 16) == 16
    # at least a wave: 17 chunks would be 136 programs (52 % busy), but 17 is no count of 256-key
    # blocks; of the counts 19, 22, 26, 32, 43, 64, 128 the fewest at 97 % is 32
    assert decode.wave_splits(8, 132, 128) == 32
    # efficiencies within WAVE_SLACK count as equal: 256 programs fill 2 waves to 97 %; 19
    # chunks reach 99.6 %, more than the slack better
    assert decode.wave_efficiency(256, 132) == pytest.approx(256 / 264)
    assert decode.wave_splits(256, 132, 128) == 19
    assert decode.wave_splits(256, 132, 8) == 1  # 8 blocks: no count beats 97 % by the slack


@pytest.mark.parametrize("nk", [256, 257, 1000, 4096, 5000, 32768, 100_000])
def test_wave_splits_are_realised_exactly(nk):
    """``wave_splits`` picks among the chunk counts ``_chunking`` makes, so the plan runs it."""
    blocks = _blocks(nk)
    for programs in (1, 7, 24, 64, 130, 256, 1000):
        for slots in (4, 132, 264):
            splits = decode.wave_splits(programs, slots, blocks)
            count, chunk = decode.chunking(blocks, splits)
            assert count == splits and chunk % decode.SPLIT_ALIGN == 0
            assert splits * chunk >= nk > (splits - 1) * chunk


def test_wave_efficiency_at_least_the_two_wave_rule():
    """On a grid of decode shapes and GPUs the chosen split count keeps at least as many slots
    busy as the two-wave rule, and strictly more on some."""
    better = same = 0
    for sms in (132, 114, 78):
        for d, item in ((64, 2), (128, 2), (128, 4)):
            slots = _slots(sms, d, item)
            for b in (1, 2, 3, 8, 32, 64):
                for hkv, group in ((1, 1), (2, 4), (8, 4), (8, 8)):
                    for nq in (1, 4, 8, 16):
                        for nk in (256, 1000, 4096, 5000, 32768, 131072):
                            splits, _, _, row_blocks, _, _ = _plan(
                                b, hkv * group, hkv, nq, nk, d, item, sms)
                            programs = b * hkv * row_blocks
                            chosen = decode.wave_efficiency(programs * splits, slots)
                            two_wave = decode.wave_efficiency(
                                programs * _two_wave_splits(programs, sms, nk), slots)
                            assert chosen >= two_wave - 1e-12, (sms, d, item, b, hkv, group, nq, nk)
                            better += chosen > two_wave + 1e-12
                            same += chosen <= two_wave + 1e-12
    assert better > 1000 and same > 1000


def test_forced_split_counts_bypass_the_wave_rule():
    assert _plan(1, 4, 4, 1, 4096, 64, num_splits=5)[:2] == (4, 1024)  # 5 ask for 820 keys each
    assert _plan(1, 4, 4, 1, 4096, 64, num_splits=10**6)[:2] == (16, 256)
    assert _plan(1, 4, 4, 1, 4097, 64, num_splits=10**6)[:2] == (17, 256)


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
    assert op.use_split_kv(nq, nk, kwargs.get("is_causal", False),
                           kwargs.get("dropout_p", 0.0)) == decodes
    q, k, v = _qkv(1, 1, 1, nq, nk, 16)
    LF.scaled_dot_product_attention(q, k, v, **kwargs)
    assert bool(decode_calls) == decodes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_long_cache_on_gpu(dtype):
    check_sdpa(*_qkv(2, 32, 8, 1, 32768, 128, dtype=dtype), enable_gqa=True)
    check_sdpa(*_qkv(1, 8, 8, 16, 5000, 64, dtype=dtype))
