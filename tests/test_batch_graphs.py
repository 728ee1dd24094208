"""BatchGraphManager (worker/graphs/batch.py) with a stand-in capturer, on the CPU: keys, eager
steps, the capture thread (keys in use and their neighbours), LRU eviction around pinned keys,
sharing, errors and the snapshot.

Every wait is bounded: a gated capture blocks at most GATE_S, polls give up after POLL_S, and the
fixture opens every gate before it stops the threads.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import pytest

from graphserver.worker.graphs import BatchGraphManager, default_buckets

GATE_S = 5.0
POLL_S = 3.0


class Handle:
    def __init__(self, key, serial: int, shared: bool = False):
        self.key, self.serial, self.shared = key, serial, shared
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1

    def __repr__(self) -> str:
        return f"Handle({self.key}, #{self.serial}{', shared' if self.shared else ''})"


class StandInCapturer:
    """capture(key) -> Handle. Optional: a delay, keys whose capture raises, permits (each capture
    waits for one, so a test decides how many happen), and sharing by a signature function."""

    def __init__(self, delay: float = 0.0, fail_on=(), gated: bool = False, signature=None):
        self.delay = delay
        self.fail_on = set(fail_on)
        self.gated = gated
        self.permits = threading.Semaphore(0)
        self.opened = threading.Event()
        self.signature = signature
        self.lock = threading.Lock()
        self.serial = 0
        self.captures: list = []              # keys, in capture order
        self.capture_threads: set[int] = set()
        self.thread_starts: list[int] = []
        self.released: list[Handle] = []
        self.live: list[Handle] = []

    # -- what the manager calls
    def on_thread_start(self) -> None:
        self.thread_starts.append(threading.get_ident())

    def capture(self, key) -> Handle:
        if self.gated:
            t_end = time.monotonic() + GATE_S
            while not self.opened.is_set() and not self.permits.acquire(timeout=0.01):
                if time.monotonic() > t_end:
                    break
        if self.delay:
            time.sleep(self.delay)
        if key in self.fail_on:
            raise ValueError(f"boom at {key}")
        with self.lock:
            self.serial += 1
            h = Handle(key, self.serial)
            self.captures.append(key)
            self.capture_threads.add(threading.get_ident())
            self.live.append(h)
            return h

    def release(self, handle: Handle) -> None:
        with self.lock:
            self.released.append(handle)
            self.live.remove(handle)

    def memory_bytes(self) -> int:
        with self.lock:
            return 4096 * sum(not h.shared for h in self.live)

    # -- test controls
    def allow(self, n: int) -> None:
        for _ in range(n):
            self.permits.release()

    def n_captures(self) -> int:
        with self.lock:
            return len(self.captures)


class SharingCapturer(StandInCapturer):
    """Keys with equal signature(key) share one executable (as cuda.py's capturer does)."""

    def try_share(self, key) -> Optional[Handle]:
        sig = self.signature(key)
        with self.lock:
            base = next((h for h in self.live if self.signature(h.key) == sig and not h.shared),
                        None)
            if base is None:
                return None
            self.serial += 1
            h = Handle(key, self.serial, shared=True)
            self.live.append(h)
            return h


def wait_until(pred, timeout: float = POLL_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


@pytest.fixture
def make():
    made: list[tuple[BatchGraphManager, StandInCapturer]] = []

    def _make(buckets=(1, 2, 4, 8), max_len=256, len_quantum=64, max_graphs=48, start=True,
              capturer=None, **cap_kw):
        cap = capturer or StandInCapturer(**cap_kw)
        logs: list[str] = []
        mgr = BatchGraphManager(cap, list(buckets), max_len, len_quantum=len_quantum,
                                max_graphs=max_graphs, log=logs.append)
        mgr.test_logs = logs
        made.append((mgr, cap))
        if start:
            mgr.start()
        return mgr, cap

    yield _make
    for mgr, cap in made:
        cap.opened.set()
        cap.fail_on.clear()
        mgr.stop()
        assert not mgr.running


def resident(mgr: BatchGraphManager) -> set:
    return {(b, L) for b in mgr.buckets for L in range(mgr.len_quantum, mgr.max_len + 1,
                                                        mgr.len_quantum)
            if mgr._graphs.get((b, L)) is not None}


# ============================================================================ keys

@pytest.mark.parametrize("max_num_seqs,expected", [
    (1, [1]),
    (3, [1, 2, 3]),
    (8, [1, 2, 4, 8]),
    (20, [1, 2, 4, 8, 16, 20]),
    (64, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]),
    (100, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]),
    (200, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 200]),
])
def test_default_buckets(max_num_seqs, expected):
    got = default_buckets(max_num_seqs)
    assert got == expected
    assert got[-1] == max_num_seqs and got == sorted(set(got))


