"""Dispatch (DESIGN.md §3): inputs a kernel cannot serve fall back to the reference, with a warning
where the kernels would otherwise run; they never return a wrong answer."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import lightllm.functional as LF
from lightllm import _dispatch

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
def test_bfloat16_on_cpu_is_right(name, ours, theirs, inputs):
    """bfloat16 CPU tensors never reach the interpreter's dot (it multiplies raw bits)."""
    expected = theirs(inputs).to(torch.bfloat16).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dispatch._warned.clear()
        got = ours(tuple(t.to(torch.bfloat16) for t in inputs)).float()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)
    messages = [str(w.message) for w in caught]
    if CPU_KERNELS:
        assert any("bfloat16" in m and name in m for m in messages), messages


def test_float64_warns_once_where_kernels_run():
    x = torch.randn(3, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _dispatch._warned.clear()
        LF.layer_norm(x, (8,))
        LF.layer_norm(x, (8,))
    fallbacks = [w for w in caught if "float64" in str(w.message)]
    assert len(fallbacks) == (1 if CPU_KERNELS else 0)
