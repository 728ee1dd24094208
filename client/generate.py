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
from client.tokenizer import Detokenizer, encode_chat, encode_plain, eos_token_ids
from graphserver.stops import StopStrings

log = logging.getLogger(__name__)

# Tokens per replay_seq call. Each call is one round trip, and text arrives in bursts of that many
# tokens. Measured with the default model on the CPU (60 ms/token), throughput was the same for
# chunks of 1, 4 and 16 (16.2-17.0 tokens/s: the round trip is < 1 ms), but 16 printed ~1 s bursts.
# On a GPU (0.6 ms/token) a chunk of 1 would spend more time in round trips than in decoding.
# So by default (chunk=None) the chunk adapts: each call aims at STREAM_INTERVAL_S of decoding,
# which is 1 token per call on that CPU and about 64 on the GPU.
STREAM_INTERVAL_S = 0.05  # 20 text updates per second reads as smooth
MAX_AUTO_CHUNK = 64


class PromptTooLong(ValueError):
    """The prompt leaves no room for even one new token within the server's max_len."""


def generate(
    client: RPCClient,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampling: Mapping[str, Any] | SamplingParams | None = None,
    stream: Callable[[str], None] | None = None,
    use_graphs: bool = True,
    chunk: int | None = None,
    *,
    system: str | None = None,
    stop_token_ids: Iterable[int] | None = None,
    stop_strings: Sequence[str] = (),
    raw: bool = False,
    max_len: int | None = None,
    session: str | None = None,
) -> dict:
    """Generate up to max_new_tokens after `prompt` (text through the chat template, plain text
    with raw=True, or ids).

    chunk: tokens per replay_seq call; None adapts it so each call decodes for about
    STREAM_INTERVAL_S (the most tokens per call, MAX_AUTO_CHUNK, when nobody streams).
    stream: called with each newly stable piece of text. tokenizer may be None for id prompts
    (then no text, and no stop strings). stop_token_ids: default the tokenizer's EOS ids; a stop
    token is kept in `tokens` but not in `text`. stop_strings: generation ends where the text first
    contains one; the text ends before it (tokens end with the token that completed it), and
    nothing of it is streamed. max_len: the server's (hello's) longest sequence; the budget is cut
    to fit it, and reaching it is a normal finish ("length"), not an error.
    Returns {"prompt_ids", "tokens", "text", "stopped", "finish_reason" ("stop" | "length"),
    "finish_detail", "mode", "chunks" (steps per replay_seq call), "stalls", "fallbacks", "timing"}.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be >= 1 (or None to adapt), got {chunk}")
    stop_strings = [str(x) for x in stop_strings]
    if any(not x for x in stop_strings):
        raise ValueError("stop strings must not be empty")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (they are matched on the text)")
    params = sampling if isinstance(sampling, SamplingParams) else SamplingParams.from_dict(sampling)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        if raw and system:
            raise ValueError("a system message needs the chat template (raw=False)")
        prompt_ids = encode_plain(tokenizer, prompt) if raw else encode_chat(tokenizer, prompt, system)
    else:
        prompt_ids = [int(t) for t in prompt]
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    limit, limit_detail = max_new_tokens, f"max_new_tokens {max_new_tokens}"
    if max_len is not None:
        room = max_len - len(prompt_ids)  # a sequence holds at most max_len tokens, prompt included
        if room < 1:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; the server's max_len of "
                                f"{max_len} leaves no room for a reply")
        if room < limit:
            limit, limit_detail = room, f"context full (max_len {max_len})"
    stops = frozenset(int(t) for t in (stop_token_ids if stop_token_ids is not None else
                                       (eos_token_ids(tokenizer) if tokenizer is not None else ())))
    out = _Output(tokenizer, stream, stops, stop_strings)
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
        if not out.finished and limit > 1:
            if mode == "step":
                _decode_steps(client, session, sampler, prompt_ids, out, limit)
            else:
                _decode_replay(client, session, params, out, limit, chunk,
                               first_chunk=1 if stream is not None else MAX_AUTO_CHUNK)
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
    if out.finish_reason is None:
        out.finish_reason, out.finish_detail = "length", limit_detail
    n_decode = len(out.tokens) - 1  # the first token came from the prefill
    decode_ms = (t2 - t1) * 1e3
    return {
        "prompt_ids": prompt_ids,
        "tokens": out.tokens,
        "text": out.text,
        "stopped": out.finish_reason == "stop",
        "finish_reason": out.finish_reason,
        "finish_detail": out.finish_detail,
        "mode": mode,
        "chunks": out.chunks,
        "stalls": out.stalls,
        "fallbacks": out.fallbacks,
        "timing": {
            "prefill_ms": (t1 - t0) * 1e3,
            "decode_ms": decode_ms,
            "total_ms": (t2 - t0) * 1e3,
            "ms_per_token": decode_ms / n_decode if n_decode else None,
            "tokens_per_s": n_decode / (decode_ms / 1e3) if n_decode and decode_ms > 0 else None,
            "server": out.server_timing,  # one entry per replay_seq chunk
        },
    }


def _decode_steps(client: RPCClient, session: str, sampler: Sampler, prompt_ids: list[int], out: "_Output",
                  limit: int) -> None:
    while not out.finished and len(out.tokens) < limit:
        logits = client.step(session, out.tokens[-1])["logits"]  # [V] float32
        out.add([sampler.sample(logits, prompt_ids + out.tokens)])


def _decode_replay(client: RPCClient, session: str, params: SamplingParams, out: "_Output", limit: int,
                   chunk: int | None, first_chunk: int = 1) -> None:
    server_sampling = params.server_sampling()  # seed drawn once: chunks continue one RNG stream
    per_call = chunk or first_chunk
    while not out.finished and len(out.tokens) < limit:
        steps = min(per_call, limit - len(out.tokens))
        t0 = time.perf_counter()
        # start_token: the last token, sampled but not yet fed to the model.
        r = client.replay_seq(session, steps, start_token=out.tokens[-1], sampling=server_sampling,
                              stop_token_ids=sorted(out.stops))
        call_s = time.perf_counter() - t0
        if not r["tokens"]:
            raise RPCError(f"replay_seq returned no tokens for {steps} steps")
        if chunk is None:  # adapt: the next call should decode for about STREAM_INTERVAL_S
            per_call = max(1, min(MAX_AUTO_CHUNK, int(STREAM_INTERVAL_S * len(r["tokens"]) / max(call_s, 1e-6))))
        out.add(r["tokens"][:steps])
        out.stalls += int(r.get("stalls", 0))
        out.fallbacks += int(r.get("fallbacks", 0))
        out.server_timing.append(r.get("timing"))
        out.chunks.append(steps)
        if r.get("stopped") and not out.finished:
            log.warning("server reported a stop but returned no stop token")
            out.finish_reason, out.finish_detail = "stop", "the server reported a stop"


class _Output:
    """Accumulates tokens, cuts at the first stop token or stop string, and streams stable text.

    Text that could still become the start of a stop string is held back, so nothing of a stop
    string is ever streamed: a stop string found later lies wholly in the held-back text."""

    def __init__(self, tokenizer: Any, stream: Callable[[str], None] | None, stops: frozenset[int],
                 stop_strings: Sequence[str] = ()):
        self.tokens: list[int] = []
        self.stops = stops
        self.stop_strings = tuple(stop_strings)
        self.finish_reason: str | None = None
        self.finish_detail: str | None = None
        self.stalls = 0
        self.fallbacks = 0
        self.server_timing: list[Any] = []
        self.chunks: list[int] = []  # steps asked of each replay_seq call
        self._detok = Detokenizer(tokenizer) if tokenizer is not None else None
        self._stream = stream
        self._stop_strings = StopStrings(self.stop_strings)
        self._text = ""  # streamed so far

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, tokens: Iterable[int]) -> None:
        pending: list[int] = []  # tokens not yet turned into text
        for t in tokens:
            t = int(t)
            self.tokens.append(t)
            if t in self.stops:  # the stop token itself is not text
                self.finish_reason, self.finish_detail = "stop", f"stop token {t}"
                break
            pending.append(t)
            if self.stop_strings:  # matched per token, so tokens end where the match completed
                self._push(pending)
                pending = []
                if self.finished:
                    return
        self._push(pending)

    def _push(self, ids: list[int]) -> None:
        if self._detok is not None and ids:
            self._take(self._detok.push(ids))

    def _take(self, piece: str) -> None:
        for_stream = self._stop_strings.push(piece)
        if self._stop_strings.matched is not None and not self.finished:
            self.finish_reason, self.finish_detail = "stop", f"stop string {self._stop_strings.matched!r}"
        self._emit(for_stream)

    def _emit(self, piece: str) -> None:
        self._text += piece
        if piece and self._stream is not None:
            self._stream(piece)

    def finish(self) -> None:
        """End of generation: stream what was held back and any incomplete character at the end,
        unless a stop string cut the text (what followed it is dropped)."""
        if self._detok is not None and self._stop_strings.matched is None:
            self._take(self._detok.flush())
            self._emit(self._stop_strings.flush())

    @property
    def text(self) -> str | None:
        return self._text if self._detok is not None else None

