"""RMSNorm and Add & RMSNorm: parity (docs/design.md §4) on both routes — the Triton kernels (CUDA, or
the interpreter on CPU) and the native CPU path's C++ kernels — LlamaRMSNorm's casting order, edge
numerics, modules, registration, the kernels proven to run, and bad input."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16_ON_CPU, DEVICE, HAS_CUDA
from test_norm import BACKWARD_CANDIDATES, launching

import lightllm
import lightllm.functional as LF
from lightllm import _dispatch
from lightllm.kernels import norm as kernel
from lightllm.ops import norm as norm_op
from lightllm.reference import norm as reference
from lightllm.testing import DispatchedOps, assert_parity, grads, leaves

F32_EPS = torch.finfo(torch.float32).eps
HAS_CPP = norm_op.HAS_CPU_KERNELS
TRITON_HERE = _dispatch.triton_runs_on(torch.device(DEVICE))
ROWS = [1, 7, 97]
HIDDEN = [1, 7, 1023, 1500, 4096]


def routes(*dtypes):
    """(route, dtype) params: "triton" runs on DEVICE (the interpreter on CPU: no bfloat16), "cpp"
    runs CPU tensors on the native path (bfloat16 included)."""
    out = []
    for dt in dtypes or (torch.float32, torch.float16, torch.bfloat16):
        name = str(dt).replace("torch.", "")
        marks = []
        if not TRITON_HERE:
            marks.append(pytest.mark.skip(reason="the Triton kernels do not run here"))
        elif dt == torch.bfloat16 and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason=BF16_ON_CPU))
        out.append(pytest.param("triton", dt, id=f"triton-{name}", marks=marks))
        cpp_marks = [] if HAS_CPP else [pytest.mark.skip(reason="lightllm._C has no CPU kernels")]
        out.append(pytest.param("cpp", dt, id=f"cpp-{name}", marks=cpp_marks))
    return out


@contextlib.contextmanager
def on(route):
    """Yields the device of the route, with the native CPU path switched on for "cpp"."""
    if route == "cpp":
        with _dispatch.native_cpu():
            yield "cpu"
    else:
        yield DEVICE


def torch_rms_norm(x, shape, w, eps, cast=False):
    """PyTorch's own result in the test dtype, in the casting order asked for."""
    if cast and w is not None:
        return w * F.rms_norm(x, shape, None, eps)
    return F.rms_norm(x, shape, w, eps)


def check_rms_norm(x, shape, w, eps=1e-6, dy=None, cast=False):
    """Forward and every gradient of lightllm against float64, PyTorch's own op as the budget."""
    ref_eps = F32_EPS if eps is None else eps  # float64's own default eps would be 2e-16
    ours = leaves(x, w)
    y = LF.rms_norm(ours[0], shape, ours[1], eps, cast_before_weight=cast)
    mine = leaves(x, w)
    y_torch = torch_rms_norm(mine[0], shape, mine[1], ref_eps, cast)
    ref = leaves(x, w, dtype=torch.float64)
    y_ref = reference.rms_norm(ref[0], shape, ref[1], ref_eps, cast)
    assert_parity(y, y_ref, y_torch, name="y")
    dy = torch.randn_like(y) if dy is None else dy
    for name, g, g_ref, g_torch in zip(
        ("dx", "dweight"), grads(y, ours, dy), grads(y_ref, ref, dy.double()),
        grads(y_torch, mine, dy),
    ):
        if g_ref is not None:
            assert g.dtype == g_torch.dtype, name
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


