"""GraphManager's keys, windows, background capture, eviction and request-side waits, with a
stand-in capturer (no GPU). Every wait in here is bounded: the stand-in's gate waits at most
GATE_S, polls give up after POLL_S, and teardown opens the gates before stopping the thread."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import numpy as np
import pytest

from graphserver.worker.graphs import GraphManager, percentile

GATE_S = 5.0       # the longest a gated capture ever blocks
POLL_S = 3.0       # the longest a test polls for the capture thread to react


class Handle:
    def __init__(self, key: int, serial: int):
        self.key, self.serial = key, serial

    def __repr__(self) -> str:
        return f"Handle(key={self.key}, #{self.serial})"


class FakeCapturer:
    """Records capture/release calls. Optional per-capture delay, a gate that holds captures until
    opened (bounded), and keys whose capture raises."""

    def __init__(self, delay: float = 0.0, gated: bool = False, fail_on=()):
        self.delay = delay
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.fail_on = set(fail_on)
        self._lock = threading.Lock()
        self._serial = 0
        self.captures: list[int] = []            # keys, in capture order
        self.capture_threads: set[int] = set()
        self.released: list[Handle] = []
        self.thread_starts: list[int] = []
        self.handles: list[Handle] = []

    def on_thread_start(self) -> None:
        with self._lock:
            self.thread_starts.append(threading.get_ident())

    def capture(self, key: int) -> Handle:
        self.gate.wait(GATE_S)
        if self.delay:
            time.sleep(self.delay)
        if key in self.fail_on:
            raise ValueError(f"boom at key {key}")
        with self._lock:
            self._serial += 1
            h = Handle(key, self._serial)
            self.captures.append(key)
            self.capture_threads.add(threading.get_ident())
            self.handles.append(h)
            return h

    def release(self, handle: Handle) -> None:
        with self._lock:
            self.released.append(handle)

    def memory_bytes(self) -> int:
        with self._lock:
            return 1000 * (len(self.handles) - len(self.released))

    # helpers for assertions
    def released_keys(self) -> list[int]:
        with self._lock:
            return sorted(h.key for h in self.released)

    def captured_keys(self) -> list[int]:
        with self._lock:
            return list(self.captures)


def wait_until(pred, timeout: float = POLL_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def resident(mgr: GraphManager) -> set[int]:
    return {k for k in range(1, mgr.max_len + 1) if mgr.has(k)}


@pytest.fixture
def make():
    made: list[tuple[GraphManager, FakeCapturer]] = []

    def _make(max_len=100, bucket=1, ahead=3, behind=2, **cap_kw):
        cap = FakeCapturer(**cap_kw)
        logs: list[str] = []
        mgr = GraphManager(cap, max_len=max_len, bucket=bucket, ahead=ahead, behind=behind,
                           log=logs.append)
        mgr.test_logs = logs
        made.append((mgr, cap))
        return mgr, cap

    yield _make
    for mgr, cap in made:
        cap.gate.set()                 # never leave a capture blocked
        cap.fail_on.clear()
        mgr.stop()


# ============================================================================ percentile

def test_percentile_hand_cases():
    assert percentile([], 50) == 0.0
    assert percentile([4.5], 0) == percentile([4.5], 50) == percentile([4.5], 100) == 4.5
    v = [30.0, 10.0, 50.0, 20.0, 40.0]
    assert percentile(v, 0) == 10.0 and percentile(v, 100) == 50.0
    assert percentile(v, 50) == 30.0
    assert percentile(v, 25) == 20.0          # rank 0.25 * 4 = 1
    assert percentile(v, 10) == 10.0          # 0.4 -> nearest 0
    assert percentile(v, 90) == 50.0          # 3.6 -> nearest 4
    assert v == [30.0, 10.0, 50.0, 20.0, 40.0]   # input not reordered
    hundred = [float(i) for i in range(1, 101)]
    assert percentile(hundred, 99) == 99.0
    assert percentile(hundred, 100) == 100.0


def test_percentile_matches_numpy_nearest():
    rng = np.random.default_rng(3)
    for n in range(1, 40):
        vals = [float(x) for x in rng.normal(size=n)]
        for q in (0, 1, 10, 25, 50, 75, 90, 99, 100):
            assert percentile(vals, q) == float(np.percentile(vals, q, method="nearest")), (n, q)


# ============================================================================ keys and windows

def test_key_for_exact_mode(make):
    mgr, _ = make(max_len=100, bucket=1)
    assert [mgr.key_for(t) for t in range(1, 101)] == list(range(1, 101))
    assert mgr.key_for(101) == 100 and mgr.key_for(500) == 100       # capped


def test_key_for_bucket_mode(make):
    mgr, _ = make(max_len=64, bucket=16)
    assert all(mgr.key_for(t) == 16 for t in range(1, 17))
    assert all(mgr.key_for(t) == 32 for t in range(17, 33))
    assert mgr.key_for(33) == 48 and mgr.key_for(64) == 64 and mgr.key_for(65) == 64
    capped, _ = make(max_len=40, bucket=16)
    assert capped.key_for(33) == 40 and capped.key_for(40) == 40     # 48 would pass max_len
    assert capped.key_for(17) == 32


def test_bucket_must_be_positive():
    with pytest.raises(ValueError):
        GraphManager(FakeCapturer(), max_len=10, bucket=0)


def test_window_keys_order(make):
    mgr, _ = make(max_len=100, ahead=3, behind=2)
    # current first, then the keys ahead (nearest first), then the keys behind (nearest first)
    assert mgr.window_keys(10) == [10, 11, 12, 13, 9, 8]
    assert mgr.window_keys(1) == [1, 2, 3, 4]                 # clipped at 1
    assert mgr.window_keys(2) == [2, 3, 4, 5, 1]
    assert mgr.window_keys(99) == [99, 100, 98, 97]           # clipped at max_len
    b, _ = make(max_len=40, bucket=4, ahead=8, behind=2)
    assert b.window_keys(10) == [12, 16, 20, 8]               # t in 8..18
    assert b.window_keys(13) == [16, 20, 24, 12]              # t in 11..21
    c, _ = make(max_len=40, bucket=16, ahead=8, behind=2)
    assert c.window_keys(10) == [16, 32]
    assert c.window_keys(17) == [32, 16]
    assert c.window_keys(38) == [40]


# ============================================================================ background capture

def test_thread_captures_window_in_order_then_evicts_as_session_advances(make):
    mgr, cap = make(max_len=100, ahead=3, behind=2)
    mgr.note_length("a", 10)
    mgr.start()
    assert mgr.wait_ready(list(range(8, 14)), timeout_s=POLL_S)
    assert cap.captured_keys() == [10, 11, 12, 13, 9, 8]      # window_keys order
    assert resident(mgr) == set(range(8, 14))
    assert len(cap.thread_starts) == 1
    assert cap.thread_starts[0] != threading.get_ident()      # on the capture thread...
    assert cap.capture_threads == {cap.thread_starts[0]}      # ...which does every capture
    assert cap.released == []

    mgr.note_length("a", 12)                                  # window 10..15
    assert mgr.wait_ready(list(range(10, 16)), timeout_s=POLL_S)
    assert wait_until(lambda: cap.released_keys() == [8, 9])
    time.sleep(0.15)                                          # nothing else happens meanwhile
    assert cap.released_keys() == [8, 9]
    assert resident(mgr) == set(range(10, 16))

    for length in range(13, 31):
        mgr.note_length("a", length)
        assert mgr.wait_ready(list(range(length - 2, length + 4)), timeout_s=POLL_S)
        assert wait_until(lambda: cap.released_keys() == list(range(8, length - 2)))
    assert resident(mgr) == set(range(28, 34))
    assert sorted(cap.captured_keys()) == list(range(8, 34))  # each key captured once
    released = cap.released
    assert len({id(h) for h in released}) == len(released)    # no handle released twice
    assert all(h.key < 28 for h in released)                  # never a key still in the window
    snap = mgr.snapshot()
    assert snap["captured"] == 26 and snap["evicted"] == 20 and snap["resident"] == 6


def test_bucket_mode_background_window(make):
    mgr, cap = make(max_len=40, bucket=4, ahead=8, behind=2)
    mgr.start()
    mgr.note_length("a", 10)
    assert mgr.wait_ready([8, 10, 18], timeout_s=POLL_S)
    assert wait_until(lambda: len(cap.captured_keys()) == 4)
    assert cap.captured_keys() == [12, 16, 20, 8]
    mgr.note_length("a", 13)
    assert wait_until(lambda: resident(mgr) == {12, 16, 20, 24} and cap.released_keys() == [8])
    assert mgr.snapshot()["mode"] == "bucket4"


def test_two_sessions_keep_both_windows(make):
    mgr, cap = make(max_len=100, ahead=3, behind=2)
    mgr.start()
    mgr.note_length("a", 10)
    mgr.note_length("b", 50)
    both = set(range(8, 14)) | set(range(48, 54))
    assert mgr.wait_ready(sorted(both), timeout_s=POLL_S)
    assert resident(mgr) == both
    mgr.note_length("a", 11)
    assert wait_until(lambda: cap.released_keys() == [8] and mgr.has(14))
    time.sleep(0.15)
    assert cap.released_keys() == [8]
    assert resident(mgr) == set(range(9, 15)) | set(range(48, 54))
    # Overlapping windows share graphs: b moving next to a captures only what is new.
    n = len(cap.captured_keys())
    mgr.note_length("b", 13)
    assert wait_until(lambda: resident(mgr) == set(range(9, 17)))
    assert sorted(cap.captured_keys()[n:]) == [15, 16]
    assert cap.released_keys() == [8] + list(range(48, 54))


def test_forget_lets_a_window_be_evicted(make):
    mgr, cap = make(max_len=100, ahead=3, behind=2)
    mgr.start()
    mgr.note_length("a", 10)
    mgr.note_length("b", 50)
    assert mgr.wait_ready(list(range(8, 14)) + list(range(48, 54)), timeout_s=POLL_S)
    captured = len(cap.captured_keys())
    mgr.forget("b")
    assert wait_until(lambda: cap.released_keys() == list(range(48, 54)))
    assert resident(mgr) == set(range(8, 14))
    assert len(cap.captured_keys()) == captured
    mgr.forget("never-seen")                                  # harmless
    assert mgr.snapshot()["evicted"] == 6


def test_acquired_key_is_pinned_until_unpinned(make):
    mgr, cap = make(max_len=100, ahead=3, behind=2)
    mgr.start()
    mgr.note_length("a", 10)
    assert mgr.wait_ready([10], timeout_s=POLL_S)
    h = mgr.acquire(10, wait_s=0.0)
    assert h is not None and h.key == 10
    mgr.note_length("a", 20)
    assert mgr.wait_ready(list(range(18, 24)), timeout_s=POLL_S)
    assert wait_until(lambda: cap.released_keys() == [8, 9, 11, 12, 13])
    time.sleep(0.15)
    assert mgr.has(10) and cap.released_keys() == [8, 9, 11, 12, 13]   # in use: kept
    mgr.unpin(10)
    assert wait_until(lambda: 10 in cap.released_keys())
    assert not mgr.has(10)


# ============================================================================ the request side

def test_acquire_present_key_counts_a_replay(make):
    mgr, cap = make()
    mgr.start()
    mgr.note_length("a", 5)
    assert mgr.wait_ready([5], timeout_s=POLL_S)
    h = mgr.acquire(5, wait_s=1.0)
    assert h is not None and h.key == 5 and h in cap.handles
    assert mgr.acquire(5, wait_s=1.0) is h                    # the same graph each time
    s = mgr.snapshot()
    assert s["replays"] == 2 and s["stalls"] == 0 and s["stall_ms"] == 0.0


def test_acquire_missing_key_waits_for_the_capture(make):
    mgr, cap = make(gated=True)
    mgr.start()
    mgr.note_length("a", 10)                  # the thread now blocks capturing key 10
    opener = threading.Timer(0.15, cap.gate.set)
    opener.start()
    try:
        t0 = time.monotonic()
        h = mgr.acquire(10, wait_s=POLL_S)
        waited = time.monotonic() - t0
    finally:
        opener.cancel()
        opener.join(1.0)
    assert h is not None and h.key == 10
    assert 0.1 <= waited < POLL_S
    s = mgr.snapshot()
    assert s["stalls"] == 1 and s["replays"] == 1
    assert s["stall_ms"] >= 100.0


def test_acquire_stall_times_out_with_none(make):
    mgr, cap = make(gated=True)
    mgr.start()
    mgr.note_length("a", 10)
    t0 = time.monotonic()
    assert mgr.acquire(10, wait_s=0.15) is None
    waited = time.monotonic() - t0
    assert 0.12 <= waited < 2.0
    s = mgr.snapshot()
    assert s["stalls"] == 1 and s["replays"] == 0 and s["stall_ms"] >= 120.0
    assert s["stall_keys"] == [10]                # where it stalled, for the GPU runs' reports


def test_acquire_with_zero_wait_or_not_running_returns_none(make):
    mgr, cap = make(gated=True)
    mgr.start()
    mgr.note_length("a", 10)
    t0 = time.monotonic()
    assert mgr.acquire(10, wait_s=0.0) is None
    assert time.monotonic() - t0 < 1.0                        # waiting would take GATE_S
    assert mgr.snapshot()["stalls"] == 0

    idle, idle_cap = make()                  # never started
    idle.note_length("a", 10)
    t0 = time.monotonic()
    assert idle.acquire(10, wait_s=POLL_S) is None
    assert time.monotonic() - t0 < 1.0
    assert idle.snapshot()["stalls"] == 0 and idle_cap.captures == []


def test_capturer_error_surfaces_from_acquire(make):
    mgr, cap = make(fail_on={10})
    mgr.start()
    mgr.note_length("a", 10)
    with pytest.raises(RuntimeError, match="boom at key 10"):
        mgr.acquire(10, wait_s=POLL_S)
    assert wait_until(lambda: not mgr.running)
    with pytest.raises(RuntimeError, match="boom at key 10"):  # not lost after the first report
        mgr.acquire(11, wait_s=0.0)
    t0 = time.monotonic()
    assert mgr.wait_ready([10], timeout_s=POLL_S) is False
    assert time.monotonic() - t0 < 1.0                          # does not sit out the timeout
    snap = mgr.snapshot()
    assert "boom at key 10" in snap["error"] and snap["running"] is False
    assert any("boom at key 10" in m for m in mgr.test_logs)

    # start() clears the error and a healthy capturer carries on.
    cap.fail_on.clear()
    mgr.start()
    assert mgr.wait_ready([10, 11], timeout_s=POLL_S)
    assert mgr.acquire(10, wait_s=0.0).key == 10
    assert mgr.snapshot()["error"] is None
    assert len(cap.thread_starts) == 2


def test_capturer_error_while_acquire_is_waiting(make):
    mgr, cap = make(gated=True, fail_on={10})
    mgr.start()
    mgr.note_length("a", 10)
    opener = threading.Timer(0.1, cap.gate.set)
    opener.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="boom at key 10"):
            mgr.acquire(10, wait_s=POLL_S)
        assert time.monotonic() - t0 < POLL_S - 0.5              # woken by the failure
    finally:
        opener.cancel()
        opener.join(1.0)


def test_wait_ready_true_and_false(make):
    mgr, cap = make(gated=True, ahead=3, behind=2)
    mgr.start()
    mgr.note_length("a", 10)
    t0 = time.monotonic()
    assert mgr.wait_ready([10], timeout_s=0.2) is False
    assert 0.15 <= time.monotonic() - t0 < 2.0
    cap.gate.set()
    assert mgr.wait_ready([10, 11, 12, 13], timeout_s=POLL_S) is True
    assert mgr.wait_ready([], timeout_s=0.0) is True
    assert mgr.wait_ready([40], timeout_s=0.1) is False          # outside every window

    idle, _ = make()
    t0 = time.monotonic()
    assert idle.wait_ready([3], timeout_s=POLL_S) is False       # not running: no waiting
    assert time.monotonic() - t0 < 1.0


def test_stop_joins_the_thread_and_start_is_idempotent(make):
    mgr, cap = make(ahead=3, behind=2, delay=0.02)
    mgr.start()
    mgr.start()                                                  # no second thread
    thread = mgr._thread
    assert thread is not None and thread.is_alive() and mgr.running
    mgr.note_length("a", 10)
    assert mgr.wait_ready([10, 13], timeout_s=POLL_S)
    assert len(cap.thread_starts) == 1

    mgr.start(ahead=5)                                           # retune while running
    assert mgr.wait_ready([14, 15], timeout_s=POLL_S)
    assert mgr.snapshot()["window"] == {"ahead": 5, "behind": 2}
    assert len(cap.thread_starts) == 1

    mgr.note_length("a", 30)                                     # work in flight during stop
    t0 = time.monotonic()
    mgr.stop()
    assert time.monotonic() - t0 < 2.0
    assert not thread.is_alive() and mgr._thread is None and not mgr.running
    n = len(cap.captured_keys())
    time.sleep(0.15)
    assert len(cap.captured_keys()) == n                         # nothing after stop
    mgr.stop()                                                   # stopping twice is fine
    assert mgr.snapshot()["running"] is False


def test_snapshot_fields(make):
    mgr, cap = make(max_len=100, ahead=3, behind=2, delay=0.02)
    s = mgr.snapshot()
    assert s["mode"] == "exact" and s["bucket"] == 1 and s["captured"] == 0
    assert s["capture_ms_p50"] == 0.0 and s["capture_rate_per_s"] == 0.0 and s["error"] is None
    mgr.start()
    mgr.note_length("a", 10)
    assert mgr.wait_ready(list(range(8, 14)), timeout_s=POLL_S)
    mgr.note_length("a", 11)
    assert wait_until(lambda: mgr.snapshot()["evicted"] == 1 and mgr.has(14))
    mgr.acquire(11, wait_s=0.0)
    s = mgr.snapshot()
    assert s["captured"] == 7 and s["evicted"] == 1 and s["resident"] == 6
    assert s["replays"] == 1 and s["stalls"] == 0 and s["fallbacks"] == 0
    assert 15.0 <= s["capture_ms_p50"] < 1000.0                  # the stand-in sleeps 20 ms
    assert s["capture_ms_p99"] >= s["capture_ms_p50"]
    assert s["capture_rate_per_s"] > 0
    assert isinstance(s["graph_memory_bytes"], int)
    assert s["graph_memory_bytes"] == cap.memory_bytes() == 6000
    assert s["window"] == {"ahead": 3, "behind": 2} and s["running"] is True
    b, _ = make(max_len=64, bucket=16)
    assert b.snapshot()["mode"] == "bucket16" and b.snapshot()["bucket"] == 16


def test_capture_now_and_clear(make):
    mgr, cap = make()
    mgr.capture_now(7)
    mgr.capture_now(7)                                           # already there: no recapture
    assert cap.captured_keys() == [7]
    assert cap.capture_threads == {threading.get_ident()}        # on the calling thread
    assert mgr.has(7) and mgr.snapshot()["captured"] == 1
    h = mgr.acquire(7, wait_s=0.0)                               # usable without the thread
    assert h is not None and h.key == 7
    mgr.capture_now(9)
    mgr.clear()
    assert not mgr.has(7) and not mgr.has(9)
    assert cap.released_keys() == [7, 9]


# ============================================================================ stalls (issue 13)

class SharingCapturer(FakeCapturer):
    """FakeCapturer with cuda.py's sharing: keys of one signature ((key - 1) // width, as the
    attention split count changes every 32 tokens) share one refcounted executable; executables
    no key uses stay idle, the keep_idle most recent, and older ones are destroyed."""

    def __init__(self, width: int, keep_idle: int, **kw):
        super().__init__(**kw)
        self.width, self.keep_idle = width, keep_idle
        self.by_sig: dict[int, list] = {}        # signature -> [executable serial, refcount]
        self.idle: list[int] = []
        self.new_captures: list[int] = []        # keys that needed a real capture
        self.destroyed: list[int] = []           # signatures whose executable was destroyed

    def sig(self, key: int) -> int:
        return (key - 1) // self.width

    def try_share(self, key: int):
        with self._lock:
            entry = self.by_sig.get(self.sig(key))
            if entry is None:
                return None
            entry[1] += 1
            if self.sig(key) in self.idle:
                self.idle.remove(self.sig(key))
            h = Handle(key, entry[0])
            h.shared = True
            return h

    def capture(self, key: int) -> Handle:
        shared = self.try_share(key)
        if shared is not None:
            return shared
        h = super().capture(key)
        with self._lock:
            self.by_sig[self.sig(key)] = [h.serial, 1]
            self.new_captures.append(key)
        h.shared = False
        return h

    def release(self, handle: Handle) -> None:
        super().release(handle)
        with self._lock:
            entry = self.by_sig[self.sig(handle.key)]
            entry[1] -= 1
            if entry[1] == 0:
                self.idle.append(self.sig(handle.key))
                if len(self.idle) > self.keep_idle:
                    oldest = self.idle.pop(0)
                    del self.by_sig[oldest]
                    self.destroyed.append(oldest)


def test_a_session_restarted_short_reuses_the_idle_executables(make):
    """The precaptured-rerun stalls: one session ran far (its early executables went idle), a new
    one starts short. Releasing the old window's graphs before the new window shared its keys
    pushed the very executables it needed out of the idle list, so they were captured again
    (on the GPU: stalls in bench_decode's 'short' run, which counted as precaptured)."""
    mgr, _ = make(max_len=200, ahead=24, behind=2)
    cap = SharingCapturer(width=8, keep_idle=7)
    mgr.capturer = cap
    mgr.note_length("a", 10)
    mgr.start()
    for length in range(10, 61):
        mgr.note_length("a", length)
        assert mgr.wait_ready(list(range(length - 2, length + 25)), timeout_s=POLL_S)
    assert wait_until(lambda: resident(mgr) == set(range(58, 85)))
    assert sorted(cap.idle) == list(range(7)) and cap.destroyed == []
    n_new = len(cap.new_captures)
    mgr.forget("a")
    mgr.note_length("b", 10)                       # window 8..34: signatures 0..4, all idle
    assert mgr.wait_ready(list(range(8, 35)), timeout_s=POLL_S)
    assert wait_until(lambda: resident(mgr) == set(range(8, 35)))
    assert cap.new_captures[n_new:] == []          # every key shared: nothing to capture
    assert not set(cap.destroyed) & {0, 1, 2, 3, 4}
    s = mgr.snapshot()
    assert s["new_captures"] == n_new and s["stalls"] == 0


def test_sessions_windows_are_merged_nearest_key_first(make):
    """A session announced next to a shorter one gets its first keys before the other's far
    edge (sorted by length, it waited behind the whole window of every shorter session)."""
    mgr, cap = make(max_len=100, ahead=3, behind=1, gated=True)
    mgr.note_length("a", 10)
    mgr.note_length("b", 50)
    mgr.start()
    cap.gate.set()
    assert mgr.wait_ready([9, 10, 11, 12, 13, 49, 50, 51, 52, 53], timeout_s=POLL_S)
    assert cap.captured_keys() == [10, 50, 11, 51, 12, 52, 13, 53, 9, 49]


def test_prepare_reaches_past_ahead_and_its_wait_is_not_a_stall(make):
    mgr, cap = make(max_len=100, ahead=3, behind=2, delay=0.03)
    mgr.start()
    lengths = mgr.prepare("a", 10, lead=8)
    assert lengths == list(range(10, 19))
    assert mgr.window_keys(10, reach=18) == list(range(10, 19)) + [9, 8]
    t0 = time.monotonic()
    assert mgr.wait_first(lengths, timeout_s=POLL_S) is True
    assert time.monotonic() - t0 >= 0.25             # 9 captures of 30 ms: it did wait
    assert cap.captured_keys()[:9] == list(range(10, 19))   # the first lengths, nearest first
    for length in range(10, 18):                     # the session runs: nothing missing, and
        assert mgr.acquire(mgr.key_for(length), wait_s=POLL_S) is not None
        mgr.unpin(length)
        mgr.note_length("a", length + 1)             # its reach keeps them (ahead is only 3)
    assert 18 not in cap.released_keys()
    s = mgr.snapshot()
    assert s["stalls"] == 0 and s["replays"] == 8 and s["stall_keys"] == []
    assert s["first_waits"] == 1 and s["first_wait_ms"] >= 250.0
    assert mgr.wait_first(lengths[-2:], timeout_s=POLL_S) is True     # ready: not counted
    assert mgr.snapshot()["first_waits"] == 1
    mgr.note_length("a", 30)                         # past its reach: the plain window again
    assert wait_until(lambda: resident(mgr) == set(range(28, 34)))
    mgr.forget("a")

    b, bcap = make(max_len=64, bucket=16, ahead=2, behind=1)
    assert b.prepare("s", 20, lead=40) == list(range(20, 61))
    assert b.wait_first(list(range(20, 61)), timeout_s=0.5) is False  # not running: no wait
    assert b.snapshot()["first_waits"] == 0
    b.start()
    assert b.wait_first(list(range(20, 61)), timeout_s=POLL_S) is True
    assert bcap.captured_keys() == [32, 48, 64]              # behind: 19 -> 32 too


# ------------------------------------------------------------ the session RPCs on the CPU engine

class EagerGraph:
    """Stands in for a CUDA graph of decode_step(attn_max_len=key): replay runs the step."""

    def __init__(self, runner, key: int):
        self.runner, self.key, self.shared = runner, key, False

    def replay(self) -> None:
        self.runner.decode_step(attn_max_len=self.key)


class EagerCapturer:
    """A capturer whose 'graphs' run the real step eagerly (so tokens are real), with a capture
    time per key, on the CPU engine."""

    def __init__(self, runner, delay: float):
        self.runner, self.delay = runner, delay
        self.captures: list[int] = []

    def capture(self, key: int) -> EagerGraph:
        time.sleep(self.delay)
        self.captures.append(key)
        return EagerGraph(self.runner, key)

    def release(self, handle) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0


@pytest.fixture(scope="module")
def cpu_engine():
    from graphserver.engine import Engine
    eng = Engine(model="random:tiny", device="cpu", max_len=128, kv_blocks=16, block_size=16,
                 log=lambda m: None)
    yield eng
    eng.close()


@contextlib.contextmanager
def _with_graphs(eng, delay: float) -> Iterator[GraphManager]:
    """The engine's sessions with a graph manager over EagerCapturer; stopped and detached after."""
    old = eng.sessions_api.graphs
    if old is not None:
        old.stop()
    mgr = GraphManager(EagerCapturer(eng.runner, delay), eng.core.max_len)
    eng.sessions_api.graphs = mgr
    try:
        yield mgr
    finally:
        mgr.stop()
        eng.sessions_api.graphs = None


PROMPT = [5, 17, 3, 29, 11, 7, 23, 2, 19, 13, 31]      # 11 tokens: odd, not a block multiple


def _reference_tokens(eng, steps: int) -> list[int]:
    old, eng.sessions_api.graphs = eng.sessions_api.graphs, None
    try:
        eng.kv_init("ref", PROMPT)
        toks = eng.replay_seq("ref", steps, sampling={"greedy": True})["tokens"]
        eng.kv_free("ref")
    finally:
        eng.sessions_api.graphs = old
    return toks


@pytest.mark.parametrize("order", ["capture, then kv_init", "kv_init, then capture"])
def test_a_run_started_right_after_kv_init_does_not_stall(cpu_engine, order):
    eng = cpu_engine
    steps = eng.sessions_api.first_lead            # every step within the first lengths
    want = _reference_tokens(eng, steps)
    with _with_graphs(eng, delay=0.02) as mgr:
        if order == "capture, then kv_init":
            eng.bg_capture_start(ahead=4, behind=2)
            eng.kv_init("r", PROMPT)                # waits for them with the prefill enqueued
        else:
            eng.kv_init("r", PROMPT)                # capture off: nothing waited
            assert mgr.snapshot()["first_waits"] == 0
            eng.bg_capture_start(ahead=4, behind=2)  # captures the live session's first graphs
        snap = mgr.snapshot()
        assert snap["first_waits"] == 1 and snap["first_wait_ms"] > 0
        n = len(PROMPT)
        assert all(mgr.has(t) for t in range(n + 1, n + 1 + steps))
        res = eng.replay_seq("r", steps, sampling={"greedy": True})
        eng.kv_free("r")
        assert res["tokens"] == want
        assert res["stalls"] == 0 and res["fallbacks"] == 0 and res["eager_steps"] == 0
        snap = mgr.snapshot()
        assert snap["stalls"] == 0 and snap["replays"] == steps - 1


def test_kv_init_does_not_wait_while_capture_is_off(cpu_engine):
    eng = cpu_engine
    with _with_graphs(eng, delay=0.5) as mgr:
        t0 = time.monotonic()
        eng.kv_init("off", PROMPT)
        assert time.monotonic() - t0 < 0.5                # no capture happened, none waited
        res = eng.replay_seq("off", 4, sampling={"greedy": True})
        eng.kv_free("off")
        assert res["stalls"] == 0 and res["fallbacks"] == 3 and mgr.snapshot()["first_waits"] == 0
        assert mgr.capturer.captures == []


def test_wait_precapture_past_the_window_captures_instead_of_timing_out(cpu_engine):
    eng = cpu_engine
    with _with_graphs(eng, delay=0.0) as mgr:
        eng.kv_init("pre", PROMPT)
        eng.bg_capture_start(ahead=4, behind=2)
        t0 = time.monotonic()
        out = eng.wait_precapture(min_ahead=60, timeout_s=20.0)
        assert out["ready"] is True and time.monotonic() - t0 < 10.0
        n = len(PROMPT)
        assert all(mgr.has(t) for t in range(n + 1, n + 62))
        res = eng.replay_seq("pre", 61, sampling={"greedy": True})
        eng.kv_free("pre")
        assert res["stalls"] == 0 and res["fallbacks"] == 0
