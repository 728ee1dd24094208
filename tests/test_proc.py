"""EngineProc (graphserver/engine/proc.py): bind policy, auth, ports, live and stale ipc paths,
hello while the loop thread is busy, ShuttingDown for queued requests, streamed generate, and a
failing engine step. A FakeEngine stands in where no model is needed; servers bind loopback or
ipc:// only, and every wait is bounded."""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time

import pytest
import zmq

from fake_engine import FakeEngine, next_token
from graphserver import protocol
from graphserver.engine.proc import EndpointError, EngineProc, check_endpoint

TIMEOUT_S = 5.0
JOIN_S = 10.0
TOKEN = "s3cret-token"


class Served:
    """An EngineProc serving in a thread; stop() asks it to exit and joins."""

    def __init__(self, engine, endpoint=None, **kw):
        kw.setdefault("poll_ms", 20)
        self.engine = engine
        self.proc = EngineProc(engine, endpoint, **kw)
        self.endpoint = self.proc.endpoint
        self.thread = threading.Thread(target=self.proc.serve_forever, daemon=True,
                                       name="engine-proc")
        self.thread.start()

    def stop(self):
        self.proc.request_stop()
        self.thread.join(JOIN_S)
        assert not self.thread.is_alive(), "the server loop did not exit"


@pytest.fixture
def serve():
    made: list[Served] = []

    def _serve(engine, endpoint=None, **kw):
        s = Served(engine, endpoint, **kw)
        made.append(s)
        return s

    yield _serve
    for s in made:
        if s.thread.is_alive():
            s.stop()


