"""Rendering a conversation into the prompt a chat model continues.

Models without a chat template of their own use the seed's: each turn is its role token followed
by its text, an assistant turn ends with ``<EOS>``, and the prompt for a new answer ends with
``<ASSISTANT>``::

    <SYSTEM>You are terse.<USER>What is the capital of France?<ASSISTANT>Paris.<EOS><USER>...

A tokenizer that has a chat template (a Hugging Face tokenizer such as SmolLM2's) renders with its
own through ``apply_chat_template``.
"""

from __future__ import annotations

ROLES = {"system": "<SYSTEM>", "user": "<USER>", "assistant": "<ASSISTANT>"}


def render(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The seed's template: ``messages`` are ``{"role": "system"|"user"|"assistant",
    "content": str}`` dicts in order."""
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"chat message {i} must be a dict with role 'system', 'user' or "
                             f"'assistant', got {message!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"chat message {i}: content must be a str, got {type(content).__name__}")
        parts.append(ROLES[message["role"]] + content)
        if message["role"] == "assistant":
            parts.append("<EOS>")
    if add_generation_prompt:
        parts.append(ROLES["assistant"])
    return "".join(parts)


def conversation(prompt: str, system: str | None = None) -> list[dict]:
    """One user turn, with an optional system turn before it."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def render_for(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``tokenizer``: its own chat template when it has one, else the seed's."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render(messages, add_generation_prompt)
