"""The background capture loop both graph managers run (seq.py: session lengths; batch.py:
batched keys): under the manager's lock ask for the next key, capture it outside the lock (the
request side keeps replaying meanwhile), install it under the lock. A failure is kept, never lost:
the managers surface it on their request side and in their snapshots."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional


class CaptureThread:
    """Mixin: a manager provides capturer, log, _next_job() (under the lock: the next key or
    None) and _install(key, handle, ms) (under the lock: keep it, or release a raced duplicate)."""

    thread_name = "graph-capture"
    capturer: Any
    log: Callable[[str], None]

    def _init_thread(self) -> None:
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._running = False
        self._error: Optional[BaseException] = None

    def _start_thread(self) -> None:
        """Under the lock, with _running just set by the caller."""
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._running

    def _run(self) -> None:
        try:
            on_start = getattr(self.capturer, "on_thread_start", None)
            if on_start is not None:
                on_start()
            while True:
                with self._cond:
                    if not self._running:
                        return
                    key = self._next_job()
                    if key is None:
                        self._cond.wait(timeout=0.1)
                        continue
                t0 = time.perf_counter()
                handle = self.capturer.capture(key)
                ms = (time.perf_counter() - t0) * 1e3
                with self._cond:
                    self._install(key, handle, ms)
                    self._cond.notify_all()
        except BaseException as exc:
            with self._cond:
                self._error = exc
                self._running = False
                self._cond.notify_all()
            self.log(f"{self.thread_name} thread failed: {exc!r}")
