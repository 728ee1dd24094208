"""A stand-in Engine for the RPC tests: same method surface, no model, no torch.

Its "model" is a fixed next-token rule: after token t the most likely next token is
(3 * t + 1) % vocab_size, so greedy sequences are predictable. It checks what the real engine
checks (ranges, sessions, KV capacity) and raises the same graphserver.errors classes."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import numpy as np

from graphserver.errors import BadRequest, KVExhausted, UnknownSession


def next_token(t: int, vocab_size: int) -> int:
    return (3 * t + 1) % vocab_size


def _tokenizer_vocab_size(model_dir: str) -> int:
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    ids = list(tj["model"]["vocab"].values()) + [t["id"] for t in tj.get("added_tokens", [])]
    return max(ids) + 1


class FakeEngine:
    def __init__(self, vocab_size: int = 64, max_len: int = 128, kv_tokens: int = 512,
                 eos_token_ids: tuple[int, ...] = (), tokenizer_path: str | None = None, **kwargs: Any):
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.kv_tokens = kv_tokens
        self.eos_token_ids = list(eos_token_ids)
        self.tokenizer_path = tokenizer_path
        self.ctor_kwargs = kwargs  # what `python -m graphserver` passed (model, device, ...)
        model = kwargs.get("model")
        if tokenizer_path is None and model and os.path.isfile(os.path.join(model, "tokenizer.json")):
            # `--model DIR` with a tokenizer in it: serve ids that tokenizer can decode.
            self.tokenizer_path = model
            self.vocab_size = _tokenizer_vocab_size(model)
        self.sessions: dict[str, list[int]] = {}
        self.calls: list[tuple[str, dict]] = []  # (method, params) as the engine received them
        self.broken = False  # status() raises a non-engine exception
        self.unencodable = False  # status() returns something msgpack cannot carry
        self.closed = False
        self._lock = threading.Lock()

    def _record(self, method: str, **params: Any) -> None:
        with self._lock:
            self.calls.append((method, params))

    # -- info -------------------------------------------------------------------------------

    def hello(self) -> dict:
        self._record("hello")
        return {
            "model": "fake", "dtype": "float32", "device": "cpu", "backend": "cpu",
            "capabilities": {"graphs": False}, "vocab_size": self.vocab_size,
            "eos_token_ids": self.eos_token_ids, "max_len": self.max_len, "tokenizer_path": self.tokenizer_path,
            "ctor_kwargs": {k: v for k, v in self.ctor_kwargs.items() if isinstance(v, (str, int, float))},
            "model_version": getattr(self, "model_version", "0"),
        }

    def status(self) -> dict:
        self._record("status")
        if self.broken:
            raise RuntimeError("fake engine is broken")
        if self.unencodable:
            return {"weird": object()}
        used = sum(len(s) for s in self.sessions.values())
        return {**self.hello(), "kv": {"used_tokens": used, "capacity_tokens": self.kv_tokens},
                "sessions": len(self.sessions)}

    # -- sessions ---------------------------------------------------------------------------

    def _logits(self, last: int) -> np.ndarray:
        # [V] float32: a peak at next_token(last), then a smooth decay so sampling has a real spread.
        target = next_token(last, self.vocab_size)
        dist = (np.arange(self.vocab_size) - target) % self.vocab_size
        return (4.0 - dist / 4.0).astype(np.float32)

    def _check_token(self, t: int, what: str) -> None:
        if not 0 <= t < self.vocab_size:
            raise BadRequest(f"{what} {t} out of range [0, {self.vocab_size})")

    def _grow(self, session: str, n: int) -> list[int]:
        ids = self._get(session)
        used = sum(len(s) for s in self.sessions.values())
        if used + n > self.kv_tokens:
            raise KVExhausted(f"need {n} more KV tokens, {self.kv_tokens - used} free")
        if len(ids) + n > self.max_len:
            raise BadRequest(f"session would exceed max_len {self.max_len}")
        return ids

    def _get(self, session: str) -> list[int]:
        try:
            return self.sessions[session]
        except KeyError:
            raise UnknownSession(f"no session {session!r}") from None

    def kv_init(self, session: str, input_ids: list[int], top_k: int | None, replace: bool = False,
                deadline_s: float | None = None) -> dict:
        self._record("kv_init", session=session, input_ids=input_ids, top_k=top_k)
        if not input_ids:
            raise BadRequest("input_ids is empty")
        for i, t in enumerate(input_ids):
            self._check_token(t, f"input_ids[{i}]")
        if session in self.sessions:
            raise BadRequest(f"session {session!r} exists")
        used = sum(len(s) for s in self.sessions.values())
        if used + len(input_ids) > self.kv_tokens:
            raise KVExhausted(f"prompt needs {len(input_ids)} KV tokens, {self.kv_tokens - used} free")
        self.sessions[session] = list(input_ids)
        return {"length": len(input_ids), "logits": self._logits(input_ids[-1])}

    def step(self, session: str, token: int) -> dict:
        self._record("step", session=session, token=token)
        self._check_token(token, "token")
        ids = self._grow(session, 1)
        ids.append(token)
        return {"logits": self._logits(token), "length": len(ids)}

    def replay_seq(self, session: str, steps: int, start_token: int | None, sampling: dict,
                   stop_token_ids: list[int], deadline_s: float | None = None) -> dict:
        self._record("replay_seq", session=session, steps=steps, start_token=start_token, sampling=sampling,
                     stop_token_ids=stop_token_ids)
        if steps < 1:
            raise BadRequest(f"steps must be >= 1, got {steps}")
        ids = self._get(session)
        if start_token is None:
            raise BadRequest("the fake engine needs start_token")
        self._check_token(start_token, "start_token")
        self._grow(session, steps)
        tokens, fed, stopped = [], start_token, False
        for _ in range(steps):  # greedy only: the fake ignores temperature
            ids.append(fed)
            fed = next_token(fed, self.vocab_size)
            tokens.append(fed)
            if fed in stop_token_ids:
                stopped = True
                break
        return {"tokens": tokens, "timing": {"ms_per_step_p50": 0.0}, "stalls": 0, "fallbacks": 0,
                "stopped": stopped}

    # -- continuous batching (a synchronous stand-in: every reply is sent at once) -----------

    def generate(self, reply, request_id: str, prompt_ids: list[int], max_tokens: int, sampling: dict,
                 stop_token_ids: list[int], ignore_eos: bool, stream: bool, deadline_s: float | None) -> None:
        self._record("generate", request_id=request_id, prompt_ids=prompt_ids, max_tokens=max_tokens,
                     sampling=sampling, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, stream=stream,
                     deadline_s=deadline_s)
        if not prompt_ids:
            raise BadRequest("prompt_ids is empty")
        for i, t in enumerate(prompt_ids):
            self._check_token(t, f"prompt_ids[{i}]")
        stops = set(stop_token_ids) | (set() if ignore_eos else set(self.eos_token_ids))
        toks, last, reason = [], prompt_ids[-1], "length"
        for _ in range(max_tokens):
            last = next_token(last, self.vocab_size)
            toks.append(last)
            if last in stops:
                reason = "stop"
                break
        base = {"request_id": request_id, "model_version": getattr(self, "model_version", "0")}
        if stream:
            for t in toks[:-1]:
                reply(dict(base, tokens=[t], finished=False, finish_reason=None), more=True)
        final = toks[-1:] if stream else toks
        reply(dict(base, tokens=final, finished=True, finish_reason=reason,
                   usage={"prompt_tokens": len(prompt_ids), "completion_tokens": len(toks)}))

    def abort(self, request_id: str) -> dict:
        self._record("abort", request_id=request_id)
        return {"aborted": False}        # every fake request finishes inside generate()

    def reload(self, reply, reply_error, path: str, version: str, drain_timeout_s: float) -> None:
        self._record("reload", path=path, version=version, drain_timeout_s=drain_timeout_s)
        if not os.path.isdir(path):
            raise BadRequest(f"reload: {path!r} is not a directory")
        previous, self.model_version = getattr(self, "model_version", "0"), version
        reply({"model_version": version, "previous_version": previous})

    def kv_free(self, session: str) -> dict:
        self._record("kv_free", session=session)
        self._get(session)
        del self.sessions[session]
        return {"freed": session}

    # -- graphs -----------------------------------------------------------------------------

    def bg_capture_start(self, ahead: int, behind: int) -> dict:
        self._record("bg_capture_start", ahead=ahead, behind=behind)
        return {"ahead": ahead, "behind": behind}

    def wait_precapture(self, min_ahead: int, timeout_s: float) -> dict:
        # The slow method of the tests: it blocks the server for timeout_s.
        self._record("wait_precapture", min_ahead=min_ahead, timeout_s=timeout_s)
        time.sleep(timeout_s)
        return {"ready": False, "waited_s": timeout_s}

    def bg_capture_stop(self) -> dict:
        self._record("bg_capture_stop")
        return {"stopped": True}

    def close(self) -> None:
        self.closed = True
