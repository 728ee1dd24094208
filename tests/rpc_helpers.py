"""Test helpers shared by the RPC tests: a server thread and child-process environments."""

import os
import threading

from graphserver.server import RPCServer

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


def child_env():
    """Environment for child processes that must import fake_engine (and the repo's packages)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH")) if p)
    return env


FAKE_ENGINE_ARGS = ["--engine-factory", "fake_engine:FakeEngine"]