def test_bucket_for_and_key_for(make):
    mgr, cap = make(buckets=(1, 2, 4, 8), max_len=200, len_quantum=64, start=False)
    assert [mgr.bucket_for(n) for n in (1, 2, 3, 4, 5, 7, 8)] == [1, 2, 4, 4, 8, 8, 8]
    with pytest.raises(ValueError, match="9 rows exceed the largest bucket 8"):
        mgr.bucket_for(9)
    assert mgr.key_for(3, 1) == (4, 64)
    assert mgr.key_for(5, 64) == (8, 64)
    assert mgr.key_for(1, 65) == (1, 128)
    assert mgr.key_for(2, 199) == (2, 200)          # the last class is max_len itself
    assert mgr.key_for(8, 200) == (8, 200)


@pytest.mark.parametrize("buckets", [[], [2, 1], [0, 1], [1, 1, 2]])
def test_bad_buckets_are_refused(buckets):
    with pytest.raises(ValueError, match="buckets"):
        BatchGraphManager(StandInCapturer(), buckets, 128)


# ============================================================================ the request side

def test_a_key_that_is_not_ready_runs_eagerly_and_is_counted(make):
    mgr, cap = make(start=False)
    assert mgr.acquire((4, 64)) is None
    assert mgr.acquire((4, 128)) is None
    assert mgr.acquire((1, 64)) is None
    snap = mgr.snapshot()
    assert snap["eager_steps"] == 3 and snap["replays"] == 0 and snap["graphs"] == 0
    assert snap["batch_hist"] == {"1": 1, "4": 2}
    assert cap.n_captures() == 0                    # no thread: nothing captured


def test_the_thread_captures_the_key_in_use_and_its_neighbours(make):
    mgr, cap = make(buckets=(1, 2, 4, 8), max_len=256)
    key = (2, 128)
    assert mgr.acquire(key) is None                  # eager: not captured yet
    wanted = {(2, 128), (4, 128), (2, 192), (1, 128)}   # itself, next bucket, next length, previous
    assert wait_until(lambda: set(cap.captures) >= wanted)
    time.sleep(0.25)                                 # and nothing beyond them
    assert set(cap.captures) == wanted and len(cap.captures) == 4
    assert cap.captures[0] == key                    # the key in use first
    assert threading.get_ident() not in cap.capture_threads
    assert len(cap.thread_starts) == 1
    h = mgr.acquire(key)
    assert h is not None and h.key == key
    h.replay()
    assert mgr.snapshot()["replays"] == 1 and mgr.snapshot()["eager_steps"] == 1
    mgr.unpin(key)


def test_pinned_key_is_never_evicted_and_the_lru_one_is(make):
    # Two keys whose neighbourhoods cover each other, room for one graph: every capture evicts.
    mgr, cap = make(buckets=(1, 2), max_len=64, max_graphs=1, gated=True)
    k1, k2 = (1, 64), (2, 64)
    assert mgr.acquire(k1) is None
    cap.allow(1)
    assert wait_until(lambda: cap.n_captures() == 1) and cap.captures == [k1]
    h1 = mgr.acquire(k1)                             # pinned while "replaying"
    assert h1 is not None and h1.key == k1
    cap.allow(1)                                     # k2 (a neighbour): over max_graphs
    assert wait_until(lambda: cap.n_captures() == 2)
    assert wait_until(lambda: len(cap.released) == 1)
    assert cap.released[0].key == k2, "evicted the pinned key (or nothing)"
    assert h1 not in cap.released and mgr.snapshot()["graphs"] == 1
    for _ in range(3):                               # k2 keeps coming back; k1 stays
        n = cap.n_captures()
        cap.allow(1)
        assert wait_until(lambda: cap.n_captures() == n + 1)
        assert wait_until(lambda: len(cap.released) == n)
        assert h1 not in cap.released
    mgr.unpin(k1)
    n = len(cap.released)
    cap.allow(1)
    assert wait_until(lambda: len(cap.released) == n + 1)
    assert cap.released[-1] is h1                    # unpinned, least recently used: goes now
    assert mgr.snapshot()["evicted"] == len(cap.released)
    assert mgr.snapshot()["graphs"] == 1


def test_eviction_takes_the_least_recently_used(make):
    mgr, cap = make(buckets=(1, 2, 4), max_len=64, max_graphs=2, gated=True)
    k1, k2, k4 = (1, 64), (2, 64), (4, 64)
    assert mgr.acquire(k4) is None
    cap.allow(2)
    assert wait_until(lambda: cap.n_captures() == 2) and cap.captures == [k4, k2]
    h4 = mgr.acquire(k4)                             # k4 used after k2 was captured
    mgr.unpin(k4)
    assert mgr.acquire(k1) is None                   # a new key: captured, k2 is the LRU one
    cap.allow(1)
    assert wait_until(lambda: cap.n_captures() == 3) and cap.captures[-1] == k1
    assert wait_until(lambda: len(cap.released) == 1)
    assert cap.released[0].key == k2
    assert resident(mgr) == {k4, k1} and h4 not in cap.released


