"""ZeroMQ client of the graph server: typed errors, timeouts, a connect handshake, streamed
`generate`, and spawning a server process. Torch-free."""

from __future__ import annotations

import collections
import importlib.util
import itertools
import logging
import os
import queue
import stat
import subprocess
import sys
import threading
import time
import uuid
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from graphserver import argtypes, defaults, errors, protocol
from graphserver.protocol import ProtocolError

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 40
# The hello a client sends on connect. Short: the server answers hello from its IO thread at once,
# even while the engine is busy, so a silent endpoint means nothing (or something foreign) is there.
DEFAULT_HANDSHAKE_S = 3.0
ABORT_DRAIN_S = 10.0  # closing a generate stream early: wait this long for its final reply
_MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                   | zmq.EVENT_DISCONNECTED)


# ---------------------------------------------------------------------------------------------
# Errors


class RPCError(Exception):
    """Base of every error this client raises for a failed call."""


class ServerDead(RPCError):
    """The server process exited, or the connection dropped while a reply was awaited."""


class ServerExited(ServerDead):
    """A spawned server exited before it printed READY. `returncode` is its exit code (2: it refused
    its arguments); `summary` is the message without the stderr tail, which was forwarded already."""

    def __init__(self, returncode: int | None, tail: str):
        self.returncode = returncode
        self.summary = f"server exited with code {returncode} before READY"
        super().__init__(self.summary + (f"; stderr tail:\n{tail}" if tail else ""))


class RPCTimeout(RPCError, TimeoutError):
    """No reply within the timeout. The server may still be working on the request."""


class NoServer(RPCError):
    """No graph server at the endpoint: no socket file, nothing accepting connections, a peer that
    does not speak ZeroMQ or does not answer hello, or a TCP connect that looped back to itself."""


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


class RemoteOverloaded(RemoteError, errors.Overloaded):
    pass


class RemoteShuttingDown(RemoteError, errors.ShuttingDown):
    pass


class RemoteUnauthorized(RemoteError, errors.Unauthorized):
    pass


_REMOTE_TYPES: Mapping[str, type[RemoteError]] = MappingProxyType({
    "BadRequest": RemoteBadRequest,
    "ReloadInProgress": RemoteBadRequest,  # a BadRequest engine-side too; .type tells them apart
    "UnknownSession": RemoteUnknownSession,
    "KVExhausted": RemoteKVExhausted,
    "Unavailable": RemoteUnavailable,
    "ProtocolError": RemoteProtocolError,
    "InternalError": RemoteInternalError,
    "Overloaded": RemoteOverloaded,
    "ShuttingDown": RemoteShuttingDown,
    "Unauthorized": RemoteUnauthorized,
})


def remote_error(type: str, message: str) -> RemoteError:
    return _REMOTE_TYPES.get(type, RemoteError)(type, message)


# ---------------------------------------------------------------------------------------------
# Client


