"""asyncio ZeroMQ client of the engine: many calls in flight over one DEALER socket.

Unlike client.rpc.RPCClient (one call at a time), every request here gets its own msg id and a reply
queue; one reader task routes replies to them by id. `generate` is an async iterator over the
engine's streamed replies; leaving it early (break, cancellation, a closed HTTP connection) sends
`abort` for that request, so the engine frees its KV blocks at once.

Torch-free: the HTTP front end imports it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable, Mapping

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from client.rpc import RPCError, RPCTimeout, ServerDead, remote_error
from graphserver import defaults, protocol
from graphserver.protocol import ProtocolError

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 10.0  # an abort sent on the consumer's behalf; the engine answers it at once
DRAIN_MAX = 256  # replies routed per reader wake-up at most, so other coroutines still get turns


@dataclass(frozen=True)
class _Reply:
    ok: bool
    body: Any  # result, or {"type", "message"} when not ok
    more: bool


class AsyncEngineClient:
    """One DEALER socket to the engine, shared by every coroutine of one event loop.

    Create it inside the running loop (`await AsyncEngineClient.connect(...)` or `async with`).
    process: the engine's Popen when this side spawned it; pending calls then fail with ServerDead
    as soon as it exits. auth: the token a server bound beyond loopback requires (default: the
    GRAPHSERVER_AUTH_TOKEN environment variable, when set, as client.rpc does).
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = protocol.DEFAULT_CALL_TIMEOUT_S,
        *,
        process: subprocess.Popen | None = None,
        auth: str | None = None,
        max_msg_size: int = protocol.DEFAULT_MAX_MSG_SIZE,
        poll_ms: int = protocol.DEFAULT_POLL_MS,
    ):
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.process = process
        self._auth = auth if auth is not None else os.environ.get(defaults.AUTH_TOKEN_ENV) or None
        self._max_msg_size = int(max_msg_size)
        self._poll_ms = int(poll_ms)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[_Reply | BaseException]] = {}
        self._background: set[asyncio.Task] = set()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        # A blocking-API view of the same socket, for draining what is already queued without an
        # asyncio future per message (the reader's own cost bounds how many tokens/s it routes).
        self._drain = zmq.Socket.shadow(self._sock.underlying)
        self._reader: asyncio.Task | None = None
        self._dead: BaseException | None = None  # set once the process is known to have exited
        self._closed = False

    @classmethod
    async def connect(cls, endpoint: str, timeout_s: float = protocol.DEFAULT_CALL_TIMEOUT_S,
                      **kw: Any) -> "AsyncEngineClient":
        client = cls(endpoint, timeout_s, **kw)
        client.start()
        return client

    def start(self) -> None:
        """Start the reader task (idempotent); needs a running loop."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop(), name="engine-reader")

    async def __aenter__(self) -> "AsyncEngineClient":
        self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Let pending aborts go out (bounded), then stop the reader and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._background:
            await asyncio.wait(list(self._background), timeout=2.0)
        for task in list(self._background):
            task.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_pending(RPCError("client closed"))
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._sock.close(0)
        self._ctx.term()

    # -- plumbing -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            try:
                await self._read_once(poller)
            except (asyncio.CancelledError, zmq.ContextTerminated):
                raise
            except Exception:  # a bug here must not leave every caller waiting out its timeout
                log.exception("engine reader failed on one message; reading on")

    async def _read_once(self, poller: zmq.asyncio.Poller) -> None:
        events = dict(await poller.poll(self._poll_ms))
        if self._sock in events:
            # Every reply already queued, not one per wake-up: under load the engine answers
            # many streams per step, and each event-loop round trip costs more than a message.
            for _ in range(DRAIN_MAX):
                try:
                    frames = self._drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._route(frames[-1])
        if self._monitor in events:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED and self._pending:
                # Requests in flight over the dropped connection will never be answered.
                self._fail_pending(self._dead_error() or ServerDead(
                    f"connection to {self.endpoint} dropped with {len(self._pending)} request(s) in flight"))
        if self._dead is None:
            err = self._dead_error()
            if err is not None:
                self._dead = err
                self._fail_pending(err)

    def _route(self, payload: bytes) -> None:
        try:
            obj = protocol.decode(payload, self._max_msg_size)
            msg_id, ok, body = protocol.parse_reply(obj)
        except ProtocolError as e:
            log.warning("dropping an unreadable reply: %s", e)
            return
        queue = self._pending.get(msg_id)
        if queue is None:
            # A late reply to a request its caller gave up on (timeout, abort, early exit).
            log.debug("dropping a reply to msg id %r, which nobody awaits", msg_id)
            return
        queue.put_nowait(_Reply(ok, body, protocol.reply_has_more(obj)))

    def _fail_pending(self, err: BaseException) -> None:
        for queue in self._pending.values():
            queue.put_nowait(err)

    def _dead_error(self) -> ServerDead | None:
        if self.process is None or self.process.poll() is None:
            return None
        return ServerDead(f"engine process {self.process.pid} exited with code {self.process.returncode}")

    async def _send(self, method: str, params: Mapping[str, Any]) -> tuple[int, asyncio.Queue]:
        if self._closed:
            raise RPCError("client is closed")
        if self._dead is not None:
            raise self._dead
        self.start()
        msg_id = next(self._ids)
        request = protocol.make_request(msg_id, method, params)
        if self._auth is not None:
            request["auth"] = self._auth
        payload = protocol.encode(request)
        if len(payload) > self._max_msg_size:
            raise ProtocolError(f"{method}: request of {len(payload)} bytes exceeds max_msg_size {self._max_msg_size}")
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[msg_id] = queue
        try:
            await self._sock.send_multipart([b"", payload])
        except BaseException:
            del self._pending[msg_id]
            raise
        return msg_id, queue

    async def _next(self, method: str, queue: asyncio.Queue, timeout_s: float) -> _Reply:
        try:
            # A reply already queued needs no timer (wait_for costs a task per call).
            item = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), timeout_s)
        except asyncio.TimeoutError:
            raise RPCTimeout(f"{method}: no reply from {self.endpoint} within {timeout_s:g} s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def _spawn(self, coro: Any) -> None:
        """Run `coro` in the background, holding a reference so it is not collected mid-flight."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- calls --------------------------------------------------------------------------------

    async def call(self, method: str, params: Mapping[str, Any] | None = None,
                   timeout_s: float | None = None) -> Any:
        """One request, one reply: the result, or RemoteError / RPCTimeout / ServerDead."""
        msg_id, queue = await self._send(method, dict(params or {}))
        try:
            reply = await self._next(method, queue, self.timeout_s if timeout_s is None else timeout_s)
        finally:
            self._pending.pop(msg_id, None)
        if not reply.ok:
            raise remote_error(reply.body["type"], reply.body["message"])
        return reply.body

    async def hello(self, timeout_s: float | None = None) -> dict:
        return await self.call("hello", timeout_s=timeout_s)

    async def status(self, timeout_s: float | None = None) -> dict:
        return await self.call("status", timeout_s=timeout_s)

    async def abort(self, request_id: str, timeout_s: float | None = None) -> dict:
        return await self.call("abort", {"request_id": request_id}, timeout_s)

    async def reload(self, path: str, version: str, drain_timeout_s: float = protocol.DEFAULT_RELOAD_DRAIN_S,
                     timeout_s: float | None = None) -> dict:
        # The reply comes after the drain and the copy: wait past drain_timeout_s.
        wait = (self.timeout_s if timeout_s is None else timeout_s) + drain_timeout_s
        return await self.call("reload", {"path": path, "version": version, "drain_timeout_s": drain_timeout_s}, wait)

    async def stop(self, timeout_s: float | None = None) -> Any:
        return await self.call("stop", timeout_s=timeout_s)

    async def generate(
        self,
        request_id: str,
        prompt_ids: Iterable[int],
        *,
        max_tokens: int = protocol.DEFAULT_MAX_TOKENS,
        sampling: Mapping[str, Any] | None = None,
        stop_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        stream: bool = True,
        deadline_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[dict]:
        """Yield each reply's result ({"request_id", "tokens", "finished", "finish_reason",
        "model_version", and on the last "usage", "metrics"}); the last has finished=True.
        Replies that are already waiting when one is taken come merged into it (their tokens
        joined, the later fields kept): a consumer that falls behind catches up in one step
        instead of paying its per-reply cost for every token.

        idle_timeout_s: the longest wait for the next reply (default: the client's timeout_s).
        Leaving the loop before the last reply, for any reason, aborts the request in the engine.
        Use `contextlib.aclosing` so that happens at once rather than when the generator is collected.
        """
        params: dict[str, Any] = {
            "request_id": request_id, "prompt_ids": [int(t) for t in prompt_ids], "max_tokens": int(max_tokens),
            "sampling": dict(sampling or {}), "stop_token_ids": [int(t) for t in stop_token_ids],
            "ignore_eos": bool(ignore_eos), "stream": bool(stream),
        }
        if deadline_s is not None:
            params["deadline_s"] = float(deadline_s)
        timeout = self.timeout_s if idle_timeout_s is None else idle_timeout_s
        msg_id, queue = await self._send("generate", params)
        done = False  # the engine has sent its last reply (or refused the request)
        held: Any = None  # taken from the queue while merging, not merged: next in line
        try:
            while True:
                if held is None:
                    reply = await self._next("generate", queue, timeout)
                elif isinstance(held, BaseException):
                    raise held
                else:
                    reply, held = held, None
                if not reply.ok:
                    done = True
                    raise remote_error(reply.body["type"], reply.body["message"])
                body, more = reply.body, reply.more
                while more and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException) or not nxt.ok:
                        held = nxt
                        break
                    body = {**nxt.body, "tokens": list(body.get("tokens") or ()) + list(nxt.body.get("tokens") or ())}
                    more = nxt.more
                done = not more
                yield body
                if done:
                    return
        finally:
            self._pending.pop(msg_id, None)
            if not done and not self._closed and self._dead is None:
                # Not awaited here: this may run inside a cancelled task, where an await would be
                # cancelled again before the abort left.
                self._spawn(self._abort_quietly(request_id))

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.abort(request_id, timeout_s=ABORT_TIMEOUT_S)
        except RPCError as e:
            log.warning("abort of %s failed: %s", request_id, e)
