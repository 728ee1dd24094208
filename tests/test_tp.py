"""Tensor parallelism on the CPU (gloo): the shard rules of the loader, the refusals of a TP size
the model does not divide by, and greedy tokens through the real server and client at TP=N equal
to an in-process TP=1 engine (fp32), for the session RPCs and for batched `generate`; and hot
reload, where every rank stages and copies its own shard.

random:tiny (4 query / 2 kv heads) is the TP=2 model: random:tiny-hd128 has one kv head, which
cannot be split. The default model (SmolLM2-135M, 9 / 3 heads) runs at TP=3.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest
import torch

from custom_kernels.weights import Shard, load_weights, shard_config, shard_divisibility_problem
from graphserver.config import ModelConfig, random_shape_config

STEPS = 64
PROMPTS = ([5, 7, 11, 3, 9, 2], [17, 4, 8], [30, 1, 12, 6, 6, 14, 21, 2, 9, 10, 3])
CPU_FP32 = ["--device", "cpu", "--dtype", "fp32", "--max-len", "256"]


# ----------------------------------------------------------------------------- shard rules

def _check_shards(full, parts, cfg) -> None:
    """Every rank's views are exactly its slices of the full model's (reassembled = full)."""
    n = len(parts)
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qs, ks, is_ = q // n, kv // n, inter // n
    for i, f in enumerate(full.layers):
        p = [w.layers[i] for w in parts]
        assert torch.equal(torch.cat([x.wqkv[:qs] for x in p]), f.wqkv[:q])             # q heads
        assert torch.equal(torch.cat([x.wqkv[qs:qs + ks] for x in p]), f.wqkv[q:q + kv])
        assert torch.equal(torch.cat([x.wqkv[qs + ks:] for x in p]), f.wqkv[q + kv:])
        assert torch.equal(torch.cat([x.w13[:is_] for x in p]), f.w13[:inter])         # gate
        assert torch.equal(torch.cat([x.w13[is_:] for x in p]), f.w13[inter:])         # up
        assert torch.equal(torch.cat([x.wo for x in p], dim=1), f.wo)
        assert torch.equal(torch.cat([x.w2 for x in p], dim=1), f.w2)
        for x in p:
            assert torch.equal(x.ln1, f.ln1) and torch.equal(x.ln2, f.ln2)
    for w in parts:
        assert torch.equal(w.embed, full.embed) and torch.equal(w.norm, full.norm)
        assert torch.equal(w.lm_head, full.lm_head)
        assert w.nbytes < full.nbytes


def test_random_shards_slice_the_same_full_weights():
    from graphserver.prepare import resolve_model

    src = resolve_model("random:tiny")
    cfg = src.config
    full = load_weights(src, cfg, "cpu", torch.float32, seed=7)
    parts = [load_weights(src, cfg, "cpu", torch.float32, seed=7, shard=Shard(r, 2))
             for r in range(2)]
    _check_shards(full, parts, cfg)
    other = load_weights(src, cfg, "cpu", torch.float32, seed=8, shard=Shard(0, 2))
    assert not torch.equal(other.layers[0].wqkv, parts[0].layers[0].wqkv)   # the seed matters


def test_checkpoint_shards_slice_the_checkpoint(default_model_dir):
    from graphserver.prepare import resolve_model

    src = resolve_model(str(default_model_dir))
    cfg = src.config
    full = load_weights(src, cfg, "cpu", torch.float32)
    parts = [load_weights(src, cfg, "cpu", torch.float32, shard=Shard(r, 3)) for r in range(3)]
    _check_shards(full, parts, cfg)
    local = shard_config(cfg, 3)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (3, 1, 512)
    assert parts[0].layers[0].wqkv.shape == (local.qkv_size, cfg.hidden_size)


def test_divisibility_names_the_counts():
    cfg = ModelConfig.from_hf(random_shape_config("smollm2-135m"))
    assert shard_divisibility_problem(cfg, 3) is None
    assert shard_divisibility_problem(cfg, 2) == (
        "num_attention_heads 9 and num_key_value_heads 3 must both divide by 2")
    odd = dataclasses.replace(cfg, intermediate_size=1537)
    assert shard_divisibility_problem(odd, 3) == "intermediate_size 1537 must divide by 3"
    with pytest.raises(ValueError, match="must both divide by 2"):
        shard_config(cfg, 2)


# ----------------------------------------------------------------------------- the CLI refuses

@pytest.mark.parametrize("model, tp, message", [
    (None, 2, "--tp 2: num_attention_heads 9 and num_key_value_heads 3 must both divide by 2"),
    ("random:tiny", 3, "--tp 3: num_attention_heads 4 and num_key_value_heads 2 must both "
                       "divide by 3"),
])
def test_bad_tp_size_is_one_line_exit_2(model, tp, message):
    argv = [sys.executable, "-m", "graphserver", "--device", "cpu", "--tp", str(tp)]
    if model:
        argv += ["--model", model]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert lines == [f"python -m graphserver: error: {message}"], proc.stderr


def test_tp_zero_is_refused_by_the_parser():
    proc = subprocess.run([sys.executable, "-m", "graphserver", "--tp", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--tp" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- TP=N == TP=1

def _reference(model: str) -> dict:
    """Greedy tokens of an in-process TP=1 engine: the session replay and each generate."""
    from graphserver.engine import Engine

    eng = Engine(model, device="cpu", dtype="fp32", max_len=256)
    try:
        eng.kv_init("s", list(PROMPTS[0]))
        replay = eng.replay_seq("s", STEPS)["tokens"]
        logits = torch.as_tensor(eng.step("s", replay[-1])["logits"])
        return {"replay": replay, "generate": _generate_all(eng), "logits": logits}
    finally:
        eng.close()


def _generate_all(eng) -> list[list[int]]:
    """Every prompt through an in-process engine's batched generate, submitted at once."""
    got: dict[str, list[int]] = {}

    def collector(rid):
        def reply(result, more=False):
            got.setdefault(rid, []).extend(result["tokens"])
        return reply

    for i, p in enumerate(PROMPTS):
        eng.generate(collector(f"r{i}"), f"r{i}", list(p), max_tokens=STEPS, ignore_eos=True)
    n = 0
    while eng.has_work:
        eng.run_step()
        n += 1
        assert n < 10 * STEPS
    return [got[f"r{i}"] for i in range(len(PROMPTS))]


