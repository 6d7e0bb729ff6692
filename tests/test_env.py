"""``python -m lightllm.env``: the versions it prints and the ones it says differ from the
checkout's constraints file."""

import os
import subprocess
import sys

import pytest

from lightllm import env


def test_compare_with_constraints(tmp_path):
    pins = tmp_path / "constraints.txt"
    pins.write_text("# a comment\ntorch==2.14.1\nTyping_Extensions==4.16.0\ngguf==0.19.0  # why\n"
                    "missing-pkg==1.0\n")
    pinned = env.pinned_versions(pins)
    assert pinned == {"torch": "2.14.1", "typing-extensions": "4.16.0", "gguf": "0.19.0",
                      "missing-pkg": "1.0"}
    installed = {"torch": "2.14.1+cu130", "typing-extensions": "4.15.0", "gguf": "0.19.0",
                 "extra": "3.0"}
    rows, differ = env.compare_with_constraints(pinned, installed)
    assert differ == ["missing-pkg", "typing-extensions"]
    assert ("extra", "3.0", None) in rows and ("missing-pkg", None, "1.0") in rows


@pytest.mark.skipif(os.environ.get("LIGHTLLM_DEPS") != "pinned",
                    reason="only `make test` (LIGHTLLM_DEPS=pinned) installs the pinned versions")
def test_the_checkout_matches_its_constraints():
    """`make test` installs from constraints.txt, so the suite's own environment differs in
    nothing that the file pins."""
    rows, differ = env.compare_with_constraints(env.pinned_versions(), env.installed_versions())
    names = {name for name, _, want in rows if want}
    assert {"torch", "triton", "transformers", "kernels", "numpy", "pytest"} <= names
    assert not differ, differ


def test_command_prints_versions_and_differences():
    out = subprocess.run([sys.executable, "-m", "lightllm.env"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "lightllm._C" in out and "dispatch" in out
    assert "packages against constraints.txt (" in out
    assert "transformers" in out
