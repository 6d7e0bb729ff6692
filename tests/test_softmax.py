"""Softmax and scaled + masked softmax on the C++/CUDA extension lightllm._C: parity (docs/design.md §4),
masks, edge numerics, layouts, registration, errors, the module.

Tests run on every device in ``DEVICES``: the CPU kernel here, the CUDA kernels on a GPU machine
(those cases carry the ``cuda`` marker and id: select them with ``-m cuda`` or ``-k cuda``, e.g.
under compute-sanitizer). bfloat16 runs on the CPU too: this is C++, not Triton's interpreter.
"""

import os
import shutil
import warnings

import pytest
import torch
from conftest import HAS_CUDA, dtype_params

import lightllm
import lightllm.functional as LF
from lightllm import _dispatch
from lightllm.ops import softmax as ops
from lightllm.reference import softmax as reference
from lightllm.testing import assert_parity

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = dtype_params(interpreted=False)
# Warp (<= 1024), block (fits shared memory) and split (longer) kernels on CUDA; odd lengths take
# the element-wise path, multiples of the vector width the 16-byte one.
LENGTHS = [1, 7, 97, 1000, 4097, 70000]
INF = float("inf")


def _leading(n: int) -> tuple[int, ...]:
    return (2, 3) if n <= 1000 else (2,)


def _grad(y, x, dy):
    (g,) = torch.autograd.grad(y, x, dy)
    return g


def check_softmax(x: torch.Tensor, dim: int, dy: torch.Tensor | None = None) -> None:
    """lightllm's forward and gradient against float64, with torch.softmax's error as budget."""
    ours = x.detach().requires_grad_(True)
    mine = x.detach().requires_grad_(True)
    ref = x.detach().double().requires_grad_(True)
    y, y_torch, y_ref = LF.softmax(ours, dim), torch.softmax(mine, dim), torch.softmax(ref, dim)
    assert_parity(y, y_ref, y_torch, name="y")
    dy = torch.randn_like(y) if dy is None else dy
    assert_parity(_grad(y, ours, dy), _grad(y_ref, ref, dy.double()), _grad(y_torch, mine, dy),
                  grad=True, name="dx")


def check_masked(x, mask=None, scale=1.0, is_causal=False):
    """scaled_masked_softmax against the reference in float64; the reference in x's dtype (eager
    PyTorch) sets the budget. Gradients of x and of an additive mask that requires grad."""
    def leaves(dtype=None):
        xl = x.detach().to(dtype or x.dtype).requires_grad_(True)
        ml = mask
        if mask is not None and mask.requires_grad:
            ml = mask.detach().to(dtype or mask.dtype).requires_grad_(True)
        elif mask is not None and dtype is not None and mask.dtype != torch.bool:
            ml = mask.to(dtype)
        return xl, ml

    (xo, mo), (xt, mt), (xr, mr) = leaves(), leaves(), leaves(torch.float64)
    y = LF.scaled_masked_softmax(xo, mo, scale, is_causal)
    y_torch = reference.scaled_masked_softmax(xt, mt, scale, is_causal)
    y_ref = reference.scaled_masked_softmax(xr, mr, scale, is_causal)
    assert_parity(y, y_ref, y_torch, name="y")
    dy = torch.randn_like(y)
    learned = mask is not None and mask.requires_grad
    names = ("dx", "dmask") if learned else ("dx",)
    grads = [torch.autograd.grad(out, leaves[: len(names)], g)
             for out, leaves, g in ((y, (xo, mo), dy), (y_ref, (xr, mr), dy.double()),
                                    (y_torch, (xt, mt), dy))]
    for name, g, g_ref, g_torch in zip(names, *grads):
        assert_parity(g, g_ref, g_torch, grad=True, name=name)
    return y


# ------------------------------------------------------------------------------------------------
# The extension is what runs
# ------------------------------------------------------------------------------------------------


