"""The continuous-batching policy, torch-free: core/scheduler.py and core/block_allocator.py with
hand-built Requests and a fake "model".

The fake model's token at a position depends only on the request and the position (as a seeded
sampler's does), so a request recomputed after a preemption must continue with exactly the tokens
it would have produced without one. Every step the Driver checks what the scheduler handed out
(chunk boundaries, the token budget, block tables covering the work, preemption victims) and the
state left behind (no block in two tables, blocks used == sum of the tables, ...).
"""
from __future__ import annotations

import random
import zlib
from typing import Optional

import pytest

from graphserver.core.block_allocator import BlockAllocator, blocks_for
from graphserver.core.outputs import RequestOutput, SchedulerOutput
from graphserver.core.request import Request, RequestStatus
from graphserver.core.scheduler import Scheduler, request_owner
from graphserver.errors import BadRequest, Overloaded

VOCAB = 1000


def model_token(rid: str, position: int) -> int:
    """The token the fake model samples from the input token at `position`."""
    return zlib.crc32(f"{rid}@{position}".encode()) % VOCAB


def expected_tokens(rid: str, prompt_len: int, n: int) -> list[int]:
    """The first n tokens request `rid` produces, whatever else runs."""
    return [model_token(rid, prompt_len - 1 + i) for i in range(n)]


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 3 + salt) % VOCAB for i in range(n)]


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(*, num_blocks: int = 64, block_size: int = 4, max_len: int = 64, max_num_seqs: int = 8,
         prefill_chunk: int = 8, budget: Optional[int] = None, max_waiting: int = 1000,
         watermark: int = 1, clock: Optional[Clock] = None) -> Scheduler:
    alloc = BlockAllocator(num_blocks, block_size, blocks_for(max_len, block_size))
    return Scheduler(max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget if budget is not None
                     else prefill_chunk + max_num_seqs,
                     prefill_chunk=prefill_chunk, max_len=max_len, max_waiting=max_waiting,
                     allocator=alloc, watermark_blocks=watermark, clock=clock or Clock())


def req(rid: str, n_prompt: int, max_tokens: int = 8, stops=(), salt: int = 0,
        deadline_t: Optional[float] = None) -> Request:
    return Request(rid, prompt(n_prompt, salt), max_tokens, stop_token_ids=frozenset(stops),
                   deadline_t=deadline_t)


# ============================================================================ the driver

def check_state(s: Scheduler, others: tuple[str, ...] = ()) -> None:
    """Invariants that hold between steps. others: allocator owners that are not requests
    (sessions)."""
    a = s.alloc
    running = [r.request_id for r in s.running]
    waiting = [r.request_id for r in s.waiting]
    assert len(running) == len(set(running)) and len(waiting) == len(set(waiting))
    assert not set(running) & set(waiting)
    assert set(s.requests) == set(running) | set(waiting)
    assert len(running) <= s.max_num_seqs
    tables = {}
    for r in s.running:
        assert r.status is RequestStatus.RUNNING
        assert a.has(request_owner(r.request_id)), f"{r.request_id} runs without blocks"
        t = a.table(request_owner(r.request_id))
        assert len(t) * a.block_size >= r.num_computed, f"{r.request_id}: table misses its KV"
        assert len(t) <= a.max_blocks_per_seq
        tables[r.request_id] = t
    for r in s.waiting:
        assert r.status is RequestStatus.WAITING
        assert not a.has(request_owner(r.request_id)), f"waiting {r.request_id} holds blocks"
        assert r.num_computed == 0
    for o in others:
        if a.has(o):
            tables[o] = a.table(o)
    owned = [b for t in tables.values() for b in t]
    assert len(owned) == len(set(owned)), "a block is in two tables"
    assert all(0 <= b < a.num_blocks for b in owned)
    u = a.usage()
    assert u["blocks_used"] == len(owned), "blocks used != sum of the tables"
    assert u["owners"] == len(tables)
    assert u["blocks_used"] + u["blocks_free"] == a.num_blocks


