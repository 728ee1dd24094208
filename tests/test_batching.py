"""Continuous batching end to end.

(a) The in-process Engine on random:tiny (CPU): a request's tokens do not depend on what else runs
    (alone, batched, staggered, under KV pressure that forces preemption, against the batch-1
    session path kv_init + replay_seq), seeded sampling likewise, abort, deadlines, stream=false,
    refusals that change nothing, Overloaded, stop tokens and EOS.
(b) The real server process on the real default model over ZeroMQ, fp32: 8 concurrent streams,
    each token-identical to HF transformers greedy for its prompt alone, also under KV pressure,
    and an abort mid-stream that frees its blocks.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Optional

import pytest

from graphserver.engine import Engine
from graphserver.errors import BadRequest, Overloaded

TINY = dict(model="random:tiny", device="cpu", max_len=128, block_size=8, max_num_seqs=8,
            prefill_chunk=16, log=lambda m: None)


def tiny_engine(**kw) -> Engine:
    return Engine(**{**TINY, "kv_blocks": 64, **kw})


@dataclass
class Collected:
    """Every reply of one generate request, as the engine sent them."""
    replies: list = field(default_factory=list)     # (result, more)

    def __call__(self, result: dict, more: bool = False) -> None:
        assert not self.done, "a reply after the final one"
        self.replies.append((dict(result), more))

    @property
    def done(self) -> bool:
        return bool(self.replies) and not self.replies[-1][1]

    @property
    def tokens(self) -> list[int]:
        return [t for r, _ in self.replies for t in r["tokens"]]

    @property
    def final(self) -> dict:
        assert self.done
        return self.replies[-1][0]


def check_stream(c: Collected, rid: str, stream: bool = True) -> None:
    """The reply contract of ENGINE_RPC.md for one finished request."""
    assert c.done, f"{rid}: no final reply"
    *more, (final, last_more) = c.replies
    assert all(m for _, m in more) and not last_more
    if not stream:
        assert not more, "stream=false sent more than one reply"
    for r, _ in more:
        assert r["finished"] is False and r["finish_reason"] is None and r["tokens"]
        assert r["request_id"] == rid and r["model_version"] == "0"
    assert final["finished"] is True and final["finish_reason"] in ("stop", "length", "abort")
    assert final["request_id"] == rid and final["model_version"] == "0"
    assert final["usage"]["completion_tokens"] == len(c.tokens)
    m = final["metrics"]
    assert 0 <= m["queue_ms"] <= m["e2e_ms"] and m["ttft_ms"] <= m["e2e_ms"] + 1e-6


def submit(eng: Engine, rid: str, prompt_ids, max_tokens: int = 16, **kw) -> Collected:
    c = Collected()
    kw.setdefault("ignore_eos", True)
    eng.generate(c, rid, list(prompt_ids), max_tokens=max_tokens, **kw)
    return c


def drain(eng: Engine, max_steps: int = 5000) -> int:
    n = 0
    while eng.has_work:
        eng.run_step()
        n += 1
        assert n < max_steps, "the engine does not finish"
    return n


def run_alone(eng: Engine, rid: str, prompt_ids, max_tokens: int, **kw) -> Collected:
    assert not eng.has_work
    c = submit(eng, rid, prompt_ids, max_tokens, **kw)
    drain(eng)
    check_stream(c, rid, kw.get("stream", True))
    return c


def idle_state(eng: Engine) -> tuple:
    st = eng.status()
    return st["scheduler"], st["kv"], st["requests_streaming"]


def random_requests(seed: int, n: int, vocab: int, max_prompt: int = 50, max_new: int = 30):
    rng = random.Random(seed)
    return [(f"r{seed}-{i}", [rng.randrange(vocab) for _ in range(rng.randint(1, max_prompt))],
             rng.randint(1, max_new)) for i in range(n)]


SAMPLED = [{"temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 11},
           {"temperature": 1.5, "seed": 12},
           {"temperature": 0.7, "top_p": 0.8, "seed": -3},
           {"temperature": 1.0, "top_k": 5, "seed": 2**40}]


@pytest.fixture(scope="module")
def eng():
    e = tiny_engine()
    yield e
    e.close()


@pytest.fixture(scope="module")
def reqs(eng):
    return random_requests(1, 12, eng.cfg.vocab_size)


@pytest.fixture(scope="module")
def alone(eng, reqs):
    """Each request's greedy tokens, run alone on an idle engine."""
    return {rid: run_alone(eng, rid, ids, n).tokens for rid, ids, n in reqs}


