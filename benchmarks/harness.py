"""The benchmark harness every op's benchmark uses (docs/design.md §5).

A benchmark file describes *cases* (shapes, a way to make fresh inputs, the ideal memory traffic or
FLOPs) and *providers* (eager reference, PyTorch's fused op or each SDPA backend, torch.compile of
the reference, lightllm, and the peer libraries — Liger-Kernel, flash-attn, xformers — when
installed; ``benchmarks/peers.py``). The harness times each pair with ``triton.testing.do_bench``
(median with p20/p80), rotating through input copies larger than the L2 cache, converts times to
GB/s or TFLOP/s and % of the roofline measured in the same run (copy bandwidth, matmul rate), and
records peak memory. ``python -m benchmarks`` runs every file and writes the reports
(``benchmarks/report.py``).

Without a CUDA device it times the CPU paths for real: lightllm's native CPU path (its C++ kernels
or PyTorch's native ops behind its validation) beside PyTorch on the same inputs, each call timed
on its own with ``time.perf_counter`` (median and p20/p80 of at least five runs), against the CPU's
own measured copy bandwidth and fp32 matmul rate. ``torch.compile`` providers are skipped there
unless ``--compile`` (minutes of C++ compilation per case on 2 cores). Kernel timings need an
NVIDIA GPU.

Every result row carries ``op``, ``case``, ``dtype``, ``mode``, ``provider``, ``device``,
``status`` ("ok", "error", or why it did not run: "not installed", "needs CUDA", "skipped: ..."),
``median_ms``, ``p20_ms``, ``p80_ms`` (None unless it ran), the case's parameters, and where they
apply ``GB/s``, ``TFLOP/s``, ``pct_roofline``, ``peak_mib``, ``tokens/s``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
MODES = ("fwd", "bwd", "fwd+bwd", "step")  # step: the provider runs a whole training step


@dataclass
class Case:
    """One shape of one op.

    ``make_inputs(device)`` returns fresh positional inputs (floating tensors that need gradients
    are marked by ``grad_inputs``, their positions). ``bytes`` / ``flops`` map a mode to the ideal
    traffic or work of that mode, used for GB/s (memory-bound ops) or TFLOP/s (matmul-bound ops).
    ``x`` names the parameter that grows along a plot's axis, ``series`` the line family the case
    belongs to (cases of one op, dtype and series form one plot panel).
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
    dtype: torch.dtype | None = None
    x: str = ""
    series: str = ""

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.") if self.dtype is not None else ""


class Unavailable:
    """A provider that cannot run here (a peer library that is not installed, or needs CUDA): it
    stays in the results as a row with this status instead of being dropped."""

    def __init__(self, status: str):
        self.status = status

    def __repr__(self) -> str:
        return f"Unavailable({self.status!r})"


# --------------------------------------------------------------------------------------------
# Ceilings of the machine, measured in the same run as the ops.
# --------------------------------------------------------------------------------------------


def measure_ceilings() -> dict[str, Any]:
    """Copy bandwidth (bytes read + written per second) and the dense matmul rate (FLOP/s): bf16
    on a GPU, fp32 on a CPU, on random data."""
    return _gpu_ceilings() if HAS_CUDA else _cpu_ceilings()


def _cpu_ceilings() -> dict[str, Any]:
    src = torch.empty(1 << 25, dtype=torch.float32).uniform_()  # 128 MiB: past the caches
    dst = torch.empty_like(src)
    copy_ms = cpu_bench(lambda: dst.copy_(src), min_seconds=0.3)[0]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_ms = cpu_bench(lambda: a @ b, min_seconds=0.3)[0]
    return {"device": "cpu", "copy_bytes_per_s": 2 * src.numel() * 4 / (copy_ms * 1e-3),
            "matmul_flop_per_s": 2 * 2048**3 / (mm_ms * 1e-3), "matmul_dtype": "float32"}


def _gpu_ceilings() -> dict[str, Any]:
    from triton.testing import do_bench

    n = 1 << 28  # 1 GiB of float32 per buffer: far beyond any L2
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    return {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": 2 * n * 4 / (copy_ms * 1e-3),
            "matmul_flop_per_s": 2 * m**3 / (mm_ms * 1e-3), "matmul_dtype": "bfloat16"}


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


def row_base(case: Case, mode: str, provider: str) -> dict[str, Any]:
    row = {"op": case.op, "case": case.label, "dtype": case.dtype_name, "mode": mode,
           "provider": provider, "device": DEVICE, **case.params}
    if case.x:
        row["x"] = case.x
    if case.series:
        row["series"] = case.series
    return row


def not_run(row: dict[str, Any], status: str, error: str | None = None) -> dict[str, Any]:
    row.update(status=status, median_ms=None, p20_ms=None, p80_ms=None)
    if error:
        row["error"] = error
    return row


