"""LayerNorm and Add & Norm: parity (docs/design.md §4), edge numerics, modules, registration, errors."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, dtype_params

import lightllm
import lightllm.functional as LF
from lightllm.kernels import norm as kernel
from lightllm.reference import norm as reference
from lightllm.testing import assert_parity, grads, leaves

ROWS = [1, 7, 97]
HIDDEN = [1, 3, 1023, 1500, 4096]
AFFINE = ["weight+bias", "weight", "none"]


def _params(n, affine, dtype, param_dtype=None):
    dt = param_dtype or dtype
    w = torch.randn(n, device=DEVICE, dtype=dt) if affine != "none" else None
    b = torch.randn(n, device=DEVICE, dtype=dt) if affine == "weight+bias" else None
    return w, b




def check_layer_norm(x, shape, w, b, eps=1e-5, dy=None):
    """Forward and every gradient of lightllm against float64, PyTorch's own op as the budget."""
    ours = leaves(x, w, b)
    y = LF.layer_norm(ours[0], shape, ours[1], ours[2], eps)
    mine = leaves(x, w, b)
    y_torch = F.layer_norm(mine[0], shape, mine[1], mine[2], eps)
    ref = leaves(x, w, b, dtype=torch.float64)
    y_ref = reference.layer_norm(ref[0], shape, ref[1], ref[2], eps)
    assert_parity(y, y_ref, y_torch, name="y")
    dy = torch.randn_like(y) if dy is None else dy
    for name, g, g_ref, g_torch in zip(
        ("dx", "dweight", "dbias"),
        grads(y, ours, dy), grads(y_ref, ref, dy.double()), grads(y_torch, mine, dy),
    ):
        if g_ref is not None:
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


def check_add_layer_norm(x, r, shape, w, b, eps=1e-5):
    ours = leaves(x, r, w, b)
    y, s = LF.add_layer_norm(ours[0], ours[1], shape, ours[2], ours[3], eps)
    mine = leaves(x, r, w, b)
    s_torch = mine[0] + mine[1]
    y_torch = F.layer_norm(s_torch, shape, mine[2], mine[3], eps)
    ref = leaves(x, r, w, b, dtype=torch.float64)
    y_ref, s_ref = reference.add_layer_norm(ref[0], ref[1], shape, ref[2], ref[3], eps)
    assert_parity(y, y_ref, y_torch, name="y")
    assert_parity(s, s_ref, s_torch, name="x + residual")
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    for name, g, g_ref, g_torch in zip(
        ("dx", "dresidual", "dweight", "dbias"),
        grads((y, s), ours, (dy, ds)),
        grads((y_ref, s_ref), ref, (dy.double(), ds.double())),
        grads((y_torch, s_torch), mine, (dy, ds)),
    ):
        if g_ref is not None:
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_layer_norm(rows, hidden, dtype):
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    check_layer_norm(x, (hidden,), *_params(hidden, "weight+bias", dtype))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("hidden", [3, 1023])
def test_layer_norm_affine(hidden, affine, dtype):
    x = torch.randn(13, hidden, device=DEVICE, dtype=dtype)
    check_layer_norm(x, (hidden,), *_params(hidden, affine, dtype))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("hidden", [1, 1023, 4096])
@pytest.mark.parametrize("rows", [1, 97])
def test_add_layer_norm(rows, hidden, dtype):
    x = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    r = torch.randn(rows, hidden, device=DEVICE, dtype=dtype)
    check_add_layer_norm(x, r, (hidden,), *_params(hidden, "weight+bias", dtype))


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
def test_add_layer_norm_affine(affine, dtype):
    x = torch.randn(5, 1500, device=DEVICE, dtype=dtype)
    r = torch.randn(5, 1500, device=DEVICE, dtype=dtype)
    check_add_layer_norm(x, r, (1500,), *_params(1500, affine, dtype))


def backward_candidates(hidden):
    """pytest params: one backward candidate per kernel path for rows of ``hidden`` (ROW_SPLIT,
    ROW_STAGES; the interpreter ignores num_warps), the default first."""
    paths = {}
    for c in kernel.bwd_candidates(hidden):
        paths.setdefault((c.kwargs["ROW_SPLIT"], c.kwargs["ROW_STAGES"]), c)
    return [pytest.param(hidden, c, id=f"{hidden}-split{split}-stages{stages}")
            for (split, stages), c in paths.items()]