# ============================================================================ (a) in-process

def test_alone_equals_the_session_path(eng, reqs, alone):
    for rid, ids, n in reqs:
        eng.kv_init("ref", ids, replace=True)
        assert eng.replay_seq("ref", n, sampling={"greedy": True})["tokens"] == alone[rid], rid
    eng.kv_free("ref")
    assert len({tuple(t) for t in alone.values()}) == len(alone)    # a non-trivial comparison


def test_batched_greedy_equals_alone(eng, reqs, alone):
    before = idle_state(eng)
    got = {rid: submit(eng, rid, ids, n) for rid, ids, n in reqs}
    steps = drain(eng)
    assert steps < sum(n for _, _, n in reqs)                        # they really ran together
    for rid, c in got.items():
        check_stream(c, rid)
        assert c.tokens == alone[rid], rid
        assert c.final["finish_reason"] == "length"
    st = eng.status()
    assert st["kv"]["blocks_used"] == 0 and st["scheduler"]["running"] == 0
    assert st["scheduler"]["finished"] == before[0]["finished"] + len(reqs)
    assert st["scheduler"]["preemptions"] == before[0]["preemptions"]


def test_staggered_arrivals_equal_alone(eng, reqs, alone):
    got = {}
    pending = list(reqs)
    rng = random.Random(5)
    while pending or eng.has_work:
        for _ in range(rng.randint(0, 3)):
            if pending:
                rid, ids, n = pending.pop()
                got[rid] = submit(eng, rid, ids, n)
        if eng.has_work:
            eng.run_step()
    for rid, c in got.items():
        check_stream(c, rid)
        assert c.tokens == alone[rid], rid


def test_seeded_sampling_alone_equals_batched(eng):
    rng = random.Random(9)
    specs = [(f"s{i}", [rng.randrange(eng.cfg.vocab_size) for _ in range(rng.randint(1, 40))],
              rng.randint(10, 25), SAMPLED[i % len(SAMPLED)]) for i in range(10)]
    alone_s = {rid: run_alone(eng, rid, ids, n, sampling=dict(s)).tokens
               for rid, ids, n, s in specs}
    got = {rid: submit(eng, rid, ids, n, sampling=dict(s)) for rid, ids, n, s in specs}
    drain(eng)
    for rid, c in got.items():
        check_stream(c, rid)
        assert c.tokens == alone_s[rid], rid
    # the session path samples the same tokens from the same (seed, position)
    rid, ids, n, s = specs[0]
    eng.kv_init("ref", ids, replace=True)
    assert eng.replay_seq("ref", n, sampling=dict(s))["tokens"] == alone_s[rid]
    eng.kv_free("ref")
    # and the sampling is real: another seed, other tokens; greedy, other tokens
    other = run_alone(eng, "other", ids, n, sampling=dict(s, seed=s["seed"] + 1)).tokens
    greedy = run_alone(eng, "greedy", ids, n).tokens
    assert other != alone_s[rid] and greedy != alone_s[rid]


def test_kv_pressure_forces_preemption_and_keeps_every_token(eng, reqs, alone):
    small = tiny_engine(kv_blocks=12)                 # 96 tokens for 12 requests of up to 80
    try:
        specs = [(rid, ids, n, None) for rid, ids, n in reqs]
        rng = random.Random(3)
        vocab = small.cfg.vocab_size
        sampled = [(f"p{i}", [rng.randrange(vocab) for _ in range(rng.randint(5, 40))], 20,
                    SAMPLED[i % len(SAMPLED)]) for i in range(4)]
        want = dict(alone)
        for rid, ids, n, s in sampled:
            want[rid] = run_alone(eng, rid, ids, n, sampling=dict(s)).tokens
        got = {rid: submit(small, rid, ids, n, sampling=s) for rid, ids, n, s in specs + sampled}
        drain(small)
        for rid, c in got.items():
            check_stream(c, rid)
            assert c.tokens == want[rid], rid
        st = small.status()
        assert st["scheduler"]["preemptions"] > 0
        assert sum(c.final["metrics"]["preemptions"] for c in got.values()) == \
            st["scheduler"]["preemptions"]
        assert st["kv"]["blocks_used"] == 0 and st["scheduler"]["running"] == 0
    finally:
        small.close()


