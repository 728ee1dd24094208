"""The client: RPC timeouts, dead servers, stale replies, spawning, and the process lifecycle."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from client.rpc import (RemoteProtocolError, RemoteUnknownSession, RPCClient, RPCTimeout, ServerDead,
                        ServerProcess, remote_error, spawn_process, spawn_server)
from graphserver import errors, protocol

from rpc_helpers import FAKE_ENGINE_ARGS, ScriptedRouter, child_env

TIMEOUT_S = 10.0


def _reply(sock, frames, msg_id, result):
    sock.send_multipart(frames[:-1] + [protocol.encode(protocol.make_ok(msg_id, result))])


@pytest.fixture
def ipc(tmp_path_factory):
    return f"ipc://{tmp_path_factory.mktemp('c')}/s.sock"


# -- RPCClient against scripted servers ------------------------------------------------------


def test_timeout_then_recovery(ipc):
    answer = threading.Event()

    def on_request(sock, frames, req):
        if answer.is_set():
            _reply(sock, frames, req["id"], {"n": req["id"]})

    router = ScriptedRouter(ipc, on_request)
    try:
        with RPCClient(ipc, timeout_s=0.3, handshake_s=None) as c:
            t0 = time.monotonic()
            with pytest.raises(RPCTimeout, match="no reply"):
                c.hello()
            assert 0.3 <= time.monotonic() - t0 < 2.0
            answer.set()
            assert c.hello() == {"n": 2}
        # The socket was recreated after the timeout: the second request came from a new identity.
        assert len(router.seen) == 2 and router.seen[0][0] != router.seen[1][0]
    finally:
        router.stop()


def test_stale_reply_ids_are_discarded(ipc):
    def on_request(sock, frames, req):
        _reply(sock, frames, req["id"] - 1, "stale")  # an answer to an earlier request
        _reply(sock, frames, 10**6, "unknown")
        _reply(sock, frames, req["id"], "fresh")

    router = ScriptedRouter(ipc, on_request)
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S, handshake_s=None) as c:
            assert c.call("hello") == "fresh"
            assert c.call("hello") == "fresh"  # leftovers of the first call do not leak into the second
    finally:
        router.stop()


def test_error_reply_without_id_is_raised(ipc):
    def on_request(sock, frames, req):
        sock.send_multipart(frames[:-1] + [protocol.encode(protocol.make_error(None, "ProtocolError", "unreadable"))])

    router = ScriptedRouter(ipc, on_request)
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S, handshake_s=None) as c:
            with pytest.raises(RemoteProtocolError) as ei:
                c.hello()
            assert ei.value.type == "ProtocolError" and "unreadable" in ei.value.message
    finally:
        router.stop()


def test_error_replies_keep_the_connection(ipc):
    def on_request(sock, frames, req):
        sock.send_multipart(frames[:-1] + [protocol.encode(protocol.make_error(req["id"], "BadRequest", "no"))])

    router = ScriptedRouter(ipc, on_request)
    try:
        with RPCClient(ipc, timeout_s=TIMEOUT_S, handshake_s=None) as c:
            for _ in range(2):
                with pytest.raises(errors.BadRequest, match="no"):
                    c.hello()
        assert router.seen[0][0] == router.seen[1][0]  # same identity: no reconnect per error
    finally:
        router.stop()


def test_server_closing_mid_request_is_detected_without_a_process_handle(ipc):
    router = ScriptedRouter(ipc, lambda sock, frames, req: False)  # read the request, then vanish
    with RPCClient(ipc, timeout_s=30.0, handshake_s=None) as c:
        t0 = time.monotonic()
        with pytest.raises(ServerDead, match="dropped"):
            c.hello()
        assert time.monotonic() - t0 < 5.0  # the disconnect, not the 30 s timeout
    router.thread.join(5.0)


def test_remote_error_classes():
    e = remote_error("UnknownSession", "no session 'x'")
    assert isinstance(e, RemoteUnknownSession) and isinstance(e, errors.UnknownSession)
    assert (e.type, e.message) == ("UnknownSession", "no session 'x'")
    other = remote_error("SomethingNew", "m")
    assert type(other).__name__ == "RemoteError" and other.type == "SomethingNew"


# -- spawned processes -----------------------------------------------------------------------

DIES_ON_FIRST_REQUEST = """
import os, sys, zmq
ep = sys.argv[1]
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(ep)
print("READY " + ep, flush=True)
sock.recv_multipart()
print("dying now", file=sys.stderr, flush=True)
os._exit(3)
"""


def test_spawned_process_dying_mid_request_raises_server_dead(ipc):
    proc, endpoint = spawn_process([sys.executable, "-c", DIES_ON_FIRST_REQUEST, ipc], timeout_s=TIMEOUT_S)
    assert endpoint == ipc
    with RPCClient(endpoint, timeout_s=30.0, process=proc, handshake_s=None) as c:
        t0 = time.monotonic()
        with pytest.raises(ServerDead) as ei:
            c.hello()
        assert time.monotonic() - t0 < 5.0
    assert proc.wait(5) == 3
    # Either the disconnect or the exit is seen first; a later call names the exit code and stderr.
    with pytest.raises(ServerDead, match="exited with code 3") as ei:
        RPCClient(endpoint, timeout_s=30.0, process=proc)  # the handshake names the exit
        assert "dying now" in str(ei.value)


def test_spawn_reports_early_exit_with_stderr():
    script = "import sys; print('boom: no such model', file=sys.stderr); sys.exit(4)"
    with pytest.raises(ServerDead, match="code 4 before READY") as ei:
        spawn_process([sys.executable, "-c", script], timeout_s=TIMEOUT_S)
    assert "boom: no such model" in str(ei.value)


def test_spawn_timeout_kills_the_process():
    script = "import os, sys, time; print('pid', os.getpid(), file=sys.stderr, flush=True); time.sleep(60)"
    with pytest.raises(RPCTimeout, match="no READY line") as ei:
        spawn_process([sys.executable, "-c", script], timeout_s=1.5)
    pid = int(str(ei.value).split("pid ")[-1].split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped: no orphan, no zombie


def test_stdout_before_ready_is_forwarded_not_mistaken(ipc, capsys):
    script = DIES_ON_FIRST_REQUEST.replace('print("READY', 'print("loading...", flush=True); print("READY')
    proc, endpoint = spawn_process([sys.executable, "-c", script, ipc], timeout_s=TIMEOUT_S)
    try:
        assert endpoint == ipc
        assert "loading..." in capsys.readouterr().err
    finally:
        proc.kill()
        proc.wait(5)


def _sock_path(endpoint):
    assert endpoint.startswith("ipc://")
    return endpoint[len("ipc://"):]


def test_server_process_end_to_end():
    sp = ServerProcess(extra_args=FAKE_ENGINE_ARGS + ["--device", "cpu", "--max-len", "77",
                                                        "--session-ttl", "5"], env=child_env(),
                       spawn_timeout_s=60.0, call_timeout_s=TIMEOUT_S)
    with sp as c:
        hello = c.hello()
        # Only the options given reach the engine; the CLI's own defaults for device/dtype always do.
        assert hello["ctor_kwargs"] == {"device": "cpu", "dtype": "auto", "session_ttl_s": 5.0}
        assert hello["max_len"] == 77
        c.kv_init("s", [1, 2, 3])
        assert c.step("s", 4)["length"] == 4
        with pytest.raises(RemoteUnknownSession):
            c.kv_free("nope")
        path = _sock_path(sp.endpoint)
        assert os.path.exists(path)
    assert sp.process.returncode == 0  # `stop` made it exit cleanly
    assert not os.path.exists(os.path.dirname(path))  # private socket dir removed


@pytest.mark.parametrize("sig, warned", [(signal.SIGTERM, False), (signal.SIGKILL, True)])
def test_stop_racing_the_servers_own_exit(sig, warned, caplog):
    # Ctrl-C reaches the whole process group: the server may exit on its own signal while the
    # stop is on the way. A clean exit (SIGTERM: code 0) is no failure; a killed server is.
    sp = ServerProcess(extra_args=FAKE_ENGINE_ARGS, env=child_env(), spawn_timeout_s=60.0,
                       call_timeout_s=TIMEOUT_S)
    with caplog.at_level(logging.WARNING, logger="client.rpc"):
        with sp as c:
            def stop_meets_an_exit(timeout_s=None):
                sp.process.send_signal(sig)
                sp.process.wait(10)
                raise ServerDead("connection dropped while awaiting the reply")
            c.stop = stop_meets_an_exit
    assert sp.process.returncode == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert any("stop failed" in r.getMessage() for r in caplog.records) == warned


def test_sigterm_exits_cleanly():
    proc, endpoint = spawn_server(extra_args=FAKE_ENGINE_ARGS, timeout_s=60.0, env=child_env())
    try:
        with RPCClient(endpoint, timeout_s=TIMEOUT_S, process=proc) as c:
            assert c.hello()["model"] == "fake"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        proc.stderr_thread.join(5)
        assert "server closed" in proc.stderr_tail()
        assert not os.path.exists(_sock_path(endpoint))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_killed_server_mid_request_raises_server_dead():
    proc, endpoint = spawn_server(extra_args=FAKE_ENGINE_ARGS, timeout_s=60.0, env=child_env())
    try:
        with RPCClient(endpoint, timeout_s=30.0, process=proc) as c:
            threading.Timer(0.3, proc.kill).start()
            t0 = time.monotonic()
            with pytest.raises(ServerDead):
                c.wait_precapture(1, timeout_s=20.0)  # the fake sleeps for timeout_s
            assert time.monotonic() - t0 < 5.0
    finally:
        proc.kill()
        proc.wait(5)


def test_server_outlives_the_thread_that_spawned_it():
    # PR_SET_PDEATHSIG fires when the spawning *thread* exits; the server must tell that apart.
    spawned = []
    t = threading.Thread(target=lambda: spawned.append(spawn_server(extra_args=FAKE_ENGINE_ARGS, timeout_s=60.0,
                                                                   env=child_env())))
    t.start()
    t.join(60)
    proc, endpoint = spawned[0]
    try:
        time.sleep(0.5)  # a signal, if sent, has been handled by now
        assert proc.poll() is None
        with RPCClient(endpoint, timeout_s=TIMEOUT_S, process=proc) as c:
            assert c.hello()["model"] == "fake"
            c.stop()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


INTERMEDIATE = """
import sys, time
from client.rpc import spawn_server
proc, endpoint = spawn_server(extra_args=sys.argv[1:], timeout_s=60.0)
print(proc.pid, endpoint, flush=True)
time.sleep(120)
"""


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_server_exits_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", INTERMEDIATE, *FAKE_ENGINE_ARGS], stdout=subprocess.PIPE,
                              env=child_env(), text=True)
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(parent.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        assert line and line[0].strip(), "intermediate parent printed nothing"
        pid_s, endpoint = line[0].split()
        server_pid = int(pid_s)
        assert not _gone(server_pid)
        parent.kill()  # SIGKILL: the parent gets no chance to clean up
        parent.wait(5)
        deadline = time.monotonic() + 10.0
        while not _gone(server_pid):
            assert time.monotonic() < deadline, "server outlived its parent"
            time.sleep(0.05)
        assert not os.path.exists(_sock_path(endpoint))  # it shut down cleanly, not killed
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
        parent.stdout.close()