class RPCClient:
    """A DEALER socket to one server. Not thread-safe: use it from one thread.

    Calls run one at a time, except that generate() streams stay open while other calls (abort,
    status, another generate) go out: replies are routed to their stream by message id.

    endpoint: ipc://PATH or tcp://HOST:PORT, checked before use (ValueError when malformed).
    timeout_s: how long one call waits for its reply; it is also sent as the server-side deadline_s
      of kv_init / replay_seq / generate (send_deadlines=False leaves that out).
    handshake_s: on connect, send `hello` and wait this long for it (the server answers hello at
      once, even while busy); NoServer when nothing answers. None skips the handshake.
    auth_token: sent as the request envelope's "auth" on every request; default: the
      GRAPHSERVER_AUTH_TOKEN environment variable, when set.
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
        handshake_s: float | None = DEFAULT_HANDSHAKE_S,
        auth_token: str | None = None,
        send_deadlines: bool = True,
    ):
        self._ep = argtypes.parse_endpoint(endpoint, bind=False)  # ValueError with one line
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if handshake_s is not None and not handshake_s > 0:
            raise ValueError(f"handshake_s must be > 0 (or None to skip), got {handshake_s}")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.process = process
        self.send_deadlines = send_deadlines
        self._auth = auth_token if auth_token is not None else os.environ.get(defaults.AUTH_TOKEN_ENV) or None
        self._max_msg_size = int(max_msg_size)
        self._poll_ms = int(poll_ms)
        self._ids = itertools.count(1)
        # Replies that arrived for an open generate stream while another call was awaited.
        self._inbox: dict[int, collections.deque] = {}
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._connected = False  # a transport connection was made (TCP accept / ipc connect)
        self._zmtp_ok = False  # the peer completed a ZeroMQ handshake
        self.server_info: dict | None = None  # the hello result of the handshake
        try:
            self._check_ipc_path()
            self._open_socket()
            if handshake_s is not None:
                self.server_info = self._handshake(float(handshake_s))
        except BaseException:
            self.close()
            raise

    # -- socket lifecycle ---------------------------------------------------------------------

    def _check_ipc_path(self) -> None:
        path = self._ep.path
        if self._ep.scheme != "ipc" or path.startswith("@"):
            return
        if not os.path.exists(path):
            raise NoServer(f"no server at {self.endpoint}: {path} does not exist (is the server running?)")
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise NoServer(f"no server at {self.endpoint}: {path} is not a socket")

    def _open_socket(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # never block exit on unsent requests to a dead server
        # A disconnect while a reply is awaited means the request is lost: watch for it. The other
        # events tell the handshake's failures apart (refused / not ZeroMQ / silent).
        self._monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        self._connected = self._zmtp_ok = False
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
        # socket (new routing identity) makes such replies undeliverable instead. Open streams
        # lose their replies with it; they raise when read next.
        self._inbox.clear()
        self._close_socket()
        self._open_socket()

    def close(self) -> None:
        self._inbox.clear()
        self._close_socket()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> "RPCClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _handshake(self, timeout_s: float) -> dict:
        msg_id = self._send("hello", {})
        try:
            ok, info, _ = self._await_reply("hello", msg_id, time.monotonic() + timeout_s)
        except RPCTimeout:
            self._drain_monitor()
            if not self._connected:
                why = "nothing accepts connections there (connection refused)"
            elif not self._zmtp_ok:
                why = "something accepted the connection but does not speak ZeroMQ"
            else:
                why = "a ZeroMQ peer is there but did not answer hello (not a graph server?)"
            raise NoServer(f"no server at {self.endpoint}: {why}; waited {timeout_s:g} s") from None
        except ServerDead:
            if self.process is not None:
                raise
            raise NoServer(f"no server at {self.endpoint}: the peer closed the connection during the "
                           "handshake (not a graph server?)") from None
        if not ok:
            if info["type"] == "ProtocolError":
                raise NoServer(f"{self.endpoint} does not speak this protocol: {info['message']}")
            raise remote_error(info["type"], info["message"])  # e.g. Unauthorized: a wrong token
        if not isinstance(info, dict):
            raise NoServer(f"{self.endpoint} answered hello with {type(info).__name__}, not a map")
        version = info.get("protocol_version")
        if version is not None and version != protocol.PROTOCOL_VERSION:
            raise RPCError(f"{self.endpoint} speaks protocol version {version}; this client speaks "
                           f"{protocol.PROTOCOL_VERSION}")
        return info

    # -- calls --------------------------------------------------------------------------------

    def call(self, method: str, /, **params: Any) -> Any:
        """Send one request and return its result, or raise RemoteError/RPCTimeout/ServerDead."""
        return self.request(method, params)

    def request(self, method: str, params: Mapping[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        t0 = time.perf_counter()
        msg_id = self._send(method, params)
        try:
            ok, body, more = self._await_reply(method, msg_id, time.monotonic() + timeout_s, timeout_s)
        except BaseException:  # timeout, dead server, garbage reply, Ctrl-C: the request is abandoned
            self._reset_socket()
            raise
        log.debug("%s #%s: %s in %.1f ms", method, msg_id, "ok" if ok else "error", (time.perf_counter() - t0) * 1e3)
        if not ok:  # a complete error reply: the socket is in a clean state and stays
            raise remote_error(body["type"], body["message"])
        if more:
            self._reset_socket()  # a stream where one reply was expected: drop the rest
            raise RPCError(f"{method}: the server streamed a reply; use the streaming call for it")
        return body

    def _send(self, method: str, params: Mapping[str, Any] | None) -> int:
        if self._sock is None:
            raise RPCError("client is closed")
        msg_id = next(self._ids)
        req = protocol.make_request(msg_id, method, params)
        if self._auth is not None:
            req["auth"] = self._auth
        payload = protocol.encode(req)
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
        return msg_id

    def _await_reply(self, method: str, msg_id: int, deadline: float, limit_s: float | None = None
                     ) -> tuple[bool, Any, bool]:
        """(ok, result or {"type", "message"}, more) for the next reply to msg_id, by `deadline`
        (time.monotonic()). Replies for other open streams are kept in their inbox."""
        box = self._inbox.get(msg_id)
        if box:
            return box.popleft()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                within = f"{limit_s:g} s" if limit_s is not None else "the timeout"
                raise RPCTimeout(f"{method}: no reply from {self.endpoint} within {within}")
            events = dict(poller.poll(min(remaining * 1000, self._poll_ms)))
            if self._sock in events:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
                obj = protocol.decode(frames[-1], self._max_msg_size)
                if _looks_like_request(obj):
                    # A DEALER connecting to a free local TCP port can be handed that very port as
                    # its source port and connect to itself; then its requests come back to it.
                    raise NoServer(
                        f"{method}: got a request back instead of a reply: nothing listens at "
                        f"{self.endpoint}, and the connection looped back to this client itself "
                        "(TCP self-connect on a free port); start the server, or check the port")
                reply_id, ok, body = protocol.parse_reply(obj)
                entry = (ok, body, protocol.reply_has_more(obj))
                # id None: the server could not read our id (a ProtocolError reply) -- it is ours,
                # since it answers the one request this call is waiting on.
                if reply_id == msg_id or (reply_id is None and not ok):
                    return entry
                if reply_id in self._inbox:
                    self._inbox[reply_id].append(entry)
                else:
                    log.debug("discarding stale reply id %r (waiting for %r)", reply_id, msg_id)
                continue
            if self._monitor in events:
                self._on_monitor_event(method)
            self._check_process(method)

    def _on_monitor_event(self, method: str | None) -> None:
        event = recv_monitor_message(self._monitor)["event"]
        if event == zmq.EVENT_CONNECTED:
            self._connected = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._zmtp_ok = True
        elif event == zmq.EVENT_DISCONNECTED and method is not None:
            self._check_process(method)
            raise ServerDead(
                f"{method}: connection to {self.endpoint} dropped while awaiting the reply "
                "(the server died, or refused the message as larger than its MAXMSGSIZE)"
            )

    def _drain_monitor(self) -> None:
        while self._monitor.poll(0):
            self._on_monitor_event(None)

    def _check_process(self, method: str) -> None:
        if self.process is None or self.process.poll() is None:
            return
        tail = _stderr_tail(self.process)
        raise ServerDead(
            f"{method}: server process {self.process.pid} exited with code {self.process.returncode}"
            + (f"; stderr tail:\n{tail}" if tail else "")
        )

    def _deadline(self, deadline_s: float | None) -> float | None:
        """The deadline_s param: the given one, else this call's timeout (None when not sent)."""
        if deadline_s is not None:
            return float(deadline_s)
        return self.timeout_s if self.send_deadlines else None

    # -- one method per RPC ---------------------------------------------------------------------

    def hello(self) -> dict:
        return self.call("hello")

    def status(self) -> dict:
        return self.call("status")

    def kv_init(self, session: str, input_ids: Sequence[int], top_k: int | None = None, *,
                replace: bool | None = None, deadline_s: float | None = None) -> dict:
        return self.call("kv_init", **_given(session=session, input_ids=list(input_ids), top_k=top_k,
                                             replace=replace, deadline_s=self._deadline(deadline_s)))

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
        *,
        deadline_s: float | None = None,
    ) -> dict:
        return self.call(
            "replay_seq",
            **_given(session=session, steps=steps, start_token=start_token, sampling=dict(sampling or {}),
                     stop_token_ids=list(stop_token_ids), deadline_s=self._deadline(deadline_s)),
        )

    def step(self, session: str, token: int) -> dict:
        return self.call("step", session=session, token=token)

    def kv_free(self, session: str) -> dict:
        return self.call("kv_free", session=session)

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int = protocol.DEFAULT_MAX_TOKENS,
        sampling: Mapping[str, Any] | None = None,
        stop_token_ids: Iterable[int] = (),
        *,
        ignore_eos: bool = False,
        stream: bool = True,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> "GenerateStream":
        """Start a `generate` request (see ENGINE_RPC.md) and return its stream at once.

        Iterate it for each reply's result ({"request_id", "tokens" (new since the last reply),
        "finished", "finish_reason", "model_version", and on the last one "usage", "metrics"}); it
        ends after the final reply. timeout_s (default: the client's) bounds the whole request and
        is sent as its deadline_s. Closing the stream before its end aborts the request."""
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        rid = request_id if request_id is not None else f"gen-{uuid.uuid4().hex}"
        params = _given(request_id=rid, prompt_ids=list(prompt_ids), max_tokens=max_tokens,
                        sampling=dict(sampling or {}), stop_token_ids=list(stop_token_ids),
                        ignore_eos=ignore_eos, stream=stream,
                        deadline_s=timeout if self.send_deadlines else None)
        msg_id = self._send("generate", params)
        self._inbox[msg_id] = collections.deque()
        return GenerateStream(self, msg_id, rid, time.monotonic() + timeout)

    def abort(self, request_id: str) -> dict:
        """Abort a generate request; -> {"aborted": bool} (False: unknown or already finished).
        The request's stream still ends with its final reply, finish_reason "abort"."""
        return self.call("abort", request_id=request_id)

    def stop(self, timeout_s: float | None = None) -> Any:
        return self.request("stop", {}, timeout_s)