def check_scheduled(s: Scheduler, out: SchedulerOutput, before: list[Request],
                    out_len_before: dict[str, int]) -> None:
    """What one schedule() handed out, before the model runs."""
    a, c = s.alloc, s.prefill_chunk
    n_tokens = sum(len(ch.token_ids) for ch in out.prefills) + len(out.decodes)
    assert out.num_batched_tokens == n_tokens
    assert n_tokens <= s.max_num_batched_tokens, "token budget exceeded"
    chunked = {}
    for ch in out.prefills:
        r = ch.request
        assert r.request_id not in chunked, "two chunks of one request in one step"
        chunked[r.request_id] = ch
        assert r.status is RequestStatus.RUNNING and r in s.running
        n = len(ch.token_ids)
        assert ch.start_pos % c == 0, f"chunk starts at {ch.start_pos}, not a multiple of {c}"
        assert 1 <= n <= c
        assert ch.start_pos == r.num_computed
        assert ch.start_pos + n <= r.num_tokens - 1, "the last known token went into a chunk"
        assert ch.token_ids == r.all_ids[ch.start_pos: ch.start_pos + n]
        # a chunk ends at its boundary or where the sequence does (never split otherwise)
        assert ch.start_pos + n == min(ch.start_pos + c, r.num_tokens - 1)
        assert len(a.table(request_owner(r.request_id))) * a.block_size >= ch.start_pos + n
        assert ch.block_table == a.table(request_owner(r.request_id))
    seen = set()
    for row in out.decodes:
        r = row.request
        assert r.request_id not in seen
        seen.add(r.request_id)
        assert r.status is RequestStatus.RUNNING and r in s.running
        assert row.position == r.num_tokens - 1 and row.token == r.last_token()
        done_before = (chunked[r.request_id].start_pos + len(chunked[r.request_id].token_ids)
                       if r.request_id in chunked else r.num_computed)
        assert done_before == r.num_tokens - 1, "decoded before its prefill completed"
        assert len(a.table(request_owner(r.request_id))) * a.block_size >= row.position + 1
    # A prefill that completes is decoded in the same step, unless the budget left at its turn
    # (requests are served in running order) had no room for the decode too.
    spent = 0
    for r in s.running:
        ch = chunked.get(r.request_id)
        n = len(ch.token_ids) if ch else 0
        if ch and ch.start_pos + n == r.num_tokens - 1 and r.request_id not in seen:
            assert spent + n + 1 > s.max_num_batched_tokens, "a completed prefill not decoded"
        spent += n + (r.request_id in seen)
    assert spent == n_tokens
    # Preemption: the victims are the newest running requests, back at the head of the queue
    # with nothing computed and their output kept; nobody is admitted in that step.
    before_ids = [r.request_id for r in before]
    if out.preempted:
        k = len(out.preempted)
        assert set(out.preempted) == set(before_ids[len(before_ids) - k:]), \
            f"preempted {out.preempted}, not the newest of {before_ids}"
        assert [r.request_id for r in list(s.waiting)[:k]] == \
            [rid for rid in before_ids if rid in out.preempted]
        for rid in out.preempted:
            r = s.requests[rid]
            assert r.status is RequestStatus.WAITING and r.num_computed == 0
            assert len(r.output_ids) == out_len_before[rid], "a preempted request lost output"
            assert not a.has(request_owner(rid))
        admitted = [r for r in s.running if r.request_id not in before_ids]
        assert not admitted, "admitted in a step that preempted"


