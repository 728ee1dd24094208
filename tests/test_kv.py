"""Paged-KV bookkeeping: core/block_allocator.py (torch-free) and worker/kv_arena.py."""
from __future__ import annotations

import random

import pytest
import torch

from graphserver.errors import BadRequest, EngineError, KVExhausted, UnknownSession
from graphserver.core.block_allocator import BlockAllocator, blocks_for
from graphserver.worker.kv_arena import KVArena


def state(alloc: BlockAllocator) -> tuple:
    """Everything observable, deep-copied: usage and every session's table."""
    tables = {s: list(alloc.table(s)) for s in list(alloc._tables)}
    return alloc.usage(), tables


def assert_invariants(alloc: BlockAllocator) -> None:
    tables = {s: alloc.table(s) for s in list(alloc._tables)}
    owned = [b for t in tables.values() for b in t]
    assert len(owned) == len(set(owned)), "a block is in two tables (or twice in one)"
    assert all(0 <= b < alloc.num_blocks for b in owned)
    u = alloc.usage()
    assert u["blocks_used"] == len(owned)
    assert u["blocks_used"] + u["blocks_free"] == u["blocks_total"] == alloc.num_blocks
    assert u["owners"] == len(tables)
    for t in tables.values():
        assert len(t) <= alloc.max_blocks_per_seq


# ============================================================================ blocks_for

@pytest.mark.parametrize("tokens,bs,expected", [
    (0, 16, 0), (1, 16, 1), (15, 16, 1), (16, 16, 1), (17, 16, 2), (32, 16, 2), (33, 16, 3),
    (1, 1, 1), (7, 1, 7), (10, 3, 4),
])
def test_blocks_for(tokens, bs, expected):
    assert blocks_for(tokens, bs) == expected


@pytest.mark.parametrize("args", [(0, 4, 4), (4, 0, 4), (4, 4, 0), (-1, 4, 4)])
def test_allocator_rejects_nonpositive_sizes(args):
    with pytest.raises(ValueError):
        BlockAllocator(*args)


# ============================================================================ allocate / grow / free

def test_allocate_and_grow_keeps_the_prefix():
    a = BlockAllocator(num_blocks=10, block_size=4, max_blocks_per_seq=5)
    assert a.max_tokens_per_seq == 20
    assert not a.has("s")
    t1 = list(a.ensure("s", 1))
    assert a.has("s") and len(t1) == 1
    assert list(a.ensure("s", 4)) == t1                 # still fits in one block
    t2 = list(a.ensure("s", 5))
    assert len(t2) == 2 and t2[:1] == t1                # grows by appending
    t3 = list(a.ensure("s", 13))
    assert len(t3) == 4 and t3[:2] == t2
    assert list(a.ensure("s", 2)) == t3                 # never shrinks
    assert a.table("s") == t3
    assert a.usage() == {"blocks_total": 10, "blocks_used": 4, "blocks_free": 6,
                         "block_size": 4, "owners": 1, "usage": 0.4}
    assert_invariants(a)


def test_ensure_zero_tokens_creates_empty_session():
    a = BlockAllocator(4, 8, 4)
    assert a.ensure("s", 0) == []
    assert a.has("s") and a.usage()["blocks_used"] == 0 and a.usage()["owners"] == 1
    assert a.free("s") == 0


def test_interleaved_sessions_free_middle_and_reuse():
    a = BlockAllocator(num_blocks=12, block_size=4, max_blocks_per_seq=6)
    a.ensure("a", 4)          # 1 block
    a.ensure("b", 6)          # 2 blocks
    a.ensure("c", 3)          # 1 block
    a.ensure("a", 9)          # a grows to 3 blocks after b and c were made: fragmented
    a.ensure("b", 12)         # b grows to 3
    a.ensure("c", 8)          # c grows to 2
    assert_invariants(a)
    b_blocks = list(a.table("b"))
    a_before, c_before = list(a.table("a")), list(a.table("c"))

    assert a.free("b") == 3
    assert not a.has("b")
    with pytest.raises(UnknownSession):
        a.table("b")
    assert a.usage()["blocks_used"] == 5 and a.usage()["owners"] == 2
    assert a.table("a") == a_before and a.table("c") == c_before   # others untouched

    # The most recently freed blocks are reused first (documented policy), so d gets b's blocks.
    d = list(a.ensure("d", 12))
    assert sorted(d) == sorted(b_blocks)
    assert_invariants(a)