def test_abort_mid_stream_frees_blocks_at_once(eng, reqs, alone):
    before = idle_state(eng)
    bystander = submit(eng, reqs[0][0], reqs[0][1], reqs[0][2])
    victim = submit(eng, "victim", [3, 1, 4, 1, 5, 9, 2, 6] * 3, 100)
    while len(victim.tokens) < 3:
        eng.run_step()
    used = eng.status()["kv"]["blocks_used"]
    assert used > 0
    assert eng.abort("victim") == {"aborted": True}
    assert victim.done and victim.final["finish_reason"] == "abort"
    check_stream(victim, "victim")
    n_victim = len(victim.tokens)
    st = eng.status()
    assert st["kv"]["blocks_used"] < used                 # freed at once, before any step
    assert st["scheduler"]["aborted"] == before[0]["aborted"] + 1
    assert eng.abort("victim") == {"aborted": False}      # already finished
    assert eng.abort("nobody") == {"aborted": False}
    drain(eng)
    assert len(victim.tokens) == n_victim                  # nothing after the final reply
    assert bystander.tokens == alone[reqs[0][0]]           # the other request did not notice
    assert idle_state(eng)[1]["blocks_used"] == 0


def test_abort_of_a_waiting_request(eng):
    seqs = eng.core.config.max_num_seqs
    full = [submit(eng, f"f{i}", [i + 1] * 5, 30) for i in range(seqs)]
    waiting = submit(eng, "waiter", [7, 7, 7], 5)
    for _ in range(10):
        if eng.status()["scheduler"]["running"] == seqs:
            break
        eng.run_step()
    assert eng.status()["scheduler"]["running"] == seqs
    assert eng.status()["scheduler"]["waiting"] == 1
    assert eng.abort("waiter") == {"aborted": True}
    assert waiting.final["finish_reason"] == "abort" and waiting.tokens == []
    drain(eng)
    assert all(c.final["finish_reason"] == "length" and len(c.tokens) == 30 for c in full)


def test_deadline_aborts_a_request():
    class Clock:
        t = 50.0

        def __call__(self):
            return self.t

    clock = Clock()
    e = tiny_engine(clock=clock)
    try:
        late = submit(e, "late", [5, 6, 7, 8], 50, deadline_s=2.0)
        keep = submit(e, "keep", [5, 6, 7, 8], 20)
        for _ in range(4):
            e.run_step()
        clock.t += 1.9
        e.run_step()
        assert not late.done
        clock.t += 0.2                                     # past 2 s after its arrival
        e.run_step()
        assert late.done and late.final["finish_reason"] == "abort"
        assert len(late.tokens) == 5
        drain(e)
        assert keep.final["finish_reason"] == "length" and len(keep.tokens) == 20
        assert keep.tokens[:5] == late.tokens            # same prompt, same greedy tokens
        assert e.status()["kv"]["blocks_used"] == 0
    finally:
        e.close()


def test_stream_false_gives_one_reply_with_all_tokens(eng, reqs, alone):
    got = {rid: submit(eng, rid, ids, n, stream=False) for rid, ids, n in reqs[:6]}
    drain(eng)
    for rid, c in got.items():
        check_stream(c, rid, stream=False)
        assert len(c.replies) == 1 and c.final["tokens"] == alone[rid]


def test_bad_params_are_refused_and_change_nothing(eng):
    v, max_len = eng.cfg.vocab_size, eng.max_len
    live = submit(eng, "live", [1, 2, 3], 4)            # waiting: no step yet
    before = idle_state(eng)
    base = dict(request_id="bad", prompt_ids=[1, 2, 3], max_tokens=4)
    cases = [
        ({"prompt_ids": []}, "non-empty"),
        ({"prompt_ids": [1, v]}, "out of range"),
        ({"prompt_ids": [-1]}, "out of range"),
        ({"prompt_ids": [1, 2.5]}, "must be an int"),
        ({"prompt_ids": "123"}, "non-empty list"),
        ({"prompt_ids": [1] * max_len}, "max_len"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"sampling": {"temperature": -1.0}}, "temperature"),
        ({"sampling": {"temperature": float("nan")}}, "temperature"),
        ({"sampling": {"top_p": 0.0}}, "top_p"),
        ({"sampling": {"top_p": 1.5}}, "top_p"),
        ({"sampling": {"top_k": -1}}, "top_k"),
        ({"sampling": {"seed": 1.5}}, "seed"),
        ({"sampling": {"repetition_penalty": 1.2}}, "unknown sampling keys"),
        ({"stop_token_ids": [v]}, "out of range"),
        ({"stop_token_ids": [True]}, "must be an int"),
        ({"deadline_s": 0.0}, "deadline_s"),
        ({"deadline_s": -1.0}, "deadline_s"),
        ({"deadline_s": float("inf")}, "deadline_s"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 257}, "request_id"),
        ({"request_id": 7}, "request_id"),
        ({"request_id": "live"}, "already running"),
    ]
    for change, match in cases:
        c = Collected()
        with pytest.raises(BadRequest, match=match):
            eng.generate(c, **{**base, **change})
        assert not c.replies, change
        assert idle_state(eng) == before, f"refused {change} but the state changed"
    small_arena = tiny_engine(kv_blocks=2)              # 16 tokens
    try:
        with pytest.raises(BadRequest, match="KV blocks"):
            small_arena.generate(Collected(), "big", list(range(1, 30)), max_tokens=2)
        assert small_arena.status()["scheduler"]["waiting"] == 0
    finally:
        small_arena.close()
    drain(eng)
    assert live.final["finish_reason"] == "length" and len(live.tokens) == 4


