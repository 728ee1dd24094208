"""The ZeroMQ front of the engine: one ROUTER socket, one request at a time, typed error replies.

Every request is answered (when its sender is still connected) and no request can stop the loop
except `stop`, a signal, or the parent process dying (when asked to watch it)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
from typing import Any

import zmq

from graphserver import protocol
from graphserver.errors import EngineError
from graphserver.protocol import ProtocolError
from graphserver.tracing import Tracer

SOCKET_NAME = "graphserver.sock"
IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux including the NUL; zmq refuses longer paths
INTERNAL_ERROR = "InternalError"


class RPCServer:
    """Serves `engine` (duck-typed, see graphserver.engine.Engine) on `endpoint`.

    endpoint: "ipc://PATH", "tcp://HOST:PORT" (PORT may be "*" or 0 for any free port), or None for
    ipc:// under a fresh private temp dir (removed again on close). Binds in the constructor, so
    `self.endpoint` (the resolved address) is known before serve_forever().
    parent_pid: when given, serve_forever() returns once this process is no longer our parent.
    """

    def __init__(
        self,
        engine: Any,
        endpoint: str | None = None,
        max_msg_size: int = protocol.DEFAULT_MAX_MSG_SIZE,
        log: logging.Logger | None = None,
        *,
        parent_pid: int | None = None,
        poll_ms: int = protocol.DEFAULT_POLL_MS,
        linger_ms: int = protocol.DEFAULT_SERVER_LINGER_MS,
    ):
        self._engine = engine
        # RPC ranges go through the engine's tracer (nvtx + optional torch profiler) when it has
        # one; a fake engine in tests gets a plain tracer.
        self._tracer = getattr(engine, "tracer", None) or Tracer()
        self._max_msg_size = int(max_msg_size)
        self._log = log or logging.getLogger(__name__)
        self._parent_pid = parent_pid
        self._poll_ms = int(poll_ms)
        self._stop = threading.Event()
        self._closed = False
        self._private_dir: str | None = None
        self._ipc_path: str | None = None

        if endpoint is None:
            self._private_dir = tempfile.mkdtemp(prefix="graphserver-")
            endpoint = f"ipc://{os.path.join(self._private_dir, SOCKET_NAME)}"
        if endpoint.startswith("ipc://"):
            path = endpoint[len("ipc://") :]
            if len(os.fsencode(path)) > IPC_PATH_MAX:
                self._cleanup_dir()
                raise ValueError(f"ipc path is {len(path)} bytes, longer than the OS limit {IPC_PATH_MAX}: {path}")
        elif endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"  # zmq spells "any free port" as '*'

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # Explicit LINGER: long enough for the `stop` reply to leave, short enough that close never hangs.
        self._sock.setsockopt(zmq.LINGER, int(linger_ms))
        # zmq drops a larger frame and disconnects that peer; other peers are unaffected.
        self._sock.setsockopt(zmq.MAXMSGSIZE, self._max_msg_size)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError:
            self._sock.close(0)
            self._ctx.term()
            self._cleanup_dir()
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.endpoint.startswith("ipc://"):
            self._ipc_path = self.endpoint[len("ipc://") :]

    # -- control ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to exit at its next wake-up. Safe from any thread and from signal handlers."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT set the stop flag, so the loop exits and closes cleanly. Main thread only."""

        def handler(signum: int, frame: Any) -> None:
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    # -- loop -------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until `stop`, request_stop(), a handled signal, or the parent's death; then close()."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        self._log.info("serving on %s", self.endpoint)
        try:
            while not self._stop.is_set():
                if self._parent_gone():
                    self._log.warning("parent process %s is gone; shutting down", self._parent_pid)
                    break
                if not poller.poll(self._poll_ms):
                    continue
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                try:
                    self._handle(frames)
                except Exception:  # a bug in this layer must not take the server down either
                    self._log.exception("failed to handle a message")
        finally:
            self.close()

    def close(self) -> None:
        """Close the engine and the socket, and remove the ipc socket file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._engine, "close", None)
            if close is not None:
                close()
        except Exception:
            self._log.exception("engine.close() failed")
        finally:
            self._sock.close()
            self._ctx.term()
            if self._ipc_path is not None:
                try:
                    os.unlink(self._ipc_path)
                except FileNotFoundError:
                    pass
            self._cleanup_dir()
            self._log.info("server closed")

    # -- one request ------------------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        # ROUTER gives [identity, (b"" from REQ-style peers), payload]; the reply reuses the envelope.
        identity, body = frames[0], frames[1:]
        envelope = [identity]
        if len(body) >= 2 and body[0] == b"":
            envelope.append(b"")
            body = body[1:]
        if len(body) != 1:
            message = f"expected one payload frame, got {len(body)}"
            self._send(envelope, protocol.make_error(None, "ProtocolError", message))
            return
        reply, stop_after = self._reply_for(body[0])
        self._send(envelope, reply)
        if stop_after:
            self._stop.set()

    def _reply_for(self, payload: bytes) -> tuple[dict, bool]:
        msg_id: Any = None
        try:
            msg_id, method, params = protocol.parse_request(protocol.decode(payload, self._max_msg_size))
            params = protocol.validate_params(method, params)
            if method == "stop":
                return protocol.make_ok(msg_id, {"stopping": True}), True
            return protocol.make_ok(msg_id, self._dispatch(method, params)), False
        except ProtocolError as e:
            return protocol.make_error(e.msg_id if msg_id is None else msg_id, "ProtocolError", str(e)), False
        except EngineError as e:
            return protocol.make_error(msg_id, protocol.error_type_name(e), str(e)), False
        except Exception as e:
            self._log.exception("internal error in request %r", msg_id)
            return protocol.make_error(msg_id, INTERNAL_ERROR, f"{type(e).__name__}: {e}"), False

    def _dispatch(self, method: str, params: dict) -> Any:
        """The one call site of every engine method, wrapped in an nvtx range."""
        with self._tracer.range(f"rpc {method}", "rpc"):
            return getattr(self._engine, method)(**params)

    def _send(self, envelope: list[bytes], reply: dict) -> None:
        try:
            payload = protocol.encode(reply)
        except Exception as e:  # an engine result msgpack cannot carry
            self._log.exception("cannot encode the reply to %r", reply.get("id"))
            payload = protocol.encode(
                protocol.make_error(reply.get("id"), INTERNAL_ERROR, f"reply not encodable: {type(e).__name__}: {e}")
            )
        if len(payload) > self._max_msg_size:
            self._log.error("reply of %d bytes exceeds max_msg_size", len(payload))
            message = f"reply of {len(payload)} bytes exceeds the limit {self._max_msg_size}"
            payload = protocol.encode(protocol.make_error(reply.get("id"), INTERNAL_ERROR, message))
        try:
            # NOBLOCK: a slow or vanished peer must not stall the loop; ROUTER drops unroutable replies.
            self._sock.send_multipart(envelope + [payload], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            self._log.warning("reply to %r dropped: %s", reply.get("id"), e)

    # -- helpers ----------------------------------------------------------------------------

    def _parent_gone(self) -> bool:
        return self._parent_pid is not None and os.getppid() != self._parent_pid

    def _cleanup_dir(self) -> None:
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


def arm_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG).

    Returns False where unavailable. The kernel also sends it when merely the parent *thread* that
    spawned us exits, so the handler must check os.getppid() before acting on it."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
