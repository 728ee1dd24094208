"""GPU tests of the sampling kernel (custom_kernels/csrc/sampling.cu) against reference.sample_row.

Fresh random logits of odd sizes, every dtype, top-k / top-p / temperature mixes, ties, -inf and
NaN entries, many seeds and positions; outputs poisoned first (-7). The kernel's thresholds are
exact (integer key searches), but its float sums add in another order than torch's, so a token may
differ from the reference where the draw target, or top_p * sum(w), lies within float rounding of
a cumulative-sum boundary. Such a difference is accepted only after `_rounding_edge` shows it (in
float64, within a relative 1e-5 of the total mass); any other difference fails.

Covered paths: the histogram kernel (bf16 / fp16, V <= 65535) and the general kernel (fp32 logits,
V > 65535), greedy and sampling, vectorized (V % 8 == 0) and scalar row loads.

Run on the GPU machine:
    python3 -m pytest -m cuda -q tests/test_sampling_cuda.py
Without a GPU or without the compiled extension every test is skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from custom_kernels import ops, reference

HAS_KERNELS = torch.cuda.is_available() and ops.cuda_kernels_available()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_KERNELS, reason="needs a CUDA GPU and the compiled custom_kernels._C"),
]

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]
HIST_LEN = 512
EDGE_REL = 1e-5  # how close (relative to the kept mass) a boundary must be to excuse a difference


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def rand_logits(rows: int, vocab: int, dtype, seed: int, scale: float = 3.0) -> torch.Tensor:
    """[rows, vocab] fresh normal logits in `dtype` on the GPU."""
    return (torch.randn(rows, vocab, generator=_gen(seed)) * scale).to(dtype).to(DEV)


def configs_for(vocab: int) -> list[tuple[float, int, float]]:
    """(temperature, top_k, top_p) mixes: top-k in {1, 50, V-1, V, 0} x top-p in {0.9, 0.5, 1.0,
    tiny} x temperature in {0.7, 1.3}."""
    ks = sorted({1, min(50, vocab), max(vocab - 1, 1), vocab, 0})
    return [(t, k, p) for t in (0.7, 1.3) for k in ks for p in (0.9, 0.5, 1.0, 1e-7)]


class Buffers:
    """Device buffers of one ops.sample call; token_in and token_hist poisoned with -7."""

    def __init__(self, temps, top_ks, top_ps, seeds, positions, hist_len=HIST_LEN):
        rows = len(temps)
        self.start = list(positions)
        self.temperature = torch.tensor(temps, dtype=torch.float32, device=DEV)
        self.top_k = torch.tensor(top_ks, dtype=torch.int32, device=DEV)
        self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=DEV)
        self.seed = torch.tensor(seeds, dtype=torch.int64, device=DEV)
        self.positions = torch.tensor(positions, dtype=torch.int32, device=DEV)
        self.token_in = torch.full((rows,), -7, dtype=torch.int32, device=DEV)
        self.token_hist = torch.full((rows, hist_len), -7, dtype=torch.int32, device=DEV)

    def run(self, logits: torch.Tensor) -> list[int]:
        ops.sample(logits, self.temperature, self.top_k, self.top_p, self.seed, self.positions,
                   self.token_in, self.token_hist)
        torch.cuda.synchronize()
        return self.token_in.cpu().tolist()

    def check_bookkeeping(self, tokens: list[int]) -> None:
        """Positions advanced by one; token_in and token_hist[pos + 1] hold the token, nothing else
        of token_hist written; padding rows (position < 0) untouched."""
        pos = self.positions.cpu().tolist()
        hist = self.token_hist.cpu()
        tok_in = self.token_in.cpu().tolist()
        for b, p in enumerate(self.start):
            expect = torch.full((hist.shape[1],), -7, dtype=torch.int32)
            if p < 0:
                assert pos[b] == p and tok_in[b] == -7, f"padding row {b} was written"
            else:
                assert pos[b] == p + 1, f"row {b}: position {pos[b]}, expected {p + 1}"
                assert tok_in[b] == tokens[b]
                expect[p + 1] = tokens[b]
            assert torch.equal(hist[b], expect), f"row {b}: token_hist written outside pos + 1"


def _uniq_desc_mass(w: torch.Tensor):
    """Distinct values of w [n] (float64, > 0 entries only matter) in descending order and, for
    each, the mass of all entries >= it."""
    ws, _ = torch.sort(w, descending=True)
    cs = torch.cumsum(ws, 0)
    last = torch.ones_like(ws, dtype=torch.bool)
    last[:-1] = ws[:-1] != ws[1:]
    return ws[last], cs[last]


def _rounding_edge(row: torch.Tensor, t: float, k: int, p: float, seed: int, pos: int,
                   tok: int) -> bool:
    """True when `tok` is what the reference semantics give for some summation order within
    EDGE_REL: the top-p set may move by a boundary whose cumulative mass is within EDGE_REL of
    top_p * sum(w), and the draw target may sit within EDGE_REL of tok's cumulative interval.
    row [V] (CPU, no NaN)."""
    x = row.float() / t
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < k < x.numel():
        keep = x >= torch.topk(x, k).values[-1]
    w = torch.where(keep, torch.exp(x - x.max()), torch.zeros_like(x)).double()
    total = float(w.sum())
    keeps = [keep]
    if p < 1.0:
        vals, mass = _uniq_desc_mass(w[keep])
        need = p * total
        near = set(torch.nonzero((mass - need).abs() <= EDGE_REL * total).flatten().tolist())
        ref_i = int(torch.searchsorted(mass, torch.tensor(need, dtype=torch.float64)).clamp(max=len(vals) - 1))
        cand = {ref_i} | near | {i + 1 for i in near if i + 1 < len(vals)}
        keeps = [keep & (w >= vals[i]) for i in sorted(cand)]
    u = reference.uniform(seed, pos)
    for kp in keeps:
        if not bool(kp[tok]):
            continue
        wc = torch.where(kp, w, torch.zeros_like(w))
        c = torch.cumsum(wc, 0)
        tot = float(c[-1])
        target = u * tot
        lo, hi = float(c[tok] - wc[tok]), float(c[tok])
        if lo <= target + EDGE_REL * tot and hi >= target - EDGE_REL * tot:
            return True
    return False


def assert_matches_reference(logits: torch.Tensor, buf: Buffers, tokens: list[int],
                             configs, seeds) -> None:
    """Every non-padding row's token equals reference.sample_row, or differs only at a proven
    rounding edge (and such rows are rare)."""
    cpu = logits.cpu()
    edges = []
    rows = 0
    for b, (t, k, p) in enumerate(configs):
        pos = buf.start[b]
        if pos < 0:
            continue
        rows += 1
        expect = reference.sample_row(cpu[b], t, k, p, seeds[b], pos)
        if tokens[b] == expect:
            continue
        assert not reference.is_greedy(t), f"row {b}: greedy token {tokens[b]} != {expect}"
        assert 0 <= tokens[b] < cpu.shape[1], f"row {b}: token {tokens[b]} out of range"
        assert _rounding_edge(cpu[b], t, k, p, seeds[b], pos, tokens[b]), (
            f"row {b} (t={t}, k={k}, p={p}, seed={seeds[b]}, pos={pos}): token {tokens[b]}, "
            f"reference {expect}, and no rounding edge explains it")
        edges.append(b)
    assert len(edges) <= max(1, rows // 20), f"too many rounding-edge rows: {edges} of {rows}"


def run_and_check(logits, configs, seed_base, positions=None):
    rows = logits.shape[0]
    gen = _gen(seed_base)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (rows,), generator=gen).tolist()
    if positions is None:
        positions = torch.randint(0, HIST_LEN - 1, (rows,), generator=gen).tolist()
    temps, top_ks, top_ps = ([c[i] for c in configs] for i in range(3))
    buf = Buffers(temps, top_ks, top_ps, seeds, positions)
    tokens = buf.run(logits)
    buf.check_bookkeeping(tokens)
    assert_matches_reference(logits, buf, tokens, configs, seeds)
    # Deterministic: the same inputs again give the same tokens, bit for bit.
    again = Buffers(temps, top_ks, top_ps, seeds, positions).run(logits)
    assert again == tokens
    return tokens, seeds, positions


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [49152, 32000, 50257, 1000, 7])
def test_sample_matches_reference(dtype, vocab):
    """One row per (temperature, top_k, top_p) mix, twice over with different logits."""
    configs = configs_for(vocab) * 2
    logits = rand_logits(len(configs), vocab, dtype, seed=1000 + vocab)
    run_and_check(logits, configs, seed_base=2000 + vocab)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("vocab", [49152, 50257, 1000])
def test_sample_ties_and_neg_inf(dtype, vocab):
    """Rows with many exact ties (a quarter of the row one value; several copies of the max) and
    rows with -inf entries (masked tokens)."""
    configs = configs_for(vocab)
    rows = len(configs)
    logits = rand_logits(rows, vocab, dtype, seed=3000 + vocab).cpu()
    gen = _gen(3100 + vocab)
    for b in range(rows):
        kind = b % 3
        if kind == 0:
            logits[b, : vocab // 4] = logits[b, 0].clone()
        elif kind == 1:
            top = torch.randperm(vocab, generator=gen)[:5]
            logits[b, top] = logits[b].max() + 1.0
            # clone: the value is a view into the written row, and torch refuses that aliasing
            logits[b, top[3:]] = logits[b, top[0]].clone()
        masked = torch.randperm(vocab, generator=gen)[: vocab // 3]
        logits[b, masked] = float("-inf")
    run_and_check(logits.to(DEV), configs, seed_base=3200 + vocab)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sample_batch_sizes_and_row_independence(rows, dtype):
    """B in {1, 3, 8}; each row's token is the same as when the row is sampled alone."""
    vocab = 49152
    mix = [(0.8, 50, 1.0), (0.8, 0, 0.9), (0.8, 50, 0.9), (1.3, 0, 1.0), (0.7, 1, 0.5),
           (1.0, 200, 0.95), (0.0, 0, 1.0), (1.3, vocab - 1, 1e-7)]
    configs = [mix[b % len(mix)] for b in range(rows)]
    logits = rand_logits(rows, vocab, dtype, seed=4000 + rows)
    tokens, seeds, positions = run_and_check(logits, configs, seed_base=4100 + rows)
    for b in range(rows):
        t, k, p = configs[b]
        alone = Buffers([t], [k], [p], [seeds[b]], [positions[b]]).run(logits[b:b + 1].contiguous())
        assert alone == [tokens[b]], f"row {b}: {alone} alone, {tokens[b]} in the batch"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("vocab", [65535, 65536, 128256])
