"""``GPT.from_hf``: lightllm's GPT on the weights of a transformers model, without a second copy.

Each lightllm parameter *is* the transformers tensor (Llama-layout models: the same Parameter
objects) or a view of it (GPT-2: the columns of the fused ``c_attn`` and the transposed ``Conv1D``
weights, which the matmul kernels read with their strides).
"""

from __future__ import annotations

import torch
from torch import nn

from .gpt import GPTConfig

LLAMA_LAYOUT = ("llama", "mistral", "qwen2")
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _param(t) -> nn.Parameter:
    """A Parameter over ``t``'s storage (``t`` a Parameter, or a view of one)."""
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.requires_grad)


def _share(linear: nn.Linear, weight, bias) -> None:
    linear.weight = _param(weight)
    linear.bias = None if bias is None else _param(bias)


def _share_norm(norm: nn.Module, source: nn.Module) -> None:
    norm.weight = source.weight
    if getattr(norm, "bias", None) is not None or getattr(source, "bias", None) is not None:
        norm.bias = source.bias


def from_hf(cls, model: nn.Module):
    kind = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if kind == "GPT2LMHeadModel":
        return _from_gpt2(cls, model)
    if model_type in LLAMA_LAYOUT and kind.endswith("ForCausalLM"):
        return _from_llama(cls, model)
    raise ValueError(f"GPT.from_hf: unsupported architecture {kind} (model_type {model_type!r}); "
                     f"supported: GPT2LMHeadModel and the Llama-layout causal LMs "
                     f"({', '.join(LLAMA_LAYOUT)})")


def _finish(gpt, model):
    gpt.config.extra["source"] = type(model).__name__
    return gpt.train(model.training)


def _from_gpt2(cls, model):
    hc = model.config
    if hc.activation_function not in _GPT2_ACTIVATIONS:
        raise ValueError(f"GPT.from_hf: GPT-2 activation {hc.activation_function!r} is not one "
                         f"lightllm fuses ({', '.join(_GPT2_ACTIVATIONS)})")
    if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or not hc.scale_attn_weights:
        raise ValueError("GPT.from_hf: GPT-2 attention scaling other than 1/sqrt(head_dim) is "
                         "not supported")
    d = hc.n_embd
    config = GPTConfig(vocab_size=hc.vocab_size, n_layer=hc.n_layer, n_head=hc.n_head,
                       n_embd=d, intermediate_size=hc.n_inner or 4 * d, block_size=hc.n_positions,
                       norm="layer_norm", norm_eps=hc.layer_norm_epsilon,
                       mlp=_GPT2_ACTIVATIONS[hc.activation_function], positions="learned",
                       tie_embeddings=False)
    with torch.device("meta"):  # structure only: every tensor is replaced by a shared one
        gpt = cls(config)
    t = model.transformer
    gpt.wte.weight, gpt.wpe.weight = t.wte.weight, t.wpe.weight
    for block, h in zip(gpt.blocks, t.h):
        _share_norm(block.norm_attn, h.ln_1)
        _share_norm(block.norm_mlp, h.ln_2)
        w, b = h.attn.c_attn.weight, h.attn.c_attn.bias  # (D, 3D), (3D,)
        for i, proj in enumerate((block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)):
            _share(proj, w[:, i * d:(i + 1) * d].t(), b[i * d:(i + 1) * d])
        _share(block.attn.out_proj, h.attn.c_proj.weight.t(), h.attn.c_proj.bias)
        _share(block.mlp.fc, h.mlp.c_fc.weight.t(), h.mlp.c_fc.bias)
        _share(block.mlp.proj, h.mlp.c_proj.weight.t(), h.mlp.c_proj.bias)
    _share_norm(gpt.norm_f, t.ln_f)
    gpt.lm_head.weight = model.lm_head.weight  # tied to wte in GPT-2: the same Parameter
    return _finish(gpt, model)


def _rope_theta(hc) -> float:
    params = getattr(hc, "rope_parameters", None) or {}
    scaling = getattr(hc, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise ValueError(f"GPT.from_hf: rope type {rope_type!r} is not supported (only the "
                         "default rotary embedding)")
    return float(params.get("rope_theta", getattr(hc, "rope_theta", 10000.0)))


def _from_llama(cls, model):
    hc = model.config
    if hc.hidden_act != "silu":
        raise ValueError(f"GPT.from_hf: hidden_act {hc.hidden_act!r}: lightllm's gated "
                         "feed-forward is SwiGLU (silu)")
    inner = model.model
    first = inner.layers[0]
    attn, mlp = first.self_attn, first.mlp
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    window = getattr(hc, "sliding_window", None)
    if not getattr(hc, "use_sliding_window", True):
        window = None
    config = GPTConfig(
        vocab_size=hc.vocab_size, n_layer=hc.num_hidden_layers, n_head=hc.num_attention_heads,
        n_kv_head=hc.num_key_value_heads, n_embd=hc.hidden_size, head_dim=head_dim,
        intermediate_size=hc.intermediate_size, block_size=hc.max_position_embeddings,
        norm="rms_norm", norm_eps=hc.rms_norm_eps, mlp="swiglu", positions="rope",
        rope_base=_rope_theta(hc), qkv_bias=attn.q_proj.bias is not None,
        out_bias=attn.o_proj.bias is not None, mlp_bias=mlp.gate_proj.bias is not None,
        tie_embeddings=False, sliding_window=window)
    with torch.device("meta"):
        gpt = cls(config)
    gpt.wte.weight = inner.embed_tokens.weight
    for block, layer in zip(gpt.blocks, inner.layers):
        _share_norm(block.norm_attn, layer.input_layernorm)
        _share_norm(block.norm_mlp, layer.post_attention_layernorm)
        for ours, theirs in (("q_proj",) * 2, ("k_proj",) * 2, ("v_proj",) * 2,
                             ("out_proj", "o_proj")):
            src = getattr(layer.self_attn, theirs)
            _share(getattr(block.attn, ours), src.weight, src.bias)
        for name in ("gate_proj", "up_proj", "down_proj"):
            src = getattr(layer.mlp, name)
            _share(getattr(block.mlp, name), src.weight, src.bias)
    _share_norm(gpt.norm_f, inner.norm)
    gpt.lm_head.weight = model.lm_head.weight
    return _finish(gpt, model)