def launching(monkeypatch, module, name, config):
    """Make ``module.name`` (a backward launcher) launch ``config``; returns the list of its calls."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(config) or real(*a, config=config))
    return calls


# Rows of 1023 (every split and the pipelined loop) and of 9000 (the tiled backward: its default,
# through the same config argument).
BACKWARD_CANDIDATES = backward_candidates(1023) + backward_candidates(9000)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("hidden, config", BACKWARD_CANDIDATES)
def test_backward_candidates(hidden, config, dtype, monkeypatch):
    """Each candidate the GPU's autotuner may pick (the interpreter runs only the default): dx,
    dresidual (the ds path), dweight, dbias on 37 rows, more than the 8 programs of the plan here."""
    calls = launching(monkeypatch, kernel, "layer_norm_bwd", config)
    x = torch.randn(37, hidden, device=DEVICE, dtype=dtype)
    check_add_layer_norm(x, torch.randn_like(x), (hidden,), *_params(hidden, "weight+bias", dtype))
    check_layer_norm(x, (hidden,), *_params(hidden, "weight+bias", dtype))
    assert calls == [config, config]


def test_backward_refuses_a_config_that_is_no_candidate():
    x = torch.randn(4, 9000, device=DEVICE)
    split = next(c for c in kernel.BWD_CONFIGS if c.kwargs["ROW_SPLIT"] > 1)
    with pytest.raises(ValueError, match="not a candidate"):
        kernel.layer_norm_bwd(x, x, None, torch.zeros(4), torch.ones(4), None, False, False,
                              config=split)


@pytest.mark.parametrize("hidden", [9000, 20000])  # backward tiled / forward and backward tiled
def test_long_rows_take_the_tiled_path(hidden):
    assert hidden > kernel.MAX_FUSED_BWD
    x = torch.randn(3, hidden, device=DEVICE) * 3 + 1
    check_layer_norm(x, (hidden,), *_params(hidden, "weight+bias", torch.float32))
    r = torch.randn(3, hidden, device=DEVICE)
    check_add_layer_norm(x, r, (hidden,), *_params(hidden, "weight", torch.float32))


def test_multi_dim_normalized_shape_and_leading_dims():
    x = torch.randn(2, 3, 5, 7, device=DEVICE)
    w, b = torch.randn(5, 7, device=DEVICE), torch.randn(5, 7, device=DEVICE)
    check_layer_norm(x, (5, 7), w, b, eps=1e-3)
    check_add_layer_norm(x, torch.randn_like(x), (5, 7), w, b)


def test_mixed_precision_parameters():
    """fp16 activations with fp32 parameters, as PyTorch allows on CUDA."""
    x = torch.randn(9, 257, device=DEVICE, dtype=torch.float16)
    w, b = _params(257, "weight+bias", torch.float16, param_dtype=torch.float32)
    y = LF.layer_norm(x, (257,), w, b)
    y_ref = reference.layer_norm(x.double(), (257,), w.double(), b.double())
    y_half = F.layer_norm(x, (257,), w.half(), b.half())  # PyTorch's fp16 result sets the budget
    assert y.dtype == torch.float16
    assert_parity(y, y_ref, y_half)


def test_non_contiguous_inputs_and_stride0_gradient():
    base = torch.randn(11, 2 * 300, device=DEVICE)
    x = base[:, ::2]  # strided columns: not even row-contiguous
    assert not x.is_contiguous()
    w, b = _params(300, "weight+bias", torch.float32)
    check_layer_norm(x, (300,), w, b)
    x_rows = base[:, :300]  # contiguous rows with a row stride of 600: used in place
    check_layer_norm(x_rows, (300,), w, b)
    check_layer_norm(torch.randn(11, 300, device=DEVICE).t(), (11,),
                     *_params(11, "weight", torch.float32))
    # y.sum().backward() hands the backward a stride-0 expanded gradient.
    y = torch.empty(11, 300, device=DEVICE)
    check_layer_norm(x, (300,), w, b, dy=torch.ones(1, device=DEVICE).expand_as(y))
    check_add_layer_norm(x, torch.randn(300, 11, device=DEVICE).t(), (300,), w, b)


def test_nan_propagates_to_its_row_only():
    x = torch.randn(4, 100, device=DEVICE)
    x[1, 17] = float("nan")
    y = LF.layer_norm(x, (100,), *_params(100, "weight+bias", torch.float32))
    assert y[1].isnan().all()
    assert torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
def test_large_magnitudes_and_offsets(dtype):
    """A large common offset must not cost precision (two-pass statistics, fp32)."""
    big = 1e4 if dtype == torch.float32 else 3e3
    x = (torch.randn(8, 1023, device=DEVICE) * big / 10 + big).to(dtype)
    check_layer_norm(x, (1023,), *_params(1023, "weight+bias", dtype))
    x = (torch.randn(2, 20000, device=DEVICE) + 1e4).to(torch.float32)
    check_layer_norm(x, (20000,), None, None)


def test_constant_rows_and_eps():
    x = torch.full((3, 64), 2.5, device=DEVICE)
    y = LF.layer_norm(x, (64,), eps=1e-5)
    assert torch.equal(y, torch.zeros_like(y))


def test_empty_inputs():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    y = LF.layer_norm(x, (16,))
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    y, s = LF.add_layer_norm(torch.randn(2, 0, 16, device=DEVICE), torch.randn(2, 0, 16, device=DEVICE), 16)
    assert y.shape == s.shape == (2, 0, 16)


def test_float64_falls_back_to_the_reference():
    x = torch.randn(4, 10, device=DEVICE, dtype=torch.float64)
    y = LF.layer_norm(x, (10,))
    torch.testing.assert_close(y, F.layer_norm(x, (10,)))


def test_kernel_is_what_runs(monkeypatch):
    """On CUDA, and on CPU under the interpreter, the Triton launcher (not the reference) runs."""
    calls = []
    real = kernel.layer_norm_fwd
    monkeypatch.setattr(kernel, "layer_norm_fwd", lambda *a: calls.append(1) or real(*a))
    LF.layer_norm(torch.randn(3, 8, device=DEVICE), (8,))
    assert calls == [1]


def test_registered_ops_pass_opcheck():
    x = torch.randn(6, 33, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 33, device=DEVICE, requires_grad=True)
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    b = torch.randn(33, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.lightllm.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.lightllm.layer_norm_fwd.default, (x, None, None, 1e-5))
    torch.library.opcheck(torch.ops.lightllm.add_layer_norm_fwd.default, (x, r, w, b, 1e-5))
    _, mean, rstd = torch.ops.lightllm.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    dy = torch.randn(6, 33, device=DEVICE)
    torch.library.opcheck(torch.ops.lightllm.layer_norm_bwd.default,
                          (dy, x.detach(), w.detach(), mean, rstd, None, True, True))
    torch.library.opcheck(torch.ops.lightllm.layer_norm_bwd.default,
                          (dy, x.detach(), None, mean, rstd, dy, False, False))


def test_torch_compile_fullgraph():
    block = torch.nn.Sequential(torch.nn.Linear(16, 16), lightllm.nn.LayerNorm(16)).to(DEVICE)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, block(x))
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("elementwise_affine", [True, False])
def test_module_is_a_drop_in(elementwise_affine, bias):
    theirs = torch.nn.LayerNorm((4, 6), eps=1e-6, elementwise_affine=elementwise_affine, bias=bias)
    ours = lightllm.nn.LayerNorm((4, 6), eps=1e-6, elementwise_affine=elementwise_affine, bias=bias)
    if elementwise_affine:
        with torch.no_grad():  # non-trivial parameters so loading them matters
            theirs.weight.normal_()
            if bias:
                theirs.bias.normal_()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours).replace("lightllm.", "") == repr(theirs)
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(DEVICE), ours.to(DEVICE)
    x = torch.randn(3, 4, 6, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x))


def test_add_layer_norm_module():
    module = lightllm.nn.AddLayerNorm(32).to(DEVICE)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x, r = torch.randn(4, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE)
    y, s = module(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (32,), module.weight, module.bias))
    assert set(module.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: LF.layer_norm(x, (7,)), ValueError, "normalized_shape"),
        (lambda x: LF.layer_norm(x, ()), ValueError, "at least one dimension"),
        (lambda x: LF.layer_norm(x, "16"), TypeError, "normalized_shape"),
        (lambda x: LF.layer_norm(x, (16,), torch.randn(15, device=DEVICE)), ValueError, "weight"),
        (lambda x: LF.layer_norm(x, (16,), None, torch.randn(4, 4, device=DEVICE)), ValueError,
         "bias"),
        (lambda x: LF.layer_norm(x.long(), (16,)), TypeError, "input must have dtype"),
        (lambda x: LF.layer_norm(x, (16,), torch.ones(16, dtype=torch.int32, device=DEVICE)),
         TypeError, "weight"),
        (lambda x: LF.layer_norm(x, (16,), torch.ones(16, device="meta")), RuntimeError, "device"),
        (lambda x: LF.layer_norm([1.0], (1,)), TypeError, "torch.Tensor"),
        (lambda x: LF.add_layer_norm(x, x.half(), (16,)), TypeError, "dtype"),
        (lambda x: LF.add_layer_norm(x, x[:2], (16,)), ValueError, "residual"),
        (lambda x: LF.add_layer_norm(x, x.to("meta"), (16,)), RuntimeError, "device"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 16, device=DEVICE))


@pytest.mark.cuda
def test_backward_is_deterministic_on_gpu():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    first = torch.autograd.grad(LF.layer_norm(x, (1024,), w, b), (x, w, b), dy)
    for _ in range(20):
        again = torch.autograd.grad(LF.layer_norm(x, (1024,), w, b), (x, w, b), dy)
        assert all(torch.equal(a, g) for a, g in zip(first, again))


@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_int64_offsets_on_gpu():
    """More than 2^31 elements: row offsets must be 64-bit."""
    rows, hidden = (2**31) // 4096 + 3, 4096
    try:
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.float16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element tensor")
    y = LF.layer_norm(x, (hidden,))
    torch.testing.assert_close(y[-2:].float(), F.layer_norm(x[-2:].float(), (hidden,)), atol=2e-3, rtol=2e-3)
