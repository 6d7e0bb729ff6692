"""linear_swiglu, swiglu_feed_forward and lightllm.nn.SwiGLU: parity (docs/design.md §4) of the output
and every gradient, odd shapes, biases, residual, strides, the gated TMA and pointer kernels, the
native CPU path, registration, the transformers LlamaMLP drop-in, edge numerics, errors.

The gated matmul does two products per program, so interpreter cost grows with 2 x K x N (x the
row tiles): as in test_fused_linear.py every default shape pairs a large dimension with a small one
(M 1, 7, 97; d_model / d_ff 40, 1000, 1023); ``slow`` marks the cases where two large ones meet.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, dtype_params

import lightllm
import lightllm.functional as LF
from lightllm import _dispatch
from lightllm.kernels import fused_linear as kernel
from lightllm.ops import fused_linear as fused_linear_op
from lightllm.reference import fused_linear as reference
from lightllm.testing import assert_parity, grads, leaves, stub_launches

# (tokens, d_model, d_ff)
SHAPES = [(1, 40, 1023), (7, 1000, 40), (97, 40, 1000), (7, 1023, 40)]
SLOW_SHAPES = [(97, 1000, 1023), (7, 1023, 1000)]
GPU_SHAPES = [(2048, 1024, 2816), (333, 768, 2048), (1, 4096, 11008)]
BIASES = ["both", "none", "up-only"]
FF_VARIANTS = ["bias+residual", "bias", "none"]
GRAD_NAMES = ("dx", "dw_gate", "dw_up", "db_gate", "db_up")
FF_GRAD_NAMES = ("dx", "dw_gate", "dw_up", "dw_down", "db_gate", "db_up", "db_down", "dresidual")


def make_inputs(m, d_model, d_ff, dtype, biases="both", lead=(), device=DEVICE):
    """x, w_gate, w_up, b_gate, b_up with O(1) pre-activations (weights scaled by 1/sqrt(fan_in),
    where SiLU is curved)."""
    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    scale = max(d_model, 1) ** -0.5
    return (t(*lead, m, d_model), t(d_ff, d_model, scale=scale), t(d_ff, d_model, scale=scale),
            t(d_ff) if biases == "both" else None,
            t(d_ff) if biases in ("both", "up-only") else None)


def make_ff_inputs(m, d_model, d_ff, dtype, variant="bias+residual", lead=(), device=DEVICE):
    """x, w_gate, w_up, w_down, b_gate, b_up, b_down, residual."""
    bias = variant != "none"
    x, wg, wu, bg, bu = make_inputs(m, d_model, d_ff, dtype, "both" if bias else "none", lead,
                                    device)
    wd = (torch.randn(d_model, d_ff, device=device) * max(d_ff, 1) ** -0.5).to(dtype)
    bd = torch.randn(d_model, device=device).to(dtype) if bias else None
    r = torch.randn(*lead, m, d_model, device=device).to(dtype) if "residual" in variant else None
    return x, wg, wu, wd, bg, bu, bd, r


def _check(fn, ref_fn, inputs, names, dy=None):
    """Output and every gradient of ``fn`` against ``ref_fn`` in float64, ``ref_fn`` in the test
    dtype (PyTorch's own ops) as the budget; gradients of a random projection ``(y * r).sum()``."""
    ours = leaves(*inputs)
    y = fn(*ours)
    mine = leaves(*inputs)
    y_torch = ref_fn(*mine)
    ref = leaves(*inputs, dtype=torch.float64)
    y_ref = ref_fn(*ref)
    assert y.shape == y_torch.shape and y.dtype == inputs[0].dtype
    assert_parity(y, y_ref, y_torch, name="y")
    dy = torch.randn_like(y) if dy is None else dy
    for name, g, g_ref, g_torch in zip(names, grads(y, ours, dy), grads(y_ref, ref, dy.double()),
                                       grads(y_torch, mine, dy)):
        if g_ref is not None:
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


def check_linear_swiglu(x, w_gate, w_up, b_gate, b_up, dy=None):
    _check(LF.linear_swiglu, reference.linear_swiglu, (x, w_gate, w_up, b_gate, b_up), GRAD_NAMES,
           dy)


def check_swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, residual, dy=None):
    _check(LF.swiglu_feed_forward, reference.swiglu_feed_forward,
           (x, wg, wu, wd, bg, bu, bd, residual), FF_GRAD_NAMES, dy)