def _through_server(model: str, tp: int) -> dict:
    from client.rpc import ServerProcess

    with ServerProcess(model=model, extra_args=CPU_FP32 + ["--tp", str(tp)],
                       spawn_timeout_s=300, call_timeout_s=300) as client:
        info = client.call("hello")
        assert info["tp"] == tp and info["capabilities"]["reload"] is True
        client.kv_init("s", list(PROMPTS[0]))
        replay = client.replay_seq("s", STEPS)["tokens"]
        logits = client.step("s", replay[-1])["logits"]        # the eager step's full logits
        streams = [client.generate(list(p), max_tokens=STEPS, ignore_eos=True,
                                   request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
        gen = []
        for st in streams:      # all three were queued before any was read: they run batched
            toks = []
            for result in st:
                toks += result["tokens"]
            gen.append(toks)
    return {"replay": replay, "generate": gen, "logits": torch.as_tensor(logits)}


def _assert_same(got: dict, want: dict) -> None:
    assert len(want["replay"]) == STEPS and all(len(t) == STEPS for t in want["generate"])
    assert got["replay"] == want["replay"]
    # Same model, other summation order (partial sums all-reduced): close, not bit-equal.
    assert got["logits"].shape == want["logits"].shape
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-4)
    for i, (g, w) in enumerate(zip(got["generate"], want["generate"])):
        diverge = next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), None)
        assert g == w, f"generate {i}: first divergence at token {diverge}"


def test_tp2_random_tiny_equals_tp1_through_the_server():
    _assert_same(_through_server("random:tiny", 2), _reference("random:tiny"))


@pytest.mark.slow
def test_tp3_default_model_equals_tp1_through_the_server(default_model_dir):
    model = str(default_model_dir)
    _assert_same(_through_server(model, 3), _reference(model))


# ----------------------------------------------------------------------------- graphs

