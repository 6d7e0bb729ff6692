"""Dispatch (docs/design.md §3): which path serves an input, the one-time warnings of the fallbacks, and
the two routes to a kernel — the launcher called directly in plain eager mode, the custom op under
torch.compile or a dispatch mode — which must agree bit for bit, gradients included."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import lightllm.functional as LF
from lightllm import _dispatch
from lightllm.testing import DispatchedOps

CPU_KERNELS = _dispatch.triton_runs_on(torch.device("cpu"))  # the interpreter is on


def _bf16_cases():
    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    x, w = torch.randn(9, 96), torch.randn(96)
    w1 = torch.randn(64, 96) / 10
    cases = [
        ("scaled_dot_product_attention", lambda t: LF.scaled_dot_product_attention(*t),
         lambda t: F.scaled_dot_product_attention(*t), (q, k, v)),
        ("layer_norm", lambda t: LF.layer_norm(t[0], (96,), t[1]),
         lambda t: F.layer_norm(t[0], (96,), t[1]), (x, w)),
        ("linear_gelu", lambda t: LF.linear_gelu(*t), lambda t: F.gelu(F.linear(*t)), (x, w1)),
    ]
    return [pytest.param(*c, id=c[0]) for c in cases]


@pytest.mark.parametrize("name, ours, theirs, inputs", _bf16_cases())
def test_bfloat16_on_cpu_takes_the_native_path(name, ours, theirs, inputs):
    """bfloat16 CPU tensors never reach the interpreter's dot (it multiplies raw bits): they run the
    native CPU path, without a fallback warning, and give PyTorch's answer."""
    expected = theirs(tuple(t.to(torch.bfloat16) for t in inputs)).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dispatch._warned.clear()
        got = ours(tuple(t.to(torch.bfloat16) for t in inputs)).float()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)
    assert not [w for w in caught if "lightllm" in str(w.message)]
    assert not _dispatch.runs_triton(inputs[0].to(torch.bfloat16))