# ------------------------------------------------------------------------------------------------
# Parity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("biases", BIASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_swiglu(shape, biases, dtype):
    check_linear_swiglu(*make_inputs(*shape, dtype, biases))


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("variant", FF_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_swiglu_feed_forward(shape, variant, dtype):
    check_swiglu_feed_forward(*make_ff_inputs(*shape, dtype, variant))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_large_d_model_and_d_ff(shape, dtype):
    check_linear_swiglu(*make_inputs(*shape, dtype))
    check_swiglu_feed_forward(*make_ff_inputs(*shape, dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_sizes(shape, dtype):
    """Llama-like widths that reach the large gated tiles (and, for M=1, the thin decode tiles)."""
    check_linear_swiglu(*make_inputs(*shape, dtype))
    check_swiglu_feed_forward(*make_ff_inputs(*shape, dtype))


def test_leading_dims_broadcast_residual_non_contiguous_and_stride0_gradient():
    x, wg, wu, wd, bg, bu, bd, _ = make_ff_inputs(5, 24, 70, torch.float32, lead=(2, 3))
    check_linear_swiglu(x, wg, wu, bg, bu)
    check_swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, torch.randn(24, device=DEVICE))
    check_swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, torch.randn(3, 1, 24, device=DEVICE))
    x_t = torch.randn(24, 2, 5, device=DEVICE).permute(1, 2, 0)  # column-major rows
    x_s = torch.randn(2, 5, 48, device=DEVICE)[..., ::2]  # strided columns
    x_odd = torch.randn(3, 24, 5, device=DEVICE).transpose(1, 2)  # not viewable as 2-D
    wg_t = wg.t().contiguous().t()  # a transposed weight view beside a row-major w_up
    for xi in (x_t, x_s, x_odd):
        check_linear_swiglu(xi, wg_t, wu, bg, bu)
    check_swiglu_feed_forward(x_t, wg_t, wu, wd.t().contiguous().t(), bg, bu, bd,
                              torch.randn(24, 2, 5, device=DEVICE).permute(1, 2, 0))
    # y.sum().backward() hands the backward a stride-0 expanded gradient.
    check_linear_swiglu(x_t, wg, wu, bg, bu, dy=torch.ones(1, device=DEVICE).expand(2, 5, 70))
    check_swiglu_feed_forward(x_t, wg, wu, wd, bg, bu, bd, None,
                              dy=torch.ones(1, device=DEVICE).expand(2, 5, 24))
    # (d_model,) -> (d_ff,) / (d_model,), as F.linear
    check_linear_swiglu(x[0, 0, 0], wg, wu, bg, bu)
    check_swiglu_feed_forward(x[0, 0, 0], wg, wu, wd, bg, bu, bd, None)


def test_one_gated_matmul_reads_both_weights_in_place():
    """Gate and up are one launch of the matmul (GATED), on the two weights as given: no
    concatenated or copied weight; the feed-forward adds one launch, the down projection."""
    x, wg, wu, bg, bu = make_inputs(9, 64, 96, torch.float16)
    wd = torch.randn(64, 96, device=DEVICE, dtype=torch.float16)
    with torch.no_grad(), stub_launches() as launches:
        LF.linear_swiglu(x, wg, wu, bg, bu)
        LF.swiglu_feed_forward(x, wg, wu, wd, bg, bu)
    names = [launch.kernel for launch in launches]
    assert len(names) == 3 and all(n.startswith("_linear_gelu_mm") for n in names)
    gated = [launch for launch in launches if launch.kwargs["GATED"]]
    assert len(gated) == 2
    for launch in gated:
        if launch.kernel == "_linear_gelu_mm_tma":
            b, b2 = launch.args[1], launch.args[2]  # the two weights' tensor descriptors
            assert b.base.data_ptr() == wg.data_ptr() and b2.base.data_ptr() == wu.data_ptr()
        else:
            assert launch.args[1].data_ptr() == wg.data_ptr()
            assert launch.args[2].data_ptr() == wu.data_ptr()


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


def test_kernels_are_what_runs(monkeypatch):
    """On CUDA, and on CPU under the interpreter, the Triton launchers (not the reference) run."""
    calls = []
    for name in ("linear_swiglu_fwd", "linear_fwd", "matmul_swiglu_grad", "swiglu_bwd"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, wg, wu, wd, bg, bu, bd, r = leaves(*make_ff_inputs(3, 8, 12, torch.float32))
    (LF.linear_swiglu(x, wg, wu, bg, bu) * torch.randn(3, 12, device=DEVICE)).sum().backward()
    assert calls == ["linear_swiglu_fwd", "swiglu_bwd"]
    calls.clear()
    (LF.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, r) * torch.randn(3, 8, device=DEVICE)
     ).sum().backward()
    assert calls == ["linear_swiglu_fwd", "linear_fwd", "matmul_swiglu_grad"]


def test_pre_activations_are_saved_only_for_a_backward(monkeypatch):
    saved = []
    real = kernel.linear_swiglu_fwd
    monkeypatch.setattr(kernel, "linear_swiglu_fwd", lambda *a: saved.append(a[-1]) or real(*a))
    x, wg, wu, wd, bg, bu, bd, r = make_ff_inputs(3, 8, 12, torch.float32)
    LF.linear_swiglu(x, wg, wu, bg, bu)
    with torch.no_grad():
        LF.linear_swiglu(*leaves(x, wg, wu, bg, bu))
    LF.linear_swiglu(*leaves(x, wg, wu, bg, bu))
    LF.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, *leaves(r))  # only dR = dY is needed
    LF.swiglu_feed_forward(*leaves(x), wg, wu, wd, bg, bu, bd, r)
    assert saved == [False, False, True, False, True]


