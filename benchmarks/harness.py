"""The benchmark harness every op's benchmark uses (DESIGN.md §5).

A benchmark file describes *cases* (shapes, a way to make fresh inputs, the ideal memory traffic or
FLOPs) and *providers* (eager reference, PyTorch's fused op, torch.compile of the reference,
lightllm, FlashAttention when installed). The harness times each pair with
``triton.testing.do_bench`` (median with p20/p80), rotating through input copies larger than the L2
cache, measures the card's copy bandwidth and bf16 matmul rate in the same run, converts times to
GB/s or TFLOP/s and % of that roofline, records peak memory, and writes JSON and Markdown.

Without a CUDA device it times the CPU paths for real: lightllm's native CPU path (its C++ kernels
or PyTorch's native ops behind its validation) beside PyTorch on the same inputs, each call timed
on its own with ``time.perf_counter`` (median and p20/p80 of at least five runs). ``torch.compile``
providers are skipped there unless ``--compile`` (minutes of C++ compilation per case on 2 cores).
Kernel timings need an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

HAS_CUDA = torch.cuda.is_available()
MODES = ("fwd", "bwd", "fwd+bwd", "step")  # step: the provider runs a whole training step


@dataclass
class Case:
    """One shape of one op.

    ``make_inputs(device)`` returns fresh positional inputs (floating tensors that need gradients
    are marked by ``grad_inputs``, their positions). ``bytes`` / ``flops`` map a mode to the ideal
    traffic or work of that mode, used for GB/s (memory-bound ops) or TFLOP/s (matmul-bound ops).
    """

    op: str
    label: str
    params: dict[str, Any]
    make_inputs: Callable[[torch.device], Sequence[Any]]
    providers: dict[str, Callable[..., Any]]
    modes: Sequence[str] = ("fwd",)
    grad_inputs: Sequence[int] = (0,)
    bytes: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Ceilings of the card, measured in the same run as the ops.
# --------------------------------------------------------------------------------------------


def measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and dense bf16 matmul rate (FLOP/s)."""
    from triton.testing import do_bench

    def copy_rate(n=1 << 28):  # 1 GiB of float32 per buffer: far beyond any L2
        src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
        dst = torch.empty_like(src)
        ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
        return 2 * src.numel() * src.element_size() / (ms * 1e-3)

    def matmul_rate(m=8192):
        a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
        ms = do_bench(lambda: a @ b, warmup=50, rep=300)
        return 2 * m**3 / (ms * 1e-3)

    ceilings = {"copy_bytes_per_s": copy_rate(), "bf16_matmul_flop_per_s": matmul_rate()}
    torch.cuda.empty_cache()
    return ceilings


# --------------------------------------------------------------------------------------------
# Building the timed callables.
# --------------------------------------------------------------------------------------------


def _as_tuple(x):
    return x if isinstance(x, (tuple, list)) else (x,)


