"""The peer libraries the benchmarks compare against, when they are installed.

Liger-Kernel (``liger-kernel``: LayerNorm, RMSNorm, SwiGLU / GeGLU, rotary, softmax), FlashAttention
(``flash-attn``) and xformers. Each is a Triton or CUDA library, so it runs only on an NVIDIA GPU. A
peer that is missing, or that cannot run on this machine, still appears in every case it would
serve, as an :class:`~benchmarks.harness.Unavailable` provider ("not installed" or "needs CUDA"):
the results say why a column is empty instead of dropping it.

Each ``*_providers`` function returns ``{provider name: callable or Unavailable}`` with the calling
convention of the bench file that uses it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F

from benchmarks.harness import HAS_CUDA, Unavailable

# provider name -> (distribution on PyPI, import name)
PEERS = {"liger": ("liger-kernel", "liger_kernel"), "flash-attn": ("flash-attn", "flash_attn"),
         "xformers": ("xformers", "xformers")}


def version(provider: str) -> str | None:
    distribution, module = PEERS[provider]
    try:
        importlib.import_module(module)
    except Exception:  # missing, or installed but broken (a wheel for another torch)
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def status() -> dict[str, dict[str, Any]]:
    """Every peer: installed version (or None) and whether it runs on this machine."""
    out = {}
    for provider, (distribution, _) in PEERS.items():
        v = version(provider)
        out[provider] = {"distribution": distribution, "version": v,
                         "runs_here": v is not None and HAS_CUDA,
                         "status": "not installed" if v is None else
                         ("ok" if HAS_CUDA else "needs CUDA")}
    return out


def _available(provider: str) -> Unavailable | None:
    if version(provider) is None:
        return Unavailable("not installed")
    if not HAS_CUDA:
        return Unavailable("needs CUDA")
    return None


def _peer(provider: str, make: Callable[[], Callable[..., Any]]) -> dict[str, Any]:
    missing = _available(provider)
    return {provider: missing if missing is not None else make()}


def layer_norm_providers(residual: bool) -> dict[str, Any]:
    """Liger's LayerNorm; the residual add stays a separate PyTorch op (Liger has no fused form)."""

    def make():
        from liger_kernel.transformers.functional import liger_layer_norm

        if residual:
            def call(x, r, w, b):
                s = x + r
                return liger_layer_norm(s, w, b, 1e-5), s
            return call
        return lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)

    return _peer("liger", make)


def rms_norm_providers(residual: bool, eps: float) -> dict[str, Any]:
    """Liger's RMSNorm in its Llama casting mode, out of place (the benchmark reuses inputs)."""

    def make():
        from liger_kernel.transformers.functional import liger_rms_norm

        def norm(x, w):
            return liger_rms_norm(x, w, eps, casting_mode="llama", in_place=False)

        if residual:
            def call(x, r, w):
                s = x + r
                return norm(s, w), s
            return call
        return norm

    return _peer("liger", make)


def swiglu_providers(feed_forward: bool) -> dict[str, Any]:
    """Liger's SiLU-and-multiply after PyTorch's matmuls (Liger fuses the activation, not the
    matmul): ``(x, w_gate, w_up)`` or, as a feed-forward, ``(x, w_gate, w_up, w_down, residual)``."""

    def make():
        from liger_kernel.transformers.functional import liger_swiglu

        if feed_forward:
            return lambda x, wg, wu, wd, r: F.linear(liger_swiglu(F.linear(x, wg), F.linear(x, wu)),
                                                     wd) + r
        return lambda x, wg, wu: liger_swiglu(F.linear(x, wg), F.linear(x, wu))

    return _peer("liger", make)


def softmax_providers() -> dict[str, Any]:
    def make():
        try:
            from liger_kernel.ops.softmax import LigerSoftmaxFunction
        except ImportError:  # older Liger releases have no softmax
            return Unavailable("not in this liger-kernel release")
        return lambda x: LigerSoftmaxFunction.apply(x)

    return _peer("liger", make)


def rotary_providers() -> dict[str, Any]:
    """Liger's rotary embedding: ``(q, k, cos, sin)`` with cos/sin of shape (B or 1, S, D)."""

    def make():
        from liger_kernel.transformers.functional import liger_rope

        return lambda q, k, cos, sin: liger_rope(q, k, cos, sin)

    return _peer("liger", make)


def attention_providers(causal: bool) -> dict[str, Any]:
    """FlashAttention 2 and xformers on (B, H, N, D) inputs (both take (B, N, H, D); both do
    grouped-query attention natively)."""

    def flash():
        from flash_attn import flash_attn_func

        def call(q, k, v):
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  causal=causal)
            return out.transpose(1, 2)
        return call

    def xformers():
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None

        def call(q, k, v):
            h, h_kv = q.shape[1], k.shape[1]
            q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
            if h != h_kv:  # xformers' grouped form: (B, N, G, H/G, D)
                b, n, _, d = q_.shape
                q_ = q_.reshape(b, n, h_kv, h // h_kv, d)
                k_ = k_.unsqueeze(3).expand(-1, -1, -1, h // h_kv, -1)
                v_ = v_.unsqueeze(3).expand(-1, -1, -1, h // h_kv, -1)
                return xops.memory_efficient_attention(q_, k_, v_, attn_bias=bias).reshape(
                    b, n, h, d).transpose(1, 2)
            return xops.memory_efficient_attention(q_, k_, v_, attn_bias=bias).transpose(1, 2)
        return call

    return {**_peer("flash-attn", flash), **_peer("xformers", xformers)}