def test_tp2_graphs_are_captured_replayed_and_released_on_every_rank():
    """Rank 0's two graph managers over TPCapturer, with the CPU's stand-in capturer (replay runs
    the step): the workers capture, replay and release the same serials, so the tokens equal
    TP=1's. A replay a worker missed would leave rank 0 alone in an all-reduce; one it ran out of
    order would pair the wrong steps and change the tokens. Small windows make evictions (releases
    racing replays) happen throughout."""
    from graphserver.engine import Engine
    from graphserver.worker.executor import Executor
    from graphserver.worker.graphs import BatchGraphManager, GraphManager
    from graphserver.worker.graphs.cuda import step_of
    from graphserver.worker.tp_graphs import EagerCapturer, TPCapturer

    want = _reference("random:tiny")
    eng = Engine("random:tiny", device="cpu", dtype="fp32", max_len=256, tp=2)
    core, sessions = eng.core, eng.sessions_api
    try:
        local = core.runner.local

        def capturer(kind):
            return TPCapturer(EagerCapturer(step_of(local, kind)), core.tp_group, kind)

        sessions.graphs = GraphManager(capturer("seq"), core.max_len, log=core.log)
        core.batch_graphs = BatchGraphManager(capturer("batch"), [1, 2, 4], core.max_len,
                                              len_quantum=16, max_graphs=3, log=core.log)
        core.executor = Executor(core.runner, core.batch_graphs, core.tracer)
        core.batch_graphs.start()
        eng.kv_init("s", list(PROMPTS[0]))
        eng.bg_capture_start(ahead=4, behind=1)
        r = eng.replay_seq("s", STEPS)
        assert r["tokens"] == want["replay"]
        assert r["graphs"] and r["eager_steps"] < STEPS // 2, r
        snap = sessions.graphs.snapshot()
        assert snap["evicted"] > 0, snap
        assert _generate_all(eng) == want["generate"]
        assert core.executor.eager_steps < STEPS and core.batch_graphs.captured > 3   # replays, evictions
    finally:
        eng.close()


def test_rank0_sends_only_graphs_it_made():
    from graphserver.worker.tp_graphs import TPCapturer

    class Group:
        def __init__(self):
            self.sent = []

        def send(self, target, method, args, kwargs):
            self.sent.append((method, args))

    class Local:
        def __init__(self):
            self.shareable = set()

        def capture(self, key):
            if key == 13:
                raise RuntimeError("capture failed")
            return ("graph", key)

        def try_share(self, key):
            return ("shared", key) if key in self.shareable else None

        def release(self, handle):
            pass

    group, local = Group(), Local()
    cap = TPCapturer(local, group, "seq")
    assert cap.try_share(5) is None and group.sent == []        # a lookup that finds nothing
    h = cap.capture(5)
    local.shareable.add(6)
    s = cap.try_share(6)
    with pytest.raises(RuntimeError):
        cap.capture(13)
    cap.release(h)
    assert group.sent == [("capture", ("seq", 1, 5)), ("capture", ("seq", 2, 6)),
                          ("capture", ("seq", 3, 13)), ("release", (3,)), ("release", (1,))]
    assert s.serial == 2 and s.inner == ("shared", 6)


def test_a_worker_whose_capture_failed_runs_that_step_eagerly():
    from types import SimpleNamespace

    from graphserver.worker.tp_graphs import EagerCapturer, WorkerGraphs

    ran, logs = [], []
    runner = SimpleNamespace(decode_step=lambda attn_max_len: ran.append(("eager", attn_max_len)),
                             decode_batch=lambda b, n: ran.append(("eager", (b, n))))
    graphs = WorkerGraphs(runner, torch.device("cpu"), log=logs.append)

    class Failing(EagerCapturer):
        def capture(self, key):
            if key == 9:
                raise RuntimeError("capture failed")
            return super().capture(key)

    graphs.capturers["seq"] = Failing(lambda key: ran.append(("graph", key)))
    try:
        graphs.capture("seq", 1, 8)
        graphs.capture("seq", 2, 9)
        graphs.capture("batch", 3, (4, 64))
        for serial in (1, 2, 3, 2):
            graphs.replay(serial)
        for serial in (1, 2, 3):
            graphs.release(serial)
        # The same all-reduces in the same order either way: the failed key ran its eager step.
        assert ran == [("graph", 8), ("eager", 9), ("eager", (4, 64)), ("eager", 9)]
        assert len(logs) == 1 and "seq 9" in logs[0] and "capture failed" in logs[0]
        with pytest.raises(KeyError):
            graphs.replay(1)            # released
    finally:
        graphs.close()


# ----------------------------------------------------------------------------- reload

RELOAD_STEPS = 16


def _greedy(client_or_engine) -> list[int]:
    client_or_engine.kv_init("g", list(PROMPTS[2]))
    try:
        return client_or_engine.replay_seq("g", RELOAD_STEPS)["tokens"]
    finally:
        client_or_engine.kv_free("g")