def check_add_rms_norm(x, r, shape, w, eps=1e-6, dy=None, ds=None):
    ours = leaves(x, r, w)
    y, s = LF.add_rms_norm(ours[0], ours[1], shape, ours[2], eps)
    mine = leaves(x, r, w)
    s_torch = mine[0] + mine[1]
    y_torch = F.rms_norm(s_torch, shape, mine[2], eps)
    ref = leaves(x, r, w, dtype=torch.float64)
    y_ref, s_ref = reference.add_rms_norm(ref[0], ref[1], shape, ref[2], eps)
    assert_parity(y, y_ref, y_torch, name="y")
    assert_parity(s, s_ref, s_torch, name="x + residual")
    dy = torch.randn_like(y) if dy is None else dy
    ds = torch.randn_like(s) if ds is None else ds
    for name, g, g_ref, g_torch in zip(
        ("dx", "dresidual", "dweight"),
        grads((y, s), ours, (dy, ds)),
        grads((y_ref, s_ref), ref, (dy.double(), ds.double())),
        grads((y_torch, s_torch), mine, (dy, ds)),
    ):
        if g_ref is not None:
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


# -- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route, dtype", routes())
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm(rows, hidden, route, dtype):
    with on(route) as dev:
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        check_rms_norm(x, (hidden,), torch.randn(hidden, device=dev, dtype=dtype))


@pytest.mark.parametrize("route, dtype", routes())
@pytest.mark.parametrize("hidden", [1, 1023])
def test_rms_norm_without_weight(hidden, route, dtype):
    with on(route) as dev:
        check_rms_norm(torch.randn(13, hidden, device=dev, dtype=dtype), (hidden,), None)