@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16))
@pytest.mark.parametrize("epilogue", ["gated+pre", "gated", "gate-grad"])
def test_tma_and_pointer_kernels_agree(epilogue, dtype):
    """The TMA kernel (aligned fp16/bf16) and the pointer kernel compute the same gated tiles."""
    m, k, n = 37, 72, 152  # rows of 144 and 304 bytes: descriptor-eligible; edges everywhere
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    wg = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    wu = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bg = torch.randn(n, device=DEVICE, dtype=dtype)
    bu = torch.randn(n, device=DEVICE, dtype=dtype)
    g, u = (torch.randn(m, n, device=DEVICE, dtype=dtype) for _ in range(2))
    w_down = wg.t().contiguous()  # (K, N) rows: the dH product's B layout

    def nan():
        return torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)

    results = []
    for tma in (True, False):
        out, aux, aux2, out2 = nan(), nan(), nan(), nan()
        if epilogue == "gated+pre":
            kernel._mm(a, wg, bg, None, aux, out, kernel.ACT_SILU, kernel.AUX_STORE_PRE, tma,
                       b2_t=wu, bias2=bu, aux2=aux2)
            results.append((out, aux, aux2))
        elif epilogue == "gated":
            kernel._mm(a, wg, None, None, None, out, kernel.ACT_SILU, kernel.AUX_NONE, tma,
                       b2_t=wu, bias2=bu)
            results.append((out,))
        else:
            kernel._mm(a, w_down.t(), None, None, g, out, kernel.ACT_SILU, kernel.AUX_GATE_GRAD,
                       tma, aux2=u, out2=out2)
            results.append((out, out2))
    for got_tma, got_ptr in zip(*results):
        assert not got_tma.isnan().any()
        torch.testing.assert_close(got_tma, got_ptr, atol=1e-3, rtol=1e-3)
    g_ref = a.double() @ wg.double().t()
    u_ref = a.double() @ wu.double().t() + bu.double()
    got = [t.double() for t in results[0]]
    tol = dict(atol=2e-2, rtol=1e-2)
    if epilogue == "gated+pre":
        g_ref = g_ref + bg.double()
        torch.testing.assert_close(got[1], g_ref, **tol)
        torch.testing.assert_close(got[2], u_ref, **tol)
    if epilogue != "gate-grad":
        torch.testing.assert_close(got[0], F.silu(g_ref) * u_ref, **tol)
    else:
        dh = a.double() @ w_down.double()
        dg, du = reference.swiglu_grads(dh, g.double(), u.double())
        torch.testing.assert_close(got[0], dg, **tol)
        torch.testing.assert_close(got[1], du, **tol)


