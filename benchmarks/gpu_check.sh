#!/usr/bin/env bash
# make gpu-check: the one script for a GPU machine (DESIGN.md §6).
#
# Uses the python3 it finds (torch, triton, ninja, pytest preinstalled; no venv, no network).
# Stages in order of value, each under its own time limit and writing its files as it finishes,
# so a stage that runs long leaves the earlier ones' results (about 8 minutes in all):
#   build (LIGHTLLM_BUILD_S, 180 s) -> the quick benchmarks, ceilings first (LIGHTLLM_BENCH_S,
#   240 s) -> the test suite on CUDA, bfloat16 included (LIGHTLLM_TESTS_S, 150 s) ->
#   compute-sanitizer memcheck + racecheck over the extension's CUDA tests (LIGHTLLM_SANITIZER_S,
#   60 s).
# At most eight files land in the results folder (argument 1; default
# benchmarks/results/<card>-<date>): env.txt, build.log, bench.log, results.tar.gz (every
# benchmark JSON and Markdown table), tests.log, sanitizer.log, summary.md. The summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo unknown)
OUT=${1:-benchmarks/results/${card}-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
status=()

step() {  # step NAME SECONDS LOG COMMAND...: run under a time limit, log, remember the outcome
  local name=$1 limit=$2 log=$3; shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local outcome="FAILED (exit $rc)"
  [ $rc -eq 0 ] && outcome=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && outcome="TIMED OUT after ${limit} s"
  status+=("$name: $outcome in $((SECONDS - start)) s")
  return $rc
}

step build "${LIGHTLLM_BUILD_S:-180}" "$OUT/build.log" $PY -m pip install --no-build-isolation --no-deps -e .
$PY -m lightllm.env >"$OUT/env.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv >>"$OUT/env.txt" 2>&1

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

bench_dir=$(mktemp -d)
pack_bench() { tar -czf "$OUT/results.tar.gz" -C "$bench_dir" .; }
step benchmarks "${LIGHTLLM_BENCH_S:-240}" "$OUT/bench.log" $PY -m benchmarks.run --quick --out "$bench_dir"
pack_bench

export PY
export -f run_tests  # `timeout` runs a command, not a shell function: a child bash runs it
step tests "${LIGHTLLM_TESTS_S:-150}" "$OUT/tests.log" bash -c run_tests

if command -v compute-sanitizer >/dev/null; then
  {
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool"
      timeout --kill-after=10 $(( ${LIGHTLLM_SANITIZER_S:-60} / 2 )) compute-sanitizer --tool "$tool" \
        --error-exitcode 9 $PY -m pytest tests/test_softmax.py -q -x -m "cuda and not slow" \
        -p no:cacheprovider || echo "$tool FAILED (or ran out of time)"
    done
  } >"$OUT/sanitizer.log" 2>&1
  grep -q FAILED "$OUT/sanitizer.log" && status+=("sanitizer: FAILED") || status+=("sanitizer: ok")
else
  echo "compute-sanitizer not found" >"$OUT/sanitizer.log"
  status+=("sanitizer: not run (compute-sanitizer not found)")
fi

{
  echo "# gpu-check on ${card}, $(date -u +%FT%TZ)"
  echo
  sed 's/^/    /' "$OUT/env.txt"
  echo
  for s in "${status[@]}"; do echo "- $s"; done
  echo
  sed -n '/^=== exit status per file/,$p' "$OUT/tests.log"
  grep -h -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$OUT/tests.log"
  echo
  for md in "$bench_dir"/*.md; do [ -f "$md" ] && cat "$md" && echo; done
} >"$OUT/summary.md"
rm -rf "$bench_dir"
cat "$OUT/summary.md"
for s in "${status[@]}"; do echo "$s"; done
