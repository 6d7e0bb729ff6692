"""``python -m lightllm.env``: what this process would run on.

Prints the versions of Python, torch, triton and CUDA, the GPU, whether the extension
``lightllm._C`` is built (and for which devices), and the active dispatch path.
"""

from __future__ import annotations

import platform


def report() -> dict[str, str]:
    import torch

    from lightllm import _dispatch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        from lightllm import _C  # noqa: F401

        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
        cuda_kernels = has_kernel("lightllm::softmax_fwd", "CUDA")
        ext = f"built ({'CPU + CUDA' if cuda_kernels else 'CPU only'})"
    except ImportError as e:
        ext = f"not built ({e})"
    gpu = "none"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = (f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
               f"{p.multi_processor_count} SMs")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
        "triton": triton_version,
        "GPU": gpu,
        "lightllm._C": ext,
        "dispatch": _dispatch.describe(),
    }


if __name__ == "__main__":
    for key, value in report().items():
        print(f"{key:>12}: {value}")
