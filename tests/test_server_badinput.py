"""RPCServer under bad input: every case gets a clear typed reply (or a dropped connection for
oversized messages), and the server keeps serving. One server per module; after each test a
fresh client's `hello` must still work."""

import os
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from client.rpc import (RemoteBadRequest, RemoteError, RemoteInternalError, RemoteKVExhausted,
                        RemoteProtocolError, RemoteUnknownSession, RPCClient, ServerDead)
from graphserver import errors, protocol
from graphserver.engine.proc import EngineProc as RPCServer

from fake_engine import FakeEngine
from rpc_helpers import ServerThread

MAX_MSG = 64 * 1024  # small, so "oversized" is cheap to send
TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    st = ServerThread(FakeEngine(kv_tokens=256), f"ipc://{tmp_path_factory.mktemp('srv')}/s.sock",
                      max_msg_size=MAX_MSG)
    yield st
    st.stop()


@pytest.fixture
def client(served):
    with RPCClient(served.endpoint, timeout_s=TIMEOUT_S) as c:
        yield c


@pytest.fixture(autouse=True)
def still_serving(request):
    """After each test that uses the shared server, a new client's hello still works."""
    yield
    if "served" in request.fixturenames:
        served = request.getfixturevalue("served")
        assert served.thread.is_alive()
        with RPCClient(served.endpoint, timeout_s=TIMEOUT_S) as c:
            assert c.hello()["model"] == "fake"
        served.engine.broken = served.engine.unencodable = False


class RawPeer:
    """A bare DEALER for sending frames the real client never would."""

    def __init__(self, endpoint):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames):
        self.sock.send_multipart(list(frames))

    def recv(self, timeout_s=TIMEOUT_S):
        assert self.sock.poll(timeout_s * 1000), "no reply"
        return self.sock.recv_multipart()

    def ask(self, payload):
        """Send [b"", payload]; return the decoded reply."""
        self.send(b"", payload)
        frames = self.recv()
        assert frames[0] == b"" and len(frames) == 2
        return protocol.decode(frames[1])

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(served):
    peer = RawPeer(served.endpoint)
    yield peer
    peer.close()


def _err(reply):
    assert reply["ok"] is False, reply
    return reply["id"], reply["error"]["type"], reply["error"]["message"]


# -- undecodable / malformed envelopes -------------------------------------------------------


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"\xc1\x00garbage", "malformed msgpack"),
        (b"", "malformed msgpack"),
        (msgpack.packb({"id": 1, "method": "hello"}) + b"\x00", "malformed msgpack"),
        (msgpack.packb([1, "hello", {}]), "must be a map"),
        (msgpack.packb("hello"), "must be a map"),
        (msgpack.packb({"method": "hello", "params": {}}), "'id'"),
        (msgpack.packb({"id": True, "method": "hello"}), "'id'"),
        (msgpack.packb({"id": [1], "method": "hello"}), "'id'"),
    ],
)
def test_unreadable_requests_get_protocol_error_with_id_none(raw, payload, needle):
    msg_id, etype, message = _err(raw.ask(payload))
    assert (msg_id, etype) == (None, "ProtocolError")
    assert needle in message


@pytest.mark.parametrize(
    "request_map, needle",
    [
        ({"id": 11}, "'method'"),
        ({"id": 12, "method": None}, "'method'"),
        ({"id": 13, "method": "hello", "params": "x"}, "'params'"),
        ({"id": 14, "method": "hello", "junk": 1}, "unknown request keys"),
        ({"id": 15, "method": "kv_init",
          "params": {"session": "s", "input_ids": {"__nd__": True, "dtype": "int32", "shape": [3], "data": b"\0" * 5}}},
         "needs 12 bytes, got 5"),
        ({"id": 16, "method": "kv_init",
          "params": {"session": "s",
                     "input_ids": {"__nd__": True, "dtype": "complex64", "shape": [1], "data": b"\0" * 8}}},
         "not allowed"),
    ],
)
def test_bad_envelopes_echo_the_id(raw, request_map, needle):
    msg_id, etype, message = _err(raw.ask(msgpack.packb(request_map, use_bin_type=True)))
    assert (msg_id, etype) == (request_map["id"], "ProtocolError")
    assert needle in message


def test_string_ids_are_echoed(raw):
    reply = raw.ask(protocol.encode(protocol.make_request("req-α", "hello")))
    assert reply["id"] == "req-α" and reply["ok"] is True


def test_extra_frames_are_refused(raw):
    raw.send(b"", protocol.encode(protocol.make_request(1, "hello")), b"second payload")
    frames = raw.recv()
    _, etype, message = _err(protocol.decode(frames[-1]))
    assert etype == "ProtocolError" and "one payload frame" in message


def test_peer_without_delimiter_gets_reply_without_one(raw):
    raw.send(protocol.encode(protocol.make_request(21, "hello")))
    frames = raw.recv()
    assert len(frames) == 1
    assert protocol.decode(frames[0])["id"] == 21


