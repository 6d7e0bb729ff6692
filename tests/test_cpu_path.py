"""The native CPU path (docs/design.md §3): CPU tensors without the interpreter run lightllm's C++
kernels (LayerNorm, Add & Norm, softmax) or PyTorch's native ops (attention, the matmuls) behind
lightllm's validation and edge semantics — never the eager reference.

Every test here runs with the interpreter switched off for CPU tensors (``_dispatch.native_cpu``),
so the suite checks the path a user without a GPU gets, bfloat16 included, beside the interpreted
kernels the other files check. Parity is by the tolerance rule of docs/design.md §4 (the checks of the
op's own test file, on CPU tensors).
"""

import pytest
import torch
import torch.nn.functional as F
from test_attention import check_sdpa
from test_fused_linear import check_linear_gelu
from test_fused_linear_feed_forward import check_feed_forward
from test_norm import check_add_layer_norm, check_layer_norm

import lightllm
import lightllm.functional as LF
from lightllm import _dispatch
from lightllm import reference as reference_pkg
from lightllm.ops import attention as attention_op
from lightllm.ops import fused_linear as fused_linear_op
from lightllm.ops import norm as norm_op

DTYPES = [pytest.param(d, id=str(d)[6:]) for d in (torch.float32, torch.float16, torch.bfloat16)]
needs_cpp = pytest.mark.skipif(not norm_op.HAS_CPU_KERNELS,
                               reason="lightllm._C was built without its CPU LayerNorm kernels")


@pytest.fixture(autouse=True)
def native():
    with _dispatch.native_cpu():
        yield


