"""Rotary position embedding: parity (docs/design.md §4) with transformers' apply_rotary_pos_emb on both
routes (Triton: CUDA or the interpreter; native CPU), gradients, layouts, the cos/sin tables,
the in-place form, edge numerics, registration, launch limits and bad input."""

import contextlib
import warnings

import pytest
import torch
from conftest import BF16_ON_CPU, DEVICE, HAS_CUDA
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rope
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope

import lightllm
import lightllm.functional as LF
from lightllm import _dispatch
from lightllm.kernels import rotary as kernel
from lightllm.reference import rotary as reference
from lightllm.testing import DispatchedOps, assert_parity, grads, leaves, stub_launches

TRITON_HERE = _dispatch.triton_runs_on(torch.device(DEVICE))

# (B, H, Hkv, S, D, R): GQA 9:3 (SmolLM2), decode, odd sequences and head dims, partial rotary.
SHAPES = [
    (2, 9, 3, 7, 64, 64),
    (1, 4, 4, 1, 128, 128),
    (3, 2, 1, 97, 40, 40),
    (2, 5, 5, 7, 80, 80),
    (1, 3, 1, 97, 80, 32),
    (2, 4, 2, 7, 64, 16),
]


def routes(*dtypes):
    """(route, dtype) params: "triton" runs on DEVICE (the interpreter on CPU: no bfloat16),
    "native" runs CPU tensors on the native CPU path (bfloat16 included)."""
    out = []
    for dt in dtypes or (torch.float32, torch.float16, torch.bfloat16):
        name = str(dt).replace("torch.", "")
        marks = []
        if not TRITON_HERE:
            marks.append(pytest.mark.skip(reason="the Triton kernels do not run here"))
        elif dt == torch.bfloat16 and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason=BF16_ON_CPU))
        out.append(pytest.param("triton", dt, id=f"triton-{name}", marks=marks))
        out.append(pytest.param("native", dt, id=f"native-{name}"))
    return out


@contextlib.contextmanager
def on(route):
    """Yields the device of the route, with the native CPU path switched on for "native"."""
    if route == "native":
        with _dispatch.native_cpu():
            yield "cpu"
    else:
        yield DEVICE


def qkv_views(b, h, hkv, s, d, dtype, device, heads_dim=1):
    """q and k as a fused qkv projection hands them over: views of one (B, S, (H + 2 Hkv) D)
    buffer, (B, S, H, D) transposed to (B, H, S, D) for heads_dim 1 (not contiguous either way)."""
    qkv = torch.randn(b, s, (h + 2 * hkv) * d, device=device, dtype=dtype)
    q = qkv[..., : h * d].view(b, s, h, d)
    k = qkv[..., h * d: (h + hkv) * d].view(b, s, hkv, d)
    return (q.transpose(1, 2), k.transpose(1, 2)) if heads_dim == 1 else (q, k)


def tables(batch, s, r, dtype, device, base=10000.0):
    """cos/sin as LlamaRotaryEmbedding makes them, for per-row (left-padded) positions."""
    offsets = torch.randint(0, 50, (batch, 1), device=device)
    positions = torch.arange(s, device=device).expand(batch, s) + offsets
    return LF.rotary_cos_sin(positions, r, base=base, dtype=dtype)


