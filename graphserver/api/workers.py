"""`graphserver serve --api-servers N`: N front-end processes behind one port.

One front-end process tops out near one core: at 64 streams its CPU per streamed token (SSE write,
engine reply, detokenizer) bounds it at 12-20k tokens/s, below what the engine makes. So the first
process (the one the user started) starts N-1 more once the engine is up. Each is a plain
`graphserver serve` attached to the same engine endpoint, serving the same listening socket
(inherited by file descriptor): the kernel hands every new connection to whichever process accepts
first, and a process that dies simply stops accepting. Metrics go through prometheus_client's
multiprocess mode, so a scrape of any process counts every process's requests; the engine's own
figures come from its status, which any process can ask for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from typing import Any, Sequence

from client.rpc import ServerPopen, spawn_process
from graphserver import defaults
from graphserver.api.service import EngineLauncher

log = logging.getLogger(__name__)

MULTIPROC_ENV = defaults.METRICS_MULTIPROC_ENV
STOP_GRACE_S = 10.0


class ExtraWorkers:
    """The N-1 extra front-end processes: started once the engine answers, stopped first at exit."""

    def __init__(self, count: int, sock: socket.socket, worker_args: Sequence[str], start_timeout_s: float):
        self.count = count
        self.sock = sock
        self.worker_args = list(worker_args)  # serve options every worker shares (tokenizer, timeouts...)
        self.start_timeout_s = start_timeout_s
        self.procs: list[ServerPopen] = []

    def argv(self, endpoint: str) -> list[str]:
        return [sys.executable, "-m", "graphserver.cli", "serve", "--engine-endpoint", endpoint,
                "--listen-fd", str(self.sock.fileno()), "--exit-with-parent", *self.worker_args]

    async def start(self, endpoint: str) -> None:
        """Start them all at once and wait for every READY line (a failure stops those started)."""
        self.sock.set_inheritable(True)
        started = await asyncio.gather(*(asyncio.to_thread(self._spawn, endpoint) for _ in range(self.count)),
                                       return_exceptions=True)
        self.procs = [p for p in started if isinstance(p, ServerPopen)]
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed:
            await self.stop()
            raise RuntimeError(f"{len(failed)} of {self.count} extra front-end processes failed to start: {failed[0]}")
        log.info("%d extra front-end processes serving: pids %s", self.count, [p.pid for p in self.procs])

    def _spawn(self, endpoint: str) -> ServerPopen:
        proc, _ = spawn_process(self.argv(endpoint), self.start_timeout_s, pass_fds=(self.sock.fileno(),))
        return proc

    async def stop(self) -> None:
        """SIGTERM (their graceful shutdown), then SIGKILL for any still there after STOP_GRACE_S."""
        procs, self.procs = self.procs, []
        for p in procs:
            if p.poll() is None:
                p.terminate()
        await asyncio.gather(*(asyncio.to_thread(self._reap, p) for p in procs))

    @staticmethod
    def _reap(proc: ServerPopen) -> None:
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:  # it ignored SIGTERM
            proc.kill()
            proc.wait(5.0)
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(proc.pid)  # its live gauges stop counting


class WithExtraWorkers(EngineLauncher):
    """A launcher that, once its engine is up, starts the extra front-end processes attached to it;
    at exit it stops them before the engine."""

    def __init__(self, inner: EngineLauncher, workers: ExtraWorkers):
        self.inner = inner
        self.workers = workers

    async def start(self) -> tuple[str, Any]:
        endpoint, process = await self.inner.start()
        await self.workers.start(endpoint)
        return endpoint, process

    async def stop(self, client: Any) -> None:
        try:
            await self.workers.stop()
        finally:
            await self.inner.stop(client)

