"""The suite's quick cases through pytest-benchmark, one test per (case, mode, provider):

    pytest benchmarks --benchmark-json=out.json [-k layer_norm]

The same cases, providers and timed callables as ``python -m benchmarks --quick``; a provider that
cannot run here (a peer that is not installed or needs CUDA, torch.compile on a CPU) is reported as
a skip with that reason. On a CPU-only machine these time the CPU paths.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.__main__ import collect
from benchmarks.harness import DEVICE, HAS_CUDA, Unavailable, jobs, make_timed_call

CASES, _ = collect(quick=True)
PARAMS = [pytest.param(case, mode, provider, id=f"{case.op}[{case.label}]-{mode}-{provider}")
          for case in CASES for mode, provider in jobs(case)]


@pytest.mark.parametrize("case, mode, provider", PARAMS)
def test_benchmark(benchmark, case, mode, provider):
    fn = case.providers[provider]
    if isinstance(fn, Unavailable):
        pytest.skip(f"{provider}: {fn.status}")
    if provider.startswith("compile") and not HAS_CUDA:
        pytest.skip("torch.compile on a CPU: minutes of C++ compilation per case")
    call = make_timed_call(case, fn, mode, [case.make_inputs(torch.device(DEVICE))])

    def synced():
        out = call()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    synced()  # compile / autotune outside the timed rounds
    benchmark.extra_info.update({"op": case.op, "case": case.label, "dtype": case.dtype_name,
                                 "mode": mode, "provider": provider, "device": DEVICE})
    benchmark.pedantic(synced, rounds=20 if HAS_CUDA else 3, warmup_rounds=1)
