"""Test helpers shared by the RPC tests: a server thread, a fake engine that takes today's
protocol params, a scripted ROUTER, and child-process environments."""

import contextlib
import os
import threading

import zmq

from fake_engine import FakeEngine
from graphserver import protocol
from graphserver.engine.proc import EngineProc as RPCServer

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
JOIN_TIMEOUT_S = 5.0


class ServerThread:
    """An RPCServer serving in a daemon thread; stop() asks it to exit and joins."""

    def __init__(self, engine, endpoint, **kw):
        self.engine = engine
        self.server = RPCServer(engine, endpoint, **kw)
        self.endpoint = self.server.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="rpc-server")
        self.thread.start()

    def stop(self):
        self.server.request_stop()
        self.thread.join(timeout=JOIN_TIMEOUT_S)
        assert not self.thread.is_alive(), "server thread did not exit"


class ClientFakeEngine(FakeEngine):
    """FakeEngine with the kv_init / replay_seq params protocol 2 added (replace, deadline_s).
    Records each deadline_s it gets in `deadlines` as (method, value)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadlines = []

    def kv_init(self, session, input_ids, top_k=None, replace=False, deadline_s=None):
        self.deadlines.append(("kv_init", deadline_s))
        if replace:
            self.sessions.pop(session, None)
        return super().kv_init(session, input_ids, top_k)

    def replay_seq(self, session, steps, start_token=None, sampling=None, stop_token_ids=(), deadline_s=None):
        self.deadlines.append(("replay_seq", deadline_s))
        return super().replay_seq(session, steps, start_token, sampling or {}, list(stop_token_ids))


def resolving_fake_engine(model=None, **kwargs):
    """A ClientFakeEngine that first resolves --model as the real engine does, so a model that does
    not exist fails the same way (ModelResolveError)."""
    if model is not None:
        from graphserver.prepare import resolve_model

        resolve_model(model)
    return ClientFakeEngine(model=model, **kwargs)


class TokenizerlessFakeEngine(ClientFakeEngine):
    """Serves the vocab of --model DIR's tokenizer but reports no tokenizer_path, like a model
    directory that ships none (the client then needs --tokenizer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer_path = None


class ScriptedRouter:
    """A bare ROUTER in a thread; `on_request(sock, frames, request)` decides what (if anything)
    to send back. Returning False closes the socket at once (a server that dies mid-request)."""

    def __init__(self, endpoint, on_request):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.on_request = on_request
        self.seen = []  # (identity, request)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                if not self.sock.poll(50):
                    continue
                frames = self.sock.recv_multipart()
                request = protocol.decode(frames[-1])
                self.seen.append((frames[0], request))
                if self.on_request(self.sock, frames, request) is False:
                    break
        finally:
            self.sock.close(0)
            self.ctx.term()

    def methods(self):
        return [r.get("method") for _, r in self.seen]

    def stop(self):
        self._stop.set()
        self.thread.join(5.0)
        assert not self.thread.is_alive()


def send_reply(sock, frames, reply):
    sock.send_multipart(frames[:-1] + [protocol.encode(reply)])


def child_env():
    """Environment for child processes that must import fake_engine (and the repo's packages)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH")) if p)
    return env


FAKE_ENGINE_ARGS = ["--engine-factory", "rpc_helpers:ClientFakeEngine"]


@contextlib.contextmanager
def served_api(argv, timeout_s=300.0):
    """A `graphserver serve` process (argv) started and ready: yields (its URL, its model id);
    terminated afterwards, killed if it does not exit."""
    import httpx

    from client.rpc import spawn_process

    proc, url = spawn_process(argv, timeout_s=timeout_s, env=child_env())
    try:
        yield url, httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except Exception:
            proc.kill()
            proc.wait(5)
