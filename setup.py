"""Build script: the Python package plus the C++/CUDA extension ``lightllm._C``.

Metadata lives in pyproject.toml; this file only decides how to build the extension.

Switches (environment variables):
  LIGHTLLM_SKIP_CUDA=1   build the extension with its C++ (CPU) sources only.
  LIGHTLLM_SKIP_EXT=1    build no extension at all (the package falls back to the reference).
  TORCH_CUDA_ARCH_LIST   target architectures; defaults to "8.0;9.0" when no GPU is visible.
  CUDA_HOME              toolkit root; found from nvcc when unset or wrong.
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _has_cudart(root):
    return bool(root) and bool(glob.glob(os.path.join(root, "lib64", "libcudart.so*")) or
                               glob.glob(os.path.join(root, "lib", "x64", "cudart*")))


def _find_cuda_home():
    """Return the real toolkit root (the folder whose lib64 holds libcudart), or None.

    ``nvcc`` on the PATH may be a wrapper script outside the toolkit, so its parent folder is only
    one candidate among the usual install locations.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # A wrapper script names the real nvcc inside it.
        try:
            with open(nvcc, errors="ignore") as f:
                for token in f.read().split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if _has_cudart(root) and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _extensions():
    if os.environ.get("LIGHTLLM_SKIP_EXT") == "1":
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    if not cpp_sources:
        return [], {}

    import torch

    build_cuda = bool(cu_sources) and torch.version.cuda is not None
    build_cuda = build_cuda and os.environ.get("LIGHTLLM_SKIP_CUDA") != "1"
    if build_cuda:
        cuda_home = _find_cuda_home()
        if cuda_home is None:
            print("lightllm: no CUDA toolkit found; building the CPU extension only")
            build_cuda = False
        else:
            # cpp_extension reads CUDA_HOME when it is imported, so set it first.
            os.environ["CUDA_HOME"] = cuda_home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    from torch.utils import cpp_extension

    # No -std flag: cpp_extension adds the standard torch's headers need (C++20 since torch 2.10;
    # forcing c++17 breaks the build with "C++20 or later compatible compiler is required").
    # -fopenmp: at::parallel_for (ATen/Parallel.h, inlined into our CPU kernels) runs its chunks in
    # parallel only when the extension itself is built with OpenMP; without it every CPU kernel
    # runs on one thread. The runtime is torch's own libgomp (same soname), already loaded.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if build_cuda:
        ext = cpp_extension.CUDAExtension(
            "lightllm._C",
            cpp_sources + cu_sources,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
            },
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "lightllm._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    print(f"lightllm: building lightllm._C ({'CUDA + CPU' if build_cuda else 'CPU only'})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    # lightllm.kernels is the link lightllm/kernels -> ../kernels (a namespace package: kernels/ has
    # no __init__.py, so it never shadows an installed top-level `kernels`); wheels and sdists hold
    # the files themselves. docs/design.md, "Layout", says why.
    packages=["lightllm", "lightllm.ops", "lightllm.nn", "lightllm.reference",
              "lightllm.integrations", "lightllm.integrations.kernel_repository", "lightllm.models",
              "lightllm.kernels"],
    # The local layer repository of Hugging Face's kernels package (lightllm.integrations.kernel_hub).
    package_data={"lightllm.integrations.kernel_repository": ["metadata.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
