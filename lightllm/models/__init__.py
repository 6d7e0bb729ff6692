"""lightllm's own language model: the decoder (``GPT``, GPT-2 and Llama families), generation
with a KV cache, continuous batching over a paged cache (``Engine``), the chat template and a
byte-level tokenizer."""
from .chat import conversation, render, render_for  # noqa: F401
from .engine import Engine  # noqa: F401
from .gpt import GPT, GPTConfig  # noqa: F401
from .tokenizer import ByteTokenizer  # noqa: F401