class Peer:
    """A bare DEALER speaking graphserver.protocol."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = iter(range(1, 1 << 30))

    def send(self, method, params=None, auth=None, msg_id=None) -> int:
        msg_id = next(self.ids) if msg_id is None else msg_id
        req = protocol.make_request(msg_id, method, params)
        if auth is not None:
            req["auth"] = auth
        self.sock.send_multipart([b"", protocol.encode(req)])
        return msg_id

    def recv(self, timeout_s: float = TIMEOUT_S) -> dict:
        assert self.sock.poll(timeout_s * 1000), "no reply"
        frames = self.sock.recv_multipart()
        assert frames[0] == b"" and len(frames) == 2
        return protocol.decode(frames[1])

    def call(self, method, params=None, **kw) -> dict:
        msg_id = self.send(method, params, **kw)
        reply = self.recv()
        assert reply["id"] in (msg_id, None)
        return reply

    def close(self):
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def _peer(endpoint):
        p = Peer(endpoint)
        made.append(p)
        return p

    yield _peer
    for p in made:
        p.close()


def error_type(reply: dict):
    return None if reply["ok"] else reply["error"]["type"]


# ============================================================================ bind policy

def refused(endpoint, **kw) -> str:
    """The EndpointError message of EngineProc(endpoint); one that binds after all is closed
    (an open EngineProc would block interpreter exit) and fails the test."""
    try:
        proc = EngineProc(FakeEngine(), endpoint, **kw)
    except EndpointError as e:
        return str(e)
    proc.close()
    pytest.fail(f"EngineProc bound {endpoint!r} ({kw})")



@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:0", "tcp://10.1.2.3:5555", "tcp://*:7000",
                                      "tcp://example.com:80"])
def test_non_loopback_needs_allow_remote_and_a_token(endpoint):
    assert re.search("other machines.*--allow-remote", refused(endpoint))
    assert "auth token" in refused(endpoint, allow_remote=True)
    assert "auth token" in refused(endpoint, allow_remote=True, auth_token="")
    # accepted by the policy with both (checked without binding beyond loopback here)
    assert check_endpoint(endpoint, True, TOKEN).startswith("tcp://")
    assert issubclass(EndpointError, ValueError)


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:0", "tcp://localhost:0", "tcp://[::1]:0",
                                      "tcp://127.0.0.2:0"])
def test_loopback_needs_neither(endpoint):
    assert check_endpoint(endpoint, False, None) == endpoint.replace(":0", ":*")


@pytest.mark.parametrize("endpoint,match", [
    ("tcp://127.0.0.1:99999", "must be 1..65535"),
    ("tcp://127.0.0.1:65536", "must be 1..65535"),
    ("tcp://127.0.0.1:-1", "must be 1..65535"),
    ("tcp://127.0.0.1:abc", "must be 1..65535"),
    ("tcp://127.0.0.1:", "must be 1..65535"),
    ("tcp://127.0.0.1", "needs a host and a port"),
    ("tcp://:5555", "needs a host and a port"),
    ("udp://127.0.0.1:5555", "must be ipc://PATH or tcp://HOST:PORT"),
    ("ipc://", "needs a path"),
    ("ipc:///tmp/" + "x" * 120, "longer than the OS limit"),
])
def test_invalid_endpoints_are_refused(endpoint, match):
    assert match in refused(endpoint)


@pytest.mark.parametrize("port", ["0", "*"])
def test_port_0_and_star_pick_a_free_port(serve, peers, port):
    s = serve(FakeEngine(), f"tcp://127.0.0.1:{port}")
    host, _, p = s.endpoint[len("tcp://"):].rpartition(":")
    assert host == "127.0.0.1" and 1 <= int(p) <= 65535
    assert peers(s.endpoint).call("hello")["result"]["model"] == "fake"


# ============================================================================ auth

def test_with_a_token_every_request_needs_the_right_auth(serve, peers):
    eng = FakeEngine()
    s = serve(eng, "tcp://127.0.0.1:0", allow_remote=True, auth_token=TOKEN)
    p = peers(s.endpoint)
    for bad in (None, "", "s3cret-toke", TOKEN + "x", "S3CRET-TOKEN", 12345):
        for method in ("hello", "status", "kv_free"):
            params = {"session": "a"} if method == "kv_free" else {}
            r = p.call(method, params, auth=bad)
            assert error_type(r) == "Unauthorized", (method, bad, r)
            assert "auth" in r["error"]["message"]
    assert [c for c in eng.calls if c[0] != "hello"] == []      # the engine saw none of them
    assert p.call("hello", auth=TOKEN)["ok"]
    assert p.call("status", auth=TOKEN)["ok"]
    r = p.call("kv_free", {"session": "nope"}, auth=TOKEN)
    assert error_type(r) == "UnknownSession"                     # authorized: it reached the engine


def test_a_token_is_enforced_on_ipc_too(serve, peers):
    s = serve(FakeEngine(), None, auth_token=TOKEN)
    p = peers(s.endpoint)
    assert error_type(p.call("hello")) == "Unauthorized"
    assert p.call("hello", auth=TOKEN)["ok"]


def test_without_a_token_auth_is_not_needed(serve, peers):
    s = serve(FakeEngine(), "tcp://127.0.0.1:0")
    p = peers(s.endpoint)
    assert p.call("hello")["ok"] and p.call("hello", auth="anything")["ok"]


# ============================================================================ ipc paths

def test_a_second_server_on_a_live_ipc_path_is_refused(serve, peers, tmp_path):
    path = str(tmp_path / "s.sock")
    first = serve(FakeEngine(), f"ipc://{path}")
    assert f"another server is serving on ipc://{path}" in refused(f"ipc://{path}")
    assert os.path.exists(path)
    assert peers(first.endpoint).call("hello")["ok"]            # the first one is untouched
    first.stop()
    assert not os.path.exists(path)                              # removed on close


def test_a_stale_socket_file_is_removed_and_served(serve, peers, tmp_path, caplog):
    path = str(tmp_path / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()                                      # a server killed -9 leaves this behind
    assert os.path.exists(path)
    with caplog.at_level(logging.INFO, logger="graphserver.engine.proc"):
        s = serve(FakeEngine(), f"ipc://{path}")
    assert any("removed the stale socket file" in r.getMessage() for r in caplog.records)
    assert peers(s.endpoint).call("hello")["result"]["model"] == "fake"


def test_an_ipc_path_that_is_a_regular_file_is_not_deleted(tmp_path):
    """Only a stale *socket* may be removed: a typo naming a user's file must not delete it."""
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    assert "not a socket" in refused(f"ipc://{path}")
    assert path.read_text() == "precious"