class Driver:
    """Runs the scheduler against the fake model and checks every step."""

    def __init__(self, s: Scheduler):
        self.s = s
        self.streamed: dict[str, list[int]] = {}
        self.finished: dict[str, RequestOutput] = {}
        self.reqs: dict[str, Request] = {}
        self.steps = 0
        self.history: list[SchedulerOutput] = []
        self.others: tuple[str, ...] = ()        # owners besides the requests (sessions)

    def add(self, r: Request) -> Request:
        self.s.add(r)
        self.reqs[r.request_id] = r
        self.streamed.setdefault(r.request_id, [])
        return r

    def collect(self, results: list[RequestOutput]) -> None:
        for o in results:
            rid = o.request.request_id
            assert rid not in self.finished, f"{rid} reported after its final output"
            self.streamed[rid] += o.new_token_ids
            if o.finished:
                assert o.finish_reason in ("stop", "length", "abort")
                assert o.request.status is RequestStatus.FINISHED
                self.finished[rid] = o
                assert self.streamed[rid] == o.request.output_ids

    def step(self) -> SchedulerOutput:
        s = self.s
        before = list(s.running)
        out_len = {rid: len(r.output_ids) for rid, r in s.requests.items()}
        out = s.schedule()
        check_scheduled(s, out, before, out_len)
        if out.empty:
            results = s.take_finished()
        else:
            sampled = {row.request.request_id: model_token(row.request.request_id, row.position)
                       for row in out.decodes}
            results = s.update(out, sampled)
        self.collect(results)
        check_state(s, self.others)
        self.steps += 1
        self.history.append(out)
        return out

    def run(self, max_steps: int = 1000) -> None:
        start = self.steps
        while self.s.has_work:
            assert self.steps - start < max_steps, "the scheduler does not make progress"
            self.step()


def finish(d: Driver, rid: str) -> RequestOutput:
    assert rid in d.finished, f"{rid} did not finish"
    return d.finished[rid]


# ============================================================================ admission

def test_admission_is_fcfs_by_free_kv_head_of_line_blocks():
    d = Driver(make(num_blocks=10, block_size=4, prefill_chunk=32, budget=40, max_len=64))
    a = d.add(req("A", 23, max_tokens=3))       # 23 tokens: 6 blocks (+1 watermark): 3 left
    b = d.add(req("B", 16, max_tokens=2))       # 4 blocks + watermark: does not fit beside A
    c = d.add(req("C", 3, max_tokens=2))        # 1 block: would fit, but B is ahead of it
    d.step()
    assert [r.request_id for r in d.s.running] == ["A"]
    while "A" not in d.finished:
        assert b.status is RequestStatus.WAITING and c.status is RequestStatus.WAITING
        assert [r.request_id for r in d.s.waiting] == ["B", "C"]
        d.step()
    d.step()                                     # A's blocks are back: B, then C
    assert [r.request_id for r in d.s.running] == ["B", "C"]
    d.run()
    for r in (a, b, c):
        assert finish(d, r.request_id).finish_reason == "length"
        assert r.output_ids == expected_tokens(r.request_id, len(r.prompt_ids), r.max_tokens)


def test_max_num_seqs_bounds_the_running_set():
    d = Driver(make(max_num_seqs=2, prefill_chunk=8))
    rs = [d.add(req(f"r{i}", 3 + i, max_tokens=4 + i)) for i in range(5)]
    admitted_order = []
    while d.s.has_work:
        d.step()
        assert len(d.s.running) <= 2
        for r in d.s.running:
            if r.request_id not in admitted_order:
                admitted_order.append(r.request_id)
    assert admitted_order == [f"r{i}" for i in range(5)]        # first come, first served
    for r in rs:
        assert r.output_ids == expected_tokens(r.request_id, len(r.prompt_ids), r.max_tokens)


def test_paused_admission_keeps_running_requests_going():
    d = Driver(make())
    a = d.add(req("A", 3, max_tokens=6))
    d.step()
    d.s.paused = True
    b = d.add(req("B", 3, max_tokens=2))
    for _ in range(3):
        out = d.step()
        assert [row.request.request_id for row in out.decodes] == ["A"]
        assert b.status is RequestStatus.WAITING
    d.run()       # A finishes; B only waits
    assert "A" in d.finished and b.status is RequestStatus.WAITING
    assert not d.s.has_work and d.s.schedule().empty
    d.s.paused = False
    assert d.s.has_work
    d.run()
    assert b.output_ids == expected_tokens("B", 3, 2)
    assert a.output_ids == expected_tokens("A", 3, 6)


