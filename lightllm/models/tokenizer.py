"""A byte-level tokenizer with the chat template's special tokens, for models built from scratch.

Ids 0-255 are the bytes of the UTF-8 text; the special tokens follow. Any text round-trips
(``decode(encode(s)) == s``), and a special token's literal spelling in the text is encoded as the
special token, so a rendered chat prompt tokenizes to the ids the model was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

SPECIAL_TOKENS = ("<SYSTEM>", "<USER>", "<ASSISTANT>", "<EOS>", "<PAD>")


class ByteTokenizer:
    """Bytes plus ``SPECIAL_TOKENS``; ``vocab_size`` = 256 + 5."""

    def __init__(self) -> None:
        self.special_tokens = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_ids = {i: tok for tok, i in self.special_tokens.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.eos_token, self.pad_token = "<EOS>", "<PAD>"
        self.eos_token_id = self.special_tokens["<EOS>"]
        self.pad_token_id = self.special_tokens["<PAD>"]
        self.chat_template = None  # the seed's template: lightllm.models.chat.render

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in (int(i) for i in ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i not in self._special_ids:
                raise ValueError(f"ByteTokenizer.decode: token id {i} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special_tokens:
                out.append(self._special_ids[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def __len__(self) -> int:
        return self.vocab_size