# Split-K (decode, M <= 32) of the gated matmul (two partial sums per tile) and of its fp32
# backward (AUX_GATE_GRAD: one), through _mm's test-only ``tile``; N = 1000, K = 1500 (pointer
# kernel) or 1496 (16-byte rows: TMA); SPLIT_K = 8 with BLOCK_K = 128 leaves a K slice empty.
# (The fp16/bf16 gated pointer kernel and AUX_GATE_GRAD in half precision have no split-K tiles.)
SPLIT_K_PATHS = {  # path -> (dtype, K, TMA kernel, tile for M = 1, 7, 32)
    "ptr-fp32": (torch.float32, 1500, False,
                 {1: (16, 64, 64, 4, 3, 2), 7: (16, 64, 64, 4, 3, 4), 32: (16, 64, 64, 4, 3, 8)}),
    "tma-fp16": (torch.float16, 1496, True,
                 {1: (16, 64, 128, 4, 4, 4), 7: (16, 64, 128, 4, 4, 8),
                  32: (32, 64, 128, 4, 4, 2)}),
}


@pytest.mark.parametrize("path, epilogue", [("ptr-fp32", "gated+pre"), ("tma-fp16", "gated+pre"),
                                            ("ptr-fp32", "gate-grad")])
@pytest.mark.parametrize("m", [1, 7, 32])
def test_split_k_parity(m, path, epilogue):
    """Every split-K path of the gated forward (h, g, u) and of dG, dU from dH = dY Wd."""
    dtype, k, tma, tiles = SPLIT_K_PATHS[path]
    assert tiles[m] in (kernel._GATED_FP32_TILES if dtype == torch.float32
                        else kernel._GATED_HALF_TILES)
    n = 1000
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    wg, wu = ((torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype) for _ in range(2))
    bg, bu = (torch.randn(n, device=DEVICE, dtype=dtype) for _ in range(2))
    outs = [torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype) for _ in range(3)]
    launch = dict(tma=tma, tile=tiles[m])
    if epilogue == "gated+pre":
        h, g, u = outs
        kernel._mm(a, wg, bg, None, g, h, kernel.ACT_SILU, kernel.AUX_STORE_PRE, b2_t=wu,
                   bias2=bu, aux2=u, **launch)

        def expected(a, wg, wu, bg, bu):
            g, u = F.linear(a, wg, bg), F.linear(a, wu, bu)
            return F.silu(g) * u, g, u

        args, got = (a, wg, wu, bg, bu), outs
    else:
        dg, du = outs[:2]
        g, u = (torch.randn(m, n, device=DEVICE, dtype=dtype) for _ in range(2))
        w_down = wg.t().contiguous()  # (K, N) rows: the dH product's B layout
        kernel._mm(a, w_down.t(), None, None, g, dg, kernel.ACT_SILU, kernel.AUX_GATE_GRAD,
                   aux2=u, out2=du, **launch)

        def expected(a, w_down, g, u):
            return reference.swiglu_grads(a @ w_down, g, u)

        args, got = (a, w_down, g, u), (dg, du)
    want = expected(*(t.double() for t in args))
    mine = expected(*args)
    for i, (x, r, t) in enumerate(zip(got, want, mine)):
        assert_parity(x, r, t, name=f"{epilogue} output {i}")
    for partials, arrivals in kernel._WORKSPACES[torch.device(DEVICE)]:
        assert not partials.any() and not arrivals.any()  # left clean for the next call