def test_sample_histogram_kernel_boundary(dtype, vocab):
    """V = 65535 is the largest the histogram kernel takes; 65536 and Llama 3's 128256 go to the
    general kernel. Both agree with the reference."""
    configs = [(0.8, 50, 1.0), (0.8, 0, 0.9), (0.8, 50, 0.9), (1.3, 0, 1.0), (0.7, 0, 0.5)]
    logits = rand_logits(len(configs), vocab, dtype, seed=5000 + vocab)
    run_and_check(logits, configs, seed_base=5100 + vocab)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sample_many_draws_one_row(dtype):
    """One distribution, many (seed, position) pairs: the draw itself, token by token."""
    rows, vocab = 96, 32000
    base = rand_logits(1, vocab, dtype, seed=6000, scale=4.0)
    logits = base.expand(rows, vocab).contiguous()
    mix = [(0.9, 64, 0.9), (0.9, 0, 0.9), (1.0, 0, 1.0), (1.2, 1000, 1.0)]
    configs = [mix[b % len(mix)] for b in range(rows)]
    tokens, _, _ = run_and_check(logits, configs, seed_base=6100)
    assert len(set(tokens)) > 4  # it samples, not argmax


# ----------------------------------------------------------------------------- NaN, padding


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sample_nan_entries_are_excluded(dtype):
    """NaN logits are never drawn: sampling sees the row without them (the reference on the
    non-NaN entries, mapped back to their indices); greedy returns the first NaN, as torch.argmax."""
    vocab = 32000
    configs = [(0.8, 50, 1.0), (0.8, 0, 0.9), (0.8, 50, 0.9), (1.3, 0, 1.0), (0.0, 0, 1.0)]
    rows = len(configs)
    logits = rand_logits(rows, vocab, dtype, seed=7000).cpu()
    gen = _gen(7001)
    for b in range(rows):
        logits[b, torch.randperm(vocab, generator=gen)[:300]] = float("nan")
    seeds = torch.randint(0, 2 ** 62, (rows,), generator=gen).tolist()
    positions = torch.randint(0, HIST_LEN - 1, (rows,), generator=gen).tolist()
    temps, top_ks, top_ps = ([c[i] for c in configs] for i in range(3))
    dev_logits = logits.to(DEV)
    buf = Buffers(temps, top_ks, top_ps, seeds, positions)
    tokens = buf.run(dev_logits)
    buf.check_bookkeeping(tokens)
    assert Buffers(temps, top_ks, top_ps, seeds, positions).run(dev_logits) == tokens
    for b, (t, k, p) in enumerate(configs):
        row = logits[b]
        if reference.is_greedy(t):
            assert tokens[b] == int(torch.argmax(row.float()))
            continue
        finite = torch.nonzero(~torch.isnan(row.float())).flatten()
        assert not bool(torch.isnan(row[tokens[b]].float())), f"row {b}: drew a NaN logit"
        sub = row[finite]
        expect = int(finite[reference.sample_row(sub, t, k, p, seeds[b], positions[b])])
        if tokens[b] != expect:
            local = int(torch.nonzero(finite == tokens[b]).flatten()[0])
            assert _rounding_edge(sub, t, k, p, seeds[b], positions[b], local), (
                f"row {b}: token {tokens[b]}, expected {expect}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sample_fewer_than_k_numbers_gives_token_zero(dtype):
    """top_k < V but fewer than top_k non-NaN logits: nothing is kept and the token is 0 (the
    documented behaviour of the exact k-th key search)."""
    vocab = 1000
    logits = rand_logits(2, vocab, dtype, seed=7100).cpu()
    logits[:, 10:] = float("nan")  # 10 numbers
    buf = Buffers([0.8, 0.8], [50, 5], [1.0, 0.9], [11, 12], [3, 4])
    tokens = buf.run(logits.to(DEV))
    buf.check_bookkeeping(tokens)
    assert tokens[0] == 0
    assert 0 <= tokens[1] < 10  # 5 of the 10 numbers kept: a real draw


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sample_padding_rows_write_nothing(dtype):
    """Rows with position < 0 keep their position and write neither token_in nor token_hist;
    the other rows of the batch are sampled as usual."""
    vocab = 49152
    configs = [(0.8, 50, 0.9), (0.8, 0, 0.9), (0.0, 0, 1.0), (1.3, 0, 1.0), (0.8, 50, 1.0)]
    positions = [-1, 17, -5, -1, 200]
    logits = rand_logits(len(configs), vocab, dtype, seed=7200)
    run_and_check(logits, configs, seed_base=7300, positions=positions)


# ----------------------------------------------------------------------------- CUDA graphs


def test_sample_graph_replay_matches_eager():
    """Captured once into a CUDA graph and replayed: the same tokens as eager launches."""
    vocab, rows = 49152, 4
    configs = [(0.8, 50, 1.0), (0.8, 0, 0.9), (0.8, 50, 0.9), (0.0, 0, 1.0)]
    logits = rand_logits(rows, vocab, torch.bfloat16, seed=8000)
    temps, top_ks, top_ps = ([c[i] for c in configs] for i in range(3))
    seeds, start = [21, 22, 23, 24], [5, 6, 7, 8]
    eager = Buffers(temps, top_ks, top_ps, seeds, start).run(logits)
    buf = Buffers(temps, top_ks, top_ps, seeds, start)
    buf.run(logits)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.sample(logits, buf.temperature, buf.top_k, buf.top_p, buf.seed, buf.positions,
                   buf.token_in, buf.token_hist)
    buf.positions.copy_(torch.tensor(start, dtype=torch.int32))
    buf.token_in.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    assert buf.token_in.cpu().tolist() == eager
    assert buf.positions.cpu().tolist() == [p + 1 for p in start]


def test_sample_first_launch_inside_graph_capture():
    """A fresh process whose first sampling launch is inside graph capture (the histogram kernel's
    shared-memory attribute is set on that first launch): capture works and replays right."""
    code = (
        "import torch\n"
        "from custom_kernels import ops, reference\n"
        "g = torch.Generator(); g.manual_seed(5)\n"
        "cpu = (torch.randn(1, 49152, generator=g) * 3).bfloat16()\n"
        "x = cpu.cuda()\n"
        "f32 = lambda v: torch.tensor([v], dtype=torch.float32, device='cuda')\n"
        "i32 = lambda v: torch.tensor([v], dtype=torch.int32, device='cuda')\n"
        "t, k, p, s = f32(0.8), i32(50), f32(0.9), torch.tensor([99], device='cuda')\n"
        "pos, tok = i32(3), i32(-7)\n"
        "hist = torch.full((1, 16), -7, dtype=torch.int32, device='cuda')\n"
        "graph = torch.cuda.CUDAGraph()\n"
        "with torch.cuda.graph(graph):\n"
        "    ops.sample(x, t, k, p, s, pos, tok, hist)\n"
        "graph.replay(); torch.cuda.synchronize()\n"
        "expect = reference.sample_row(cpu[0], 0.8, 50, 0.9, 99, 3)\n"
        "assert int(tok) == expect and int(pos) == 4, (int(tok), expect, int(pos))\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
