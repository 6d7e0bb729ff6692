"""Softmax module: a drop-in for ``torch.nn.Softmax`` on lightllm's C++/CUDA kernels."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightllm.ops.softmax import softmax


class Softmax(torch.nn.Softmax):
    """``torch.nn.Softmax(dim)`` on lightllm's kernels.

    A subclass, so the constructor, ``dim`` attribute, (empty) ``state_dict``, pickling and
    ``extra_repr`` are PyTorch's own.
    """

    def forward(self, input: Tensor) -> Tensor:
        dim = self.dim
        if dim is None:  # PyTorch's legacy implicit choice, with its deprecation warning
            warnings.warn("Implicit dimension choice for softmax has been deprecated. Change the "
                          "call to include dim=X as an argument.", stacklevel=2)
            dim = 0 if input.dim() in (0, 1, 3) else 1
        return softmax(input, dim)
