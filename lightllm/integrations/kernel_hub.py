"""lightllm through transformers' own kernel mechanism (Hugging Face's ``kernels`` package).

transformers marks the layers a kernel repository may replace: ``@use_kernel_forward_from_hub``
on a module class (``"RMSNorm"``: LlamaRMSNorm and, in transformers 5.25, 132 copies of it) or on
a function that ``@use_kernelized_func`` attaches to the modules calling it (``"rotary_pos_emb"``:
118 ``apply_rotary_pos_emb``, 111 of them Llama's). ``kernels.kernelize`` then gives each marked
module the ``forward`` of a layer class loaded from a repository: a class with no ``__init__`` and
no members of its own, whose ``forward`` uses the module's attributes. The layer classes are here:

  RMSNorm         RMSNorm       the forward ``lightllm.patch`` gives the module (LlamaRMSNorm's
                                casting order: ``rms_norm(..., cast_before_weight=True)``)
  rotary_pos_emb  RotaryPosEmb  ``lightllm.functional.rotary_embedding`` for Llama's function
Each falls back to the module's own forward wherever lightllm would not compute exactly what it
does: a module ``lightllm.patch`` leaves alone, a rotary function or ``rotate_half`` that is not
Llama's statement for statement (gpt_oss rotates with half-width tables, ModernBERT in float32),
a call with other shapes or mixed dtypes. Llama's MLP carries no mark (lightllm.patch fuses it),
and the ``"SiLU"`` activation alone has no lightllm kernel (lightllm fuses SiLU into its matmuls).

The repository is :data:`REPOSITORY`, a folder of this package: ``metadata.json`` and an
``__init__.py`` whose ``layers`` is this module. Nothing is downloaded, generated or copied.

transformers' own entry points cannot take it on the CPU: ``KernelConfig``'s validation and
conversion accept only ``KERNELS_SUPPORTED_DEVICE_TYPES``, which has no ``"cpu"``, although the
``kernels`` package runs CPU layers. :func:`kernel_config` is therefore already in the ``kernels``
package's form, which ``transformers.kernelize`` passes on unvalidated, and :func:`enable` makes it
the model's ``kernel_config``, where transformers' re-kernelization (``model.train()``,
``model.eval()``) finds it again::

    model = AutoModelForCausalLM.from_pretrained(path)
    kernel_hub.enable(model)         # lightllm's RMSNorm and rotary embedding, CPU or CUDA
    model.use_kernels = False        # every marked layer back on its own forward
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from kernels import LocalLayerRepository, Mode
from torch import Tensor, nn
from transformers import KernelConfig, PreTrainedModel

from .. import functional as LF
from .hugging_face import plan_module, source_form

REPOSITORY = Path(__file__).with_name("kernel_repository")
DEVICES = ("cpu", "cuda")
# transformers' layer name -> the layer class of this module that replaces it.
LAYERS = {"RMSNorm": "RMSNorm", "rotary_pos_emb": "RotaryPosEmb"}


class RMSNorm(nn.Module):
    """transformers' ``"RMSNorm"``: the forward ``lightllm.patch`` swaps into the module (fused
    forward and backward), or the module's own where ``lightllm.patch`` would leave it alone."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        plan = plan_module(self)
        forward = plan[1].forward if isinstance(plan, tuple) else type(self).forward
        return forward(self, hidden_states)


class RotaryPosEmb(nn.Module):
    """transformers' ``"rotary_pos_emb"``: ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``
    as one fused launch for q and k (forward and backward), where the function is Llama's and the
    call one lightllm computes as it does; the model's own function otherwise."""

    def forward(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                unsqueeze_dim: int = 1) -> tuple[Tensor, Tensor]:
        if _is_llama_rotary(type(self)) and _same_result(q, k, cos, sin):
            return LF.rotary_embedding(q, k, cos, sin, unsqueeze_dim)
        return type(self).forward(self, q, k, cos, sin, unsqueeze_dim)


def _same_result(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """True for the calls Llama's attention makes: 4-D q and k, 3-D tables across the whole head
    dim, one dtype for all four (the function's promotions then keep it, as lightllm does)."""
    return (q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
            and cos.shape[-1] == q.shape[-1] and q.dtype == k.dtype == cos.dtype == sin.dtype)


def _wrapped(func_module_class: type):
    """The function behind the module class ``kernels`` makes of a decorated function (its
    forward calls it: a name of the forward's closure), or None."""
    return inspect.getclosurevars(func_module_class.forward).nonlocals.get("func")


@functools.cache
def _is_llama_rotary(func_module_class: type) -> bool:
    """True when the function behind ``func_module_class`` and the ``rotate_half`` it calls are
    Llama's, statement for statement."""
    from transformers.models.llama import modeling_llama as llama

    func = _wrapped(func_module_class)
    pairs = ((func, _wrapped(type(llama.apply_rotary_pos_emb))),
             (getattr(func, "__globals__", {}).get("rotate_half"), llama.rotate_half))
    return all(source_form(ours) is not None and source_form(ours) == source_form(theirs)
               for ours, theirs in pairs)


def kernel_config() -> KernelConfig:
    """The transformers ``KernelConfig`` that maps :data:`LAYERS` to :data:`REPOSITORY` on the
    CPU and on CUDA, in every mode (a bare repository is the ``kernels`` package's
    ``Mode.FALLBACK``; under torch.compile the layers keep their own forward: they do not declare
    ``can_torch_compile``), with transformers' Hub mapping left out (``inherit_mapping=False``), so
    nothing is fetched. In the ``kernels`` package's form: give it to :func:`enable` or
    ``transformers.kernelize(model, mode=..., kernel_config=...)``, not to ``from_pretrained``."""
    mapping = {name: dict.fromkeys(DEVICES, LocalLayerRepository(repo_path=REPOSITORY,
                                                                 layer_name=layer))
               for name, layer in LAYERS.items()}
    return KernelConfig(mapping, inherit_mapping=False)


def enable(model: PreTrainedModel, mode: Mode | None = None) -> PreTrainedModel:
    """Kernelize ``model`` with :func:`kernel_config` through transformers
    (``set_use_kernels``), in ``mode`` (default: the model's kernels mode, else inference or
    training as ``model.training`` says). Returns the model; ``model.use_kernels = False``
    undoes it."""
    model.kernel_config = kernel_config()
    model.set_use_kernels(True, mode=mode)
    return model
