"""The server process's loop: ZeroMQ on an IO thread, the engine on the loop thread.

No socket ever waits on a GPU step. The IO thread owns the ROUTER socket: it receives, decodes and
checks every request (envelope, auth token, params), answers `hello` and every malformed request
itself at once, and hands the rest to the loop thread through a queue. The loop thread drains that
queue, then runs one engine step when there is work, and sends its replies back through an inproc
PUSH socket the IO thread forwards from (ZeroMQ sockets are not thread-safe: each has one owner).

Bind policy: ipc:// or loopback TCP by default. Any other address needs allow_remote=True and an
auth token, which every request must then carry (compared in constant time). An ipc path that a
live server answers on is refused; a stale socket file (a server killed with -9) is removed.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import queue
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

import zmq

from .. import protocol
from ..errors import EngineError, ShuttingDown, Unauthorized
from ..protocol import ProtocolError
from ..tracing import Tracer

SOCKET_NAME = "graphserver.sock"
IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux including the NUL; zmq refuses longer paths
INTERNAL_ERROR = "InternalError"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
DEFERRED_METHODS = frozenset({"reload"})      # answered from a later step, once


class EndpointError(ValueError):
    """A user-supplied endpoint that cannot or must not be served (the message says why)."""


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(endpoint: str, allow_remote: bool, auth_token: Optional[str]) -> str:
    """Validate an endpoint string; returns it with port 0 spelled as zmq's '*'."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not path:
            raise EndpointError("ipc:// endpoint needs a path, e.g. ipc:///tmp/graphserver.sock")
        if len(os.fsencode(path)) > IPC_PATH_MAX:
            raise EndpointError(f"ipc path is {len(path)} bytes, longer than the OS limit "
                                f"{IPC_PATH_MAX}: {path}")
        return endpoint
    if endpoint.startswith("inproc://"):     # same-process peers only (tests)
        return endpoint
    if not endpoint.startswith("tcp://"):
        raise EndpointError(f"endpoint {endpoint!r} must be ipc://PATH or tcp://HOST:PORT")
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not host:
        raise EndpointError(f"endpoint {endpoint!r} needs a host and a port: tcp://127.0.0.1:5555")
    if port not in ("*", "0"):
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise EndpointError(f"port {port!r} of {endpoint!r} must be 1..65535 (or 0 / * for "
                                "any free port)")
    if not _is_loopback(host):
        if not allow_remote:
            raise EndpointError(f"{endpoint} would accept connections from other machines; the "
                                "RPC has no encryption and accepts `stop`. Bind 127.0.0.1, or pass "
                                "--allow-remote with --auth-token")
        if not auth_token:
            raise EndpointError(f"binding {endpoint} beyond loopback needs an auth token "
                                "(--auth-token or GRAPHSERVER_AUTH_TOKEN)")
    return f"tcp://{host}:*" if port == "0" else endpoint


