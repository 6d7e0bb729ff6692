"""Run every ``benchmarks/bench_*.py`` into one results folder and print a summary.

    python -m benchmarks.run [--quick] [--out DIR] [--only layer_norm,softmax]

Without a CUDA device each file times the CPU paths (lightllm's native CPU path beside PyTorch);
GPU kernel timings need an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import benchmarks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/local")
    parser.add_argument("--only", default="", help="comma-separated op files (bench_<op>)")
    args = parser.parse_args()
    only = {o for o in args.only.split(",") if o}
    # The ops first, the end-to-end cases (whole models, generation) last: under a time limit
    # (make gpu-check) the per-op evidence comes back even when a model case runs long.
    end_to_end = ("bench_transformer", "bench_patch", "bench_generate")
    names = sorted((m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                    if m.name.startswith("bench_")),
                   key=lambda n: (end_to_end.index(n) + 1 if n in end_to_end else 0, n))
    failed = []
    for name in names:
        op = name.removeprefix("bench_")
        if only and op not in only:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        argv = ["--out", args.out] + (["--quick"] if args.quick else [])
        try:
            module.main(op, module.build_cases, argv)
        except SystemExit as e:  # a bench file exits non-zero when lightllm failed a case
            if e.code:
                failed.append(op)
        except Exception as e:  # report and go on: one broken file must not hide the others
            print(f"[{op}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(op)
    print(f"benchmarks written to {args.out}; " +
          (f"failed: {', '.join(failed)}" if failed else "every lightllm case ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
