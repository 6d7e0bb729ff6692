"""Compile every Triton kernel of ``kernels/*.py`` for an H100 (sm_90a) on a machine without a GPU.

CPU CI runs the kernels in Triton's interpreter, which never compiles them: a kernel that fails to
lower for sm_90, or that spills registers, would pass there. This script drives each kernel file's
real launchers with small CPU tensors while pretending to be on an H100 (132 SMs, TMA available),
catches every launch before it reaches a driver and turns it into exactly the specialization a GPU
launch would compile: argument types, 16-byte divisibility of pointers and ints, ints equal to 1,
constexpr flags, and for an autotuned kernel every config its own pruning keeps from its GPU config
list. Each is compiled with Triton's CUDA backend for ``GPUTarget("cuda", 90, 32)``; ptxas' report
gives registers and spill stores (and, with the shared memory, the programs an SM holds at once),
the PTX shows wgmma / mma.sync and TMA / cp.async.

    .venv/bin/python tests/sm90_compile.py [kernels/norm.py ...] [--jobs 2] [--json out.json]
                                           [--only REGEX]

prints one line per compiled specialization and exits 1 when a kernel fails to compile, a
kernel of a file is never launched by the scenarios below, a specialization marked strict spills,
or a kernel with ``tl.dot`` on fp16/bf16 data has neither wgmma nor mma.sync in its PTX (77
when Triton has no NVIDIA backend or ptxas).
``tests/test_compile_sm90.py`` runs it in a subprocess: TRITON_INTERPRET must not be set in this
process (with it, ``@triton.jit`` returns interpreter functions).

Each kernel file has a scenario function below that calls its launchers the way the ops do; a new
kernel file, or a new kernel in a file, needs its launches added here (it is reported uncovered).
Two Triton internals are used, stable since Triton 3.3: ``create_function_from_signature`` (the
launch binder that computes the specialization) and ``JITFunction._pack_args``.
"""

from __future__ import annotations

import os
import sys

if os.environ.pop("TRITON_INTERPRET", "0") == "1" and "triton" in sys.modules:
    raise RuntimeError("sm90_compile must run in a process where TRITON_INTERPRET was never set")
os.environ.pop("LIGHTLLM_AUTOTUNE", None)  # every suitable config, not only each list's default
os.environ["LIGHTLLM_POISON_OUTPUTS"] = "0"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARCH = 90
H100_SMS = 132
HALF = ("fp16", "bf16")
SKIP = 77  # exit status when this Triton cannot compile for NVIDIA GPUs at all


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def toolchain_missing() -> str | None:
    """Why sm_90 compilation is impossible here (no CUDA backend or ptxas in Triton), or None."""
    try:
        from triton.backends import backends
    except Exception as e:  # any import failure means no compiler
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return "triton has no nvidia backend"
    if not os.access(ptxas_path(), os.X_OK):
        return f"Triton's ptxas is missing ({ptxas_path()})"
    return None


# ------------------------------------------------------------------------------------------------
# Capturing launches
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    module: str
    kernel: str
    fn: object  # the JITFunction (stays in this process; pool workers are forked)
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    config: str  # "i/n": the i-th of the n autotune configs kept for the launch; "-": not tuned
    note: str  # the scenario's description of the launch
    strict: bool  # a spill is a failure