def test_kernel_choice():
    """Gated TMA needs both weights descriptor-eligible and in one layout; else the pointer
    kernel, which takes each weight's own strides."""
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or later")
    half = torch.float16
    x = torch.randn(7, 64, device=DEVICE, dtype=half)
    w = torch.randn(96, 64, device=DEVICE, dtype=half)
    assert kernel.uses_tma(x, w, w.clone())
    assert kernel.uses_tma(x, w.t().contiguous().t(), w.t().contiguous().t())  # both (K, N) rows
    assert not kernel.uses_tma(x, w, w.t().contiguous().t())  # one of each layout
    assert not kernel.uses_tma(x, w, torch.randn(96, 128, device=DEVICE, dtype=half)[:, ::2])


# ------------------------------------------------------------------------------------------------
# Native CPU path, float64
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, interpreted=False))
def test_native_cpu_path(monkeypatch, dtype):
    """CPU tensors without the interpreter: PyTorch's addmm + SiLU (in place without grad), the
    same parity rule; no Triton launcher runs."""
    for name in ("linear_swiglu_fwd", "linear_fwd", "matmul_swiglu_grad", "swiglu_bwd"):
        monkeypatch.setattr(kernel, name, None)  # a call would fail
    with _dispatch.native_cpu():
        check_linear_swiglu(*make_inputs(7, 40, 300, dtype, device="cpu"))
        check_swiglu_feed_forward(*make_ff_inputs(5, 40, 300, dtype, device="cpu"))
        x, wg, wu, wd, bg, bu, bd, r = make_ff_inputs(3, 16, 24, dtype, lead=(2,), device="cpu")
        with torch.no_grad():
            h = LF.linear_swiglu(x, wg, wu, bg, bu)
            y = LF.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, r)
        torch.testing.assert_close(h, reference.linear_swiglu(x, wg, wu, bg, bu))
        torch.testing.assert_close(y, reference.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, r))
        assert fused_linear_op.launchers(x, "SwiGLU") is fused_linear_op._NATIVE


def test_float64_runs_pytorch_ops_with_one_warning():
    x, wg, wu, wd, bg, bu, bd, r = make_ff_inputs(4, 10, 6, torch.float64)
    _dispatch._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = LF.linear_swiglu(x, wg, wu, bg, bu)
        y = LF.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, r)
    torch.testing.assert_close(h, reference.linear_swiglu(x, wg, wu, bg, bu))
    torch.testing.assert_close(y, reference.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, r))
    if _dispatch.triton_runs_on(x.device):
        messages = [str(w.message) for w in caught if "lightllm" in str(w.message)]
        assert len(messages) == 1 and "SwiGLU: float64" in messages[0]


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------


def test_registered_ops_pass_opcheck():
    x, wg, wu, wd, bg, bu, bd, r = leaves(*make_ff_inputs(6, 20, 36, torch.float32))
    fwd = torch.ops.lightllm.linear_swiglu_fwd.default
    torch.library.opcheck(fwd, (x, wg, wu, bg, bu, True))
    torch.library.opcheck(fwd, (x, wg, wu, None, bu, False))
    ff = torch.ops.lightllm.swiglu_feed_forward_fwd.default
    torch.library.opcheck(ff, (x, wg, wu, wd, bg, bu, bd, r, True))
    torch.library.opcheck(ff, (x, wg, wu, wd, None, None, None, None, False))
    det = [t.detach() for t in (x, wg, wu, wd, bg, bu, bd)]
    _, g, u = fwd(det[0], det[1], det[2], det[4], det[5], True)
    dh = torch.randn(6, 36, device=DEVICE)
    bwd = torch.ops.lightllm.linear_swiglu_bwd.default
    torch.library.opcheck(bwd, (dh, det[0], det[1], det[2], g, u, True, True, True, True, True))
    torch.library.opcheck(bwd, (dh, det[0], det[1], det[2], g, u, False, True, False, False, True))
    _, h, g, u = ff(*det, None, True)
    dy = torch.randn(6, 20, device=DEVICE)
    ff_bwd = torch.ops.lightllm.swiglu_feed_forward_bwd.default
    torch.library.opcheck(ff_bwd, (dy, det[0], det[1], det[2], det[3], h, g, u, *[True] * 7))
    torch.library.opcheck(ff_bwd, (dy, det[0], det[1], det[2], det[3], h, g, u,
                                   True, False, True, False, True, False, True))