def test_req_socket_works(served):
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    try:
        req.connect(served.endpoint)
        req.send(protocol.encode(protocol.make_request(31, "hello")))
        assert req.poll(TIMEOUT_S * 1000)
        reply = protocol.decode(req.recv())
        assert reply["id"] == 31 and reply["result"]["model"] == "fake"
    finally:
        req.close(0)
        ctx.term()


# -- methods and params ----------------------------------------------------------------------


def test_unknown_method(client):
    with pytest.raises(RemoteBadRequest, match="unknown method 'close'"):
        client.call("close")  # engine methods outside METHODS are unreachable
    with pytest.raises(RemoteBadRequest, match="unknown method '__init__'"):
        client.call("__init__")


@pytest.mark.parametrize(
    "method, params, needle",
    [
        ("kv_init", {"session": "a", "input_ids": [1, "2"]}, "input_ids[1] must be an int"),
        ("kv_init", {"session": 5, "input_ids": [1]}, "'session' must be a str"),
        ("kv_init", {"session": "a"}, "missing required param 'input_ids'"),
        ("step", {"session": "a", "token": True}, "'token' must be an int, got bool"),
        ("step", {"session": "a", "token": 1, "logits": True}, "unknown param 'logits'"),
        ("replay_seq", {"session": "a", "steps": 2.0}, "'steps' must be an int"),
        ("replay_seq", {"session": "a", "steps": 2, "sampling": {"repetition_penalty": 1.2}}, "client-side only"),
        ("wait_precapture", {"min_ahead": 1, "timeout_s": "soon"}, "'timeout_s' must be a number"),
    ],
)
def test_wrong_param_types(client, served, method, params, needle):
    n_calls = len(served.engine.calls)
    with pytest.raises(RemoteBadRequest) as ei:
        client.call(method, **params)
    assert needle in ei.value.message and ei.value.type == "BadRequest"
    assert len(served.engine.calls) == n_calls  # refused before reaching the engine


def test_engine_receives_normalized_params(client, served):
    client.kv_init("norm", np.array([1, 2, 3], np.int32))  # an int array is accepted for ids
    try:
        assert served.engine.calls[-1] == ("kv_init", {"session": "norm", "input_ids": [1, 2, 3], "top_k": None})
        client.replay_seq("norm", 2, start_token=4, sampling={"temperature": 0.5, "seed": 7})
        method, params = served.engine.calls[-1]
        assert method == "replay_seq"
        assert params["sampling"] == {"greedy": False, "temperature": 0.5, "top_k": 0, "top_p": 1.0, "seed": 7}
        assert params["stop_token_ids"] == [] and params["start_token"] == 4
    finally:
        client.kv_free("norm")


def test_engine_errors_are_typed(client):
    with pytest.raises(RemoteUnknownSession, match="no session 'ghost'") as ei:
        client.step("ghost", 1)
    assert isinstance(ei.value, errors.UnknownSession) and ei.value.type == "UnknownSession"

    with pytest.raises(RemoteBadRequest, match="out of range") as ei:
        client.kv_init("big-id", [1, 10**6])  # semantic range: the engine's check
    assert isinstance(ei.value, errors.BadRequest)

    with pytest.raises(RemoteKVExhausted, match="KV tokens") as ei:
        client.kv_init("huge", list(range(10)) * 30)  # 300 tokens > 256 of capacity
    assert isinstance(ei.value, errors.KVExhausted)
    assert client.status()["sessions"] == 0  # nothing was half-created


def test_internal_error_is_reported_and_logged(client, served, caplog):
    served.engine.broken = True
    with caplog.at_level("ERROR", logger="graphserver.engine.proc"):
        with pytest.raises(RemoteInternalError, match="RuntimeError: fake engine is broken") as ei:
            client.status()
    assert ei.value.type == "InternalError"
    assert any(r.exc_info and "fake engine is broken" in str(r.exc_info[1]) for r in caplog.records)
    served.engine.broken = False
    assert client.status()["model"] == "fake"


def test_unencodable_result_is_an_internal_error(client, served):
    served.engine.unencodable = True
    with pytest.raises(RemoteInternalError, match="not encodable"):
        client.status()


def test_error_type_classes_map(client):
    err = RemoteError("Whatever", "m")
    assert err.type == "Whatever" and str(err) == "Whatever: m"
    with pytest.raises(RemoteBadRequest):
        client.call("nope")


# -- connections -----------------------------------------------------------------------------


def test_oversized_message_drops_only_its_sender(served, raw, client):
    big = protocol.encode(protocol.make_request(41, "kv_init", {"session": "o", "input_ids": list(range(40000))}))
    assert len(big) > MAX_MSG
    raw.send(b"", big)
    assert not raw.sock.poll(300), "zmq should drop an oversized message, not answer it"
    assert client.hello()["model"] == "fake"  # another client is unaffected
    # The offender's DEALER reconnects by itself and is served again.
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        raw.send(b"", protocol.encode(protocol.make_request(42, "hello")))
        if raw.sock.poll(500):
            assert protocol.decode(raw.sock.recv_multipart()[-1])["id"] == 42
            break
        assert time.monotonic() < deadline, "offender never served again"
    assert "o" not in served.engine.sessions


