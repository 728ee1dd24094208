"""The client's first contact: endpoint checks, the hello handshake against everything that is not
a graph server (no socket, refused, a foreign listener, a silent ZeroMQ peer, itself), the auth
token and the deadline_s it sends."""

import os
import socket
import threading
import time

import pytest
import zmq

from client.rpc import DEFAULT_HANDSHAKE_S, NoServer, RemoteUnauthorized, RPCClient, RPCError
from graphserver import defaults, protocol

from rpc_helpers import ScriptedRouter, send_reply

FAST_S = 0.5  # handshake limit for tests that do not measure the default
HELLO = {"model": "scripted", "protocol_version": protocol.PROTOCOL_VERSION, "max_len": 64}


@pytest.fixture
def ipc(tmp_path):
    return f"ipc://{tmp_path}/s.sock"


def _answer_all(result=HELLO):
    def on_request(sock, frames, req):
        send_reply(sock, frames, protocol.make_ok(req["id"], result if req["method"] == "hello" else {"echo": req}))
    return on_request


def _timed_no_server(endpoint, **kw):
    t0 = time.monotonic()
    with pytest.raises(NoServer) as ei:
        RPCClient(endpoint, **kw)
    return time.monotonic() - t0, str(ei.value)


# -- endpoint strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad, why", [
    ("junk", "no scheme"), ("http://127.0.0.1:80", "not supported"), ("tcp://127.0.0.1", "tcp://HOST:PORT"),
    ("tcp://127.0.0.1:0", "port must be 1..65535"), ("tcp://127.0.0.1:65536", "port must be"),
    ("tcp://127.0.0.1:-1", "port must be"), ("tcp://127.0.0.1:http", "port must be"),
    ("tcp://*:5555", "must name a host"), ("tcp://bad host:1", "not a valid host"), ("ipc://", "no socket path"),
])
def test_bad_endpoints_are_refused_before_connecting(bad, why):
    with pytest.raises(ValueError, match=why):
        RPCClient(bad)


def test_missing_ipc_socket_fails_at_once(tmp_path):
    elapsed, msg = _timed_no_server(f"ipc://{tmp_path}/none.sock")
    assert elapsed < DEFAULT_HANDSHAKE_S and "does not exist" in msg  # no handshake wait
    (tmp_path / "file").write_text("x")
    _, msg = _timed_no_server(f"ipc://{tmp_path}/file")
    assert "not a socket" in msg


# -- the handshake's failures, each told apart ----------------------------------------------------


