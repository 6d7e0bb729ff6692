"""The chat template and the byte-level tokenizer of lightllm.models."""

import pytest

from lightllm.models import ByteTokenizer, conversation, render, render_for


def test_seed_template():
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And Italy?"}]
    assert render(messages) == ("<SYSTEM>Be terse.<USER>Capital of France?<ASSISTANT>Paris.<EOS>"
                                "<USER>And Italy?<ASSISTANT>")
    assert render(messages[:2], add_generation_prompt=False) == "<SYSTEM>Be terse.<USER>Capital of France?"
    assert conversation("hi") == [{"role": "user", "content": "hi"}]
    assert conversation("hi", "sys")[0] == {"role": "system", "content": "sys"}


@pytest.mark.parametrize("bad", [{"role": "tool", "content": "x"}, {"role": "user"}, "hello"])
def test_bad_messages(bad):
    with pytest.raises(ValueError, match="chat message 0"):
        render([bad])


def test_tokenizer_round_trip_and_special_tokens():
    tok = ByteTokenizer()
    text = render(conversation("Où est la Tour Eiffel ? 東京", "Réponds."))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[0] == tok.special_tokens["<SYSTEM>"] and ids[-1] == tok.special_tokens["<ASSISTANT>"]
    assert tok.decode(ids, skip_special_tokens=True) == "Réponds.Où est la Tour Eiffel ? 東京"
    assert max(tok.encode("ÿ")) < 256 and tok.vocab_size == 261
    assert tok.encode("a<EOS>b") == [97, tok.eos_token_id, 98]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])
    with pytest.raises(TypeError, match="must be a str"):
        tok.encode(b"bytes")


def test_render_for_uses_a_tokenizer_template_when_there_is_one():
    class WithTemplate:
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt
            return f"TEMPLATE:{messages[-1]['content']}"

    assert render_for(WithTemplate(), conversation("hi")) == "TEMPLATE:hi"
    assert render_for(ByteTokenizer(), conversation("hi")) == "<USER>hi<ASSISTANT>"
