"""PyTorch's Transformer layers on lightllm's kernels, for every configuration they accept.

Subclasses of ``torch.nn.TransformerEncoderLayer``, ``TransformerDecoderLayer`` and
``TransformerEncoder``: constructors, parameters, ``state_dict`` keys, hooks and ``extra_repr`` are
PyTorch's own; ``forward`` is replaced. PyTorch's inference fast path
(``torch._transformer_encoder_layer_fwd``, taken in eval under ``no_grad``) reads the weights
directly and would bypass every swapped submodule, so these layers never take it: training and
inference run the same lightllm path.

One layer, with x (..., d_model) and the sub-blocks named as in PyTorch:
  attention   ``self_attn`` (and ``multihead_attn``) with masks, key-padding masks and causality,
              through ``lightllm.nn.MultiheadAttention``'s fused SDPA (the submodule is swapped by
              ``lightllm.patch``; a plain ``nn.MultiheadAttention`` keeps PyTorch's path)
  Add & Norm  the residual add and the LayerNorm in one pass (``add_layer_norm``), for both
              ``norm_first`` settings; post-norm adds the feed-forward's residual in its second
              matmul's epilogue instead
  feed-fwd    ``linear2(dropout(act(linear1(x))))`` with ReLU or GeLU (erf or tanh) in the first
              matmul's epilogue and bias + residual in the second's; dropout in training
An activation lightllm cannot fuse (any other callable) runs eagerly between two ``F.linear``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.norm import add_layer_norm, layer_norm
from .fused_linear import feed_forward_block


def fused_activation(activation) -> tuple[str, str] | None:
    """``(activation, approximate)`` for ``lightllm.functional.feed_forward`` when ``activation``
    (a layer's callable) is ReLU or GeLU, else None."""
    if activation is F.relu or activation is torch.relu or isinstance(activation, nn.ReLU):
        return "relu", "none"
    if activation is F.gelu:
        return "gelu", "none"
    if isinstance(activation, nn.GELU):
        return "gelu", activation.approximate
    if (isinstance(activation, functools.partial) and activation.func is F.gelu
            and not activation.args and set(activation.keywords) <= {"approximate"}):
        return "gelu", activation.keywords.get("approximate", "none")
    return None


def _norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    return layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _add_norm(x: Tensor, residual: Tensor, norm: nn.LayerNorm) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` in one pass."""
    return add_layer_norm(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _feed_forward(layer: nn.Module, x: Tensor, residual: Tensor, dropout_out: nn.Dropout) -> Tensor:
    """``residual + dropout_out(linear2(dropout(act(linear1(x)))))`` for a layer's own modules."""
    fused = fused_activation(layer.activation)
    out_dropout = layer.training and dropout_out.p > 0
    if fused is None:
        y = dropout_out(layer.linear2(layer.dropout(layer.activation(layer.linear1(x)))))
        return y + residual
    activation, approximate = fused
    y = feed_forward_block(x, layer.linear1, layer.linear2, layer.dropout.p, layer.training,
                           activation, approximate, None if out_dropout else residual)
    return dropout_out(y) + residual if out_dropout else y


def _canonical_masks(mask, key_padding_mask, x: Tensor, names: tuple[str, str]):
    """PyTorch's mask canonicalisation (bool or float, with its dtype checks) for one block."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name=names[1], other_type=F._none_or_dtype(mask),
        other_name=names[0], target_type=x.dtype)
    mask = F._canonical_mask(mask=mask, mask_name=names[0], other_type=None, other_name="",
                             target_type=x.dtype, check_other=False)
    return mask, key_padding_mask


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` on lightllm's kernels (module docstring)."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if src.is_nested:  # only PyTorch's fast path takes nested tensors
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        src_mask, src_key_padding_mask = _canonical_masks(
            src_mask, src_key_padding_mask, src, ("src_mask", "src_key_padding_mask"))
        x = src
        if self.norm_first:
            a = self._sa_block(_norm(x, self.norm1), src_mask, src_key_padding_mask, is_causal)
            h, x = _add_norm(a, x, self.norm2)
            return _feed_forward(self, h, x, self.dropout2)
        a = self._sa_block(x, src_mask, src_key_padding_mask, is_causal)
        x = _add_norm(a, x, self.norm1)[0]
        return _norm(_feed_forward(self, x, x, self.dropout2), self.norm2)


class TransformerDecoderLayer(nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` on lightllm's kernels (module docstring)."""

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        x = tgt
        if self.norm_first:
            a = self._sa_block(_norm(x, self.norm1), tgt_mask, tgt_key_padding_mask,
                               tgt_is_causal)
            h, x = _add_norm(a, x, self.norm2)
            a = self._mha_block(h, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            h, x = _add_norm(a, x, self.norm3)
            return _feed_forward(self, h, x, self.dropout3)
        a = self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = _add_norm(a, x, self.norm1)[0]
        a = self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x = _add_norm(a, x, self.norm2)[0]
        return _norm(_feed_forward(self, x, x, self.dropout3), self.norm3)


class TransformerEncoder(nn.TransformerEncoder):
    """``torch.nn.TransformerEncoder`` that keeps dense tensors.

    In eval under ``no_grad`` with a key-padding mask, PyTorch's stack packs the batch into a
    nested tensor for its fast path and pads the result back with zeros. This stack runs its layers
    on the dense batch with the padding mask instead, and zeroes the padded positions exactly when
    PyTorch's would have, so the outputs are the same.
    """

    def forward(self, src: Tensor, mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        src_key_padding_mask = F._canonical_mask(
            mask=src_key_padding_mask, mask_name="src_key_padding_mask",
            other_type=F._none_or_dtype(mask), other_name="mask", target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        zero_padding = self._torch_would_nest(src, mask, src_key_padding_mask)
        seq_len = nn.modules.transformer._get_seq_len(src, self.layers[0].self_attn.batch_first)
        is_causal = nn.modules.transformer._detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal,
                           src_key_padding_mask=src_key_padding_mask)
        if zero_padding:
            padded = src_key_padding_mask.bool()  # canonical float mask: 0 keeps, -inf pads
            if not self.layers[0].self_attn.batch_first:
                padded = padded.t()
            output = output.masked_fill(padded.unsqueeze(-1), 0.0)
        if self.norm is not None:
            output = self.norm(output)
        return output

    def _torch_would_nest(self, src: Tensor, mask, key_padding_mask) -> bool:
        """Whether ``torch.nn.TransformerEncoder.forward`` converts to a nested tensor here (its
        conditions, in its order)."""
        first = self.layers[0]
        if (not torch.backends.mha.get_fastpath_enabled() or not getattr(self, "use_nested_tensor", False)
                or first.training or src.dim() != 3 or key_padding_mask is None):
            return False
        mask_check = getattr(self, "mask_check", True)
        if mask_check and (torch.compiler.is_compiling() or not torch._nested_tensor_from_mask_left_aligned(
                src, key_padding_mask.logical_not())):
            return False
        if src.is_nested or mask is not None or torch.is_autocast_enabled():
            return False
        params = [first.self_attn.in_proj_weight, first.self_attn.in_proj_bias,
                  first.self_attn.out_proj.weight, first.self_attn.out_proj.bias,
                  first.norm1.weight, first.norm1.bias, first.norm2.weight, first.norm2.bias,
                  first.linear1.weight, first.linear1.bias, first.linear2.weight,
                  first.linear2.bias]
        tensors = [src] + [p for p in params if p is not None]
        if torch.overrides.has_torch_function(tensors):
            return False
        if src.device.type not in ("cpu", "cuda", "xpu",
                                   torch.utils.backend_registration._privateuse1_backend_name):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
