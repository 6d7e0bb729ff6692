"""Norm modules: drop-ins for ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm``, and their fused
Add & Norm."""

from __future__ import annotations

import torch
from torch import Tensor

from lightllm.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on lightllm's fused kernels.

    A subclass, so the constructor, parameters, ``state_dict`` keys, initialisation and
    ``extra_repr`` are PyTorch's own and a checkpoint loads unchanged.
    """

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class AddLayerNorm(torch.nn.LayerNorm):
    """The transformer's Add & Norm: ``forward(x, residual) -> (layer_norm(x + residual), x +
    residual)`` in one fused pass. Parameters and state dict are those of ``torch.nn.LayerNorm``."""

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias,
                              self.eps)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on lightllm's fused kernels.

    A subclass, so the constructor, parameters, ``state_dict`` keys, initialisation and
    ``extra_repr`` are PyTorch's own and a checkpoint loads unchanged. Setting
    ``cast_before_weight = True`` on an instance gives Hugging Face LlamaRMSNorm's casting order
    (``weight * normed.to(input.dtype)``; see :func:`lightllm.functional.rms_norm`).
    """

    cast_before_weight: bool = False

    def forward(self, input: Tensor) -> Tensor:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps,
                        cast_before_weight=self.cast_before_weight)


class AddRMSNorm(torch.nn.RMSNorm):
    """Add & RMSNorm: ``forward(x, residual) -> (rms_norm(x + residual), x + residual)`` in one
    fused pass. Parameters and state dict are those of ``torch.nn.RMSNorm``."""

    cast_before_weight: bool = False

    def forward(self, input: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        return add_rms_norm(input, residual, self.normalized_shape, self.weight, self.eps,
                            cast_before_weight=self.cast_before_weight)