class GenerateStream:
    """The replies of one generate request, as an iterator of their results (see RPCClient.generate).

    `with client.generate(...) as s: for r in s: ...` aborts the request if the block is left early."""

    def __init__(self, client: RPCClient, msg_id: int, request_id: str, deadline: float):
        self._client = client
        self._msg_id = msg_id
        self.request_id = request_id
        self._deadline = deadline
        self.finished = False
        self.final: dict | None = None  # the last reply's result, once seen

    def __iter__(self) -> "GenerateStream":
        return self

    def __next__(self) -> dict:
        if self.finished:
            raise StopIteration
        c = self._client
        if self._msg_id not in c._inbox:
            self.finished = True
            raise RPCError(f"generate {self.request_id}: the stream was lost (the client's socket was "
                           "reset after an earlier failure)")
        try:
            ok, body, more = c._await_reply("generate", self._msg_id, self._deadline)
        except BaseException:
            self._end()
            c._reset_socket()
            raise
        if not ok:
            self._end()
            raise remote_error(body["type"], body["message"])
        if not more:
            self._end()
            self.final = body
        return body

    def _end(self) -> None:
        self.finished = True
        self._client._inbox.pop(self._msg_id, None)

    def collect(self) -> dict:
        """Read the stream to its end: the final result with "tokens" holding every token."""
        tokens: list[int] = []
        last: dict = {}
        for r in self:
            tokens += list(r.get("tokens") or ())
            last = r
        return {**last, "tokens": tokens}

    def close(self) -> None:
        """Abort the request if it is still running and read its stream to the end (bounded)."""
        if self.finished:
            return
        c = self._client
        self._deadline = time.monotonic() + min(c.timeout_s, ABORT_DRAIN_S)
        try:
            c.abort(self.request_id)
            for _ in self:
                pass
        except RPCError as e:
            log.warning("generate %s: abort on close failed (%s); resetting the socket", self.request_id, e)
            self._end()
            c._reset_socket()

    def __enter__(self) -> "GenerateStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _looks_like_request(obj: Any) -> bool:
    return isinstance(obj, dict) and "method" in obj and "ok" not in obj


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
    argv: Sequence[str], timeout_s: float = protocol.DEFAULT_SPAWN_TIMEOUT_S, env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> tuple[ServerPopen, str]:
    """Start `argv` and wait for its `READY <endpoint>` stdout line. Lines before it, later stdout
    and all of stderr go to our stderr. Raises ServerDead (exited first) or RPCTimeout (killed).
    pass_fds: file descriptors the child inherits (e.g. a listening socket)."""
    proc = ServerPopen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=_child_env(env), pass_fds=tuple(pass_fds))
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
            raise ServerExited(proc.returncode, _stderr_tail(proc))
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