def test_float64_warns_once_where_kernels_run():
    x = torch.randn(3, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dispatch._warned.clear()
        y = LF.layer_norm(x, (8,))
        LF.layer_norm(x, (8,))
    fallbacks = [w for w in caught if "float64" in str(w.message)]
    assert len(fallbacks) == (1 if CPU_KERNELS else 0)
    torch.testing.assert_close(y, F.layer_norm(x, (8,)))


def test_native_cpu_switch_is_scoped():
    before = _dispatch.cpu_interprets()
    with _dispatch.native_cpu():
        assert not _dispatch.cpu_interprets()
        assert not _dispatch.runs_triton(torch.empty(1))
    assert _dispatch.cpu_interprets() == before


def test_direct_only_in_plain_eager():
    x = torch.empty(2, device=DEVICE)
    assert _dispatch.direct(x)
    assert not _dispatch.direct(torch.empty(2, device="meta"))
    with DispatchedOps():
        assert not _dispatch.direct(x)


def _routes():
    """Each public op on small odd inputs with every input requiring grad."""
    def t(*shape):
        return torch.randn(*shape, device=DEVICE)

    q, k, v = t(1, 3, 9, 16), t(1, 3, 13, 16), t(1, 3, 13, 16)
    x, r, w, b = t(5, 33), t(5, 33), t(33), t(33)
    w1, b1, w2, b2 = t(40, 33) / 6, t(40), t(33, 40) / 6, t(33)
    return [
        ("sdpa", lambda *a: LF.scaled_dot_product_attention(*a, is_causal=True), (q, k, v),
         {"sdpa_fwd", "sdpa_bwd"}),
        ("sdpa_decode", lambda *a: LF.scaled_dot_product_attention(*a),
         (t(1, 2, 1, 16), t(1, 2, 300, 16), t(1, 2, 300, 16)), {"sdpa_fwd", "sdpa_bwd"}),
        ("layer_norm", lambda *a: LF.layer_norm(a[0], (33,), *a[1:]), (x, w, b),
         {"layer_norm_fwd", "layer_norm_bwd"}),
        ("add_layer_norm", lambda *a: LF.add_layer_norm(a[0], a[1], (33,), *a[2:]), (x, r, w, b),
         {"add_layer_norm_fwd", "layer_norm_bwd"}),
        ("linear_gelu", LF.linear_gelu, (x, w1, b1), {"linear_act_fwd", "linear_act_bwd"}),
        ("feed_forward", lambda *a: LF.feed_forward(*a[:5], residual=a[5]),
         (x, w1, b1, w2, b2, r), {"feed_forward_fwd", "feed_forward_bwd"}),
    ]


@pytest.mark.skipif(not _dispatch.triton_runs_on(torch.device(DEVICE)),
                    reason="the kernels do not run on this device")
@pytest.mark.parametrize("name, fn, inputs, ops", [pytest.param(*c, id=c[0]) for c in _routes()])
def test_eager_and_custom_op_routes_agree(name, fn, inputs, ops):
    """Plain eager calls the launchers directly; a dispatch mode sees the custom ops. Same kernels,
    same autograd: outputs and gradients are bitwise equal, and the mode saw every op."""
    projections = []  # one random-projection upstream gradient per output, shared by both runs

    def run():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        if not projections:
            projections.extend(torch.randn_like(o) for o in outs)
        grads = torch.autograd.grad(outs, leaves, projections)
        return [o.detach() for o in outs], grads

    eager_out, eager_grads = run()
    with DispatchedOps() as mode:
        op_out, op_grads = run()
    assert ops <= set(mode.lightllm), mode.lightllm
    for a, b in zip(eager_out + list(eager_grads), op_out + list(op_grads)):
        assert torch.equal(a, b)


def _statistics_cases():
    """Ops with outputs that carry no gradient (mean, rstd, pre-activations, g/u, attention's
    log-sum-exp) and, for the Add & Norm ops, a sum the caller may leave unused."""
    x, r = torch.randn(6, 40), torch.randn(6, 40)
    w, b = torch.randn(40), torch.randn(40)
    w1, w2 = torch.randn(56, 40) / 6, torch.randn(40, 56) / 7
    cases = [
        ("layer_norm", lambda t: LF.layer_norm(t[0], (40,), t[2], t[3]), (x, r, w, b)),
        ("add_layer_norm", lambda t: LF.add_layer_norm(t[0], t[1], (40,), t[2], t[3])[0],
         (x, r, w, b)),
        ("rms_norm", lambda t: LF.rms_norm(t[0], (40,), t[2]), (x, r, w)),
        ("add_rms_norm", lambda t: LF.add_rms_norm(t[0], t[1], (40,), t[2])[0], (x, r, w)),
        ("linear_gelu", lambda t: LF.linear_gelu(t[0], t[1], t[2]), (x, w1, w1[:, 0])),
        ("feed_forward", lambda t: LF.feed_forward(t[0], t[1], None, t[2], None), (x, w1, w2)),
        ("linear_swiglu", lambda t: LF.linear_swiglu(t[0], t[1], t[2]), (x, w1, w1.flip(0))),
        ("swiglu_feed_forward", lambda t: LF.swiglu_feed_forward(t[0], t[1], t[1].flip(0), t[2]),
         (x, w1, w2)),
    ]
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    cases += [
        ("scaled_dot_product_attention",
         lambda t: LF.scaled_dot_product_attention(t[0], t[1], t[2], enable_gqa=True), (q, k, v)),
        ("flash_attn_varlen_func", lambda t: LF.flash_attn_varlen_func(
            t[0], t[1], t[2], cu, cu, 5, 5, causal=True), (q[0, :, :9].transpose(0, 1),
                                                           k[0, :, :9].transpose(0, 1),
                                                           v[0, :, :9].transpose(0, 1))),
    ]
    return [pytest.param(*c, id=c[0]) for c in cases]


@pytest.mark.parametrize("name,fn,inputs", _statistics_cases())
def test_backward_fills_no_zero_gradients(name, fn, inputs):
    """The gradients of outputs nobody uses (statistics, saved pre-activations, the lse, an Add &
    Norm's unused sum) reach the backward as None: autograd materialises no zero tensor for
    them."""
    leaves = [t.to(DEVICE).detach().requires_grad_() for t in inputs]
    y = fn(leaves)
    with DispatchedOps() as ops:
        torch.autograd.grad((y * torch.randn_like(y)).sum(), leaves, allow_unused=True)
    fills = {k: n for k, n in ops.aten.items() if k in ("zeros", "zeros_like", "zero_", "fill_",
                                                         "new_zeros", "full", "full_like")}
    assert not fills, fills
    assert sum(ops.lightllm.values()) == 1, ops.lightllm


@pytest.mark.parametrize("op", ["add_layer_norm", "add_rms_norm"])
def test_add_norm_with_only_the_sum_used(op):
    """Only the residual sum of an Add & Norm feeds the loss (the last layer of a model whose
    head reads the stream): both inputs get the sum's gradient, the norm's weight none."""
    x, r, w = (torch.randn(5, 24, device=DEVICE, requires_grad=True) for _ in range(3))
    w = w[0].detach().requires_grad_()
    fn = getattr(LF, op)
    _, s = fn(x, r, (24,), w)[:2]
    ds = torch.randn_like(s)
    dx, dr, dw = torch.autograd.grad(s, (x, r, w), ds, allow_unused=True)
    assert torch.equal(dx, ds) and torch.equal(dr, ds)
    assert dw is None
