"""Exact-length CUDA graphs of the batch-1 session step: a background thread captures them on a
capture stream while the request thread replays them on a replay stream.

The manager is generic over a *capturer* (anything with capture(key) -> handle and
release(handle)), so its window and eviction logic is tested on the CPU with a stand-in, and the
CUDA capturer below is the only part that needs a GPU.

Graph key: the sequence length T a step runs at (position + 1), rounded up to a multiple of
`bucket` (bucket 1 = exact-seq mode, the default) and capped at max_len. The kernels read the
exact length from device memory, so a graph for key K serves every T that rounds up to K.

A *stall* is a decode step that had to wait for a graph that was not ready (acquire below); a
*fallback* is one that ran eagerly instead (counted by the caller). Before a session's first step,
prepare() + wait_first() get the graphs its first replay reaches at once ready while its prefill
runs; no step is waiting then, and that wait is reported on its own (first_waits, first_wait_ms).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .capture_thread import CaptureThread



def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), numpy's method="nearest"; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[idx]


@dataclass
class GraphStats:
    captured: int = 0          # keys made ready (new captures + shared executables)
    shared: int = 0            # of which reused an executable captured for another key
    evicted: int = 0
    replays: int = 0
    stalls: int = 0
    stall_ms: float = 0.0
    fallbacks: int = 0
    first_waits: int = 0       # wait_first calls that found a session's first graphs missing
    first_wait_ms: float = 0.0
    stall_keys: list = field(default_factory=list)   # the keys of the most recent stalls
    capture_ms: list = field(default_factory=list)   # the most recent capture times
    first_capture_t: float = 0.0
    last_capture_t: float = 0.0

    def record_capture(self, ms: float, shared: bool = False, keep: int = 2048) -> None:
        now = time.perf_counter()
        if not self.captured:
            self.first_capture_t = now
        self.last_capture_t = now
        self.captured += 1
        if shared:             # a lookup, not a capture: kept out of the capture-time figures
            self.shared += 1
            return
        self.capture_ms.append(ms)
        del self.capture_ms[:-keep]


class GraphManager(CaptureThread):
    """Keeps graphs for keys in a window [T - behind, T + ahead] around every live length."""

    def __init__(self, capturer, max_len: int, bucket: int = 1, ahead: int = 32, behind: int = 2,
                 log: Callable[[str], None] = lambda msg: None):
        if bucket < 1:
            raise ValueError("bucket must be >= 1")
        self.capturer = capturer
        self.max_len = max_len
        self.bucket = bucket
        self.ahead, self.behind = ahead, behind
        self.log = log
        self.stats = GraphStats()
        self._graphs: dict[int, Any] = {}
        self._live: dict[str, int] = {}        # session -> its current length T
        self._reach: dict[str, int] = {}       # session -> a length its window covers (prepare)
        self._pinned: set[int] = set()
        self._init_thread()

    # ------------------------------------------------------------------ keys and windows

    def key_for(self, length: int) -> int:
        return min(self.max_len, -(-length // self.bucket) * self.bucket)

    def window_keys(self, length: int, reach: int = 0) -> list[int]:
        """Keys a session at this length will need, nearest first (the order captures go in).

        The window runs from length - behind to length + ahead, or to `reach` where that is
        further (a session's first steps, see prepare). Linear in the window size: it runs on
        every wake-up of the capture thread, under the lock the request thread also takes.
        """
        lo = max(1, length - self.behind)
        hi = min(self.max_len, max(length + self.ahead, reach))
        keys = dict.fromkeys(self.key_for(t) for t in range(length, hi + 1))
        keys.update(dict.fromkeys(self.key_for(t) for t in range(length - 1, lo - 1, -1)))
        return list(keys)

    def _wanted(self) -> list[int]:
        """Every live window, merged nearest first: the i-th key of each session's window comes
        before the (i+1)-th of any. A session just announced thus gets the keys it needs first
        ahead of another session's far edge (sorted by length, whole windows one after another,
        a new long session waited behind every shorter session's window)."""
        windows = [self.window_keys(length, self._reach.get(name, 0))
                   for name, length in sorted(self._live.items(), key=lambda kv: kv[1])]
        wanted: dict[int, None] = {}
        for tier in itertools.zip_longest(*windows):
            wanted.update(dict.fromkeys(k for k in tier if k is not None))
        return list(wanted)

    # ------------------------------------------------------------------ live lengths

    def note_length(self, session: str, length: int) -> None:
        """The engine reports where a session is; the capture thread reacts."""
        with self._cond:
            new = session not in self._live
            self._live[session] = length
            # Wake the capture thread only when the window's far edge is missing, the session is
            # new or its current key is missing, or every 16 steps (for evictions): waking it
            # every step cost the request thread the lock and the GIL once per replayed token.
            edge = self.key_for(min(self.max_len, length + self.ahead))
            if (new or edge not in self._graphs or self.key_for(length) not in self._graphs
                    or length % 16 == 0):
                self._cond.notify_all()

    def prepare(self, session: str, length: int, lead: int) -> list[int]:
        """Announce a session about to decode from `length` whose first `lead` steps come at
        once (replay enqueues them before the GPU paces it): its window reaches length + lead
        (beyond `ahead` where lead is larger) and those keys go first. Returns the lengths to
        pass to wait_first once the prefill is enqueued."""
        hi = min(self.max_len, length + max(0, lead))
        with self._cond:
            self._live[session] = length
            self._reach[session] = max(hi, self._reach.get(session, 0))   # forget() resets it
            self._cond.notify_all()
        return list(range(length, hi + 1))

    def forget(self, session: str) -> None:
        with self._cond:
            self._live.pop(session, None)
            self._reach.pop(session, None)
            self._cond.notify_all()

    # ------------------------------------------------------------------ the capture thread

    def start(self, ahead: Optional[int] = None, behind: Optional[int] = None) -> None:
        with self._cond:
            if ahead is not None:
                self.ahead = ahead
            if behind is not None:
                self.behind = behind
            self._error = None
            self._cond.notify_all()
            if self._running:
                return
            self._running = True
            self._start_thread()

    def _next_job(self) -> Optional[int]:
        """Under the lock: install what the windows can share, evict what left every window,
        return the next key to capture (the nearest missing one)."""
        wanted = self._wanted()
        stale = []
        if self._live:
            keep = set(wanted) | self._pinned
            stale = [k for k in self._graphs if k not in keep]
        first = None
        for k in wanted:
            if k in self._graphs or self._try_share(k) is not None:
                continue
            if first is None:
                first = k
                if not stale:
                    break
        # Evict only once the wanted keys have taken what they can share. Releasing first let the
        # capturer drop idle executables (cuda.py keeps keep_idle of them) that this very window
        # was about to reuse: a session started again at a short length, after one had run 500
        # tokens, found its first executables destroyed and stalled on their recapture.
        for k in stale:
            self.capturer.release(self._graphs.pop(k))
            self.stats.evicted += 1
        return first

    def _install(self, key: int, handle: Any, ms: float) -> None:
        if key in self._graphs:       # capture_now raced us to it
            self.capturer.release(handle)
            return
        self._graphs[key] = handle
        self.stats.record_capture(ms, getattr(handle, "shared", False))

    def capture_now(self, key: int) -> None:
        """Capture one key synchronously on the calling thread (used before the thread runs)."""
        with self._cond:
            if key in self._graphs:
                return
        t0 = time.perf_counter()
        handle = self.capturer.capture(key)
        with self._cond:
            if key in self._graphs:
                self.capturer.release(handle)
                return
            self._graphs[key] = handle
            self.stats.record_capture((time.perf_counter() - t0) * 1e3,
                                      getattr(handle, "shared", False))
            self._cond.notify_all()

    # ------------------------------------------------------------------ the request side

    def has(self, key: int) -> bool:
        with self._cond:
            return key in self._graphs

    def acquire(self, key: int, wait_s: float) -> Optional[Any]:
        """The graph for key, waiting up to wait_s for the capture thread (a stall).

        None means: run the step eagerly (the caller counts the fallback).
        """
        with self._cond:
            handle = self._graphs.get(key)
            if handle is None:
                # A key whose launches equal an existing executable's needs no capture: take it
                # here rather than waiting for the capture thread to get round to it.
                handle = self._try_share(key)
            if handle is None and self._running and wait_s > 0:
                t0 = time.perf_counter()
                self.stats.stalls += 1
                self.stats.stall_keys.append(key)
                del self.stats.stall_keys[:-32]
                deadline = t0 + wait_s
                while key not in self._graphs and self._running:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
                self.stats.stall_ms += (time.perf_counter() - t0) * 1e3
                handle = self._graphs.get(key)
            if self._error is not None:
                raise RuntimeError(f"the graph capture thread failed: {self._error!r}")
            if handle is not None:
                self.stats.replays += 1
                self._pinned.add(key)
            return handle

    def _try_share(self, key: int):
        """Under the lock: a shared handle for key from the capturer, installed, or None."""
        share = getattr(self.capturer, "try_share", None)
        handle = share(key) if share is not None else None
        if handle is not None:
            self._graphs[key] = handle
            self.stats.record_capture(0.0, shared=True)
            self._cond.notify_all()
        return handle

    def unpin(self, key: int) -> None:
        with self._cond:
            self._pinned.discard(key)

    def wait_ready(self, lengths: list[int], timeout_s: float) -> bool:
        """Block until graphs for every key of these lengths exist (or the timeout passes)."""
        keys = {self.key_for(t) for t in lengths if t <= self.max_len}
        deadline = time.perf_counter() + timeout_s
        with self._cond:
            while not keys.issubset(self._graphs):
                left = deadline - time.perf_counter()
                if left <= 0 or not self._running or self._error is not None:
                    break
                self._cond.wait(timeout=left)
            return keys.issubset(self._graphs)

    def wait_first(self, lengths: list[int], timeout_s: float) -> bool:
        """wait_ready for a session's first lengths (from prepare), before its first step; the
        time spent is counted (first_waits, first_wait_ms), apart from the stalls. No wait, and
        nothing counted, while the capture thread is not running or the graphs are all there."""
        keys = {self.key_for(t) for t in lengths if t <= self.max_len}
        with self._cond:
            for k in sorted(keys - self._graphs.keys()):    # a shared executable is no wait
                self._try_share(k)
            if not self._running or keys.issubset(self._graphs):
                return keys.issubset(self._graphs)
        t0 = time.perf_counter()
        ready = self.wait_ready(lengths, timeout_s)
        with self._cond:
            self.stats.first_waits += 1
            self.stats.first_wait_ms += (time.perf_counter() - t0) * 1e3
        return ready

    def clear(self) -> None:
        """Drop every graph, idle executables included (the next steps run eagerly)."""
        with self._cond:
            for k in list(self._graphs):
                self.capturer.release(self._graphs.pop(k))
            purge = getattr(self.capturer, "purge", None)
            if purge is not None:
                purge()

    def snapshot(self) -> dict:
        with self._cond:
            st = self.stats
            span = st.last_capture_t - st.first_capture_t
            return {
                "mode": "exact" if self.bucket == 1 else f"bucket{self.bucket}",
                "bucket": self.bucket, "running": self._running,
                "window": {"ahead": self.ahead, "behind": self.behind},
                "resident": len(self._graphs), "captured": st.captured, "shared": st.shared,
                "new_captures": st.captured - st.shared, "evicted": st.evicted,
                "replays": st.replays, "stalls": st.stalls, "stall_ms": round(st.stall_ms, 3),
                "stall_keys": list(st.stall_keys),
                "fallbacks": st.fallbacks, "first_waits": st.first_waits,
                "first_wait_ms": round(st.first_wait_ms, 3),
                "capture_ms_p50": round(percentile(st.capture_ms, 50), 3),
                "capture_ms_p99": round(percentile(st.capture_ms, 99), 3),
                "capture_rate_per_s": round((st.captured - 1) / span, 1) if span > 0 else 0.0,
                "graph_memory_bytes": self.capturer.memory_bytes(),
                "error": repr(self._error) if self._error else None,
            }
