"""Profiling hooks: nvtx ranges in one domain ("graphserver"), and an optional torch-profiler
Chrome trace with a capture/replay overlap summary.

With no profiler attached a Tracer.range costs about 1 us of host time (scripts/bench_nvtx.py
measured 1.06 us on a 2-core CPU machine). The replay loop runs ahead of the GPU, so the ranges
stay on in production.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Optional

import nvtx

DOMAIN = "graphserver"


def interval_overlap_ms(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total time (ms) during which some interval of `a` and some interval of `b` both run.

    Intervals are (start_s, end_s) on one clock; each list is merged first.
    """
    def merged(iv):
        out: list[list[float]] = []
        for s, e in sorted(iv):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return out

    total, ma, mb = 0.0, merged(a), merged(b)
    i = j = 0
    while i < len(ma) and j < len(mb):
        lo, hi = max(ma[i][0], mb[j][0]), min(ma[i][1], mb[j][1])
        total += max(0.0, hi - lo)
        if ma[i][1] < mb[j][1]:
            i += 1
        else:
            j += 1
    return total * 1e3


class Tracer:
    """range(name, kind) marks a region for nvtx and, when profiling, the torch profiler.

    kind tags the intervals the overlap summary is built from ("capture", "replay", ...).
    """

    def __init__(self, torch_profile: Optional[str] = None):
        self._domain = nvtx.get_domain(DOMAIN)
        self._profile_path = Path(torch_profile) if torch_profile else None
        self._intervals: dict[str, list[tuple[float, float]]] = {}
        self._replays: list[tuple[float, float, int, float]] = []   # (start, end, steps, gpu ms)
        self._lock = threading.Lock()
        self._profiler = None
        if self._profile_path is not None:
            import torch
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=acts, record_shapes=False)
            self._profiler.__enter__()

    @property
    def profiling(self) -> bool:
        return self._profiler is not None

    @contextlib.contextmanager
    def range(self, name: str, kind: Optional[str] = None):
        self._domain.push_range(message=name)
        if self._profiler is None:
            try:
                yield
            finally:
                self._domain.pop_range()
            return
        import torch
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            self._domain.pop_range()
            if kind:
                with self._lock:
                    self._intervals.setdefault(kind, []).append((t0, time.perf_counter()))

    def record(self, kind: str, start_s: float, end_s: float) -> None:
        """Add an interval measured elsewhere (e.g. GPU time of a replay run)."""
        if self._profiler is not None:
            with self._lock:
                self._intervals.setdefault(kind, []).append((start_s, end_s))

    def note_replay(self, start_s: float, end_s: float, steps: int, gpu_ms: float) -> None:
        """One replay_seq call's span and GPU time, for the with/without-capture split."""
        if self._profiler is not None and steps > 0:
            with self._lock:
                self._replays.append((start_s, end_s, steps, gpu_ms))

    def summary(self) -> dict:
        with self._lock:
            iv = {k: list(v) for k, v in self._intervals.items()}
            replays = list(self._replays)
        cap, rep = iv.get("capture", []), iv.get("replay", [])
        # Replay time per step, split by whether a capture ran during the call.
        split = {True: [0, 0.0], False: [0, 0.0]}
        for s0, s1, steps, ms in replays:
            busy = interval_overlap_ms(cap, [(s0, s1)]) > 0
            split[busy][0] += steps
            split[busy][1] += ms

        def per_step(key):
            n, ms = split[key]
            return round(ms / n, 4) if n else None
        return {
            "capture_ms": round(sum(e - s for s, e in cap) * 1e3, 3),
            "replay_ms": round(sum(e - s for s, e in rep) * 1e3, 3),
            "overlap_ms": round(interval_overlap_ms(cap, rep), 3),
            "captures": len(cap), "replay_calls": len(rep),
            "replay_ms_per_step_with_capture": per_step(True),
            "replay_ms_per_step_without_capture": per_step(False),
        }

    def close(self) -> Optional[dict]:
        """Stop profiling, write the Chrome trace and a summary beside it; returns the summary."""
        if self._profiler is None:
            return None
        prof, self._profiler = self._profiler, None
        prof.__exit__(None, None, None)
        self._profile_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self._profile_path))
        summary = self.summary()
        summary["trace"] = str(self._profile_path)
        self._profile_path.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
        return summary