def _ipc_alive(path: str, timeout_ms: int = 1000) -> bool:
    """True when something answers a connect on this unix socket path."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_ms / 1e3)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


@dataclass
class Inbound:
    envelope: list[bytes]
    msg_id: Any
    method: str
    params: dict
    t0: float


class EngineProc:
    """Serves `engine` (graphserver.engine.Engine, or a duck-typed stand-in) on `endpoint`.

    endpoint: "ipc://PATH", "tcp://HOST:PORT" (PORT 0 or * for any free port), or None for ipc://
    under a fresh private temp dir (removed on close). Binds in the constructor, so `endpoint`
    (the resolved address) is known before serve_forever(). parent_pid: serve_forever() returns
    once this process is no longer our parent.
    """

    def __init__(self, engine: Any, endpoint: Optional[str] = None,
                 max_msg_size: int = protocol.DEFAULT_MAX_MSG_SIZE,
                 log: Optional[logging.Logger] = None, *, parent_pid: Optional[int] = None,
                 poll_ms: int = protocol.DEFAULT_POLL_MS,
                 linger_ms: int = protocol.DEFAULT_SERVER_LINGER_MS,
                 allow_remote: bool = False, auth_token: Optional[str] = None):
        self._engine = engine
        self._tracer = getattr(engine, "tracer", None) or Tracer()
        self._max_msg_size = int(max_msg_size)
        self._log = log or logging.getLogger(__name__)
        self._parent_pid = parent_pid
        self._poll_ms = int(poll_ms)
        self._linger_ms = int(linger_ms)
        self._auth = auth_token.encode() if auth_token else None
        self._stop = threading.Event()
        self._closed = False
        self._private_dir: Optional[str] = None
        self._ipc_path: Optional[str] = None
        self._inbound: "queue.Queue[Inbound]" = queue.Queue()
        self._hello_cache: Optional[dict] = None

        if endpoint is None:
            self._private_dir = tempfile.mkdtemp(prefix="graphserver-")
            endpoint = f"ipc://{os.path.join(self._private_dir, SOCKET_NAME)}"
        try:
            endpoint = check_endpoint(endpoint, allow_remote, auth_token)
            if endpoint.startswith("ipc://"):
                path = endpoint[len("ipc://"):]
                if os.path.lexists(path):
                    if not stat.S_ISSOCK(os.lstat(path).st_mode):
                        raise EndpointError(f"{path} exists and is not a socket; refusing to "
                                            "replace it (choose another ipc path)")
                    if _ipc_alive(path):
                        raise EndpointError(f"another server is serving on {endpoint}; stop it "
                                            "or choose another path")
                    os.unlink(path)      # stale: left by a server that was killed
                    self._log.info("removed the stale socket file %s", path)
        except BaseException:
            self._cleanup_dir()
            raise
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # Explicit LINGER: long enough for the `stop` reply to leave, short enough that close
        # never hangs. MAXMSGSIZE: zmq drops a larger frame and disconnects only that peer.
        self._sock.setsockopt(zmq.LINGER, self._linger_ms)
        self._sock.setsockopt(zmq.MAXMSGSIZE, self._max_msg_size)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            self._sock.close(0)
            self._ctx.term()
            self._cleanup_dir()
            raise EndpointError(f"cannot bind {endpoint}: {e}") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.endpoint.startswith("ipc://"):
            self._ipc_path = self.endpoint[len("ipc://"):]
        # Replies from the loop thread reach the IO thread through this pair.
        self._out_addr = f"inproc://replies-{id(self)}"
        self._out_pull = self._ctx.socket(zmq.PULL)
        self._out_pull.bind(self._out_addr)
        self._out_push = self._ctx.socket(zmq.PUSH)
        self._out_push.setsockopt(zmq.LINGER, self._linger_ms)
        self._out_push.connect(self._out_addr)
        self._io_done = threading.Event()
        self._io = threading.Thread(target=self._io_loop, name="zmq-io", daemon=True)

    # -- control ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to exit at its next wake-up. Safe from any thread and signal handlers."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT set the stop flag, so the loop exits and closes cleanly. Main thread."""

        def handler(signum: int, frame: Any) -> None:
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- the IO thread ----------------------------------------------------------------------

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._out_pull, zmq.POLLIN)
        try:
            while not self._io_done.is_set():
                events = dict(poller.poll(self._poll_ms))
                if self._out_pull in events:
                    while True:
                        try:
                            frames = self._out_pull.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._send_frames(frames)
                if self._sock in events:
                    while True:
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            self._receive(frames)
                        except Exception:   # a bug here must not take the server down either
                            self._log.exception("failed to handle a message")
        finally:
            # Flush what the loop thread queued before it closed (the last replies).
            while True:
                try:
                    self._send_frames(self._out_pull.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            # NOBLOCK: a slow or vanished peer must not stall the IO thread; ROUTER drops
            # unroutable replies.
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._log.warning("reply dropped: %s", e)

    def _receive(self, frames: list[bytes]) -> None:
        # ROUTER gives [identity, (b"" from REQ-style peers), payload]; replies reuse the envelope.
        identity, body = frames[0], frames[1:]
        envelope = [identity]
        if len(body) >= 2 and body[0] == b"":
            envelope.append(b"")
            body = body[1:]
        if len(body) != 1:
            self._reply_now(envelope, protocol.make_error(
                None, "ProtocolError", f"expected one payload frame, got {len(body)}"))
            return
        msg_id: Any = None
        try:
            obj = protocol.decode(body[0], self._max_msg_size)
            if isinstance(obj, dict) and isinstance(obj.get("id"), (int, str)) \
                    and not isinstance(obj.get("id"), bool):
                msg_id = obj["id"]         # so that even a refusal below echoes it
            if self._auth is not None:
                token = protocol.request_auth(obj)
                if token is None or not hmac.compare_digest(token.encode(), self._auth):
                    raise Unauthorized("missing or wrong auth token (the request's 'auth' key)")
            msg_id, method, params = protocol.parse_request(obj)
            params = protocol.validate_params(method, params)
        except ProtocolError as e:
            self._reply_now(envelope, protocol.make_error(
                e.msg_id if msg_id is None else msg_id, "ProtocolError", str(e)))
            return
        except EngineError as e:
            self._reply_now(envelope, protocol.make_error(msg_id, protocol.error_type_name(e),
                                                          str(e)))
            return
        if method == "hello" and self._hello_cache is not None:
            self._reply_now(envelope, protocol.make_ok(msg_id, self._hello_cache))
            return
        self._inbound.put(Inbound(envelope, msg_id, method, params, time.perf_counter()))

    def _reply_now(self, envelope: list[bytes], reply: dict) -> None:
        """From the IO thread itself."""
        self._send_frames(envelope + [self._encode(reply)])

    # -- the loop thread --------------------------------------------------------------------

    def _refresh_hello(self) -> None:
        hello = getattr(self._engine, "hello", None)
        try:
            self._hello_cache = hello() if hello is not None else None
        except Exception:
            self._hello_cache = None    # the loop thread answers it (and reports the error)

    def serve_forever(self) -> None:
        """Serve until `stop`, request_stop(), a handled signal, or the parent's death; close()."""
        self._refresh_hello()
        self._io.start()
        self._log.info("serving on %s", self.endpoint)
        has_work = lambda: bool(getattr(self._engine, "has_work", False))  # noqa: E731
        # A step that did nothing (requests waiting for KV) is not retried at once: the loop
        # waits for a message or poll_ms, instead of spinning a core.
        busy = lambda: has_work() and not getattr(self._engine, "idle", False)  # noqa: E731
        try:
            while not self._stop.is_set():
                if self._parent_gone():
                    self._log.warning("parent process %s is gone; shutting down",
                                      self._parent_pid)
                    break
                try:
                    item = self._inbound.get(timeout=0 if busy() else self._poll_ms / 1e3)
                except queue.Empty:
                    item = None
                while item is not None:
                    self._handle(item)
                    if self._stop.is_set():
                        break
                    try:
                        item = self._inbound.get_nowait()
                    except queue.Empty:
                        item = None
                if has_work() and not self._stop.is_set():
                    try:
                        self._engine.run_step()
                    except Exception:
                        # A failed step is a bug: log it, end the requests it touched, go on.
                        self._log.exception("engine step failed")
                        fail_running = getattr(self._engine, "fail_running", None)
                        if fail_running is not None:
                            fail_running()
        finally:
            self.close()

    def _handle(self, item: Inbound) -> None:
        method, msg_id, env = item.method, item.msg_id, item.envelope
        if method == "stop":
            self._send(env, protocol.make_ok(msg_id, {"stopping": True}))
            self._stop.set()
            return
        try:
            with self._tracer.range(f"rpc {method}", "rpc"):
                if method in protocol.STREAMED_METHODS:
                    self._engine.generate(self._replier(env, msg_id), **item.params)
                    return
                if method in DEFERRED_METHODS:
                    # The answer may change what hello says (reload: the model version), and
                    # hello is answered from a cache on the IO thread: refresh it with the answer.
                    getattr(self._engine, method)(self._replier(env, msg_id, refresh_hello=True),
                                                  self._error_replier(env, msg_id), **item.params)
                    return
                result = getattr(self._engine, method)(**item.params)
            self._send(env, protocol.make_ok(msg_id, result))
            if method == "status" or method == "reload":
                self._refresh_hello()
            self._log_call(item, result)
        except EngineError as e:
            self._send(env, protocol.make_error(msg_id, protocol.error_type_name(e), str(e)))
            self._log.info("%s %r refused: %s", method, msg_id, e)
        except Exception as e:
            self._log.exception("internal error in request %r", msg_id)
            self._send(env, protocol.make_error(msg_id, INTERNAL_ERROR, f"{type(e).__name__}: {e}"))

    def _log_call(self, item: Inbound, result: Any) -> None:
        if item.method in ("hello", "status"):
            return
        ms = (time.perf_counter() - item.t0) * 1e3
        who = item.params.get("session") or item.params.get("request_id") or ""
        extra = ""
        if isinstance(result, dict):
            if "tokens" in result and isinstance(result["tokens"], list):
                n = len(result["tokens"])
                extra = f", {n} tokens out, {ms / max(1, n):.2f} ms/token"
            elif "length" in result:
                extra = f", length {result['length']}"
        n_in = len(item.params.get("input_ids") or ())
        self._log.info("%s %s: %s%.1f ms%s", item.method, who,
                       f"{n_in} tokens in, " if n_in else "", ms, extra)

    def _replier(self, env: list[bytes], msg_id: Any, refresh_hello: bool = False):
        def reply(result: dict, more: bool = False) -> None:
            if refresh_hello and not more:
                self._refresh_hello()  # before the answer leaves: a hello sent after it sees it
            self._send(env, protocol.make_ok(msg_id, result, more=more))
        return reply

    def _error_replier(self, env: list[bytes], msg_id: Any):
        def reply_error(exc: BaseException) -> None:
            if isinstance(exc, EngineError):
                self._send(env, protocol.make_error(msg_id, protocol.error_type_name(exc), str(exc)))
            else:
                self._log.error("deferred request %r failed: %r", msg_id, exc)
                self._send(env, protocol.make_error(msg_id, INTERNAL_ERROR,
                                                    f"{type(exc).__name__}: {exc}"))
            self._refresh_hello()
        return reply_error

    def _encode(self, reply: dict) -> bytes:
        try:
            payload = protocol.encode(reply)
        except Exception as e:  # an engine result msgpack cannot carry
            self._log.exception("cannot encode the reply to %r", reply.get("id"))
            payload = protocol.encode(protocol.make_error(
                reply.get("id"), INTERNAL_ERROR, f"reply not encodable: {type(e).__name__}: {e}"))
        if len(payload) > self._max_msg_size:
            self._log.error("reply of %d bytes exceeds max_msg_size", len(payload))
            message = f"reply of {len(payload)} bytes exceeds the limit {self._max_msg_size}"
            payload = protocol.encode(protocol.make_error(reply.get("id"), INTERNAL_ERROR, message))
        return payload

    def _send(self, envelope: list[bytes], reply: dict) -> None:
        """From the loop thread: through the inproc pair to the IO thread."""
        self._out_push.send_multipart(envelope + [self._encode(reply)])

    # -- shutdown ---------------------------------------------------------------------------

    def close(self) -> None:
        """End live requests, answer queued ones, close the engine and the sockets. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            shutdown = getattr(self._engine, "shutdown", None)
            if shutdown is not None:
                shutdown()       # live generate requests get their final reply ("abort")
            while True:
                try:
                    item = self._inbound.get_nowait()
                except queue.Empty:
                    break
                self._send(item.envelope, protocol.make_error(
                    item.msg_id, ShuttingDown.__name__,
                    "the server is shutting down; this request was not run"))
        except Exception:
            self._log.exception("failed to answer requests at shutdown")
        try:
            close = getattr(self._engine, "close", None)
            if close is not None:
                close()
        except Exception:
            self._log.exception("engine.close() failed")
        finally:
            self._io_done.set()
            if self._io.is_alive():
                self._io.join()
            self._out_push.close()
            self._out_pull.close()
            self._sock.close()
            self._ctx.term()
            if self._ipc_path is not None:
                try:
                    os.unlink(self._ipc_path)
                except FileNotFoundError:
                    pass
            self._cleanup_dir()
            self._log.info("server closed")

    # -- helpers ----------------------------------------------------------------------------

    def _parent_gone(self) -> bool:
        return self._parent_pid is not None and os.getppid() != self._parent_pid

    def _cleanup_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


def arm_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG).

    Returns False where unavailable. The kernel also sends it when merely the parent *thread*
    that spawned us exits, so the handler must check os.getppid() before acting on it."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