class Capture:
    """Stands in for ``JITFunction.run`` and ``Autotuner.run`` while scenarios run: each launch
    becomes one Job per config, with the specialization Triton derives for a CUDA launch."""

    def __init__(self):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", ARCH, 32))
        self.jobs: list[Job] = []
        self.module = ""
        self.note, self.configs, self.strict = "", "all", False
        self._config_tag = "-"
        self._binders: dict = {}
        self._debug = triton.knobs.runtime.debug

    @contextlib.contextmanager
    def launches(self, note: str, *, configs: str = "all", strict=False):
        """Launches inside the block are described by ``note``.

        ``configs``: "all" the configs the kernel's pruning keeps, "default" the first of them,
        "defaults" the first and the first TMA config (``USE_TMA``) among them, "default+FLAG"
        the first and every one whose FLAG constexpr is set.
        ``strict``: True (no config may spill), "default" (the default config, and any kernel
        that is not autotuned, must not spill) or False (spills are only reported)."""
        saved = self.note, self.configs, self.strict
        self.note, self.configs, self.strict = note, configs, strict
        try:
            yield
        finally:
            self.note, self.configs, self.strict = saved

    def jit_run(self, fn, *args, grid, warmup, **kwargs):
        from triton.runtime.jit import create_function_from_signature

        kwargs["debug"] = kwargs.get("debug", fn.debug) or self._debug
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params,
                                                               self.backend)
        bound, specialization, options = self._binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self.backend, kwargs, bound, specialization, options)
        tag = self._config_tag
        strict = self.strict is True or (
            self.strict == "default" and (tag == "-" or tag.startswith("1/")))
        self.jobs.append(Job(self.module, fn.__name__, fn, signature, constexprs, attrs, options,
                             tag, self.note, strict))

    def tuner_run(self, tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        kept = tuner.prune_configs(kwargs)  # the kernel's own pruning, as on a GPU
        chosen = kept if self.configs == "all" else kept[:1]
        if self.configs == "defaults":  # and the first config on the other load path (TMA)
            chosen += [c for c in kept if c.kwargs.get("USE_TMA")][:1]
        elif self.configs.startswith("default+"):  # and every config with that flag
            chosen += [c for c in kept if c.kwargs.get(self.configs.removeprefix("default+"))]
        for i, config in enumerate(chosen, 1):
            if config.pre_hook is not None:  # e.g. tensor descriptors take the config's boxes
                config.pre_hook({**tuner.nargs, **kwargs, **config.all_kwargs()})
            self._config_tag = f"{i}/{len(kept)}"
            try:
                tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            finally:
                self._config_tag = "-"
        tuner.nargs = None


@contextlib.contextmanager
def capturing(capture: Capture):
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    saved = JITFunction.run, Autotuner.run
    JITFunction.run = lambda fn, *a, **k: capture.jit_run(fn, *a, **k)
    Autotuner.run = lambda tuner, *a, **k: capture.tuner_run(tuner, *a, **k)
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


def pretend_h100():
    """The launchers read the device from one table (lightllm.kernels._device): an H100's."""
    from lightllm.kernels import _device

    assert _device.HOPPER.sms == H100_SMS
    _device.facts = lambda device: _device.HOPPER  # for the whole process


# ------------------------------------------------------------------------------------------------
# Scenarios: each kernel file's launches, as the ops make them. Every autotune config is compiled
# once (for the main case); other dtypes, flags and shapes take their default config.
# ------------------------------------------------------------------------------------------------


def _t(*shape, dtype):
    import torch

    return torch.randn(*shape, dtype=getattr(torch, dtype))


def scenario_norm(mod, cap: Capture):
    """Rows in registers up to 16384 (forward) / 8192 (backward) elements, the widest block in
    every dtype (the most registers per thread), the two-pass path beyond, a row of 1023 (not
    16-byte aligned); flags as the ops pass them: Add & Norm, LayerNorm with and without affine,
    without bias, fp32 affine on a bf16 input; each with every backward candidate its pruning
    keeps. Those runs of 64 rows leave one row per program (no ROW_SPLIT candidate): the backward
    of 4224 rows (32 x SMs) runs every split, fp16 at hidden 1023 and 2048, fp32 at 8192 (the
    most registers). Nothing may spill."""
    import torch

    rows = 64

    def fwd(note, dt, n, *, residual=True, weight=True, bias=True, wdt=None):
        with cap.launches(f"fwd N={n} {note}", strict=True):
            wdt = wdt or dt
            mod.layer_norm_fwd(_t(rows, n, dtype=dt), _t(rows, n, dtype=dt) if residual else None,
                               _t(n, dtype=wdt) if weight else None,
                               _t(n, dtype=wdt) if bias else None, 1e-5)

    def bwd(note, dt, n, *, ds=True, weight=True, need_db=True, wdt=None, m=rows):
        with cap.launches(f"bwd N={n} {note}", strict=True):
            mod.layer_norm_bwd(_t(m, n, dtype=dt), _t(m, n, dtype=dt),
                               _t(n, dtype=wdt or dt) if weight else None,
                               torch.zeros(m), torch.ones(m),
                               _t(m, n, dtype=dt) if ds else None, weight, need_db)

    for dt in ("float16", "bfloat16", "float32"):
        fwd("add+affine", dt, 16384)
        bwd("add+affine", dt, 8192)
    fwd("add+affine", "float16", 1023)
    bwd("add+affine", "float16", 1023)
    fwd("add+affine, two-pass", "bfloat16", 20000)
    bwd("add+affine, two-pass", "bfloat16", 12000)
    fwd("plain", "bfloat16", 4096, residual=False, weight=False, bias=False)
    bwd("plain", "bfloat16", 4096, ds=False, weight=False, need_db=False)
    fwd("affine", "bfloat16", 4096, residual=False)
    bwd("affine", "bfloat16", 4096, ds=False)
    fwd("add+weight, no bias", "bfloat16", 4096, bias=False)
    bwd("add+weight, no bias", "bfloat16", 4096, need_db=False)
    fwd("fp32 affine", "bfloat16", 4096, residual=False, wdt="float32")
    bwd("fp32 affine", "bfloat16", 4096, ds=False, wdt="float32")
    split_rows = 32 * H100_SMS
    bwd(f"M={split_rows} add+affine", "float16", 1023, m=split_rows)
    bwd(f"M={split_rows} add+affine", "float16", 2048, m=split_rows)
    bwd(f"M={split_rows} add+affine", "float32", 8192, m=split_rows)


def scenario_fused_linear(mod, cap: Capture):
    """The matmul with each epilogue the ops use: linear_gelu forward (saving pre for training,
    or tanh GeLU for inference), the feed-forward's second linear (+ residual) and its backward
    dPre = (dY W2) * gelu'(pre) (B read as (K, N)), decode (M = 1); the TMA kernel for aligned
    fp16/bf16, the pointer kernel for fp32 (exact "ieee" dots) and for rows that are not 16-byte
    aligned (K = 1023); the elementwise GeLU backward. Every config of the TMA kernel (bf16
    training forward), its persistent candidates (M = 1024: past one wave of tiles) and the
    fp32 pointer tiles. Default configs must not spill, nor may any
    fp32 tile (that list is sized for it), nor the GeLU backward on contiguous inputs."""

    m, k, n = 256, 1024, 4096  # M = 256 keeps every row tile (pruning drops tiles above 2 M)
    for dt, configs in (("bfloat16", "all"), ("float16", "default")):
        with cap.launches("TMA fwd train: gelu, save pre", strict="default", configs=configs):
            mod.linear_act_fwd(_t(m, k, dtype=dt), _t(n, k, dtype=dt), _t(n, dtype=dt), "gelu",
                               True)
    # Past one wave of 128 x 128 tiles (8 x 32 > 132): the persistent candidates too.
    with cap.launches("TMA fwd train M=1024: gelu, save pre, persistent", strict="default",
                      configs="default+PERSISTENT"):
        mod.linear_act_fwd(_t(1024, k, dtype="bfloat16"), _t(n, k, dtype="bfloat16"),
                           _t(n, dtype="bfloat16"), "gelu", True)
    with cap.launches("TMA ffn bwd: dPre=(dY W2)*gelu'(pre)", strict="default",
                      configs="default"):
        mod.matmul_act_grad(_t(m, k, dtype="bfloat16"), _t(k, n, dtype="bfloat16"),
                            _t(m, n, dtype="bfloat16"), "gelu")
    with cap.launches("TMA fwd infer: gelu_tanh", strict="default", configs="default"):
        mod.linear_act_fwd(_t(m, k, dtype="float16"), _t(n, k, dtype="float16"),
                           _t(n, dtype="float16"), "gelu_tanh", False)
    with cap.launches("TMA ffn 2nd linear + residual", strict="default", configs="default"):
        mod.linear_fwd(_t(m, n, dtype="bfloat16"), _t(k, n, dtype="bfloat16"),
                       _t(k, dtype="bfloat16"), _t(m, k, dtype="bfloat16"))
    with cap.launches("TMA decode M=1", strict="default", configs="default"):
        mod.linear_act_fwd(_t(1, k, dtype="bfloat16"), _t(n, k, dtype="bfloat16"),
                           _t(n, dtype="bfloat16"), "gelu_tanh", False)
    # Decode (M <= 32): every config kept, the unsplit thin tiles and the split-K candidates.
    for rows, note in ((1, "gelu_tanh"), (32, "gelu, save pre")):
        with cap.launches(f"TMA decode M={rows} {note}, split-K", strict=True):
            mod.linear_act_fwd(_t(rows, k, dtype="bfloat16"), _t(n, k, dtype="bfloat16"),
                               _t(n, dtype="bfloat16"), "gelu_tanh" if rows == 1 else "gelu",
                               rows > 1)
    with cap.launches("TMA decode ffn 2nd linear + residual M=8, split-K", strict=True):
        mod.linear_fwd(_t(8, n, dtype="bfloat16"), _t(k, n, dtype="bfloat16"),
                       _t(k, dtype="bfloat16"), _t(8, k, dtype="bfloat16"))
    with cap.launches("ptr decode M=16 K=1023, save pre, split-K", strict="default"):
        mod.linear_act_fwd(_t(16, 1023, dtype="float16"), _t(n, 1023, dtype="float16"),
                           _t(n, dtype="float16"), "gelu", True)
    with cap.launches("ptr decode fp32 M=32, save pre, split-K", strict=True):
        mod.linear_act_fwd(_t(32, k, dtype="float32"), _t(n, k, dtype="float32"),
                           _t(n, dtype="float32"), "gelu", True)
    with cap.launches("ptr fwd K=1023 (rows not 16B aligned)", strict="default",
                      configs="default"):
        mod.linear_act_fwd(_t(m, 1023, dtype="float16"), _t(n, 1023, dtype="float16"),
                           _t(n, dtype="float16"), "gelu", True)
    with cap.launches("ptr fwd fp32 ieee, save pre", strict=True):
        mod.linear_act_fwd(_t(m, k, dtype="float32"), _t(n, k, dtype="float32"),
                           _t(n, dtype="float32"), "gelu", True)
    with cap.launches("ptr ffn bwd fp32", strict=True, configs="default"):
        mod.matmul_act_grad(_t(m, k, dtype="float32"), _t(k, n, dtype="float32"),
                            _t(m, n, dtype="float32"), "gelu_tanh")
    for dt in ("float16", "bfloat16", "float32"):
        with cap.launches("gelu bwd + db", strict=True):
            mod.act_bwd(_t(m, n, dtype=dt), _t(m, n, dtype=dt), "gelu", True)
    with cap.launches("relu fwd, save pre", strict="default", configs="default"):
        mod.linear_act_fwd(_t(m, k, dtype="bfloat16"), _t(n, k, dtype="bfloat16"),
                           _t(n, dtype="bfloat16"), "relu", True)
    with cap.launches("relu bwd + db", strict=True):
        mod.act_bwd(_t(m, n, dtype="bfloat16"), _t(m, n, dtype="bfloat16"), "relu", True)
    with cap.launches("gelu_tanh bwd + db", strict=True):
        mod.act_bwd(_t(m, n, dtype="bfloat16"), _t(m, n, dtype="bfloat16"), "gelu_tanh", True)
    with cap.launches("gelu bwd, stride-0 dY (y.sum()), no db"):
        mod.act_bwd(_t(1, 1, dtype="bfloat16").expand(m, n), _t(m, n, dtype="bfloat16"),
                    "gelu", False)
    scenario_swiglu(mod, cap, m, k, n)


def scenario_swiglu(mod, cap: Capture, m: int, k: int, n: int):
    """The GATED matmul of SwiGLU (two weights, two accumulators) and its backwards, beside the
    linear_gelu launches of the same kernels: the forward saving g and u (every config of the TMA
    kernel in bf16: the gated tile list is sized for two accumulators, so no config may spill) and
    for inference, decode (M = 1), rows that are not 16-byte aligned (pointer kernel), fp32
    (every gated fp32 tile, strict); the feed-forward backward dG, dU from dH = dY Wd (two outputs
    from one accumulator: every TMA config, strict); the elementwise backward with both db's."""
    def weights(dt, kk=k):
        return _t(n, kk, dtype=dt), _t(n, kk, dtype=dt), _t(n, dtype=dt), _t(n, dtype=dt)

    def fwd(note, dt, save, *, rows=m, kk=k, strict="default", configs="default"):
        with cap.launches(note, strict=strict, configs=configs):
            mod.linear_swiglu_fwd(_t(rows, kk, dtype=dt), *weights(dt, kk), save)

    fwd("TMA swiglu fwd train: save g, u", "bfloat16", True, strict=True, configs="all")
    fwd("TMA swiglu fwd train: save g, u", "float16", True)
    fwd("TMA swiglu fwd infer", "bfloat16", False)
    fwd("TMA swiglu decode M=1", "bfloat16", False, rows=1)
    fwd("TMA swiglu decode M=32, save g, u, split-K", "bfloat16", True, rows=32, strict=True,
        configs="all")
    fwd("ptr swiglu decode fp32 M=8, split-K", "float32", False, rows=8, strict=True,
        configs="all")
    fwd("ptr swiglu fwd K=1023 (rows not 16B aligned)", "float16", True, kk=1023, configs="all")
    fwd("ptr swiglu fwd fp32 ieee, save g, u", "float32", True, strict=True, configs="all")
    with cap.launches("ptr swiglu fwd, no biases, w_gate a (K, N) view beside a row-major w_up",
                      strict="default"):
        mod.linear_swiglu_fwd(_t(m, k, dtype="bfloat16"), _t(k, n, dtype="bfloat16").t(),
                              _t(n, k, dtype="bfloat16"), None, None, False)

    def ffn_bwd(note, dt, *, strict="default", configs="default"):
        with cap.launches(note, strict=strict, configs=configs):
            mod.matmul_swiglu_grad(_t(m, k, dtype=dt), _t(k, n, dtype=dt), _t(m, n, dtype=dt),
                                   _t(m, n, dtype=dt))

    ffn_bwd("TMA swiglu ffn bwd: dG, dU from dH = dY Wd", "bfloat16", strict=True, configs="all")
    ffn_bwd("ptr swiglu ffn bwd fp32", "float32", strict=True)
    with cap.launches("ptr swiglu ffn bwd fp32 M=8, split-K", strict=True):
        mod.matmul_swiglu_grad(_t(8, k, dtype="float32"), _t(k, n, dtype="float32"),
                               _t(8, n, dtype="float32"), _t(8, n, dtype="float32"))
    for dt in ("float16", "bfloat16", "float32"):
        with cap.launches("swiglu bwd + db_gate, db_up", strict=True):
            mod.swiglu_bwd(_t(m, n, dtype=dt), _t(m, n, dtype=dt), _t(m, n, dtype=dt), True)
    with cap.launches("swiglu bwd, stride-0 dH (h.sum()), no db"):
        mod.swiglu_bwd(_t(1, 1, dtype="bfloat16").expand(m, n), _t(m, n, dtype="bfloat16"),
                       _t(m, n, dtype="bfloat16"), False)


def _qkv(dt, d, *, b=2, hq=4, hkv=4, nq=256, nk=256):
    return _t(b, hq, nq, d, dtype=dt), _t(b, hkv, nk, d, dtype=dt), _t(b, hkv, nk, d, dtype=dt)


def scenario_attention(mod, cap: Capture):
    """Forward and the three backward kernels: every GPU config the head dim keeps for the main
    case (bf16, head dim 128, causal), pointer and TMA; the default config and the first TMA
    config for fp16, head dims 64, 96 and 80 (padded to a 128 block: the descriptors' zero fill),
    256, GQA, boolean and additive masks (size-1 dimensions broadcast through stride 0), dropout;
    the default for fp32 (exact "ieee" dots; no TMA configs). The forward's default config must
    not spill in fp16/bf16 at head dims up to 128 (the config list is ordered for that); the
    backward's spills, and those of other configs, are reported."""
    import torch

    from lightllm.kernels import _attention

    _attention.TMA_MIN_WORK = 0  # at the scenarios' small sizes too

    def run(note, dt, d, *, causal=False, mask=None, dropout=0.0, configs="defaults", bwd=True,
            **shape):
        q, k, v = _qkv(dt, d, **shape)
        seed = torch.tensor([1234]) if dropout else None  # the device tensor the op draws
        strict = "default" if dt != "float32" and d <= 128 else False
        with cap.launches(f"fwd {note}", configs=configs, strict=strict):
            out, lse = mod.attention_fwd(q, k, v, mask, d ** -0.5, causal, dropout, seed)
        if bwd:
            with cap.launches(f"bwd {note}", configs=configs):
                mod.attention_bwd(torch.randn_like(out), q, k, v, out, lse, mask, d ** -0.5,
                                  causal, dropout, seed)

    run("d128 causal", "bfloat16", 128, causal=True, configs="all")
    run("d64", "bfloat16", 64, bwd=False)
    run("d128 bool mask (B,1,Nq,Nk), dropout 0.1", "bfloat16", 128,
        mask=torch.rand(2, 1, 256, 256) > 0.3, dropout=0.1)
    run("d64 GQA 8:2, bool mask (B,1,Nq,Nk), dropout 0.1", "float16", 64, hq=8, hkv=2,
        mask=torch.rand(2, 1, 256, 256) > 0.3, dropout=0.1)
    run("d96 additive mask (B,1,1,Nk)", "bfloat16", 96, mask=_t(2, 1, 1, 256, dtype="bfloat16"))
    run("d80 causal", "float16", 80, causal=True, bwd=False)
    run("d256", "bfloat16", 256, bwd=False)
    run("d64 ieee", "float32", 64)
    # Variable-length batches and windows: the VARLEN / HAS_LEFT specialisations, default configs.
    cu = torch.tensor([0, 100, 356], dtype=torch.int32)
    for note, dt, causal, window in (("d128 varlen causal", "bfloat16", True, (-1, -1)),
                                     ("d128 varlen window (128, -1)", "float16", True, (128, -1))):
        q, k, v = (_t(356, 4, 128, dtype=dt) for _ in range(3))
        with cap.launches(f"fwd {note}", configs="default"):
            out, lse = mod.varlen_fwd(q, k, v, cu, cu, 256, 256, 128 ** -0.5, causal, window,
                                      0.0, None)
        with cap.launches(f"bwd {note}", configs="default"):
            mod.varlen_bwd(torch.randn_like(out), q, k, v, out, lse, cu, cu, 256, 256,
                           128 ** -0.5, causal, window, 0.0, None)
    q, k, v = _qkv("bfloat16", 128)
    with cap.launches("fwd d128 sdpa window (256, 0)", configs="default"):
        mod.attention_fwd(q, k, v, None, 128 ** -0.5, False, 0.0, None, window=(256, 0))
    with cap.launches("dropout keep-mask (tests' helper)", strict=True):
        mod.dropout_keep_mask(2, 4, 256, 256, 0.1, 1234, "cpu")


def scenario_attention_decode(mod, cap: Capture):
    """Split-KV decode over 4096 cached keys: every config that fits for bf16 head dim 128 with
    GQA 8:1 and one query token (a 16-row query block: mma.sync) and with 8 tokens (speculative
    decoding: the group fills a 64-row block, wgmma); the default for fp16 head dim 64 with several
    tokens and a key-padding mask, and for fp32; the combine kernel for each output dtype.
    fp16/bf16 defaults must not spill."""
    import torch

    for note, dt, d, nq, hq, hkv, key_mask, configs in (
        ("d128 GQA 8:1 Nq=1", "bfloat16", 128, 1, 8, 1, False, "all"),
        ("d64 Nq=4 bool key mask (B,1,1,Nk)", "float16", 64, 4, 4, 4, True, "default"),
        ("d128 Nq=1 ieee", "float32", 128, 1, 4, 4, False, "default"),
        ("d128 GQA 8:1 Nq=8 (BLOCK_M=64)", "bfloat16", 128, 8, 8, 1, False, "all"),
    ):
        q, k, v = _qkv(dt, d, hq=hq, hkv=hkv, nq=nq, nk=4096)
        mask = torch.rand(2, 1, 1, 4096) > 0.1 if key_mask else None
        with cap.launches(note, configs=configs, strict="default" if dt != "float32" else False):
            mod.attention_decode_fwd(q, k, v, mask, d ** -0.5)


def scenario_attention_kvcache(mod, cap: Capture):
    """KV-cache attention over pages of 16 (keys gathered per row through the block table): the
    bf16 decode step of GQA 8:1 at head dim 128 with new keys appended and split-KV, every config;
    the fp32 chunk of 64 new tokens of SmolLM2's heads (9:3, d64) over a dense cache with a local
    window, one chunk (the output written directly), the default. The defaults must not spill."""
    import torch

    for note, dt, d, sq, hq, hkv, paged, window, configs in (
        ("decode d128 GQA 8:1 pages of 16, append, split", "bfloat16", 128, 1, 8, 1, True,
         -1, "all"),
        ("chunk of 64 d64 GQA 9:3 dense, window 32, one chunk", "float32", 64, 64, 9, 3, False,
         32, "default"),
    ):
        b, cap_len = 2, 4096
        q = _t(b, sq, hq, d, dtype=dt)
        new = _t(b, sq, hkv, d, dtype=dt)
        if paged:
            caches = _t(b * cap_len // 16, 16, hkv, d, dtype=dt), _t(b * cap_len // 16, 16, hkv,
                                                                      d, dtype=dt)
            table = torch.arange(b * cap_len // 16, dtype=torch.int32).view(b, -1)
        else:
            caches, table = (_t(b, 256, hkv, d, dtype=dt), _t(b, 256, hkv, d, dtype=dt)), None
        seqlens = torch.tensor([100, 177], dtype=torch.int32)
        with cap.launches(note, configs=configs, strict="default" if dt != "float32" else False):
            mod.attention_kvcache_fwd(q, *caches, new, new, seqlens, 0, table, d ** -0.5,
                                      window, 0, num_splits=None if paged else 1)


def scenario_rotary(mod, cap: Capture):
    """q and k of one launch: bf16 Llama-8B sizes (32 : 8 heads, head dim 128, per-row tables)
    forward and inverse (the backward), fp16 (B, S, H, D) views of a fused qkv with a partial
    rotary dim (40 of 80: the pass-through copy) and batch-1 tables, the fp32 decode step of
    SmolLM2 (9 : 3 heads, head dim 64), the in-place form, head dim 256 (the widest half-tile).
    Nothing may spill."""

    def run(note, dt, b, s, hq, hk, d, r, *, heads_dim=1, table_batch=None, inverse=False,
            in_place=False):
        qkv = _t(b, s, (hq + 2 * hk) * d, dtype=dt)
        q = qkv[..., : hq * d].view(b, s, hq, d)
        k = qkv[..., hq * d: (hq + hk) * d].view(b, s, hk, d)
        if heads_dim == 1:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = _t(table_batch or b, s, r, dtype=dt), _t(table_batch or b, s, r, dtype=dt)
        with cap.launches(note, strict=True):
            mod.rotary_fwd(q, k, cos, sin, heads_dim, inverse, (q, k) if in_place else None)

    run("fwd d128 GQA 32:8", "bfloat16", 4, 128, 32, 8, 128, 128)
    run("bwd (inverse) d128 GQA 32:8", "bfloat16", 4, 128, 32, 8, 128, 128, inverse=True)
    run("fwd (B,S,H,D) d80 R=40, tables (1,S,R)", "float16", 2, 64, 16, 4, 80, 40,
        heads_dim=2, table_batch=1)
    run("decode d64 GQA 9:3", "float32", 8, 1, 9, 3, 64, 64)
    run("decode in place d128 GQA 32:8", "bfloat16", 8, 1, 32, 8, 128, 128, in_place=True)
    run("fwd d256", "bfloat16", 2, 64, 8, 2, 256, 256)


SCENARIOS = {
    "attention": scenario_attention,
    "attention_decode": scenario_attention_decode,
    "attention_kvcache": scenario_attention_kvcache,
    "norm": scenario_norm,
    "fused_linear": scenario_fused_linear,
    "rotary": scenario_rotary,
}


# ------------------------------------------------------------------------------------------------
# Compiling and reading ptxas' report
# ------------------------------------------------------------------------------------------------

_JOBS: list[Job] = []  # read by the forked workers
_REGS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile(index: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[index]
    rec = {"regs": None, "spill_stores": None, "spill_loads": None, "stack": None, "smem": None,
           "ctas": None, "mma": None, "loads": None, "error": None}
    start = time.perf_counter()
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(job.fn, job.signature, job.constexprs, job.attrs),
                                    target=GPUTarget("cuda", ARCH, 32),
                                    options=job.options.__dict__)
        ptx = kernel.asm["ptx"]
        report = log.getvalue()
        if not _REGS.search(report):  # served from a cache: ptxas did not run, ask it directly
            report = _ptxas_report(ptx)
        regs, frame = _REGS.search(report), _FRAME.search(report)
        rec.update(smem=kernel.metadata.shared,
                   mma="wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-",
                   loads=("tma" if "cp.async.bulk.tensor" in ptx
                          else "cp.async" if "cp.async" in ptx else "-")
                   # warp specialization: producer and consumer warp groups rebalance registers
                   + ("+ws" if "setmaxnreg" in ptx else ""))
        if regs and frame:
            rec.update(regs=int(regs.group(1)), stack=int(frame.group(1)),
                       spill_stores=int(frame.group(2)), spill_loads=int(frame.group(3)))
            rec["ctas"] = ctas_per_sm(rec["regs"], rec["smem"], kernel.metadata.num_warps)
        else:
            rec["error"] = "no register/spill figures in ptxas' report:\n" + report[-2000:]
    except Exception as e:  # every failure is reported with its text
        text = f"{type(e).__name__}: {e}"
        rec["error"] = text if len(text) < 6000 else text[:3000] + "\n...\n" + text[-3000:]
    rec["seconds"] = round(time.perf_counter() - start, 2)
    return rec


def ctas_per_sm(regs: int, smem: int, warps: int) -> int:
    """Programs of a kernel resident at once on one sm_90 SM: its 64K registers (allocated per
    warp in units of 256, i.e. a thread's count rounded up to 8), 228 KiB of shared memory (1 KiB
    of it reserved per program), 64 warps and 32 programs."""
    per_warp = -(-regs // 8) * 8 * 32
    by_regs = (64 * 1024 // per_warp) // warps
    by_smem = 228 * 1024 // (smem + 1024)
    return min(by_regs, by_smem, 64 // warps, 32)


def _ptxas_report(ptx: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        out = subprocess.run([ptxas_path(), f"--gpu-name=sm_{ARCH}a", "-v", "-lineinfo",
                              "--regAllocOptLevel=2", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    return out.stdout + out.stderr


# ------------------------------------------------------------------------------------------------
# Describing jobs
# ------------------------------------------------------------------------------------------------


def _dtype_of(signature: dict) -> str:
    """The data's dtype: the first floating tensor argument's that is not fp32 (fp32 statistics
    and scratch sit beside half-precision data), else fp32, else the first (integer counters and
    masks are never the data when a float tensor is there)."""
    found = []
    for ty in signature.values():
        m = re.match(r"\*(\w+)$|tensordesc<(\w+)\[", ty)
        if m:
            found.append(m.group(1) or m.group(2))
    floats = [t for t in found if t.startswith(("fp", "bf"))]
    return next((t for t in floats if t != "fp32"), "fp32" if floats else
                (found[0] if found else "-"))


def _describe(job: Job) -> tuple[str, str]:
    """(tile, flags): block sizes, warps/stages and descriptor boxes; the declared constexprs
    other than block sizes (True flags by name, other values as NAME=value, False omitted)."""
    names = [p.name for p in job.fn.params]
    declared = {p.name for p in job.fn.params if p.is_constexpr}
    tile, flags = [], []
    for path, value in sorted(job.constexprs.items()):
        name = names[path[0]]
        if name not in declared:
            continue  # an int specialised to 1 (a unit stride): part of the signature, not a flag
        if name.startswith("BLOCK") or name == "GROUP_M":
            tile.append(f"{name.removeprefix('BLOCK_')}={value}")
        elif value is True:
            flags.append(name)
        elif value is not False and value is not None:
            flags.append(f"{name}={value}")
    tile.append(f"w{job.options.num_warps}s{job.options.num_stages}")
    if "USE_TMA" in declared and "USE_TMA" not in flags:
        return " ".join(tile), " ".join(flags)  # descriptors passed to a pointer config: unused
    tile += [f"{n}:{t[len('tensordesc<'):-1].replace(' ', '')}"
             for n, t in job.signature.items() if t.startswith("tensordesc")]
    return " ".join(tile), " ".join(flags)


def _key(job: Job):
    return (job.module, job.kernel, tuple(sorted(job.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in job.constexprs.items())),
            repr(sorted(job.attrs.items())), repr(job.options))


def _python_fn(obj):
    while not inspect.isfunction(obj):
        obj = obj.fn
    return obj


def _dot_kernels(mod) -> set[str]:
    """Module-level jit functions that call ``tl.dot``, directly or through jit helpers."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    sources = {name: inspect.getsource(_python_fn(obj)) for name, obj in vars(mod).items()
               if isinstance(obj, (JITFunction, Autotuner))}

    def uses_dot(name, seen):
        src = sources[name]
        return "tl.dot(" in src or any(
            h not in seen and re.search(rf"\b{h}\(", src) and uses_dot(h, seen | {h})
            for h in sources)

    return {name for name in sources if uses_dot(name, {name})}


def kernels_of(mod) -> list[str]:
    """The launched kernels of a module: module-level jit/autotuned functions written ``name[``
    (launched with a grid) in its source; jit helpers called from kernels are not launched."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    source = Path(mod.__file__).read_text()
    return [name for name, obj in vars(mod).items()
            if isinstance(obj, (JITFunction, Autotuner)) and re.search(rf"\b{name}\[", source)]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def collect(files: list[str]):
    """Run the scenarios of ``files`` under capture. Returns the distinct jobs, the launched
    kernels of each module, the kernels that use tl.dot, and the errors of scenarios that could
    not run."""
    cap = Capture()
    pretend_h100()
    kernels, dots, errors = {}, set(), []
    for f in files:
        name = Path(f).stem
        try:
            mod = importlib.import_module(f"lightllm.kernels.{name}")
        except Exception:
            errors.append(f"{name}: import failed\n{traceback.format_exc()}")
            continue
        kernels[name] = kernels_of(mod)
        dots |= {(name, k) for k in _dot_kernels(mod)}
        scenario = SCENARIOS.get(name)
        if scenario is None:
            errors.append(f"{name}: no scenario in tests/sm90_compile.py launches {kernels[name]}")
            continue
        cap.module = name
        try:
            with capturing(cap):
                scenario(mod, cap)
        except Exception:
            errors.append(f"{name}: scenario failed\n{traceback.format_exc()}")
    unique: dict = {}
    for job in cap.jobs:
        seen = unique.setdefault(_key(job), job)
        seen.strict |= job.strict  # the same compilation from two launches: stricter wins
    return list(unique.values()), kernels, dots, errors


def violations(rec: dict) -> list[str]:
    if rec["error"]:
        return ["COMPILE ERROR"]
    out = []
    if rec["strict"] and rec["spill_stores"]:
        out.append("SPILLS")
    if rec["tensor_cores"] and rec["mma"] not in ("wgmma", "mma"):
        out.append("NO TENSOR CORES")
    return out


def run(files: list[str], jobs: int, only: str | None = None) -> dict:
    cache = tempfile.mkdtemp(prefix="sm90_compile_")
    # A private cache: every kernel really goes through ptxas, and its time is a compile time.
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        found, kernels, dots, errors = collect(files)
        if only:  # a quick look at some specializations (coverage is not checked then)
            found = [j for j in found if re.search(only, " ".join((j.kernel, *_describe(j))))]
            kernels = {}
        _JOBS[:] = found
        # Matmuls first: the long compiles start early and the pool ends evenly.
        order = sorted(range(len(found)), key=lambda i: (found[i].module, found[i].kernel) not in dots)
        results: dict[int, dict] = {}
        if jobs > 1 and len(found) > 1:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                results = dict(zip(order, pool.imap(_compile, order, chunksize=1)))
        else:
            results = {i: _compile(i) for i in order}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    records = []
    for i, job in enumerate(found):
        tile, flags = _describe(job)
        dtype = _dtype_of(job.signature)
        rec = {"module": job.module, "kernel": job.kernel, "dtype": dtype, "tile": tile,
               "config": job.config, "flags": flags, "note": job.note, "strict": job.strict,
               "tensor_cores": (job.module, job.kernel) in dots and dtype in HALF, **results[i]}
        rec["violations"] = violations(rec)
        records.append(rec)
    covered = {(r["module"], r["kernel"]) for r in records}
    uncovered = [f"{m}.{k}" for m, ks in kernels.items() for k in ks if (m, k) not in covered]
    return {"records": records, "kernels": kernels, "uncovered": uncovered, "errors": errors,
            "dot_kernels": sorted(f"{m}.{k}" for m, k in dots if k in kernels.get(m, ()))}


def print_report(result: dict, seconds: float, jobs: int) -> None:
    records = result["records"]
    cols = [("kernel", "kernel"), ("dtype", "dtype"), ("tile", "tile"), ("config", "cfg"),
            ("flags", "flags"), ("regs", "regs"), ("spill_stores", "spill"), ("mma", "mma"),
            ("loads", "loads"), ("smem", "smem"), ("ctas", "ctas/SM"), ("seconds", "sec"),
            ("note", "launch")]
    rows = [[h for _, h in cols]]
    for r in records:
        row = ["" if r[k] is None else str(r[k]) for k, _ in cols]
        if r["violations"]:
            row[-1] += "  <-- " + ", ".join(r["violations"])
        elif r["spill_stores"]:
            row[-1] += "  (spills: reported, not a failure)"
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(cols) - 1)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[-1])
    for e in result["errors"]:
        print(f"\nSCENARIO ERROR {e}")
    for u in result["uncovered"]:
        print(f"\nUNCOVERED kernel {u}: no scenario launch reaches it")
    for r in records:
        if r["error"]:
            print(f"\nCOMPILE ERROR {r['kernel']} {r['dtype']} {r['tile']} [{r['flags']}] "
                  f"({r['note']}):\n{r['error']}")
    bad = sum(1 for r in records if r["violations"])
    spilled = sum(1 for r in records if r["spill_stores"])
    kernels = len({(r["module"], r["kernel"]) for r in records})
    print(f"\n{len(records)} specializations of {kernels} kernels compiled for sm_{ARCH}a in "
          f"{seconds:.0f}s ({jobs} processes): {bad} violations, {spilled} spilling, "
          f"{len(result['uncovered'])} uncovered kernels, {len(result['errors'])} scenario errors")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="kernel files (default: kernels/*.py)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compiling processes (default 2)")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--only", metavar="REGEX",
                        help="compile only the specializations whose kernel, tile or flags match")
    args = parser.parse_args(argv)
    reason = toolchain_missing()
    if reason:
        print(f"cannot compile for sm_{ARCH}: {reason}")
        return SKIP
    files = args.files or sorted(str(p) for p in (ROOT / "kernels").glob("*.py")
                                 if not p.name.startswith("_"))
    start = time.perf_counter()
    result = run(files, args.jobs, args.only)
    print_report(result, time.perf_counter() - start, args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    failed = any(r["violations"] for r in result["records"])
    return 1 if failed or result["uncovered"] or result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
