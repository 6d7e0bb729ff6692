#!/usr/bin/env bash
# make gpu-check: the one script for a GPU machine (docs/design.md §6).
#
#   bash benchmarks/gpu_check.sh [--stage NAME] [RESULTS_DIR]     (make gpu-check RESULTS=DIR)
#
# Uses the python3 it finds (torch, triton, ninja, pytest preinstalled; no venv, no network).
# Stages in order of value, each under its own time limit (seconds, overridable) and writing its
# files as it finishes, so a stage that runs long leaves the earlier ones' results; the whole check
# stays under 8 minutes:
#   ceilings   (LIGHTLLM_CEILINGS_S, 30)  the card's copy bandwidth and bf16 matmul rate, printed
#                                          first, with the environment -> env.txt
#   build      (LIGHTLLM_BUILD_S, 140)    pip install -e . (the CUDA extension) -> build.log
#   benchmarks (LIGHTLLM_BENCH_S, 150)    python -m benchmarks --quick --skip engine, stopping new
#                                          cases 25 s before its limit so the reports get written ->
#                                          bench.log, results.tar.gz (results.json, summary.md,
#                                          results.csv, plots/)
#   engine     (LIGHTLLM_ENGINE_S, 50)    benchmarks/bench_engine.py's full workload (64 prompts):
#                                          the Engine vs padded batches, output tokens/s -> engine.log
#   tests      (LIGHTLLM_TESTS_S, 80)     the test suite on CUDA, bfloat16 included -> tests.log
#   sanitizer  (LIGHTLLM_SANITIZER_S, 30) compute-sanitizer memcheck + racecheck over the
#                                          extension's CUDA tests -> sanitizer.log
# --stage NAME runs that stage alone (build first if the extension is missing). At most eight
# files land in RESULTS_DIR (default benchmarks/results/<card>-<date>): the seven above and
# summary.md, which prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
only=""
if [ "${1:-}" = "--stage" ]; then only=${2:?--stage needs a name}; shift 2; fi
case "$only" in ""|ceilings|build|benchmarks|engine|tests|sanitizer) ;;
  *) echo "gpu_check: unknown stage '$only' (ceilings, build, benchmarks, engine, tests, sanitizer)" >&2; exit 2;;
esac
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown)
OUT=${1:-benchmarks/results/${card}-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
status=()

wanted() { [ -z "$only" ] || [ "$only" = "$1" ]; }

step() {  # step NAME SECONDS LOG COMMAND...: run under a time limit, log, remember the outcome
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local outcome="FAILED (exit $rc)"
  [ $rc -eq 0 ] && outcome=ok
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && outcome="TIMED OUT after ${limit} s"
  status+=("$name: $outcome in $((SECONDS - start)) s")
  return $rc
}

if wanted ceilings; then
  step ceilings "${LIGHTLLM_CEILINGS_S:-30}" "$OUT/env.txt" $PY -c "
import torch
from benchmarks.harness import measure_ceilings
from benchmarks.report import environment
c = measure_ceilings()
print(f\"ceilings: copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s, {c['matmul_dtype']} matmul {c['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s\")
for k, v in environment().items(): print(f'{k}: {v}')
"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv >>"$OUT/env.txt" 2>&1
  head -1 "$OUT/env.txt"
fi

built() { $PY -c "import lightllm._C" >/dev/null 2>&1; }
if wanted build || ! built; then
  step build "${LIGHTLLM_BUILD_S:-140}" "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps -e .
fi

if wanted benchmarks; then
  limit=${LIGHTLLM_BENCH_S:-150}
  bench_dir=$(mktemp -d)
  step benchmarks "$limit" "$OUT/bench.log" $PY -m benchmarks --quick --skip engine --no-traffic \
    --out "$bench_dir" --time-limit $((limit - 25))
  tar -czf "$OUT/results.tar.gz" -C "$bench_dir" .
fi

if wanted engine; then  # each kernel's default config: autotuning would dominate the stage
  step engine "${LIGHTLLM_ENGINE_S:-50}" "$OUT/engine.log" env LIGHTLLM_AUTOTUNE=0 \
    $PY -m benchmarks.bench_engine
fi

# Test files run four at a time: on a GPU the suite is bound by Triton compiling each kernel
# specialisation, which uses the CPU; the GPU work of these tests is small.
run_tests() {
  local logs rc=0 f
  logs=$(mktemp -d)
  ls tests/test_*.py | xargs -P 4 -I{} sh -c \
    '"$0" -m pytest "$1" -q -rs -p no:cacheprovider --durations=5 >"$2/$(basename "$1").log" 2>&1;
     echo "$1 exit $?" >>"$2/status"' "$PY" {} "$logs"
  for f in "$logs"/test_*.log; do echo "=== $(basename "$f" .log)"; cat "$f"; done
  echo "=== exit status per file"
  sort "$logs/status"
  grep -qv " exit 0$" "$logs/status" && rc=1
  rm -rf "$logs"
  return $rc
}
if wanted tests; then
  export PY
  export -f run_tests  # `timeout` runs a command, not a shell function: a child bash runs it
  step tests "${LIGHTLLM_TESTS_S:-80}" "$OUT/tests.log" bash -c run_tests
fi

if wanted sanitizer; then
  if command -v compute-sanitizer >/dev/null; then
    {
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        timeout --kill-after=5 $(( ${LIGHTLLM_SANITIZER_S:-30} / 2 )) compute-sanitizer --tool "$tool" \
          --error-exitcode 9 $PY -m pytest tests/test_softmax.py -q -x -m "cuda and not slow" \
          -p no:cacheprovider || echo "$tool FAILED (or ran out of time)"
      done
    } >"$OUT/sanitizer.log" 2>&1
    grep -q FAILED "$OUT/sanitizer.log" && status+=("sanitizer: FAILED") || status+=("sanitizer: ok")
  else
    echo "compute-sanitizer not found" >"$OUT/sanitizer.log"
    status+=("sanitizer: not run (compute-sanitizer not found)")
  fi
fi

{
  echo "# gpu-check on ${card}, $(date -u +%FT%TZ)${only:+ (stage $only)}"
  echo
  [ -f "$OUT/env.txt" ] && sed 's/^/    /' "$OUT/env.txt" && echo
  for s in "${status[@]}"; do echo "- $s"; done
  echo
  if [ -f "$OUT/tests.log" ]; then
    sed -n '/^=== exit status per file/,$p' "$OUT/tests.log"
    grep -h -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$OUT/tests.log"
    echo
  fi
  if [ -f "$OUT/engine.log" ]; then
    echo "engine benchmark (64 prompts, output tokens/s):"
    grep -h "^\[engine\]" "$OUT/engine.log" | sed 's/^/    /'
    echo
  fi
  [ -n "${bench_dir:-}" ] && [ -f "$bench_dir/summary.md" ] && cat "$bench_dir/summary.md"
} >"$OUT/summary.md"
[ -n "${bench_dir:-}" ] && rm -rf "$bench_dir"
cat "$OUT/summary.md"
for s in "${status[@]}"; do echo "$s"; done