# ============================================================================ the token budget

def test_waiting_chunk_that_does_not_fit_waits_while_decodes_go_on():
    # budget 10, chunk 8: three decodes leave 7, so D's first chunk (8) must wait.
    d = Driver(make(prefill_chunk=8, budget=10, max_len=128))
    for rid, n in (("A", 5), ("B", 6), ("C", 30)):
        d.add(req(rid, 1, max_tokens=n))
    d.step()
    dd = d.add(req("D", 30, max_tokens=2))
    while "A" not in d.finished:
        out = d.step()
        assert dd.status is RequestStatus.WAITING
        assert sorted(row.request.request_id for row in out.decodes) == ["A", "B", "C"]
    chunks = []
    while "D" not in d.finished:
        out = d.step()
        chunks += [(ch.start_pos, len(ch.token_ids)) for ch in out.prefills
                   if ch.request.request_id == "D"]
        assert "C" in [row.request.request_id for row in out.decodes]
    # never split: full chunks at multiples of 8, then the tail with the last token decoded
    assert chunks == [(0, 8), (8, 8), (16, 8), (24, 5)]
    d.run()
    assert dd.output_ids == expected_tokens("D", 30, 2)


def test_completing_chunk_without_room_for_its_decode_runs_alone_then_decodes():
    # X's second chunk (8 tokens) completes its prompt; beside two decodes (budget 10) there is
    # room for the chunk but not for its decode too: the chunk runs whole, the decode comes next.
    d = Driver(make(prefill_chunk=8, budget=10, max_num_seqs=3, max_len=128))
    d.add(req("A", 1, max_tokens=6))
    d.add(req("B", 1, max_tokens=30))
    x = d.add(req("X", 17, max_tokens=3))
    out = d.step()
    assert [(ch.request.request_id, ch.start_pos, len(ch.token_ids)) for ch in out.prefills] == \
        [("X", 0, 8)]
    out = d.step()
    assert [(ch.request.request_id, ch.start_pos, len(ch.token_ids)) for ch in out.prefills] == \
        [("X", 8, 8)]
    assert sorted(r.request.request_id for r in out.decodes) == ["A", "B"]
    assert out.num_batched_tokens == 10 and x.num_computed == 16 and not x.output_ids
    out = d.step()
    assert not out.prefills
    assert [(r.request.request_id, r.position) for r in out.decodes] == \
        [("A", 2), ("B", 2), ("X", 16)]
    assert x.output_ids == [model_token("X", 16)]
    d.run()
    assert x.output_ids == expected_tokens("X", 17, 3)


def test_long_prompt_prefills_beside_decodes_that_get_a_token_every_step():
    d = Driver(make(prefill_chunk=4, max_num_seqs=4, max_len=128))      # budget 4 + 4
    decoders = [d.add(req(f"d{i}", 2, max_tokens=40, salt=i)) for i in range(3)]
    d.step()
    d.step()
    long_req = d.add(req("long", 30, max_tokens=3))
    steps_prefilling = 0
    while long_req.is_prefill or long_req.status is RequestStatus.WAITING:
        lens = [len(r.output_ids) for r in decoders]
        out = d.step()
        steps_prefilling += 1
        assert sorted(r.request.request_id for r in out.decodes if r.request is not long_req) \
            == ["d0", "d1", "d2"]
        assert [len(r.output_ids) for r in decoders] == [n + 1 for n in lens]
    assert steps_prefilling == 8           # ceil(29 / 4) chunks, one per step
    d.run()
    assert long_req.output_ids == expected_tokens("long", 30, 3)
    for r in decoders:
        assert r.output_ids == expected_tokens(r.request_id, 2, 40)


