"""linear_gelu: parity (docs/design.md §4) of the forward and dX/dW/db, odd shapes, strides, edge
numerics, registration, errors. The feed-forward and its module are in
test_fused_linear_feed_forward.py, SwiGLU in test_fused_linear_swiglu.py.

Interpreter cost grows with K x N (x the number of row tiles): the default set keeps every
dimension odd or unaligned (M 1, 7, 97; K and N 40, 1000, 1023, 3072) while pairing a large
dimension with a small one; the cases where two large dimensions meet are marked ``slow``.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, dtype_params

import lightllm.functional as LF
from lightllm.kernels import _device
from lightllm.kernels import fused_linear as kernel
from lightllm.reference import fused_linear as reference
from lightllm.testing import assert_parity, grads, leaves

# (M, K, N)
SHAPES = [(1, 40, 3072), (7, 1023, 40), (97, 40, 1000), (7, 3072, 40), (1, 1000, 1023)]
SLOW_SHAPES = [(97, 1000, 1023), (1, 1000, 3072), (7, 1023, 3072), (97, 3072, 1023)]
GPU_SHAPES = [(4096, 1024, 4096), (2049, 3072, 1023), (1, 8192, 3072)]
APPROX = ["none", "tanh"]
ACTIVATIONS = ["gelu", "gelu_tanh", "relu"]




def make_inputs(m, k, n, dtype, bias=True, lead=()):
    """x of shape (*lead, m, k); weight scaled so pre-activations are O(1) (GeLU's curved part)."""
    x = torch.randn(*lead, m, k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE, dtype=dtype) if bias else None
    return x, w, b


def check_linear_gelu(x, w, b, approximate, dy=None):
    """Forward and every gradient of lightllm against float64, PyTorch's own ops as the budget."""
    ours = leaves(x, w, b)
    y = LF.linear_gelu(*ours, approximate=approximate)
    mine = leaves(x, w, b)
    y_torch = F.gelu(F.linear(*mine), approximate=approximate)
    ref = leaves(x, w, b, dtype=torch.float64)
    y_ref = reference.linear_gelu(*ref, approximate=approximate)
    assert y.shape == y_torch.shape and y.dtype == x.dtype
    assert_parity(y, y_ref, y_torch, name="y")
    dy = torch.randn_like(y) if dy is None else dy
    for name, g, g_ref, g_torch in zip(
        ("dx", "dweight", "dbias"),
        grads(y, ours, dy), grads(y_ref, ref, dy.double()), grads(y_torch, mine, dy),
    ):
        if g_ref is not None:
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_gelu(shape, approximate, bias, dtype):
    check_linear_gelu(*make_inputs(*shape, dtype, bias=bias), approximate)


@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_linear_relu(shape, bias, dtype):
    """ReLU in the epilogue: forward and every gradient (the derivative is 0 at and below 0)."""
    x, w, b = make_inputs(*shape, dtype, bias=bias)
    ours = leaves(x, w, b)
    y = LF.linear_relu(*ours)
    mine = leaves(x, w, b)
    y_torch = F.relu(F.linear(*mine))
    ref = leaves(x, w, b, dtype=torch.float64)
    y_ref = reference.linear_relu(*ref)
    assert_parity(y, y_ref, y_torch, name="y")
    assert (y == 0).any() and (y > 0).any()  # both sides of the kink are exercised
    dy = torch.randn_like(y)
    for name, g, g_ref, g_torch in zip(
        ("dx", "dweight", "dbias"),
        grads(y, ours, dy), grads(y_ref, ref, dy.double()), grads(y_torch, mine, dy),
    ):
        if g_ref is not None:
            assert_parity(g, g_ref, g_torch, grad=True, name=name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", dtype_params())
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_gelu_large_k_and_n(shape, approximate, dtype):
    check_linear_gelu(*make_inputs(*shape, dtype), approximate)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_gelu_gpu_sizes(shape, approximate, dtype):
    """Sizes that reach the large autotuned tiles (and, for M=1, the thin decode tiles)."""
    check_linear_gelu(*make_inputs(*shape, dtype), approximate)


def test_leading_dims_and_one_dimensional_input():
    x, w, b = make_inputs(5, 40, 33, torch.float32, lead=(2, 3))
    check_linear_gelu(x, w, b, "none")
    check_linear_gelu(x[0, 0, 0], w, b, "tanh")  # (K,) -> (N,), as F.linear


def test_non_contiguous_inputs_and_stride0_gradient():
    base = torch.randn(2, 7, 2 * 40, device=DEVICE)
    x = base[..., ::2]  # strided columns: used in place (the kernel takes both strides)
    _, w, b = make_inputs(1, 40, 1023, torch.float32)
    check_linear_gelu(x, w, b, "none")
    x_t = torch.randn(40, 2, 7, device=DEVICE).permute(1, 2, 0)  # column-major rows
    check_linear_gelu(x_t, w, b, "tanh")
    w_t = torch.randn(40, 1023, device=DEVICE).t() / 40**0.5  # a transposed weight view
    check_linear_gelu(x, w_t, b, "none")
    x_odd = torch.randn(3, 40, 5, device=DEVICE).transpose(1, 2)  # (3, 5, 40), not viewable as 2-D
    check_linear_gelu(x_odd, w, b, "none")
    # y.sum().backward() hands the backward a stride-0 expanded gradient.
    dy = torch.ones(1, device=DEVICE).expand(2, 7, 1023)
    check_linear_gelu(x, w, b, "tanh", dy=dy)


def test_nan_propagates_to_its_row_only():
    x, w, b = make_inputs(5, 64, 48, torch.float32)
    x[2, 10] = float("nan")
    y = LF.linear_gelu(x, w, b)
    assert y[2].isnan().all()
    assert torch.isfinite(y[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16))
@pytest.mark.parametrize("approximate", APPROX)
def test_large_pre_activations(approximate, dtype):
    """|pre| up to ~40: GeLU's tails (x for x >> 0, 0 from below for x << 0) and its derivative."""
    x, w, b = make_inputs(13, 64, 70, dtype)
    check_linear_gelu(x * 8, w, (b.float() * 8).to(dtype), approximate)


def test_empty_inputs():
    x, w, b = leaves(*make_inputs(0, 16, 8, torch.float32))
    y = LF.linear_gelu(x, w, b)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    # in_features == 0: the product is empty, the output is gelu(bias) on every row.
    x0, w0, b0 = make_inputs(3, 0, 8, torch.float32)
    torch.testing.assert_close(LF.linear_gelu(x0, w0, b0), F.gelu(b0).expand(3, 8))


def test_float64_and_cpu_bfloat16_fall_back_to_the_reference():
    x, w, b = make_inputs(4, 10, 6, torch.float64)
    torch.testing.assert_close(LF.linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
    if not HAS_CUDA:  # the interpreter cannot do bfloat16 arithmetic: the reference serves it
        x, w, b = (t.bfloat16() for t in (x, w, b))
        torch.testing.assert_close(LF.linear_gelu(x, w, b, "tanh"),
                                   F.gelu(F.linear(x, w, b), approximate="tanh"))


def test_kernel_is_what_runs(monkeypatch):
    """On CUDA, and on CPU under the interpreter, the Triton launchers (not the reference) run."""
    calls = []
    for name in ("linear_act_fwd", "act_bwd"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, w, b = leaves(*make_inputs(3, 8, 5, torch.float32))
    LF.linear_gelu(x, w, b).sum().backward()
    assert calls == ["linear_act_fwd", "act_bwd"]


@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16))
@pytest.mark.parametrize("epilogue", ["gelu+pre", "bias+residual", "gelu-grad"])
def test_tma_and_pointer_kernels_agree(epilogue, dtype):
    """The TMA kernel (aligned fp16/bf16) and the pointer kernel compute the same tiles."""
    m, k, n = 37, 72, 152  # rows of 144 and 304 bytes: descriptor-eligible; edges everywhere
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    b_t = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    res = torch.randn(m, n, device=DEVICE, dtype=dtype)
    pre = torch.randn(m, n, device=DEVICE, dtype=dtype)
    w2 = b_t.t().contiguous()  # (K, N) rows: the dH product's B layout
    results = []
    for tma in (True, False):
        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
        aux = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
        if epilogue == "gelu+pre":
            kernel._mm(a, b_t, bias, None, aux, out, kernel.ACT_GELU, kernel.AUX_STORE_PRE, tma)
            results.append((out, aux))
        elif epilogue == "bias+residual":
            kernel._mm(a, b_t, bias, res, None, out, kernel.ACT_NONE, kernel.AUX_NONE, tma)
            results.append((out,))
        else:
            kernel._mm(a, w2.t(), None, None, pre, out, kernel.ACT_GELU_TANH,
                       kernel.AUX_ACT_GRAD, tma)
            results.append((out,))
    for got_tma, got_ptr in zip(*results):
        assert not got_tma.isnan().any()
        torch.testing.assert_close(got_tma, got_ptr, atol=1e-3, rtol=1e-3)
    prod = a.double() @ b_t.double().t()
    if epilogue == "gelu+pre":
        torch.testing.assert_close(results[0][1].double(), prod + bias.double(), atol=2e-2, rtol=1e-2)
    elif epilogue == "bias+residual":
        torch.testing.assert_close(results[0][0].double(), prod + bias.double() + res.double(),
                                   atol=2e-2, rtol=1e-2)
    else:
        want = torch.ops.aten.gelu_backward(prod, pre.double(), approximate="tanh")
        torch.testing.assert_close(results[0][0].double(), want, atol=2e-2, rtol=1e-2)


def test_kernel_choice():
    """Aligned fp16/bf16 rows take the TMA kernel (Hopper+ or the interpreter); the rest the
    pointer kernel."""
    if HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or later")
    half = torch.float16
    w = torch.randn(64, 1000, device=DEVICE, dtype=half)
    assert kernel.uses_tma(torch.randn(7, 1000, device=DEVICE, dtype=half), w)
    assert kernel.uses_tma(torch.randn(7, 64, device=DEVICE, dtype=half), w.t())  # (K, N) rows
    assert not kernel.uses_tma(torch.randn(7, 1000, device=DEVICE), w.float())  # fp32
    assert not kernel.uses_tma(torch.randn(7, 1023, device=DEVICE, dtype=half),
                               torch.randn(64, 1023, device=DEVICE, dtype=half))  # 2046-byte rows
    assert not kernel.uses_tma(torch.randn(7, 2000, device=DEVICE, dtype=half)[:, ::2], w)


def test_pre_activation_is_saved_only_for_a_backward(monkeypatch):
    saved = []
    real = kernel.linear_act_fwd
    monkeypatch.setattr(kernel, "linear_act_fwd",
                        lambda *a: saved.append(a[-1]) or real(*a))
    x, w, b = make_inputs(3, 8, 5, torch.float32)
    LF.linear_gelu(x, w, b)
    with torch.no_grad():
        LF.linear_gelu(*leaves(x, w, b))
    LF.linear_gelu(*leaves(x, w, b))
    assert saved == [False, False, True]


def test_registered_ops_pass_opcheck():
    x, w, b = leaves(*make_inputs(6, 33, 20, torch.float32))
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.lightllm.linear_act_fwd.default,
                              (x, w, b, activation, True))
    torch.library.opcheck(torch.ops.lightllm.linear_act_fwd.default, (x, w, None, "gelu", False))
    dy = torch.randn(6, 20, device=DEVICE)
    for activation in ("gelu_tanh", "relu"):
        _, pre = torch.ops.lightllm.linear_act_fwd(x.detach(), w.detach(), b.detach(), activation,
                                                   True)
        torch.library.opcheck(torch.ops.lightllm.linear_act_bwd.default,
                              (dy, x.detach(), w.detach(), pre, activation, True, True, True))
    torch.library.opcheck(torch.ops.lightllm.linear_act_bwd.default,
                          (dy, x.detach(), w.detach(), pre, "gelu", False, True, False))


def test_torch_compile_fullgraph():
    x, w, b = leaves(*make_inputs(5, 24, 16, torch.float32))
    compiled = torch.compile(LF.linear_gelu, fullgraph=True)
    y = compiled(x, w, b, "tanh")
    y.sum().backward()
    torch.testing.assert_close(y, F.gelu(F.linear(x, w, b), approximate="tanh"))
    eager = leaves(x, w, b)
    F.gelu(F.linear(*eager), approximate="tanh").sum().backward()
    for got, want in zip((x, w, b), eager):
        torch.testing.assert_close(got.grad, want.grad)


def _x():
    return torch.randn(4, 16, device=DEVICE)


W = torch.randn(8, 16, device=DEVICE)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: LF.linear_gelu(_x(), torch.randn(8, 15, device=DEVICE)), ValueError,
         "weight of shape .* expects in_features=15"),
        (lambda: LF.linear_gelu(_x(), torch.randn(16, device=DEVICE)), ValueError,
         "weight must be 2-D"),
        (lambda: LF.linear_gelu(_x(), W, torch.randn(7, device=DEVICE)), ValueError,
         r"bias must have shape \(8,\)"),
        (lambda: LF.linear_gelu(_x(), W, torch.randn(1, 8, device=DEVICE)), ValueError, "bias"),
        (lambda: LF.linear_gelu(_x(), W.half()), TypeError, "dtype"),
        (lambda: LF.linear_gelu(_x(), W, torch.randn(8, device=DEVICE).half()), TypeError,
         "dtype"),
        (lambda: LF.linear_gelu(_x(), W.to("meta")), RuntimeError, "device"),
        (lambda: LF.linear_gelu(_x().long(), W), TypeError, "x must have dtype"),
        (lambda: LF.linear_gelu(_x(), W.int()), TypeError, "weight must have dtype"),
        (lambda: LF.linear_gelu(_x(), W, approximate="exact"), ValueError, "approximate"),
        (lambda: LF.linear_gelu(_x(), W, approximate=None), ValueError, "approximate"),
        (lambda: LF.linear_gelu(torch.tensor(1.0, device=DEVICE), W), ValueError, "x must have"),
        (lambda: LF.linear_gelu([1.0] * 16, W), TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.cuda
def test_matches_cublaslt_fused_epilogue_tanh():
    """torch._addmm_activation(use_gelu=True) on CUDA is the tanh GeLU (cuBLASLt's GELU_BIAS
    epilogue): the benchmark compares it with approximate="tanh". This pins that down."""
    x, w, b = make_inputs(512, 1024, 4096, torch.bfloat16)
    fused = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    ref_tanh = reference.linear_gelu(x.double(), w.double(), b.double(), "tanh")
    ref_erf = reference.linear_gelu(x.double(), w.double(), b.double(), "none")
    assert (fused.double() - ref_tanh).abs().max() <= (fused.double() - ref_erf).abs().max()
    assert_parity(LF.linear_gelu(x, w, b, "tanh"), ref_tanh, fused)


@pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU")
def test_int64_offsets_on_gpu():
    """An output of more than 2^31 elements: row offsets must be 64-bit."""
    m, k, n = (2**31) // 4096 + 5, 64, 4096
    try:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = (torch.randn(n, k, device="cuda") / 8).half()
        y = LF.linear_gelu(x, w)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2^31-element output")
    torch.testing.assert_close(y[-3:].float(), F.gelu(F.linear(x[-3:].float(), w.float())),
                               atol=2e-3, rtol=2e-3)


# Split-K (decode, M <= 32): each case launches one split-K candidate through _mm's test-only
# ``tile`` (the interpreter runs only each list's first config). K = 1500 (pointer kernel) or 1496
# (16-byte rows: TMA kernel) with N = 1000: every edge, and slices of unequal length; SPLIT_K = 8
# with BLOCK_K = 128 leaves the last slice empty.
SPLIT_K_PATHS = {  # path -> (dtype, K, TMA kernel, tile for M = 1, 7, 32)
    "ptr-fp32": (torch.float32, 1500, False,
                 {1: (16, 64, 64, 4, 3, 2), 7: (16, 64, 64, 4, 3, 4), 32: (32, 64, 32, 4, 3, 8)}),
    "ptr-fp16": (torch.float16, 1500, False,
                 {1: (16, 64, 128, 4, 4, 2), 7: (16, 64, 128, 4, 4, 4),
                  32: (32, 64, 128, 4, 4, 8)}),
    "tma-fp16": (torch.float16, 1496, True,
                 {1: (16, 64, 128, 4, 4, 8), 7: (16, 64, 128, 4, 4, 2),
                  32: (32, 64, 128, 4, 4, 4)}),
}
SPLIT_K_EPILOGUES = ["gelu+bias+pre", "gelu_tanh+bias", "relu+pre", "bias+residual",
                     "gelu_tanh-grad"]


def _split_k_case(m, path, epilogue):
    """One epilogue of the matmul on fresh inputs, through the path's split-K tile for ``m``."""
    dtype, k, tma, tiles = SPLIT_K_PATHS[path]
    assert tiles[m] in (kernel._FP32_TILES if dtype == torch.float32 else kernel._HALF_TILES)
    return _tile_case(m, 1000, k, dtype, tma, tiles[m], epilogue)


def _tile_case(m, n, k, dtype, tma, tile, epilogue):
    """One epilogue of the matmul on fresh inputs through the candidate ``tile``: (kernel
    outputs, float64 references, PyTorch's results in the test dtype)."""
    a = torch.randn(m, k, device=DEVICE, dtype=dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bias = torch.randn(n, device=DEVICE, dtype=dtype)
    res = torch.randn(m, n, device=DEVICE, dtype=dtype)
    pre_in = torch.randn(m, n, device=DEVICE, dtype=dtype)
    w2 = w.t().contiguous()  # (K, N) rows: the dH product's B layout, as matmul_act_grad's

    def nan():
        return torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)

    out, aux = nan(), nan()
    name = epilogue.split("+")[0].split("-")[0]
    act = kernel.ACTIVATIONS.get(name, kernel.ACT_NONE)
    approx = "tanh" if name == "gelu_tanh" else "none"
    launch = dict(tma=tma, tile=tile)

    def act_of(x):
        return F.relu(x) if name == "relu" else F.gelu(x, approximate=approx)

    if epilogue == "gelu_tanh-grad":
        kernel._mm(a, w2.t(), None, None, pre_in, out, act, kernel.AUX_ACT_GRAD, **launch)
        ref = torch.ops.aten.gelu_backward(a.double() @ w2.double(), pre_in.double(),
                                           approximate="tanh")
        return (out,), (ref,), (torch.ops.aten.gelu_backward(a @ w2, pre_in, approximate="tanh"),)
    if epilogue == "bias+residual":
        kernel._mm(a, w, bias, res, None, out, act, kernel.AUX_NONE, **launch)
        return ((out,), (F.linear(a.double(), w.double(), bias.double()) + res.double(),),
                (F.linear(a, w, bias) + res,))
    with_bias = "bias" in epilogue
    save = epilogue.endswith("+pre")
    b_arg = bias if with_bias else None
    kernel._mm(a, w, b_arg, None, aux if save else None, out, act,
               kernel.AUX_STORE_PRE if save else kernel.AUX_NONE, **launch)
    pre_ref = F.linear(a.double(), w.double(), b_arg.double() if with_bias else None)
    pre_torch = F.linear(a, w, b_arg)
    got, ref, mine = (out,), (act_of(pre_ref),), (act_of(pre_torch),)
    if save:
        got, ref, mine = got + (aux,), ref + (pre_ref,), mine + (pre_torch,)
    return got, ref, mine


def _assert_workspace_clean():
    for partials, arrivals in kernel._WORKSPACES[torch.device(DEVICE)]:
        assert not partials.any() and not arrivals.any()


@pytest.mark.parametrize("epilogue", SPLIT_K_EPILOGUES)
@pytest.mark.parametrize("path", SPLIT_K_PATHS)
@pytest.mark.parametrize("m", [1, 7, 32])
def test_split_k_parity(m, path, epilogue):
    """Every split-K candidate path (pointer fp32 / fp16, TMA fp16) with each epilogue."""
    got, ref, mine = _split_k_case(m, path, epilogue)
    for i, (g, r, t) in enumerate(zip(got, ref, mine)):
        assert_parity(g, r, t, name=f"{epilogue} output {i}")
    _assert_workspace_clean()


@pytest.mark.parametrize("path", ["ptr-fp32", "tma-fp16"])
def test_split_k_twice_in_a_row(path):
    """Each call leaves the cached workspace and counters zeroed for the next (no fill per call):
    a second call on new inputs is as right as the first, and uses the same workspace."""
    buffers = kernel._WORKSPACES.setdefault(torch.device(DEVICE), [])
    used = []
    for _ in range(2):
        got, ref, mine = _split_k_case(7, path, "gelu+bias+pre")
        for g, r, t in zip(got, ref, mine):
            assert_parity(g, r, t)
        _assert_workspace_clean()
        used.append(buffers[-1])
    assert used[1] is used[0]


def test_split_k_candidates_and_pruning():
    """Split-K tiles follow the unsplit ones in every list; the pruning keeps them only when the
    launcher allows them (MAX_SPLIT_K > 1), the first unsplit tile stays the default either way."""
    configs = [kernel._config(t) for t in kernel._POINTER_TILES]
    for tiles in (kernel._HALF_TILES, kernel._FP32_TILES, kernel._GATED_HALF_TILES,
                  kernel._GATED_FP32_TILES):
        splits = [len(t) == 6 for t in tiles]
        assert any(splits) and not splits[0] and splits == sorted(splits)
    def kept(dtype, m_bucket, max_split):
        named = {"Out": torch.empty(1, dtype=dtype), "M_BUCKET": m_bucket,
                 "MAX_SPLIT_K": max_split}
        return [kernel._tile_of(c) for c in
                kernel._prune_configs(configs, named, GATED=False, AUX=kernel.AUX_NONE)]

    for dtype in (torch.float16, torch.float32):
        for m_bucket in (1, 8, 32):
            unsplit, with_split = kept(dtype, m_bucket, 1), kept(dtype, m_bucket, 8)
            assert all(len(t) == 5 for t in unsplit)
            assert with_split[:len(unsplit)] == unsplit and len(with_split) > len(unsplit)


# The persistent TMA candidates: one program per SM (4 under the interpreter) walks the output
# tiles, here 3 x 5 = 15 of them (M = 300, N = 520; K = 264 keeps fp16 rows 16-byte aligned).
PERSISTENT_TILE = (128, 128, 64, 8, 3, kernel.PERSISTENT)


@pytest.mark.parametrize("epilogue", SPLIT_K_EPILOGUES)
def test_persistent_parity(epilogue):
    assert PERSISTENT_TILE in kernel._HALF_TILES
    got, ref, mine = _tile_case(300, 520, 264, torch.float16, True, PERSISTENT_TILE, epilogue)
    for i, (g, r, t) in enumerate(zip(got, ref, mine)):
        assert_parity(g, r, t, name=f"{epilogue} output {i}")


def test_persistent_candidates_only_past_one_wave(monkeypatch):
    """Persistent tiles come after the tiles of one program each (the default is one of those),
    are timed only when the output has more tiles than the GPU has SMs, and never for the gated
    (SwiGLU) product."""
    monkeypatch.setattr(_device, "facts", lambda device: _device.HOPPER)  # 132 SMs
    configs = [kernel._config(t, kernel._set_tma_blocks) for t in kernel._TMA_TILES]
    persistent = [kernel.PERSISTENT in t for t in kernel._HALF_TILES]
    assert any(persistent) and persistent == sorted(persistent)
    assert not any(kernel.PERSISTENT in t for t in kernel._GATED_HALF_TILES)

    def kept(m_bucket, n):
        named = {"Out": torch.empty(1, dtype=torch.float16), "M_BUCKET": m_bucket, "N": n,
                 "MAX_SPLIT_K": 1, "ADesc": None}
        return [kernel._tile_of(c) for c in
                kernel._prune_configs(configs, named, GATED=False, AUX=kernel.AUX_NONE)]

    small, large = kept(512, 4096), kept(1024, 4096)  # 4 x 32 = 128 tiles, 8 x 32 = 256
    assert not any(kernel.PERSISTENT in t for t in small)
    assert small[0] == large[0] == kernel._HALF_TILES[0]
    assert PERSISTENT_TILE in large


def test_split_k_only_for_few_rows_and_not_deterministic(monkeypatch):
    """The launcher allows split-K (MAX_SPLIT_K = 8, a real workspace) for M <= 32 only, and not
    under torch.use_deterministic_algorithms (the atomic adds' order varies between runs)."""
    seen = []
    at = kernel._linear_gelu_mm.arg_names.index("MAX_SPLIT_K")

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(args[at])

    monkeypatch.setattr(kernel, "_linear_gelu_mm", Recorder())
    x, w, b = make_inputs(32, 24, 40, torch.float32)
    kernel.linear_act_fwd(x, w, b, "gelu", False)
    kernel.linear_act_fwd(torch.cat([x, x[:1]]), w, b, "gelu", False)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        kernel.linear_act_fwd(x, w, b, "gelu", False)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert seen == [8, 1, 1]