@pytest.mark.parametrize("route, dtype", routes())
@pytest.mark.parametrize("hidden", [1, 1023, 4096])
@pytest.mark.parametrize("rows", [1, 97])
def test_add_rms_norm(rows, hidden, route, dtype):
    with on(route) as dev:
        x = torch.randn(rows, hidden, device=dev, dtype=dtype)
        r = torch.randn(rows, hidden, device=dev, dtype=dtype)
        check_add_rms_norm(x, r, (hidden,), torch.randn(hidden, device=dev, dtype=dtype))
        if rows == 1:
            check_add_rms_norm(x, r, (hidden,), None)


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
@pytest.mark.parametrize("hidden", [9000, 20000])  # Triton: backward tiled / both tiled
def test_long_rows(hidden, route, dtype):
    assert hidden > kernel.MAX_FUSED_BWD
    with on(route) as dev:
        x = torch.randn(3, hidden, device=dev) * 3 + 1
        w = torch.randn(hidden, device=dev)
        check_rms_norm(x, (hidden,), w)
        check_add_rms_norm(x, torch.randn(3, hidden, device=dev), (hidden,), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden, config", BACKWARD_CANDIDATES)
@pytest.mark.skipif(not TRITON_HERE, reason="the Triton kernels do not run here")
def test_backward_candidates(hidden, config, dtype, monkeypatch):
    """Each backward candidate the GPU's autotuner may pick (the interpreter runs only the
    default; test_norm.py lists them): dx, dresidual (the ds path), dweight on 37 rows."""
    calls = launching(monkeypatch, kernel, "rms_norm_bwd", config)
    x = torch.randn(37, hidden, device=DEVICE, dtype=dtype)
    w = torch.randn(hidden, device=DEVICE, dtype=dtype)
    check_add_rms_norm(x, torch.randn_like(x), (hidden,), w)
    check_rms_norm(x, (hidden,), w)
    assert calls == [config, config]


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_leading_dims_and_multi_dim_normalized_shape(route, dtype):
    with on(route) as dev:
        x = torch.randn(2, 3, 5, 7, device=dev)
        check_rms_norm(x, (5, 7), torch.randn(5, 7, device=dev), eps=1e-3)
        check_rms_norm(x, (7,), torch.randn(7, device=dev))
        check_rms_norm(x, [3, 5, 7], None)
        check_add_rms_norm(x, torch.randn_like(x), (5, 7), torch.randn(5, 7, device=dev))


@pytest.mark.parametrize("route, dtype", routes(torch.float32, torch.float16))
def test_non_contiguous_inputs_and_stride0_gradients(route, dtype):
    with on(route) as dev:
        base = torch.randn(11, 600, device=dev, dtype=dtype)
        w = torch.randn(300, device=dev, dtype=dtype)
        x = base[:, ::2]  # strided columns: copied
        assert not x.is_contiguous()
        check_rms_norm(x, (300,), w)
        check_rms_norm(base[:, :300], (300,), w)  # a row stride of 600: read in place
        check_rms_norm(torch.randn(300, 11, device=dev, dtype=dtype).t(), (300,), w)
        # y.sum().backward() hands in an expanded scalar; a broadcast row has strides (0, 1).
        ones = torch.ones((), device=dev, dtype=dtype).expand(11, 300)
        row = torch.randn(1, 300, device=dev, dtype=dtype).expand(11, 300)
        check_rms_norm(x, (300,), w, dy=ones)
        check_rms_norm(x, (300,), w, dy=row)
        check_add_rms_norm(x, torch.randn(300, 11, device=dev, dtype=dtype).t(), (300,), w,
                           dy=row, ds=ones)


@pytest.mark.parametrize("route, dtype", routes(torch.float16, torch.bfloat16))
def test_mixed_dtype_weights(route, dtype):
    """F.rms_norm takes a weight of any float dtype; the output keeps the input's dtype."""
    with on(route) as dev:
        x = torch.randn(9, 257, device=dev, dtype=dtype)
        check_rms_norm(x, (257,), torch.randn(257, device=dev))  # fp32 weight, half input
        check_rms_norm(x.float(), (257,), torch.randn(257, device=dev, dtype=dtype))
        assert LF.rms_norm(x.float(), 257, torch.randn(257, device=dev, dtype=dtype)).dtype == \
            torch.float32


# -- LlamaRMSNorm's casting order ---------------------------------------------------------------------


def llama_rms_norm(x, w, eps):
    """transformers' LlamaRMSNorm.forward, inline."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("param", ["same", "float32"])
@pytest.mark.parametrize("route, dtype", routes(torch.float16, torch.bfloat16))
def test_cast_before_weight_is_llamas_order(route, dtype, param):
    """weight * normed.to(x.dtype): the output is exactly the weight times lightllm's normalised
    value in x's dtype, that value is within one ulp of LlamaRMSNorm's (the fp32 rstd may differ in
    its last bit), and the dtype is torch.result_type(weight, x)."""
    with on(route) as dev:
        x = torch.randn(64, 1023, device=dev, dtype=dtype) * 3
        w = torch.randn(1023, device=dev, dtype=dtype if param == "same" else torch.float32)
        y = LF.rms_norm(x, (1023,), w, 1e-6, cast_before_weight=True)
        want = llama_rms_norm(x, w, 1e-6)
        assert y.dtype == want.dtype == torch.result_type(w, x)
        normed = LF.rms_norm(x, (1023,), None, 1e-6)
        assert normed.dtype == dtype
        assert torch.equal(y, w * normed)
        xf = x.float()
        llama_normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        diff = (normed.float() - llama_normed.float()).abs()
        ulp = torch.finfo(dtype).eps * torch.maximum(normed.float().abs(), llama_normed.float().abs())
        assert (diff <= ulp).all()
        assert (y == want).float().mean() > 0.99
        check_rms_norm(x, (1023,), w, cast=True)
        # The module carries the switch as an instance attribute.
        module = lightllm.nn.RMSNorm(1023, eps=1e-6).to(dev)
        with torch.no_grad():
            module.weight.copy_(w)
        module.cast_before_weight = True
        assert torch.equal(module(x), LF.rms_norm(x, 1023, module.weight, 1e-6,
                                                  cast_before_weight=True))


# -- edge numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_nan_propagates_to_its_row_only(route, dtype):
    with on(route) as dev:
        x = torch.randn(4, 100, device=dev)
        x[1, 17] = float("nan")
        y = LF.rms_norm(x, (100,), torch.randn(100, device=dev))
        assert y[1].isnan().all() and torch.isfinite(y[[0, 2, 3]]).all()
        y, s = LF.add_rms_norm(x, torch.randn_like(x), (100,))
        assert y[1].isnan().all() and torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("hidden", [1000, 20000])
@pytest.mark.parametrize("route, dtype", routes(torch.float32, torch.bfloat16))
def test_large_magnitudes_do_not_overflow(route, dtype, hidden):
    """Squares of |x| > ~1e19 overflow fp32 (PyTorch's own F.rms_norm then gives 0): lightllm
    sums them again in units of the row's largest magnitude."""
    with on(route) as dev:
        for scale in (1e4, 1e10, 1e20, 1e30):
            x = (torch.randn(3, hidden, device=dev) * scale).to(dtype)
            w = torch.randn(hidden, device=dev, dtype=dtype)
            y = LF.rms_norm(x, (hidden,), w)
            want = reference.rms_norm(x.double(), (hidden,), w.double(), F32_EPS)
            assert torch.isfinite(y).all()
            tol = 2e-6 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(y.double(), want, atol=tol * want.abs().max().item(),
                                       rtol=tol)
        # An inf element keeps PyTorch's answer: rstd = 0, so inf * 0 = NaN there and 0 elsewhere.
        x[0, 3] = float("inf")
        torch.testing.assert_close(LF.rms_norm(x, (hidden,))[0], F.rms_norm(x, (hidden,))[0],
                                   equal_nan=True)


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_zero_rows_single_elements_and_empty_tensors(route, dtype):
    with on(route) as dev:
        y = LF.rms_norm(torch.zeros(3, 64, device=dev), (64,), torch.randn(64, device=dev))
        assert torch.equal(y, torch.zeros_like(y))
        x = torch.randn(5, 1, device=dev)
        torch.testing.assert_close(LF.rms_norm(x, (1,)), F.rms_norm(x, (1,)))
        x = torch.randn(0, 16, device=dev, requires_grad=True)
        y = LF.rms_norm(x, (16,), eps=1e-5)
        assert y.shape == (0, 16)
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad.shape == (0, 16)
        y, s = LF.add_rms_norm(torch.randn(2, 0, 16, device=dev), torch.randn(2, 0, 16, device=dev),
                               16)
        assert y.shape == s.shape == (2, 0, 16)
        assert LF.rms_norm(torch.randn(3, 0, device=dev), (0,)).shape == (3, 0)


@pytest.mark.parametrize("route, dtype", routes(torch.float32, torch.float16))
def test_eps_none_is_float32_epsilon(route, dtype):
    with on(route) as dev:
        x = torch.randn(6, 33, device=dev, dtype=dtype) * 1e-3  # small rows: eps matters
        w = torch.randn(33, device=dev, dtype=dtype)
        assert torch.equal(LF.rms_norm(x, (33,), w), LF.rms_norm(x, (33,), w, F32_EPS))
        check_rms_norm(x, (33,), w, eps=None)


def test_float64_runs_pytorchs_own_op():
    x = torch.randn(4, 10, device=DEVICE, dtype=torch.float64)
    w = torch.randn(10, device=DEVICE, dtype=torch.float64)
    assert torch.equal(LF.rms_norm(x, (10,), w), F.rms_norm(x, (10,), w))
    x32 = x.float()  # a float64 weight beside a float32 input: PyTorch multiplies in float64
    assert torch.equal(LF.rms_norm(x32, (10,), w), F.rms_norm(x32, (10,), w))


# -- the kernels ran --------------------------------------------------------------------------------


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_launchers_run(route, dtype, monkeypatch):
    """The Triton launchers on the Triton route, the C++ ones on the native path; never PyTorch's."""
    calls = []
    target = kernel if route == "triton" else norm_op._CPU
    for name in ("rms_norm_fwd", "rms_norm_bwd"):
        real = getattr(target, name)
        monkeypatch.setattr(target, name, lambda *a, real=real, name=name: calls.append(name) or
                            real(*a))
    monkeypatch.setattr(F, "rms_norm", None)  # would raise if the fallback ran
    with on(route) as dev:
        x = torch.randn(5, 64, device=dev, requires_grad=True)
        w = torch.randn(64, device=dev, requires_grad=True)
        (LF.rms_norm(x, (64,), w) * torch.randn(5, 64, device=dev)).sum().backward()
        y, s = LF.add_rms_norm(x, torch.randn(5, 64, device=dev), (64,), w)
        (y * torch.randn_like(y) + s * torch.randn_like(s)).sum().backward()
        with torch.no_grad():
            LF.rms_norm(x, (64,), w)
    assert calls == ["rms_norm_fwd", "rms_norm_bwd"] * 2 + ["rms_norm_fwd"]


@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_eager_and_custom_op_routes_agree(route, dtype, op):
    """Plain eager calls the launchers directly; a dispatch mode sees the custom ops. Same kernels,
    same autograd: outputs and gradients bitwise equal, and the mode saw every op."""
    with on(route) as dev:
        inputs = [torch.randn(5, 33, device=dev), torch.randn(5, 33, device=dev),
                  torch.randn(33, device=dev)]
        if op == "rms_norm":
            inputs.pop(1)
            fn, expected = lambda x, w: (LF.rms_norm(x, 33, w),), {"rms_norm_fwd", "rms_norm_bwd"}
        else:
            fn = lambda x, r, w: LF.add_rms_norm(x, r, 33, w)  # noqa: E731
            expected = {"add_rms_norm_fwd", "rms_norm_bwd"}
        projections = []

        def run():
            leaves_ = [t.detach().requires_grad_(True) for t in inputs]
            outs = fn(*leaves_)
            if not projections:
                projections.extend(torch.randn_like(o) for o in outs)
            return [o.detach() for o in outs], torch.autograd.grad(outs, leaves_, projections)

        eager_out, eager_grads = run()
        with DispatchedOps() as mode:
            op_out, op_grads = run()
    assert expected <= set(mode.lightllm), mode.lightllm
    for a, b in zip(eager_out + list(eager_grads), op_out + list(op_grads)):
        assert torch.equal(a, b)


# -- registration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_registered_ops_pass_opcheck(route, dtype):
    with on(route) as dev:
        x = torch.randn(6, 33, device=dev, requires_grad=True)
        r = torch.randn(6, 33, device=dev, requires_grad=True)
        w = torch.randn(33, device=dev, requires_grad=True)
        ops = torch.ops.lightllm
        torch.library.opcheck(ops.rms_norm_fwd.default, (x, w, 1e-6, False))
        torch.library.opcheck(ops.rms_norm_fwd.default, (x, None, 1e-6, False))
        torch.library.opcheck(ops.rms_norm_fwd.default, (x.half(), w, 1e-6, True))
        torch.library.opcheck(ops.add_rms_norm_fwd.default, (x, r, w, 1e-6, False))
        _, s, rstd = ops.add_rms_norm_fwd(x.detach(), r.detach(), w.detach(), 1e-6, False)
        dy = torch.randn(6, 33, device=dev)
        torch.library.opcheck(ops.rms_norm_bwd.default, (dy, s, w.detach(), rstd, dy, True))
        torch.library.opcheck(ops.rms_norm_bwd.default, (dy, s, None, rstd, None, False))
        if route == "cpp":
            torch.library.opcheck(ops.rms_norm_fwd_cpu.default, (x.detach(), r.detach(), w.detach(),
                                                                 1e-6, False))
            torch.library.opcheck(ops.rms_norm_fwd_cpu.default,
                                  (x.detach().bfloat16(), None, w.detach(), 1e-6, True))
            torch.library.opcheck(ops.rms_norm_bwd_cpu.default,
                                  (torch.ones(()).expand(6, 33), s, w.detach(), rstd, None, True))


@pytest.mark.parametrize("route, dtype", routes(torch.float32))
def test_torch_compile_fullgraph(route, dtype):
    with on(route) as dev:
        linear = torch.nn.Linear(16, 16).to(dev)
        norm, add_norm = lightllm.nn.RMSNorm(16).to(dev), lightllm.nn.AddRMSNorm(16).to(dev)

        def block(x):
            h = norm(linear(x))
            y, s = add_norm(h, x)
            return y * s

        compiled = torch.compile(block, fullgraph=True)
        x = torch.randn(5, 16, device=dev, requires_grad=True)
        y = compiled(x)
        (y * torch.randn_like(y)).sum().backward()
        torch.testing.assert_close(y, block(x))
        assert x.grad is not None and torch.isfinite(x.grad).all()


# -- modules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("elementwise_affine", [True, False])
def test_module_is_a_drop_in(elementwise_affine, eps):
    theirs = torch.nn.RMSNorm((4, 6), eps=eps, elementwise_affine=elementwise_affine)
    ours = lightllm.nn.RMSNorm((4, 6), eps=eps, elementwise_affine=elementwise_affine)
    if elementwise_affine:
        with torch.no_grad():
            theirs.weight.normal_()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert repr(ours).replace("lightllm.", "") == repr(theirs)
    ours.load_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(DEVICE), ours.to(DEVICE)
    x = torch.randn(3, 4, 6, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x))
    assert isinstance(ours, torch.nn.RMSNorm)


def test_add_rms_norm_module():
    module = lightllm.nn.AddRMSNorm(32, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        module.weight.normal_()
    x, r = torch.randn(4, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE)
    y, s = module(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.rms_norm(x + r, (32,), module.weight, 1e-6))
    assert set(module.state_dict()) == {"weight"}


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: LF.rms_norm(x, (7,)), ValueError, "normalized_shape"),
        (lambda x: LF.rms_norm(x, ()), ValueError, "at least one dimension"),
        (lambda x: LF.rms_norm(x, "16"), TypeError, "normalized_shape"),
        (lambda x: LF.rms_norm(x, (16,), torch.randn(15, device=x.device)), ValueError, "weight"),
        (lambda x: LF.rms_norm(x.long(), (16,)), TypeError, "input must have dtype"),
        (lambda x: LF.rms_norm(x, (16,), torch.ones(16, dtype=torch.int32, device=x.device)),
         TypeError, "weight"),
        (lambda x: LF.rms_norm(x, (16,), torch.ones(16, device="meta")), RuntimeError, "device"),
        (lambda x: LF.rms_norm(x, (16,), [1.0] * 16), TypeError, "weight must be a torch.Tensor"),
        (lambda x: LF.rms_norm([1.0], (1,)), TypeError, "torch.Tensor"),
        (lambda x: LF.add_rms_norm(x, x.half(), (16,)), TypeError, "residual"),
        (lambda x: LF.add_rms_norm(x, x[:2], (16,)), ValueError, "residual"),
        (lambda x: LF.add_rms_norm(x, x.to("meta"), (16,)), RuntimeError, "device"),
        (lambda x: LF.add_rms_norm(x, None, (16,)), TypeError, "residual"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 16, device=DEVICE))


