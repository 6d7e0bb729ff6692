"""The references under ``lightllm.functional``'s names and signatures: the namespace a module
whose ``backend`` is ``"reference"`` (lightllm's GPT, ``lightllm.nn.CausalSelfAttention``) runs, so
that the same model code computes on plain PyTorch."""
from .attention import (  # noqa: F401
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from .fused_linear import (  # noqa: F401
    feed_forward,
    feed_forward_block,
    linear_gelu,
    linear_relu,
    linear_swiglu,
    swiglu_feed_forward,
)
from .norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm  # noqa: F401
from .rotary import rotary_cos_sin, rotary_embedding  # noqa: F401
from .softmax import scaled_masked_softmax, softmax  # noqa: F401
