"""Every benchmark in one run: ``python -m benchmarks`` (``make bench`` runs it with ``--quick``).

    python -m benchmarks [--quick] [--ops layer_norm,attention] [--skip engine] [--dtype bf16,fp32]
                         [--providers lightllm,torch] [--name NAME | --out DIR]
                         [--compare PATH] [--threshold 0.1] [--compile] [--no-traffic] [--no-plots]

Measures the machine's ceilings, then runs the per-op files (``benchmarks/bench_<op>.py``) first and
the end-to-end ones (the transformer block, patched Hugging Face models, generation) last, with a
progress bar over every (case, mode, provider); prints one summary table per op and writes
``results.json``, ``summary.md``, ``results.csv`` and ``plots/`` into
``benchmarks/results/<name>/`` (``local`` by default; ``benchmarks/report.py`` describes them),
plus ``traffic.json`` from the traffic and launch model (``benchmarks/traffic.py``, counted in a
child process under Triton's interpreter). ``--compare`` flags every row slower than in an earlier
``results.json`` by more than ``--threshold``. Exit status 1 when a lightllm case failed.

On a machine without CUDA the CPU paths are timed for real; GPU kernel timings need an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks import harness, peers, report

END_TO_END = ("bench_transformer", "bench_patch", "bench_generate", "bench_engine")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                 "bf16": "bfloat16"}


def bench_modules() -> list[str]:
    """``bench_*`` module names: the ops first, the end-to-end cases (whole models, generation)
    last, so that under a time limit (make gpu-check) the per-op evidence comes back even when a
    model case runs long."""
    names = [m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")]
    return sorted(names, key=lambda n: (END_TO_END.index(n) + 1 if n in END_TO_END else 0, n))


def _selected(module, ops: set[str]) -> bool:
    """A file runs when no op is named, or its own name or one of its ``OPS`` is."""
    name = module.__name__.removeprefix("benchmarks.bench_")
    return not ops or name in ops or bool(ops & set(module.OPS))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few representative shapes")
    parser.add_argument("--ops", default="", help="comma-separated bench files or the ops in "
                        "them (layer_norm, add_layer_norm, attention, transformer, block, ...)")
    parser.add_argument("--skip", default="", help="comma-separated bench files or ops to leave "
                        "out (gpu-check runs the engine benchmark as its own stage)")
    parser.add_argument("--dtype", default="", help="comma-separated dtypes (fp32, fp16, bf16)")
    parser.add_argument("--providers", default="", help="comma-separated providers to time")
    parser.add_argument("--name", default="local", help="results folder benchmarks/results/NAME")
    parser.add_argument("--out", default="", help="results folder (overrides --name)")
    parser.add_argument("--compare", default="", help="an earlier results.json (or its folder)")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="--compare: flag rows slower by more than this fraction")
    parser.add_argument("--compile", action="store_true",
                        help="on a CPU, also time the torch.compile providers (slow to build)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds: cases that would "
                        "start later are recorded as skipped and the reports written (gpu-check)")
    parser.add_argument("--cpu-seconds", type=float, default=0.5, help="without a GPU: at least "
                        "this many seconds of timed calls per measurement (and at least five calls)")
    parser.add_argument("--no-traffic", action="store_true", help="skip the traffic model")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    args.ops = {o.strip() for o in args.ops.split(",") if o.strip()}
    args.skip = {o.strip() for o in args.skip.split(",") if o.strip()}
    args.dtypes = {DTYPE_ALIASES.get(d.strip(), d.strip()) for d in args.dtype.split(",") if d.strip()}
    args.only = [p for p in args.providers.split(",") if p]
    args.out = args.out or str(Path("benchmarks/results") / args.name)
    return args


def collect(quick: bool, ops: set[str] = frozenset(), dtypes: set[str] = frozenset(),
            skip: set[str] = frozenset()) -> tuple[list[harness.Case], list]:
    """The cases of every selected file (filtered by op and dtype; ``skip``: files left out) and
    the self-timed files (those with a ``measure(quick, only)`` function instead of cases)."""
    cases, measures = [], []
    for name in bench_modules():
        module = importlib.import_module(f"benchmarks.{name}")
        if not _selected(module, ops) or (skip and _selected(module, skip)):
            continue
        if hasattr(module, "measure"):
            measures.append(module)
            continue
        whole_file = not ops or name.removeprefix("bench_") in ops
        # A file's GROUPS: an op name that also selects others of the file (rms_norm: add_rms_norm).
        wanted = ops.union(*(getattr(module, "GROUPS", {}).get(op, ()) for op in ops))
        for case in module.build_cases(quick):
            if (whole_file or case.op in wanted) and (not dtypes or case.dtype_name in dtypes):
                cases.append(case)
    return cases, measures


def traffic(out: str, quick: bool) -> str | None:
    """The traffic model, in a child process that interprets the Triton kernels; its Markdown."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "LIGHTLLM_POISON_OUTPUTS": "0"}
    cmd = [sys.executable, "-m", "benchmarks.traffic", "--out", out] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[traffic] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    md = Path(out) / "traffic.md"
    return md.read_text() if md.exists() else None


