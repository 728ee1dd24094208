"""ZeroMQ client of the graph server: typed errors, timeouts, and spawning a server process."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from graphserver import errors, protocol
from graphserver.protocol import ProtocolError

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40


# ---------------------------------------------------------------------------------------------
# Errors


class RPCError(Exception):
    """Base of every error this client raises for a failed call."""


class ServerDead(RPCError):
    """The server process exited, or the connection dropped while a reply was awaited."""


class RPCTimeout(RPCError, TimeoutError):
    """No reply within the timeout. The server may still be working on the request."""


class RemoteError(RPCError):
    """The server answered with an error reply. `type` is the server-side exception class name."""

    def __init__(self, type: str, message: str):
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


# Remote engine errors also derive from the local class of the same name, so callers can write
# `except errors.UnknownSession` whether the engine runs in-process or behind this client.
class RemoteBadRequest(RemoteError, errors.BadRequest):
    pass


class RemoteUnknownSession(RemoteError, errors.UnknownSession):
    pass


class RemoteKVExhausted(RemoteError, errors.KVExhausted):
    pass


class RemoteUnavailable(RemoteError, errors.Unavailable):
    pass


class RemoteProtocolError(RemoteError):
    """The server could not parse the request (a client/server protocol mismatch)."""


class RemoteInternalError(RemoteError):
    """The engine failed unexpectedly; the server logged a traceback and keeps serving."""


_REMOTE_TYPES: Mapping[str, type[RemoteError]] = MappingProxyType({
    "BadRequest": RemoteBadRequest,
    "UnknownSession": RemoteUnknownSession,
    "KVExhausted": RemoteKVExhausted,
    "Unavailable": RemoteUnavailable,
    "ProtocolError": RemoteProtocolError,
    "InternalError": RemoteInternalError,
})


def remote_error(type: str, message: str) -> RemoteError:
    return _REMOTE_TYPES.get(type, RemoteError)(type, message)


# ---------------------------------------------------------------------------------------------
# Client


class RPCClient:
    """A DEALER socket to one server. Not thread-safe: one call at a time.

    process: the server's Popen when this side spawned it; a call then raises ServerDead as soon as
    the process has exited instead of waiting out the timeout.
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float = protocol.DEFAULT_CALL_TIMEOUT_S,
        *,
        process: subprocess.Popen | None = None,
        max_msg_size: int = protocol.DEFAULT_MAX_MSG_SIZE,
        poll_ms: int = protocol.DEFAULT_POLL_MS,
    ):
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.process = process
        self._max_msg_size = int(max_msg_size)
        self._poll_ms = int(poll_ms)
        self._ids = itertools.count(1)
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._open_socket()

    # -- socket lifecycle ---------------------------------------------------------------------

    def _open_socket(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # never block exit on unsent requests to a dead server
        # A disconnect while a reply is awaited means the request is lost: watch for it.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self._sock = sock

    def _close_socket(self) -> None:
        if self._sock is None:
            return
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._sock.close(0)
        self._sock = self._monitor = None

    def _reset_socket(self) -> None:
        # A DEALER with an unanswered request would hand its late reply to the next call; a fresh
        # socket (new routing identity) makes such replies undeliverable instead.
        self._close_socket()
        self._open_socket()

    def close(self) -> None:
        self._close_socket()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> "RPCClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------------

    def call(self, method: str, /, **params: Any) -> Any:
        """Send one request and return its result, or raise RemoteError/RPCTimeout/ServerDead."""
        return self.request(method, params)

    def request(self, method: str, params: Mapping[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        if self._sock is None:
            raise RPCError("client is closed")
        msg_id = next(self._ids)
        payload = protocol.encode(protocol.make_request(msg_id, method, params))
        if len(payload) > self._max_msg_size:
            # The server would drop it and disconnect us; fail here with a clear message instead.
            raise ProtocolError(f"{method}: request of {len(payload)} bytes exceeds max_msg_size {self._max_msg_size}")
        self._check_process(method)
        self._drain_monitor()  # disconnects from before this request do not concern it
        try:
            self._sock.send_multipart([b"", payload], zmq.NOBLOCK)
        except zmq.Again:
            self._reset_socket()
            raise RPCTimeout(f"{method}: cannot queue the request (server unreachable?)") from None
        try:
            ok, body = self._await_reply(method, msg_id, self.timeout_s if timeout_s is None else timeout_s)
        except BaseException:  # timeout, dead server, garbage reply, Ctrl-C: the request is abandoned
            self._reset_socket()
            raise
        if not ok:  # a complete error reply: the socket is in a clean state and stays
            raise remote_error(body["type"], body["message"])
        return body

    def _await_reply(self, method: str, msg_id: int, timeout_s: float) -> tuple[bool, Any]:
        """(True, result) or (False, {"type", "message"}) for the reply to msg_id."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RPCTimeout(f"{method}: no reply from {self.endpoint} within {timeout_s:g} s")
            events = dict(poller.poll(min(remaining * 1000, self._poll_ms)))
            if self._sock in events:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
                reply_id, ok, body = protocol.parse_reply(protocol.decode(frames[-1], self._max_msg_size))
                # id None: the server could not read our id (a ProtocolError reply) -- it is ours,
                # since only one request is ever outstanding on this socket.
                if reply_id != msg_id and not (reply_id is None and not ok):
                    log.debug("discarding stale reply id %r (waiting for %r)", reply_id, msg_id)
                    continue
                return ok, body
            if self._monitor in events:
                event = recv_monitor_message(self._monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._check_process(method)
                    raise ServerDead(
                        f"{method}: connection to {self.endpoint} dropped while awaiting the reply "
                        "(the server died, or refused the message as larger than its MAXMSGSIZE)"
                    )
            self._check_process(method)

    def _drain_monitor(self) -> None:
        while self._monitor.poll(0):
            recv_monitor_message(self._monitor)

    def _check_process(self, method: str) -> None:
        if self.process is None or self.process.poll() is None:
            return
        tail = _stderr_tail(self.process)
        raise ServerDead(
            f"{method}: server process {self.process.pid} exited with code {self.process.returncode}"
            + (f"; stderr tail:\n{tail}" if tail else "")
        )

    # -- one method per RPC ---------------------------------------------------------------------

    def hello(self) -> dict:
        return self.call("hello")

    def status(self) -> dict:
        return self.call("status")

    def kv_init(self, session: str, input_ids: Sequence[int], top_k: int | None = None) -> dict:
        return self.call("kv_init", **_given(session=session, input_ids=list(input_ids), top_k=top_k))

    def bg_capture_start(self, ahead: int | None = None, behind: int | None = None) -> dict:
        return self.call("bg_capture_start", **_given(ahead=ahead, behind=behind))

    def wait_precapture(self, min_ahead: int, timeout_s: float = protocol.DEFAULT_PRECAPTURE_TIMEOUT_S) -> dict:
        # The server may legitimately block for timeout_s; wait a little longer than that.
        return self.request(
            "wait_precapture", {"min_ahead": min_ahead, "timeout_s": timeout_s}, max(self.timeout_s, timeout_s + 5.0)
        )

    def bg_capture_stop(self) -> dict:
        return self.call("bg_capture_stop")

    def replay_seq(
        self,
        session: str,
        steps: int,
        start_token: int | None = None,
        sampling: Mapping[str, Any] | None = None,
        stop_token_ids: Iterable[int] = (),
    ) -> dict:
        return self.call(
            "replay_seq",
            **_given(session=session, steps=steps, start_token=start_token, sampling=dict(sampling or {}),
                     stop_token_ids=list(stop_token_ids)),
        )

    def step(self, session: str, token: int) -> dict:
        return self.call("step", session=session, token=token)

    def kv_free(self, session: str) -> dict:
        return self.call("kv_free", session=session)

    def stop(self, timeout_s: float | None = None) -> Any:
        return self.request("stop", {}, timeout_s)


def _given(**kw: Any) -> dict:
    """Drop None-valued optional params so the protocol's defaults apply."""
    return {k: v for k, v in kw.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Spawning


class ServerPopen(subprocess.Popen):
    """A Popen whose stderr is forwarded to ours and whose last lines are kept for error messages."""

    stderr_lines: collections.deque
    stderr_thread: threading.Thread

    def stderr_tail(self) -> str:
        return "".join(self.stderr_lines)


def _stderr_tail(proc: subprocess.Popen) -> str:
    tail = getattr(proc, "stderr_tail", None)
    if tail is None:
        return ""
    forwarder = getattr(proc, "stderr_thread", None)
    if forwarder is not None:
        forwarder.join(timeout=1.0)  # the process has exited: let its last lines arrive
    return tail().rstrip()


def _forward(stream: Any, keep: collections.deque | None, lines: queue.Queue | None) -> None:
    """Copy a child's pipe line by line into `lines` (then a final None), or else to our stderr,
    keeping the last lines in `keep`. Runs until the pipe closes, so the child never blocks on it."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        if keep is not None:
            keep.append(line)
        if lines is not None:
            lines.put(line)
        else:
            _write_stderr(line)
    stream.close()
    if lines is not None:
        lines.put(None)


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The child must import the same graphserver we did, installed or from a source tree."""
    env = dict(os.environ if env is None else env)
    spec = importlib.util.find_spec("graphserver")
    if spec is not None and spec.origin:
        root = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def spawn_process(
    argv: Sequence[str], timeout_s: float = protocol.DEFAULT_SPAWN_TIMEOUT_S, env: Mapping[str, str] | None = None
) -> tuple[ServerPopen, str]:
    """Start `argv` and wait for its `READY <endpoint>` stdout line. Lines before it, later stdout
    and all of stderr go to our stderr. Raises ServerDead (exited first) or RPCTimeout (killed)."""
    proc = ServerPopen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=_child_env(env))
    proc.stderr_lines = collections.deque(maxlen=STDERR_TAIL_LINES)
    proc.stderr_thread = threading.Thread(
        target=_forward, args=(proc.stderr, proc.stderr_lines, None), daemon=True, name="server-stderr"
    )
    proc.stderr_thread.start()
    stdout_lines: queue.Queue = queue.Queue()
    threading.Thread(target=_forward, args=(proc.stdout, None, stdout_lines), daemon=True,
                     name="server-stdout").start()
    try:
        endpoint = _await_ready(proc, stdout_lines, timeout_s)
    except BaseException:
        _reap(proc, grace_s=0.0)
        raise
    # Keep draining stdout after READY so the child can never block on a full pipe.
    threading.Thread(target=_drain_queue_to_stderr, args=(stdout_lines,), daemon=True, name="server-stdout-fwd").start()
    return proc, endpoint


def _await_ready(proc: ServerPopen, lines: queue.Queue, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RPCTimeout(f"server {proc.pid} printed no READY line within {timeout_s:g} s; stderr tail:\n"
                             + proc.stderr_tail())
        try:
            line = lines.get(timeout=min(remaining, 0.1))
        except queue.Empty:
            continue
        if line is None:  # stdout closed: the process is exiting
            proc.wait(timeout=5.0)
            tail = _stderr_tail(proc)
            raise ServerDead(f"server exited with code {proc.returncode} before READY"
                             + (f"; stderr tail:\n{tail}" if tail else ""))
        if line.startswith(protocol.READY_PREFIX):
            return line[len(protocol.READY_PREFIX):].strip()
        _write_stderr(line)


def _drain_queue_to_stderr(lines: queue.Queue) -> None:
    while (line := lines.get()) is not None:
        _write_stderr(line)


def _write_stderr(line: str) -> None:
    # Looked up per line (pytest swaps sys.stderr); a closed stderr at exit is not an error.
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (ValueError, OSError, AttributeError):
        pass


def server_argv(model: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "graphserver", "--exit-with-parent"]
    if model is not None:
        argv += ["--model", model]
    return argv + list(extra_args)


def spawn_server(
    model: str | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = protocol.DEFAULT_SPAWN_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> tuple[ServerPopen, str]:
    """Start `python -m graphserver --exit-with-parent [--model MODEL] EXTRA_ARGS...` and return
    (process, endpoint) once it is READY."""
    return spawn_process(server_argv(model, extra_args), timeout_s, env)


def _reap(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait up to grace_s for a clean exit, then SIGTERM, then SIGKILL: never leave an orphan."""
    for action, wait_s in ((None, grace_s), (proc.terminate, 5.0), (proc.kill, 5.0)):
        if proc.poll() is not None:
            return
        if action is not None:
            action()
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class ServerProcess:
    """`with ServerProcess(model=...) as client:` spawns a server, yields an RPCClient bound to it,
    and on exit sends `stop`, waits, then terminates or kills it if needed."""

    def __init__(
        self,
        model: str | None = None,
        extra_args: Sequence[str] = (),
        *,
        spawn_timeout_s: float = protocol.DEFAULT_SPAWN_TIMEOUT_S,
        call_timeout_s: float = protocol.DEFAULT_CALL_TIMEOUT_S,
        stop_timeout_s: float = 10.0,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ):
        self._argv = list(argv) if argv is not None else server_argv(model, extra_args)
        self._spawn_timeout_s = spawn_timeout_s
        self._call_timeout_s = call_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._env = env
        self.process: ServerPopen | None = None
        self.endpoint: str | None = None
        self.client: RPCClient | None = None

    def __enter__(self) -> RPCClient:
        self.process, self.endpoint = spawn_process(self._argv, self._spawn_timeout_s, self._env)
        try:
            self.client = RPCClient(self.endpoint, self._call_timeout_s, process=self.process)
        except BaseException:
            _reap(self.process, grace_s=0.0)
            raise
        return self.client

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.client is not None and self.process.poll() is None:
                try:
                    self.client.stop(timeout_s=self._stop_timeout_s)
                except RPCError as e:
                    log.warning("stop failed (%s); terminating the server", e)
        finally:
            if self.client is not None:
                self.client.close()
            _reap(self.process, grace_s=self._stop_timeout_s)