def transformers_rope(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' own op: Llama's for a full rotary dim, GPT-NeoX's (partial) otherwise."""
    full = cos.shape[-1] == q.shape[-1]
    return (llama_rope if full else neox_rope)(q, k, cos, sin, unsqueeze_dim)


def check_rotary(q, k, cos, sin, unsqueeze_dim=1, grad_outputs=None, table_grads=False):
    """Outputs and gradients of lightllm against float64, transformers' result as the budget."""
    inputs = (q, k, cos, sin) if table_grads else (q, k)
    extra = () if table_grads else (cos, sin)
    ours = leaves(*inputs)
    y = LF.rotary_embedding(*ours, *extra, unsqueeze_dim=unsqueeze_dim)
    theirs = leaves(*inputs)
    y_torch = transformers_rope(*theirs, *extra, unsqueeze_dim=unsqueeze_dim)
    ref = leaves(*inputs, dtype=torch.float64)
    y_ref = reference.rotary_embedding(*ref, *(t.double() for t in extra), unsqueeze_dim)
    for name, a, r, t in zip(("q_rot", "k_rot"), y, y_ref, y_torch):
        assert a.shape == t.shape and a.dtype == t.dtype
        assert_parity(a, r, t, name=name)
    # random projections (y * r).sum(): r is the upstream gradient
    dy = grad_outputs or [torch.randn_like(t) for t in y_torch]
    for name, g, g_ref, g_torch in zip(
        ("dq", "dk", "dcos", "dsin"),
        grads(y, ours, dy), grads(y_ref, ref, [d.double() for d in dy]), grads(y_torch, theirs, dy),
    ):
        assert_parity(g, g_ref, g_torch, grad=True, name=name)
    return y


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("route, dtype", routes())
@pytest.mark.parametrize("b, h, hkv, s, d, r", SHAPES)
def test_rotary_embedding(b, h, hkv, s, d, r, route, dtype):
    with on(route) as dev:
        q, k = qkv_views(b, h, hkv, s, d, dtype, dev)
        check_rotary(q, k, *tables(b, s, r, dtype, dev))


@pytest.mark.parametrize("route, dtype", routes(torch.float32, torch.float16))
@pytest.mark.parametrize("unsqueeze_dim", [1, 2, -2])
@pytest.mark.parametrize("table_batch", ["per-row", "shared"])
def test_layouts_and_shared_tables(table_batch, unsqueeze_dim, route, dtype):
    """(B, H, S, D) and (B, S, H, D), per-row (B, S, R) and batch-1 (1, S, R) tables, partial R."""
    b, h, hkv, s, d, r = 3, 6, 2, 7, 80, 48
    heads_dim = 1 if unsqueeze_dim == 1 else 2
    with on(route) as dev:
        q, k = qkv_views(b, h, hkv, s, d, dtype, dev, heads_dim)
        cos, sin = tables(b if table_batch == "per-row" else 1, s, r, dtype, dev)
        check_rotary(q, k, cos, sin, unsqueeze_dim)
        check_rotary(q.contiguous(), k.contiguous(), cos, sin, unsqueeze_dim)


@pytest.mark.parametrize("route, dtype", routes(torch.float32, torch.float16))
def test_strided_tables_and_stride0_gradients(route, dtype):
    """Tables that are slices or batch-expanded (stride 0) views, q/k with a stride-0 head dim
    (one head broadcast), and y.sum()'s stride-0 upstream gradient."""
    b, h, hkv, s, d = 2, 4, 2, 5, 64
    with on(route) as dev:
        q, k = qkv_views(b, h, hkv, s, d, dtype, dev)
        cos, sin = tables(1, 2 * s, 2 * d, dtype, dev)
        cos, sin = cos[:, 1::2, ::2].expand(b, s, d), sin[:, 1::2, ::2].expand(b, s, d)
        assert cos.stride(0) == 0 and not cos.is_contiguous()
        ones = [torch.ones((), device=dev, dtype=dtype).expand(t.shape) for t in (q, k)]
        check_rotary(q, k, cos, sin, grad_outputs=ones)
        q1 = torch.randn(b, 1, s, d, device=dev, dtype=dtype).expand(b, h, s, d)
        check_rotary(q1, k, cos, sin)


@pytest.mark.parametrize("route, dtype", routes(torch.float32, torch.float16))
def test_gradients_of_the_tables(route, dtype):
    """cos/sin that require grad (halves that differ: not Llama's tables), per-row and shared."""
    b, h, hkv, s, d = 2, 3, 1, 5, 40
    with on(route) as dev:
        q, k = qkv_views(b, h, hkv, s, d, dtype, dev)
        for batch in (b, 1):
            cos = torch.randn(batch, s, d, device=dev, dtype=dtype)
            sin = torch.randn(batch, s, d, device=dev, dtype=dtype)
            check_rotary(q, k, cos, sin, table_grads=True)
        cos, sin = torch.randn(2, b, s, 24, device=dev, dtype=dtype)  # partial rotary
        check_rotary(q, k, cos, sin, table_grads=True)


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_second_order_gradients(route, dtype):
    """The backward is the op itself (inverted), so it is differentiable: d/dcos of <dq, r2>."""
    b, h, hkv, s, d = 1, 2, 1, 3, 16
    with on(route) as dev:
        q, k = qkv_views(b, h, hkv, s, d, dtype, dev)
        cos, sin = torch.randn(2, 1, s, d, device=dev, dtype=dtype)
        r1 = [torch.randn_like(q), torch.randn_like(k)]
        r2 = [torch.randn_like(q), torch.randn_like(k)]
        results = []
        for fn in (LF.rotary_embedding, transformers_rope):
            qq, kk, cc, ss = leaves(q, k, cos, sin)
            dq, dk = torch.autograd.grad(fn(qq, kk, cc, ss), (qq, kk), r1, create_graph=True)
            results.append(torch.autograd.grad((dq * r2[0]).sum() + (dk * r2[1]).sum(), (cc, ss)))
        for ours, theirs in zip(*results):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# -- the tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cos_sin_match_llama_rotary_embedding(dtype):
    """Bit for bit what LlamaRotaryEmbedding returns, for left-padded positions (B, S)."""
    from transformers import LlamaConfig

    head_dim, base = 64, 100000.0
    config = LlamaConfig(hidden_size=9 * head_dim, num_attention_heads=9, num_key_value_heads=3,
                         rope_parameters={"rope_type": "default", "rope_theta": base})
    theirs = LlamaRotaryEmbedding(config).to(DEVICE)
    lengths = torch.tensor([11, 6, 1], device=DEVICE)
    mask = torch.arange(11, device=DEVICE)[None] >= 11 - lengths[:, None]  # left padding
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    x = torch.randn(1, device=DEVICE, dtype=dtype)
    cos_t, sin_t = theirs(x, positions)
    cos, sin = LF.rotary_cos_sin(positions, head_dim, base=base, dtype=dtype)
    assert cos.shape == (3, 11, head_dim) and cos.dtype == dtype
    assert torch.equal(cos, cos_t) and torch.equal(sin, sin_t)
    module = lightllm.nn.RotaryEmbedding(head_dim, base=base).to(DEVICE)
    assert module.state_dict().keys() == theirs.state_dict().keys()
    cos_m, sin_m = module(x, positions)
    assert torch.equal(cos_m, cos_t) and torch.equal(sin_m, sin_t)
    cos1, sin1 = LF.rotary_cos_sin(positions[0], head_dim, base=base, dtype=dtype)  # (S,)
    assert cos1.shape == (1, 11, head_dim) and torch.equal(cos1[0], cos[0])


# -- routes and launches --------------------------------------------------------------------------


@pytest.mark.skipif(not TRITON_HERE, reason="the Triton kernels do not run here")
def test_one_launch_forward_one_backward(monkeypatch):
    """q and k go through one launch; the backward is the same kernel, inverted."""
    calls = []
    real = kernel.rotary_fwd
    monkeypatch.setattr(kernel, "rotary_fwd", lambda *a: calls.append(a[5]) or real(*a))
    q, k = leaves(*qkv_views(2, 9, 3, 4, 64, torch.float32, DEVICE))
    cos, sin = tables(2, 4, 64, torch.float32, DEVICE)
    y = LF.rotary_embedding(q, k, cos, sin)
    assert calls == [False]
    torch.autograd.grad(y, (q, k), [torch.randn_like(t) for t in y])
    assert calls == [False, True]
    with stub_launches() as launches:
        LF.rotary_embedding(q.detach(), k.detach(), cos, sin)
    assert [launch.kernel for launch in launches] == ["_rotary_fwd"]


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_custom_op_route_matches_eager_bit_for_bit(route, dtype):
    with on(route) as dev:
        q, k = qkv_views(2, 4, 2, 5, 48, dtype, dev)
        cos, sin = tables(2, 5, 32, dtype, dev)
        r = [torch.randn_like(q), torch.randn_like(k)]

        def run():
            qq, kk = leaves(q, k)
            y = LF.rotary_embedding(qq, kk, cos, sin)
            return [t.detach() for t in y], torch.autograd.grad(y, (qq, kk), r)

        eager_out, eager_grads = run()
        with DispatchedOps() as mode:
            op_out, op_grads = run()
    assert mode.lightllm["rotary_embedding"] == 2, mode.lightllm  # forward, backward
    for a, b in zip(eager_out + list(eager_grads), op_out + list(op_grads)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_registered_ops_pass_opcheck(route, dtype):
    with on(route) as dev:
        q, k = qkv_views(2, 4, 2, 3, 32, dtype, dev)
        q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
        cos, sin = tables(2, 3, 16, dtype, dev)
        ops = torch.ops.lightllm
        torch.library.opcheck(ops.rotary_embedding.default, (q, k, cos, sin, 1, False))
        torch.library.opcheck(ops.rotary_embedding.default, (q, k, cos, sin, 1, True))
        torch.library.opcheck(ops.rotary_embedding.default,
                              (q.transpose(1, 2), k.transpose(1, 2), cos[:1], sin[:1], 2, False))
        torch.library.opcheck(ops.rotary_embedding_.default,
                              (q.detach().clone(), k.detach().clone(), cos, sin, 1))


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_torch_compile_fullgraph(route, dtype):
    with on(route) as dev:
        proj = torch.nn.Linear(32, 3 * 2 * 16).to(dev)

        def block(x, positions):
            b, s, _ = x.shape
            q, k, v = proj(x).view(b, s, 3, 2, 16).unbind(2)
            cos, sin = LF.rotary_cos_sin(positions, 16, base=500.0)
            q, k = LF.rotary_embedding(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return q * k + v.transpose(1, 2)

        compiled = torch.compile(block, fullgraph=True)
        x = torch.randn(2, 5, 32, device=dev, requires_grad=True)
        positions = torch.arange(5, device=dev).expand(2, 5) + torch.tensor([[0], [2]], device=dev)
        y = compiled(x, positions)
        r = torch.randn_like(y)
        (g,) = torch.autograd.grad((y * r).sum(), x)
        x2 = x.detach().requires_grad_(True)
        y2 = block(x2, positions)
        (g2,) = torch.autograd.grad((y2 * r).sum(), x2)
        torch.testing.assert_close(y, y2)
        torch.testing.assert_close(g, g2)


def test_llama_model_dispatches_the_op():
    """lightllm's own Llama-style decoder runs its rotary embedding through this op (with a GeLU
    feed-forward: the test needs nothing but this op and the ones on main)."""
    from lightllm.models.gpt import GPT, GPTConfig

    config = GPTConfig.llama(vocab_size=61, n_layer=1, n_head=4, n_kv_head=2, n_embd=64,
                             intermediate_size=96, block_size=32, mlp="gelu")
    model = GPT(config).to(DEVICE).eval()
    ids = torch.randint(0, 61, (2, 6), device=DEVICE)
    with torch.no_grad(), DispatchedOps() as mode:
        logits = model(ids)
    assert logits.shape == (2, 6, 61) and torch.isfinite(logits).all()
    assert mode.lightllm["rotary_embedding"] == config.n_layer, mode.lightllm


# -- in place -------------------------------------------------------------------------------------


@pytest.mark.parametrize("route, dtype", routes(torch.float32, torch.float16))
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_in_place_matches_out_of_place(unsqueeze_dim, route, dtype):
    b, h, hkv, s, d, r = 2, 9, 3, 1, 64, 48  # a decode step, partial rotary
    with on(route) as dev:
        q, k = qkv_views(b, h, hkv, s, d, dtype, dev, 1 if unsqueeze_dim == 1 else 2)
        cos, sin = tables(b, s, r, dtype, dev)
        expected = LF.rotary_embedding(q, k, cos, sin, unsqueeze_dim)
        q2, k2 = q.clone(), k.clone()
        out = LF.rotary_embedding_(q2, k2, cos, sin, unsqueeze_dim)
        assert out[0] is q2 and out[1] is k2
        torch.testing.assert_close(q2, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(k2, expected[1], atol=0, rtol=0)
        assert torch.equal(q2[..., r:], q[..., r:])  # pass-through dims untouched


def test_in_place_refusals():
    q, k = qkv_views(1, 2, 1, 3, 16, torch.float32, DEVICE)
    cos, sin = tables(1, 3, 16, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="autograd"):
        LF.rotary_embedding_(q.detach().requires_grad_(True), k, cos, sin)
    with pytest.raises(RuntimeError, match="overlapping"):
        LF.rotary_embedding_(q[:, :1].expand(1, 2, 3, 16), k, cos, sin)
    with pytest.raises(RuntimeError, match="same memory"):
        x = q.clone()
        LF.rotary_embedding_(x, x, cos, sin)


# -- edge numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_empty_inputs(route, dtype):
    with on(route) as dev:
        for b, s in ((0, 4), (2, 0)):
            q, k = leaves(torch.randn(b, 3, s, 8, device=dev), torch.randn(b, 1, s, 8, device=dev))
            cos, sin = torch.randn(2, max(b, 1), s, 8, device=dev)
            y = LF.rotary_embedding(q, k, cos, sin)
            assert y[0].shape == q.shape and y[1].shape == k.shape
            sum(t.sum() for t in y).backward()
            assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_nan_propagates_only_where_it_is(route, dtype):
    """A NaN in q reaches its own element and its rotation partner; one in cos reaches that
    column of every head at that position; nothing else."""
    with on(route) as dev:
        q, k = qkv_views(2, 3, 1, 4, 16, dtype, dev)
        cos, sin = tables(2, 4, 16, dtype, dev)
        q, cos = q.clone(), cos.clone()
        q[1, 2, 3, 5] = float("nan")
        cos[0, 1, 12] = float("nan")
        y = LF.rotary_embedding(q, k, cos, sin)
        y_ref = reference.rotary_embedding(q.double(), k.double(), cos.double(), sin.double())
        for a, r in zip(y, y_ref):
            assert torch.equal(a.isnan(), r.isnan())
        assert y[0].isnan().sum() == 2 + 3 and y[1].isnan().sum() == 1


def test_float64_runs_the_reference():
    q, k = qkv_views(1, 2, 1, 3, 16, torch.float64, DEVICE)
    cos, sin = tables(1, 3, 16, torch.float64, DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dispatch._warned.clear()
        y = LF.rotary_embedding(q, k, cos, sin)
        LF.rotary_embedding(q, k, cos, sin)
    fallbacks = [w for w in caught if "float64" in str(w.message)]
    assert len(fallbacks) == (1 if TRITON_HERE else 0)
    for a, b in zip(y, llama_rope(q, k, cos, sin)):
        torch.testing.assert_close(a, b)


def test_mixed_table_dtype_keeps_q_dtype():
    """fp32 tables beside fp16 q/k: computed in fp32, returned in q's dtype (transformers would
    promote to fp32; lightllm keeps the activations' dtype)."""
    q, k = qkv_views(1, 2, 1, 3, 16, torch.float16, DEVICE)
    cos, sin = tables(1, 3, 16, torch.float32, DEVICE)
    y = LF.rotary_embedding(q, k, cos, sin)
    expected = llama_rope(q, k, cos, sin)
    for a, b in zip(y, expected):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a, b.half(), atol=2e-3, rtol=2e-3)


# -- launch limits --------------------------------------------------------------------------------


def test_launch_limits_for_huge_batch_times_heads():
    """B x H = 4096 x 17 > 65535 and B x S past 65535: one axis-0 program per position."""
    q = torch.randn(4096, 17, 1, 8, device=DEVICE, dtype=torch.float16)
    k = torch.randn(4096, 5, 1, 8, device=DEVICE, dtype=torch.float16)
    cos, sin = torch.randn(2, 1, 1, 8, device=DEVICE, dtype=torch.float16)  # stride-0 tables
    qs = q.view(1, 4096, 17, 8)  # (B, S, H, D): 4096 positions of one sequence
    ks = k.view(1, 4096, 5, 8)
    for args in ((q, k, cos.expand(4096, 1, 8), sin.expand(4096, 1, 8), 1),
                 (qs, ks, cos.expand(1, 4096, 8), sin.expand(1, 4096, 8), 2)):
        q_, k_ = leaves(args[0], args[1])
        with stub_launches() as launches:
            y = LF.rotary_embedding(q_, k_, *args[2:])
            torch.autograd.grad(y, (q_, k_), [torch.ones_like(t) for t in y])
        assert [launch.kernel for launch in launches] == ["_rotary_fwd"] * 2
        for launch in launches:
            for x, y_, z in launch.grids:
                assert 1 <= x < 2**31 and y_ <= 65535 and z <= 65535, launch.grids


def test_grid_folds_past_axis_0(monkeypatch):
    """More tiles than axis 0 holds fold onto axis 1; the surplus programs write nothing (run
    for real with a tiny axis-0 limit, outputs poisoned)."""
    for n in (2**31 - 1, 2**31 + 5, 2**40):
        x, y = kernel.grid_for(n)
        assert x < 2**31 and y <= 65535 and x * y >= n and x * (y - 1) < n
    if not TRITON_HERE:
        return
    monkeypatch.setattr(kernel, "MAX_GRID_X", 5)
    q, k = qkv_views(2, 9, 3, 7, 32, torch.float32, DEVICE)  # 14 tiles: grid (5, 3)
    with stub_launches() as launches:
        LF.rotary_embedding(q, k, *tables(2, 7, 32, torch.float32, DEVICE))
    assert launches[0].grids == [(5, 3, 1)]
    check_rotary(q, k, *tables(2, 7, 32, torch.float32, DEVICE))


@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_int64_offsets_on_gpu():
    """q past 2^31 elements: offsets must be 64-bit."""
    b, h, s, d = 1, 32, (2**31) // (32 * 128) + 3, 128
    try:
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.float16).transpose(1, 2)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element tensor")
    k = q[:, :8]
    cos, sin = tables(1, s, d, torch.float16, "cuda")
    qr, kr = LF.rotary_embedding(q, k, cos, sin)
    tail = (slice(None), slice(None), slice(s - 2, s))
    expected = llama_rope(q[tail].float(), k[tail].float(), cos[:, -2:].float(), sin[:, -2:].float())
    torch.testing.assert_close(qr[tail].float(), expected[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(kr[tail].float(), expected[1], atol=2e-3, rtol=2e-3)


# -- bad input ------------------------------------------------------------------------------------


def _args():
    q, k = torch.randn(2, 4, 5, 16, device=DEVICE), torch.randn(2, 2, 5, 16, device=DEVICE)
    cos, sin = torch.randn(2, 2, 5, 16, device=DEVICE)
    return q, k, cos, sin


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, k, c, s: LF.rotary_embedding(q.tolist(), k, c, s), TypeError, "q must be a"),
        (lambda q, k, c, s: LF.rotary_embedding(q.long(), k, c, s), TypeError, "q must have dtype"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k.half(), c, s), TypeError, "k has dtype"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c.int(), s), TypeError, "cos must have"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c, s.half()), TypeError, "sin has dtype"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c, s, 3), ValueError, "unsqueeze_dim"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c, s, True), ValueError, "unsqueeze_dim"),
        (lambda q, k, c, s: LF.rotary_embedding(q[0], k, c, s), ValueError, "q must be 4-D"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k[:, :, :4], c, s), ValueError, "k must be"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k[..., :8], c, s), ValueError, "head dim"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c[:, :4], s[:, :4]), ValueError,
         "cos must have shape"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c[0], s[0]), ValueError,
         "cos must have shape"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c.repeat(2, 1, 1), s.repeat(2, 1, 1)),
         ValueError, "cos must have shape"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c, s[:1]), ValueError, "sin must have"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c[..., :7], s[..., :7]), ValueError,
         "must be even"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, torch.cat((c, c), -1),
                                                torch.cat((s, s), -1)), ValueError, "at most"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c.to("meta"), s), RuntimeError, "device"),
        (lambda q, k, c, s: LF.rotary_embedding(q, k, c, s, unsqueeze_dim=2), ValueError,
         "k must be"),
        (lambda q, k, c, s: LF.rotary_embedding(q, q, c, s, unsqueeze_dim=2), ValueError,
         "cos must have shape"),
        (lambda q, k, c, s: LF.rotary_embedding_(q, k[..., :8], c, s), ValueError, "head dim"),
        (lambda q, k, c, s: LF.rotary_cos_sin([1, 2], 16), TypeError, "positions"),
        (lambda q, k, c, s: LF.rotary_cos_sin(torch.zeros(2, 3, 4), 16), ValueError, "positions"),
        (lambda q, k, c, s: LF.rotary_cos_sin(torch.arange(4), 15), ValueError, "dim"),
        (lambda q, k, c, s: LF.rotary_cos_sin(torch.arange(4), 16, dtype=torch.int32), TypeError,
         "dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(*_args())