@pytest.mark.parametrize("n_prompt,chunks,first_token_step", [
    (1, [], 1),                                 # nothing to prefill: decode at once
    (8, [[(0, 7)]], 1),
    (9, [[(0, 8)]], 1),                         # the chunk ends on the last prompt token
    (10, [[(0, 8)], [(8, 1)]], 2),
    (17, [[(0, 8)], [(8, 8)]], 2),
    (20, [[(0, 8)], [(8, 8)], [(16, 3)]], 3),
])
def test_last_prompt_token_is_decoded_in_the_step_the_prefill_completes(n_prompt, chunks,
                                                                         first_token_step):
    d = Driver(make(prefill_chunk=8, max_len=64))
    r = d.add(req("r", n_prompt, max_tokens=2))
    got, step = [], 0
    while not r.output_ids:
        out = d.step()
        step += 1
        got.append([(ch.start_pos, len(ch.token_ids)) for ch in out.prefills])
        assert [row.position for row in out.decodes] == ([n_prompt - 1] if r.output_ids else [])
    assert step == first_token_step
    assert [g for g in got if g] == chunks
    assert r.output_ids == [model_token("r", n_prompt - 1)]
    d.run()


def test_budget_equal_to_the_chunk_does_not_livelock():
    """max_num_batched_tokens == prefill_chunk is accepted by the config, but a chunk that ends on
    the last prompt token also carries that token's decode (chunk + 1 tokens), so it can never
    fit: the request waits forever (and, once running, holds its blocks forever)."""
    try:
        s = make(prefill_chunk=8, budget=8)
    except ValueError:
        return       # refused up front: also fine
    d = Driver(s)
    r9 = d.add(req("nine", 9, max_tokens=2))
    r17 = d.add(req("seventeen", 17, max_tokens=2, salt=1))
    d.run(max_steps=50)
    assert r9.output_ids == expected_tokens("nine", 9, 2)
    assert r17.output_ids == expected_tokens("seventeen", 17, 2)


# ============================================================================ preemption

def test_preemption_recomputes_the_newest_and_it_continues_where_it_stopped():
    # 6 blocks of 4: A and B (6-token prompts, 12 tokens each) cannot both reach 17 tokens.
    d = Driver(make(num_blocks=6, block_size=4, prefill_chunk=16, budget=32, max_len=64))
    a = d.add(req("A", 6, max_tokens=12))
    b = d.add(req("B", 6, max_tokens=12, salt=5))
    d.step()
    assert [r.request_id for r in d.s.running] == ["A", "B"]
    c = None
    while True:
        if c is None and d.s.alloc.num_free == 0:
            c = d.add(req("C", 1, max_tokens=3))       # arrives just before the preemption
        out = d.step()
        if out.preempted:
            break
        assert d.steps < 20
    assert out.preempted == ["B"]
    assert [r.request_id for r in d.s.running] == ["A"]
    assert list(d.s.waiting)[:2] == [b, c]              # back at the head, ahead of C
    assert b.num_computed == 0 and b.num_preemptions == 1 and len(b.output_ids) > 0
    assert d.s.stats.preemptions == 1
    kept = list(b.output_ids)
    d.run()
    assert a.output_ids == expected_tokens("A", 6, 12)
    assert b.output_ids[: len(kept)] == kept
    assert b.output_ids == expected_tokens("B", 6, 12)
    assert d.streamed["B"] == b.output_ids           # nothing re-emitted after the recompute
    assert c.output_ids == expected_tokens("C", 1, 3)
    # B's recompute prefilled its prompt and the output it had, then decoded the last token
    recompute = [ch for out in d.history for ch in out.prefills
                 if ch.request is b and ch.start_pos == 0][-1]
    assert recompute.token_ids == (b.prompt_ids + kept)[: len(recompute.token_ids)]
    assert {finish(d, x).finish_reason for x in ("A", "B", "C")} == {"length"}


