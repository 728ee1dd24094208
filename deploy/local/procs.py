"""The processes one local run starts, and nothing else: each is started in its own session (so
its process group id is its PID), logged to a file, and stopped by that id at the end, in reverse
order of starting. Stdlib only."""
from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Sequence


class StartError(RuntimeError):
    """A process did not come up; the message names it and ends with its log's last lines."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's pick for port 0). Racy by nature, which is
    fine on a loopback test machine; the process that binds it fails loudly if it lost the race."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


@dataclasses.dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO
    lines: list[str] = dataclasses.field(default_factory=list)  # its stdout, with stdout_pipe
    stdout_closed: bool = False
    cond: threading.Condition = dataclasses.field(default_factory=threading.Condition)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        # Not popen.poll(): that reaps, and a reaped leader's PID may be reused before we signal
        # its group to clean up its children.
        return self.popen.returncode is None and not _exited_unreaped(self.popen.pid, 0)

    def signal_group(self, sig: int) -> None:
        """Signal its whole process group (a server's children too), by the group id we own."""
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass


class Supervisor:
    """Starts processes and guarantees they are stopped: stop_all() (SIGTERM, then SIGKILL past
    a grace period) runs at the end of a run or on SIGINT/SIGTERM through the caller's handler."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.env = env
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], *, stdout_pipe: bool = False) -> Proc:
        """stdout_pipe: its stdout lines are kept for wait_line (and copied to its log) by a
        reader thread, so a chatty process can never block on a full pipe."""
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "w")
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_file, stderr=log_file,
            start_new_session=True, env=self.env, text=True)
        proc = Proc(name, popen, log_path, log_file)
        if stdout_pipe:
            threading.Thread(target=_read_lines, args=(proc,), daemon=True,
                             name=f"stdout-{name}").start()
        self.procs.append(proc)
        return proc

    def wait_line(self, proc: Proc, prefix: str, timeout: float) -> str:
        """The rest of the first stdout line starting with `prefix` (a server's READY line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with proc.cond:
                for line in proc.lines:
                    if line.startswith(prefix):
                        return line[len(prefix):].strip()
                if proc.stdout_closed:
                    break
                proc.cond.wait(0.2)
        why = "exited" if not proc.alive() else f"printed no {prefix!r} line within {timeout:g}s"
        raise StartError(f"{proc.name} {why}; last lines of {proc.log_path}:\n"
                         f"{log_tail(proc.log_path)}")

    def wait_http(self, proc: Proc, host: str, port: int, path: str, timeout: float) -> None:
        """Until GET path answers 200 (a server's /health once it serves)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not proc.alive():
                raise StartError(f"{proc.name} exited; last lines of {proc.log_path}:\n"
                                 f"{log_tail(proc.log_path)}")
            conn = http.client.HTTPConnection(host, port, timeout=5)
            try:
                conn.request("GET", path)
                status = conn.getresponse().status
                if status == 200:
                    return
                last = f"HTTP {status}"
            except OSError as e:
                last = type(e).__name__
            finally:
                conn.close()
            time.sleep(0.3)
        raise StartError(f"{proc.name}: GET http://{host}:{port}{path} not 200 within "
                         f"{timeout:g}s (last: {last}); last lines of {proc.log_path}:\n"
                         f"{log_tail(proc.log_path)}")

    def signal_leader(self, proc: Proc, sig: int) -> None:
        """sig to the leader alone, as the kubelet signals only a container's PID 1: a front end
        that drains on SIGTERM must still have its engine child then."""
        if proc.alive():  # (not popen.send_signal: it polls, which reaps)
            os.kill(proc.pid, sig)

    def wait_exit(self, proc: Proc, timeout: float) -> bool:
        """Until the leader exits (not reaped; stop() does that); False past timeout."""
        return _exited_unreaped(proc.pid, timeout)

    def kill(self, proc: Proc) -> None:
        """SIGKILL, no drain: the crash of a replica."""
        proc.signal_group(signal.SIGKILL)
        self._reap(proc)

    def stop(self, proc: Proc, grace: float = 20.0,
             sig: int | None = signal.SIGTERM) -> int | None:
        """sig to the group (None: none, just wait), SIGKILL past `grace`; then reap it and any
        children it left. Returns its exit status."""
        if proc.alive():
            if sig is not None:
                proc.signal_group(sig)
            if not _exited_unreaped(proc.pid, grace):
                proc.signal_group(signal.SIGKILL)
        self._reap(proc)
        with proc.cond:
            proc.log_file.close()
        return proc.popen.returncode

    @staticmethod
    def _reap(proc: Proc) -> None:
        # While the leader is an unreaped zombie its PID (the group id) cannot be reused, so
        # SIGKILL to the group can only reach children it left behind, never someone else's.
        if proc.popen.returncode is None:
            _exited_unreaped(proc.pid, None)
            proc.signal_group(signal.SIGKILL)
        proc.popen.wait()

    def stop_all(self, grace: float = 20.0) -> dict[str, int | None]:
        codes = {}
        while self.procs:
            proc = self.procs.pop()
            codes[proc.name] = self.stop(proc, grace)
        return codes


def _exited_unreaped(pid: int, timeout: float | None) -> bool:
    """Wait until `pid` (our child) has exited, without reaping it; False past `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True  # already reaped
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _read_lines(proc: Proc) -> None:
    assert proc.popen.stdout is not None
    for line in proc.popen.stdout:
        with proc.cond:
            proc.lines.append(line.rstrip("\n"))
            if not proc.log_file.closed:
                proc.log_file.write(f"[stdout] {line}")
                proc.log_file.flush()
            proc.cond.notify_all()
    with proc.cond:
        proc.stdout_closed = True
        proc.cond.notify_all()
