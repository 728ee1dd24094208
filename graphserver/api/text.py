"""Text side of the front end: the tokenizer and chat template, incremental detokenizing.

Built on the `tokenizers` library and jinja2 rather than transformers, because importing
transformers imports torch and this process must stay torch-free.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used (missing files, no chat template for chat)."""


class TemplateError(ValueError):
    """The chat template refused the messages (its raise_exception), or failed to render them."""


def _token_text(v: Any) -> str | None:
    # tokenizer_config.json spells special tokens as "str" or {"content": "str", ...}.
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def _read_chat_template(path: str, config: dict) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    json_file = os.path.join(path, "chat_template.json")
    if template is None and os.path.isfile(json_file):
        with open(json_file, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name", "template"}]; use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class TextTokenizer:
    """A local HF tokenizer directory (tokenizer.json + tokenizer_config.json), torch-free."""

    def __init__(self, path: str):
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise TokenizerError(f"{path!r} has no tokenizer.json (a fast HF tokenizer is required)")
        self.path = path
        self.tokenizer = Tokenizer.from_file(tj)
        config: dict = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file, encoding="utf-8") as f:
                config = json.load(f)
        self.special_tokens = {k: _token_text(config.get(k)) for k in
                               ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.chat_template = _read_chat_template(path, config)
        self._template: jinja2.Template | None = None
        if self.chat_template is not None:
            # The environment HF's apply_chat_template uses: sandboxed, trimmed blocks, loop controls.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **kw: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_plain(self, text: str) -> list[int]:
        """Text -> ids with the tokenizer's own special tokens (its post-processor, e.g. BOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise TemplateError(f"the tokenizer in {self.path!r} has no chat template")
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **{k: v for k, v in self.special_tokens.items() if v is not None})
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {e}") from None

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Messages -> ids through the chat template. The rendered text spells its special tokens
        itself, so it is encoded without adding more (as client.tokenizer.encode_chat does)."""
        text = self.render_chat(messages, add_generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self) -> "Detokenizer":
        return Detokenizer(self)


class Detokenizer:
    """Incremental decoding that never emits a broken character.

    tokenizers' DecodeStream returns nothing while the newest tokens end inside a multi-byte UTF-8
    sequence; those bytes are held back until a later token completes them. flush() at the end
    emits what is left against a full decode (a sequence that never completed comes out as U+FFFD,
    as a full decode shows it)."""

    def __init__(self, tok: TextTokenizer):
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted: list[str] = []
        self._len = 0

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def push(self, ids: Iterable[int]) -> str:
        out = []
        for t in ids:
            t = int(t)
            self._ids.append(t)
            piece = self._stream.step(self._tok.tokenizer, t)
            if piece:
                out.append(piece)
        return self._emit("".join(out))

    def flush(self) -> str:
        full = self._tok.decode(self._ids)
        # What is out stays out: emit only what the full decode has past the emitted length.
        return self._emit(full[self._len:])

    def _emit(self, piece: str) -> str:
        if piece:
            self._emitted.append(piece)
            self._len += len(piece)
        return piece