def test_preemption_takes_the_newest_of_three():
    d = Driver(make(num_blocks=9, block_size=4, prefill_chunk=16, budget=32, max_len=64,
                    watermark=0))
    rs = [d.add(req(f"r{i}", 4, max_tokens=14, salt=i)) for i in range(3)]
    victims = []
    while d.s.has_work:
        out = d.step()
        victims += out.preempted
    assert victims and victims[0] == "r2"
    for r in rs:
        assert r.output_ids == expected_tokens(r.request_id, 4, 14)
    assert rs[0].num_preemptions == 0           # the oldest is never the victim


def test_alone_and_unable_to_grow_finishes_with_length():
    # 3 blocks of 4 = 12 tokens: a 5-token prompt can produce 8 tokens, then it needs a 4th block
    d = Driver(make(num_blocks=3, block_size=4, max_len=100, prefill_chunk=8))
    r = d.add(req("r", 5, max_tokens=50))
    d.run(max_steps=30)
    assert finish(d, "r").finish_reason == "length"
    assert r.output_ids == expected_tokens("r", 5, 8)
    assert d.s.alloc.usage()["blocks_used"] == 0 and not d.s.requests


def test_alone_but_blocked_by_a_session_waits_instead_of_finishing():
    # 6 blocks of 4; a session holds 3. The request fits the arena (14 tokens: 4 blocks) but not
    # beside the session: when it cannot grow it goes back to the queue, keeps its output, is not
    # readmitted until its whole sequence fits, and finishes once the session is freed.
    d = Driver(make(num_blocks=6, block_size=4, max_len=64, prefill_chunk=8))
    d.others = ("session:x",)
    d.s.alloc.ensure("session:x", 12)
    r = d.add(req("r", 5, max_tokens=10))
    while not r.num_preemptions:
        d.step()
        assert "r" not in d.finished and d.steps < 20
    kept = list(r.output_ids)
    assert kept == expected_tokens("r", 5, len(kept)) and len(kept) == 8   # 12 tokens fit
    for _ in range(5):                                 # waits; never readmitted to thrash
        out = d.step()
        assert out.empty and r.status is RequestStatus.WAITING
    assert r.num_preemptions == 1 and r.output_ids == kept
    d.s.alloc.free("session:x")
    d.run()
    assert finish(d, "r").finish_reason == "length"
    assert r.output_ids == expected_tokens("r", 5, 10) and d.streamed["r"] == r.output_ids


# ============================================================================ abort and deadlines

def test_abort_running_and_waiting_frees_blocks_at_once():
    d = Driver(make(num_blocks=8, block_size=4, prefill_chunk=32, budget=40, max_len=64))
    a = d.add(req("A", 20, max_tokens=20))         # 5 blocks
    d.add(req("B", 12, max_tokens=5))              # waits: 3 + watermark > 3 free
    d.step()
    d.step()
    assert [r.request_id for r in d.s.waiting] == ["B"]
    used = d.s.alloc.usage()["blocks_used"]
    assert used == blocks_for(a.num_tokens - 1, 4)      # the KV of every token but the newest
    out = d.s.abort("A")
    assert out.finished and out.finish_reason == "abort" and out.request is a
    assert out.new_token_ids == []                  # everything was already reported
    assert d.s.alloc.usage()["blocks_used"] == 0
    assert "A" not in d.s.requests and not d.s.running
    assert d.s.stats.aborted == 1
    out_b = d.s.abort("B")
    assert out_b.finish_reason == "abort" and not d.s.waiting and not d.s.requests
    assert d.s.abort("B") is None and d.s.abort("nobody") is None
    assert d.s.stats.aborted == 2
    check_state(d.s)
    d.collect([out, out_b])
    assert a.output_ids == expected_tokens("A", 20, 2)


