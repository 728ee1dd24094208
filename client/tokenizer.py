"""Tokenizer side of the client: load a local HF tokenizer, encode prompts, decode as a stream."""

from __future__ import annotations

from typing import Any, Iterable

REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer from a local directory; never touches the network."""
    from transformers import AutoTokenizer  # lazy: transformers is slow to import

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def encode_chat(tok: Any, prompt: str, system: str | None = None) -> list[int]:
    """Prompt -> ids through the chat template with the assistant turn opened; plain encoding when
    the tokenizer has no template."""
    if not getattr(tok, "chat_template", None):
        return encode_plain(tok, prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    # Render to text, then encode without special tokens: templates spell out BOS themselves, and
    # this avoids apply_chat_template(tokenize=True)'s return type differing across versions.
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False))


def encode_plain(tok: Any, text: str) -> list[int]:
    """Text -> ids with the tokenizer's usual special tokens (e.g. BOS)."""
    return list(tok.encode(text, add_special_tokens=True))


def eos_token_ids(tok: Any) -> list[int]:
    """The tokenizer's end-of-sequence id(s), as a list (empty when it has none)."""
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return []
    return sorted({int(e) for e in eos}) if isinstance(eos, (list, tuple, set)) else [int(eos)]


class Detokenizer:
    """Incremental decoding that only emits stable text.

    Decodes all tokens so far and emits the suffix past what was already emitted. A trailing
    U+FFFD means a multi-byte character is split across tokens, so that tail is held back until
    the next token completes it (or until flush()).
    """

    def __init__(self, tok: Any, skip_special_tokens: bool = True):
        self._tok = tok
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = ""

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return self._emitted

    def push(self, ids: Iterable[int]) -> str:
        """Add tokens; return the newly stable text (possibly empty)."""
        self._ids.extend(int(i) for i in ids)
        full = self._decode()
        stable = full.rstrip(REPLACEMENT_CHAR)
        return self._emit(stable)

    def flush(self) -> str:
        """Emit whatever is left, incomplete characters included (end of generation)."""
        return self._emit(self._decode())

    def _decode(self) -> str:
        return self._tok.decode(self._ids, skip_special_tokens=self._skip_special)

    def _emit(self, text: str) -> str:
        # Should the decoder ever rewrite earlier text (space clean-up), what is out stays out:
        # emit only what extends past the emitted length.
        new = text[len(self._emitted):]
        self._emitted += new
        return new
