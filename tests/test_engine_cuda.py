"""The GPU decode step, graphs and engine (run with `pytest -m cuda` on the GPU machine)."""
import warnings

import pytest
import torch

from custom_kernels import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and ops.cuda_kernels_available()),
                       reason="needs a CUDA GPU and the compiled kernels"),
]


def _engine(model="random:smollm2-135m", **kw):
    from graphserver.engine import Engine
    kw.setdefault("max_len", 1024)
    return Engine(model=model, device="cuda", log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def eng():
    e = _engine()
    yield e
    e.close()


def _prompt(n, vocab, salt=0):
    return [(7919 * i + 31 * salt + 5) % (vocab - 1) + 1 for i in range(n)]


def _eager_tokens(e, ids, steps, sampling=None):
    """Reference run: graphs off (the manager is stopped and empty), every step eager."""
    e.graphs.stop()
    e.graphs.clear()
    e.kv_init("eager", ids)
    res = e.replay_seq("eager", steps, sampling=sampling or {"greedy": True})
    e.kv_free("eager")
    assert res["eager_steps"] == steps - 1
    return res["tokens"]


def test_replay_equals_eager_step_by_step(eng):
    ids = _prompt(21, eng.cfg.vocab_size)
    want = _eager_tokens(eng, ids, 48)
    eng.graphs.clear()
    # capture every needed length first, then replay: every step must be a graph replay
    for t in range(len(ids) + 1, len(ids) + 48):
        eng.graphs.capture_now(eng.graphs.key_for(t))
    eng.kv_init("g", ids)
    res = eng.replay_seq("g", 48, sampling={"greedy": True})
    eng.kv_free("g")
    assert res["eager_steps"] == 0 and res["fallbacks"] == 0
    assert res["tokens"] == want


def test_replay_logits_equal_eager_logits(eng):
    """Beyond tokens: the logits buffer after one replayed step equals the eager step's, bit for
    bit (same kernels, same launch configuration)."""
    ids = _prompt(33, eng.cfg.vocab_size, salt=3)
    r, io = eng.runner, eng.runner.io
    table = eng.alloc.ensure("l", len(ids) + 1)
    with torch.cuda.stream(eng.core.replay_stream):
        r.prefill(ids, table)
        r.load_session(table, len(ids), 17)
        r.set_sampling(0.0, 0, 1.0, 0)
        r.decode_step(attn_max_len=len(ids) + 1)
        eager = io.logits.clone()
        key = eng.graphs.key_for(len(ids) + 1)
    eng.graphs.capture_now(key)
    graph = eng.graphs.acquire(key, 0)
    with torch.cuda.stream(eng.core.replay_stream):
        io.logits.fill_(float("nan"))
        r.load_session(table, len(ids), 17)
        graph.replay()
    eng.graphs.unpin(key)
    torch.cuda.synchronize()
    eng.alloc.free("l")
    assert torch.equal(io.logits, eager)


def test_shared_executable_serves_the_next_length_exactly(eng):
    """Keys with the same launch signature share one executable; replaying it at the second
    length gives the eager step's logits at that length, bit for bit."""
    ids = _prompt(70, eng.cfg.vocab_size, salt=4)
    r, io = eng.runner, eng.runner.io
    t1, t2 = len(ids) + 1, len(ids) + 2
    assert r.step_signature(t1) == r.step_signature(t2)
    eng.graphs.clear()
    eng.graphs.capture_now(t1)
    eng.graphs.capture_now(t2)
    snap = eng.graphs.snapshot()
    assert snap["shared"] >= 1
    table = eng.alloc.ensure("sh", t2)
    with torch.cuda.stream(eng.core.replay_stream):
        r.prefill(ids + [9], table)            # cache holds t1 tokens; the step runs at t2
        r.load_session(table, t1, 23)
        r.set_sampling(0.0, 0, 1.0, 0)
        r.decode_step(attn_max_len=t2)
        eager = io.logits.clone()
        r.load_session(table, t1, 23)
        io.logits.fill_(float("nan"))
    g = eng.graphs.acquire(t2, 0)
    with torch.cuda.stream(eng.core.replay_stream):
        g.replay()
    eng.graphs.unpin(t2)
    torch.cuda.synchronize()
    eng.alloc.free("sh")
    assert g.shared and torch.equal(io.logits, eager)


@pytest.mark.parametrize("bucket", [1, 16])
def test_concurrent_capture_equals_precaptured(bucket):
    e = _engine(graph_bucket=bucket)
    try:
        ids = _prompt(40, e.cfg.vocab_size, salt=bucket)
        want = _eager_tokens(e, ids, 200)
        # concurrent: background capture starts right after kv_init, replay runs meanwhile
        e.kv_init("c", ids)
        e.bg_capture_start(ahead=8, behind=2)
        res = e.replay_seq("c", 200, sampling={"greedy": True})
        e.kv_free("c")
        snap = e.graphs.snapshot()
        assert res["tokens"] == want
        assert res["eager_steps"] + snap["replays"] >= 199
        assert res["eager_steps"] == res["fallbacks"]
        print(f"bucket {bucket}: stalls {res['stalls']} fallbacks {res['fallbacks']} "
              f"captured {snap['captured']} capture p50 {snap['capture_ms_p50']} ms")
    finally:
        e.close()


def test_500_token_run_reports_stalls_and_fallbacks():
    e = _engine()
    try:
        ids = _prompt(16, e.cfg.vocab_size, salt=9)
        e.kv_init("r", ids)
        e.bg_capture_start(ahead=8, behind=2)
        res = e.replay_seq("r", 500, sampling={"greedy": True})
        snap = e.status()["graphs"]
        e.kv_free("r")
        assert len(res["tokens"]) == 500
        assert isinstance(res["stalls"], int) and isinstance(res["fallbacks"], int)
        assert res["stalls"] == snap["stalls"] and snap["replays"] + res["fallbacks"] == 499
        print(f"500-token run: stalls {res['stalls']} ({snap['stall_ms']} ms), fallbacks "
              f"{res['fallbacks']}, captured {snap['captured']}, capture p50 "
              f"{snap['capture_ms_p50']} ms, {res['timing']['ms_per_token']} ms/token")
    finally:
        e.close()


def test_sampled_replay_equals_sampled_eager(eng):
    samp = {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 77}
    ids = _prompt(19, eng.cfg.vocab_size, salt=5)
    want = _eager_tokens(eng, ids, 64, samp)
    for t in range(len(ids) + 1, len(ids) + 64):
        eng.graphs.capture_now(eng.graphs.key_for(t))
    eng.kv_init("s", ids)
    got = eng.replay_seq("s", 64, sampling=samp)["tokens"]
    eng.kv_free("s")
    assert got == want


def test_no_allocations_across_100_steps(eng):
    """The allocator counters do not move across 100 eager decode steps nor across replays."""
    ids = _prompt(10, eng.cfg.vocab_size, salt=11)
    r = eng.runner
    table = eng.alloc.ensure("m", len(ids) + 120)
    with torch.cuda.stream(eng.core.replay_stream):
        r.prefill(ids, table)
        r.load_session(table, len(ids), 3)
        r.set_sampling(0.0, 0, 1.0, 0)
        r.decode_step(attn_max_len=len(ids) + 1)       # warm-up (first-use work, if any)
    torch.cuda.synchronize()
    keys = ("allocation.all.allocated", "segment.all.allocated", "allocated_bytes.all.allocated")
    before = {k: torch.cuda.memory_stats()[k] for k in keys}
    with torch.cuda.stream(eng.core.replay_stream):
        for i in range(100):
            r.decode_step(attn_max_len=len(ids) + 2 + i)
    torch.cuda.synchronize()
    after = {k: torch.cuda.memory_stats()[k] for k in keys}
    assert after == before
    key = eng.graphs.key_for(len(ids) + 110)
    eng.graphs.capture_now(key)
    g = eng.graphs.acquire(key, 0)
    torch.cuda.synchronize()
    before = {k: torch.cuda.memory_stats()[k] for k in keys}
    with torch.cuda.stream(eng.core.replay_stream):
        for _ in range(10):
            g.replay()
    torch.cuda.synchronize()
    eng.graphs.unpin(key)
    assert {k: torch.cuda.memory_stats()[k] for k in keys} == before
    eng.alloc.free("m")


def _margin(logits: torch.Tensor, a: int, b: int) -> float:
    return float(logits[a].float() - logits[b].float())


def test_default_model_200_greedy_tokens_match_hf(default_model_dir):
    """200 greedy tokens from the default model on the GPU equal HF's on the GPU in bf16. A flip
    at a near-tie is reported with both margins (as a warning, visible in the summary) and is
    only accepted when HF itself scores the two tokens within 2 bf16 steps of each other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir, local_files_only=True)
    msgs = [{"role": "user", "content": "Explain how a steam engine works, step by step."}]
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                       return_dict=False))
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16,
                                              local_files_only=True).cuda().eval()
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=200,
                          min_new_tokens=200, do_sample=False, top_p=None, top_k=None,
                          temperature=None)
    want = out[0, len(ids):].tolist()
    e = _engine(model=str(default_model_dir), dtype="bf16")
    try:
        e.kv_init("d", ids)
        e.bg_capture_start(ahead=8, behind=2)
        got = e.replay_seq("d", 200, sampling={"greedy": True})["tokens"]
    finally:
        e.close()
    if got == want:
        return
    i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids + want[:i]], device="cuda")).logits[0, -1]
    ours_tok, hf_tok = got[i], want[i]
    hf_margin = _margin(hf_logits, hf_tok, ours_tok)
    step = 2.0 ** (torch.floor(torch.log2(hf_logits.float().abs().max())) - 7)  # bf16 ulp
    msg = (f"first divergence at token {i}: ours {ours_tok} hf {hf_tok}; HF's logit margin "
           f"between them {hf_margin:.4f} (bf16 step {float(step):.4f})")
    warnings.warn(msg)
    print(msg)
    assert hf_margin <= 2 * float(step), "diverged at a token HF does not see as a near-tie: " + msg