def _exit_code(proc: subprocess.Popen, wait_s: float) -> int | None:
    """The process's exit code once it exits within wait_s; None while it still runs."""
    try:
        return proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None


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
        auth_token: str | None = None,
    ):
        self._argv = list(argv) if argv is not None else server_argv(model, extra_args)
        self._auth_token = auth_token
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
            # The handshake checks the protocol version and fills client.server_info; a server that
            # printed READY answers at once, so the full call timeout only guards a wedged one.
            self.client = RPCClient(self.endpoint, self._call_timeout_s, process=self.process,
                                    handshake_s=self._call_timeout_s, auth_token=self._auth_token)
        except BaseException:
            _reap(self.process, grace_s=0.0)
            raise
        return self.client

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.client is not None and self.process.poll() is None:
                try:
                    self.client.stop(timeout_s=self._stop_timeout_s)
                except ServerDead as e:
                    # Ctrl-C reaches the whole process group: the server may have exited on its
                    # own signal while our stop was on the way. A clean exit is not a failure.
                    if _exit_code(self.process, self._stop_timeout_s) != 0:
                        log.warning("stop failed (%s); terminating the server", e)
                except RPCError as e:
                    log.warning("stop failed (%s); terminating the server", e)
        finally:
            if self.client is not None:
                self.client.close()
            _reap(self.process, grace_s=self._stop_timeout_s)