def test_default_endpoint_is_a_private_ipc_dir_removed_on_close(serve, peers):
    s = serve(FakeEngine())
    assert s.endpoint.startswith("ipc://")
    d = os.path.dirname(s.endpoint[len("ipc://"):])
    assert os.path.isdir(d) and (os.stat(d).st_mode & 0o077) == 0
    assert peers(s.endpoint).call("hello")["ok"]
    s.stop()
    assert not os.path.exists(d)


# ============================================================================ the loop thread

def test_hello_is_answered_while_the_loop_is_busy(serve, peers):
    s = serve(FakeEngine())
    slow, quick = peers(s.endpoint), peers(s.endpoint)
    assert quick.call("hello")["ok"]
    slow_id = slow.send("wait_precapture", {"min_ahead": 1, "timeout_s": 2.0})
    time.sleep(0.2)                                   # the loop thread is inside the 2 s call
    t0 = time.monotonic()
    r = quick.call("hello")
    assert r["ok"] and r["result"]["model"] == "fake"
    assert time.monotonic() - t0 < 0.5, "hello waited for the engine"
    # a request the loop must run does wait: the test really had the loop busy
    status_id = quick.send("status")
    r = quick.recv()
    assert r["id"] == status_id and r["ok"]
    assert time.monotonic() - t0 > 1.0
    r = slow.recv()
    assert r["id"] == slow_id and r["ok"]


def test_requests_queued_behind_a_slow_one_get_shutting_down_on_stop(serve, peers):
    eng = FakeEngine()
    s = serve(eng)
    p = peers(s.endpoint)
    slow_id = p.send("wait_precapture", {"min_ahead": 1, "timeout_s": 1.5})
    time.sleep(0.2)
    queued = [p.send("status"), p.send("kv_init", {"session": "x", "input_ids": [1, 2]}),
              p.send("generate", {"request_id": "g", "prompt_ids": [3], "max_tokens": 4})]
    time.sleep(0.2)                                    # all three wait in the loop's queue
    s.proc.request_stop()
    replies = {}
    for _ in range(4):
        r = p.recv()
        replies[r["id"]] = r
    assert replies[slow_id]["ok"]                      # the one in flight finishes normally
    for q in queued:
        assert error_type(replies[q]) == "ShuttingDown"
        assert "shutting down" in replies[q]["error"]["message"]
    s.thread.join(JOIN_S)
    assert not s.thread.is_alive() and eng.closed
    assert [c[0] for c in eng.calls if c[0] != "hello"] == ["wait_precapture"]


def test_streamed_generate_replies_with_more_then_a_final_one(serve, peers):
    s = serve(FakeEngine(vocab_size=64))
    p = peers(s.endpoint)
    msg_id = p.send("generate", {"request_id": "r1", "prompt_ids": [5, 9], "max_tokens": 5})
    replies = [p.recv()]
    while replies[-1].get("more"):
        replies.append(p.recv())
    want, t = [], 9
    for _ in range(5):
        t = next_token(t, 64)
        want.append(t)
    assert [r["id"] for r in replies] == [msg_id] * 5
    assert [r.get("more", False) for r in replies] == [True] * 4 + [False]
    assert [tok for r in replies for tok in r["result"]["tokens"]] == want
    final = replies[-1]["result"]
    assert final["finished"] is True and final["finish_reason"] == "length"
    assert all(r["result"]["finished"] is False for r in replies[:-1])
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": 5}
    # stream=false: one reply holding every token
    msg_id = p.send("generate", {"request_id": "r2", "prompt_ids": [5, 9], "max_tokens": 5,
                                 "stream": False})
    r = p.recv()
    assert r["id"] == msg_id and "more" not in r and r["result"]["tokens"] == want
    assert not p.sock.poll(200)                         # and nothing after it