def test_overloaded_when_the_waiting_queue_is_full():
    e = tiny_engine(max_waiting=2)
    try:
        a, b = submit(e, "a", [1, 2], 3), submit(e, "b", [3, 4], 3)
        before = idle_state(e)
        c = Collected()
        with pytest.raises(Overloaded, match=r"waiting queue is full \(2 requests\)"):
            e.generate(c, "c", [5, 6], max_tokens=3)
        assert idle_state(e) == before and not c.replies
        e.run_step()                                     # a and b admitted: room again
        late = submit(e, "c", [5, 6], 3)
        drain(e)
        for x in (a, b, late):
            assert len(x.tokens) == 3
    finally:
        e.close()


def test_stop_token_ids_end_a_request_with_stop(eng, reqs, alone):
    rid, ids, _ = max(reqs, key=lambda r: r[2])
    free = alone[rid]
    stop = free[len(free) // 2]
    first = free.index(stop)
    c = run_alone(eng, "stopper", ids, len(free), stop_token_ids=[stop])
    assert c.final["finish_reason"] == "stop"
    assert c.tokens == free[: first + 1] and c.tokens[-1] == stop
    two = sorted({free[3], free[len(free) - 2]})
    c2 = run_alone(eng, "stopper2", ids, len(free), stop_token_ids=two)
    k = min(free.index(t) for t in two)
    assert c2.tokens == free[: k + 1] and c2.final["finish_reason"] == "stop"


def test_eos_stops_unless_ignore_eos(eng):
    """With sampling hot enough, some seed produces the model's EOS; that request stops there by
    default and runs on past it with ignore_eos (stop_token_ids still apply)."""
    (eos,) = eng.cfg.eos_token_ids
    ids = [9, 8, 7, 6, 5]
    cands = {seed: submit(eng, f"hot{seed}", ids, 48, sampling={"temperature": 4.0, "seed": seed})
             for seed in range(40)}
    drain(eng)
    hits = [s for s, c in cands.items() if eos in c.tokens[:-1]]
    assert hits, "no seed produced EOS before its last token; widen the search"
    seed = hits[0]
    free = cands[seed].tokens
    samp = {"temperature": 4.0, "seed": seed}
    stopped = run_alone(eng, "eos", ids, 48, sampling=samp, ignore_eos=False)
    assert stopped.final["finish_reason"] == "stop"
    assert stopped.tokens == free[: free.index(eos) + 1] and stopped.tokens[-1] == eos
    ignored = run_alone(eng, "no-eos", ids, 48, sampling=samp, ignore_eos=True)
    assert ignored.final["finish_reason"] == "length" and ignored.tokens == free
    stop = free[-1]
    both = run_alone(eng, "stop-only", ids, 48, sampling=samp, ignore_eos=True,
                     stop_token_ids=[stop])
    assert both.tokens == free[: free.index(stop) + 1]


def test_max_len_ends_a_request_with_length(eng):
    n = eng.max_len - 4
    c = run_alone(eng, "long", [3] * n, 50)
    assert c.final["finish_reason"] == "length" and len(c.tokens) == 4
    c = run_alone(eng, "longest", [3] * (eng.max_len - 1), 50)
    assert len(c.tokens) == 1 and c.final["finish_reason"] == "length"


def test_budget_equal_to_the_chunk_gives_the_same_tokens(reqs, alone):
    """A completing chunk with no room for its decode runs alone: no livelock, same tokens."""
    e = tiny_engine(max_num_batched_tokens=TINY["prefill_chunk"])
    try:
        got = {rid: submit(e, rid, ids, n) for rid, ids, n in reqs}
        drain(e, max_steps=2000)
        for rid, c in got.items():
            check_stream(c, rid)
            assert c.tokens == alone[rid], rid
    finally:
        e.close()


def test_a_request_waits_while_sessions_hold_the_arena():
    """The prompt fits the arena and max_len, but a session holds 3 of 4 blocks: the request must
    wait for them (not finish "length" with no tokens), then run once the session is freed."""
    e = Engine(**{**TINY, "max_len": 64, "block_size": 16, "kv_blocks": 4})
    try:
        e.kv_init("hog", list(range(1, 40)))               # 39 tokens: 3 blocks
        c = submit(e, "g", list(range(1, 30)), 4)          # 29 tokens: 2 blocks
        for _ in range(5):
            e.run_step()
        assert not c.done, f"finished early: {c.final}"
        e.kv_free("hog")
        drain(e)
        check_stream(c, "g")
        assert c.final["finish_reason"] == "length" and len(c.tokens) == 4
        e.kv_init("ref", list(range(1, 30)))
        assert e.replay_seq("ref", 4, sampling={"greedy": True})["tokens"] == c.tokens
    finally:
        e.close()


# ============================================================================ (b) the real model

CHAT = ["What is the capital of France?", "Write a haiku about the sea.",
        "Explain photosynthesis in one sentence.", "Name three prime numbers."]
PLAIN = ["The quick brown fox", "Once upon a time, in a small village by the river,",
         "def fibonacci(n):", "1, 2, 3, 4,"]
MAX_TOKENS = [24, 20, 24, 16, 24, 12, 24, 18]        # per prompt: different lengths out too
NEW_TOKENS = max(MAX_TOKENS)
REAL_ARGS = ["--device", "cpu", "--dtype", "fp32", "--max-len", "256"]


@pytest.fixture(scope="module")
def real_prompts(default_model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    out = [list(tok.apply_chat_template([{"role": "user", "content": q}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)) for q in CHAT]
    out += [list(tok(t)["input_ids"]) for t in PLAIN]
    assert len({len(p) for p in out}) >= 6               # different lengths in
    return out


@pytest.fixture(scope="module")
def hf_greedy(default_model_dir, real_prompts) -> list[list[int]]:
    """HF transformers greedy, fp32, each prompt alone: the reference every stream must equal."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32,
                                              local_files_only=True).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # 2 threads ran these batch-1 steps 10x slower on 2 busy cores
    try:
        refs = _hf_generate(hf, real_prompts)
    finally:
        torch.set_num_threads(threads)
    del hf
    return refs


def _hf_generate(hf, prompts) -> list[list[int]]:
    import torch

    refs = []
    with torch.no_grad():
        for ids in prompts:
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                             dtype=torch.long),
                              max_new_tokens=NEW_TOKENS, do_sample=False, top_p=None, top_k=None,
                              temperature=None)
            refs.append(out[0, len(ids):].tolist())
    return refs


def expected(ref: list[int], n: int, eos: list[int]) -> tuple[list[int], str]:
    """What generate(max_tokens=n) must return for HF's greedy continuation `ref`."""
    want = ref[:n]
    for i, t in enumerate(want):
        if t in eos:
            return want[: i + 1], "stop"
    return want, "length"


class Streams:
    """Raw DEALER: many generate requests at once, replies routed by message id."""

    def __init__(self, endpoint: str):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 1
        self.replies: dict[int, list[dict]] = {}

    def send(self, method: str, params: dict) -> int:
        from graphserver import protocol

        msg_id, self.next_id = self.next_id, self.next_id + 1
        self.replies[msg_id] = []
        self.sock.send_multipart([b"", protocol.encode(protocol.make_request(msg_id, method,
                                                                             params))])
        return msg_id

    def pump(self, timeout_s: float = 120.0) -> dict:
        from graphserver import protocol

        assert self.sock.poll(timeout_s * 1000), "no reply from the server"
        reply = protocol.decode(self.sock.recv_multipart()[-1])
        assert reply["id"] in self.replies, reply
        self.replies[reply["id"]].append(reply)
        return reply

    def done(self, msg_id: int) -> bool:
        r = self.replies[msg_id]
        return bool(r) and not r[-1].get("more")

    def wait(self, ids, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(self.done(i) for i in ids):
            assert time.monotonic() < deadline, "the streams did not finish in time"
            self.pump()

    def call(self, method: str, params: Optional[dict] = None) -> dict:
        msg_id = self.send(method, params or {})
        self.wait([msg_id])
        (reply,) = self.replies[msg_id]
        assert reply["ok"], reply
        return reply["result"]

    def stream_result(self, msg_id: int, rid: str) -> tuple[list[int], dict]:
        replies = self.replies[msg_id]
        assert all(r["ok"] for r in replies), replies[-1]
        assert [bool(r.get("more")) for r in replies] == [True] * (len(replies) - 1) + [False]
        for r in replies:
            assert r["result"]["request_id"] == rid and r["result"]["model_version"] == "0"
        final = replies[-1]["result"]
        assert final["finished"] is True
        return [t for r in replies for t in r["result"]["tokens"]], final

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def run_streams(endpoint: str, prompts, hf_refs, eos) -> dict:
    s = Streams(endpoint)
    try:
        ids = {s.send("generate", {"request_id": f"req-{i}", "prompt_ids": p,
                                   "max_tokens": MAX_TOKENS[i]}): i
               for i, p in enumerate(prompts)}
        s.wait(list(ids))
        for msg_id, i in ids.items():
            got, final = s.stream_result(msg_id, f"req-{i}")
            want, reason = expected(hf_refs[i], MAX_TOKENS[i], eos)
            diverge = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b),
                           min(len(got), len(want)))
            assert got == want, f"prompt {i}: first divergence at token {diverge}"
            assert final["finish_reason"] == reason
            assert final["usage"] == {"prompt_tokens": len(prompts[i]),
                                      "completion_tokens": len(want)}
        return s.call("status")
    finally:
        s.close()


@pytest.fixture(scope="module")
def real_server(default_model_dir, hf_greedy):
    from client.rpc import ServerProcess

    with ServerProcess(model=str(default_model_dir), extra_args=REAL_ARGS,
                       spawn_timeout_s=300) as client:
        yield client


@pytest.mark.slow
def test_real_model_8_concurrent_streams_equal_hf_greedy(real_server, real_prompts, hf_greedy):
    hello = real_server.hello()
    assert hello["dtype"] == "float32" and hello["backend"] == "cpu"
    eos = list(hello["eos_token_ids"])
    st = run_streams(real_server.endpoint, real_prompts, hf_greedy, eos)
    sched = st["scheduler"]
    assert sched["finished"] >= len(real_prompts) and sched["running"] == 0
    # they ran together: far fewer steps than tokens
    assert sched["steps"] < sched["generation_tokens"] / 2
    assert st["kv"]["blocks_used"] == 0


@pytest.mark.slow
def test_real_model_abort_mid_stream_frees_its_blocks(real_server, real_prompts):
    s = Streams(real_server.endpoint)
    try:
        before = s.call("status")
        gen = s.send("generate", {"request_id": "to-abort", "prompt_ids": real_prompts[0],
                                  "max_tokens": 200, "ignore_eos": True})
        while len(s.replies[gen]) < 2:
            s.pump()
        assert all(r.get("more") for r in s.replies[gen])
        assert s.call("status")["kv"]["blocks_used"] > 0
        ab = s.send("abort", {"request_id": "to-abort"})
        s.wait([gen, ab])
        assert s.replies[ab][0]["result"] == {"aborted": True}
        tokens, final = s.stream_result(gen, "to-abort")
        assert final["finish_reason"] == "abort" and 2 <= len(tokens) < 200
        after = s.call("status")
        assert after["kv"]["blocks_used"] == 0 and after["scheduler"]["running"] == 0
        assert after["scheduler"]["aborted"] == before["scheduler"]["aborted"] + 1
    finally:
        s.close()


@pytest.mark.slow
def test_real_model_under_kv_pressure_preempts_and_still_equals_hf(default_model_dir,
                                                                   real_prompts, hf_greedy):
    from client.rpc import ServerProcess

    longest = max(len(p) + n for p, n in zip(real_prompts, MAX_TOKENS))
    blocks = -(-longest // 16) + 2             # one request alone always fits; eight never do
    with ServerProcess(model=str(default_model_dir),
                       extra_args=REAL_ARGS + ["--kv-blocks", str(blocks), "--block-size", "16"],
                       spawn_timeout_s=300) as client:
        eos = list(client.hello()["eos_token_ids"])
        st = run_streams(client.endpoint, real_prompts, hf_greedy, eos)
    assert st["kv"]["blocks_total"] == blocks
    assert st["scheduler"]["preemptions"] > 0
    assert st["kv"]["blocks_used"] == 0

