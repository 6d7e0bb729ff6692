"""The benchmark code itself, on what can be wrong without a GPU: the FLOP and byte formulas, the
result schema, the speed-up and roofline arithmetic, the Liger CSV, ``--compare``, the peers that
are listed when missing, and one real run of the suite's command on a tiny op."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import harness, peers, report
from benchmarks.bench_attention import attention_flops
from benchmarks.bench_transformer import _block_flops

ROOT = Path(__file__).resolve().parent.parent


def test_attention_flops_follow_flash_attention_convention():
    # 4·B·H·Nq·Nk·D for QK^T and PV; causal halves it; backward 2.5x, both 3.5x.
    f = attention_flops(2, 3, 5, 7, 11, causal=False)
    assert f["fwd"] == 4 * 2 * 3 * 5 * 7 * 11
    assert attention_flops(2, 3, 5, 7, 11, causal=True)["fwd"] == f["fwd"] / 2
    assert f["bwd"] == 2.5 * f["fwd"] and f["fwd+bwd"] == 3.5 * f["fwd"]


def test_block_flops_count_every_matmul():
    tokens, d, heads, kv, ff = 8, 16, 4, 2, 40
    head_dim = d // heads
    by_hand = 2 * tokens * (d * d + d * kv * head_dim * 2 + d * d) + 2 * tokens * 3 * d * ff
    attention = 4 * 1 * heads * 8 * 8 * head_dim / 2
    assert _block_flops(tokens, 1, 8, d, heads, kv, ff, gated=True) == by_hand + attention
    assert _block_flops(tokens, 1, 8, d, heads, kv, ff, gated=False) == (
        by_hand - 2 * tokens * d * ff + attention)


def test_norm_bytes_are_the_ideal_traffic():
    from benchmarks.bench_norm import build_cases

    for case in build_cases(quick=True):
        m, n, e = case.params["M"], case.params["N"], case.dtype.itemsize
        reads_writes = {"layer_norm": (2, 3), "add_layer_norm": (4, 4), "rms_norm": (2, 3),
                        "add_rms_norm": (4, 4)}[case.op]
        assert case.bytes["fwd"] == reads_writes[0] * m * n * e
        assert case.bytes["bwd"] == reads_writes[1] * m * n * e


def test_rates_and_roofline():
    row = {"median_ms": 2.0}
    ceilings = {"copy_bytes_per_s": 1e11, "matmul_flop_per_s": 1e13}
    harness.add_rates(row, nbytes=1e8, flops=2e9, ceilings=ceilings)
    assert row["GB/s"] == pytest.approx(50.0)
    assert row["TFLOP/s"] == pytest.approx(1.0)
    # 50 % of the copy rate, 10 % of the matmul rate: the nearer ceiling binds.
    assert row["pct_roofline"] == pytest.approx(50.0)


def _row(provider, ms, case="c", mode="fwd", op="op"):
    return {"op": op, "case": case, "dtype": "float32", "mode": mode, "provider": provider,
            "status": "ok" if ms else "not installed", "median_ms": ms, "p20_ms": ms,
            "p80_ms": ms}


def test_speedups_against_eager_and_the_best_alternative():
    rows = [_row("lightllm", 2.0), _row("eager", 8.0), _row("torch", 3.0), _row("liger", None),
            _row("lightllm", 1.0, mode="bwd"), _row("torch", 4.0, mode="bwd")]
    harness.add_speedups(rows)
    assert rows[0]["x_vs_eager"] == 4.0
    assert rows[0]["x_vs_best"] == 1.5 and rows[0]["best_alternative"] == "torch"
    assert "x_vs_eager" not in rows[4] and rows[4]["x_vs_best"] == 4.0


def test_compare_flags_regressions_past_the_threshold(tmp_path):
    old = [_row("lightllm", 1.0), _row("torch", 1.0), _row("lightllm", 1.0, case="d")]
    new = [_row("lightllm", 1.25), _row("torch", 1.05), _row("lightllm", 0.5, case="d"),
           _row("lightllm", 9.0, case="only-new")]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": old}))
    result = report.compare(new, report.load_rows(tmp_path), threshold=0.1)
    assert result["matched"] == 3
    assert [(p["case"], p["provider"]) for p in result["regressions"]] == [("c", "lightllm")]
    assert [p["case"] for p in result["improvements"]] == ["d"]
    assert "regression" in report.comparison_markdown(result, str(path))
    # Per-op files of earlier runs (``ms`` for the median) are read too.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    earlier = {k: v for k, v in old[0].items() if k != "median_ms"}
    (legacy / "op.json").write_text(json.dumps({"results": [{**earlier, "ms": 1.5}]}))
    assert report.load_rows(legacy)[0]["median_ms"] == 1.5
    with pytest.raises(ValueError, match="no benchmark rows"):
        empty = tmp_path / "empty.json"
        empty.write_text("{}")
        report.load_rows(empty)


def test_missing_peers_stay_in_the_results():
    status = peers.status()
    assert set(status) == {"liger", "flash-attn", "xformers"}
    providers = peers.attention_providers(causal=True)
    for name in ("flash-attn", "xformers"):
        if status[name]["version"] is None:
            assert isinstance(providers[name], harness.Unavailable)
            assert providers[name].status == "not installed"
        elif not torch.cuda.is_available():
            assert providers[name].status == "needs CUDA"


def test_a_missing_peer_becomes_a_row_not_a_gap():
    case = harness.Case(op="toy", label="4", params={"N": 4},
                        make_inputs=lambda device: (torch.randn(4, device=device),),
                        providers={"lightllm": torch.neg, "peer": harness.Unavailable("not installed")},
                        dtype=torch.float32, x="N")
    rows = harness.run_case(case, None)
    assert [(r["provider"], r["status"]) for r in rows] == [("lightllm", "ok"),
                                                            ("peer", "not installed")]
    assert rows[1]["median_ms"] is None
    for key in report.ROW_KEYS:
        assert key in rows[0] and key in rows[1]
    assert rows[0]["p20_ms"] <= rows[0]["median_ms"] <= rows[0]["p80_ms"]


def test_the_command_writes_every_report(tmp_path):
    """``python -m benchmarks`` on one small op: results.json with the schema, summary.md, the
    Liger-format CSV and a plot per op and dtype."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--ops", "rms_norm",
                           "--dtype", "fp32", "--providers", "lightllm,torch,liger", "--no-traffic",
                           "--cpu-seconds", "0", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["schema"] == report.SCHEMA
    env = payload["environment"]
    for key in ("card", "driver", "torch", "triton", "cuda", "git_commit", "cpu", "threads"):
        assert key in env
    assert payload["ceilings"]["copy_bytes_per_s"] > 0 and payload["ceilings"]["matmul_flop_per_s"] > 0
    rows = payload["results"]
    assert {r["op"] for r in rows} == {"rms_norm", "add_rms_norm"}
    assert {r["dtype"] for r in rows} == {"float32"}
    assert {r["provider"] for r in rows} == {"lightllm", "torch", "liger"}
    for r in rows:
        assert all(k in r for k in report.ROW_KEYS)
        if r["provider"] == "liger" and payload["peers"]["liger"]["version"] is None:
            assert r["status"] == "not installed"
        if r["provider"] == "lightllm":
            assert r["status"] == "ok" and r["median_ms"] > 0 and "x_vs_best" in r
    summary = (out / "summary.md").read_text()
    assert "### rms_norm" in summary and "### add_rms_norm" in summary
    with open(out / "results.csv") as f:
        records = list(csv.DictReader(f))
    assert list(records[0]) == report.CSV_COLUMNS
    timed = [r for r in rows if r["median_ms"]]
    assert len(records) == len(timed)
    assert {r["kernel_operation_mode"] for r in records} == {"forward", "backward", "full"}
    assert {r["x_name"] for r in records} == {"N"}
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["add_rms_norm-float32.png",
                                                                 "rms_norm-float32.png"]


@pytest.mark.parametrize("tied", [True, False])
def test_decode_roofline_bytes_read_every_weight_once(tied):
    """A decode step's roofline traffic: every parameter once except an input embedding the step
    only gathers rows from (a tied head reads it whole), plus the batch's K and V caches."""
    transformers = pytest.importorskip("transformers")
    from benchmarks.bench_generate import decode_bytes

    config = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    weights = params if tied else params - 101 * 32
    cache = 2 * 3 * 5 * 2 * 8 * 7  # K and V, layers, batch, kv heads, head dim, context
    assert decode_bytes(model, 5, 7) == 4 * (weights + cache)
