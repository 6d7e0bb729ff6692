"""What a benchmark run leaves behind, and the comparison of two runs.

Into the results folder (``benchmarks/results/<name>/``):

* ``results.json`` — ``{"schema": 1, "environment": {...}, "ceilings": {...}, "peers": {...},
  "args": {...}, "results": [row, ...], "comparison": {...} (with --compare)}``. Rows as described
  in ``benchmarks/harness.py``; the environment names the card (or CPU), driver, torch / triton /
  CUDA versions, Python, thread count and the git commit (with ``git_dirty`` when the tree had
  uncommitted changes).
* ``summary.md`` — one table per op: each provider's median [p20–p80] per case and mode,
  lightllm's speed-up over eager and over the best alternative, its % of the roofline; then the
  traffic and launch model (``traffic.md`` from ``benchmarks/traffic.py``) and the comparison.
* ``results.csv`` — Liger-Kernel's long benchmark format (``kernel_name, kernel_provider,
  kernel_operation_mode, metric_name, metric_unit, x_name, x_label, x_value, y_value_50,
  y_value_20, y_value_80, extra_benchmark_config_str, gpu_name, timestamp, liger_version``), so its
  visualiser reads our runs and ours reads theirs.
* ``plots/<op>-<dtype>.png`` — throughput against size, one panel per mode and series, one line per
  provider, the measured roofline drawn as a dashed line.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import HAS_CUDA

SCHEMA = 1
ROW_KEYS = ("op", "case", "dtype", "mode", "provider", "status", "median_ms", "p20_ms", "p80_ms")
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# The environment of a run.
# --------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    import triton

    import lightllm

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name() if HAS_CUDA else None,
        "driver": _driver() if HAS_CUDA else None,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "lightllm": getattr(lightllm, "__version__", None),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


# --------------------------------------------------------------------------------------------
# results.json, and reading one back (this run's or an older per-op file's).
# --------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def load_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``results.json`` (a folder holding one, or the file). Per-op JSON files of
    earlier runs (``ms`` for the median) are read too, so ``--compare`` reaches back to them."""
    path = Path(path)
    files = [path / "results.json"] if (path / "results.json").exists() else (
        sorted(path.glob("*.json")) if path.is_dir() else [path])
    rows = []
    for file in files:
        data = json.loads(file.read_text())
        for r in data.get("results", []) if isinstance(data, dict) else []:
            if "median_ms" not in r and "ms" in r:
                r = {**r, "median_ms": r["ms"]}
            if "op" in r and "case" in r:
                rows.append(r)
    if not rows:
        raise ValueError(f"--compare: no benchmark rows in {path}")
    return rows


# --------------------------------------------------------------------------------------------
# Comparing with an earlier run.
# --------------------------------------------------------------------------------------------


def compare(new: list[dict], old: list[dict], threshold: float) -> dict[str, Any]:
    """Every (op, case, mode, provider) timed in both runs: old and new medians and their ratio.
    A row is a regression when it got slower by more than ``threshold`` (0.1 = 10 %), an
    improvement when faster by as much."""
    key = lambda r: (r["op"], r["case"], r["mode"], r["provider"])  # noqa: E731
    before = {key(r): r["median_ms"] for r in old if r.get("median_ms")}
    pairs = []
    for r in new:
        if r.get("median_ms") and key(r) in before:
            ratio = r["median_ms"] / before[key(r)]
            verdict = ("regression" if ratio > 1 + threshold else
                       "improvement" if ratio < 1 / (1 + threshold) else "same")
            pairs.append({"op": r["op"], "case": r["case"], "mode": r["mode"],
                          "provider": r["provider"], "old_ms": before[key(r)],
                          "new_ms": r["median_ms"], "ratio": ratio, "verdict": verdict})
    return {"threshold": threshold, "matched": len(pairs),
            "regressions": [p for p in pairs if p["verdict"] == "regression"],
            "improvements": [p for p in pairs if p["verdict"] == "improvement"], "pairs": pairs}


