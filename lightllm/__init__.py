"""lightllm: fused Triton and CUDA kernels for the transformer's hot paths.

Use it three ways: ``lightllm.functional`` (the ops, with the semantics of their PyTorch twins),
``lightllm.nn`` (drop-in modules with the state dicts of their ``torch.nn`` twins) and
``lightllm.patch(model)`` (swap supported parts of an existing PyTorch or Hugging Face model in
place). With transformers installed, ``attn_implementation="lightllm"`` selects lightllm's attention
in any model that uses transformers' attention interface.
"""

from . import functional, integrations, nn  # noqa: F401
from .patch import PatchReport, patch, unpatch  # noqa: F401

integrations.install()

__version__ = "0.1.0"