def test_abort_between_schedule_and_update():
    s = make()
    a = Request("A", prompt(3), 10)
    b = Request("B", prompt(4), 10)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert {row.request.request_id for row in out.decodes} == {"A", "B"}
    abort_out = s.abort("A")
    assert abort_out.finish_reason == "abort" and not s.alloc.has(request_owner("A"))
    results = s.update(out, {row.request.request_id: 5 for row in out.decodes})
    assert [r.request.request_id for r in results] == ["B"]
    assert a.output_ids == [] and b.output_ids == [5]
    check_state(s)
    s.add(Request("A", prompt(3), 10))            # the id is free again
    assert s.requests["A"] is not a


def test_expire_aborts_requests_past_their_deadline():
    clock = Clock(100.0)
    d = Driver(make(num_blocks=6, block_size=4, prefill_chunk=32, budget=40, clock=clock))
    d.add(req("A", 12, max_tokens=30, deadline_t=110.0))
    d.add(req("keep", 3, max_tokens=30))
    d.add(req("C", 12, max_tokens=30, deadline_t=105.0))    # waits: no room beside A
    d.step()
    assert [r.request_id for r in d.s.waiting] == ["C"]
    clock.t = 104.9
    assert d.s.expire(clock()) == []
    clock.t = 105.0
    out = d.s.expire(clock())
    assert [(o.request.request_id, o.finish_reason) for o in out] == [("C", "abort")]
    d.collect(out)
    d.step()
    clock.t = 111.0
    out = d.s.expire(clock())
    assert [(o.request.request_id, o.finish_reason) for o in out] == [("A", "abort")]
    d.collect(out)
    assert set(d.s.requests) == {"keep"}
    check_state(d.s)
    assert d.s.alloc.usage()["blocks_used"] == blocks_for(d.reqs["keep"].num_tokens - 1, 4)


# ============================================================================ refusals

def test_waiting_queue_is_bounded_with_a_clear_message():
    s = make(max_waiting=2)
    s.add(req("a", 3))
    s.add(req("b", 3))
    with pytest.raises(Overloaded, match=r"waiting queue is full \(2 requests\)"):
        s.add(req("c", 3))
    assert "c" not in s.requests and len(s.waiting) == 2
    s.schedule()                                  # both admitted: the queue is empty again
    s.add(req("c", 3))
    assert "c" in s.requests


def test_duplicate_request_ids_are_refused_while_live():
    d = Driver(make())
    first = d.add(req("dup", 3, max_tokens=2))
    with pytest.raises(BadRequest, match="already running"):
        d.s.add(req("dup", 5))
    assert d.s.requests["dup"] is first and len(d.s.waiting) == 1
    d.run()
    again = req("dup", 5, max_tokens=1)
    d.s.add(again)
    assert d.s.requests["dup"] is again


def test_prompts_too_long_for_max_len_or_the_arena_are_refused():
    s = make(num_blocks=3, block_size=4, max_len=16)
    with pytest.raises(BadRequest, match="max_len 16"):
        s.add(req("a", 16))
    with pytest.raises(BadRequest, match="non-empty"):
        s.add(Request("e", [], 4))
    s2 = make(num_blocks=3, block_size=4, max_len=64)
    with pytest.raises(BadRequest, match="needs 4 KV blocks; the arena has 3"):
        s2.add(req("big", 13))
    assert not s.requests and not s2.requests and not s2.waiting
    # the longest accepted ones run: one token each, then "length"
    d = Driver(make(num_blocks=8, block_size=4, max_len=16))
    r = d.add(req("fits_len", 15, max_tokens=10))
    d.run()
    assert r.output_ids == expected_tokens("fits_len", 15, 1)
    assert finish(d, "fits_len").finish_reason == "length"
    d2 = Driver(make(num_blocks=3, block_size=4, max_len=64))
    r2 = d2.add(req("fits_arena", 12, max_tokens=10))
    d2.run()
    assert r2.output_ids == expected_tokens("fits_arena", 12, 1)
    assert finish(d2, "fits_arena").finish_reason == "length"