def test_sharing_through_try_share(make):
    # Launch signature = the bucket: every length class of a bucket shares one executable.
    cap = SharingCapturer(signature=lambda key: key[0])
    mgr, _ = make(buckets=(1, 2), max_len=128, capturer=cap)
    assert mgr.acquire((1, 64)) is None
    # neighbours: (2, 64) and (1, 128); the latter is shared, not captured
    assert wait_until(lambda: mgr.snapshot()["captured"] == 3)
    time.sleep(0.1)
    assert sorted(cap.captures) == [(1, 64), (2, 64)]
    snap = mgr.snapshot()
    assert snap["shared"] == 1 and snap["new_captures"] == 2 and snap["graphs"] == 3
    eager = snap["eager_steps"]
    h = mgr.acquire((2, 128))                        # not captured, but shareable: no eager step
    assert h is not None and h.shared and h.key == (2, 128)
    mgr.unpin((2, 128))
    snap = mgr.snapshot()
    assert snap["eager_steps"] == eager and snap["shared"] == 2 and snap["replays"] == 1
    assert sorted(cap.captures) == [(1, 64), (2, 64)]
    assert snap["graph_bytes"] == 2 * 4096


def test_a_shared_handle_from_capture_is_counted_as_shared(make):
    class MarksShared(StandInCapturer):
        def capture(self, key):
            h = super().capture(key)
            h.shared = key[1] > 64
            return h

    mgr, cap = make(buckets=(1,), max_len=192, capturer=MarksShared(delay=0.01))
    assert mgr.acquire((1, 128)) is None
    assert wait_until(lambda: mgr.snapshot()["captured"] == 2)   # (1, 128) and (1, 192)
    snap = mgr.snapshot()
    assert snap["shared"] == 2 and snap["new_captures"] == 0
    assert snap["capture_ms_p50"] == 0.0             # shared ones are not capture times


def test_capture_thread_errors_are_reported_and_serving_goes_on_eagerly(make):
    mgr, cap = make(buckets=(1, 2), max_len=64, fail_on={(2, 64)})
    assert mgr.acquire((1, 64)) is None
    assert wait_until(lambda: mgr.snapshot()["error"] is not None)
    assert "boom at (2, 64)" in mgr.snapshot()["error"]
    assert not mgr.running
    # A failed thread must not take serving down: missing keys run eagerly (counted), the graphs
    # it made before failing still replay, and the error stays visible.
    eager = mgr.snapshot()["eager_steps"]
    assert mgr.acquire((2, 64)) is None
    assert mgr.snapshot()["eager_steps"] == eager + 1
    got = mgr.acquire((1, 64))
    if got is not None:
        mgr.unpin((1, 64))
    assert "boom at (2, 64)" in mgr.snapshot()["error"]
    assert any("boom at (2, 64)" in m for m in mgr.test_logs)


def test_snapshot_fields(make):
    mgr, cap = make(buckets=(1, 2, 4), max_len=128, delay=0.03)
    for _ in range(3):
        if mgr.acquire((2, 64)) is not None:
            mgr.unpin((2, 64))
    assert wait_until(lambda: mgr.snapshot()["graphs"] == 4, timeout=POLL_S)
    h = mgr.acquire((2, 64))
    assert h is not None
    mgr.unpin((2, 64))
    snap = mgr.snapshot()
    assert snap["graphs"] == 4 and snap["captured"] == 4 and snap["evicted"] == 0
    assert 30.0 <= snap["capture_ms_p50"] <= snap["capture_ms_p99"] < 1000.0
    assert snap["replays"] + snap["eager_steps"] == 4 and snap["replays"] >= 1
    assert snap["batch_hist"] == {"2": 4}
    assert snap["graph_bytes"] == cap.memory_bytes() == 4 * 4096
    assert snap["buckets"] == [1, 2, 4] and snap["len_quantum"] == 64
    assert snap["running"] is True and snap["error"] is None
    mgr.stop()
    assert mgr.snapshot()["running"] is False


def test_wait_ready_and_clear(make):
    mgr, cap = make(buckets=(1, 2), max_len=128, gated=True)
    assert mgr.wait_ready([(1, 64)], timeout_s=0.1) is False     # gated: not captured in time
    cap.opened.set()
    assert mgr.wait_ready([(1, 64), (2, 128)], timeout_s=POLL_S) is True
    h = mgr.acquire((1, 64))
    assert h is not None
    mgr.stop()
    n = mgr.snapshot()["graphs"]
    mgr.clear()                                      # keeps the pinned one
    assert mgr.snapshot()["graphs"] == 1 and h not in cap.released
    assert len(cap.released) == n - 1
    mgr.unpin((1, 64))
    mgr.clear()
    assert mgr.snapshot()["graphs"] == 0 and h in cap.released
    assert mgr.wait_ready([(1, 64)], timeout_s=0.05) is False    # stopped: gives up at once