def comparison_markdown(comparison: dict[str, Any], against: str) -> str:
    t = comparison["threshold"]
    lines = [f"## Compared with {against}", "",
             f"{comparison['matched']} rows timed in both runs; {len(comparison['regressions'])} "
             f"slower by more than {t:.0%}, {len(comparison['improvements'])} faster by as much.", ""]
    flagged = comparison["regressions"] + comparison["improvements"]
    if flagged:
        lines += ["| verdict | op | case | mode | provider | old ms | new ms | new / old |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in flagged:
            lines.append(f"| {p['verdict']} | {p['op']} | {p['case']} | {p['mode']} | "
                         f"{p['provider']} | {_num(p['old_ms'])} | {_num(p['new_ms'])} | "
                         f"{p['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# summary.md
# --------------------------------------------------------------------------------------------


def _num(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _cell(r: dict) -> str:
    if r.get("median_ms") is None:
        return r.get("status", "")
    return f"{_num(r['median_ms'])} [{_num(r['p20_ms'])}–{_num(r['p80_ms'])}]"


def _provider_order(providers: set[str]) -> list[str]:
    first = ["lightllm", "eager", "torch", "compile"]
    return sorted(providers, key=lambda p: (next((i for i, f in enumerate(first)
                                                  if p.startswith(f)), len(first)), p))


def ops_markdown(rows: list[dict]) -> str:
    """One table per op: a column of median [p20–p80] ms per provider, then lightllm's ratios."""
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    out = []
    for op, op_rows in by_op.items():
        providers = _provider_order({r["provider"] for r in op_rows})
        cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
        for r in op_rows:
            cells[(r["case"], r["dtype"], r["mode"])][r["provider"]] = r
        head = ["case", "dtype", "mode", *providers, "lightllm vs eager", "vs best", "% roofline",
                "rate"]
        lines = [f"### {op}", "", "ms per call, median [p20–p80]", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (case, dtype, mode), by_provider in cells.items():
            ours = by_provider.get("lightllm", {})
            rate = next((f"{_num(ours[k])} {k}" for k in ("TFLOP/s", "GB/s", "tokens/s")
                         if ours.get(k)), "")
            best = (f"{ours['x_vs_best']:.2f}x ({ours['best_alternative']})"
                    if ours.get("x_vs_best") else "")
            row = [case, dtype, mode, *(_cell(by_provider[p]) if p in by_provider else ""
                                        for p in providers),
                   f"{ours['x_vs_eager']:.2f}x" if ours.get("x_vs_eager") else "", best,
                   _num(ours.get("pct_roofline")), rate]
            lines.append("| " + " | ".join(row) + " |")
        errors = [r for r in op_rows if r.get("error")]
        for r in errors:
            lines.append(f"\n- {r['provider']} on {r['case']} {r['mode']}: {r['error']}")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def summary_markdown(payload: dict[str, Any], traffic_md: str | None = None,
                     comparison_md: str | None = None) -> str:
    env, ceilings, peers = payload["environment"], payload.get("ceilings"), payload["peers"]
    machine = env["card"] or f"CPU: {env['cpu']}, {env['threads']} threads"
    dirty = " (uncommitted changes)" if env["git_dirty"] else ""
    lines = [f"# lightllm benchmarks — {machine}", "",
             f"{env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"driver {env['driver']}, Python {env['python']}; commit "
             f"{(env['git_commit'] or 'unknown')[:12]}{dirty}.", ""]
    if ceilings:
        lines.append(f"Ceilings measured in this run: copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} "
                     f"GB/s (read + write), {ceilings['matmul_dtype']} matmul "
                     f"{ceilings['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s. % roofline is against "
                     "the copy rate for memory-bound ops, the matmul rate for matmul-bound ones.")
    if not HAS_CUDA:
        lines.append("\nNo CUDA device: these are the CPU paths (lightllm's native CPU path beside "
                     "PyTorch). GPU kernel timings need an NVIDIA GPU.")
    lines += ["", "Peers: " + ", ".join(
        f"{name} {p['version']}" + ("" if p["runs_here"] else f" ({p['status']})")
        if p["version"] else f"{name} not installed" for name, p in peers.items()) + ".", ""]
    lines.append(ops_markdown(payload["results"]))
    if traffic_md:
        lines += [traffic_md]  # its own heading (benchmarks/traffic.py)
    if comparison_md:
        lines.append(comparison_md)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Liger-Kernel's long CSV format.
# --------------------------------------------------------------------------------------------

CSV_COLUMNS = ["kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name",
               "metric_unit", "x_name", "x_label", "x_value", "y_value_50", "y_value_20",
               "y_value_80", "extra_benchmark_config_str", "gpu_name", "timestamp",
               "liger_version"]
_LIGER_MODES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "full", "step": "full"}
_NOT_PARAMS = {"op", "case", "mode", "provider", "device", "status", "error", "median_ms", "p20_ms",
               "p80_ms", "GB/s", "TFLOP/s", "pct_roofline", "peak_mib", "tokens/s", "x_vs_eager",
               "x_vs_best", "best_alternative", "x", "series"}


def csv_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Each timed row as a speed record (ms), and on a GPU a memory record (MB of peak)."""
    env = payload["environment"]
    gpu = env["card"] or f"CPU ({env['cpu']})"
    liger = payload["peers"].get("liger", {}).get("version") or ""
    out = []
    for r in payload["results"]:
        if r.get("median_ms") is None:
            continue
        x_name = r.get("x") or next((k for k in r if k not in _NOT_PARAMS and k != "dtype"), "")
        extra = {k: v for k, v in r.items() if k not in _NOT_PARAMS and k != x_name}
        extra["case"] = r["case"]
        base = {"kernel_name": r["op"], "kernel_provider": r["provider"],
                "kernel_operation_mode": _LIGER_MODES.get(r["mode"], r["mode"]),
                "x_name": x_name, "x_label": x_name, "x_value": r.get(x_name, ""),
                "extra_benchmark_config_str": json.dumps(extra, sort_keys=True),
                "gpu_name": gpu, "timestamp": env["date"], "liger_version": liger}
        out.append({**base, "metric_name": "speed", "metric_unit": "ms",
                    "y_value_50": r["median_ms"], "y_value_20": r["p20_ms"],
                    "y_value_80": r["p80_ms"]})
        if r.get("peak_mib") is not None:
            out.append({**base, "metric_name": "memory", "metric_unit": "MB",
                        "y_value_50": r["peak_mib"], "y_value_20": r["peak_mib"],
                        "y_value_80": r["peak_mib"]})
    return out


def write_csv(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(payload))


# --------------------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------------------


def _metric(rows: list[dict]) -> tuple[str, str]:
    """The throughput key the rows carry, and the ceiling that bounds it."""
    for key, ceiling in (("TFLOP/s", "matmul_flop_per_s"), ("GB/s", "copy_bytes_per_s"),
                         ("tokens/s", "")):
        if any(r.get(key) for r in rows):
            return key, ceiling
    return "median_ms", ""


def write_plots(folder: str | os.PathLike, payload: dict[str, Any]) -> list[str]:
    """``<op>-<dtype>.png`` per op and dtype: panels by (mode, series), x = the case's size
    parameter, one line per provider, the roofline dashed. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ceilings = payload.get("ceilings") or {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in payload["results"]:
        if r.get("median_ms") is not None:
            groups[(r["op"], r["dtype"] or "mixed")].append(r)
    written = []
    for (op, dtype), rows in sorted(groups.items()):
        panels: dict[tuple, list[dict]] = defaultdict(list)
        for r in rows:
            panels[(r["mode"], r.get("series", ""))].append(r)
        order = ("fwd", "bwd", "fwd+bwd", "step", "prefill", "decode")
        keys = sorted(panels, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k))
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
        for ax, (mode, series) in zip(axes[0], keys):
            panel = panels[(mode, series)]
            metric, ceiling = _metric(panel)
            x_name = panel[0].get("x") or ""
            for provider in _provider_order({r["provider"] for r in panel}):
                points = sorted((r.get(x_name, i), r[metric]) for i, r in enumerate(panel)
                                if r["provider"] == provider and r.get(metric))
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", label=provider,
                            linewidth=2.5 if provider == "lightllm" else 1.2)
            if ceiling and ceilings.get(ceiling):
                scale = 1e12 if metric == "TFLOP/s" else 1e9
                ax.axhline(ceilings[ceiling] / scale, linestyle="--", color="gray",
                           label=f"roofline {ceilings[ceiling] / scale:.3g} {metric}")
            if x_name and len({r.get(x_name) for r in panel}) > 1:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(x_name or "case")
            ax.set_ylabel(metric if metric != "median_ms" else "ms (lower is better)")
            ax.set_title(f"{mode}{' · ' + series if series else ''}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{op} ({dtype}) — {payload['environment']['card'] or 'CPU'}", fontsize=10)
        fig.tight_layout()
        path = folder / f"{op}-{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    return written