# -- the C++ kernels themselves -----------------------------------------------------------------------

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="lightllm._C has no CPU kernels")

_CHILD = """
import sys, torch
from lightllm import _C
outputs = []
for x, r, w, eps, cast, dy, ds in torch.load(sys.argv[1]):
    y, s, rstd = torch.ops.lightllm.rms_norm_fwd_cpu(x, r, w, eps, cast)
    dx, dw = torch.ops.lightllm.rms_norm_bwd_cpu(dy, x if r is None else s, w, rstd, ds, True)
    outputs.append((y, s, dx, dw))
torch.save(outputs, sys.argv[2])
"""


@needs_cpp
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_each_instruction_set(isa, tmp_path):
    """The row kernels are compiled for AVX-512, AVX2 and the x86-64 baseline; LIGHTLLM_CPU_ISA caps
    the choice (read once per process, hence a child process). The 1e30 case takes the rescaled
    sum of squares."""
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for residual in (False, True):
            x = torch.randn(7, 1500, dtype=dtype)
            r = torch.randn(7, 1500, dtype=dtype) if residual else None
            ds = torch.randn(7, 1500, dtype=dtype) if residual else None
            cases.append((x, r, torch.randn(1500, dtype=dtype), 1e-6, dtype != torch.float32,
                          torch.randn(7, 1500, dtype=dtype), ds))
    cases.append((torch.randn(3, 1000) * 1e30, None, torch.randn(1000), 1e-6, False,
                  torch.randn(3, 1000), None))
    src, dst = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(cases, src)
    subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], check=True,
                   env=dict(os.environ, LIGHTLLM_CPU_ISA=isa))
    for (x, r, w, eps, cast, dy, ds), (y, s, dx, dw) in zip(cases, torch.load(dst)):
        src_x = x if r is None else x + r
        if r is not None:
            assert torch.equal(s, src_x)
        ref = leaves(src_x, w, dtype=torch.float64)
        y_ref = reference.rms_norm(ref[0], (x.shape[1],), ref[1], eps, cast)
        mine = leaves(src_x, w)
        y_torch = torch_rms_norm(mine[0], (x.shape[1],), mine[1], eps, cast)
        if x.abs().max() > 1e20:  # PyTorch overflows to 0 there: a fixed budget instead
            torch.testing.assert_close(y.double(), y_ref.detach(), rtol=2e-6, atol=1e-5)
            continue
        assert_parity(y, y_ref, y_torch, name="y")
        g_ref, g_torch = grads(y_ref, ref, dy.double()), grads(y_torch, mine, dy)
        if ds is not None:  # the gradient of the returned sum joins dx
            g_ref[0], g_torch[0] = g_ref[0] + ds.double(), g_torch[0] + ds
        assert_parity(dx, g_ref[0], g_torch[0], grad=True, name="dx")
        assert_parity(dw, g_ref[1], g_torch[1].float(), grad=True, name="dw")


