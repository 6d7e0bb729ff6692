"""Host cost per call: lightllm's own Python, from the public function down to the kernel launch.

Every Triton launch is stubbed (``lightllm.testing.stub_launches(record=False)``), so what is timed
is validation, dispatch, reshapes, allocation, launch plans and autograd bookkeeping — the work that
would sit in front of every kernel on a GPU — beside PyTorch's *whole* eager call on the same tiny
input (compute included). The C++ softmax ops cannot be stubbed: their rows are whole calls on a
tiny input, like PyTorch's. Each case is timed without autograd and with autograd recording (inputs
that require grad; forward only). Targets (docs/design.md §5): ≤ 20 µs without autograd, ≤ 40 µs with.

On a CPU-only machine the Triton path exists only under the interpreter, which must be switched on
before lightllm is imported, so the measurement runs in a child process with ``TRITON_INTERPRET=1``.
On a GPU it runs in-process on CUDA tensors and also times the real wall-clock per call (kernels
running, calls issued back to back, one synchronisation at the end) beside PyTorch's.

Rows: ``lightllm`` (host only), ``lightllm-wall`` (GPU: kernels running) and ``torch``, in ms per
call (median and p20/p80 of 7 repeats of 300 calls), with ``target_us``.

    python -m benchmarks --ops host_overhead
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

OPS = ("host_overhead",)  # the op names of its cases

HAS_CUDA = torch.cuda.is_available()
TARGET_US = {"no grad": 20.0, "autograd": 40.0}


def per_call_ms(fn, calls: int = 300, repeats: int = 7, sync=None) -> dict[str, float]:
    """Median and p20/p80 over ``repeats`` of the mean time of ``calls`` back-to-back calls, in
    ms (the schema's unit; these are µs-sized)."""
    for _ in range(max(20, calls // 10)):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) / calls * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def cases(device: str):
    """(name, lightllm call, PyTorch call, tensors that get requires_grad in the autograd row)."""
    import torch.nn.functional as F

    import lightllm.functional as LF
    import lightllm.nn as LN

    def t(*shape):
        return torch.randn(*shape, device=device)

    q1, kc, vc = t(1, 8, 1, 64), t(1, 8, 300, 64), t(1, 8, 300, 64)
    qp, kp, vp = t(1, 8, 16, 64), t(1, 8, 16, 64), t(1, 8, 16, 64)
    x, r, w, b = t(16, 1024), t(16, 1024), t(1024), t(1024)
    # Matmuls and modules at toy widths, so PyTorch's column is mostly its own host cost too.
    xs, w1, b1, w2, b2 = t(4, 64), t(256, 64), t(256), t(64, 256), t(64)
    scores, keep = t(1, 8, 16, 16), t(1, 1, 16, 16) > 0
    ln, add_ln = LN.LayerNorm(1024).to(device), LN.AddLayerNorm(1024).to(device)
    tln = torch.nn.LayerNorm(1024).to(device)
    rms, add_rms = LN.RMSNorm(1024).to(device), LN.AddRMSNorm(1024).to(device)
    trms = torch.nn.RMSNorm(1024).to(device)
    ff = LN.FeedForward(64, 256).eval().to(device)
    tff = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                              torch.nn.Linear(256, 64)).eval().to(device)
    mha = LN.MultiheadAttention(64, 4, batch_first=True).eval().to(device)
    tmha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval().to(device)
    xm = t(1, 16, 64)
    csa = LN.CausalSelfAttention(64, 4, num_kv_heads=2).eval().to(device)
    cache = csa.make_kv_cache(1, 512)
    with torch.no_grad():
        csa(t(1, 300, 64), kv_cache=cache, start_pos=0)
    x1 = t(1, 1, 64)
    ck, cv = cache.k.clone(), cache.v.clone()

    def torch_decode_step(x):
        """CausalSelfAttention's decode step written with PyTorch's ops alone."""
        q = csa.q_proj(x).view(1, 1, 4, 16).transpose(1, 2)
        k = csa.k_proj(x).view(1, 1, 2, 16).transpose(1, 2)
        v = csa.v_proj(x).view(1, 1, 2, 16).transpose(1, 2)
        ck[:, :, 300:301].copy_(k)
        cv[:, :, 300:301].copy_(v)
        out = F.scaled_dot_product_attention(q, ck[:, :, :301], cv[:, :, :301], enable_gqa=True)
        return csa.out_proj(out.transpose(1, 2).reshape(1, 1, 64))

    return [
        ("scaled_dot_product_attention decode 1x300", lambda: LF.scaled_dot_product_attention(
            q1, kc, vc), lambda: F.scaled_dot_product_attention(q1, kc, vc), (q1, kc, vc)),
        ("scaled_dot_product_attention causal prefill 16", lambda: LF.scaled_dot_product_attention(
            qp, kp, vp, is_causal=True), lambda: F.scaled_dot_product_attention(
            qp, kp, vp, is_causal=True), (qp, kp, vp)),
        ("layer_norm 16x1024", lambda: LF.layer_norm(x, (1024,), w, b),
         lambda: F.layer_norm(x, (1024,), w, b), (x, w, b)),
        ("add_layer_norm 16x1024", lambda: LF.add_layer_norm(x, r, (1024,), w, b),
         lambda: F.layer_norm(x + r, (1024,), w, b), (x, r, w, b)),
        ("rms_norm 16x1024", lambda: LF.rms_norm(x, (1024,), w, 1e-6),
         lambda: F.rms_norm(x, (1024,), w, 1e-6), (x, w)),
        ("add_rms_norm 16x1024", lambda: LF.add_rms_norm(x, r, (1024,), w, 1e-6),
         lambda: F.rms_norm(x + r, (1024,), w, 1e-6), (x, r, w)),
        ("linear_gelu 4x64->256", lambda: LF.linear_gelu(xs, w1, b1),
         lambda: F.gelu(F.linear(xs, w1, b1)), (xs, w1, b1)),
        ("feed_forward 4x64x256", lambda: LF.feed_forward(xs, w1, b1, w2, b2),
         lambda: F.linear(F.gelu(F.linear(xs, w1, b1)), w2, b2), (xs, w1, b1, w2, b2)),
        ("softmax 16x1024 (whole call)", lambda: LF.softmax(x, -1), lambda: torch.softmax(x, -1),
         (x,)),
        ("scaled_masked_softmax 1x8x16x16 (whole call)", lambda: LF.scaled_masked_softmax(
            scores, keep, 0.125), lambda: torch.softmax((scores * 0.125).masked_fill(
            ~keep, float("-inf")), -1), (scores,)),
        ("nn.LayerNorm forward", lambda: ln(x), lambda: tln(x), (x,)),
        ("nn.AddLayerNorm forward", lambda: add_ln(x, r), lambda: tln(x + r), (x, r)),
        ("nn.RMSNorm forward", lambda: rms(x), lambda: trms(x), (x,)),
        ("nn.AddRMSNorm forward", lambda: add_rms(x, r), lambda: trms(x + r), (x, r)),
        ("nn.FeedForward forward (eval)", lambda: ff(xs), lambda: tff(xs), (xs,)),
        ("nn.MultiheadAttention forward E64 16 tokens", lambda: mha(xm, xm, xm, need_weights=False),
         lambda: tmha(xm, xm, xm, need_weights=False), (xm,)),
        ("nn.CausalSelfAttention decode step E64", lambda: csa(x1, kv_cache=cache, start_pos=300),
         lambda: torch_decode_step(x1), (x1,)),
    ]


def _rows(device: str, stubbed: bool) -> list[dict]:
    """Per (case, autograd or not): lightllm's time per call (``lightllm``: host only, launches
    stubbed; ``lightllm-wall``: kernels running) and PyTorch's whole eager call (``torch``)."""
    from lightllm.testing import stub_launches

    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for name, ours, theirs, grad_inputs in cases(device):
        for mode in ("no grad", "autograd"):
            for t in grad_inputs:
                t.requires_grad_(mode == "autograd")
            context = torch.no_grad() if mode == "no grad" else torch.enable_grad()
            base = {"op": "host_overhead", "case": name, "dtype": "float32", "mode": mode,
                    "device": device, "status": "ok", "target_us": TARGET_US[mode]}
            with context:
                if stubbed:
                    with stub_launches(record=False):
                        rows.append({**base, "provider": "lightllm", **per_call_ms(ours)})
                else:
                    rows.append({**base, "provider": "lightllm-wall", **per_call_ms(ours, sync=sync)})
                if theirs is not None and mode == "no grad" and stubbed:
                    rows.append({**base, "provider": "torch", **per_call_ms(theirs, sync=sync)})
        for t in grad_inputs:
            t.requires_grad_(False)
    return rows


def _child_rows() -> list[dict]:
    """The stubbed measurement on CPU tensors, in a process that interprets the Triton kernels."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "LIGHTLLM_POISON_OUTPUTS": "0"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_overhead", "--child"],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(quick: bool = False, only=()) -> list[dict]:
    """Every row (the run is short either way; ``only`` filters providers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: threads only add noise
    try:
        if HAS_CUDA:
            rows = _rows("cuda", stubbed=True) + _rows("cuda", stubbed=False)
        else:
            rows = _child_rows()
    finally:
        torch.set_num_threads(threads)
    return [r for r in rows if not only or r["provider"] in only]


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        torch.set_num_threads(1)
        print(json.dumps(_rows("cpu", stubbed=True)))
    else:
        sys.exit("run it through the suite: python -m benchmarks --ops host_overhead")