def test_rpc_client_sees_oversize_drop_as_lost_connection(served):
    # A client whose limit exceeds the server's learns quickly, not after its timeout.
    with RPCClient(served.endpoint, timeout_s=30.0, max_msg_size=16 * MAX_MSG) as c:
        t0 = time.monotonic()
        with pytest.raises(ServerDead, match="MAXMSGSIZE"):
            c.kv_init("o2", list(range(40000)))
        assert time.monotonic() - t0 < 5.0
        assert c.hello()["model"] == "fake"  # the same client works afterwards


def test_rpc_client_refuses_to_send_oversized(served):
    with RPCClient(served.endpoint, timeout_s=TIMEOUT_S, max_msg_size=MAX_MSG) as c:
        with pytest.raises(protocol.ProtocolError, match="exceeds max_msg_size"):
            c.kv_init("o3", list(range(40000)))
        assert c.hello()["model"] == "fake"


def test_client_vanishing_mid_request(served):
    peer = RawPeer(served.endpoint)
    peer.send(b"", protocol.encode(protocol.make_request(51, "wait_precapture", {"min_ahead": 1, "timeout_s": 0.5})))
    # Wait until the server is inside the slow call, then vanish.
    deadline = time.monotonic() + TIMEOUT_S
    while not any(m == "wait_precapture" for m, _ in served.engine.calls):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    peer.close()
    with RPCClient(served.endpoint, timeout_s=TIMEOUT_S) as c:
        t0 = time.monotonic()
        assert c.hello()["model"] == "fake"  # answered once the slow call is done
        assert time.monotonic() - t0 < 3.0


def test_concurrent_clients_each_get_their_own_reply(served):
    results, errs = {}, []

    def worker(i):
        try:
            with RPCClient(served.endpoint, timeout_s=TIMEOUT_S) as c:
                s = f"conc-{i}"
                c.kv_init(s, [i + 1])
                results[i] = c.step(s, i)["length"], c.kv_free(s)["freed"]
        except Exception as e:  # surfaced below
            errs.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 2)
    assert not errs
    assert results == {i: (2, f"conc-{i}") for i in range(6)}


# -- lifecycle (own servers) -----------------------------------------------------------------


def test_stop_replies_then_closes_everything(tmp_path_factory):
    engine = FakeEngine()
    path = f"{tmp_path_factory.mktemp('stop')}/s.sock"
    st = ServerThread(engine, f"ipc://{path}")
    assert os.path.exists(path)
    with RPCClient(st.endpoint, timeout_s=TIMEOUT_S) as c:
        assert c.stop() == {"stopping": True}
    st.thread.join(TIMEOUT_S)
    assert not st.thread.is_alive()
    assert engine.closed and not os.path.exists(path)


def test_default_endpoint_is_private_ipc_and_removed():
    engine = FakeEngine()
    st = ServerThread(engine, None)
    assert st.endpoint.startswith("ipc://")
    path = st.endpoint[len("ipc://"):]
    sock_dir = os.path.dirname(path)
    assert oct(os.stat(sock_dir).st_mode & 0o777) == oct(0o700)  # mkdtemp: private to this user
    with RPCClient(st.endpoint, timeout_s=TIMEOUT_S) as c:
        assert c.hello()["model"] == "fake"
    st.stop()
    assert engine.closed and not os.path.exists(sock_dir)


def test_tcp_loopback_any_port():
    st = ServerThread(FakeEngine(), "tcp://127.0.0.1:0")
    try:
        assert st.endpoint.startswith("tcp://127.0.0.1:") and not st.endpoint.endswith(":0")
        with RPCClient(st.endpoint, timeout_s=TIMEOUT_S) as c:
            assert c.hello()["model"] == "fake"
    finally:
        st.stop()


def test_too_long_ipc_path_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="longer than the OS limit"):
        RPCServer(FakeEngine(), "ipc://" + str(tmp_path / ("x" * 120)))


def test_parent_watch_stops_the_loop(tmp_path_factory):
    # A parent pid that is not ours reads as "the parent died": the loop must exit on its own.
    engine = FakeEngine()
    st = ServerThread(engine, f"ipc://{tmp_path_factory.mktemp('pw')}/s.sock", parent_pid=os.getppid() + 1_000_000)
    st.thread.join(TIMEOUT_S)
    assert not st.thread.is_alive() and engine.closed


def test_oversized_reply_becomes_an_internal_error(tmp_path_factory):
    # [20000] float32 logits = 80 KB > the 64 KiB limit: the client gets an error, not a drop.
    st = ServerThread(FakeEngine(vocab_size=20000), f"ipc://{tmp_path_factory.mktemp('big')}/s.sock",
                      max_msg_size=MAX_MSG)
    try:
        with RPCClient(st.endpoint, timeout_s=TIMEOUT_S) as c:
            with pytest.raises(RemoteInternalError, match="exceeds the limit"):
                c.kv_init("s", [1])
            assert c.hello()["vocab_size"] == 20000
    finally:
        st.stop()