@needs_cpp
def test_cpp_backward_is_deterministic_across_thread_counts():
    x, w = torch.randn(300, 1023), torch.randn(1023)
    _, _, rstd = torch.ops.lightllm.rms_norm_fwd_cpu(x, None, w, 1e-6, False)
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (max(threads, 2), 1, max(threads, 2)):
            torch.set_num_threads(n)
            results.append(torch.ops.lightllm.rms_norm_bwd_cpu(dy, x, w, rstd, None, True))
    finally:
        torch.set_num_threads(threads)
    for again in results[1:]:
        assert all(torch.equal(a, g) for a, g in zip(results[0], again))


@needs_cpp
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: torch.ops.lightllm.rms_norm_fwd_cpu(x[0], None, None, 1e-6, False),
         "x must be 2-D"),
        (lambda x: torch.ops.lightllm.rms_norm_fwd_cpu(x.double(), None, None, 1e-6, False),
         "x must have dtype float32, float16 or bfloat16"),
        (lambda x: torch.ops.lightllm.rms_norm_fwd_cpu(x, x.half(), None, 1e-6, False),
         "residual must have x's dtype"),
        (lambda x: torch.ops.lightllm.rms_norm_fwd_cpu(x, None, torch.ones(15), 1e-6, False),
         r"weight must have shape \(16,\)"),
        (lambda x: torch.ops.lightllm.rms_norm_bwd_cpu(x, x, None, torch.ones(5), None, True),
         r"rstd must have shape \(4,\)"),
        (lambda x: torch.ops.lightllm.rms_norm_bwd_cpu(x.half(), x, None, torch.ones(4), None,
                                                       True), "dy must have x's dtype"),
    ],
)
def test_cpp_ops_reject_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.randn(4, 16))