def test_extension_loaded(monkeypatch):
    """A broken or missing build must fail here, not pass quietly on the reference fallback."""
    import lightllm._C  # noqa: F401

    assert ops.HAS_EXTENSION
    assert "cpu" in ops.KERNEL_DEVICES
    if HAS_CUDA:
        assert "cuda" in ops.KERNEL_DEVICES, "lightllm._C was built without its CUDA kernels"
    for name in ops._OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lightllm::{name}", "CPU")

    # Where torch is a CUDA build and a toolkit is installed, setup.py compiles the .cu: a build
    # that silently dropped it (or a CUDA source that no longer builds) must not pass here.
    toolkit = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if toolkit and os.environ.get("LIGHTLLM_SKIP_CUDA") != "1":
        assert "cuda" in ops.KERNEL_DEVICES, "lightllm._C was built without csrc/softmax_cuda.cu"

    def no_fallback(*args, **kwargs):
        raise AssertionError("the eager reference ran instead of the extension")

    monkeypatch.setattr(reference, "softmax", no_fallback)
    monkeypatch.setattr(reference, "scaled_masked_softmax", no_fallback)
    x = torch.randn(4, 9, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        LF.softmax(x, 1).sum().backward()
        LF.scaled_masked_softmax(x, torch.rand(9) > 0.3, 0.5, True).sum().backward()


# ------------------------------------------------------------------------------------------------
# softmax
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_softmax(device, dtype, n):
    x = torch.randn(*_leading(n), n, device=device, dtype=dtype) * 3
    check_softmax(x, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_softmax_layouts(device, dtype):
    """Any dim, negative dims, non-contiguous inputs, dim contiguous in memory, 0-d and 1-d."""
    x = torch.randn(5, 6, 97, device=device, dtype=dtype)
    for dim in (0, 1, 2, -1, -2, -3):
        check_softmax(x, dim)
    check_softmax(x[:, 1:, ::2], -1)                          # sliced: strided rows, odd start
    check_softmax(x.transpose(0, 2), 0)                       # dim is the contiguous one: no copy
    check_softmax(x.permute(2, 0, 1)[:, 1:4], 1)              # neither: copied
    check_softmax(torch.randn(13, device=device, dtype=dtype), 0)
    check_softmax(torch.randn((), device=device, dtype=dtype), 0)
    check_softmax(torch.randn(3, 1, 8, device=device, dtype=dtype), 1)  # rows of length 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_softmax_expanded_inputs(device, dtype):
    """Stride-0 output gradients (y.sum().backward()) and stride-0 inputs."""
    x = torch.randn(4, 1, 300, device=device, dtype=dtype).expand(4, 5, 300)
    check_softmax(x, -1, dy=torch.ones((), device=device, dtype=dtype).expand(4, 5, 300))
    ours = x.detach().requires_grad_(True)
    LF.softmax(ours, -1).sum().backward()
    mine = x.detach().requires_grad_(True)
    torch.softmax(mine, -1).sum().backward()
    ref = x.detach().double().requires_grad_(True)
    torch.softmax(ref, -1).sum().backward()
    assert_parity(ours.grad, ref.grad, mine.grad, grad=True, name="dx from y.sum()")


@pytest.mark.parametrize("n", [7, 1000, 4097, 70000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_softmax_edge_numerics(device, dtype, n):
    """-inf entries, a row of all -inf (NaN, as torch.softmax), +inf (NaN row), NaN (NaN row,
    others untouched), huge magnitudes (no overflow: the max is subtracted)."""
    huge = 3e4 if dtype == torch.float16 else 1e37
    x = torch.randn(6, n, device=device, dtype=dtype)
    x[0, ::3] = -INF
    x[1] = -INF
    x[2, n // 2] = INF
    x[3, n // 3] = float("nan")
    x[4] = torch.randn(n, device=device, dtype=dtype).sign() * huge
    x[5] = (torch.randn(n, device=device) * huge / 4).to(dtype)
    check_softmax(x, -1)
    y = LF.softmax(x, -1)
    assert y[1].isnan().all() and y[2].isnan().all() and y[3].isnan().all()
    assert not y[[0, 4, 5]].isnan().any()
    assert (y[0, ::3] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_softmax_empty(device, dtype):
    for shape, dim in (((0, 5), -1), ((3, 0), -1), ((3, 0), 0), ((2, 0, 4), 1), ((0,), 0)):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        y = LF.softmax(x, dim)
        assert y.shape == x.shape and y.dtype == dtype
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_softmax_dtype_argument():
    x = torch.randn(3, 50, dtype=torch.float16)
    y = LF.softmax(x, -1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_parity(y, torch.softmax(x.double(), -1), torch.softmax(x, -1, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# scaled_masked_softmax
# ------------------------------------------------------------------------------------------------

B, H = 2, 3


def _mask(kind: str, shape, device, dtype) -> torch.Tensor:
    if kind == "bool":
        return torch.rand(shape, device=device) > 0.3
    m = torch.randn(shape, device=device, dtype=dtype)
    return m.masked_fill(torch.rand(shape, device=device) < 0.2, -INF)


@pytest.mark.parametrize("nq,nk", [(5, 17), (17, 5), (1, 97), (13, 1000), (3, 4097)])
@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_scaled_masked_softmax(device, dtype, kind, nq, nk):
    x = torch.randn(B, H, nq, nk, device=device, dtype=dtype) * 2
    shapes = [None] if kind == "none" else [
        (B, H, nq, nk),   # full
        (1, 1, nq, nk),   # shared by batch and heads
        (B, 1, 1, nk),    # padding mask: per batch, per key
        (nk,),            # fewer dims
        (B, H, nq, 1),    # per query, broadcast over keys
    ]
    for shape in shapes:
        mask = None if shape is None else _mask(kind, shape, device, dtype)
        check_masked(x, mask, scale=0.37)
    check_masked(x, None if kind == "none" else _mask(kind, (nq, nk), device, dtype),
                 scale=1.0, is_causal=True)


@pytest.mark.parametrize("n", [70000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_scaled_masked_softmax_long_rows(device, dtype, n):
    x = torch.randn(1, 2, 3, n, device=device, dtype=dtype)
    check_masked(x, _mask("bool", (1, 1, 3, n), device, dtype), scale=0.5, is_causal=True)
    check_masked(x, _mask("additive", (2, 1, n), device, dtype), scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_scaled_masked_softmax_layouts(device, dtype):
    """Non-contiguous x and mask (a transposed mask, a sliced x), a learnable additive bias."""
    x = torch.randn(B, H, 40, 33, device=device, dtype=dtype)[..., 1:32]
    check_masked(x, torch.rand(B, 1, 31, 40, device=device).transpose(-1, -2) > 0.2, 0.5)
    bias = torch.randn(1, H, 1, 31, device=device, dtype=dtype).requires_grad_(True)
    check_masked(x, bias, 0.5)
    bias = torch.randn(40, 31, device=device, dtype=dtype).requires_grad_(True)
    check_masked(x, bias, 1.0, is_causal=True)
    # More broadcast dims than the kernels index (6): the mask is materialised first.
    x8 = torch.randn((2,) * 8 + (9,), device=device, dtype=dtype)
    check_masked(x8, torch.rand((2, 1) * 4 + (9,), device=device) > 0.3, 0.5)


@pytest.mark.parametrize("n", [9, 1000, 4097, 70000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows(device, dtype, n):
    """Rows with every key dropped give exactly 0 and a zero gradient (not NaN)."""
    x = torch.randn(2, 3, n, device=device, dtype=dtype, requires_grad=True)
    keep = torch.rand(2, 3, n, device=device) > 0.5
    keep[0, 1] = False
    bias = torch.zeros(2, 3, n, device=device, dtype=dtype).masked_fill(~keep, -INF)
    for mask in (keep, bias):
        y = LF.scaled_masked_softmax(x, mask, 0.5)
        assert (y[0, 1] == 0).all()
        assert not y.isnan().any()
        torch.testing.assert_close(y[1].float().sum(-1), torch.ones(3, device=device),
                                   atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)
        (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
        assert (g[0, 1] == 0).all() and not g.isnan().any()
        check_masked(x.detach(), mask, 0.5)
    # -inf in x itself empties a row just the same (as SDPA's safe softmax does).
    x2 = x.detach().clone()
    x2[1, 2] = -INF
    y = LF.scaled_masked_softmax(x2)
    assert (y[1, 2] == 0).all() and not y.isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_scaled_masked_softmax_edge_numerics(device, dtype):
    """NaN in x gives a NaN row unless the mask drops it; huge scores do not overflow."""
    x = torch.randn(4, 300, device=device, dtype=dtype)
    keep = torch.ones(4, 300, dtype=torch.bool, device=device)
    x[0, 7] = float("nan")
    x[1, 8] = float("nan")
    keep[1, 8] = False
    x[2] = torch.randn(300, device=device).sign().to(dtype) * (3e4 if dtype == torch.float16 else 1e37)
    x[3, 5] = INF
    y = LF.scaled_masked_softmax(x, keep, 0.5)
    assert y[0].isnan().all() and y[3].isnan().all()
    assert not y[1:3].isnan().any()
    check_masked(x, keep, 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_scaled_masked_softmax_empty(device, dtype):
    for shape in ((0, 4), (3, 0), (2, 0, 5, 5)):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        mask = torch.ones(shape[-1:], dtype=torch.bool, device=device)
        y = LF.scaled_masked_softmax(x, mask, 2.0, is_causal=len(shape) > 2)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------------------------
# PyTorch integration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 5, 33, device=device, requires_grad=True)
    keep = torch.rand(1, 3, 1, 33, device=device) > 0.3
    bias = torch.randn(5, 33, device=device, requires_grad=True)
    y = torch.softmax(x.detach(), -1)
    dy = torch.randn_like(y)
    cases = [
        (torch.ops.lightllm.softmax_fwd.default, (x,)),
        (torch.ops.lightllm.softmax_fwd.default, (x.detach()[..., ::2],)),
        (torch.ops.lightllm.softmax_bwd.default, (dy, y)),
        (torch.ops.lightllm.scaled_masked_softmax_fwd.default, (x, None, 0.5, False)),
        (torch.ops.lightllm.scaled_masked_softmax_fwd.default, (x, keep, 0.5, True)),
        (torch.ops.lightllm.scaled_masked_softmax_fwd.default, (x, bias, 1.0, False)),
        (torch.ops.lightllm.scaled_masked_softmax_bwd.default, (dy, y, 0.25)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    def f(x, keep):
        return (LF.softmax(x, 1) * LF.scaled_masked_softmax(x, keep, 0.5, is_causal=True)).sum()

    x = torch.randn(2, 6, 6, device=device)
    keep = torch.rand(6, device=device) > 0.2
    compiled = torch.compile(f, fullgraph=True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, out_eager = compiled(xa, keep), f(xb, keep)
    out.backward()
    out_eager.backward()
    torch.testing.assert_close(out, out_eager)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_namespace_shared_with_python_ops():
    """TORCH_LIBRARY(lightllm) and the Python custom ops (fragments of the namespace) coexist."""
    import lightllm.ops.norm  # noqa: F401  (torch.library.custom_op("lightllm::..."))

    assert hasattr(torch.ops.lightllm, "layer_norm_fwd")
    assert hasattr(torch.ops.lightllm, "softmax_fwd")


# ------------------------------------------------------------------------------------------------
# Module, fallbacks, bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_nn_softmax(device):
    x = torch.randn(2, 3, 4, 5, device=device)
    for dim in (0, 1, -1):
        ours, theirs = lightllm.nn.Softmax(dim), torch.nn.Softmax(dim)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        ours.load_state_dict(theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x))
    with pytest.warns(UserWarning, match="Implicit dimension"):
        y = lightllm.nn.Softmax()(x)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        torch.testing.assert_close(y, torch.nn.Softmax()(x))


def test_fallback_warns_once(monkeypatch):
    """float64, or a device without a kernel, runs the reference with a one-time warning."""
    monkeypatch.setattr(_dispatch, "_warned", set())
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64 has no kernel"):
        torch.testing.assert_close(LF.softmax(x, 0), torch.softmax(x, 0))
    monkeypatch.setattr(ops, "KERNEL_DEVICES", frozenset())
    x = torch.randn(3, 8)
    with pytest.warns(RuntimeWarning, match="no kernel for cpu"):
        y = LF.scaled_masked_softmax(x, None, 0.5)
    torch.testing.assert_close(y, torch.softmax(x * 0.5, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LF.scaled_masked_softmax(x, None, 0.5)  # once only


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x = torch.randn(2, 5, device=device)
    cases = [
        (lambda: LF.softmax(torch.ones(3, dtype=torch.int64, device=device)), TypeError,
         "softmax: x must have dtype"),
        (lambda: LF.softmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: LF.softmax(x, 2), IndexError, "dim 2 is out of range"),
        (lambda: LF.softmax(x, -3), IndexError, "out of range"),
        (lambda: LF.softmax(x, 1.0), TypeError, "dim must be an int"),
        (lambda: LF.scaled_masked_softmax(x, torch.ones(3, 5, dtype=torch.bool, device=device)),
         ValueError, "mask of shape \\(3, 5\\) is not broadcastable"),
        (lambda: LF.scaled_masked_softmax(x, torch.zeros(5, dtype=torch.float16, device=device)),
         TypeError, "mask must be bool .* or additive with x's dtype"),
        (lambda: LF.scaled_masked_softmax(x, torch.zeros(5, dtype=torch.int32, device=device)),
         TypeError, "mask must be bool"),
        (lambda: LF.scaled_masked_softmax(x, torch.ones(5, dtype=torch.bool, device="meta")),
         RuntimeError, "expected all tensors on one device"),
        (lambda: LF.scaled_masked_softmax(torch.randn(5, device=device), is_causal=True),
         ValueError, "is_causal=True needs x with at least 2 dimensions"),
        (lambda: LF.scaled_masked_softmax(x, scale=torch.tensor(2.0)), TypeError,
         "scale must be a real number"),
        (lambda: LF.scaled_masked_softmax(x.int()), TypeError, "x must have dtype"),
        # The C++ checks, reached by calling the ops directly.
        (lambda: torch.ops.lightllm.softmax_fwd(x.int()), RuntimeError,
         "lightllm::softmax_fwd: x must have dtype float32, float16 or bfloat16"),
        (lambda: torch.ops.lightllm.scaled_masked_softmax_fwd(
            x, torch.ones(3, 5, dtype=torch.bool, device=device), 1.0, False), RuntimeError,
         "mask of shape \\[3, 5\\] is not broadcastable to x of shape \\[2, 5\\]"),
        (lambda: torch.ops.lightllm.scaled_masked_softmax_fwd(x, x.half(), 1.0, False),
         RuntimeError, "mask must be bool \\(True = keep\\) or additive with x's dtype"),
        (lambda: torch.ops.lightllm.scaled_masked_softmax_fwd(x[0], None, 1.0, True),
         RuntimeError, "is_causal=True needs x with at least 2 dimensions"),
        (lambda: torch.ops.lightllm.softmax_bwd(x.half(), x), RuntimeError,
         "grad_y must have y's dtype"),
        (lambda: torch.ops.lightllm.softmax_bwd(x[:, :3], x), RuntimeError,
         "grad_y must have y's shape"),
    ]
    if device == "cuda":
        cases += [
            (lambda: LF.scaled_masked_softmax(x, torch.ones(5, dtype=torch.bool)), RuntimeError,
             "expected all tensors on one device"),
            (lambda: torch.ops.lightllm.scaled_masked_softmax_fwd(
                x, torch.ones(5, dtype=torch.bool), 1.0, False), RuntimeError,
             "mask must be on x's device"),
        ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


# ------------------------------------------------------------------------------------------------
# CUDA only: kernel paths, alignment, streams, 64-bit offsets
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
# 58000: past the longest fp32 row the block kernel keeps on an H100/H200 (fp32 z, 4 bytes an
# element); 115712 / 115713: the longest unmasked 16-bit one (raw x, 2 bytes) and one past it.
@pytest.mark.parametrize("n", [128, 1023, 1024, 1025, 8192, 16385, 58000, 65536, 115712, 115713,
                               262144, 262147])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_paths_and_alignment(dtype, n):
    """Every kernel (warp, block, split) with 16-byte aligned rows and with misaligned ones."""
    rows = max(2, 2**20 // n)
    base = torch.randn(rows, n + 1, device="cuda", dtype=dtype) * 4
    check_softmax(base[:, :n], -1)        # row stride n + 1: misaligned rows
    check_softmax(base[:, 1:], -1)        # misaligned start
    check_softmax(base.view(-1)[: rows * n].view(rows, n), -1)  # aligned
    mask = torch.rand(rows, n, device="cuda") > 0.5
    check_masked(base[:, :n], mask, 0.5)
    check_masked(base[:, :n], torch.randn(n, device="cuda", dtype=dtype), 0.5)
    # A negative scale: the elements past n in a row's last vector must stay -inf.
    check_masked(base[:, :n], None, -0.7)


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3, 4, 33, 5000, dtype=dtype)
        keep = torch.rand(1, 4, 33, 5000) > 0.1
        y_cpu = LF.scaled_masked_softmax(x, keep, 0.3, True)
        y_cuda = LF.scaled_masked_softmax(x.cuda(), keep.cuda(), 0.3, True)
        torch.testing.assert_close(y_cuda.cpu(), y_cpu, atol=2e-3 if dtype != torch.float32 else 1e-5,
                                   rtol=1e-2)


@pytest.mark.cuda
def test_cuda_side_stream():
    x = torch.randn(64, 3000, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = LF.softmax(x, -1)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, torch.softmax(x, -1))


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_64bit_offsets():
    """More than 2^31 elements: offsets must not wrap."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    rows, n = 2**19 + 3, 4096
    x = torch.empty(rows, n, device="cuda", dtype=torch.float16).normal_()
    y = LF.softmax(x, -1)
    tail = slice(rows - 5, rows)
    torch.testing.assert_close(y[tail], torch.softmax(x[tail], -1), atol=2e-3, rtol=1e-2)
    del y
    g = torch.ops.lightllm.softmax_bwd(x, torch.softmax(x[:1], -1).expand(rows, n))
    ref = torch._softmax_backward_data(x[tail], torch.softmax(x[:1], -1).expand(5, n), -1,
                                       torch.float16)
    torch.testing.assert_close(g[tail], ref, atol=2e-3, rtol=1e-2)
