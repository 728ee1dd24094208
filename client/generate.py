"""Prompt -> streamed text through the server: prefill with kv_init, then decode either with the
server's fused replay_seq (graphs when the server has them) or one `step` at a time with the CPU
sampler (needed for repetition penalty, and selectable with use_graphs=False)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, Sequence

from client.rpc import RPCClient, RPCError
from client.sampler import Sampler, SamplingParams
from client.tokenizer import Detokenizer, encode_chat, eos_token_ids

log = logging.getLogger(__name__)


def generate(
    client: RPCClient,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampling: Mapping[str, Any] | SamplingParams | None = None,
    stream: Callable[[str], None] | None = None,
    use_graphs: bool = True,
    chunk: int = 16,
    *,
    system: str | None = None,
    stop_token_ids: Iterable[int] | None = None,
    session: str | None = None,
) -> dict:
    """Generate up to max_new_tokens after `prompt` (text through the chat template, or ids).

    stream: called with each newly stable piece of text. tokenizer may be None for id prompts
    (then no text). stop_token_ids: default the tokenizer's EOS ids; the stop token is kept in
    `tokens` but not in `text`.
    Returns {"prompt_ids", "tokens", "text", "stopped", "mode", "stalls", "fallbacks", "timing"}.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    params = sampling if isinstance(sampling, SamplingParams) else SamplingParams.from_dict(sampling)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        prompt_ids = encode_chat(tokenizer, prompt, system)
    else:
        prompt_ids = [int(t) for t in prompt]
    stops = frozenset(int(t) for t in (stop_token_ids if stop_token_ids is not None else
                                       (eos_token_ids(tokenizer) if tokenizer is not None else ())))
    out = _Output(tokenizer, stream, stops)
    session = session or f"gen-{uuid.uuid4().hex}"
    mode = "step" if params.needs_client or not use_graphs else "replay"

    t0 = time.perf_counter()
    init = client.kv_init(session, prompt_ids)
    t1 = time.perf_counter()
    failed = True
    try:
        sampler = Sampler(params)
        # The first token always comes from the prefill logits, sampled here.
        first = sampler.sample(init["logits"], prompt_ids)
        out.add([first])
        if not out.stopped and max_new_tokens > 1:
            if mode == "step":
                _decode_steps(client, session, sampler, prompt_ids, out, max_new_tokens)
            else:
                _decode_replay(client, session, params, out, max_new_tokens, chunk)
        failed = False
    finally:
        try:
            client.kv_free(session)
        except RPCError:
            if not failed:
                raise
            log.warning("kv_free(%s) failed after an earlier error", session, exc_info=True)
    t2 = time.perf_counter()

    out.finish()
    n_decode = len(out.tokens) - 1  # the first token came from the prefill
    decode_ms = (t2 - t1) * 1e3
    return {
        "prompt_ids": prompt_ids,
        "tokens": out.tokens,
        "text": out.text,
        "stopped": out.stopped,
        "mode": mode,
        "stalls": out.stalls,
        "fallbacks": out.fallbacks,
        "timing": {
            "prefill_ms": (t1 - t0) * 1e3,
            "decode_ms": decode_ms,
            "total_ms": (t2 - t0) * 1e3,
            "ms_per_token": decode_ms / n_decode if n_decode else None,
            "server": out.server_timing,  # one entry per replay_seq chunk
        },
    }


def _decode_steps(client: RPCClient, session: str, sampler: Sampler, prompt_ids: list[int], out: "_Output",
                  max_new_tokens: int) -> None:
    while not out.stopped and len(out.tokens) < max_new_tokens:
        logits = client.step(session, out.tokens[-1])["logits"]  # [V] float32
        out.add([sampler.sample(logits, prompt_ids + out.tokens)])


def _decode_replay(client: RPCClient, session: str, params: SamplingParams, out: "_Output", max_new_tokens: int,
                   chunk: int) -> None:
    server_sampling = params.server_sampling()  # seed drawn once: chunks continue one RNG stream
    while not out.stopped and len(out.tokens) < max_new_tokens:
        steps = min(chunk, max_new_tokens - len(out.tokens))
        # start_token: the last token, sampled but not yet fed to the model.
        r = client.replay_seq(session, steps, start_token=out.tokens[-1], sampling=server_sampling,
                              stop_token_ids=sorted(out.stops))
        if not r["tokens"]:
            raise RPCError(f"replay_seq returned no tokens for {steps} steps")
        out.add(r["tokens"][:steps])
        out.stalls += int(r.get("stalls", 0))
        out.fallbacks += int(r.get("fallbacks", 0))
        out.server_timing.append(r.get("timing"))
        if r.get("stopped") and not out.stopped:
            log.warning("server reported a stop but returned no stop token")
            out.stopped = True


class _Output:
    """Accumulates tokens, cuts at the first stop token, and streams stable text."""

    def __init__(self, tokenizer: Any, stream: Callable[[str], None] | None, stops: frozenset[int]):
        self.tokens: list[int] = []
        self.stops = stops
        self.stopped = False
        self.stalls = 0
        self.fallbacks = 0
        self.server_timing: list[Any] = []
        self._detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self._stream = stream

    def add(self, tokens: Iterable[int]) -> None:
        start = len(self.tokens)
        for t in tokens:
            self.tokens.append(int(t))
            if self.tokens[-1] in self.stops:
                self.stopped = True
                break
        if self._detok is not None:
            self._emit(self._detok.push(self.tokens[start:]))

    def finish(self) -> None:
        if self._detok is not None:
            self._emit(self._detok.flush())

    @property
    def text(self) -> str | None:
        return self._detok.text if self._detok is not None else None

    def _emit(self, piece: str) -> None:
        if piece and self._stream is not None:
            self._stream(piece)