def test_a_worker_stages_its_own_shard_and_reports_what_failed(default_model_dir, tmp_path):
    from types import SimpleNamespace

    from checkpoints import perturbed_copy
    from graphserver.prepare import resolve_model
    from graphserver.worker.tp import _StagedReload

    source = resolve_model(str(default_model_dir))
    shard = Shard(2, 3)
    runner = SimpleNamespace(w=load_weights(source, source.config, "cpu", torch.float32, shard=shard))
    before = runner.w.arena.clone()
    staged = _StagedReload(SimpleNamespace(source=source, dtype=torch.float32, world=3), rank=2)
    assert staged.check(runner) == ("staged", "nothing was staged")
    staged.stage(runner, str(tmp_path / "missing"))
    status, error = staged.check(runner)
    assert status == "staged" and "is not a directory" in error
    staged.drop(runner)
    ckpt = perturbed_copy(default_model_dir, tmp_path / "b")
    staged.stage(runner, str(ckpt))
    assert staged.check(runner) == ("staged", None)
    assert torch.equal(runner.w.arena, before)          # nothing copied before the commit
    staged.commit(runner)
    want = load_weights(str(ckpt), source.config, "cpu", torch.float32, shard=shard)
    assert torch.equal(runner.w.arena, want.arena) and not torch.equal(runner.w.arena, before)
    assert staged.check(runner) == ("staged", "nothing was staged")     # the commit let it go


class _Group:
    """A TP group stand-in for rank 0's side of a reload: records the calls, fails on request."""

    def __init__(self, problems=()):
        self.calls, self.problems = [], list(problems)

    def reload_stage(self, path):
        self.calls.append("stage")

    def reload_check(self):
        self.calls.append("check")
        return self.problems

    def reload_commit(self):
        self.calls.append("commit")

    def reload_drop(self):
        self.calls.append("drop")

    def close(self):
        pass


def _reload(eng, path: str, version: str):
    got = []
    eng.reload(lambda r: got.append(("ok", r)), lambda e: got.append(("error", e)), path, version)
    deadline = time.monotonic() + 120
    while not got:          # staging runs on a thread: step until the loop has replied
        assert time.monotonic() < deadline, "the reload never replied"
        eng.run_step()
        time.sleep(0.005)
    return got[0]


def test_a_rank_that_cannot_stage_fails_the_reload_and_every_rank_keeps_its_weights(default_model_dir):
    from graphserver.engine import Engine

    eng = Engine(str(default_model_dir), device="cpu", dtype="fp32", max_len=256)
    try:
        arena = eng.core.runner.w.arena.clone()
        eng.core.tp_group = group = _Group(["rank 1: OSError: disk gone"])
        kind, err = _reload(eng, str(default_model_dir), "B")
        assert kind == "error" and "rank 1: OSError: disk gone" in str(err)
        assert group.calls == ["stage", "check", "drop"] and eng.core.model_version == "0"
        assert torch.equal(eng.core.runner.w.arena, arena)
        group.calls, group.problems = [], []
        kind, result = _reload(eng, str(default_model_dir), "B")
        assert kind == "ok" and result["model_version"] == "B"
        assert group.calls == ["stage", "check", "commit"]
        group.calls = []
        kind, err = _reload(eng, str(default_model_dir / "missing"), "C")   # rank 0's own failure
        assert kind == "error" and group.calls == ["stage", "drop"]
    finally:
        eng.core.tp_group = None
        eng.close()


@pytest.mark.slow
def test_tp3_reload_switches_every_rank_and_a_bad_checkpoint_changes_nothing(default_model_dir, tmp_path):
    from checkpoints import misshaped_copy, perturbed_copy
    from client.rpc import RemoteBadRequest, ServerProcess
    from graphserver.engine import Engine

    ckpt = perturbed_copy(default_model_dir, tmp_path / "b")
    alone = Engine(str(ckpt), device="cpu", dtype="fp32", max_len=256)
    try:
        want_b = _greedy(alone)
    finally:
        alone.close()
    with ServerProcess(model=str(default_model_dir), extra_args=CPU_FP32 + ["--tp", "3"],
                       spawn_timeout_s=300, call_timeout_s=300) as client:
        a = _greedy(client)
        r = client.call("reload", path=str(ckpt), version="B")
        assert r["model_version"] == "B" and r["previous_version"] == "0"
        b = _greedy(client)
        assert b == want_b and b != a       # every rank's shard switched (any stale one diverges)
        with pytest.raises(RemoteBadRequest, match="reload"):
            client.call("reload", path=str(misshaped_copy(default_model_dir, tmp_path / "bad")), version="C")
        assert _greedy(client) == b and client.call("hello")["model_version"] == "B"
        r = client.call("reload", path=str(default_model_dir), version="A")
        assert _greedy(client) == a
