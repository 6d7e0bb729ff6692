"""The C++ CPU kernels of LayerNorm and Add & Norm (``torch.ops.lightllm.layer_norm_fwd_cpu`` /
``layer_norm_bwd_cpu`` in lightllm._C): parity with float64 by the rule of docs/design.md §4, statistics,
determinism, edge numerics, bad input, opcheck, and each compiled instruction set."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import dtype_params

import lightllm.ops.norm  # noqa: F401  (registers the ops' fake tensors, for opcheck)
from lightllm.reference import norm as reference
from lightllm.testing import assert_parity, grads, leaves

try:
    from lightllm import _C  # noqa: F401  (registers torch.ops.lightllm.*)
except ImportError as e:  # pragma: no cover - the extension is part of every build
    pytest.skip(f"lightllm._C is not built ({e})", allow_module_level=True)
if not hasattr(torch.ops.lightllm, "layer_norm_fwd_cpu"):  # pragma: no cover
    pytest.skip("lightllm._C was built without the LayerNorm CPU kernels", allow_module_level=True)

op = torch.ops.lightllm
DTYPES = dtype_params(interpreted=False)  # C++ kernels: bfloat16 runs natively on CPU
ROWS = [1, 7, 97]
HIDDEN = [1, 3, 1023, 1500, 4096]
AFFINE = ["weight+bias", "weight", "none"]


# -- helpers ----------------------------------------------------------------------------------------

def _inputs(rows, hidden, dtype, affine="weight+bias", residual=False, param_dtype=None):
    x = torch.randn(rows, hidden, dtype=dtype)
    r = torch.randn(rows, hidden, dtype=dtype) if residual else None
    pd = param_dtype or dtype
    w = torch.randn(hidden, dtype=pd) if affine != "none" else None
    b = torch.randn(hidden, dtype=pd) if affine == "weight+bias" else None
    return x, r, w, b


def run_ops(x, r, w, b, eps, dy, ds):
    """Forward, then the backward of what it normalised: (y, s, mean, rstd, dx, dw, db)."""
    y, s, mean, rstd = op.layer_norm_fwd_cpu(x, r, w, b, eps)
    dx, dw, db = op.layer_norm_bwd_cpu(dy, x if r is None else s, w, mean, rstd, ds,
                                       w is not None, b is not None)
    return y, s, mean, rstd, dx, dw, db


def check(x, r, w, b, eps=1e-5, dy=None, ds=None, ours=run_ops):
    """Every output of the two ops against float64, PyTorch's own result as the budget: for Add &
    Norm that is ``F.layer_norm(x + r)`` in x's dtype. dw, db are checked against a random
    projection of y (never y.sum())."""
    n = x.shape[1]
    dy = torch.randn(x.shape, dtype=x.dtype) if dy is None else dy
    if r is not None and ds is None:
        ds = torch.randn(x.shape, dtype=x.dtype)
    y, s, mean, rstd, dx, dw, db = ours(x, r, w, b, eps, dy, ds)

    ref = leaves(x, r, w, b, dtype=torch.float64)
    mine = leaves(x, r, w, b)
    if r is None:
        y_ref, s_ref = reference.layer_norm(ref[0], (n,), ref[2], ref[3], eps), ref[0]
        s_torch = mine[0]
    else:
        y_ref, s_ref = reference.add_layer_norm(ref[0], ref[1], (n,), ref[2], ref[3], eps)
        s_torch = mine[0] + mine[1]
    y_torch = F.layer_norm(s_torch, (n,), mine[2], mine[3], eps)

    assert y.dtype == x.dtype and y.is_contiguous()
    assert_parity(y, y_ref, y_torch, name="y")
    if r is None:
        assert s.shape == (0,) and s.dtype == x.dtype
    else:
        assert_parity(s, s_ref, s_torch, name="x + residual")

    # Statistics of what was normalised (x, or the sum rounded to x's dtype): fp32 (M,), against
    # float64 with PyTorch's fp32 statistics of the same input as the budget.
    normalised = s_torch.detach()
    _, mean_torch, rstd_torch = torch.native_layer_norm(normalised.float(), (n,), None, None, eps)
    s64 = normalised.double()
    var64 = (s64 - s64.mean(1, keepdim=True)).square().mean(1)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (x.shape[0],)
    assert_parity(mean, s64.mean(1), mean_torch.float().view(-1), name="mean")
    assert_parity(rstd, (var64 + eps).rsqrt(), rstd_torch.float().view(-1), name="rstd")

    outs_ref, outs_torch, g_out = (y_ref,), (y_torch,), (dy,)
    if r is not None:
        outs_ref, outs_torch, g_out = (y_ref, s_ref), (y_torch, s_torch), (dy, ds)
    g_ref = grads(outs_ref, ref, tuple(g.double() for g in g_out))
    g_torch = grads(outs_torch, mine, g_out)
    assert dx.dtype == x.dtype and dx.is_contiguous()
    assert_parity(dx, g_ref[0], g_torch[0], grad=True, name="dx")
    # dw, db are fp32 whatever the parameters' dtype; PyTorch's (in that dtype) sets the budget.
    for name, got, want, budget in (("dw", dw, g_ref[2], g_torch[2]), ("db", db, g_ref[3], g_torch[3])):
        assert got.dtype == torch.float32
        if want is None:
            assert got.shape == (0,), name
        else:
            assert_parity(got, want, budget.float(), grad=True, name=name)


# -- parity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add+norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_parity(rows, hidden, dtype, residual):
    check(*_inputs(rows, hidden, dtype, residual=residual))


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add+norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("hidden", [3, 1023])
def test_affine_variants(hidden, affine, dtype, residual):
    check(*_inputs(13, hidden, dtype, affine, residual), eps=1e-3)


@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add+norm"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float16, torch.bfloat16, interpreted=False))
def test_fp32_parameters_with_half_activations(dtype, residual):
    check(*_inputs(9, 257, dtype, residual=residual, param_dtype=torch.float32))


def test_long_rows():
    """Rows far past L1 (the scratch row and the prefetch still have to be right)."""
    check(*_inputs(3, 20000, torch.float32, residual=True))
    check(*_inputs(2, 20000, torch.bfloat16))


# -- layouts --------------------------------------------------------------------------------------------

def test_non_contiguous_inputs():
    base = torch.randn(11, 600)
    w, b = torch.randn(300), torch.randn(300)
    rows_with_stride = base[:, :300]  # contiguous rows 600 apart: read in place
    strided_columns = base[:, ::2]    # last stride 2: copied
    assert rows_with_stride.stride() == (600, 1) and strided_columns.stride() == (600, 2)
    for x in (rows_with_stride, strided_columns):
        check(x, None, w, b, dy=torch.randn(300, 11).t())
        check(x, torch.randn(300, 11).t(), w, b, dy=torch.randn(11, 400)[:, 50:350],
              ds=torch.randn(11, 900)[:, ::3])
    check(torch.randn(300, 11).t(), torch.randn(11, 400)[:, 50:350], w, b)


def test_stride0_gradients():
    """The gradient of y.sum() reaches a backward as an expanded scalar (strides 0, 0: copied); a
    broadcast row (strides 0, 1) is read in place. Both must give exactly what the same gradient
    stored densely gives."""
    x, r, w, b = _inputs(11, 300, torch.float32, residual=True)
    scalar = torch.ones(()).expand(11, 300)
    row = torch.randn(1, 300).expand(11, 300)
    _, s, mean, rstd = op.layer_norm_fwd_cpu(x, r, w, b, 1e-5)
    for dy in (scalar, row):
        for ds in (None, scalar, row):
            got = op.layer_norm_bwd_cpu(dy, s, w, mean, rstd, ds, True, True)
            want = op.layer_norm_bwd_cpu(dy.contiguous(), s, w, mean, rstd,
                                         None if ds is None else ds.contiguous(), True, True)
            assert all(torch.equal(g, e) for g, e in zip(got, want))
    check(x, r, w, b, dy=row, ds=row * 0.5)


# -- numerics -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_large_magnitudes(dtype):
    """A large common offset must not cost precision or overflow: fp32 two-pass statistics."""
    if dtype == torch.float16:  # near fp16's max (65504); the sum stays below it too
        x = (torch.randn(8, 1023) * 50 + 3e4).half()
        r = (torch.randn(8, 1023) * 50 + 3e4).half()
    else:
        x = (torch.randn(8, 1023) * 1e3 + 1e4).to(dtype)
        r = (torch.randn(8, 1023) * 1e3 + 1e4).to(dtype)
    w, b = torch.randn(1023, dtype=dtype), torch.randn(1023, dtype=dtype)
    check(x, None, w, b)
    check(x, r, w, b)
    y, s, _, _ = op.layer_norm_fwd_cpu(x, r, w, b, 1e-5)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()


def test_constant_rows_give_bias():
    x = torch.full((3, 64), 2.5)
    y, _, mean, rstd = op.layer_norm_fwd_cpu(x, None, None, None, 1e-5)
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(mean, torch.full((3,), 2.5))
    assert torch.equal(rstd, torch.full((3,), 1e-5).rsqrt())


def test_nan_propagates_to_its_row_and_column_only():
    x, r, w, b = _inputs(4, 100, torch.float32)
    x[1, 17] = float("nan")
    y, _, mean, rstd = op.layer_norm_fwd_cpu(x, r, w, b, 1e-5)
    assert y[1].isnan().all() and mean[1].isnan() and rstd[1].isnan()
    assert torch.isfinite(y[[0, 2, 3]]).all()
    x[1, 17] = 0.0
    y, _, mean, rstd = op.layer_norm_fwd_cpu(x, r, w, b, 1e-5)
    dy = torch.randn(4, 100)
    dy[2, 5] = float("nan")
    dx, dw, db = op.layer_norm_bwd_cpu(dy, x, w, mean, rstd, None, True, True)
    assert dx[2].isnan().all() and torch.isfinite(dx[[0, 1, 3]]).all()
    assert dw[5].isnan() and db[5].isnan()
    assert torch.isfinite(dw[torch.arange(100) != 5]).all()
    assert torch.isfinite(db[torch.arange(100) != 5]).all()


def test_empty_inputs():
    x = torch.randn(0, 16)
    y, s, mean, rstd = op.layer_norm_fwd_cpu(x, x, torch.randn(16), None, 1e-5)
    assert y.shape == s.shape == (0, 16) and mean.shape == rstd.shape == (0,)
    dx, dw, db = op.layer_norm_bwd_cpu(x, x, None, mean, rstd, x, True, True)
    assert dx.shape == (0, 16)
    assert torch.equal(dw, torch.zeros(16)) and torch.equal(db, torch.zeros(16))
    # No features: no output elements, and statistics of an empty row (0 / 0, as the Triton kernel).
    x = torch.randn(5, 0, dtype=torch.bfloat16)
    y, s, mean, rstd = op.layer_norm_fwd_cpu(x, None, None, None, 1e-5)
    assert y.shape == (5, 0) and s.shape == (0,) and mean.isnan().all() and rstd.isnan().all()
    dx, dw, db = op.layer_norm_bwd_cpu(x, x, None, mean, rstd, None, True, False)
    assert dx.shape == (5, 0) and dw.shape == db.shape == (0,)


# -- determinism ----------------------------------------------------------------------------------------

def test_backward_is_deterministic_across_calls_and_thread_counts():
    """dw/db are reduced over a fixed chunking of the rows (300 rows of 1023: 10 chunks)."""
    x, _, w, _ = _inputs(300, 1023, torch.float32)
    _, _, mean, rstd = op.layer_norm_fwd_cpu(x, None, w, None, 1e-5)
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (max(threads, 2), 1, max(threads, 2)):
            torch.set_num_threads(n)
            results.append(op.layer_norm_bwd_cpu(dy, x, w, mean, rstd, None, True, True))
    finally:
        torch.set_num_threads(threads)
    for again in results[1:]:
        assert all(torch.equal(a, g) for a, g in zip(results[0], again))


# -- each instruction set ---------------------------------------------------------------------------

_CHILD = """
import sys, torch
from lightllm import _C
outputs = []
for x, r, w, b, eps, dy, ds in torch.load(sys.argv[1]):
    y, s, mean, rstd = torch.ops.lightllm.layer_norm_fwd_cpu(x, r, w, b, eps)
    outputs.append((y, s, mean, rstd) + tuple(torch.ops.lightllm.layer_norm_bwd_cpu(
        dy, x if r is None else s, w, mean, rstd, ds, w is not None, b is not None)))