def test_finish_on_stop_token_max_tokens_and_max_len():
    d = Driver(make(max_len=10))
    free = expected_tokens("s", 3, 7)
    stop = free[2]
    first = free.index(stop)
    s_req = d.add(req("s", 3, max_tokens=7, stops={stop, VOCAB + 5}))
    m_req = d.add(req("m", 3, max_tokens=4))
    l_req = d.add(req("l", 4, max_tokens=100))
    d.run()
    assert finish(d, "s").finish_reason == "stop"
    assert s_req.output_ids == free[: first + 1] and s_req.output_ids[-1] == stop
    assert finish(d, "m").finish_reason == "length"
    assert m_req.output_ids == expected_tokens("m", 3, 4)
    assert finish(d, "l").finish_reason == "length"
    assert l_req.output_ids == expected_tokens("l", 4, 6) and l_req.num_tokens == 10
    assert d.s.alloc.usage()["blocks_used"] == 0
    assert d.s.stats.generation_tokens == sum(len(r.output_ids) for r in (s_req, m_req, l_req))


# ============================================================================ randomized

@pytest.mark.parametrize("seed", range(6))
def test_random_arrivals_lengths_and_aborts_keep_every_invariant(seed):
    rng = random.Random(seed)
    num_blocks, bs, max_len = rng.choice([(10, 4), (14, 4), (7, 8)]) + (48,)
    chunk = rng.choice([4, 8, 16])
    max_num_seqs = rng.choice([2, 3, 5])
    d = Driver(make(num_blocks=num_blocks, block_size=bs, max_len=max_len, prefill_chunk=chunk,
                    max_num_seqs=max_num_seqs, budget=chunk + rng.choice([1, max_num_seqs]),
                    watermark=rng.choice([0, 1]), max_waiting=12))
    arena = num_blocks * bs
    aborted, overloaded, n = set(), 0, 0
    for _ in range(120):
        if rng.random() < 0.35:
            rid = f"q{n}"
            n += 1
            plen = rng.randint(1, min(max_len - 1, arena, 30))
            toks = expected_tokens(rid, plen, 30)
            stops = {rng.choice(toks)} if rng.random() < 0.3 else set()
            r = Request(rid, prompt(plen, n), rng.randint(1, 20), stop_token_ids=frozenset(stops))
            try:
                d.add(r)
            except Overloaded:
                overloaded += 1
                assert len(d.s.waiting) >= 12
        if d.s.requests and rng.random() < 0.08:
            rid = rng.choice(sorted(d.s.requests))
            d.collect([d.s.abort(rid)])
            aborted.add(rid)
            check_state(d.s)
        d.step()
    d.run(max_steps=2000)
    assert not d.s.requests and d.s.alloc.usage()["blocks_used"] == 0
    assert set(d.finished) == set(d.reqs), "a request never finished"
    for rid, r in d.reqs.items():
        o = d.finished[rid]
        full = expected_tokens(rid, len(r.prompt_ids), r.max_tokens)
        assert r.output_ids == full[: len(r.output_ids)], f"{rid}: wrong tokens"
        assert d.streamed[rid] == r.output_ids
        if rid in aborted:
            assert o.finish_reason == "abort"
            continue
        stop_at = next((i for i, t in enumerate(full) if t in r.stop_token_ids), None)
        asked = min(r.max_tokens, max_len - len(r.prompt_ids))
        if o.finish_reason == "stop":
            assert stop_at is not None and len(r.output_ids) == stop_at + 1
        else:
            assert o.finish_reason == "length"
            assert stop_at is None or stop_at >= len(r.output_ids)
            # as many as asked, unless the whole arena could not hold it
            assert len(r.output_ids) in (asked, arena - len(r.prompt_ids) + 1)
            assert len(r.output_ids) <= asked
    st = d.s.stats
    assert st.generation_tokens == sum(len(r.output_ids) for r in d.reqs.values())
    assert st.aborted == len(aborted)
