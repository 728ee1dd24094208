"""Step graphs under tensor parallelism: every rank captures, replays and releases the same graphs.

A graph of a TP step holds that rank's all-reduces, so a replay on rank 0 is only valid while every
worker replays its own graph of the same step at the same point of the call order. Rank 0's graph
managers (seq.py, batch.py) run unchanged over a TPCapturer: each capture gets a serial number and
goes to the workers too, each replay and release names the serial. A worker captures on its own
capture thread (rank 0's request side keeps replaying meanwhile, and so does the worker's), and
replays and releases on its main thread in pipe order, waiting for its own capture of that serial
where it lags. A worker whose capture failed runs the same step eagerly instead: the same
all-reduces in the same order, so the ranks stay paired.

On CUDA, captures all-reduce through a process group of their own (worker/tp.py make_all_reduce):
a capture on one thread and an eager step on another then never share a communicator or its
stream. On the CPU there are no graphs; EagerCapturer stands in (replay = run the step), which is
how the mirroring is tested on gloo.
"""
from __future__ import annotations

import itertools
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .graphs.cuda import capturer_for, step_of

KINDS = ("seq", "batch")     # the session step (key: length) and the batched step (bucket, length)


@dataclass
class MirroredHandle:
    """Rank 0's handle: its own graph plus the serial the workers know theirs by."""
    inner: Any
    serial: int
    group: Any

    @property
    def shared(self) -> bool:
        return bool(getattr(self.inner, "shared", False))

    def replay(self) -> None:
        self.group.send("graphs", "replay", (self.serial,), {})    # the workers replay theirs
        self.inner.replay()


class TPCapturer:
    """Rank 0's capturer under TP: wraps its own capturer and mirrors every graph to the workers."""

    def __init__(self, local: Any, group: Any, kind: str):
        assert kind in KINDS, kind
        self.local, self.group, self.kind = local, group, kind
        self._serials = itertools.count(1)
        self._lock = threading.Lock()       # serials: the capture thread and the request side

    def _serial(self) -> int:
        with self._lock:
            return next(self._serials)

    def on_thread_start(self) -> None:
        start = getattr(self.local, "on_thread_start", None)
        if start is not None:
            start()

    def capture(self, key: Any) -> MirroredHandle:
        serial = self._serial()
        self.group.send("graphs", "capture", (self.kind, serial, key), {})   # theirs meanwhile
        try:
            inner = self.local.capture(key)
        except BaseException:
            self.group.send("graphs", "release", (serial,), {})
            raise
        return MirroredHandle(inner, serial, self.group)

    def try_share(self, key: Any) -> Optional[MirroredHandle]:
        """Only a key rank 0 can share goes to the workers (most lookups find nothing, and a
        worker "shares" by capturing: its capturer shares that signature too, since every rank
        captures the same keys in the same order)."""
        share = getattr(self.local, "try_share", None)
        inner = share(key) if share is not None else None
        if inner is None:
            return None
        serial = self._serial()
        self.group.send("graphs", "capture", (self.kind, serial, key), {})
        return MirroredHandle(inner, serial, self.group)

    def release(self, handle: MirroredHandle) -> None:
        self.group.send("graphs", "release", (handle.serial,), {})
        self.local.release(handle.inner)

    def purge(self) -> None:
        purge = getattr(self.local, "purge", None)
        if purge is not None:
            purge()
        self.group.send("graphs", "purge", (self.kind,), {})

    def memory_bytes(self) -> int:      # rank 0's own; each worker holds about as much
        mem = getattr(self.local, "memory_bytes", None)
        return mem() if mem is not None else 0


class EagerHandle:
    shared = False

    def __init__(self, run: Callable[[], None]):
        self.replay = run


class EagerCapturer:
    """The CPU's stand-in for a graph capturer: "capture" records the step, replay runs it."""

    def __init__(self, step: Callable[[Any], None]):
        self.step = step

    def capture(self, key: Any) -> EagerHandle:
        return EagerHandle(lambda: self.step(key))

    def release(self, handle: EagerHandle) -> None:
        pass


class WorkerGraphs:
    """A worker's side: its own capturers, a capture thread, handles by serial."""

    def __init__(self, runner: Any, device: Any, log: Callable[[str], None]):
        self.steps = {kind: step_of(runner, kind) for kind in KINDS}
        self.log = log
        self.capturers = {kind: capturer_for(runner, device, kind) if device.type == "cuda"
                          else EagerCapturer(self.steps[kind]) for kind in KINDS}
        self._handles: dict[int, tuple[str, Any, Future]] = {}   # serial -> (kind, key, handle)
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._capture_loop, name="tp-graph-capture", daemon=True)
        self._started = False

    def _capture_loop(self) -> None:
        for capturer in self.capturers.values():    # e.g. set_device on this thread
            start = getattr(capturer, "on_thread_start", None)
            if start is not None:
                start()
        for kind, key, fut in iter(self._jobs.get, None):
            try:
                fut.set_result(self.capturers[kind].capture(key))
            except BaseException as e:      # this rank then runs that step eagerly
                self.log(f"graph capture of {kind} {key!r} failed on this rank: {e!r}")
                fut.set_exception(e)

    def capture(self, kind: str, serial: int, key: Any) -> None:
        if not self._started:
            self._thread.start()
            self._started = True
        fut: Future = Future()
        self._handles[serial] = (kind, key, fut)
        self._jobs.put((kind, key, fut))

    def _handle(self, serial: int) -> tuple[str, Any, Optional[Any]]:
        kind, key, fut = self._handles[serial]
        return kind, key, (fut.result() if fut.exception() is None else None)

    def replay(self, serial: int) -> None:
        kind, key, handle = self._handle(serial)
        if handle is None:
            self.steps[kind](key)
        else:
            handle.replay()

    def release(self, serial: int) -> None:
        kind, key, handle = self._handle(serial)
        del self._handles[serial]
        if handle is not None:
            self.capturers[kind].release(handle)

    def purge(self, kind: str) -> None:
        purge = getattr(self.capturers[kind], "purge", None)
        if purge is not None:
            purge()

    def close(self) -> None:
        if self._started:
            self._jobs.put(None)
            self._thread.join()
