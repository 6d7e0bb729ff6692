"""Drop-in modules with the constructor arguments and state-dict keys of their torch.nn twins."""
from .attention import (  # noqa: F401
    CausalSelfAttention,
    KVCache,
    MultiheadAttention,
    PagedKVCache,
    RaggedBatch,
)
from .fused_linear import FeedForward, SwiGLU  # noqa: F401
from .norm import AddLayerNorm, AddRMSNorm, LayerNorm, RMSNorm  # noqa: F401
from .rotary import RotaryEmbedding  # noqa: F401
from .softmax import Softmax  # noqa: F401
from .transformer import (  # noqa: F401
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