def _calls(monkeypatch, namespace, *names):
    """Count calls of the functions ``names`` of ``namespace`` (wrapped, still run)."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(namespace, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(namespace, name, counted)
    return counts


# ------------------------------------------------------------------------------------------------
# LayerNorm and Add & Norm: the C++ kernels
# ------------------------------------------------------------------------------------------------


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [1, 3, 1023, 1500, 4096])
@pytest.mark.parametrize("rows", [1, 7, 97])
def test_layer_norm(rows, hidden, dtype):
    x = torch.randn(rows, hidden, dtype=dtype)
    w, b = torch.randn(hidden, dtype=dtype), torch.randn(hidden, dtype=dtype)
    check_layer_norm(x, (hidden,), w, b)
    check_add_layer_norm(x, torch.randn_like(x), (hidden,), w, None)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_layer_norm_float32_parameters_beside_half_inputs(dtype):
    x = torch.randn(9, 257, dtype=dtype)
    w, b = torch.randn(257), torch.randn(257)
    y = LF.layer_norm(x, (257,), w, b)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.layer_norm(x, (257,), w, b))


@needs_cpp
def test_layer_norm_strides_and_stride0_gradient():
    base = torch.randn(11, 600)
    w, b = torch.randn(300), torch.randn(300)
    check_layer_norm(base[:, ::2], (300,), w, b)  # no unit stride
    check_layer_norm(base[:, :300], (300,), w, b)  # a row stride of 600
    check_layer_norm(base[:, :300], (300,), w, b, dy=torch.ones(1).expand(11, 300))
    check_add_layer_norm(base[:, ::2], torch.randn(300, 11).t(), (300,), w, b)


@needs_cpp
def test_layer_norm_runs_the_cpp_kernels(monkeypatch):
    counts = _calls(monkeypatch, norm_op._CPU, "layer_norm_fwd", "layer_norm_bwd")
    x = torch.randn(5, 64, requires_grad=True)
    r = torch.randn(5, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    (LF.layer_norm(x, (64,), w) * torch.randn(5, 64)).sum().backward()
    y, s = LF.add_layer_norm(x, r, (64,), w)
    ((y * torch.randn(5, 64)).sum() + (s * torch.randn(5, 64)).sum()).backward()
    with torch.no_grad():
        lightllm.nn.LayerNorm(64)(x)
    assert counts == {"layer_norm_fwd": 3, "layer_norm_bwd": 2}


@needs_cpp
def test_layer_norm_ops_pass_opcheck_on_the_cpu_path():
    x = torch.randn(6, 33, requires_grad=True)
    r = torch.randn(6, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    torch.library.opcheck(torch.ops.lightllm.layer_norm_fwd.default, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.lightllm.add_layer_norm_fwd.default, (x, r, w, None, 1e-5))
    _, mean, rstd = torch.ops.lightllm.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    dy = torch.randn(6, 33)
    torch.library.opcheck(torch.ops.lightllm.layer_norm_bwd.default,
                          (dy, x.detach(), w.detach(), mean, rstd, dy, True, True))


@needs_cpp
def test_layer_norm_compiles_fullgraph_on_the_cpu_path():
    block = torch.nn.Sequential(torch.nn.Linear(16, 16), lightllm.nn.LayerNorm(16))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16, requires_grad=True)
    y = compiled(x)
    (y * torch.randn_like(y)).sum().backward()
    torch.testing.assert_close(y, block(x))
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------
# Attention: PyTorch's fused CPU SDPA behind lightllm's validation
# ------------------------------------------------------------------------------------------------


def _qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32):
    return (torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, d, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 3, 97, 97, 64), (1, 2, 113, 203, 40), (1, 2, 1, 300, 80)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention(shape, is_causal, dtype):
    b, h, nq, nk, d = shape
    check_sdpa(*_qkv(b, h, h, nq, nk, d, dtype), is_causal=is_causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_gqa_and_fully_masked_rows(dtype):
    q, k, v = _qkv(2, 6, 2, 50, 70, 32, dtype)
    keep = torch.rand(2, 1, 50, 70) > 0.4
    keep[:, :, [0, 7]] = False
    check_sdpa(q, k, v, attn_mask=keep, enable_gqa=True)
    out = LF.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    assert torch.equal(out[:, :, [0, 7]], torch.zeros_like(out[:, :, [0, 7]]))


def test_attention_runs_pytorch_sdpa_and_keeps_lightllm_validation(monkeypatch):
    counts = _calls(monkeypatch, attention_op.F, "scaled_dot_product_attention")
    q, k, v = _qkv(1, 2, 2, 9, 11, 16)
    LF.scaled_dot_product_attention(q, k, v)
    assert counts == {"scaled_dot_product_attention": 1}
    # PyTorch's CPU SDPA accepts a value of another length than the key; lightllm does not.
    with pytest.raises(ValueError, match="positions"):
        LF.scaled_dot_product_attention(q, k, v[:, :, :5])


# ------------------------------------------------------------------------------------------------
# linear_gelu / feed_forward: PyTorch's addmm + GeLU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_and_feed_forward(approximate, dtype):
    x = torch.randn(7, 1023, dtype=dtype)
    w = (torch.randn(40, 1023) / 1023**0.5).to(dtype)
    check_linear_gelu(x, w, torch.randn(40, dtype=dtype), approximate)
    w1 = (torch.randn(300, 40) / 40**0.5).to(dtype)
    w2 = (torch.randn(40, 300) / 300**0.5).to(dtype)
    xs = torch.randn(5, 40, dtype=dtype)
    check_feed_forward(xs, w1, torch.randn(300, dtype=dtype), w2, torch.randn(40, dtype=dtype),
                       torch.randn(5, 40, dtype=dtype), approximate)


def test_linear_gelu_without_grad_applies_gelu_in_place_correctly():
    x, w, b = torch.randn(3, 5, 16), torch.randn(24, 16), torch.randn(24)
    with torch.no_grad():
        y = LF.linear_gelu(x, w, b)
        z = LF.feed_forward(x, w, b, torch.randn(16, 24), None, residual=x)
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b)))
    assert z.shape == x.shape


# ------------------------------------------------------------------------------------------------
# Never the reference
# ------------------------------------------------------------------------------------------------


def test_native_path_never_runs_the_reference(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the eager reference ran on the native CPU path")

    # Each op's user-level reference (the slow oracle) is forbidden; the launcher mirrors that
    # reference modules share with the native path (linear_act_fwd, act_bwd, ...) are PyTorch's
    # ops by design.
    for module in (reference_pkg.attention, reference_pkg.norm, reference_pkg.fused_linear,
                   reference_pkg.softmax):
        for name in dir(module):
            if hasattr(LF, name) and callable(getattr(module, name)):
                monkeypatch.setattr(module, name, forbidden)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 32, dtype=dtype, requires_grad=True)
        w = torch.randn(48, 32, dtype=dtype, requires_grad=True)
        q = torch.randn(1, 2, 5, 16, dtype=dtype, requires_grad=True)
        outs = [LF.layer_norm(x, (32,)), *LF.add_layer_norm(x, x * 2, (32,)),
                LF.linear_gelu(x, w), LF.feed_forward(x, w, None, w.t(), None, residual=x),
                LF.scaled_dot_product_attention(q, q, q, is_causal=True),
                LF.softmax(x, -1), LF.scaled_masked_softmax(x, None, 0.5),
                LF.rms_norm(x, (32,)), *LF.add_rms_norm(x, x * 2, (32,)),
                LF.linear_swiglu(x, w, w), LF.swiglu_feed_forward(x, w, w, w.t())]
        sum((o.float() * torch.randn(o.shape)).sum() for o in outs).backward()
        assert all(torch.isfinite(t.grad).all() for t in (x, w, q))
    assert fused_linear_op.launchers(x) is fused_linear_op._NATIVE
