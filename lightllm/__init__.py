"""lightllm: fused Triton and CUDA kernels for the transformer's hot paths.

Use it three ways: ``lightllm.functional`` (the ops, with the semantics of their PyTorch twins),
``lightllm.nn`` (drop-in modules with the state dicts of their ``torch.nn`` twins) and
``lightllm.patch(model)`` (swap supported submodules of an existing model in place).
"""

from . import functional, nn  # noqa: F401
from .patch import PatchReport, patch, unpatch  # noqa: F401

__version__ = "0.1.0"