def test_full_arena_new_session_gets_exactly_the_freed_blocks():
    a = BlockAllocator(num_blocks=8, block_size=2, max_blocks_per_seq=8)
    a.ensure("x", 2)
    a.ensure("y", 2)
    a.ensure("x", 6)
    a.ensure("y", 5)
    a.ensure("z", 3)
    a.ensure("y", 6)
    assert a.usage()["blocks_free"] == 0                # arena full: no policy choice left
    y_blocks = set(a.table("y"))
    a.free("y")
    w = a.ensure("w", 6)
    assert set(w) == y_blocks
    assert set(w).isdisjoint(a.table("x")) and set(w).isdisjoint(a.table("z"))
    assert_invariants(a)


def test_free_returns_count_and_session_can_be_recreated():
    a = BlockAllocator(6, 4, 6)
    a.ensure("s", 10)
    assert a.free("s") == 3
    assert a.usage()["blocks_free"] == 6 and a.usage()["owners"] == 0
    assert len(a.ensure("s", 1)) == 1                   # a fresh, one-block table
    assert_invariants(a)


# ============================================================================ errors

def test_exhaustion_raises_and_changes_nothing():
    a = BlockAllocator(num_blocks=6, block_size=4, max_blocks_per_seq=6)
    a.ensure("a", 8)                                    # 2 blocks
    a.ensure("b", 9)                                    # 3 blocks -> 1 free
    before = state(a)

    with pytest.raises(KVExhausted) as ei:              # grow an existing session by 2 > 1 free
        a.ensure("a", 16)
    msg = str(ei.value)
    assert "exhausted" in msg.lower()
    assert "'a'" in msg and "2 more blocks" in msg and "1 are free" in msg and "6" in msg
    assert isinstance(ei.value, EngineError)
    assert state(a) == before

    with pytest.raises(KVExhausted):                    # a new session that does not fit
        a.ensure("new", 9)
    assert not a.has("new")
    assert state(a) == before

    # What does fit still works afterwards, and takes the last block.
    a.ensure("a", 12)
    assert a.usage()["blocks_free"] == 0
    with pytest.raises(KVExhausted):
        a.ensure("c", 1)
    assert not a.has("c")
    assert_invariants(a)


def test_per_sequence_limit_is_bad_request_and_changes_nothing():
    a = BlockAllocator(num_blocks=20, block_size=4, max_blocks_per_seq=3)
    a.ensure("s", 5)
    before = state(a)
    with pytest.raises(BadRequest) as ei:
        a.ensure("s", 13)                                # limit is 12 tokens
    assert "13" in str(ei.value) and "12" in str(ei.value)
    assert not isinstance(ei.value, KVExhausted)
    assert state(a) == before
    with pytest.raises(BadRequest):
        a.ensure("t", 1000)                             # new session over the limit
    assert not a.has("t")
    assert state(a) == before
    assert len(a.ensure("s", 12)) == 3                   # exactly the limit is fine


def test_unknown_session():
    a = BlockAllocator(4, 4, 4)
    with pytest.raises(UnknownSession):
        a.table("ghost")
    with pytest.raises(UnknownSession):
        a.free("ghost")
    a.ensure("s", 3)
    a.free("s")
    with pytest.raises(UnknownSession) as ei:
        a.free("s")                                     # double free
    assert "'s'" in str(ei.value)
    assert a.usage()["blocks_free"] == 4                # the double free returned nothing twice


