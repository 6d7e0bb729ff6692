"""The ops, with the exact semantics of their PyTorch twins (docs/design.md §3); the ragged-batch
attention ops with FlashAttention's (``flash_attn_varlen_func``, ``flash_attn_with_kvcache``)."""
from .ops.attention import (  # noqa: F401
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    scaled_dot_product_attention,
)
from .ops.fused_linear import (  # noqa: F401
    feed_forward,
    linear_gelu,
    linear_relu,
    linear_swiglu,
    swiglu_feed_forward,
)
from .ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm  # noqa: F401
from .ops.rotary import rotary_cos_sin, rotary_embedding, rotary_embedding_  # noqa: F401
from .ops.softmax import scaled_masked_softmax, softmax  # noqa: F401
