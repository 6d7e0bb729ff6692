"""``python -m lightllm.env``: what this process would run on.

Prints the versions of Python, torch, triton and CUDA, the GPU, whether the extension
``lightllm._C`` is built (and for which devices), the active dispatch path, and every installed
package's version beside the one a checkout's ``constraints.txt`` pins (the versions ``make test``
installs), naming those that differ.
"""

from __future__ import annotations

import platform
import re
from importlib import metadata
from pathlib import Path

# In a checkout (and an editable install) the constraints sit beside the package folder.
CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints.txt"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.split(";", 1)[0].strip()
    return pins


def installed_versions() -> dict[str, str]:
    """``{canonical name: version}`` of every distribution this interpreter sees."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist.version)
    return found


def compare_with_constraints(pins: dict[str, str], installed: dict[str, str]):
    """Rows ``(name, installed or None, pinned or None)``, sorted by name, and the names whose
    installed version is not the pinned one (a pinned package that is missing differs too)."""
    rows = [(name, installed.get(name), pins.get(name)) for name in sorted(set(pins) | set(installed))]
    differ = [name for name, have, want in rows if want is not None and not _same(have, want)]
    return rows, differ


def _same(have: str | None, want: str) -> bool:
    """pip's rule for ``==``: a pin without a local label (``+cu130``) matches any label."""
    return have is not None and (have == want or ("+" not in want and have.split("+")[0] == want))


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


def main() -> None:
    for key, value in report().items():
        print(f"{key:>12}: {value}")
    installed = installed_versions()
    if not CONSTRAINTS.is_file():
        print(f"\npackages (no constraints file at {CONSTRAINTS}: not a checkout):")
        for name, version in sorted(installed.items()):
            print(f"  {name:<28} {version}")
        return
    rows, differ = compare_with_constraints(pinned_versions(), installed)
    print(f"\npackages against {CONSTRAINTS.name} ({len(differ)} differ):")
    for name, have, want in rows:
        note = "" if want is None or _same(have, want) else f"   differs: pinned {want}"
        print(f"  {name:<28} {have or 'not installed'}{note}")
    if differ:
        print(f"differ from the constraints: {', '.join(differ)}")


if __name__ == "__main__":
    main()
