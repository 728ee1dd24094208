"""Batched decode graphs, keyed by (batch bucket, attention length class), captured in the
background while the engine serves.

The step for B running requests is padded to the smallest bucket >= B, and the longest row's
length is rounded up to a multiple of `len_quantum`: the kernels read every row's length from the
device, and the length class only bounds the attention grid, so one graph serves every batch that
maps to its key (and keys whose launches are identical share one executable, see cuda.py).

The engine never waits for a graph: a step whose key is not ready runs eagerly (counted; so does
every missing key after a capture-thread failure, which snapshot() reports), and the
capture thread, told which keys are in use, captures them and their neighbours (the next bucket up
and the next length class), so the graphs are there by the time the batch grows into them. Keys
beyond max_graphs are evicted least recently used first.

Generic over a capturer (capture(key) -> handle, release(handle), optional try_share(key) and
memory_bytes()), so the policy is tested on the CPU with a stand-in.
"""
from __future__ import annotations

import bisect
import collections
import time
from typing import Any, Callable, Optional

from .capture_thread import CaptureThread
from .seq import percentile


def default_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 128, of 32 beyond; max_num_seqs last."""
    out, b = [], 1
    while b < 8:
        out.append(b)
        b *= 2
    while b < max_num_seqs:
        out.append(b)
        b += 8 if b < 64 else 16 if b < 128 else 32
    out.append(max_num_seqs)
    return sorted({x for x in out if x <= max_num_seqs})


Key = tuple[int, int]   # (bucket, attention length class)


class BatchGraphManager(CaptureThread):
    thread_name = "batch-graph-capture"

    def __init__(self, capturer, buckets: list[int], max_len: int, len_quantum: int = 64,
                 max_graphs: int = 48, log: Callable[[str], None] = lambda msg: None):
        if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive ints, got {buckets}")
        self.capturer = capturer
        self.buckets = list(buckets)
        self.max_len = max_len
        self.len_quantum = len_quantum
        self.max_graphs = max_graphs
        self.log = log
        self._graphs: "collections.OrderedDict[Key, Any]" = collections.OrderedDict()  # LRU order
        self._recent: "collections.OrderedDict[Key, None]" = collections.OrderedDict()
        self._pinned: set[Key] = set()
        self._init_thread()
        self.captured = self.shared = self.evicted = self.replays = self.eager_steps = 0
        self.capture_ms: list[float] = []
        self.batch_hist: dict[int, int] = {}

    # ------------------------------------------------------------------ keys

    def bucket_for(self, rows: int) -> int:
        i = bisect.bisect_left(self.buckets, rows)
        if i == len(self.buckets):
            raise ValueError(f"{rows} rows exceed the largest bucket {self.buckets[-1]}")
        return self.buckets[i]

    def key_for(self, rows: int, longest: int) -> Key:
        q = self.len_quantum
        return self.bucket_for(rows), min(self.max_len, -(-longest // q) * q)

    def _neighbours(self, key: Key) -> list[Key]:
        bucket, length = key
        out = [key]
        i = self.buckets.index(bucket)
        if i + 1 < len(self.buckets):
            out.append((self.buckets[i + 1], length))
        if length + self.len_quantum <= self.max_len:
            out.append((bucket, length + self.len_quantum))
        if i > 0:
            out.append((self.buckets[i - 1], length))
        return out

    # ------------------------------------------------------------------ the request side

    def acquire(self, key: Key) -> Optional[Any]:
        """The ready graph for key (pinned until unpin), or None: run this step eagerly."""
        with self._cond:
            self.batch_hist[key[0]] = self.batch_hist.get(key[0], 0) + 1
            self._recent[key] = None
            self._recent.move_to_end(key)
            while len(self._recent) > 8:
                self._recent.popitem(last=False)
            handle = self._graphs.get(key)
            if handle is None:
                handle = self._try_share(key)
            # A failed capture thread (its error is in snapshot() and the log) leaves the graphs
            # it made; the keys it did not get to run eagerly: serving goes on either way.
            if handle is None:
                self.eager_steps += 1
                if any(k not in self._graphs for k in self._neighbours(key)):
                    self._cond.notify_all()
                return None
            self._graphs.move_to_end(key)
            self._pinned.add(key)
            self.replays += 1
            if any(k not in self._graphs for k in self._neighbours(key)):
                self._cond.notify_all()
            return handle

    def unpin(self, key: Key) -> None:
        with self._cond:
            self._pinned.discard(key)

    def _try_share(self, key: Key):
        share = getattr(self.capturer, "try_share", None)
        handle = share(key) if share is not None else None
        if handle is not None:
            self._graphs[key] = handle
            self.captured += 1
            self.shared += 1
        return handle

    # ------------------------------------------------------------------ the capture thread

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
            self._start_thread()

    def _next_job(self) -> Optional[Key]:
        """Under the lock: the first missing key near a recently used one (newest first)."""
        for key in reversed(self._recent):
            for k in self._neighbours(key):
                if k not in self._graphs and self._try_share(k) is None:
                    return k
        return None

    def _evict(self) -> None:
        while len(self._graphs) > self.max_graphs:
            victim = next((k for k in self._graphs if k not in self._pinned), None)
            if victim is None:
                return
            self.capturer.release(self._graphs.pop(victim))
            self.evicted += 1

    def _install(self, key: Key, handle: Any, ms: float) -> None:
        if key in self._graphs:
            self.capturer.release(handle)
            return
        self._graphs[key] = handle
        self.captured += 1
        if getattr(handle, "shared", False):
            self.shared += 1
        else:
            self.capture_ms.append(ms)
            del self.capture_ms[:-2048]
        self._evict()

    def wait_ready(self, keys: list[Key], timeout_s: float) -> bool:
        """Block until graphs for these keys exist (tests and benchmarks warm up with it)."""
        deadline = time.perf_counter() + timeout_s
        with self._cond:
            for k in keys:
                self._recent[k] = None
            self._cond.notify_all()
            while not all(k in self._graphs or self._try_share(k) is not None for k in keys):
                left = deadline - time.perf_counter()
                if left <= 0 or not self._running:
                    return False
                self._cond.wait(timeout=min(left, 0.05))
            return True

    def clear(self) -> None:
        with self._cond:
            for k in [k for k in self._graphs if k not in self._pinned]:
                self.capturer.release(self._graphs.pop(k))

    def snapshot(self) -> dict:
        with self._cond:
            mem = getattr(self.capturer, "memory_bytes", None)
            return {
                "running": self._running, "graphs": len(self._graphs),
                "captured": self.captured, "shared": self.shared,
                "new_captures": self.captured - self.shared, "evicted": self.evicted,
                "replays": self.replays, "eager_steps": self.eager_steps,
                "capture_ms_p50": round(percentile(self.capture_ms, 50), 3),
                "capture_ms_p99": round(percentile(self.capture_ms, 99), 3),
                "graph_bytes": mem() if mem is not None else 0,
                "buckets": self.buckets, "len_quantum": self.len_quantum,
                "batch_hist": {str(k): v for k, v in sorted(self.batch_hist.items())},
                "error": repr(self._error) if self._error else None,
            }
