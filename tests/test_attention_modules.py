"""lightllm.nn.MultiheadAttention, KVCache and CausalSelfAttention.

MultiheadAttention is checked against ``torch.nn.MultiheadAttention`` holding the same weights: the
oracle runs PyTorch's module in float64, PyTorch's module in the test dtype sets the error budget
(``assert_parity``). CausalSelfAttention is checked against the same projections around
``torch.nn.functional.scaled_dot_product_attention`` (float64 oracle, test-dtype budget), and its
KV-cache decoding against that full causal forward. Shapes stay tiny: on CPU the attention kernel
runs in Triton's interpreter.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, dtype_params

import lightllm
import lightllm._dispatch as dispatch
from lightllm.nn import CausalSelfAttention, KVCache, MultiheadAttention
from lightllm.nn import attention as attention_module
from lightllm.ops.attention import use_split_kv
from lightllm.testing import assert_parity

# PyTorch's own module warns when key_padding_mask and attn_mask differ in kind; ours accepts that.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")

DTYPES = dtype_params(torch.float32, torch.float16, torch.bfloat16)
E, HEADS = 32, 4
N, L, S = 2, 11, 13  # batch, target length, source length: odd on purpose


# ---------------------------------------------------------------------------------------------
# MultiheadAttention
# ---------------------------------------------------------------------------------------------

def _mha_trio(dtype, **kwargs):
    """(lightllm's module in dtype, PyTorch's in dtype, PyTorch's in float64), one set of weights.

    Ours loads the state dict of PyTorch's module: that is the drop-in promise under test.
    """
    ref = torch.nn.MultiheadAttention(E, HEADS, device=DEVICE, dtype=torch.float64, **kwargs)
    with torch.no_grad():  # PyTorch initialises biases to 0; make them count
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.5)
    theirs = torch.nn.MultiheadAttention(E, HEADS, device=DEVICE, dtype=dtype, **kwargs)
    theirs.load_state_dict(ref.state_dict())
    ref.load_state_dict(theirs.state_dict())  # the float64 oracle sees the rounded weights
    ours = MultiheadAttention(E, HEADS, device=DEVICE, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, ref


def _seq(batch_first, length, dim, dtype, batched=True):
    shape = ((N, length, dim) if batch_first else (length, N, dim)) if batched else (length, dim)
    return torch.randn(shape, device=DEVICE, dtype=dtype)


def _run_three(ours, theirs, ref, args, kwargs):
    """Run the three modules (ours/theirs in the test dtype, ref on float64 copies of the inputs,
    keeping ``query is key is value`` so PyTorch picks the same packed projection)."""
    copies = {}

    def up(t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            return t
        return copies.setdefault(id(t), t.detach().double())

    args64 = [up(a) for a in args]
    kwargs64 = {k: up(v) for k, v in kwargs.items()}
    return ours(*args, **kwargs), theirs(*args, **kwargs), ref(*args64, **kwargs64)


def _inputs(kind, batch_first, dtype, batched=True):
    if kind == "self":
        x = _seq(batch_first, S, E, dtype, batched)
        return x, x, x
    if kind == "cross":  # key is value (encoder-decoder attention)
        kv = _seq(batch_first, S, E, dtype, batched)
        return _seq(batch_first, L, E, dtype, batched), kv, kv
    return (_seq(batch_first, L, E, dtype, batched), _seq(batch_first, S, 24, dtype, batched),
            _seq(batch_first, S, 40, dtype, batched))


KIND_KWARGS = {"self": {}, "cross": {}, "kdim_vdim": {"kdim": 24, "vdim": 40}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["self", "cross", "kdim_vdim"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_matches_torch(batch_first, kind, dtype):
    ours, theirs, ref = _mha_trio(dtype, batch_first=batch_first, **KIND_KWARGS[kind])
    if kind == "kdim_vdim":
        assert set(ours.state_dict()) >= {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
        assert ours.in_proj_weight is None
    else:
        assert set(ours.state_dict()) == {"in_proj_weight", "in_proj_bias", "out_proj.weight",
                                          "out_proj.bias"}
    args = _inputs(kind, batch_first, dtype)
    (out, w), (out_t, _), (out_r, _) = _run_three(ours, theirs, ref, args, {"need_weights": False})
    assert w is None
    assert out.shape == out_t.shape
    assert_parity(out, out_r, out_t, name=f"mha {kind}")


def _masks(kind, dtype):
    """(key_padding_mask, attn_mask, is_causal) for a batch-first self-attention of length S."""
    kpm_bool = torch.rand(N, S, device=DEVICE) < 0.3
    kpm_bool[:, 0] = False  # every row keeps a key (fully masked rows are tested on their own)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(S, device=DEVICE, dtype=dtype)
    attn_bool = torch.rand(S, S, device=DEVICE) < 0.3
    attn_bool[:, 0] = False
    attn_float3 = torch.randn(N * HEADS, S, S, device=DEVICE, dtype=dtype)
    return {
        "kpm_bool": (kpm_bool, None, False),
        "kpm_float": (torch.randn(N, S, device=DEVICE, dtype=dtype), None, False),
        "attn_bool_2d": (None, attn_bool, False),
        "attn_bool_3d": (None, torch.rand(N * HEADS, S, S, device=DEVICE) < 0.3, False),
        "attn_float_3d": (None, attn_float3, False),
        "both_bool": (kpm_bool, attn_bool, False),
        "kpm_bool_attn_float": (kpm_bool, attn_float3, False),
        "causal_hint": (None, causal, True),
        "causal_hint_kpm": (kpm_bool, causal, True),
    }[kind]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["kpm_bool", "kpm_float", "attn_bool_2d", "attn_bool_3d",
                                  "attn_float_3d", "both_bool", "kpm_bool_attn_float",
                                  "causal_hint", "causal_hint_kpm"])
def test_mha_masks_match_torch(kind, dtype):
    ours, theirs, ref = _mha_trio(dtype, batch_first=True)
    kpm, attn_mask, is_causal = _masks(kind, dtype)
    x = _seq(True, S, E, dtype)
    kwargs = {"key_padding_mask": kpm, "attn_mask": attn_mask, "is_causal": is_causal,
              "need_weights": False}
    (out, _), (out_t, _), (out_r, _) = _run_three(ours, theirs, ref, (x, x, x), kwargs)
    assert_parity(out, out_r, out_t, name=f"mha mask {kind}")


@pytest.mark.parametrize("dtype", dtype_params(torch.float32))
def test_mha_fully_padded_sequence_gives_zero_like_torch(dtype):
    ours, theirs, _ = _mha_trio(dtype, batch_first=True, bias=False)
    x = _seq(True, S, E, dtype)
    kpm = torch.zeros(N, S, dtype=torch.bool, device=DEVICE)
    kpm[1] = True  # the second sequence has no key at all
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    out_t, _ = theirs(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], out_t[1]) and not out[1].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias_kv,zero_attn", [(True, False), (False, True), (True, True)])
def test_mha_bias_kv_and_zero_attn(bias_kv, zero_attn, dtype):
    ours, theirs, ref = _mha_trio(dtype, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    assert ("bias_k" in ours.state_dict()) == bias_kv
    q, k, v = _inputs("cross", False, dtype)
    kpm = torch.rand(N, S, device=DEVICE) < 0.3
    attn_mask = torch.randn(L, S, device=DEVICE, dtype=dtype)
    kwargs = {"key_padding_mask": kpm, "attn_mask": attn_mask, "need_weights": False}
    (out, _), (out_t, _), (out_r, _) = _run_three(ours, theirs, ref, (q, k, v), kwargs)
    assert_parity(out, out_r, out_t, name="mha bias_kv/zero_attn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_unbatched(batch_first, dtype):
    ours, theirs, ref = _mha_trio(dtype, batch_first=batch_first)  # batch_first is ignored
    q, k, v = _inputs("cross", batch_first, dtype, batched=False)
    kwargs = {"key_padding_mask": torch.rand(S, device=DEVICE) < 0.3,
              "attn_mask": torch.randn(HEADS, L, S, device=DEVICE, dtype=dtype),
              "need_weights": False}
    (out, _), (out_t, _), (out_r, _) = _run_three(ours, theirs, ref, (q, k, v), kwargs)
    assert out.shape == (L, E)
    assert_parity(out, out_r, out_t, name="mha unbatched")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("average", [True, False])
def test_mha_need_weights_falls_back_with_one_warning(average, dtype, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    ours, theirs, ref = _mha_trio(dtype, batch_first=True)
    q, k, v = _inputs("cross", True, dtype)
    kpm = torch.rand(N, S, device=DEVICE) < 0.3
    kpm[:, 0] = False
    kwargs = {"key_padding_mask": kpm, "average_attn_weights": average}
    if dispatch.triton_runs_on(torch.device(DEVICE)):
        with pytest.warns(RuntimeWarning, match="need_weights=False"):
            (out, w), (out_t, w_t), (out_r, w_r) = _run_three(ours, theirs, ref, (q, k, v), kwargs)
    else:
        (out, w), (out_t, w_t), (out_r, w_r) = _run_three(ours, theirs, ref, (q, k, v), kwargs)
    assert w.shape == ((N, L, S) if average else (N, HEADS, L, S))
    assert_parity(out, out_r, out_t, name="mha need_weights output")
    assert_parity(w, w_r, w_t, name="mha need_weights weights")
    with warnings.catch_warnings(record=True) as seen:  # once per process, not once per call
        warnings.simplefilter("always")
        ours(q, k, v)
    assert not [m for m in seen if "need_weights" in str(m.message)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["self", "kdim_vdim"])
@pytest.mark.parametrize("stride0_grad", [True, False])
def test_mha_gradients_match_torch(stride0_grad, kind, dtype):
    ours, theirs, ref = _mha_trio(dtype, batch_first=True, **KIND_KWARGS[kind])
    distinct = [a.requires_grad_() for a in _inputs(kind, True, dtype)]
    distinct = distinct[:1] if kind == "self" else distinct  # self-attention: one tensor, thrice
    distinct64 = [a.detach().double().requires_grad_() for a in distinct]
    args, args64 = (d * 3 if kind == "self" else d for d in (distinct, distinct64))
    kpm = torch.rand(N, S, device=DEVICE) < 0.3
    kpm[:, 0] = False
    grad_out = None if stride0_grad else torch.randn(N, L if kind != "self" else S, E,
                                                     device=DEVICE, dtype=dtype)
    grads = []
    for module, inputs in ((ours, args), (theirs, args), (ref, args64)):
        out, _ = module(*inputs, key_padding_mask=kpm, need_weights=False)
        if grad_out is None:
            out.sum().backward()  # a stride-0 gradient reaches the kernel's backward
        else:
            out.backward(grad_out.to(out.dtype))
        found = {name: p.grad for name, p in module.named_parameters()}
        for i, t in enumerate(distinct if inputs is args else distinct64):
            found[f"input{i}"] = t.grad
            t.grad = None
        grads.append(found)
    assert grads[0].keys() == grads[2].keys()
    for name in grads[0]:
        assert grads[0][name] is not None, name
        assert_parity(grads[0][name], grads[2][name], grads[1][name], grad=True, name=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mha_dropout_is_identity_in_eval(dtype):
    ours, theirs, ref = _mha_trio(dtype, dropout=0.5, batch_first=True)
    for m in (ours, theirs, ref):
        m.eval()
    x = _seq(True, S, E, dtype)
    (out, _), (out_t, _), (out_r, _) = _run_three(ours, theirs, ref, (x, x, x),
                                                  {"need_weights": False})
    assert_parity(out, out_r, out_t, name="mha eval dropout")


@pytest.mark.filterwarnings("ignore:lightllm")
def test_mha_dropout_in_training_changes_outputs():
    ours, _, _ = _mha_trio(torch.float32, dropout=0.5, batch_first=True)
    x = _seq(True, S, E, torch.float32)
    with torch.no_grad():
        plain, _ = ours.eval()(x, x, x, need_weights=False)
        ours.train()
        dropped, _ = ours(x, x, x, need_weights=False)
        dropped_again, _ = ours(x, x, x, need_weights=False)
    assert torch.isfinite(dropped).all()
    assert (dropped - plain).abs().max() > 1e-2
    assert (dropped - dropped_again).abs().max() > 1e-2  # a fresh mask per call


def test_mha_fast_path_uses_lightllm_attention(monkeypatch):
    assert attention_module._sdpa is lightllm.functional.scaled_dot_product_attention
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return F.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_sdpa", spy)
    ours, _, _ = _mha_trio(torch.float32, batch_first=True)
    x = _seq(True, S, E, torch.float32)
    ours(x, x, x, need_weights=False)
    assert len(calls) == 1
    q = calls[0][0][0]
    assert q.shape == (N, HEADS, S, E // HEADS)


def test_mha_is_a_torch_module_and_loads_its_checkpoint():
    ours = MultiheadAttention(E, HEADS, kdim=24, vdim=40, add_bias_kv=True)
    theirs = torch.nn.MultiheadAttention(E, HEADS, kdim=24, vdim=40, add_bias_kv=True)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("case,exc,match", [
    ("embed_dim", ValueError, "last dimension 32"),
    ("rank", ValueError, "2-D .* or 3-D"),
    ("kv_len", ValueError, "one sequence length"),
    ("batch", ValueError, "one batch size"),
    ("kpm_shape", ValueError, "key_padding_mask must have shape"),
    ("kpm_dtype", TypeError, "key_padding_mask must be a bool or floating"),
    ("attn_shape", ValueError, "attn_mask must have shape"),
    ("dtype", TypeError, "dtype"),
    ("causal_no_mask", RuntimeError, "is_causal"),
])
def test_mha_bad_inputs(case, exc, match):
    m = MultiheadAttention(E, HEADS, batch_first=True, device=DEVICE)
    x = _seq(True, S, E, torch.float32)
    args, kwargs = [x, x, x], {"need_weights": False}
    if case == "embed_dim":
        args[0] = torch.randn(N, S, E + 1, device=DEVICE)
    elif case == "rank":
        args = [x[None]] * 3
    elif case == "kv_len":
        args[2] = torch.randn(N, S + 1, E, device=DEVICE)
    elif case == "batch":
        args[1] = args[2] = torch.randn(N + 1, S, E, device=DEVICE)
    elif case == "kpm_shape":
        kwargs["key_padding_mask"] = torch.zeros(N, S + 1, dtype=torch.bool, device=DEVICE)
    elif case == "kpm_dtype":
        kwargs["key_padding_mask"] = torch.zeros(N, S, dtype=torch.int64, device=DEVICE)
    elif case == "attn_shape":
        kwargs["attn_mask"] = torch.zeros(HEADS, S, S, dtype=torch.bool, device=DEVICE)
    elif case == "dtype":
        args = [x.half()] * 3
    elif case == "causal_no_mask":
        kwargs["is_causal"] = True
    with pytest.raises(exc, match=match):
        m(*args, **kwargs)


def test_mha_bad_constructor():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiheadAttention(30, 4)
    with pytest.raises(ValueError, match="dropout"):
        MultiheadAttention(32, 4, dropout=1.5)


# ---------------------------------------------------------------------------------------------
# KVCache and CausalSelfAttention
# ---------------------------------------------------------------------------------------------

def _csa_pair(dtype, num_heads=HEADS, num_kv_heads=None, bias=True):
    """(module in dtype, its float64 copy)."""
    mod = CausalSelfAttention(E, num_heads, num_kv_heads, bias=bias, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.0, 0.2)
    return mod, copy.deepcopy(mod).double()


def _torch_csa(mod, x):
    """The module's computation around PyTorch's SDPA (float64: the oracle; test dtype: budget)."""
    b, t, _ = x.shape
    q = mod.q_proj(x).view(b, t, mod.num_heads, mod.head_dim).transpose(1, 2)
    k = mod.k_proj(x).view(b, t, mod.num_kv_heads, mod.head_dim).transpose(1, 2)
    v = mod.v_proj(x).view(b, t, mod.num_kv_heads, mod.head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                         enable_gqa=mod.num_kv_heads != mod.num_heads)
    return mod.out_proj(out.transpose(1, 2).reshape(b, t, mod.embed_dim))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_causal_self_attention_forward_and_backward(num_kv_heads, dtype):
    mod, mod64 = _csa_pair(dtype, num_kv_heads=num_kv_heads)
    x = torch.randn(N, 17, E, device=DEVICE, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out = mod(x)
    out_t = _torch_csa(mod, x)
    out_r = _torch_csa(mod64, x64)
    assert_parity(out, out_r, out_t, name="causal self-attention")

    grads = []
    for y, module, inp in ((out, mod, x), (out_t, mod, x), (out_r, mod64, x64)):
        module.zero_grad()
        inp.grad = None
        y.sum().backward()
        grads.append({"x": inp.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}})
    for name in grads[0]:
        assert_parity(grads[0][name], grads[2][name], grads[1][name], grad=True, name=f"d{name}")


def _decode(mod, x, chunks, cache_batch=None):
    cache = mod.make_kv_cache(cache_batch or x.shape[0], max_seq_len=x.shape[1] + 3)
    outs, pos = [], 0
    with torch.no_grad():
        for size in chunks:
            outs.append(mod(x[:, pos:pos + size], kv_cache=cache, start_pos=pos))
            pos += size
    assert pos == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 1, 1, 1, 1], [3, 4, 1, 5], [2, 7]],
                         ids=["token_by_token", "prefill_then_tokens", "mixed_chunks", "two_chunks"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_kv_cache_decoding_equals_full_forward(num_kv_heads, chunks, dtype):
    mod, mod64 = _csa_pair(dtype, num_kv_heads=num_kv_heads)
    x = torch.randn(N, sum(chunks), E, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        full = mod(x)
        out_t = _torch_csa(mod, x)
        out_r = _torch_csa(mod64, x.double())
    decoded = _decode(mod, x, chunks)
    assert_parity(decoded, out_r, out_t, name="decoded vs reference")
    assert_parity(full, out_r, out_t, name="full vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_context_decoding_takes_the_split_kv_kernel(dtype):
    """Short chunks over hundreds of cached keys run the function's split-KV decode kernel (with
    the bottom-right mask for a chunk, without a mask for one token)."""
    mod, mod64 = _csa_pair(dtype, num_kv_heads=2)
    x = torch.randn(1, 300, E, device=DEVICE, dtype=dtype)
    chunks = [296, 3, 1]
    assert use_split_kv(3, 299, False, 0.0) and use_split_kv(1, 300, False, 0.0)
    decoded = _decode(mod, x, chunks)
    with torch.no_grad():
        out_t, out_r = _torch_csa(mod, x), _torch_csa(mod64, x.double())
    assert_parity(decoded[:, -4:], out_r[:, -4:], out_t[:, -4:], name="long-context decode")


def test_kv_cache_decoding_compiles_fullgraph():
    mod, _ = _csa_pair(torch.float32, num_kv_heads=2)
    compiled = torch.compile(mod, fullgraph=True)
    x = torch.randn(1, 6, E, device=DEVICE)
    cache = mod.make_kv_cache(1, 8)
    with torch.no_grad():
        decoded = torch.cat([compiled(x[:, :5], kv_cache=cache, start_pos=0),
                             compiled(x[:, 5:], kv_cache=cache, start_pos=5)], dim=1)
        full = mod(x)
    torch.testing.assert_close(decoded, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_smaller_batch_than_cache():
    mod, mod64 = _csa_pair(torch.float32)
    x = torch.randn(1, 6, E, device=DEVICE)
    decoded = _decode(mod, x, [3, 1, 2], cache_batch=3)
    with torch.no_grad():
        assert_parity(decoded, _torch_csa(mod64, x.double()), _torch_csa(mod, x))


def test_decode_passes_gqa_and_the_right_mask_to_the_function(monkeypatch):
    calls = []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append({"k_heads": k.shape[1], "keys": k.shape[2], "mask": attn_mask,
                      "is_causal": is_causal, "enable_gqa": enable_gqa})
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              enable_gqa=enable_gqa)

    monkeypatch.setattr(lightllm.functional, "scaled_dot_product_attention", spy)
    mod, _ = _csa_pair(torch.float32, num_heads=4, num_kv_heads=2)
    x = torch.randn(1, 8, E, device=DEVICE)
    _decode(mod, x, [3, 1, 4])
    prefill, token, chunk = calls
    assert all(c["k_heads"] == 2 and c["enable_gqa"] for c in calls)  # K/V never repeated
    assert prefill["is_causal"] and prefill["mask"] is None and prefill["keys"] == 3
    assert not token["is_causal"] and token["mask"] is None and token["keys"] == 4
    assert not chunk["is_causal"] and chunk["keys"] == 8
    # bottom-right aligned, as PyTorch's lower-right causal bias (a kernel flag, no mask tensor)
    from torch.nn.attention.bias import CausalBias, CausalVariant

    mask = chunk["mask"]
    assert isinstance(mask, CausalBias) and mask.variant == CausalVariant.LOWER_RIGHT
    expected = torch.tensor([[j <= 4 + i for j in range(8)] for i in range(4)])
    assert torch.equal(mask._materialize().cpu(), expected)


def test_kv_cache_at_a_tensor_position():
    """The CUDA-graph decode step writes one token of the whole batch at a tensor position and
    gets the whole buffers back; other shapes are a clear error (no value is read: no sync)."""
    cache = KVCache(2, 10, 2, 8, dtype=torch.float32, device=DEVICE)
    k, v = torch.randn(2, 2, 1, 8, device=DEVICE), torch.randn(2, 2, 1, 8, device=DEVICE)
    ks, vs = cache.update(k, v, torch.tensor([6], device=DEVICE))
    assert ks.shape == (2, 2, 10, 8) and torch.equal(cache.k[:, :, 6:7], k)
    assert torch.equal(cache.v[:, :, 6:7], v)
    with pytest.raises(ValueError, match="one int64 element"):
        cache.update(k, v, torch.tensor([6, 7], device=DEVICE))
    with pytest.raises(ValueError, match="one token of the whole batch"):
        cache.update(k[:1], v[:1], torch.tensor([6], device=DEVICE))
    with pytest.raises(ValueError, match="head_dim must be a positive int"):
        CausalSelfAttention(32, 4, head_dim=0)
    assert CausalSelfAttention(30, 4, head_dim=16).out_proj.in_features == 64


def test_kv_cache_writes_in_place_and_returns_prefix_views():
    cache = KVCache(2, 10, 2, 8, dtype=torch.float32, device=DEVICE)
    assert not cache.state_dict()  # buffers are not checkpoint state
    k, v = torch.randn(2, 2, 3, 8, device=DEVICE), torch.randn(2, 2, 3, 8, device=DEVICE)
    ks, vs = cache.update(k, v, start_pos=4)
    assert ks.shape == vs.shape == (2, 2, 7, 8)
    assert ks.data_ptr() == cache.k.data_ptr() and vs.data_ptr() == cache.v.data_ptr()
    assert torch.equal(cache.k[:, :, 4:7], k) and torch.equal(cache.v[:, :, 4:7], v)


@pytest.mark.parametrize("case,exc,match", [
    ("overflow", ValueError, "overflow"),
    ("heads", ValueError, r"shape \(B <= 2, 2, T, 8\)"),
    ("batch", ValueError, r"shape \(B <= 2"),
    ("kv_shapes", ValueError, "one shape"),
    ("dtype", TypeError, "dtype"),
    ("start_pos", ValueError, "start_pos must be a non-negative int"),
])
def test_kv_cache_bad_updates(case, exc, match):
    cache = KVCache(2, 10, 2, 8, dtype=torch.float32, device=DEVICE)
    k = v = torch.randn(2, 2, 3, 8, device=DEVICE)
    pos = 0
    if case == "overflow":
        pos = 8
    elif case == "heads":
        k = v = torch.randn(2, 3, 3, 8, device=DEVICE)
    elif case == "batch":
        k = v = torch.randn(3, 2, 3, 8, device=DEVICE)
    elif case == "kv_shapes":
        v = torch.randn(2, 2, 4, 8, device=DEVICE)
    elif case == "dtype":
        k = v = k.half()
    elif case == "start_pos":
        pos = -1
    with pytest.raises(exc, match=match):
        cache.update(k, v, pos)


def test_causal_self_attention_overflowing_cache_raises():
    mod, _ = _csa_pair(torch.float32)
    cache = mod.make_kv_cache(1, 4)
    x = torch.randn(1, 3, E, device=DEVICE)
    with torch.no_grad():
        mod(x, kv_cache=cache, start_pos=0)
        with pytest.raises(ValueError, match="overflow"):
            mod(x[:, :2], kv_cache=cache, start_pos=3)


@pytest.mark.parametrize("case,exc,match", [
    ("rank", ValueError, r"shape \(batch, seq, 32\)"),
    ("embed", ValueError, r"shape \(batch, seq, 32\)"),
    ("dtype", TypeError, "dtype"),
    ("start_pos_without_cache", ValueError, "needs a kv_cache"),
    ("cache_type", TypeError, "lightllm.nn.KVCache"),
    ("cache_heads", ValueError, "kv_cache holds"),
])
def test_causal_self_attention_bad_inputs(case, exc, match):
    mod, _ = _csa_pair(torch.float32, num_kv_heads=2)
    x, kwargs = torch.randn(1, 3, E, device=DEVICE), {}
    if case == "rank":
        x = x[0]
    elif case == "embed":
        x = torch.randn(1, 3, E + 2, device=DEVICE)
    elif case == "dtype":
        x = x.half()
    elif case == "start_pos_without_cache":
        kwargs["start_pos"] = 2
    elif case == "cache_type":
        kwargs["kv_cache"] = (torch.zeros(1), torch.zeros(1))
    elif case == "cache_heads":
        kwargs["kv_cache"] = KVCache(1, 8, 4, E // HEADS, dtype=torch.float32, device=DEVICE)
    with pytest.raises(exc, match=match):
        mod(x, **kwargs)


def test_causal_self_attention_bad_constructor():
    with pytest.raises(ValueError, match="num_kv_heads must be a positive divisor"):
        CausalSelfAttention(E, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
        KVCache(1, 0, 2, 8)


def test_chunk_causal_mask_is_a_flag_outside_compile_and_a_mask_inside():
    """Eager: PyTorch's lower-right causal bias (no mask tensor reaches the kernel); under
    torch.compile, where dynamo cannot build that object, the same mask as a boolean tensor."""
    from torch.nn.attention.bias import CausalBias, causal_lower_right

    from lightllm.nn.attention import chunk_causal_mask

    expected = causal_lower_right(5, 9)._materialize()
    assert isinstance(chunk_causal_mask(5, 9), CausalBias)
    compiled = torch.compile(lambda: chunk_causal_mask(5, 9, DEVICE), fullgraph=True)()
    assert compiled.dtype == torch.bool and torch.equal(compiled.cpu(), expected)


@pytest.mark.parametrize("gqa", [False, True])
def test_attention_gradients_come_back_in_the_projections_layout(gqa):
    """In eager mode the attention backward writes dq, dk, dv in the layout of q, k, v
    (transposed views of the projections' (B, T, heads * D) outputs), so autograd's backward of
    those views copies nothing: no clone in a CausalSelfAttention's backward (counted by
    the profiler, which leaves the op on its eager route; the custom-op route returns
    contiguous gradients, whose strides its fake can know)."""
    m = CausalSelfAttention(48, 4, 2 if gqa else 4).to(DEVICE)
    x = torch.randn(2, 9, 48, device=DEVICE, requires_grad=True)
    y = m(x)
    loss = (y * torch.randn_like(y)).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(loss, [x, *m.parameters()])
    names = [e.name for e in prof.events()]
    assert "aten::mm" in names  # the profiler saw the backward
    # a view's backward on a gradient of another layout is a clone + _unsafe_view (the
    # interpreter's own copy_ of a launch's tensors is not one)
    copies = [n for n in names if n in ("aten::clone", "aten::_to_copy", "aten::contiguous",
                                        "aten::_unsafe_view")]
    assert not copies, copies
