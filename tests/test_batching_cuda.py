"""The batched engine on the GPU: batch invariance (bitwise), batched graph replay equal to eager,
graphs captured while serving, no allocations across batched steps. Marked cuda."""
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _engine(**kw):
    from graphserver.engine import Engine
    from custom_kernels import ops
    if not ops.cuda_kernels_available():
        pytest.skip("needs the compiled kernels")
    base = dict(model="random:smollm2-135m", device="cuda", dtype="bf16", max_len=512,
                kv_blocks=64 * 20 + 8, block_size=16, max_num_seqs=64, prefill_chunk=128,
                batch_invariant=True, log=lambda m: None)
    base.update(kw)
    return Engine(**base)


def _prompts(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    # lengths 3..150: crossing block boundaries (16) and prefill chunks (128)
    return [torch.randint(1, vocab, (int(torch.randint(3, 150, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def _serve(eng, prompts, new, sampling=None):
    """Submit every prompt at once, step until all finish; request index -> tokens."""
    got = {i: [] for i in range(len(prompts))}

    def replier(i):
        def reply(result, more=False):
            got[i].extend(result["tokens"])
        return reply

    for i, p in enumerate(prompts):
        eng.generate(replier(i), f"r{i}-{id(got)}", p, max_tokens=new,
                     sampling=sampling or {"greedy": True}, ignore_eos=True)
    while eng.has_work:
        eng.run_step()
    return got


@pytest.fixture(scope="module")
def eng():
    e = _engine()
    yield e
    e.close()


def _warm(eng, rows, lengths):
    mgr = eng.core.batch_graphs
    keys = sorted({mgr.key_for(rows, L) for L in lengths})
    assert mgr.wait_ready(keys, 120.0), mgr.snapshot()


@pytest.mark.parametrize("sampling", [{"greedy": True},
                                      {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "seed": 7}])
def test_batch_invariance_bitwise_at_64(eng, sampling):
    prompts = _prompts(64, eng.cfg.vocab_size, seed=1)
    batched = _serve(eng, prompts, 24, sampling)
    alone = {}
    for i in range(0, 64, 7):       # a sample of them, each alone (B = 1)
        alone[i] = _serve(eng, [prompts[i]], 24, sampling)[0]
    for i, toks in alone.items():
        assert batched[i] == toks, f"request {i}: batched differs from alone"
    assert all(len(t) == 24 for t in batched.values())


def test_batched_graph_replay_equals_eager(eng):
    prompts = _prompts(17, eng.cfg.vocab_size, seed=2)
    eager = _engine(batch_graphs=False)
    try:
        want = _serve(eager, prompts, 32)
        assert eager.status()["batch_graphs"] is None
    finally:
        eager.close()
    _warm(eng, 17, range(3, 200, 16))
    before = eng.status()["batch_graphs"]["replays"]
    got = _serve(eng, prompts, 32)
    after = eng.status()["batch_graphs"]
    assert after["replays"] > before, after
    assert got == want


def test_graphs_are_captured_while_serving():
    e = _engine(max_num_seqs=16)
    try:
        assert e.status()["batch_graphs"]["running"]
        first = e.status()["batch_graphs"]
        got = _serve(e, _prompts(12, e.cfg.vocab_size, seed=3), 96)
        st = e.status()["batch_graphs"]
        assert st["new_captures"] > first["new_captures"], st
        assert st["replays"] > 0 and st["eager_steps"] > 0, st   # served before every graph existed
        assert all(len(t) == 96 for t in got.values())
    finally:
        e.close()


def test_no_allocation_across_batched_steps(eng):
    prompts = _prompts(9, eng.cfg.vocab_size, seed=4)
    _warm(eng, 9, range(3, 300, 16))
    got = {i: [] for i in range(9)}
    for i, p in enumerate(prompts):
        eng.generate(lambda r, more=False, i=i: got[i].extend(r["tokens"]), f"alloc{i}", p,
                     max_tokens=64, sampling={"greedy": True}, ignore_eos=True)
    sched = eng.core.scheduler
    while any(r.is_prefill for r in sched.running) or sched.waiting:
        eng.run_step()
    for _ in range(3):
        eng.run_step()
    eng.core.replay_stream.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(20):
        eng.run_step()
    eng.core.replay_stream.synchronize()
    assert torch.cuda.memory_allocated() == before
    while eng.has_work:
        eng.run_step()