def test_stale_ipc_socket_fails_within_the_default_handshake(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # the file a crashed server leaves behind: nothing accepts on it
    s.close()
    elapsed, msg = _timed_no_server(f"ipc://{path}")
    assert DEFAULT_HANDSHAKE_S - 0.1 <= elapsed < 5.0
    assert "connection refused" in msg


def test_foreign_tcp_listener_fails_within_the_default_handshake():
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()  # accepts (the kernel does) but never speaks ZeroMQ
        elapsed, msg = _timed_no_server(f"tcp://127.0.0.1:{lst.getsockname()[1]}")
    assert elapsed < 5.0 and "does not speak ZeroMQ" in msg


def test_foreign_listener_that_hangs_up_is_reported_at_once():
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()

        def http_server():
            conn, _ = lst.accept()
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.close()

        t = threading.Thread(target=http_server, daemon=True)
        t.start()
        elapsed, msg = _timed_no_server(f"tcp://127.0.0.1:{lst.getsockname()[1]}", handshake_s=10.0)
        t.join(5)
    assert elapsed < 5.0 and "closed the connection" in msg


def test_silent_zeromq_peer(ipc):
    router = ScriptedRouter(ipc, lambda sock, frames, req: None)  # reads, never answers
    try:
        elapsed, msg = _timed_no_server(ipc, handshake_s=FAST_S)
        assert elapsed < FAST_S + 2.0 and "did not answer hello" in msg
        assert router.methods() == ["hello"]
    finally:
        router.stop()


def test_tcp_self_connect_is_recognised():
    # A DEALER that connects to a free local port can be handed that port as its own source port
    # and talk to itself; it then receives its own request. A peer that sends every message back
    # produces exactly that, deterministically.
    ctx = zmq.Context()
    mirror = ctx.socket(zmq.DEALER)
    mirror.setsockopt(zmq.LINGER, 0)
    mirror.bind("tcp://127.0.0.1:*")
    endpoint = mirror.getsockopt_string(zmq.LAST_ENDPOINT)
    stop = threading.Event()

    def echo():
        while not stop.is_set():
            if mirror.poll(20):
                mirror.send_multipart(mirror.recv_multipart())

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    try:
        elapsed, msg = _timed_no_server(endpoint, handshake_s=10.0)
        assert elapsed < 5.0 and "request back" in msg and "itself" in msg
    finally:
        stop.set()
        t.join(5)
        mirror.close(0)
        ctx.term()


def test_protocol_version_mismatch_is_refused(ipc):
    router = ScriptedRouter(ipc, _answer_all({**HELLO, "protocol_version": 99}))
    try:
        with pytest.raises(RPCError, match="protocol version 99"):
            RPCClient(ipc, handshake_s=FAST_S)
    finally:
        router.stop()


def test_handshake_result_is_kept(ipc):
    router = ScriptedRouter(ipc, _answer_all())
    try:
        with RPCClient(ipc, handshake_s=FAST_S) as c:
            assert c.server_info == HELLO
        with RPCClient(ipc, handshake_s=None) as c:
            assert c.server_info is None
        assert router.methods() == ["hello"]  # the second client sent nothing
    finally:
        router.stop()


# -- auth and deadlines ----------------------------------------------------------------------------


def test_auth_token_rides_on_every_request(ipc, monkeypatch):
    monkeypatch.delenv(defaults.AUTH_TOKEN_ENV, raising=False)
    router = ScriptedRouter(ipc, _answer_all())
    try:
        with RPCClient(ipc, auth_token="s3cret") as c:
            c.status()
            c.kv_free("x")
        with RPCClient(ipc) as c:  # no token anywhere: no "auth" key at all
            c.status()
        monkeypatch.setenv(defaults.AUTH_TOKEN_ENV, "from-env")
        with RPCClient(ipc) as c:
            c.status()
        auths = [(r["method"], r.get("auth", "-")) for _, r in router.seen]
        assert auths == [("hello", "s3cret"), ("status", "s3cret"), ("kv_free", "s3cret"),
                         ("hello", "-"), ("status", "-"), ("hello", "from-env"), ("status", "from-env")]
    finally:
        router.stop()


def test_unauthorized_handshake_raises_the_typed_error(ipc):
    def on_request(sock, frames, req):
        send_reply(sock, frames, protocol.make_error(req["id"], "Unauthorized", "bad token"))

    router = ScriptedRouter(ipc, on_request)
    try:
        with pytest.raises(RemoteUnauthorized, match="bad token"):
            RPCClient(ipc, auth_token="wrong", handshake_s=FAST_S)
    finally:
        router.stop()


def test_timeout_is_sent_as_deadline(ipc):
    router = ScriptedRouter(ipc, _answer_all())
    try:
        with RPCClient(ipc, timeout_s=7.5) as c:
            c.kv_init("s", [1, 2])
            c.replay_seq("s", 3, start_token=2)
            c.replay_seq("s", 3, deadline_s=1.25)
            c.step("s", 1)
        with RPCClient(ipc, timeout_s=7.5, send_deadlines=False) as c:
            c.kv_init("s", [1, 2], replace=True)
        got = [(r["method"], r["params"].get("deadline_s"), r["params"].get("replace")) for _, r in router.seen
               if r["method"] != "hello"]
        assert got == [("kv_init", 7.5, None), ("replay_seq", 7.5, None), ("replay_seq", 1.25, None),
                       ("step", None, None), ("kv_init", None, True)]
        for _, r in router.seen:  # every request the client sent passes the server's own checks
            protocol.validate_params(r["method"], r["params"])
    finally:
        router.stop()


def test_bad_timeouts_are_refused(ipc):
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="timeout_s"):
            RPCClient(ipc, timeout_s=bad)
    with pytest.raises(ValueError, match="handshake_s"):
        RPCClient(ipc, handshake_s=0)
    assert not os.path.exists(ipc[len("ipc://"):])
