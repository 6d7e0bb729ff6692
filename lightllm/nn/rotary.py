"""The rotary embedding's cos/sin tables as a module, in the shape of transformers'
``LlamaRotaryEmbedding`` (default rope type)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightllm.ops.rotary import cos_sin_from, inv_freq


class RotaryEmbedding(torch.nn.Module):
    """``forward(x, position_ids) -> (cos, sin)``, each ``position_ids.shape + (dim,)`` in x's
    dtype, exactly as ``LlamaRotaryEmbedding.forward`` returns them; apply them with
    :func:`lightllm.functional.rotary_embedding`. ``inv_freq`` is a non-persistent buffer (as in
    transformers): the state dict is empty and ``.to(device)`` moves it."""

    def __init__(self, dim: int, base: float = 10000.0, device=None) -> None:
        super().__init__()
        if type(dim) is not int or dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        self.dim, self.base = dim, float(base)
        self.register_buffer("inv_freq", inv_freq(dim, self.base).to(device), persistent=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return cos_sin_from(position_ids, self.inv_freq, x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"
