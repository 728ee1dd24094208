"""A stand-in for the continuous-batching engine: the ENGINE_RPC.md surface (hello, status,
generate streamed, abort, reload, stop) over a real ZeroMQ ROUTER socket, with no model and no torch.

Its "model": after token t the next token is `rule.next(t)`, a fixed permutation-like walk over the
tokenizer's ordinary tokens (ids whose text decodes cleanly), shifted by the loaded checkpoint's
offset, so every version has its own predictable greedy text. `script=` makes it emit a fixed id
sequence instead (for text-level tests: multi-byte characters, stop strings).

A "checkpoint" for reload is a directory holding config.json and fake_weights.json {"offset": int}.
One thread runs both the socket and the step loop, one token per running request per step.

Run alone: `python tests/fake_batch_engine.py --tokenizer DIR [--endpoint EP]` prints `READY <ep>`.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from graphserver import protocol
from graphserver.errors import BadRequest, EngineError, Overloaded, ReloadInProgress

CHECKPOINT_FILE = "fake_weights.json"


def load_offset(path: str) -> int:
    """The offset a fake checkpoint directory holds; BadRequest names what is wrong."""
    if not os.path.isdir(path):
        raise BadRequest(f"reload: {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise BadRequest(f"reload: {path!r} has no config.json")
    try:
        with open(os.path.join(path, CHECKPOINT_FILE), encoding="utf-8") as f:
            offset = json.load(f)["offset"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadRequest(f"reload: {path!r} holds no readable {CHECKPOINT_FILE}: {e}") from None
    if not isinstance(offset, int):
        raise BadRequest(f"reload: offset in {path!r} must be an int")
    return offset


def write_checkpoint(path: str, offset: int) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"fake": True}, f)
    with open(os.path.join(path, CHECKPOINT_FILE), "w", encoding="utf-8") as f:
        json.dump({"offset": offset}, f)
    return path


class TokenRule:
    """Next-token rule over the ids of `tokenizer_path` that decode to clean, non-empty text."""

    def __init__(self, tokenizer_path: str):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(tokenizer_path, "tokenizer.json"))
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        special = set(tok.get_added_tokens_decoder())  # {id: AddedToken}
        texts = tok.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=True)
        self.ordinary = [i for i, s in enumerate(texts)
                         if i not in special and s.strip() and "\ufffd" not in s and s.isprintable()]

    def next(self, t: int, offset: int) -> int:
        return self.ordinary[(t * 7919 + 13 + offset * 104729) % len(self.ordinary)]

    def continuation(self, last: int, n: int, offset: int = 0) -> list[int]:
        out = []
        for _ in range(n):
            last = self.next(last, offset)
            out.append(last)
        return out


@dataclass
class _Req:
    envelope: list[bytes]
    msg_id: Any
    rid: str
    prompt: list[int]
    max_tokens: int
    stop_ids: frozenset[int]
    stream: bool
    deadline: float | None
    received: float
    out: list[int] = field(default_factory=list)
    unsent: int = 0  # tokens of `out` not yet sent
    version: str = ""
    offset: int = 0
    admitted: float | None = None
    first_token: float | None = None


class FakeBatchEngine:
    """The server; start() binds and serves in a daemon thread, stop() joins it."""

    def __init__(self, tokenizer_path: str, endpoint: str = "tcp://127.0.0.1:*", *, max_len: int = 256,
                 max_num_seqs: int = 8, max_waiting: int = 16, block_size: int = 16, num_blocks: int = 64,
                 step_s: float = 0.01, reply_every: int = 1, model_version: str = "0", offset: int = 0,
                 eos_token_ids: tuple[int, ...] = (2,), script: list[int] | None = None,
                 reload_copy_s: float = 0.05):
        self.rule = TokenRule(tokenizer_path)
        self.tokenizer_path = tokenizer_path
        self.max_len = max_len
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.step_s = step_s
        self.reply_every = reply_every
        self.model_version = model_version
        self.offset = offset
        self.eos = frozenset(eos_token_ids)
        self.script = list(script) if script is not None else None
        self.reload_copy_s = reload_copy_s
        self.calls: list[tuple[str, dict]] = []  # (method, params) as received, for assertions
        self.counters = collections.Counter()
        self.waiting: collections.deque[_Req] = collections.deque()
        self.running: list[_Req] = []
        self._reload: dict | None = None  # a reload in progress: envelope, msg_id, params, t0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fake-batch-engine")

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "FakeBatchEngine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def __enter__(self) -> "FakeBatchEngine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait_stopped(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # -- loop -------------------------------------------------------------------------------

    def _serve(self) -> None:
        next_step = time.monotonic()
        try:
            while not self._stop.is_set():
                busy = bool(self.running or self.waiting or self._reload)
                wait_ms = max(0.0, (next_step - time.monotonic()) * 1e3) if busy else 50
                if self._sock.poll(wait_ms):
                    while self._sock.poll(0):
                        self._handle(self._sock.recv_multipart())
                if time.monotonic() >= next_step:
                    self._step()
                    next_step = time.monotonic() + self.step_s
        finally:
            self._sock.close(0)
            self._ctx.term()

    def _handle(self, frames: list[bytes]) -> None:
        envelope, payload = frames[:-1], frames[-1]
        msg_id = None
        try:
            msg_id, method, params = protocol.parse_request(protocol.decode(payload))
            params = protocol.validate_params(method, params)
            self.calls.append((method, params))
            if method == "generate":
                self._admit(envelope, msg_id, params)
            elif method == "reload":
                self._start_reload(envelope, msg_id, params)
            elif method == "stop":
                self._send(envelope, protocol.make_ok(msg_id, {"stopping": True}))
                self._stop.set()
            else:
                self._send(envelope, protocol.make_ok(msg_id, getattr(self, f"_rpc_{method}")(**params)))
        except protocol.ProtocolError as e:
            self._send(envelope, protocol.make_error(msg_id, "ProtocolError", str(e)))
        except EngineError as e:
            self._send(envelope, protocol.make_error(msg_id, type(e).__name__, str(e)))
        except AttributeError:
            self._send(envelope, protocol.make_error(msg_id, "BadRequest", "the fake does not serve this method"))

    def _send(self, envelope: list[bytes], reply: dict) -> None:
        try:
            self._sock.send_multipart(envelope + [protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # -- RPCs -------------------------------------------------------------------------------

    def _rpc_hello(self) -> dict:
        return {
            "model": "fake-batch", "model_path": None, "tokenizer_path": self.tokenizer_path,
            "dtype": "float32", "device": "cpu", "backend": "cpu", "vocab_size": self.rule.vocab_size,
            "eos_token_ids": sorted(self.eos), "bos_token_id": 1, "max_len": self.max_len,
            "model_version": self.model_version, "protocol_version": protocol.PROTOCOL_VERSION,
            "max_num_seqs": self.max_num_seqs, "capabilities": {"graphs": False, "generate": True},
        }

    def _blocks(self, r: _Req) -> int:
        return math.ceil((len(r.prompt) + len(r.out)) / self.block_size)

    def _rpc_status(self) -> dict:
        used = sum(self._blocks(r) for r in self.running)
        c = self.counters
        return {
            **self._rpc_hello(),
            "scheduler": {"running": len(self.running), "waiting": len(self.waiting),
                          "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": 512,
                          "max_waiting": self.max_waiting, "preemptions": 0, "finished": c["finished"],
                          "aborted": c["aborted"], "prompt_tokens": c["prompt_tokens"],
                          "generation_tokens": c["generation_tokens"], "steps": c["steps"]},
            "kv": {"blocks_total": self.num_blocks, "blocks_used": used, "blocks_free": self.num_blocks - used,
                   "block_size": self.block_size},
            "graphs": None,
            "batch_graphs": {"graphs": 0, "graph_bytes": 0, "capture_ms_p50": 0.0, "capture_ms_p99": 0.0,
                             "eager_steps": c["steps"], "replays": 0, "batch_hist": {}},
            "reloading": self._reload is not None,
        }

    def _rpc_abort(self, request_id: str) -> dict:
        for queue in (self.running, self.waiting):
            for r in list(queue):
                if r.rid == request_id:
                    queue.remove(r)
                    self._finish(r, "abort")
                    return {"aborted": True}
        return {"aborted": False}

    def _admit(self, envelope: list[bytes], msg_id: Any, p: dict) -> None:
        rid, prompt = p["request_id"], p["prompt_ids"]
        if not rid or len(rid) > protocol.MAX_REQUEST_ID_LEN:
            raise BadRequest("generate: request_id must be 1..256 chars")
        if any(r.rid == rid for r in (*self.running, *self.waiting)):
            raise BadRequest(f"generate: request_id {rid!r} is live")
        if not prompt:
            raise BadRequest("generate: prompt_ids is empty")
        if len(prompt) > self.max_len - 1:
            raise BadRequest(f"generate: prompt of {len(prompt)} tokens exceeds max_len - 1 = {self.max_len - 1}")
        if p["max_tokens"] < 1:
            raise BadRequest("generate: max_tokens must be >= 1")
        for i, t in enumerate(prompt):
            if not 0 <= t < self.rule.vocab_size:
                raise BadRequest(f"generate: prompt_ids[{i}] = {t} out of range")
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"waiting queue is full ({self.max_waiting} requests)")
        now = time.monotonic()
        stops = set(p["stop_token_ids"]) | (set() if p["ignore_eos"] else set(self.eos))
        self.waiting.append(_Req(envelope, msg_id, rid, list(prompt), p["max_tokens"], frozenset(stops),
                                 p["stream"], None if p["deadline_s"] is None else now + p["deadline_s"], now))

    def _start_reload(self, envelope: list[bytes], msg_id: Any, p: dict) -> None:
        if self._reload is not None:
            raise ReloadInProgress("reload: another reload is in progress")
        offset = load_offset(p["path"])  # validate before pausing anything
        self._reload = {"envelope": envelope, "msg_id": msg_id, "version": p["version"], "offset": offset,
                        "t0": time.monotonic(), "drained": None}

    # -- the step ---------------------------------------------------------------------------

    def _step(self) -> None:
        now = time.monotonic()
        for queue in (self.running, self.waiting):
            for r in list(queue):
                if r.deadline is not None and now > r.deadline:
                    queue.remove(r)
                    self._finish(r, "abort")
        if self._reload is not None:
            self._advance_reload(now)
        # Admission: paused while a reload is in progress (requests wait, they are not failed).
        while self._reload is None and self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            used = sum(self._blocks(x) for x in self.running)
            if used + math.ceil((len(r.prompt) + 1) / self.block_size) > self.num_blocks:
                break
            self.waiting.popleft()
            r.admitted, r.version, r.offset = now, self.model_version, self.offset
            self.running.append(r)
        if not self.running:
            return
        self.counters["steps"] += 1
        for r in list(self.running):
            t = self._next_token(r)
            r.out.append(t)
            r.unsent += 1
            if r.first_token is None:
                r.first_token = time.monotonic()
            if t in r.stop_ids:
                reason = "stop"
            elif len(r.out) >= r.max_tokens or len(r.prompt) + len(r.out) >= self.max_len:
                reason = "length"
            else:
                reason = None
            if reason is not None:
                self.running.remove(r)
                self._finish(r, reason)
            elif r.stream and r.unsent >= self.reply_every:
                self._reply(r, finished=False, reason=None)

    def _next_token(self, r: _Req) -> int:
        if self.script is not None:
            return self.script[len(r.out) % len(self.script)]
        last = r.out[-1] if r.out else r.prompt[-1]
        return self.rule.next(last, r.offset)

    def _advance_reload(self, now: float) -> None:
        rl = self._reload
        if self.running:
            return  # draining: running requests finish on the old weights (the fake never preempts)
        if rl["drained"] is None:
            rl["drained"] = now
        if now - rl["drained"] < self.reload_copy_s:
            return  # "copying"
        previous, self.model_version, self.offset = self.model_version, rl["version"], rl["offset"]
        self._reload = None
        self._send(rl["envelope"], protocol.make_ok(rl["msg_id"], {
            "model_version": self.model_version, "previous_version": previous,
            "drain_ms": (rl["drained"] - rl["t0"]) * 1e3, "copy_ms": (now - rl["drained"]) * 1e3}))

    def _reply(self, r: _Req, finished: bool, reason: str | None) -> None:
        tokens = r.out[len(r.out) - r.unsent:] if r.stream else list(r.out)
        r.unsent = 0
        result: dict[str, Any] = {"request_id": r.rid, "tokens": tokens, "finished": finished,
                                  "finish_reason": reason, "model_version": r.version or self.model_version}
        if finished:
            now = time.monotonic()
            result["usage"] = {"prompt_tokens": len(r.prompt), "completion_tokens": len(r.out)}
            result["metrics"] = {
                "queue_ms": ((r.admitted or now) - r.received) * 1e3,
                "ttft_ms": ((r.first_token or now) - r.received) * 1e3,
                "e2e_ms": (now - r.received) * 1e3,
            }
        self._send(r.envelope, protocol.make_ok(r.msg_id, result, more=not finished))

    def _finish(self, r: _Req, reason: str) -> None:
        self.counters["aborted" if reason == "abort" else "finished"] += 1
        self.counters["prompt_tokens"] += len(r.prompt)
        self.counters["generation_tokens"] += len(r.out)
        self._reply(r, finished=True, reason=reason)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve the fake batching engine (tests only).")
    p.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:*")
    p.add_argument("--step-s", type=float, default=0.01, help="seconds per step (default: 0.01)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="running requests at most (default: 8)")
    p.add_argument("--max-waiting", type=int, default=16, help="waiting requests at most (default: 16)")
    p.add_argument("--max-len", type=int, default=256, help="prompt + output tokens at most (default: 256)")
    p.add_argument("--num-blocks", type=int, default=64, help="KV blocks of 16 tokens (default: 64)")
    args = p.parse_args(argv)
    engine = FakeBatchEngine(args.tokenizer, args.endpoint, step_s=args.step_s, max_num_seqs=args.max_num_seqs,
                             max_waiting=args.max_waiting, max_len=args.max_len, num_blocks=args.num_blocks).start()
    print(f"{protocol.READY_PREFIX}{engine.endpoint}", flush=True)
    while not engine.wait_stopped(1.0):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
