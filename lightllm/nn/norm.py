"""LayerNorm modules: drop-ins for ``torch.nn.LayerNorm`` and the fused Add & Norm."""

from __future__ import annotations

import torch
from torch import Tensor

from lightllm.ops.norm import add_layer_norm, layer_norm


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
