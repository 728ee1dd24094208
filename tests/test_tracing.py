"""Profiling hooks on the CPU backend: nvtx ranges are emitted, the torch-profiler trace works."""
import json

from graphserver.engine import Engine
from graphserver.tracing import Tracer, interval_overlap_ms


def test_interval_overlap():
    a = [(0.0, 1.0), (2.0, 3.0), (0.5, 1.5)]          # merges to (0, 1.5), (2, 3)
    b = [(1.0, 2.5)]
    assert abs(interval_overlap_ms(a, b) - 1000.0) < 1e-9   # (1, 1.5) + (2, 2.5)
    assert interval_overlap_ms(a, []) == 0.0


def test_ranges_are_emitted(monkeypatch):
    pushed, popped = [], []
    tracer = Tracer()
    monkeypatch.setattr(tracer._domain, "push_range", lambda message=None, **k: pushed.append(message))
    monkeypatch.setattr(tracer._domain, "pop_range", lambda *a, **k: popped.append(1))
    eng = Engine(model="random:tiny", device="cpu", max_len=128, kv_blocks=16,
                 log=lambda m: None)
    eng.core.tracer = tracer
    try:
        eng.kv_init("s", [1, 2, 3])
        eng.replay_seq("s", 4, sampling={"greedy": True})
    finally:
        eng.close()
    assert "prefill 3" in pushed and "replay_seq 4" in pushed
    assert sum(m.startswith("eager T=") for m in pushed) == 3      # the CPU backend's fallbacks
    assert len(popped) == len(pushed)


def test_server_wraps_every_rpc_in_a_range(monkeypatch):
    from graphserver.engine.proc import EngineProc, Inbound
    from fake_engine import FakeEngine
    names = []
    srv = EngineProc(FakeEngine(), "inproc://tracing-test")
    monkeypatch.setattr(srv._tracer._domain, "push_range", lambda message=None, **k: names.append(message))
    monkeypatch.setattr(srv._tracer._domain, "pop_range", lambda *a, **k: None)
    srv._handle(Inbound([b"peer"], 1, "status", {}, 0.0))
    srv.close()
    assert names == ["rpc status"]


def test_torch_profile_trace_on_cpu(tmp_path):
    path = tmp_path / "trace.json"
    eng = Engine(model="random:tiny", device="cpu", max_len=128, kv_blocks=16,
                 torch_profile=str(path), log=lambda m: None)
    eng.kv_init("s", [4, 5, 6, 7])
    eng.replay_seq("s", 3, sampling={"greedy": True})
    eng.close()
    trace = json.loads(path.read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "replay_seq 3" in names and "prefill 4" in names
    summary = json.loads(path.with_suffix(".summary.json").read_text())
    assert summary["replay_calls"] == 1 and summary["replay_ms"] > 0
    assert summary["overlap_ms"] == 0.0          # no capture thread on the CPU
    assert summary["replay_ms_per_step_with_capture"] is None
    assert summary["replay_ms_per_step_without_capture"] > 0


def test_replay_split_by_concurrent_capture():
    tr = Tracer.__new__(Tracer)              # the summary logic alone, no profiler
    import threading
    tr._lock = threading.Lock()
    tr._intervals = {"capture": [(1.0, 1.5)], "replay": [(0.9, 2.0), (3.0, 4.0)]}
    tr._replays = [(0.9, 2.0, 10, 5.0), (3.0, 4.0, 20, 8.0)]
    s = tr.summary()
    assert s["replay_ms_per_step_with_capture"] == 0.5
    assert s["replay_ms_per_step_without_capture"] == 0.4
    assert abs(s["overlap_ms"] - 500.0) < 1e-6
