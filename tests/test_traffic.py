"""The traffic counts of benchmarks.traffic: the instruments on cases whose numbers are known by
hand, every kernel formula against the counted launches on odd tiny shapes, and the JSON."""

import json

import pytest
import torch
import triton
import triton.language as tl
from torch.testing import assert_close

from benchmarks import traffic
from benchmarks.counting import Counter, distinct_bytes
from lightllm.kernels import norm as norm_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="counts lightllm's kernels in Triton's interpreter (CPU)")


@triton.jit
def _copy_prefix(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _scalar_rmw(X, Total):
    tl.store(X, tl.load(X) + 1.0)  # unmasked scalar load and store
    tl.atomic_add(Total + tl.arange(0, 4), 1.0, mask=tl.arange(0, 4) < 3)


def test_masked_loads_count_active_lanes_only():
    x, y = torch.randn(10), torch.empty(10)
    with Counter() as c:
        _copy_prefix[(2,)](x, y, 10, BLOCK=8)  # 16 lanes, 10 active
    assert (c.tally.read, c.tally.written, c.tally.launches) == (40, 40, 1)
    assert c.tally.per_kernel == {"_copy_prefix": {"bytes_read": 40, "bytes_written": 40,
                                                   "launches": 1}}


def test_unmasked_accesses_and_atomics():
    x, total = torch.zeros(1), torch.zeros(4)
    with Counter() as c:
        _scalar_rmw[(1,)](x, total)
    # scalar: 4 read + 4 written; atomic on 3 active lanes: 12 read + 12 written
    assert (c.tally.read, c.tally.written) == (16, 16)
    assert x.item() == 1.0 and total.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_patches_are_restored():
    from triton.runtime import interpreter
    call = interpreter.GridExecutor.__call__
    with Counter():
        pass
    assert interpreter.GridExecutor.__call__ is call
    assert "create_masked_load" not in vars(interpreter.interpreter_builder)


def test_aten_elementwise_add_views_and_expanded_inputs():
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    with Counter() as c:
        x + y
    assert (c.tally.read, c.tally.written, c.tally.launches) == (120, 60, 1)
    with Counter() as c:
        x.view(15)
        x.t()
        x.expand(2, 3, 5)
        torch.empty(100)
    assert (c.tally.read, c.tally.written, c.tally.launches) == (0, 0, 0)
    row = torch.randn(5)
    with Counter() as c:
        x * row.expand(3, 5)  # the expanded row touches 5 elements, not 15
    assert c.tally.read == 60 + 20
    assert distinct_bytes(row.expand(3, 5)) == 20


def test_aten_copy_fill_and_zero_write_without_reading_their_destination():
    x, dst = torch.randn(4, 4), torch.empty(4, 4)
    with Counter() as c:
        dst.copy_(x)
        dst.fill_(1.0)
        dst.zero_()
        dst.add_(x)  # in place: reads both
    per = c.tally.per_kernel
    assert per["aten.copy_"] == {"bytes_read": 64, "bytes_written": 64, "launches": 1}
    assert per["aten.fill_"] == {"bytes_read": 0, "bytes_written": 64, "launches": 1}
    assert per["aten.zero_"] == {"bytes_read": 0, "bytes_written": 64, "launches": 1}
    assert per["aten.add_"] == {"bytes_read": 128, "bytes_written": 64, "launches": 1}


def test_ops_that_touch_no_tensor_count_nothing():
    with Counter() as c:
        torch.promote_types(torch.float16, torch.float32)
    assert (c.tally.read, c.tally.written, c.tally.launches) == (0, 0, 0)


def test_layer_norm_forward_by_hand():
    # 3 x 5 fp32: x read once, w and b read by each row's program, y written, mean/rstd written;
    # the custom op itself and the interpreter's own copies count nothing.
    x, w, b = torch.randn(3, 5), torch.randn(5), torch.randn(5)
    tally = traffic.count(lambda x, w, b: traffic.LF.layer_norm(x, (5,), w, b), (x, w, b), "fwd",
                          grad_inputs=())
    assert tally.read == 60 + 3 * (20 + 20)
    assert tally.written == 60 + 3 * (4 + 4)
    assert tally.launches == 1 and list(tally.per_kernel) == ["_layer_norm_fwd"]


def _check_formulas(case: traffic.Case):
    for mode in case.modes:
        inputs = case.make("cpu", torch.float16)
        tally = traffic.count(case.providers["lightllm"], inputs, mode,
                              grad_inputs=case.grad_inputs, params=traffic._params(case, "lightllm"))
        assert tally.triton_launches, f"{case.op} {mode}: no Triton kernel ran"
        for launch in tally.triton_launches:
            assert traffic.kernel_traffic(launch) == (launch.read, launch.written), (
                f"{case.op} {case.case} {mode}: {launch.kernel}")


FORMULA_CASES = [
    traffic._norm_case("layer_norm", 5, 67), traffic._norm_case("add_layer_norm", 9, 40),
    traffic._norm_case("rms_norm", 4, 97), traffic._norm_case("add_rms_norm", 3, 129),
    traffic._linear_case("linear_gelu", 3, 40, 72), traffic._linear_case("linear_relu", 7, 56, 24),
    traffic._swiglu_case(6, 24, 40), traffic._rotary_case(2, 3, 3, 1, 24),
    traffic._attention_case(1, 2, 1, 29, 45, 24, False),
    traffic._attention_case(1, 1, 1, 70, 70, 16, True),
    traffic._attention_case(2, 2, 2, 1, 520, 16, False),
    traffic._llama_block_case("odd", 1, 11, 48, 3, 1, 16, 40),  # every kernel of the Llama block
]


@pytest.mark.parametrize("case", FORMULA_CASES, ids=lambda c: f"{c.op}-{c.case}")
def test_formula_equals_count(case):
    _check_formulas(case)


def test_formula_equals_count_pointer_matmul_and_long_rows():
    # fp16 rows of 23 elements are not 16-byte aligned: the pointer kernel (wrapped rows read).
    _check_formulas(traffic._linear_case("linear_gelu", 5, 23, 40))
    # Rows past MAX_FUSED_BWD / MAX_FUSED_FWD take the two-pass paths.
    _check_formulas(traffic._norm_case("add_layer_norm", 2, norm_kernels.MAX_FUSED_FWD + 3))


def test_keys_per_query_block_by_hand():
    # causal, 128-row query blocks over 64-key tiles, 200 keys
    assert traffic.keys_per_query_block(0, 128, 64, 200, True) == 128
    assert traffic.keys_per_query_block(1, 128, 64, 200, True) == 200
    assert traffic.keys_per_query_block(0, 128, 64, 200, False) == 200
    assert traffic.keys_per_query_block(0, 16, 64, 200, True) == 64  # the diagonal tile is whole


def test_softmax_design_formula():
    assert traffic.softmax_design(4, 1024, 2, "fwd") == (8192, 8192, 1)
    assert traffic.softmax_design(4, 1024, 2, "bwd") == (16384, 8192, 1)
    assert traffic.softmax_design(1, 1 << 20, 2, "fwd") == (2 << 21, 2 << 20, 2)  # split path


def test_llama_block_lightllm_computes_the_eager_layer():
    # The comparison is honest only if both providers are the same function of the same weights.
    case = traffic._llama_block_case("odd", 1, 11, 48, 3, 1, 16, 40)
    inputs = case.make("cpu", torch.float32)
    expected = case.providers["eager"](*inputs)
    assert_close(case.providers["lightllm"](*inputs), expected, rtol=1e-4, atol=1e-4)
    assert {p.data_ptr() for p in case.modules["lightllm"].parameters()} == {
        p.data_ptr() for p in case.modules["eager"].parameters()}


@pytest.mark.parametrize("make_case", [lambda: traffic._block_case(1, 9, 32, 2),
                                       lambda: traffic._llama_block_case("odd", 1, 11, 48, 3, 1,
                                                                         16, 40)],
                         ids=["gpt2", "llama"])
def test_block_backward_differentiates_the_weights_and_meta_sdpa_is_fused(make_case):
    # Eager on meta tensors (the scaled table) counts what its CPU run counts: SDPA as the fused
    # kernel, not the math backend's N x N scores. The backward is a training step's: dx and
    # every weight gradient (two matmuls per linear layer).
    case = make_case()
    tallies = {}
    for device in ("cpu", "meta"):
        for mode in case.modes:
            inputs = case.make(device, torch.float16)
            tallies[device, mode] = traffic.count(case.providers["eager"], inputs, mode,
                                                  dry=device == "meta", grad_inputs=(0,),
                                                  params=traffic._params(case, "eager"))
    for mode in case.modes:
        cpu, meta = tallies["cpu", mode].per_kernel, tallies["meta", mode].per_kernel
        assert {k: v["launches"] for k, v in cpu.items()} == {k: v["launches"] for k, v in
                                                              meta.items()}
        # bytes too, but for native_layer_norm(_backward)'s mean/rstd: float16 on the CPU, float32 on meta
        # (CUDA's dtype)
        assert {k: v for k, v in cpu.items() if not k.startswith("aten.native_layer_norm")} == {
            k: v for k, v in meta.items() if not k.startswith("aten.native_layer_norm")}
    linears = sum(isinstance(m, torch.nn.Linear) for m in case.modules["eager"].modules())
    per = tallies["meta", "bwd"].per_kernel
    matmuls = sum(k["launches"] for name, k in per.items() if name in ("aten.mm", "aten.bmm"))
    assert matmuls == 2 * linears + (2 if case.op == "transformer_block" else 0)
    assert not any("softmax" in name for name in per)


def test_compile_counts_inductor_kernels():
    case = traffic._llama_block_case("odd", 1, 11, 48, 3, 1, 16, 40)
    tallies = traffic.compile_count(case.providers["eager"], case.make("cpu", torch.float16),
                                    grad_inputs=(0,), params=traffic._params(case, "eager"))
    fwd, bwd = tallies["fwd"], tallies["bwd"]
    # 7 linear layers: 7 matmuls forward, 14 backward (dx and dW), each an extern launch
    assert fwd.per_kernel["extern_kernels.mm"]["launches"] == 7
    assert bwd.per_kernel["extern_kernels.mm"]["launches"] == 14
    assert any(name.startswith("inductor.fused") for name in fwd.per_kernel)
    eager = traffic.count(case.providers["eager"], case.make("cpu", torch.float16), "fwd",
                          grad_inputs=(0,), params=traffic._params(case, "eager"))
    assert 7 < fwd.launches < eager.launches  # inductor fused some of eager's elementwise ops
    assert fwd.read > 0 and fwd.written > 0 and bwd.read > 0 and bwd.written > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("traffic")
    return traffic.run(out, quick=True, compiled=False), out


def test_report_covers_every_op_and_the_block(report):
    data, out = report
    assert json.loads((out / "traffic.json").read_text()) == json.loads(json.dumps(data))
    assert (out / "traffic.md").read_text() == traffic.markdown(data)
    ops = {"layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "linear_gelu",
           "linear_relu", "linear_swiglu", "rotary", "attention", "attention_decode", "softmax",
           "transformer_block", "llama_block"}
    for table in ("counted", "scaled"):
        seen = {(r["op"], r["provider"], r["mode"]) for r in data[table]}
        for op in ops:
            for provider in ("lightllm", "eager"):
                assert (op, provider, "fwd") in seen, (table, op, provider)
        assert ("transformer_block", "lightllm", "bwd") in seen
        assert ("llama_block", "lightllm", "bwd") in seen and ("llama_block", "eager", "bwd") in seen
    keys = {"op", "case", "shape", "dtype", "mode", "provider", "bytes_read", "bytes_written",
            "launches"}
    for r in data["counted"]:
        assert keys | {"per_kernel", "counted"} <= set(r)
        assert r["counted"] or r["op"] == "softmax" and r["provider"] == "lightllm" and r["note"]
    assert any(not r["counted"] for r in data["counted"])
    for r in data["scaled"]:
        assert keys | {"exact", "formula"} <= set(r)
    scaled_llama = {r["case"] for r in data["scaled"] if r["op"] == "llama_block"}
    assert scaled_llama == {"SmolLM2-135M B1 N2048", "Llama-3-8B B1 N2048"}
    assert "### Blocks: lightllm vs eager vs torch.compile" in traffic.markdown(data)
    assert {"torch", "triton", "date"} <= set(data["environment"])


def test_report_counts_are_consistent(report):
    data, _ = report
    for r in data["counted"]:
        if r["counted"]:
            per = r["per_kernel"].values()
            assert sum(k["bytes_read"] for k in per) == r["bytes_read"]
            assert sum(k["launches"] for k in per) == r["launches"]
    fused = {(r["op"], r["mode"]): r for r in data["counted"]
             if r["provider"] == "lightllm" and r["op"] in ("layer_norm", "attention")}
    assert fused[("layer_norm", "fwd")]["launches"] == 1
    ratios = [r for r in data["ratios"] if r["table"] == "scaled" and r["op"] == "layer_norm"
              and r["provider"] == "lightllm" and r["mode"] == "fwd"]
    assert len(ratios) == 1 and ratios[0]["bytes_ratio"] < 0.5 and ratios[0]["launch_ratio"] < 0.5


def test_scaled_eager_on_meta_equals_the_count_on_the_cpu():
    # The scaled table counts aten ops on meta tensors: the same numbers as on real ones.
    case = traffic._norm_case("add_layer_norm", 7, 33)
    for mode in case.modes:
        cpu = traffic.count(case.providers["eager"], case.make("cpu", torch.float16), mode)
        meta = traffic.count(case.providers["eager"], case.make("meta", torch.float16), mode,
                             dry=True)
        assert (cpu.read, cpu.written, cpu.launches) == (meta.read, meta.written, meta.launches)


def test_matmul_ideal_reads_every_operand_once():
    # linear_gelu 5x24 -> 40 fp16, training forward: x, W, bias read once; out and the saved
    # pre-activation written. The counted launch requests at least that (tiles re-read).
    case = traffic._linear_case("linear_gelu", 5, 24, 40)
    tally = traffic.count(case.providers["lightllm"], case.make("cpu", torch.float16), "fwd")
    (launch,) = tally.triton_launches
    assert traffic.matmul_ideal(launch) == (2 * (5 * 24 + 40 * 24 + 40), 2 * 2 * 5 * 40)
    assert launch.read >= traffic.matmul_ideal(launch)[0]
    others = tally.read + tally.written - launch.read - launch.written
    assert traffic._matmul_ideal_bytes(tally) == others + sum(traffic.matmul_ideal(launch))
