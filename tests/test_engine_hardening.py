"""Hostile-but-valid inputs to the engine's session RPCs (tracker issue 15, items 9-15): the caller's
mistakes are BadRequest with the valid range, a refused call changes nothing, idle time counts from
the end of a call, live session names are not silently replaced, names are bounded, deadlines free
what they interrupt."""
import time

import pytest

from graphserver.engine import Engine
from graphserver.errors import BadRequest, DeadlineExceeded
from graphserver.protocol import MAX_REQUEST_ID_LEN


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture(scope="module")
def eng():
    e = Engine(model="random:tiny", device="cpu", max_len=256, kv_blocks=48, block_size=16,
               prefill_chunk=16, log=lambda m: None)
    yield e
    e.close()


def _state(e):
    """KV usage and every session's length and pending token (not its idle time, which moves)."""
    st = e.status()
    return st["kv"], {k: (v["length"], v["pending"]) for k, v in st["sessions"].items()}


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-6, 0.0])
def test_tiny_temperatures_are_greedy(eng, temperature):
    ids = [3, 1, 4, 1, 5]
    eng.kv_init("g", ids, replace=True)
    greedy = eng.replay_seq("g", 12, sampling={"greedy": True})["tokens"]
    eng.kv_init("g", ids, replace=True)
    got = eng.replay_seq("g", 12, sampling={"temperature": temperature, "seed": 3})["tokens"]
    assert got == greedy


@pytest.mark.parametrize("sampling, match", [
    ({"temperature": 1e39}, r"temperature must be in \[0, 10000\]"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 0.7, "top_k": 1 << 31}, r"top_k must be an int in \[0, 2147483647\]"),
    ({"temperature": 0.7, "top_k": -1}, "top_k"),
    ({"temperature": 0.7, "top_p": 0.0}, "top_p"),
    ({"temperature": 0.7, "seed": 1 << 63}, "seed"),
])
def test_out_of_range_sampling_is_bad_request_with_the_range(eng, sampling, match):
    eng.kv_init("s", [7, 8, 9], replace=True)
    before = _state(eng)
    with pytest.raises(BadRequest, match=match):
        eng.replay_seq("s", 4, sampling=sampling)
    assert _state(eng) == before


@pytest.mark.parametrize("top_k", [-5, 0, 10**6])
def test_kv_init_top_k_out_of_range_is_bad_request(eng, top_k):
    before = _state(eng)
    with pytest.raises(BadRequest, match="top_k must be in"):
        eng.kv_init("tk", [1, 2, 3], top_k=top_k)
    assert _state(eng) == before and "tk" not in eng.sessions


def test_refused_replay_leaves_the_session_as_it_was(eng):
    eng.kv_init("v", [5, 6, 7], replace=True)
    eng.replay_seq("v", 3, sampling={"greedy": True})
    s = eng.sessions["v"]
    before = (s.length, s.pending, _state(eng)[0])
    for bad in (dict(steps=10**6, start_token=5), dict(steps=4, start_token=10**9),
                dict(steps=4, start_token=5, stop_token_ids=[-1]),
                dict(steps=4, start_token=5, sampling={"temperature": -1.0})):
        with pytest.raises(BadRequest):
            eng.replay_seq("v", **bad)
        assert (s.length, s.pending, _state(eng)[0]) == before, bad
    # and it continues exactly as a session that never saw those calls
    cont = eng.replay_seq("v", 5, sampling={"greedy": True})["tokens"]
    eng.kv_init("w", [5, 6, 7], replace=True)
    ref = eng.replay_seq("w", 8, sampling={"greedy": True})["tokens"]
    assert ref[3:] == cont


def test_live_session_name_is_not_silently_replaced(eng):
    eng.kv_init("mine", [1, 2, 3, 4], replace=True)
    first = eng.replay_seq("mine", 2, sampling={"greedy": True})["tokens"]
    with pytest.raises(BadRequest, match="already exists"):
        eng.kv_init("mine", [9, 9, 9])
    s = eng.sessions["mine"]
    assert s.length == 5 and s.pending == first[-1]
    assert eng.kv_init("mine", [9, 9, 9], replace=True)["length"] == 3


def test_names_are_bounded(eng):
    long = "x" * (MAX_REQUEST_ID_LEN + 1)
    before = _state(eng)
    with pytest.raises(BadRequest, match=f"limit is {MAX_REQUEST_ID_LEN}"):
        eng.kv_init(long, [1, 2])
    with pytest.raises(BadRequest, match="limit"):
        eng.generate(lambda *a, **k: None, long, [1, 2])
    assert _state(eng) == before
    eng.kv_init("y" * MAX_REQUEST_ID_LEN, [1, 2])
    eng.kv_free("y" * MAX_REQUEST_ID_LEN)


def test_idle_time_counts_from_the_end_of_the_last_call():
    from graphserver.errors import KVExhausted
    clock = _Clock()
    e = Engine(model="random:tiny", device="cpu", max_len=256, kv_blocks=24, block_size=16,
               session_ttl_s=60.0, clock=clock, log=lambda m: None)
    try:
        e.kv_init("busy", list(range(1, 120)))          # 119 tokens
        real_step = e.runner.decode_step

        def slow_step(*a, **k):                          # each replayed step "takes" 1 s
            clock.t += 1.0
            return real_step(*a, **k)

        e.runner.decode_step = slow_step
        e.replay_seq("busy", 70, sampling={"greedy": True})   # 69 s of work, ending now
        e.runner.decode_step = real_step
        assert e.alloc.usage()["blocks_used"] == 12           # 189 tokens
        assert e.status()["sessions"]["busy"]["idle_s"] == 0.0
        clock.t += 1.0
        # 13 blocks, 12 free: only reclaiming 'busy' would make room, and it was used 1 s ago
        # (counted from the start of its call it would look 70 s idle, past the 60 s ttl).
        with pytest.raises(KVExhausted):
            e.kv_init("other", list(range(1, 200)))
        assert "busy" in e.sessions
        clock.t += 60.0
        e.kv_init("other", list(range(1, 200)))              # now it is idle: reclaimed
        assert set(e.sessions) == {"other"}
    finally:
        e.close()


def test_kv_init_past_its_deadline_frees_what_it_built():
    e = Engine(model="random:tiny", device="cpu", max_len=2048, kv_blocks=160, block_size=16,
               prefill_chunk=16, log=lambda m: None)
    try:
        real = e.runner._layers

        def slow_layers(*a, **k):
            time.sleep(0.05)
            return real(*a, **k)

        e.runner._layers = slow_layers
        before = e.status()["kv"]
        with pytest.raises(DeadlineExceeded, match="deadline"):
            e.kv_init("late", [1 + i % 500 for i in range(1000)], deadline_s=0.2)  # 63 chunks, 50 ms each
        assert "late" not in e.sessions
        assert e.status()["kv"] == before
    finally:
        e.close()


def test_generate_deadline_aborts_and_frees(eng):
    done = []
    eng.generate(lambda r, more=False: done.append(r) if not more else None, "dl", [1, 2, 3],
                 max_tokens=200, ignore_eos=True, deadline_s=0.05)
    t0 = time.monotonic()
    while eng.has_work and time.monotonic() - t0 < 30:
        eng.run_step()
        time.sleep(0.002)
    assert done and done[-1]["finish_reason"] == "abort"
    assert done[-1]["usage"]["completion_tokens"] < 200
    assert eng.status()["scheduler"]["running"] == 0