def main(argv=None) -> int:
    from tqdm import tqdm

    started = time.monotonic()
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not harness.HAS_CUDA:
        print("No CUDA device: timing the CPU paths (lightllm's native CPU path beside PyTorch). "
              "GPU kernel timings need an NVIDIA GPU.", flush=True)
    ceilings = harness.measure_ceilings()
    print(f"Ceilings ({ceilings['device']}): copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s",
          flush=True)
    peer_status = peers.status()
    print("Peers: " + ", ".join(f"{n} {p['version'] or ''} ({p['status']})".replace("  ", " ")
                                for n, p in peer_status.items()), flush=True)
    payload = {"schema": report.SCHEMA, "environment": report.environment(), "ceilings": ceilings,
               "peers": peer_status,
               "args": {"quick": args.quick, "ops": sorted(args.ops), "dtypes": sorted(args.dtypes),
                        "providers": args.only},
               "results": []}
    results_json = Path(args.out) / "results.json"

    cases, measures = collect(args.quick, args.ops, args.dtypes, args.skip)
    deadline = started + args.time_limit if args.time_limit else float("inf")
    total = sum(len(harness.jobs(c, args.only)) for c in cases)
    with tqdm(total=total, desc="benchmarks", unit="run", dynamic_ncols=True,
              mininterval=0.5 if sys.stderr.isatty() else 20) as bar:
        for case in cases:
            bar.set_postfix_str(f"{case.op} {case.label}"[:60])
            payload["results"] += harness.run_case(case, ceilings, args.only, args.compile,
                                                   progress=bar.update, deadline=deadline,
                                                   cpu_seconds=args.cpu_seconds)
            report.write_json(results_json, payload)  # a run cut short keeps what it measured
    for module in measures:
        name = module.__name__.removeprefix("benchmarks.bench_")
        if time.monotonic() > deadline:
            print(f"[{name}] skipped: time limit", flush=True)
            continue
        print(f"[{name}] timing ...", flush=True)
        payload["results"] += module.measure(args.quick, args.only)
        report.write_json(results_json, payload)
    harness.add_speedups(payload["results"])
    payload["autotune"] = harness.autotune_choices()

    comparison_md = None
    if args.compare:
        payload["comparison"] = report.compare(payload["results"], report.load_rows(args.compare),
                                               args.threshold)
        comparison_md = report.comparison_markdown(payload["comparison"], args.compare)
    report.write_json(results_json, payload)
    report.write_csv(Path(args.out) / "results.csv", payload)
    traffic_md = None if args.no_traffic else traffic(args.out, args.quick)
    summary = report.summary_markdown(payload, traffic_md, comparison_md)
    (Path(args.out) / "summary.md").write_text(summary)
    if not args.no_plots:
        report.write_plots(Path(args.out) / "plots", payload)
    print(report.ops_markdown(payload["results"]))
    if comparison_md:
        print(comparison_md)
    failed = [r for r in payload["results"] if r["provider"] == "lightllm" and r["status"] == "error"]
    print(f"benchmarks written to {args.out}" +
          (f"; lightllm failed on {len(failed)} row(s)" if failed else "; every lightllm case ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
