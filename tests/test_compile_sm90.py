"""Every Triton kernel compiles for an H100 (sm_90a), without a GPU.

The other tests run the kernels in Triton's interpreter, which never compiles them. Here
``tests/sm90_compile.py`` runs in a subprocess without TRITON_INTERPRET (with it set, ``@triton.jit``
returns interpreter functions): it drives each kernel file's launchers, compiles every specialization
a GPU launch would (dtypes, constexpr flags, every autotune config of the main case) with Triton's CUDA
backend and reads ptxas' register and spill figures. This module asserts on its records:

* every launched kernel of every ``kernels/*.py`` file is compiled, and every autotune config of each
  autotuned kernel at least once;
* every specialization compiles;
* no spill where the kernel's author intends none (the specializations the script marks strict:
  LayerNorm, the default configs of the matmuls, of the attention forward in fp16/bf16 up to head
  dim 128 and of the split-KV decode kernel, the fp32 matmul tiles, the GeLU backward); other spills
  (other configs, the attention backward, fp32 attention) are reported as warnings and in the table
  (``pytest -rA`` shows it);
* kernels with ``tl.dot`` on fp16/bf16 data use tensor cores (wgmma or mma.sync in the PTX).

Skipped only when Triton has no NVIDIA backend or no ptxas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCRIPT = TESTS / "sm90_compile.py"
SKIP = 77  # the script's exit status when it cannot compile for NVIDIA GPUs at all

# With a GPU the rest of the suite compiles and runs every kernel for real; this check is for the
# machines without one (and leans on Triton internals that other Triton versions may rename).
# One xdist group: the module's tests share one compile table (a fixture per process), so they
# must run in one process or the minutes of compiling happen once per worker.
pytestmark = [
    pytest.mark.skipif(__import__("torch").cuda.is_available(),
                       reason="a GPU is present: the kernels compile for real"),
    pytest.mark.xdist_group("sm90"),
]


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """The script's records (one subprocess for the whole module: compiling takes minutes)."""
    out = tmp_path_factory.mktemp("sm90") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    if proc.returncode == SKIP:
        pytest.skip(proc.stdout.strip())
    if not out.exists():
        pytest.fail(f"sm90_compile.py stopped (exit {proc.returncode}) before writing records:\n"
                    f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
    result = json.loads(out.read_text())
    result["table"] = proc.stdout
    assert proc.returncode in (0, 1), proc.stderr[-5000:]
    return result


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['dtype']} {r['tile']} cfg {r['config']} [{r['flags']}] ({r['note']})"


def test_compile_table(sm90):
    """Prints the table (``-rA``) and warns about every spill that is reported, not failed."""
    print(sm90["table"])
    for r in sm90["records"]:
        if r["spill_stores"] and not r["strict"]:
            warnings.warn(f"sm_90 spill: {_name(r)}: {r['regs']} registers, "
                          f"{r['spill_stores']} bytes spill stores", stacklevel=1)


def test_every_kernel_is_compiled(sm90):
    files = {p.stem for p in (ROOT / "kernels").glob("*.py") if not p.name.startswith("_")}
    assert not sm90["errors"], "\n\n".join(sm90["errors"])
    assert set(sm90["kernels"]) == files, "kernel files the script did not import"
    for module, kernels in sm90["kernels"].items():
        assert kernels, f"no launched @triton.jit kernel found in kernels/{module}.py"
    assert not sm90["uncovered"], (
        f"kernels no scenario of tests/sm90_compile.py launches: {sm90['uncovered']}")


def test_every_autotune_config_is_compiled(sm90):
    """For each autotuned kernel, some launch compiled configs 1..n of the n its pruning kept."""
    tags = defaultdict(lambda: defaultdict(set))
    for r in sm90["records"]:
        if r["config"] != "-":
            i, n = map(int, r["config"].split("/"))
            tags[(r["module"], r["kernel"])][n].add(i)
    assert tags, "no autotuned kernel was compiled"
    for kernel, by_n in tags.items():
        assert any(seen == set(range(1, n + 1)) for n, seen in by_n.items()), (
            f"{kernel}: no launch compiled all of its configs ({dict(by_n)})")


def test_every_specialization_compiles(sm90):
    failed = [f"{_name(r)}:\n{r['error']}" for r in sm90["records"] if r["error"]]
    assert not failed, f"{len(failed)} failed to compile for sm_90a:\n\n" + "\n\n".join(failed)


def test_no_spills_where_none_intended(sm90):
    strict = [r for r in sm90["records"] if r["strict"] and not r["error"]]
    # Not vacuous: each kernel file has specializations held to it.
    assert {r["module"] for r in strict} == set(sm90["kernels"])
    unread = [_name(r) for r in strict if r["spill_stores"] is None or r["regs"] is None]
    assert not unread, f"ptxas' figures missing for: {unread}"
    spilled = [f"{_name(r)}: {r['regs']} registers, {r['spill_stores']} bytes spill stores, "
               f"{r['spill_loads']} bytes spill loads" for r in strict if r["spill_stores"] > 0]
    assert not spilled, "spills where none is intended:\n" + "\n".join(spilled)


def test_half_precision_matmuls_use_tensor_cores(sm90):
    checked = [r for r in sm90["records"] if r["tensor_cores"] and not r["error"]]
    # Not vacuous: every kernel with tl.dot was compiled in fp16 or bf16 at least once.
    dot_kernels = {f"{r['module']}.{r['kernel']}" for r in checked}
    assert set(sm90["dot_kernels"]) <= dot_kernels, (
        f"matmul kernels never compiled in fp16/bf16: {set(sm90['dot_kernels']) - dot_kernels}")
    missing = [f"{_name(r)}: {r['mma']}" for r in checked if r["mma"] not in ("wgmma", "mma")]
    assert not missing, "fp16/bf16 matmuls without tensor cores:\n" + "\n".join(missing)
    # sm_90 runs big enough tiles as warpgroup MMAs: at least the default tiles must.
    assert any(r["mma"] == "wgmma" for r in checked), "no kernel used wgmma"



def test_hopper_load_paths(sm90):
    """The TMA configs compile to what they are for: in bf16, each attention kernel (forward, dK/dV,
    dQ) has a specialization whose tiles come by TMA and whose dots are wgmma, with no spill at
    least once, beside the pointer (cp.async) defaults; the matmul keeps its TMA kernel (wgmma at
    its default training tile)."""
    bf16 = [r for r in sm90["records"] if r["dtype"] == "bf16" and not r["error"]]
    for kernel in ("_attention_fwd", "_attention_bwd_dkdv", "_attention_bwd_dq"):
        tma = [r for r in bf16 if r["kernel"] == kernel and "USE_TMA" in r["flags"].split()]
        assert any(r["loads"].startswith("tma") and r["mma"] == "wgmma" and not r["spill_stores"]
                   for r in tma), f"{kernel}: no spill-free bf16 TMA + wgmma specialization"
        pointer = [r for r in bf16 if r["kernel"] == kernel and r["config"].startswith("1/")]
        assert pointer and all(r["loads"] == "cp.async" for r in pointer), (
            f"{kernel}: the default config should stay on the pointer (cp.async) path")
    matmul = [r for r in bf16 if r["kernel"] == "_linear_gelu_mm_tma"]
    assert matmul and all(r["loads"].startswith("tma") for r in matmul)
    # wgmma for the training tiles (decode's 16-row tiles are below its 64 rows: mma.sync)
    assert any(r["mma"] == "wgmma" and r["config"].startswith("1/") for r in matmul)