def test_torch_compile_fullgraph():
    x, wg, wu, bg, bu = leaves(*make_inputs(5, 24, 40, torch.float32))
    y = torch.compile(LF.linear_swiglu, fullgraph=True)(x, wg, wu, bg, bu)
    eager = leaves(x, wg, wu, bg, bu)
    y_want = reference.linear_swiglu(*eager)
    torch.testing.assert_close(y, y_want)
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (y_want * r).sum().backward()
    for got, want in zip((x, wg, wu, bg, bu), eager):
        torch.testing.assert_close(got.grad, want.grad)


def test_torch_compile_fullgraph_module():
    module = lightllm.nn.SwiGLU(16, 40, bias=True).to(DEVICE)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
    y = compiled(x, residual=x)
    (y * torch.randn_like(y)).sum().backward()
    torch.testing.assert_close(y, module(x, residual=x))
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# The module: a drop-in for transformers' LlamaMLP
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "mlp_bias"])
def test_module_is_a_drop_in_for_llama_mlp(bias):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(hidden_size=24, intermediate_size=56, mlp_bias=bias,
                                      hidden_act="silu", num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2)
    theirs = LlamaMLP(config).to(DEVICE)
    ours = lightllm.nn.SwiGLU(24, 56, bias=bias, device=DEVICE)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())  # strict: the keys map without conversion
    x = torch.randn(3, 7, 24, device=DEVICE, requires_grad=True)
    y = ours(x)
    y_theirs = theirs(x)
    torch.testing.assert_close(y, y_theirs)
    torch.testing.assert_close(ours(x, residual=x), x + y_theirs)
    dy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, [x, *ours.parameters()], dy),
                         torch.autograd.grad(y_theirs, [x, *theirs.parameters()], dy)):
        torch.testing.assert_close(got, want)