def jobs(case: Case, only: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The (mode, provider) pairs of ``case`` that a run with provider filter ``only`` covers."""
    return [(mode, p) for mode in case.modes for p in case.providers if not only or p in only]


def run_case(case: Case, ceilings: dict[str, Any] | None, only: Sequence[str] = (),
             compile_on_cpu: bool = False, progress: Callable[[], None] | None = None,
             deadline: float = math.inf, cpu_seconds: float = 0.5) -> list[dict]:
    """Time every provider on every mode of ``case``; one result row each (``progress`` is
    called after each; a job that would start after ``deadline``, a ``time.monotonic()`` value,
    is recorded as skipped; on a CPU each timing runs at least ``cpu_seconds`` of calls)."""
    device = torch.device(DEVICE)
    sets = None
    rows = []
    for mode, provider in jobs(case, only):
        fn = case.providers[provider]
        row = row_base(case, mode, provider)
        if isinstance(fn, Unavailable):
            rows.append(not_run(row, fn.status))
        elif time.monotonic() > deadline:
            rows.append(not_run(row, "skipped: time limit"))
        elif not HAS_CUDA and provider.startswith("compile") and not compile_on_cpu:
            rows.append(not_run(row, "skipped (CPU: needs --compile)"))
        else:
            try:
                sets = sets or _rotation(case, device)
                call = make_timed_call(case, fn, mode, sets)
                if HAS_CUDA:
                    from triton.testing import do_bench

                    call()  # compile / autotune outside the timed region
                    p50, p20, p80 = do_bench(call, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
                    row.update(status="ok", median_ms=p50, p20_ms=p20, p80_ms=p80,
                               peak_mib=_peak_mib(call))
                else:
                    p50, p20, p80 = cpu_bench(call, min_seconds=cpu_seconds)
                    row.update(status="ok", median_ms=p50, p20_ms=p20, p80_ms=p80)
                add_rates(row, case.bytes.get(mode), case.flops.get(mode), ceilings)
            except Exception as e:  # a provider that cannot run this case is reported, not fatal
                not_run(row, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            rows.append(row)
        if progress:
            progress()
    del sets
    if HAS_CUDA:
        torch.cuda.empty_cache()
    return rows


def add_rates(row: dict, nbytes: float | None, flops: float | None,
              ceilings: dict[str, Any] | None) -> None:
    """GB/s (memory-bound) or TFLOP/s (matmul-bound) of a timed row, and the % of the machine's
    ceiling for it."""
    seconds = row["median_ms"] * 1e-3
    fractions = []
    if nbytes:
        row["GB/s"] = nbytes / seconds / 1e9
        if ceilings:
            fractions.append(nbytes / seconds / ceilings["copy_bytes_per_s"])
    if flops:
        row["TFLOP/s"] = flops / seconds / 1e12
        if ceilings:
            fractions.append(flops / seconds / ceilings["matmul_flop_per_s"])
    if fractions:  # the roofline: whichever ceiling the op is nearer to binds it
        row["pct_roofline"] = 100 * max(fractions)


def add_speedups(rows: list[dict]) -> None:
    """Give each lightllm row its speed-up over eager (``x_vs_eager``) and over the fastest other
    provider of the same case and mode (``x_vs_best``, which one in ``best_alternative``)."""
    key = lambda r: (r["op"], r["case"], r["mode"])  # noqa: E731
    timed: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("median_ms"):
            timed.setdefault(key(r), {})[r["provider"]] = r["median_ms"]
    for r in rows:
        if not r["provider"].startswith("lightllm") or not r.get("median_ms"):
            continue
        others = {p: ms for p, ms in timed.get(key(r), {}).items() if not p.startswith("lightllm")}
        if "eager" in others:
            r["x_vs_eager"] = others["eager"] / r["median_ms"]
        if others:
            best = min(others, key=others.get)
            r["x_vs_best"] = others[best] / r["median_ms"]
            r["best_alternative"] = best


def autotune_choices() -> dict[str, list[dict[str, str]]]:
    """The config each autotuned lightllm kernel chose, per tuning key, in this process."""
    import importlib
    import pkgutil

    import triton

    import lightllm.kernels as kernels

    choices: dict[str, list[dict[str, str]]] = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"lightllm.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.Autotuner) and obj.cache:
                choices[f"{info.name}.{name}"] = [{"key": str(k), "config": str(c)}
                                                  for k, c in obj.cache.items()]
    return choices


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile of an eager reference, built lazily so listing providers costs nothing."""
    holder: list[Callable[..., Any]] = []

    def call(*args):
        if not holder:
            holder.append(torch.compile(fn))
        return holder[0](*args)

    return call