# ============================================================================ randomized property

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_ops_keep_invariants(seed):
    rng = random.Random(seed)
    nb, bs, mb = 23, 3, 7
    a = BlockAllocator(nb, bs, mb)
    model: dict[str, int] = {}           # session -> the most tokens it was ensured for
    history: dict[str, list[int]] = {}   # session -> its table as last seen
    sessions = [f"s{i}" for i in range(6)]
    outcomes = {"ok": 0, "exhausted": 0, "bad": 0, "unknown": 0, "freed": 0}
    for _ in range(600):
        s = rng.choice(sessions)
        if rng.random() < 0.7:
            n = rng.randint(0, mb * bs + 2)
            before = state(a)
            want_blocks = blocks_for(max(n, model.get(s, 0)), bs)
            have = len(history.get(s, []))
            try:
                t = list(a.ensure(s, n))
            except BadRequest:
                assert n > mb * bs
                assert state(a) == before
                outcomes["bad"] += 1
            except KVExhausted:
                assert want_blocks - have > before[0]["blocks_free"]
                assert state(a) == before
                outcomes["exhausted"] += 1
            else:
                assert n <= mb * bs
                assert len(t) == want_blocks
                assert t[:have] == history.get(s, [])    # a table only ever grows at the end
                model[s] = max(n, model.get(s, 0))
                history[s] = t
                outcomes["ok"] += 1
        else:
            if s in model:
                assert a.free(s) == len(history[s])
                del model[s], history[s]
                outcomes["freed"] += 1
            else:
                with pytest.raises(UnknownSession):
                    a.free(s)
                outcomes["unknown"] += 1
        assert_invariants(a)
        assert {x: list(a.table(x)) for x in model} == history
        assert a.usage()["blocks_used"] == sum(len(t) for t in history.values())
    assert all(v > 0 for v in outcomes.values()), outcomes   # every path was exercised


# ============================================================================ KVArena

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_arena_shapes_and_views(dtype):
    L, NB, BS, nkv, D = 3, 5, 4, 2, 6
    arena = KVArena.allocate(L, NB, BS, nkv, D, dtype, "cpu")
    assert arena.data.shape == (L, 2, NB, BS, nkv, D)
    assert arena.data.dtype == dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert arena.nbytes == L * 2 * NB * BS * nkv * D * itemsize
    per = NB * BS * nkv * D
    base = arena.data.data_ptr()
    storage = arena.data.untyped_storage().data_ptr()
    for layer in range(L):
        k, v = arena.k(layer), arena.v(layer)
        assert k.shape == v.shape == (NB, BS, nkv, D)
        assert k.is_contiguous() and v.is_contiguous()
        assert k.untyped_storage().data_ptr() == storage == v.untyped_storage().data_ptr()
        assert k.data_ptr() == base + (2 * layer) * per * itemsize
        assert v.data_ptr() == base + (2 * layer + 1) * per * itemsize


def test_kv_arena_views_alias_one_storage():
    L, NB, BS, nkv, D = 2, 3, 2, 1, 4
    arena = KVArena.allocate(L, NB, BS, nkv, D, torch.float32, "cpu")
    arena.data.fill_(-1.0)
    arena.k(1)[2, 1, 0, 3] = 5.0
    arena.v(0)[0, 0, 0, 0] = 7.0
    assert arena.data[1, 0, 2, 1, 0, 3] == 5.0
    assert arena.data[0, 1, 0, 0, 0, 0] == 7.0
    # Exactly those two elements changed: views do not overlap each other.
    assert int((arena.data != -1.0).sum()) == 2
    arena.data[0, 0, 1, 1, 0, 2] = 9.0
    assert arena.k(0)[1, 1, 0, 2] == 9.0
    assert int((arena.k(1) != -1.0).sum()) == 1 and int((arena.v(1) != -1.0).sum()) == 0