def test_module_runs_lightllm_ops():
    """Under a dispatch mode the module goes through the custom op: the kernels ran, not a copy
    of the eager MLP that would match it anyway."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LightllmOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "lightllm":
                self.seen.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    module = lightllm.nn.SwiGLU(16, 24, device=DEVICE)
    x = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    with LightllmOps() as ops:
        y = module(x)
        (y * torch.randn_like(y)).sum().backward()
    assert ops.seen == ["swiglu_feed_forward_fwd", "swiglu_feed_forward_bwd"]


def test_module_constructor_and_repr():
    m = lightllm.nn.SwiGLU(8, 20, dtype=torch.float16)
    assert m.gate_proj.weight.shape == (20, 8) and m.up_proj.weight.shape == (20, 8)
    assert m.down_proj.weight.shape == (8, 20) and m.gate_proj.weight.dtype == torch.float16
    assert m.gate_proj.bias is None and m.down_proj.bias is None  # LlamaMLP's default
    assert lightllm.nn.SwiGLU(8, 20, bias=True).up_proj.bias.shape == (20,)
    assert "intermediate_size=20" in repr(m)


# ------------------------------------------------------------------------------------------------
# Edge numerics
# ------------------------------------------------------------------------------------------------


def test_nan_propagates_to_its_row_only():
    x, wg, wu, wd, bg, bu, bd, r = make_ff_inputs(5, 32, 48, torch.float32)
    x[2, 7] = float("nan")
    h = LF.linear_swiglu(x, wg, wu, bg, bu)
    y = LF.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, r)
    for out in (h, y):
        assert out[2].isnan().all()
        assert torch.isfinite(out[[0, 1, 3, 4]]).all()


def test_empty_inputs():
    x, wg, wu, wd, bg, bu, bd, r = leaves(*make_ff_inputs(0, 16, 24, torch.float32))
    h = LF.linear_swiglu(x, wg, wu, bg, bu)
    y = LF.swiglu_feed_forward(x, wg, wu, wd, bg, bu, bd, r)
    assert h.shape == (0, 24) and y.shape == (0, 16)
    (h.sum() + y.sum()).backward()
    assert x.grad.shape == (0, 16)
    for p in (wg, wu, wd, bg, bu, bd):
        assert torch.equal(p.grad, torch.zeros_like(p))
    # d_model == 0: both products are empty, the output is silu(b_gate) * b_up on every row.
    x0, wg0, wu0, bg0, bu0 = make_inputs(3, 0, 8, torch.float32)
    torch.testing.assert_close(LF.linear_swiglu(x0, wg0, wu0, bg0, bu0),
                               (F.silu(bg0) * bu0).expand(3, 8))


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
def test_large_pre_activations(dtype):
    """|g| up to ~60: SiLU's tails (g for g >> 0, -0 from below: sigmoid saturates, exp does not
    overflow into NaN) and its derivative (1 and 0 there), forward and backward."""
    x, wg, wu, bg, bu = make_inputs(13, 64, 70, dtype)
    wg = (wg.float() * 12).to(dtype)
    check_linear_swiglu(x, wg, wu, bg, bu)
    h = LF.linear_swiglu(x, wg, wu, bg, bu)
    g = F.linear(x.float(), wg.float(), bg.float())
    assert g.abs().max() > 30 and torch.isfinite(h).all()


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _ff_call(**over):
    x, wg, wu, wd, bg, bu, bd, r = make_ff_inputs(4, 16, 24, torch.float32)
    a = {"x": x, "w_gate": wg, "w_up": wu, "w_down": wd, "b_gate": bg, "b_up": bu, "b_down": bd,
         "residual": r}
    a.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
              for k, v in over.items()})
    return LF.swiglu_feed_forward(**a)


def _swiglu_call(**over):
    x, wg, wu, bg, bu = make_inputs(4, 16, 24, torch.float32)
    a = {"x": x, "w_gate": wg, "w_up": wu, "b_gate": bg, "b_up": bu}
    a.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v
              for k, v in over.items()})
    return LF.linear_swiglu(**a)


@pytest.mark.parametrize("call", [_swiglu_call, _ff_call], ids=["linear_swiglu", "feed_forward"])
@pytest.mark.parametrize(
    "over, error, match",
    [
        ({"w_up": torch.randn(23, 16)}, ValueError, r"w_up must have w_gate's shape \(24, 16\)"),
        ({"w_up": torch.randn(24, 15)}, ValueError, "w_up of shape .* expects in_features=15"),
        ({"w_gate": torch.randn(24, 15)}, ValueError, "w_gate of shape .* in_features=15"),
        ({"w_gate": torch.randn(24)}, ValueError, "w_gate must be 2-D"),
        ({"b_gate": torch.randn(16)}, ValueError, r"b_gate must have shape \(24,\)"),
        ({"b_up": torch.randn(1, 24)}, ValueError, r"b_up must have shape \(24,\)"),
        ({"w_up": torch.randn(24, 16).half()}, TypeError, "dtype"),
        ({"b_up": torch.randn(24, device="meta")}, RuntimeError, "device"),
        ({"x": torch.ones(4, 16, dtype=torch.int64)}, TypeError, "x must have dtype"),
        ({"w_gate": [[1.0] * 16] * 24}, TypeError, "w_gate must be a torch.Tensor"),
        ({"x": torch.tensor(1.0)}, ValueError, "x must have at least 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, over, error, match):
    with pytest.raises(error, match=match):
        call(**over)


@pytest.mark.parametrize(
    "over, error, match",
    [
        ({"w_down": torch.randn(16, 23)}, ValueError, "w_down of shape .* but w_gate's out_features"),
        ({"w_down": torch.randn(16)}, ValueError, "w_down must be 2-D"),
        ({"b_down": torch.randn(24)}, ValueError, r"b_down must have shape \(16,\)"),
        ({"residual": torch.randn(4, 15)}, ValueError, "residual .* not broadcastable"),
        ({"residual": torch.randn(4, 16).half()}, TypeError, "dtype"),
        ({"w_down": torch.randn(16, 24).double()}, TypeError, "dtype"),
    ],
)
def test_feed_forward_bad_inputs_raise_clear_errors(over, error, match):
    with pytest.raises(error, match=match):
        _ff_call(**over)
