"""feed_forward and lightllm.nn.FeedForward: parity of the output and every gradient (docs/design.md §4),
residual, strides, registration, the TransformerEncoderLayer drop-in, dropout, errors.

Each case runs three interpreted matmuls (two forward, dPre in the backward), so the default shapes
pair a large dimension with a small one; ``slow`` marks the case where d_model and d_ff are both large.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, dtype_params

import lightllm
import lightllm.functional as LF
from lightllm.kernels import fused_linear as kernel
from lightllm.reference import fused_linear as reference
from lightllm.testing import assert_parity, grads, leaves

# (tokens, d_model, d_ff)
SHAPES = [(1, 40, 1023), (7, 1000, 40), (97, 40, 3072)]
SLOW_SHAPES = [(97, 1023, 3072), (7, 3072, 1000)]
GPU_SHAPES = [(2048, 1024, 4096), (333, 768, 3072), (1, 4096, 16384)]
VARIANTS = ["bias+residual", "bias", "none"]




def make_inputs(m, d_model, d_ff, dtype, variant="bias+residual", lead=()):
    """x, w1, b1, w2, b2, residual with O(1) activations (weights scaled by 1/sqrt(fan_in))."""
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    bias = variant != "none"
    return (t(*lead, m, d_model), t(d_ff, d_model, scale=d_model**-0.5),
            t(d_ff) if bias else None, t(d_model, d_ff, scale=d_ff**-0.5),
            t(d_model) if bias else None,
            t(*lead, m, d_model) if variant == "bias+residual" else None)


def check_feed_forward(x, w1, b1, w2, b2, residual, approximate, dy=None, activation="gelu"):
    inputs = (x, w1, b1, w2, b2, residual)

    def run(fn, ts):
        return fn(ts[0], ts[1], ts[2], ts[3], ts[4], approximate, residual=ts[5],
                  activation=activation)

    ours = leaves(*inputs)
    y = run(LF.feed_forward, ours)
    mine = leaves(*inputs)
    y_torch = run(reference.feed_forward, mine)  # PyTorch's own ops in the test dtype
    ref = leaves(*inputs, dtype=torch.float64)
    y_ref = run(reference.feed_forward, ref)
    assert y.shape == y_torch.shape and y.dtype == x.dtype
    assert_parity(y, y_ref, y_torch, name="y")
    dy = torch.randn_like(y) if dy is None else dy
    for name, g, g_ref, g_torch in zip(
        ("dx", "dw1", "db1", "dw2", "db2", "dresidual"),
        grads(y, ours, dy), grads(y_ref, ref, dy.double()), grads(y_torch, mine, dy),
    ):
        if g_ref is not None:
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_feed_forward(shape, approximate, variant, dtype):
    check_feed_forward(*make_inputs(*shape, dtype, variant), approximate)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_feed_forward_relu(shape, variant, dtype):
    check_feed_forward(*make_inputs(*shape, dtype, variant), "none", activation="relu")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_feed_forward_large(shape, approximate, dtype):
    check_feed_forward(*make_inputs(*shape, dtype), approximate)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_feed_forward_gpu_sizes(shape, dtype):
    check_feed_forward(*make_inputs(*shape, dtype), "tanh")


def test_leading_dims_broadcast_residual_non_contiguous_and_stride0_gradient():
    x, w1, b1, w2, b2, _ = make_inputs(5, 24, 70, torch.float32, lead=(2, 3))
    check_feed_forward(x, w1, b1, w2, b2, torch.randn(24, device=DEVICE), "none")
    check_feed_forward(x, w1, b1, w2, b2, torch.randn(3, 1, 24, device=DEVICE), "tanh")
    x_t = torch.randn(24, 2, 5, device=DEVICE).permute(1, 2, 0)  # column-major rows
    r_t = torch.randn(24, 2, 5, device=DEVICE).permute(1, 2, 0)
    check_feed_forward(x_t, w1.t().contiguous().t(), b1, w2, b2, r_t, "none")
    dy = torch.ones(1, device=DEVICE).expand(2, 5, 24)  # what y.sum().backward() hands in
    check_feed_forward(x_t, w1, b1, w2, b2, r_t, "tanh", dy=dy)
    check_feed_forward(x[0, 0, 0], w1, b1, w2, b2, None, "none")  # (d_model,) -> (d_model,)


def test_nan_propagates_to_its_row_only():
    x, w1, b1, w2, b2, r = make_inputs(4, 32, 48, torch.float32)
    x[1, 3] = float("nan")
    y = LF.feed_forward(x, w1, b1, w2, b2, residual=r)
    assert y[1].isnan().all()
    assert torch.isfinite(y[[0, 2, 3]]).all()


def test_empty_tokens():
    x, w1, b1, w2, b2, r = leaves(*make_inputs(0, 16, 24, torch.float32))
    y = LF.feed_forward(x, w1, b1, w2, b2, residual=r)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(w1.grad, torch.zeros_like(w1))


def test_kernels_are_what_runs(monkeypatch):
    calls = []
    for name in ("linear_act_fwd", "linear_fwd", "matmul_act_grad"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, w1, b1, w2, b2, r = leaves(*make_inputs(3, 8, 12, torch.float32))
    LF.feed_forward(x, w1, b1, w2, b2, residual=r).sum().backward()
    assert calls == ["linear_act_fwd", "linear_fwd", "matmul_act_grad"]


def test_registered_ops_pass_opcheck():
    x, w1, b1, w2, b2, r = leaves(*make_inputs(6, 20, 36, torch.float32))
    ff = torch.ops.lightllm.feed_forward_fwd.default
    torch.library.opcheck(ff, (x, w1, b1, w2, b2, r, "gelu_tanh", True))
    torch.library.opcheck(ff, (x, w1, None, w2, None, None, "gelu", True))
    torch.library.opcheck(ff, (x, w1, b1, w2, b2, r, "relu", False))
    det = [t.detach() for t in (x, w1, b1, w2, b2)]
    dy = torch.randn(6, 20, device=DEVICE)
    bwd = torch.ops.lightllm.feed_forward_bwd.default
    for activation in ("gelu_tanh", "relu"):
        _, h, pre = ff(*det, None, activation, True)
        torch.library.opcheck(bwd, (dy, det[0], det[1], det[3], h, pre, activation,
                                    True, True, True, True, True))
    torch.library.opcheck(bwd, (dy, det[0], det[1], det[3], h, pre, "gelu",
                                False, True, False, True, False))


def test_torch_compile_fullgraph_module():
    module = lightllm.nn.FeedForward(16, 40).to(DEVICE)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    y = compiled(x, residual=x)
    y.sum().backward()
    torch.testing.assert_close(y, module(x, residual=x))
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert module.linear1.weight.grad is not None


def _encoder_layer(d_model, d_ff, bias=True):
    layer = torch.nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=d_ff, dropout=0.1,
                                             activation="gelu", batch_first=True, bias=bias)
    return layer.to(DEVICE)


@pytest.mark.parametrize("bias", [True, False])
def test_module_is_a_drop_in_for_the_encoder_feed_forward(bias):
    layer = _encoder_layer(24, 56, bias).eval()
    ours = lightllm.nn.FeedForward(24, 56, dropout=0.1, bias=bias, device=DEVICE).eval()
    state = {k: v for k, v in layer.state_dict().items() if k.startswith(("linear1.", "linear2."))}
    assert set(ours.state_dict()) == set(state)
    ours.load_state_dict(state)  # strict: the keys map without conversion
    x = torch.randn(3, 7, 24, device=DEVICE, requires_grad=True)
    y = ours(x)
    y_theirs = layer._ff_block(x)  # linear2(dropout(gelu(linear1(x)))) then dropout2 (off in eval)
    torch.testing.assert_close(y, y_theirs)
    torch.testing.assert_close(ours(x, residual=x), x + y_theirs)
    dy = torch.randn_like(y)
    ours_grads = torch.autograd.grad(y, [x, *ours.parameters()], dy)
    theirs_grads = torch.autograd.grad(y_theirs, [x, layer.linear1.weight, *(
        [layer.linear1.bias] if bias else []), layer.linear2.weight, *(
        [layer.linear2.bias] if bias else [])], dy)
    for got, want in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_module_dropout_in_training(approximate):
    """Dropout on the activations, as TransformerEncoderLayer: linear2(dropout(gelu(linear1(x))))."""
    ours = lightllm.nn.FeedForward(16, 48, dropout=0.4, approximate=approximate,
                                   device=DEVICE).train()
    x = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    r = torch.randn(9, 16, device=DEVICE)
    torch.manual_seed(1234)
    y = ours(x, residual=r)
    torch.manual_seed(1234)
    l1, l2 = ours.linear1, ours.linear2
    h = F.dropout(F.gelu(F.linear(x, l1.weight, l1.bias), approximate=approximate), 0.4, True)
    y_want = F.linear(h, l2.weight, l2.bias) + r
    torch.testing.assert_close(y, y_want)
    dy = torch.randn_like(y)
    params = [x, *ours.parameters()]
    for got, want in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(y_want, params, dy)):
        torch.testing.assert_close(got, want)
    # In eval mode dropout is off and the fused feed-forward runs (deterministic).
    ours.eval()
    torch.testing.assert_close(ours(x), ours(x), rtol=0, atol=0)
    torch.testing.assert_close(ours(x), reference.feed_forward(x, l1.weight, l1.bias, l2.weight,
                                                              l2.bias, approximate))


def test_module_constructor_and_repr():
    ff = lightllm.nn.FeedForward(8, 32, dropout=0.25, approximate="tanh", bias=False,
                                 dtype=torch.float16)
    assert ff.linear1.weight.shape == (32, 8) and ff.linear2.weight.shape == (8, 32)
    assert ff.linear1.bias is None and ff.linear1.weight.dtype == torch.float16
    assert ff.dropout.p == 0.25 and "tanh" in repr(ff)
    with pytest.raises(ValueError, match="approximate"):
        lightllm.nn.FeedForward(8, 32, approximate="erf")


def _args(**over):
    x, w1, b1, w2, b2, r = make_inputs(4, 16, 24, torch.float32)
    args = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "residual": r, "approximate": "none",
            "activation": "gelu"}
    args.update(over)
    return args


def _call(**over):
    a = _args(**over)
    return LF.feed_forward(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["approximate"],
                           residual=a["residual"], activation=a["activation"])


@pytest.mark.parametrize(
    "over, error, match",
    [
        ({"w1": torch.randn(24, 15)}, ValueError, "w1 of shape .* expects in_features=15"),
        ({"w2": torch.randn(16, 23)}, ValueError, r"w2 of shape .* but w1's out_features"),
        ({"w2": torch.randn(16)}, ValueError, "w2 must be 2-D"),
        ({"b1": torch.randn(16)}, ValueError, r"b1 must have shape \(24,\)"),
        ({"b2": torch.randn(24)}, ValueError, r"b2 must have shape \(16,\)"),
        ({"residual": torch.randn(4, 15)}, ValueError, "residual .* not broadcastable"),
        ({"residual": torch.randn(4, 16).half()}, TypeError, "dtype"),
        ({"w2": torch.randn(16, 24).half()}, TypeError, "dtype"),
        ({"b1": torch.randn(24, device="meta")}, RuntimeError, "device"),
        ({"x": torch.ones(4, 16, dtype=torch.int64)}, TypeError, "x must have dtype"),
        ({"approximate": "sigmoid"}, ValueError, "approximate"),
        ({"activation": "silu"}, ValueError, "activation must be 'gelu' or 'relu'"),
    ],
)
def test_bad_inputs_raise_clear_errors(over, error, match):
    over = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
            for k, v in over.items()}
    with pytest.raises(error, match=match):
        _call(**over)