torch.save(outputs, sys.argv[2])
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_each_instruction_set(isa, tmp_path):
    """The kernels are compiled for AVX-512, AVX2 and the x86-64 baseline; LIGHTLLM_CPU_ISA caps
    the choice (read once per process, hence a child process for each)."""
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for residual in (False, True):
            x, r, w, b = _inputs(7, 1500, dtype, residual=residual)
            ds = torch.randn(x.shape, dtype=dtype) if residual else None
            cases.append((x, r, w, b, 1e-5, torch.randn(x.shape, dtype=dtype), ds))
    src, dst = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(cases, src)
    subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], check=True,
                   env=dict(os.environ, LIGHTLLM_CPU_ISA=isa))
    for case, outputs in zip(cases, torch.load(dst)):
        check(*case, ours=lambda *_, _o=outputs: _o)


# -- registration and bad input ---------------------------------------------------------------------

def test_opcheck():
    x, r, w, b = _inputs(6, 33, torch.float32, residual=True)
    for args in ((x, r, w, b, 1e-5), (x, None, None, None, 1e-5),
                 (x.bfloat16(), None, w, b.bfloat16(), 1e-5)):
        torch.library.opcheck(op.layer_norm_fwd_cpu.default, args)
    _, s, mean, rstd = op.layer_norm_fwd_cpu(x, r, w, b, 1e-5)
    dy = torch.randn(6, 33)
    for args in ((dy, s, w, mean, rstd, dy, True, True), (dy, x, None, mean, rstd, None, False, False),
                 (torch.ones(()).expand(6, 33), s, w, mean, rstd, None, True, False)):
        torch.library.opcheck(op.layer_norm_bwd_cpu.default, args)


