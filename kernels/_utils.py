"""Helpers every kernel module shares: interpreter detection, autotune config lists, launch sizes.

The Triton kernels and their thin launchers form the package ``lightllm.kernels``; they import
nothing of lightllm, do no validation and own no autograd (``lightllm.ops`` does). The folder is
no package of its own: it has no ``__init__.py``, so a top-level ``import kernels`` always finds an
installed package of that name first (Hugging Face's ``kernels``, which transformers imports), and
``lightllm/kernels`` is a link to it (docs/design.md, "Layout").
"""

from __future__ import annotations

import os

if __package__ != "lightllm.kernels":
    # Reached only as the namespace portion a checkout's root offers when no package named
    # `kernels` is installed: these sources are lightllm's, under lightllm's name alone.
    raise ImportError(f"lightllm's Triton kernels import as lightllm.kernels, not as {__package__!r}")

import torch
import triton

# Read when kernels are defined: Triton decides then whether @triton.jit functions are interpreted.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """False when ``LIGHTLLM_AUTOTUNE=0``: each autotuned kernel then takes the first config its
    pruning keeps, without timing. Read at each new tuning key, so a test session can set it (a
    suite that meets a new key at every case would otherwise compile and time every config)."""
    return os.environ.get("LIGHTLLM_AUTOTUNE", "1") != "0"


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over: all on a GPU, the first alone under the interpreter.

    Triton's interpreter cannot time configs (it fails with "0 active drivers" for more than one),
    so the first entry of every list must be a sound default.
    """
    return configs[:1] if INTERPRET else configs


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune`` that honours ``LIGHTLLM_AUTOTUNE=0`` on every Triton version.

    With tuning off, the first config the pruning keeps runs untimed. Pruning to one config is
    not enough on triton 3.6: its ``Autotuner.run`` compiles and times whatever is left, even a
    single config (3.8 skips the timing then), which costs a test suite that meets a new tuning
    key at every case a compilation and a benchmark each. So the wrapper truncates the pruned list
    itself and answers the timing of a lone config without running it.
    """

    def decorate(fn):
        tuner = triton.autotune(configs=configs, key=key, **kwargs)(fn)
        prune, bench = tuner.prune_configs, tuner._bench
        kept = [len(configs)]

        def prune_configs(meta):
            configs = prune(meta)
            configs = configs if autotune_enabled() else configs[:1]
            kept[0] = len(configs)
            return configs

        def timed(*args, config, **meta):
            # Nothing to choose between: no compile-and-time (the winner runs right after).
            return [0.0, 0.0, 0.0] if kept[0] == 1 else bench(*args, config=config, **meta)

        tuner.prune_configs, tuner._bench = prune_configs, timed
        return tuner

    return decorate


# Host arithmetic is plain integer work: ``triton.cdiv`` and ``triton.next_power_of_2`` go through
# Triton's constexpr-function machinery, about 3 µs a call on the host path.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def row_block(n: int, max_block: int) -> int:
    """Power-of-two block covering a row of ``n`` elements, capped at ``max_block``."""
    return min(next_pow2(n), max_block)


def warps_for_block(block: int) -> int:
    """Warps for a row-wise kernel holding ``block`` elements: about 8 elements per thread."""
    return max(1, min(16, block // 256))


# Tests set LIGHTLLM_POISON_OUTPUTS=1 so every output buffer starts as NaN: an element a kernel
# forgets to write then fails the parity check instead of passing on leftover memory.
POISON_OUTPUTS = os.environ.get("LIGHTLLM_POISON_OUTPUTS", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs (NaN-filled when poisoning is on)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like`` for kernel outputs: dense, with the dimensions of ``t`` in its stride
    order, so a gradient comes out in its input's layout (the backward of the view that made the
    input then needs no copy); NaN-filled when poisoning is on."""
    out = torch.empty_like(t)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out