def test_a_failing_engine_step_ends_the_requests_it_touched(serve, peers):
    """A step that raises must not leave clients waiting forever: proc.py calls
    engine.fail_running() after a failed step, but Engine has none, so the request stays live and
    every later step fails again."""
    from graphserver.engine import Engine

    eng = Engine(model="random:tiny", device="cpu", max_len=64, kv_blocks=8, block_size=16,
                 max_num_seqs=4, prefill_chunk=16, log=lambda m: None)

    def broken(out):
        raise RuntimeError("device lost (test)")

    eng.core.executor.execute = broken
    s = serve(eng)
    p = peers(s.endpoint)
    msg_id = p.send("generate", {"request_id": "doomed", "prompt_ids": [1, 2, 3],
                                 "max_tokens": 4})
    assert p.sock.poll(3000), "no reply at all after the step failed"
    r = p.recv()
    assert r["id"] == msg_id and "more" not in r
    assert (not r["ok"]) or (r["result"]["finished"] and r["result"]["finish_reason"] == "abort")
    st = p.call("status")["result"]
    assert st["scheduler"]["running"] == 0 and st["kv"]["blocks_used"] == 0


def test_no_busy_spin_while_a_request_waits_for_session_blocks(serve, peers):
    """Nothing runs and the queued request cannot be admitted (a session holds the arena): the
    loop must wait, not call run_step() back to back, and serve the request once blocks free."""
    from graphserver.engine import Engine

    eng = Engine(model="random:tiny", device="cpu", max_len=64, kv_blocks=4, block_size=16,
                 max_num_seqs=4, prefill_chunk=16, log=lambda m: None)
    calls = [0]
    run_step = eng.run_step

    def counted():
        calls[0] += 1
        run_step()

    eng.run_step = counted
    s = serve(eng, poll_ms=20)
    p = peers(s.endpoint)
    assert p.call("kv_init", {"session": "hog", "input_ids": list(range(1, 64))})["ok"]
    gen = p.send("generate", {"request_id": "g", "prompt_ids": [5, 6, 7, 8, 9], "max_tokens": 4,
                              "ignore_eos": True})
    time.sleep(0.3)
    n0 = calls[0]
    time.sleep(1.0)
    idle_calls = calls[0] - n0
    assert not p.sock.poll(0)                           # still waiting: no reply yet
    r = p.call("kv_free", {"session": "hog"})
    assert r["ok"]
    replies = [p.recv()]
    while replies[-1].get("more"):
        replies.append(p.recv())
    assert all(x["id"] == gen for x in replies)
    assert sum(len(x["result"]["tokens"]) for x in replies) == 4
    assert idle_calls < 200, f"{idle_calls} run_step calls in 1 s with nothing to run"


def test_hello_names_the_version_a_reload_switched_to(serve, peers, tmp_path):
    """hello is answered from a cache on the IO thread; a reload (answered later, from a step)
    must refresh it before its answer leaves, or every front end that polls hello for the model
    version keeps naming the old weights."""
    s = serve(FakeEngine())
    p = peers(s.endpoint)
    assert p.call("hello")["result"]["model_version"] == "0"
    r = p.call("reload", {"path": str(tmp_path), "version": "B"})
    assert r["ok"] and r["result"]["model_version"] == "B", r
    assert p.call("hello")["result"]["model_version"] == "B"
    bad = p.call("reload", {"path": str(tmp_path / "missing"), "version": "C"})
    assert error_type(bad) == "BadRequest"
    assert p.call("hello")["result"]["model_version"] == "B"