def _tensor_bytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def _rotation(case: Case, device: torch.device) -> list[Sequence[Any]]:
    """Enough fresh input sets that cycling through them streams more than twice the L2 cache."""
    first = case.make_inputs(device)
    if device.type != "cuda":
        return [first]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    size = max(_tensor_bytes(first), 1)
    free, _ = torch.cuda.mem_get_info(device)
    copies = min(max(1, math.ceil(2 * l2 / size)), 16, max(1, int(0.3 * free // size)))
    return [first] + [case.make_inputs(device) for _ in range(copies - 1)]


def make_timed_call(case: Case, fn: Callable[..., Any], mode: str, sets) -> Callable[[], Any]:
    """A no-argument callable that runs ``mode`` of ``fn``, moving to the next input set each call."""
    states = []
    for inputs in sets:
        if mode in ("fwd", "step"):
            states.append((inputs, None, None))
            continue
        inputs = list(inputs)
        leaves = []
        for i in case.grad_inputs:
            if inputs[i] is not None:
                inputs[i] = inputs[i].detach().requires_grad_(True)
                leaves.append(inputs[i])
        grads = None
        outputs = None
        if mode == "bwd":
            outputs = [o for o in _as_tuple(fn(*inputs)) if isinstance(o, torch.Tensor)
                       and o.requires_grad]
            grads = [torch.randn_like(o) for o in outputs]
        else:
            with torch.no_grad():
                probe = [o for o in _as_tuple(fn(*inputs)) if isinstance(o, torch.Tensor)]
            grads = [torch.randn_like(o) for o in probe]
        states.append((inputs, (outputs, grads), leaves))

    counter = [0]

    def call():
        inputs, extra, leaves = states[counter[0] % len(states)]
        counter[0] += 1
        if mode == "fwd":
            with torch.no_grad():
                return fn(*inputs)
        if mode == "step":
            return fn(*inputs)
        if mode == "bwd":
            outputs, grads = extra
            return torch.autograd.grad(outputs, leaves, grads, retain_graph=True)
        outputs = [o for o in _as_tuple(fn(*inputs)) if isinstance(o, torch.Tensor)]
        return torch.autograd.grad(outputs, leaves, extra[1])

    return call


# --------------------------------------------------------------------------------------------
# Running cases.
# --------------------------------------------------------------------------------------------


def _peak_mib(call: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_bench(call: Callable[[], Any], min_seconds: float = 0.5, max_runs: int = 50):
    """(median, p20, p80) in ms of single calls on a CPU: one warm-up call, then at least five
    timed calls and at least ``min_seconds`` of them."""
    call()
    times: list[float] = []
    while len(times) < 5 or (sum(times) < min_seconds and len(times) < max_runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times) * 1e3, q[1] * 1e3, q[7] * 1e3


def run_case(case: Case, ceilings: dict[str, float] | None, only: Sequence[str] = (),
             compile_on_cpu: bool = False) -> list[dict]:
    """Time every provider on every mode of ``case``; one result row each."""
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    sets = _rotation(case, device)
    rows = []
    for mode in case.modes:
        for provider, fn in case.providers.items():
            if only and provider not in only:
                continue
            if not HAS_CUDA and provider.startswith("compile") and not compile_on_cpu:
                continue  # minutes of C++ compilation per case on a 2-core machine
            row = {"op": case.op, "case": case.label, "mode": mode, "provider": provider,
                   "device": device.type, **case.params}
            try:
                call = make_timed_call(case, fn, mode, sets)
                if HAS_CUDA:
                    from triton.testing import do_bench

                    call()  # compile / autotune outside the timed region
                    p50, p20, p80 = do_bench(call, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
                    row.update(ms=p50, ms_p20=p20, ms_p80=p80, peak_mib=_peak_mib(call))
                    _add_rates(row, case, mode, ceilings)
                else:
                    p50, p20, p80 = cpu_bench(call)
                    row.update(ms=p50, ms_p20=p20, ms_p80=p80)
                    _add_rates(row, case, mode, None)
            except Exception as e:  # a provider that cannot run this case is reported, not fatal
                row.update(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
    del sets
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return rows


def _add_rates(row: dict, case: Case, mode: str, ceilings: dict[str, float] | None) -> None:
    seconds = row["ms"] * 1e-3
    if mode in case.bytes:
        row["GB/s"] = case.bytes[mode] / seconds / 1e9
        if ceilings:
            row["%roof"] = 100 * case.bytes[mode] / seconds / ceilings["copy_bytes_per_s"]
    if mode in case.flops:
        row["TFLOP/s"] = case.flops[mode] / seconds / 1e12
        if ceilings:
            row["%roof"] = 100 * case.flops[mode] / seconds / ceilings["bf16_matmul_flop_per_s"]


def add_speedups(rows: list[dict], against: Sequence[str] = ("eager", "torch", "compile")) -> None:
    """Give each lightllm row its speed-up over the other providers of the same case and mode."""
    key = lambda r: (r["op"], r["case"], r["mode"])  # noqa: E731
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("ms"):
            by_key.setdefault(key(r), {})[r["provider"]] = r["ms"]
    for r in rows:
        if r["provider"] == "lightllm" and r.get("ms"):
            for other, ms in by_key.get(key(r), {}).items():
                if other != "lightllm" and any(other.startswith(a) for a in against):
                    r[f"x_vs_{other}"] = ms / r["ms"]


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import triton

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if HAS_CUDA else None,
    }
    return env


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown(rows: list[dict], title: str) -> str:
    cols = ["op", "case", "mode", "provider", "device", "ms", "ms_p20", "ms_p80", "tokens/s",
            "GB/s", "TFLOP/s", "%roof", "peak_mib"]
    extra = sorted({k for r in rows for k in r if k.startswith("x_vs_")})
    cols += extra + ["error", "note"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def write_results(op: str, rows: list[dict], out_dir: str, ceilings: dict | None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    payload = {"environment": environment(), "ceilings": ceilings, "results": rows}
    with open(os.path.join(out_dir, f"{op}.json"), "w") as f:
        json.dump(payload, f, indent=1)
    header = ""
    if ceilings:
        header = (f"Card ceilings in this run: copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s, "
                  f"bf16 matmul {ceilings['bf16_matmul_flop_per_s'] / 1e12:.0f} TFLOP/s.\n\n")
    with open(os.path.join(out_dir, f"{op}.md"), "w") as f:
        f.write(header + markdown(rows, op))


def main(op: str, build_cases: Callable[[bool], list[Case]], argv: Sequence[str] | None = None):
    """Command line of every bench file: ``python -m benchmarks.bench_<op> [--quick] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=f"Benchmark lightllm's {op}")
    parser.add_argument("--quick", action="store_true", help="a few representative shapes")
    parser.add_argument("--out", default="benchmarks/results/local", help="results folder")
    parser.add_argument("--providers", default="", help="comma-separated subset of providers")
    parser.add_argument("--compile", action="store_true",
                        help="on a CPU, also time the torch.compile providers (slow to build)")
    args = parser.parse_args(argv)
    only = [p for p in args.providers.split(",") if p]
    if not HAS_CUDA:
        print(f"[{op}] no CUDA device: timing the CPU paths (lightllm's native CPU path beside "
              "PyTorch). GPU kernel timings need an NVIDIA GPU.", flush=True)
    ceilings = measure_ceilings() if HAS_CUDA else None
    rows: list[dict] = []
    for case in build_cases(args.quick):
        rows += run_case(case, ceilings, only, compile_on_cpu=args.compile)
        print(f"[{op}] {case.label}: done", flush=True)
    add_speedups(rows)
    write_results(op, rows, args.out, ceilings)
    print(markdown(rows, op))
    failed = [r for r in rows if "error" in r and r["provider"] == "lightllm"]
    if failed:
        print(f"[{op}] lightllm failed on {len(failed)} case(s)", file=sys.stderr)
        sys.exit(1)
    return rows


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of an eager reference, built lazily so listing providers costs nothing."""
    holder: list[Callable[..., Any]] = []

    def call(*args):
        if not holder:
            holder.append(torch.compile(fn))
        return holder[0](*args)

    return call


def pytest_benchmark(benchmark, case: Case, provider: str, mode: str = "fwd") -> None:
    """The pytest-benchmark entry: time one provider on one case (synchronising on CUDA)."""
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    call = make_timed_call(case, case.providers[provider], mode, [case.make_inputs(device)])

    def synced():
        out = call()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    synced()
    benchmark.extra_info.update({"op": case.op, "case": case.label, "mode": mode,
                                 "provider": provider, "device": str(device)})
    benchmark.pedantic(synced, rounds=3 if not HAS_CUDA else 20, warmup_rounds=1)