def _fwd(x, residual=None, weight=None, bias=None):
    return op.layer_norm_fwd_cpu(x, residual, weight, bias, 1e-5)


def _bwd(x, dy=None, weight=None, mean=None, rstd=None, ds=None):
    m = x.shape[0] if x.dim() else 1
    return op.layer_norm_bwd_cpu(x if dy is None else dy, x, weight,
                                 torch.zeros(m) if mean is None else mean,
                                 torch.ones(m) if rstd is None else rstd, ds, True, True)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: _fwd(x[0]), "x must be 2-D"),
        (lambda x: _fwd(x.double()), "x must have dtype float32, float16 or bfloat16"),
        (lambda x: _fwd(x, residual=x[:2]), "residual must have x's shape"),
        (lambda x: _fwd(x, residual=x.half()), "residual must have x's dtype"),
        (lambda x: _fwd(x, weight=torch.ones(15)), r"weight must have shape \(16,\)"),
        (lambda x: _fwd(x, bias=torch.ones(4, 4)), r"bias must have shape \(16,\)"),
        (lambda x: _fwd(x, weight=torch.ones(16, dtype=torch.int32)), "weight must have dtype"),
        (lambda x: _bwd(x, dy=x[:, :8]), "dy must have x's shape"),
        (lambda x: _bwd(x, dy=x.bfloat16()), "dy must have x's dtype"),
        (lambda x: _bwd(x, ds=x.half()), "ds must have x's dtype"),
        (lambda x: _bwd(x, mean=torch.zeros(4, dtype=torch.float16)), "mean must have dtype float32"),
        (lambda x: _bwd(x, rstd=torch.ones(5)), r"rstd must have shape \(4,\)"),
        (lambda x: _bwd(x, weight=torch.ones(17)), r"weight must have shape \(16,\)"),
        (lambda x: _bwd(x[0]), "x must be 2-D"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.randn(4, 16))
