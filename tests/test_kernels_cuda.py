"""GPU tests: every CUDA kernel against its pure-torch reference (custom_kernels/reference.py).

Inputs are fresh random tensors (never zeros); outputs are poisoned first (NaN for floats, -7 for
ints, a sentinel for caches) so an element the kernel forgets to write fails the comparison. The
reference runs on CPU copies of the same inputs. Tolerances are per dtype: a kernel may differ from
the reference by the rounding of its fp32 accumulation order, i.e. about one unit in the last place
of the output dtype.

Run on the GPU machine with `pytest -m cuda tests/test_kernels_cuda.py`. Without a GPU or without
the compiled extension every test is skipped.

Programmatic dependent launch (PDL, on unless CUSTOM_KERNELS_PDL=0): kernels may read their weights
before the previous kernel on the stream has finished, so no test writes a weight with the kernel
launched immediately before the op that reads it (the poisoned output fill always sits between).
The PDL tests at the end compare graph-replayed and free-running kernel chains with fully
serialized ones, bitwise.
"""
from __future__ import annotations

import math
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

DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bf16", "fp16"]

# One or two units in the last place of the output dtype, relative; small absolute slack for
# values near zero.
TOL = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
# Attention averages many values; allow for the different fp32 softmax association.
ATTN_TOL = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
ATTN_TOL_LONG = {
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}

DEV = "cuda"


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def randn(*shape, dtype, seed, scale=1.0, device=DEV):
    """Fresh normal values (seeded, generated on `device`: big caches are cheap to make)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


def poisoned(*shape, dtype, device=DEV):
    t = torch.empty(*shape, dtype=dtype, device=device)
    if dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


@pytest.fixture(scope="module")
def gemm_workspace():
    """Binds a cuBLAS handle with a preallocated workspace to the default stream."""
    ws = torch.empty(32 << 20, dtype=torch.uint8, device=DEV)
    ops.bind_gemm_stream(ws)
    return ws


# ----------------------------------------------------------------------------- embedding / norms

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("hidden", [576, 200, 4096])
@pytest.mark.parametrize("tokens", [1, 17])
def test_embedding(dtype, id_dtype, hidden, tokens):
    vocab = 1000
    table = randn(vocab, hidden, dtype=dtype, seed=1)
    ids = torch.randint(0, vocab, (tokens,), generator=_gen(2)).to(id_dtype).to(DEV)
    out = poisoned(tokens, hidden, dtype=dtype)
    ops.embedding(ids, table, out)
    ref = torch.empty(tokens, hidden, dtype=dtype)
    reference.embedding(ids.cpu(), table.cpu(), ref)
    assert torch.equal(out.cpu(), ref)


NORM_SIZES = [(1, 576), (3, 2048), (5, 4096), (2, 200), (4, 8192), (2, 8200), (64, 576), (1, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens,hidden", NORM_SIZES)
def test_rmsnorm(dtype, tokens, hidden):
    x = randn(tokens, hidden, dtype=dtype, seed=3, scale=2.0)
    w = randn(hidden, dtype=dtype, seed=4)
    out = poisoned(tokens, hidden, dtype=dtype)
    ops.rmsnorm(x, w, 1e-5, out)
    ref = torch.empty(tokens, hidden, dtype=dtype)
    reference.rmsnorm(x.cpu(), w.cpu(), 1e-5, ref)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens,hidden", NORM_SIZES)
def test_add_rmsnorm(dtype, tokens, hidden):
    x = randn(tokens, hidden, dtype=dtype, seed=5)
    residual = randn(tokens, hidden, dtype=dtype, seed=6, scale=3.0)
    w = randn(hidden, dtype=dtype, seed=7)
    out = poisoned(tokens, hidden, dtype=dtype)
    res_ref = residual.cpu().clone()
    ref = torch.empty(tokens, hidden, dtype=dtype)
    reference.add_rmsnorm(x.cpu(), res_ref, w.cpu(), 1e-6, ref)
    ops.add_rmsnorm(x, residual, w, 1e-6, out)
    # The residual add is one fp32 add rounded to the dtype on both sides: bitwise equal.
    assert torch.equal(residual.cpu(), res_ref)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rmsnorm_misaligned_view(dtype):
    # A contiguous view that starts 2 bytes past a 16-byte boundary takes the scalar path.
    tokens, hidden = 3, 576
    base = randn(tokens * hidden + 1, dtype=dtype, seed=8)
    x = base[1:].view(tokens, hidden)
    w = randn(hidden, dtype=dtype, seed=9)
    out_base = poisoned(tokens * hidden + 1, dtype=dtype)
    out = out_base[1:].view(tokens, hidden)
    ops.rmsnorm(x, w, 1e-5, out)
    ref = torch.empty(tokens, hidden, dtype=dtype)
    reference.rmsnorm(x.cpu(), w.cpu(), 1e-5, ref)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])
    assert torch.isnan(out_base[0]).item()  # the element before the view is untouched


# ----------------------------------------------------------------------------- swiglu

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens,inter", [(1, 1536), (5, 11008), (3, 100), (2, 13)])
def test_swiglu(dtype, tokens, inter):
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=10, scale=3.0)
    out = poisoned(tokens, inter, dtype=dtype)
    ops.swiglu(gate_up, out)
    ref = torch.empty(tokens, inter, dtype=dtype)
    reference.swiglu(gate_up.cpu(), ref)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


# ----------------------------------------------------------------------------- linear

# Every GEMV configuration: one warp per row group (K <= 1024) with one or two rows per group
# (3072 and 3073 rows: two, the last group half past N), 2 / 4 / 8 warps per group (K = 1536, 4096,
# 11008), the deep single batch (K / 8 = 1025..2048 vectors at T <= 2) and several batches
# (K = 16392 at T <= 2, K = 8200 / 11008 at T > 2), a row of one vector (K = 8).
GEMV_SHAPES = [(576, 576), (1536, 576), (576, 1536), (960, 576), (3072, 576), (3073, 576),
               (1001, 200), (4096, 4096), (4096, 11008), (101, 8200), (64, 16392), (37, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k", GEMV_SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
def test_linear_gemv(gemm_workspace, dtype, n, k, tokens):
    _check_linear(dtype, tokens, n, k, seed=11)


def _check_linear(dtype, tokens, n, k, seed):
    """ops.linear on fresh random x [tokens, k], w [n, k] against the reference, output poisoned."""
    x = randn(tokens, k, dtype=dtype, seed=seed)
    w = randn(n, k, dtype=dtype, seed=seed + 1, scale=1.0 / math.sqrt(k))
    out = poisoned(tokens, n, dtype=dtype)
    ops.linear(x, w, out)
    ref = torch.empty(tokens, n, dtype=dtype)
    reference.linear(x.cpu(), w.cpu(), ref)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens,n,k", [(33, 576, 576), (33, 1536, 576), (64, 4096, 4096),
                                        (1, 576, 577), (4, 300, 203), (9, 1001, 200)])
def test_linear_cublas(gemm_workspace, dtype, tokens, n, k):
    # More rows than the GEMV serves, or K not a multiple of 8: the cuBLAS path.
    _check_linear(dtype, tokens, n, k, seed=13)


def test_linear_unbound_stream_fails_clearly(gemm_workspace):
    x = randn(33, 64, dtype=torch.bfloat16, seed=15)
    w = randn(32, 64, dtype=torch.bfloat16, seed=16)
    out = poisoned(33, 32, dtype=torch.bfloat16)
    # torch.cuda.Stream() recycles a pool of streams, some of which earlier tests may have bound:
    # walk the pool until an unbound one turns up; that one must refuse with a clear message.
    for _ in range(128):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            try:
                ops.linear(x, w, out)
            except RuntimeError as exc:
                assert "bind_gemm_stream" in str(exc)
                return
        torch.cuda.synchronize()
    pytest.fail("every pooled stream already had a cuBLAS handle; none could be checked")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_graph_replay_matches_eager(dtype):
    """A GEMV and a cuBLAS linear captured in one CUDA graph replay equal to eager runs."""
    n, k = 1536, 576
    stream = torch.cuda.Stream()
    ws = torch.empty(32 << 20, dtype=torch.uint8, device=DEV)
    w = randn(n, k, dtype=dtype, seed=17, scale=1.0 / math.sqrt(k))
    x1 = randn(1, k, dtype=dtype, seed=18)
    x33 = randn(33, k, dtype=dtype, seed=19)
    o1 = poisoned(1, n, dtype=dtype)
    o33 = poisoned(33, n, dtype=dtype)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.bind_gemm_stream(ws)  # before capture: creating a handle is illegal inside it
        ops.linear(x1, w, o1)  # warm-up
        ops.linear(x33, w, o33)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        ops.linear(x1, w, o1)
        ops.linear(x33, w, o33)

    for seed in (20, 21):
        x1.copy_(randn(1, k, dtype=dtype, seed=seed))
        x33.copy_(randn(33, k, dtype=dtype, seed=seed + 100))
        o1.fill_(float("nan"))
        o33.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        e1 = poisoned(1, n, dtype=dtype)
        e33 = poisoned(33, n, dtype=dtype)
        stream.wait_stream(torch.cuda.current_stream())  # the poison fills run first
        with torch.cuda.stream(stream):
            ops.linear(x1, w, e1)
            ops.linear(x33, w, e33)
        torch.cuda.synchronize()
        assert torch.equal(o1, e1)
        assert torch.equal(o33, e33)
        ref = torch.empty(33, n, dtype=dtype)
        reference.linear(x33.cpu(), w.cpu(), ref)
        torch.testing.assert_close(o33.cpu(), ref, **TOL[dtype])


# ----------------------------------------------------------------------------- swiglu_linear

# (N, I): two rows per group (576 x 1536, 1001 x 200 with a half-empty last group), eight (four at
# T > 4) rows per group with a partial last group (1061 x 4104), Llama-2 down (4096 x 11008), a row
# of five vectors (33 x 40).
SWIGLU_LINEAR_SHAPES = [(576, 1536), (1001, 200), (1061, 4104), (4096, 11008), (33, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,inter", SWIGLU_LINEAR_SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
def test_swiglu_linear_fused(gemm_workspace, dtype, n, inter, tokens):
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=90, scale=3.0)
    w = randn(n, inter, dtype=dtype, seed=91, scale=1.0 / math.sqrt(inter))
    out = poisoned(tokens, n, dtype=dtype)
    act = poisoned(tokens, inter, dtype=dtype)
    ops.swiglu_linear(gate_up, w, out, act)
    # The fused kernel served it: the scratch was never written.
    assert torch.isnan(act).all().item()
    ref = torch.empty(tokens, n, dtype=dtype)
    reference.swiglu_linear(gate_up.cpu(), w.cpu(), ref)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])
    # Same roundings and the same accumulation order as swiglu + linear on the GPU: bitwise equal.
    two_step = poisoned(tokens, n, dtype=dtype)
    ops.swiglu(gate_up, act)
    ops.linear(act, w, two_step)
    assert torch.equal(out, two_step), "fused swiglu_linear differs from swiglu + linear"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens,n,inter", [(9, 576, 1536), (33, 100, 64), (2, 50, 13),
                                            (1, 70, 1001)])
def test_swiglu_linear_fallback(gemm_workspace, dtype, tokens, n, inter):
    # More rows than the GEMV serves, or I % 8 != 0: swiglu into act, then linear (GEMV / cuBLAS).
    gate_up = randn(tokens, 2 * inter, dtype=dtype, seed=92, scale=3.0)
    w = randn(n, inter, dtype=dtype, seed=93, scale=1.0 / math.sqrt(inter))
    out = poisoned(tokens, n, dtype=dtype)
    act = poisoned(tokens, inter, dtype=dtype)
    ops.swiglu_linear(gate_up, w, out, act)
    ref = torch.empty(tokens, n, dtype=dtype)
    reference.swiglu_linear(gate_up.cpu(), w.cpu(), ref)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])
    ref_act = torch.empty(tokens, inter, dtype=dtype)
    reference.swiglu(gate_up.cpu(), ref_act)
    torch.testing.assert_close(act.cpu(), ref_act, **TOL[dtype])


def test_swiglu_linear_op_refuses_what_it_cannot_serve():
    k = torch.ops.custom_kernels
    w = randn(16, 24, dtype=torch.bfloat16, seed=94)
    with pytest.raises(RuntimeError, match="T <= 8"):
        k.swiglu_linear(randn(9, 48, dtype=torch.bfloat16, seed=95), w,
                        poisoned(9, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="2I"):
        k.swiglu_linear(randn(1, 40, dtype=torch.bfloat16, seed=96), w,
                        poisoned(1, 16, dtype=torch.bfloat16))
    gu = randn(2, 48, dtype=torch.bfloat16, seed=97)
    with pytest.raises(RuntimeError, match="overlap"):
        k.swiglu_linear(gu, w, gu.view(-1)[:32].view(2, 16))


def test_refusal_messages_carry_the_numbers():
    """A refusal formats sizes into its message and raises. (A build that linked a private copy of
    libstdc++ into _C segfaulted on the first integer formatted; setup.py now links torch's.)"""
    w = randn(16, 24, dtype=torch.bfloat16, seed=104)
    with pytest.raises(RuntimeError, match=r"x.shape\[-1\] = 1 \* weight.shape\[1\] = 24, got x \[3, 40\]"):
        ops.linear(randn(3, 40, dtype=torch.bfloat16, seed=105), w,
                   poisoned(3, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match=r"got T = 9, I = 24"):
        torch.ops.custom_kernels.swiglu_linear(randn(9, 48, dtype=torch.bfloat16, seed=106), w,
                                               poisoned(9, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_swiglu_linear_graph_replay_matches_eager(dtype):
    """The fused op captured in a CUDA graph (after a GEMV that feeds it, as in the MLP) replays
    equal to eager runs with new inputs."""
    h, inter, n = 576, 1536, 576
    stream = torch.cuda.Stream()
    w13 = randn(2 * inter, h, dtype=dtype, seed=98, scale=1.0 / math.sqrt(h))
    w2 = randn(n, inter, dtype=dtype, seed=99, scale=1.0 / math.sqrt(inter))
    x = randn(1, h, dtype=dtype, seed=100)
    gate_up = poisoned(1, 2 * inter, dtype=dtype)
    act = poisoned(1, inter, dtype=dtype)
    out = poisoned(1, n, dtype=dtype)
    torch.cuda.synchronize()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.linear(x, w13, gate_up)
        ops.swiglu_linear(gate_up, w2, out, act)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        ops.linear(x, w13, gate_up)
        ops.swiglu_linear(gate_up, w2, out, act)
    for seed in (101, 102, 103):
        x.copy_(randn(1, h, dtype=dtype, seed=seed))
        out.fill_(float("nan"))
        gate_up.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        e_gu = poisoned(1, 2 * inter, dtype=dtype)
        e_out = poisoned(1, n, dtype=dtype)
        ops.linear(x, w13, e_gu)
        torch.cuda.synchronize()
        ops.swiglu_linear(e_gu, w2, e_out, act)
        torch.cuda.synchronize()
        assert torch.equal(gate_up, e_gu)
        assert torch.equal(out, e_out)
        ref = torch.empty(1, n, dtype=dtype)
        reference.swiglu_linear(e_gu.cpu(), w2.cpu(), ref)
        torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


# ----------------------------------------------------------------------------- paged KV helpers

def make_block_tables(rows: int, max_blocks: int, num_blocks: int, seed: int) -> torch.Tensor:
    """[rows, max_blocks] int32: disjoint, shuffled (non-contiguous) block ids per row."""
    perm = torch.randperm(num_blocks, generator=_gen(seed))[: rows * max_blocks]
    return perm.view(rows, max_blocks).to(torch.int32)


def make_cache(num_blocks, block_size, nkv, d, dtype, seed):
    k = randn(num_blocks, block_size, nkv, d, dtype=dtype, seed=seed)
    v = randn(num_blocks, block_size, nkv, d, dtype=dtype, seed=seed + 1)
    return k, v


HEADS = [(9, 3), (32, 8), (15, 5), (8, 8)]
HEAD_IDS = ["9-3", "32-8", "15-5", "8-8"]


# ----------------------------------------------------------------------------- rope + KV write

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("d", [64, 128, 96])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_rope_kv_write(dtype, nq, nkv, d, tokens):
    block_size, max_positions = 16, 200
    max_blocks = math.ceil(max_positions / block_size)
    num_blocks = max_blocks + 5
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = reference.rope_tables(inv_freq, max_positions)
    qkv = randn(tokens, (nq + 2 * nkv) * d, dtype=dtype, seed=30)
    # Distinct positions (no two tokens share a slot), spread over the table.
    positions = torch.randperm(max_positions, generator=_gen(31))[:tokens].to(torch.int32)
    block_table = make_block_tables(1, max_blocks, num_blocks, seed=32)[0]
    sentinel = -768.0  # exact in bf16 and fp16, so `!= sentinel` finds the written slots
    k_cache = torch.full((num_blocks, block_size, nkv, d), sentinel, dtype=dtype, device=DEV)
    v_cache = torch.full((num_blocks, block_size, nkv, d), sentinel, dtype=dtype, device=DEV)
    q_out = poisoned(tokens, nq, d, dtype=dtype)

    k_ref, v_ref = k_cache.cpu().clone(), v_cache.cpu().clone()
    q_ref = torch.empty(tokens, nq, d, dtype=dtype)
    reference.rope_kv_write(qkv.cpu(), positions, cos, sin, k_ref, v_ref, block_table, q_ref)

    ops.rope_kv_write(qkv, positions.to(DEV), cos.to(DEV), sin.to(DEV), k_cache, v_cache,
                      block_table.to(DEV), q_out)
    torch.testing.assert_close(q_out.cpu(), q_ref, **TOL[dtype])
    # Whole caches: the written slots match, every other slot still holds the sentinel.
    torch.testing.assert_close(k_cache.cpu(), k_ref, **TOL[dtype])
    assert torch.equal(v_cache.cpu(), v_ref)
    written = (k_cache.cpu() != sentinel).any(dim=-1).any(dim=-1)  # [NB, BS]
    assert int(written.sum()) == tokens


# ----------------------------------------------------------------------------- decode attention

def run_decode(q, k_cache, v_cache, block_tables, positions, scale, max_len):
    b, nq, d = q.shape
    out = poisoned(b, nq, d, dtype=q.dtype)
    ws = torch.full((ops.attention_workspace_numel(b, nq, d, max_len),), float("nan"),
                    dtype=torch.float32, device=DEV)
    ops.decode_attention(q, k_cache, v_cache, block_tables, positions, scale, out, ws, max_len)
    return out


def decode_reference(q, k_cache, v_cache, block_tables, positions, scale):
    ref = torch.empty(q.shape, dtype=q.dtype)
    reference.decode_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), block_tables.cpu(),
                               positions.cpu(), scale, ref)
    return ref


def check_decode(lengths, nq, nkv, d, dtype, block_size, max_len, spare_blocks, seed, tol):
    """Rows of the given lengths on shuffled blocks, one launch sized for max_len, against the
    reference."""
    batch = len(lengths)
    max_blocks = math.ceil(max_len / block_size)
    num_blocks = batch * max_blocks + spare_blocks
    k_cache, v_cache = make_cache(num_blocks, block_size, nkv, d, dtype, seed=seed)
    block_tables = make_block_tables(batch, max_blocks, num_blocks, seed=seed + 1).to(DEV)
    positions = torch.tensor([n - 1 for n in lengths], dtype=torch.int32, device=DEV)
    q = randn(batch, nq, d, dtype=dtype, seed=seed + 2)
    scale = 1.0 / math.sqrt(d)
    out = run_decode(q, k_cache, v_cache, block_tables, positions, scale, max_len)
    ref = decode_reference(q, k_cache, v_cache, block_tables, positions, scale)
    torch.testing.assert_close(out.cpu(), ref, **tol[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 33, 257, 1000, 4097])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("bucket", [False, True], ids=["exact", "bucket"])
def test_decode_attention(dtype, nq, nkv, d, length, block_size, bucket):
    # Row 0 has `length` tokens, row 1 a different (shorter) length.
    lengths = [length, max(1, (length * 2) // 3)]
    max_len = length + (123 if bucket else 0)
    tol = ATTN_TOL_LONG if length > 1024 else ATTN_TOL
    check_decode(lengths, nq, nkv, d, dtype, block_size, max_len, 3, seed=40, tol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv,d", [(9, 3, 64), (32, 32, 128), (32, 8, 128)])
def test_decode_attention_batch_rows(dtype, nq, nkv, d):
    # Several rows of very different lengths in one launch (different split coverage per row).
    lengths = [1, 700, 33, 2048, 16]
    check_decode(lengths, nq, nkv, d, dtype, 16, max(lengths), 0, seed=43, tol=ATTN_TOL_LONG)


def test_decode_attention_long_16k():
    check_decode([16384], 32, 8, 128, torch.bfloat16, 32, 16384, 1, seed=46, tol=ATTN_TOL_LONG)


def test_decode_attention_rejects_bad_max_len():
    q = randn(1, 9, 64, dtype=torch.bfloat16, seed=49)
    k_cache, v_cache = make_cache(4, 16, 3, 64, torch.bfloat16, seed=50)
    block_tables = torch.arange(4, dtype=torch.int32, device=DEV).view(1, 4)
    positions = torch.tensor([10], dtype=torch.int32, device=DEV)
    out = poisoned(1, 9, 64, dtype=torch.bfloat16)
    ws = torch.empty(1 << 16, dtype=torch.float32, device=DEV)
    with pytest.raises(RuntimeError, match="max_len must be > 0"):
        ops.decode_attention(q, k_cache, v_cache, block_tables, positions, 0.125, out, ws, 0)
    with pytest.raises(RuntimeError, match=r"needs a float32 workspace of at least \d+ elements, "
                                           r"got 0 \(none\)"):
        ops.decode_attention(q, k_cache, v_cache, block_tables, positions, 0.125, out, None, 64)
    with pytest.raises(RuntimeError, match=r"got 7;"):
        ops.decode_attention(q, k_cache, v_cache, block_tables, positions, 0.125, out, ws[:7], 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_attention_graph_serves_every_length_up_to_max_len(dtype):
    """Captured once with max_len = L, replayed with the device lengths 1..L it must serve."""
    nq, nkv, d, block_size, max_len, batch = 9, 3, 64, 16, 300, 2
    max_blocks = math.ceil(max_len / block_size)
    num_blocks = batch * max_blocks + 1
    k_cache, v_cache = make_cache(num_blocks, block_size, nkv, d, dtype, seed=51)
    block_tables = make_block_tables(batch, max_blocks, num_blocks, seed=52).to(DEV)
    positions = torch.tensor([max_len - 1, 0], dtype=torch.int32, device=DEV)
    q = randn(batch, nq, d, dtype=dtype, seed=53)
    out = poisoned(batch, nq, d, dtype=dtype)
    ws = torch.empty(ops.attention_workspace_numel(batch, nq, d, max_len), dtype=torch.float32,
                     device=DEV)
    scale = 1.0 / math.sqrt(d)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.decode_attention(q, k_cache, v_cache, block_tables, positions, scale, out, ws, max_len)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        ops.decode_attention(q, k_cache, v_cache, block_tables, positions, scale, out, ws, max_len)
    for lens in [(1, 300), (17, 2), (150, 299), (300, 33), (32, 64)]:
        positions.copy_(torch.tensor([n - 1 for n in lens], dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_reference(q, k_cache, v_cache, block_tables, positions, scale)
        torch.testing.assert_close(out.cpu(), ref, **ATTN_TOL[dtype])


# ----------------------------------------------------------------------------- prefill attention

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("tokens", [1, 7, 64, 65, 200])
@pytest.mark.parametrize("start_pos", [0, 37])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_attention(dtype, nq, nkv, d, tokens, start_pos, block_size):
    total = start_pos + tokens
    max_blocks = math.ceil(total / block_size) + 1
    num_blocks = max_blocks + 4
    k_cache, v_cache = make_cache(num_blocks, block_size, nkv, d, dtype, seed=60)
    block_table = make_block_tables(1, max_blocks, num_blocks, seed=61)[0].to(DEV)
    _check_prefill(k_cache, v_cache, block_table, tokens, nq, d, dtype, start_pos, seed=62,
                   tol=ATTN_TOL[dtype])


def _check_prefill(k_cache, v_cache, block_table, tokens, nq, d, dtype, start_pos, seed, tol):
    """prefill_attention on fresh random q against the reference, output poisoned."""
    q = randn(tokens, nq, d, dtype=dtype, seed=seed)
    scale = 1.0 / math.sqrt(d)
    out = poisoned(tokens, nq, d, dtype=dtype)
    ops.prefill_attention(q, k_cache, v_cache, block_table, start_pos, scale, out)
    ref = torch.empty(tokens, nq, d, dtype=dtype)
    reference.prefill_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), block_table.cpu(),
                                start_pos, scale, ref)
    torch.testing.assert_close(out.cpu(), ref, **tol)


@pytest.mark.parametrize("start_pos", [0, 100])
def test_prefill_attention_7b_shape(start_pos):
    dtype, nq, nkv, d, block_size, tokens = torch.bfloat16, 32, 32, 128, 16, 1024
    total = start_pos + tokens
    max_blocks = math.ceil(total / block_size)
    k_cache, v_cache = make_cache(max_blocks + 2, block_size, nkv, d, dtype, seed=63)
    block_table = make_block_tables(1, max_blocks, max_blocks + 2, seed=64)[0].to(DEV)
    _check_prefill(k_cache, v_cache, block_table, tokens, nq, d, dtype, start_pos, seed=65,
                   tol=ATTN_TOL_LONG[dtype])


# ----------------------------------------------------------------------------- sampling

def sample_buffers(rows, hist_len, positions, temperature, top_k, top_p, seeds):
    return dict(
        temperature=torch.tensor(temperature, dtype=torch.float32, device=DEV),
        top_k=torch.tensor(top_k, dtype=torch.int32, device=DEV),
        top_p=torch.tensor(top_p, dtype=torch.float32, device=DEV),
        seed=torch.tensor(seeds, dtype=torch.int64, device=DEV),
        positions=torch.tensor(positions, dtype=torch.int32, device=DEV),
        token_in=poisoned(rows, dtype=torch.int32),
        token_hist=poisoned(rows, hist_len, dtype=torch.int32),
    )


def run_sample(logits, buf):
    ops.sample(logits, buf["temperature"], buf["top_k"], buf["top_p"], buf["seed"],
               buf["positions"], buf["token_in"], buf["token_hist"])
    torch.cuda.synchronize()


def check_bookkeeping(buf, start_positions, tokens):
    pos = buf["positions"].cpu()
    hist = buf["token_hist"].cpu()
    tok_in = buf["token_in"].cpu()
    assert pos.tolist() == [p + 1 for p in start_positions]
    assert tok_in.tolist() == list(tokens)
    for b, p in enumerate(start_positions):
        expect = torch.full((hist.shape[1],), -7, dtype=torch.int32)
        expect[p + 1] = tokens[b]
        assert torch.equal(hist[b], expect), f"row {b}: token_hist written outside pos + 1"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("vocab", [1000, 1001, 49152, 128256])
def test_sample_greedy_matches_argmax_with_ties(dtype, vocab):
    rows, hist_len = 3, 64
    logits = randn(rows, vocab, dtype=dtype, seed=70, scale=4.0)
    # Forced ties: two (row 0, 2) or three (row 1) copies of a new maximum; the first must win.
    ties = {0: [vocab // 3, vocab - 1], 1: [5, vocab // 2, vocab - 2], 2: [0, 1]}
    for b, idx in ties.items():
        logits[b, idx] = 100.0
    start = [0, 10, 62]
    buf = sample_buffers(rows, hist_len, start, [0.0, -1.0, 0.0], [0, 50, 0], [1.0, 0.9, 1.0],
                         [1, 2, 3])
    run_sample(logits, buf)
    expect = [int(torch.argmax(logits[b].float().cpu())) for b in range(rows)]
    assert expect == [min(ties[b]) for b in range(rows)]
    check_bookkeeping(buf, start, expect)


SAMPLING_CONFIGS = [
    # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 50, 1.0),
    (1.0, 0, 0.9),
    (0.8, 40, 0.95),
    (1.3, 200, 0.5),
    (0.5, 1, 1.0),
    (1.0, 5, 0.8),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("vocab", [32000, 49152, 1003])
def test_sample_support_determinism_and_agreement(dtype, vocab):
    rows, hist_len = 300, 4096
    logits = randn(rows, vocab, dtype=dtype, seed=71, scale=3.0)
    # Some rows with many exact ties (top-k / top-p tie handling).
    logits[::10, : vocab // 4] = logits[::10, :1]
    configs = [SAMPLING_CONFIGS[b % len(SAMPLING_CONFIGS)] for b in range(rows)]
    gen = _gen(72)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (rows,), generator=gen).tolist()
    start = torch.randint(0, hist_len - 1, (rows,), generator=gen).tolist()
    temps = [c[0] for c in configs]
    top_ks = [c[1] for c in configs]
    top_ps = [c[2] for c in configs]

    buf = sample_buffers(rows, hist_len, start, temps, top_ks, top_ps, seeds)
    run_sample(logits, buf)
    tokens = buf["token_in"].cpu().tolist()
    check_bookkeeping(buf, start, tokens)

    # Same seed + position -> same token.
    buf2 = sample_buffers(rows, hist_len, start, temps, top_ks, top_ps, seeds)
    run_sample(logits, buf2)
    assert buf2["token_in"].cpu().tolist() == tokens

    logits_cpu = logits.cpu()
    agree = 0
    for b in range(rows):
        t, k, p = configs[b]
        keep, _ = reference.sampling_support(logits_cpu[b], t, k, p)
        assert bool(keep[tokens[b]]), f"row {b}: token {tokens[b]} outside the reference support"
        agree += int(reference.sample_row(logits_cpu[b], t, k, p, seeds[b], start[b]) == tokens[b])
    assert agree >= 0.97 * rows, f"agreement with reference.sample_row: {agree}/{rows}"


def test_sample_many_draws_one_row_stay_in_support():
    """One distribution, many (seed, position) pairs: every draw inside the kept set."""
    rows, vocab, hist_len = 256, 49152, 512
    base = randn(1, vocab, dtype=torch.bfloat16, seed=73, scale=5.0)
    logits = base.expand(rows, vocab).contiguous()
    gen = _gen(74)
    seeds = torch.randint(0, 2 ** 62, (rows,), generator=gen).tolist()
    start = torch.randint(0, hist_len - 1, (rows,), generator=gen).tolist()
    buf = sample_buffers(rows, hist_len, start, [0.9] * rows, [64] * rows, [0.9] * rows, seeds)
    run_sample(logits, buf)
    tokens = buf["token_in"].cpu().tolist()
    keep, _ = reference.sampling_support(base[0].cpu(), 0.9, 64, 0.9)
    assert all(bool(keep[t]) for t in tokens)
    assert len(set(tokens)) > 1  # it does sample, not argmax
    agree = sum(int(reference.sample_row(base[0].cpu(), 0.9, 64, 0.9, s, p) == t)
                for s, p, t in zip(seeds, start, tokens))
    assert agree >= 0.97 * rows


# ----------------------------------------------------------------------------- PDL

_PDL_OFF = ("0", "false", "off", "no")


def test_pdl_flag_follows_the_environment():
    expect = os.environ.get("CUSTOM_KERNELS_PDL", "1").strip().lower() not in _PDL_OFF
    assert ops.pdl_enabled() is expect


def test_pdl_can_be_switched_off_at_load():
    """CUSTOM_KERNELS_PDL=0 in a fresh process: the flag is off and the kernels still run right."""
    code = (
        "import torch\n"
        "from custom_kernels import ops, reference\n"
        "assert ops.pdl_enabled() is False, 'CUSTOM_KERNELS_PDL=0 did not disable PDL'\n"
        "x = torch.randn(1, 576, device='cuda').bfloat16()\n"
        "w = torch.randn(960, 576, device='cuda').bfloat16() * 0.05\n"
        "out = torch.full((1, 960), float('nan'), device='cuda', dtype=torch.bfloat16)\n"
        "ops.linear(x, w, out)\n"
        "ref = torch.empty(1, 960, dtype=torch.bfloat16)\n"
        "reference.linear(x.cpu(), w.cpu(), ref)\n"
        "torch.testing.assert_close(out.cpu(), ref, atol=2e-2, rtol=2e-2)\n"
        "print('ok')\n")
    env = dict(os.environ, CUSTOM_KERNELS_PDL="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


class _TinyDecoder:
    """A random decoder at SmolLM2-135M's per-layer shapes (fewer layers, smaller vocab) driving the
    decode-step kernel sequence of graphserver/model.py through custom_kernels.ops."""

    H, I, NQ, NKV, D, V, LAYERS, BS, MAX_LEN = 576, 1536, 9, 3, 64, 5000, 3, 16, 256

    def __init__(self, dtype, seed=200):
        self.dtype = dtype
        h, i, nq, nkv, d = self.H, self.I, self.NQ, self.NKV, self.D
        qkv = (nq + 2 * nkv) * d
        s = seed
        self.embed = randn(self.V, h, dtype=dtype, seed=s)
        self.layers = []
        for layer in range(self.LAYERS):
            b = s + 10 * (layer + 1)
            self.layers.append(dict(
                ln1=randn(h, dtype=dtype, seed=b + 1, scale=0.2) + 1.0,
                wqkv=randn(qkv, h, dtype=dtype, seed=b + 2, scale=1.0 / math.sqrt(h)),
                wo=randn(h, nq * d, dtype=dtype, seed=b + 3, scale=1.0 / math.sqrt(nq * d)),
                ln2=randn(h, dtype=dtype, seed=b + 4, scale=0.2) + 1.0,
                w13=randn(2 * i, h, dtype=dtype, seed=b + 5, scale=1.0 / math.sqrt(h)),
                w2=randn(h, i, dtype=dtype, seed=b + 6, scale=1.0 / math.sqrt(i))))
        self.norm = randn(h, dtype=dtype, seed=s + 7, scale=0.2) + 1.0
        self.lm_head = randn(self.V, h, dtype=dtype, seed=s + 8, scale=1.0 / math.sqrt(h))
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        cos, sin = reference.rope_tables(inv_freq, self.MAX_LEN)
        self.cos, self.sin = cos.to(DEV), sin.to(DEV)
        self.mb = self.MAX_LEN // self.BS
        self.nb = self.mb + 3
        self.kv0 = [make_cache(self.nb, self.BS, nkv, d, dtype, seed=s + 50 + layer)
                    for layer in range(self.LAYERS)]
        self.table0 = make_block_tables(1, self.mb, self.nb, seed=s + 9).to(DEV)
        self.ws = torch.empty(ops.attention_workspace_numel(1, nq, d, self.MAX_LEN),
                              dtype=torch.float32, device=DEV)
        torch.cuda.synchronize()

    def fresh_state(self, position, token):
        """Independent copies of every buffer the step writes, at a given start."""
        h, i, nq, d = self.H, self.I, self.NQ, self.D
        i32 = dict(dtype=torch.int32, device=DEV)
        st = dict(
            kv=[(k.clone(), v.clone()) for k, v in self.kv0],
            table=self.table0.clone(),
            token_in=torch.tensor([token], **i32), position=torch.tensor([position], **i32),
            temperature=torch.tensor([0.8], dtype=torch.float32, device=DEV),
            top_k=torch.tensor([50], **i32), top_p=torch.tensor([0.9], dtype=torch.float32, device=DEV),
            seed=torch.tensor([1234], dtype=torch.int64, device=DEV),
            token_hist=poisoned(1, self.MAX_LEN + 1, dtype=torch.int32),
            logits=poisoned(1, self.V, dtype=self.dtype),
            residual=poisoned(1, h, dtype=self.dtype), normed=poisoned(1, h, dtype=self.dtype),
            qkv=poisoned(1, (nq + 2 * self.NKV) * d, dtype=self.dtype),
            q=poisoned(1, nq, d, dtype=self.dtype), attn=poisoned(1, nq, d, dtype=self.dtype),
            proj=poisoned(1, h, dtype=self.dtype), gate_up=poisoned(1, 2 * i, dtype=self.dtype),
            act=poisoned(1, i, dtype=self.dtype))
        torch.cuda.synchronize()
        return st

    def step(self, st, sync_each=False):
        """One decode step (embedding .. sample), the op order of ModelRunner.decode_step."""
        def op(fn, *args):
            fn(*args)
            if sync_each:
                torch.cuda.synchronize()

        eps, scale = 1e-5, 1.0 / math.sqrt(self.D)
        op(ops.embedding, st["token_in"], self.embed, st["residual"])
        for n, lw in enumerate(self.layers):
            if n == 0:
                op(ops.rmsnorm, st["residual"], lw["ln1"], eps, st["normed"])
            else:
                op(ops.add_rmsnorm, st["proj"], st["residual"], lw["ln1"], eps, st["normed"])
            op(ops.linear, st["normed"], lw["wqkv"], st["qkv"])
            k, v = st["kv"][n]
            op(ops.rope_kv_write, st["qkv"], st["position"], self.cos, self.sin, k, v,
               st["table"][0], st["q"])
            op(ops.decode_attention, st["q"], k, v, st["table"], st["position"], scale, st["attn"],
               self.ws, self.MAX_LEN)
            op(ops.linear, st["attn"].view(1, -1), lw["wo"], st["proj"])
            op(ops.add_rmsnorm, st["proj"], st["residual"], lw["ln2"], eps, st["normed"])
            op(ops.linear, st["normed"], lw["w13"], st["gate_up"])
            op(ops.swiglu_linear, st["gate_up"], lw["w2"], st["proj"], st["act"])
        op(ops.add_rmsnorm, st["proj"], st["residual"], self.norm, eps, st["normed"])
        op(ops.linear, st["normed"], self.lm_head, st["logits"])
        op(ops.sample, st["logits"], st["temperature"], st["top_k"], st["top_p"], st["seed"],
           st["position"], st["token_in"], st["token_hist"])


def _assert_states_equal(a, b, what):
    for key in ("token_in", "position", "token_hist", "logits", "residual", "normed", "proj",
                "table"):
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
    for n, ((ka, va), (kb, vb)) in enumerate(zip(a["kv"], b["kv"])):
        assert torch.equal(ka, kb) and torch.equal(va, vb), f"{what}: KV cache of layer {n} differs"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pdl_decode_chain_graph_and_stream_match_serialized(dtype):
    """The whole decode-step kernel chain, 4 consecutive steps, three ways: every op followed by a
    device synchronize (no two kernels ever overlap), free-running on a stream (PDL overlaps
    neighbours when enabled), and captured once into a CUDA graph then replayed (programmatic
    edges). The kernels are deterministic, so any missing wait shows up as a bitwise difference."""
    model = _TinyDecoder(dtype)
    start_pos, token, steps = 100, 17, 4

    serial = model.fresh_state(start_pos, token)
    for _ in range(steps):
        model.step(serial, sync_each=True)
    # The sampled tokens are real tokens and the positions advanced.
    assert int(serial["position"]) == start_pos + steps
    assert 0 <= int(serial["token_in"]) < model.V

    stream = torch.cuda.Stream()
    free = model.fresh_state(start_pos, token)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(steps):
            model.step(free)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    _assert_states_equal(free, serial, "free-running stream")

    graphed = model.fresh_state(start_pos, token)
    warm = model.fresh_state(start_pos, token)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.step(warm)   # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        model.step(graphed)
    # Capture ran nothing: restore the start state the capture may not have touched, then replay.
    restart = model.fresh_state(start_pos, token)
    for key in ("token_in", "position", "token_hist", "logits", "residual", "normed", "proj"):
        graphed[key].copy_(restart[key])
    for (k, v), (k0, v0) in zip(graphed["kv"], restart["kv"]):
        k.copy_(k0)
        v.copy_(v0)
    torch.cuda.synchronize()
    for _ in range(steps):
        graph.replay()
    torch.cuda.synchronize()
    _assert_states_equal(graphed, serial, "graph replay")


# ----------------------------------------------------------------------------- batched engine rows
# A continuous-batching decode step runs B rows of different sequences and lengths, padded up to a
# batch bucket with rows whose position is < 0. Each op below must (a) match the reference on such
# batches, (b) leave padding rows' side effects out (no KV write, no sampled token), and (c) give a
# row bitwise the same result alone as inside a batch of 64 (batch invariance).

BATCHES = [1, 3, 17, 64]


def _batch_positions(batch: int, max_len: int, seed: int, pad_every: int = 5) -> list[int]:
    """Row positions (length - 1): block-edge lengths first, then random ones; every pad_every-th
    row from the third on is padding (-1, or -6 for variety)."""
    edges = [0, 14, 15, 16, 31, 32, 33, 63, 64, 256, max_len - 1]
    rnd = torch.randint(0, max_len, (batch,), generator=_gen(seed)).tolist()
    pos = [(edges[b] if b < len(edges) else rnd[b]) for b in range(batch)]
    for b in range(2, batch, pad_every):
        pos[b] = -1 if (b // pad_every) % 2 == 0 else -6
    return pos


ROPE_BATCH_HEADS = [(9, 3, 64), (32, 8, 128)]


def _rope_setup_batched(batch, nq, nkv, d, dtype, seed, max_positions=300, block_size=16):
    max_blocks = math.ceil(max_positions / block_size)
    num_blocks = batch * max_blocks + 3
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = reference.rope_tables(inv_freq, max_positions)
    qkv = randn(batch, (nq + 2 * nkv) * d, dtype=dtype, seed=seed)
    positions = torch.tensor(_batch_positions(batch, max_positions, seed + 1), dtype=torch.int32)
    tables = make_block_tables(batch, max_blocks, num_blocks, seed=seed + 2)     # [B, MB]
    sentinel = -768.0  # exact in bf16 and fp16
    k_cache = torch.full((num_blocks, block_size, nkv, d), sentinel, dtype=dtype, device=DEV)
    v_cache = torch.full((num_blocks, block_size, nkv, d), sentinel, dtype=dtype, device=DEV)
    return dict(qkv=qkv, positions=positions, tables=tables, cos=cos, sin=sin, k=k_cache,
                v=v_cache, sentinel=sentinel)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv,d", ROPE_BATCH_HEADS, ids=["9-3-64", "32-8-128"])
@pytest.mark.parametrize("batch", BATCHES)
def test_rope_kv_write_batched_tables_and_padding(dtype, nq, nkv, d, batch):
    s = _rope_setup_batched(batch, nq, nkv, d, dtype, seed=300 + batch)
    q_out = poisoned(batch, nq, d, dtype=dtype)
    k_ref, v_ref = s["k"].cpu().clone(), s["v"].cpu().clone()
    q_ref = torch.empty(batch, nq, d, dtype=dtype)
    reference.rope_kv_write(s["qkv"].cpu(), s["positions"], s["cos"], s["sin"], k_ref, v_ref,
                            s["tables"], q_ref)
    ops.rope_kv_write(s["qkv"], s["positions"].to(DEV), s["cos"].to(DEV), s["sin"].to(DEV),
                      s["k"], s["v"], s["tables"].to(DEV), q_out)
    torch.testing.assert_close(q_out.cpu(), q_ref, **TOL[dtype])
    torch.testing.assert_close(s["k"].cpu(), k_ref, **TOL[dtype])
    assert torch.equal(s["v"].cpu(), v_ref)
    live = s["positions"] >= 0
    # Padding rows: q_out exactly zero (it was NaN), and only live tokens' slots were written.
    assert torch.equal(q_out.cpu()[~live], torch.zeros(int((~live).sum()), nq, d, dtype=dtype))
    written = (s["k"].cpu() != s["sentinel"]).any(dim=-1).any(dim=-1)          # [NB, BS]
    written_v = (s["v"].cpu() != s["sentinel"]).any(dim=-1).any(dim=-1)
    assert int(written.sum()) == int(live.sum()) and torch.equal(written, written_v)
    if batch >= 3:
        assert int((~live).sum()) >= 1  # the case does contain padding


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv,d", ROPE_BATCH_HEADS, ids=["9-3-64", "32-8-128"])
def test_rope_kv_write_batch_invariance(dtype, nq, nkv, d):
    """B = 64 in one launch ([B, MB] tables) vs each row alone ([MB] table): bitwise equal q rows
    and caches."""
    batch = 64
    s = _rope_setup_batched(batch, nq, nkv, d, dtype, seed=320)
    pos_dev, tables_dev = s["positions"].to(DEV), s["tables"].to(DEV)
    cos, sin = s["cos"].to(DEV), s["sin"].to(DEV)
    k_alone, v_alone = s["k"].clone(), s["v"].clone()
    q_batch = poisoned(batch, nq, d, dtype=dtype)
    ops.rope_kv_write(s["qkv"], pos_dev, cos, sin, s["k"], s["v"], tables_dev, q_batch)
    for b in range(batch):
        q_one = poisoned(1, nq, d, dtype=dtype)
        ops.rope_kv_write(s["qkv"][b:b + 1], pos_dev[b:b + 1], cos, sin, k_alone, v_alone,
                          tables_dev[b], q_one)
        assert torch.equal(q_one[0], q_batch[b]), f"row {b}: q_out differs alone vs batched"
    torch.cuda.synchronize()
    assert torch.equal(k_alone, s["k"]) and torch.equal(v_alone, s["v"])


def test_rope_kv_write_rejects_bad_table_shapes():
    dtype, nq, nkv, d, t = torch.bfloat16, 4, 2, 64, 3
    qkv = randn(t, (nq + 2 * nkv) * d, dtype=dtype, seed=330)
    positions = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    cos, sin = (x.to(DEV) for x in reference.rope_tables(torch.ones(d // 2), 16))
    k_cache, v_cache = make_cache(4, 16, nkv, d, dtype, seed=331)
    q_out = poisoned(t, nq, d, dtype=dtype)
    for bad in (torch.zeros(2, 4, dtype=torch.int32, device=DEV),
                torch.zeros(3, 1, 4, dtype=torch.int32, device=DEV)):
        with pytest.raises(RuntimeError, match=r"block_table must be \[MB\] \(one sequence\) or "
                                               r"\[T, MB\] with T = 3"):
            ops.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, bad, q_out)
    with pytest.raises(RuntimeError, match="MB > 0"):
        ops.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache,
                          torch.zeros(3, 0, dtype=torch.int32, device=DEV), q_out)


DECODE_BATCH_HEADS = [(9, 3, 64), (32, 8, 128), (15, 5, 64)]
DECODE_BATCH_IDS = ["9-3-64", "32-8-128", "15-5-64"]


def _decode_batch_setup(positions, nq, nkv, d, dtype, block_size, max_len, seed):
    batch = len(positions)
    max_blocks = math.ceil(max_len / block_size)
    num_blocks = batch * max_blocks + 2
    k_cache, v_cache = make_cache(num_blocks, block_size, nkv, d, dtype, seed=seed)
    tables = make_block_tables(batch, max_blocks, num_blocks, seed=seed + 1).to(DEV)
    pos = torch.tensor(positions, dtype=torch.int32, device=DEV)
    q = randn(batch, nq, d, dtype=dtype, seed=seed + 2)
    return q, k_cache, v_cache, tables, pos


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv,d", DECODE_BATCH_HEADS, ids=DECODE_BATCH_IDS)
@pytest.mark.parametrize("batch", BATCHES)
def test_decode_attention_batched_mixed_lengths_and_padding(dtype, nq, nkv, d, batch):
    max_len, block_size = 1100, 16
    positions = _batch_positions(batch, max_len, seed=340 + batch)
    q, k_cache, v_cache, tables, pos = _decode_batch_setup(positions, nq, nkv, d, dtype,
                                                           block_size, max_len + 37, seed=341)
    scale = 1.0 / math.sqrt(d)
    out = run_decode(q, k_cache, v_cache, tables, pos, scale, max_len + 37)
    ref = decode_reference(q, k_cache, v_cache, tables, pos, scale)
    torch.testing.assert_close(out.cpu(), ref, **ATTN_TOL_LONG[dtype])
    pad = torch.tensor(positions) < 0
    assert torch.equal(out.cpu()[pad], torch.zeros(int(pad.sum()), nq, d, dtype=dtype))
    if batch >= 3:
        assert bool(pad.any())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("nq,nkv,d", DECODE_BATCH_HEADS, ids=DECODE_BATCH_IDS)
def test_decode_attention_batch_invariance(dtype, nq, nkv, d):
    """Each row of a B = 64 launch (max_len 3000) equals, bitwise, the row computed alone, with a
    launch sized for its own length and with one sized for the batch's max_len."""
    batch, max_len, block_size = 64, 3000, 32
    positions = _batch_positions(batch, max_len, seed=350)
    q, k_cache, v_cache, tables, pos = _decode_batch_setup(positions, nq, nkv, d, dtype,
                                                           block_size, max_len, seed=351)
    scale = 1.0 / math.sqrt(d)
    out = run_decode(q, k_cache, v_cache, tables, pos, scale, max_len)
    # Splitting really happens in this case (else the test would be vacuous).
    assert ops.decode_attention_splits(batch, nkv, max_len) > 1
    for b in range(batch):
        own = max(1, positions[b] + 1)
        for launch_len in ((own, max_len) if b % 8 == 0 else (own,)):
            alone = run_decode(q[b:b + 1], k_cache, v_cache, tables[b:b + 1], pos[b:b + 1], scale,
                               launch_len)
            assert torch.equal(alone[0], out[b]), (
                f"row {b} (position {positions[b]}): alone with max_len {launch_len} differs")


def test_decode_attention_splits_do_not_depend_on_batch():
    for nkv in (1, 3, 8, 32):
        for max_len in (1, 32, 33, 100, 1000, 4096, 16384, 100000):
            one = ops.decode_attention_splits(1, nkv, max_len)
            # Batch 1 keeps the split choice it always had.
            assert one == max(1, min(math.ceil(max_len / 32), math.ceil(264 / nkv), 256))
            for batch in (2, 17, 64, 512):
                assert ops.decode_attention_splits(batch, nkv, max_len) == one


@pytest.mark.parametrize("nq,nkv", [(9, 3), (32, 32)])
def test_decode_attention_exact_workspace_for_known_kv_heads(nq, nkv):
    """attention_workspace_numel(..., num_kv_heads) is the exact need: a workspace of precisely
    that size (NaN-poisoned) serves the launch, and it never exceeds the any-nkv bound."""
    dtype, d, batch, max_len = torch.bfloat16, 64, 17, 700
    exact = ops.attention_workspace_numel(batch, nq, d, max_len, nkv)
    assert 0 < exact <= ops.attention_workspace_numel(batch, nq, d, max_len)
    positions = _batch_positions(batch, max_len, seed=360)
    q, k_cache, v_cache, tables, pos = _decode_batch_setup(positions, nq, nkv, d, dtype, 16,
                                                           max_len, seed=361)
    out = poisoned(batch, nq, d, dtype=dtype)
    ws = torch.full((exact,), float("nan"), dtype=torch.float32, device=DEV)
    ops.decode_attention(q, k_cache, v_cache, tables, pos, 0.125, out, ws, max_len)
    ref = decode_reference(q, k_cache, v_cache, tables, pos, 0.125)
    torch.testing.assert_close(out.cpu(), ref, **ATTN_TOL[dtype])
    with pytest.raises(RuntimeError, match="needs a float32 workspace"):
        ops.decode_attention(q, k_cache, v_cache, tables, pos, 0.125, out, ws[:exact - 1], max_len)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_attention_batched_graph_replay_with_padding(dtype):
    """Captured once for (B = 17, max_len = 600), replayed with new lengths and padding rows."""
    nq, nkv, d, batch, max_len = 9, 3, 64, 17, 600
    positions = _batch_positions(batch, max_len, seed=370)
    q, k_cache, v_cache, tables, pos = _decode_batch_setup(positions, nq, nkv, d, dtype, 16,
                                                           max_len, seed=371)
    out = poisoned(batch, nq, d, dtype=dtype)
    ws = torch.empty(ops.attention_workspace_numel(batch, nq, d, max_len), dtype=torch.float32,
                     device=DEV)
    scale = 1.0 / math.sqrt(d)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.decode_attention(q, k_cache, v_cache, tables, pos, scale, out, ws, max_len)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        ops.decode_attention(q, k_cache, v_cache, tables, pos, scale, out, ws, max_len)
    for seed in (372, 373, 374):
        new = _batch_positions(batch, max_len, seed=seed, pad_every=3)
        pos.copy_(torch.tensor(new, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_reference(q, k_cache, v_cache, tables, pos, scale)
        torch.testing.assert_close(out.cpu(), ref, **ATTN_TOL[dtype])
        pad = torch.tensor(new) < 0
        assert torch.equal(out.cpu()[pad], torch.zeros(int(pad.sum()), nq, d, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sample_tiny_temperatures_are_greedy_and_padding_rows_write_nothing(dtype):
    vocab, hist_len = 32003, 64
    temps = [1e-38, 1e-30, 1e-7, 9.9e-6, 0.0, float("nan"), 0.8, 1e-38, 1.0, 1e-20]
    rows = len(temps)
    start = [5, 0, 17, -1, 40, 8, 2, -3, 9, 61]
    logits = randn(rows, vocab, dtype=dtype, seed=380, scale=3.0)
    for b in range(rows):  # a tied maximum, first copy at a row-dependent index
        first = (b * 997) % (vocab - 10)
        logits[b, first] = 50.0
        logits[b, first + 7] = 50.0
        logits[b, vocab - 1] = 49.0  # the last id, where an overflowed draw used to land
    buf = sample_buffers(rows, hist_len, start, temps, [0, 40] * 5, [1.0, 0.9] * 5,
                         list(range(rows)))
    run_sample(logits, buf)
    pos, tok, hist = buf["positions"].cpu(), buf["token_in"].cpu(), buf["token_hist"].cpu()
    logits_cpu = logits.cpu()
    for b in range(rows):
        if start[b] < 0:
            assert int(pos[b]) == start[b] and int(tok[b]) == -7
            assert torch.equal(hist[b], torch.full((hist_len,), -7, dtype=torch.int32))
            continue
        assert int(pos[b]) == start[b] + 1 and int(hist[b, start[b] + 1]) == int(tok[b])
        expect = reference.sample_row(logits_cpu[b], temps[b], [0, 40][b % 2], [1.0, 0.9][b % 2],
                                      b, start[b])
        if reference.is_greedy(temps[b]):
            assert int(tok[b]) == (b * 997) % (vocab - 10) == expect, f"row {b} temp {temps[b]}"
        else:
            keep, _ = reference.sampling_support(logits_cpu[b], temps[b], [0, 40][b % 2],
                                                 [1.0, 0.9][b % 2])
            assert bool(keep[int(tok[b])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sample_batch_invariance(dtype):
    """A B = 64 launch (greedy, tiny-temperature and seeded sampling rows, padding rows) gives each
    row the token it gets alone; positions and histories follow."""
    rows, vocab, hist_len = 64, 49152, 128
    logits = randn(rows, vocab, dtype=dtype, seed=390, scale=3.0)
    logits[::9, : vocab // 8] = logits[::9, :1]  # tie-heavy rows
    configs = [SAMPLING_CONFIGS[b % len(SAMPLING_CONFIGS)] for b in range(rows)]
    configs[5] = (0.0, 0, 1.0)
    configs[11] = (1e-30, 50, 0.9)
    gen = _gen(391)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (rows,), generator=gen).tolist()
    start = torch.randint(0, hist_len - 1, (rows,), generator=gen).tolist()
    for b in range(3, rows, 7):
        start[b] = -1
    temps, top_ks, top_ps = ([c[i] for c in configs] for i in range(3))
    buf = sample_buffers(rows, hist_len, start, temps, top_ks, top_ps, seeds)
    run_sample(logits, buf)
    for b in range(rows):
        one = sample_buffers(1, hist_len, [start[b]], [temps[b]], [top_ks[b]], [top_ps[b]],
                             [seeds[b]])
        run_sample(logits[b:b + 1].clone(), one)
        assert int(one["token_in"][0]) == int(buf["token_in"][b]), f"row {b}"
        assert int(one["positions"][0]) == int(buf["positions"][b])
        assert torch.equal(one["token_hist"][0], buf["token_hist"][b])
    pad = torch.tensor(start) < 0
    assert torch.equal(buf["positions"].cpu()[pad], torch.tensor(start, dtype=torch.int32)[pad])
    assert bool((buf["token_in"].cpu()[pad] == -7).all())
    live_tokens = buf["token_in"].cpu()[~pad]
    assert len(set(live_tokens.tolist())) > 1  # it samples different tokens per row


# (N, K): one warp per group with two rows (3072 x 576), 2 / 4 warps per group (576 x 1536,
# 4096 x 4096), the multi-batch deep row (4096 x 11008 at TB = 8), an odd N with a partial last
# tile (1001 x 200).
INVARIANT_SHAPES = [(576, 576), (3072, 576), (576, 1536), (4096, 4096), (1001, 200), (4096, 11008)]
INVARIANT_TOKENS = [1, 3, 8, 9, 17, 64, 513]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,k", INVARIANT_SHAPES)
def test_linear_invariant_matches_reference_and_rows_alone(dtype, n, k):
    w = randn(n, k, dtype=dtype, seed=400, scale=1.0 / math.sqrt(k))
    x_all = randn(max(INVARIANT_TOKENS), k, dtype=dtype, seed=401)
    alone = poisoned(x_all.shape[0], n, dtype=dtype)
    for t in range(x_all.shape[0]):  # each row alone (T = 1), from its own fresh buffer
        row = x_all[t:t + 1].clone()
        ops.linear_invariant(row, w, alone[t:t + 1])
    for tokens in INVARIANT_TOKENS:
        x = x_all[:tokens].clone()
        out = poisoned(tokens, n, dtype=dtype)
        ops.linear_invariant(x, w, out)
        ref = torch.empty(tokens, n, dtype=dtype)
        reference.linear(x.cpu(), w.cpu(), ref)
        torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])
        bad = (out != alone[:tokens]).any(dim=1).nonzero().flatten().tolist()
        assert not bad, f"T = {tokens}: rows {bad[:8]} differ from the same rows computed alone"
        if tokens <= 8:  # the same kernel as linear's GEMV path
            plain = poisoned(tokens, n, dtype=dtype)
            ops.linear(x, w, plain)
            assert torch.equal(plain, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,inter", [(576, 1536), (1001, 200), (1061, 4104), (4096, 11008)])
def test_swiglu_linear_invariant_matches_reference_and_rows_alone(dtype, n, inter):
    w = randn(n, inter, dtype=dtype, seed=410, scale=1.0 / math.sqrt(inter))
    gu_all = randn(max(INVARIANT_TOKENS), 2 * inter, dtype=dtype, seed=411, scale=3.0)
    alone = poisoned(gu_all.shape[0], n, dtype=dtype)
    scratch = poisoned(1, inter, dtype=dtype)
    for t in range(gu_all.shape[0]):
        ops.swiglu_linear_invariant(gu_all[t:t + 1].clone(), w, alone[t:t + 1], scratch)
    assert torch.isnan(scratch).all().item()  # the fused kernel served every row
    for tokens in INVARIANT_TOKENS:
        gu = gu_all[:tokens].clone()
        out = poisoned(tokens, n, dtype=dtype)
        act = poisoned(tokens, inter, dtype=dtype)
        ops.swiglu_linear_invariant(gu, w, out, act)
        ref = torch.empty(tokens, n, dtype=dtype)
        reference.swiglu_linear(gu.cpu(), w.cpu(), ref)
        torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])
        bad = (out != alone[:tokens]).any(dim=1).nonzero().flatten().tolist()
        assert not bad, f"T = {tokens}: rows {bad[:8]} differ from the same rows computed alone"
        # Bitwise swiglu then linear_invariant.
        two_step = poisoned(tokens, n, dtype=dtype)
        ops.swiglu(gu, act)
        ops.linear_invariant(act, w, two_step)
        assert torch.equal(out, two_step)


def test_swiglu_linear_invariant_fallback_for_unaligned_views():
    """A gate_up view 2 bytes past alignment takes swiglu + linear_invariant through act: still
    bitwise the fused result of an aligned copy."""
    dtype, tokens, n, inter = torch.bfloat16, 19, 300, 64
    base = randn(tokens * 2 * inter + 1, dtype=dtype, seed=420, scale=3.0)
    gu = base[1:].view(tokens, 2 * inter)
    w = randn(n, inter, dtype=dtype, seed=421, scale=0.125)
    out = poisoned(tokens, n, dtype=dtype)
    act = poisoned(tokens, inter, dtype=dtype)
    ops.swiglu_linear_invariant(gu, w, out, act)
    assert not torch.isnan(act).any().item()  # the fallback wrote the intermediate
    fused = poisoned(tokens, n, dtype=dtype)
    ops.swiglu_linear_invariant(gu.clone(), w, fused, poisoned(tokens, inter, dtype=dtype))
    assert torch.equal(out, fused)


def test_linear_invariant_refuses_what_it_cannot_serve():
    w = randn(16, 20, dtype=torch.bfloat16, seed=430)
    with pytest.raises(RuntimeError, match=r"K % 8 == 0 .* got K = 20"):
        ops.linear_invariant(randn(9, 20, dtype=torch.bfloat16, seed=431), w,
                             poisoned(9, 16, dtype=torch.bfloat16))
    base = randn(3 * 24 + 1, dtype=torch.bfloat16, seed=432)
    w24 = randn(16, 24, dtype=torch.bfloat16, seed=433)
    with pytest.raises(RuntimeError, match="x misaligned"):
        ops.linear_invariant(base[1:].view(3, 24), w24, poisoned(3, 16, dtype=torch.bfloat16))
    gu = randn(2, 48, dtype=torch.bfloat16, seed=434)
    with pytest.raises(RuntimeError, match="overlap"):
        torch.ops.custom_kernels.swiglu_linear_invariant(gu, w24, gu.view(-1)[:32].view(2, 16))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_invariant_graph_replay(dtype):
    """Captured for T = 40 (5 token groups), replayed with new inputs: equal to eager, and the
    eager rows equal the rows alone."""
    n, k, tokens = 960, 576, 40
    stream = torch.cuda.Stream()
    w = randn(n, k, dtype=dtype, seed=440, scale=1.0 / math.sqrt(k))
    x = randn(tokens, k, dtype=dtype, seed=441)
    out = poisoned(tokens, n, dtype=dtype)
    torch.cuda.synchronize()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.linear_invariant(x, w, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        ops.linear_invariant(x, w, out)
    for seed in (442, 443):
        x.copy_(randn(tokens, k, dtype=dtype, seed=seed))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = poisoned(tokens, n, dtype=dtype)
        ops.linear_invariant(x, w, eager)
        assert torch.equal(out, eager)
        for t in (0, 7, 8, 39):
            one = poisoned(1, n, dtype=dtype)
            ops.linear_invariant(x[t:t + 1].clone(), w, one)
            assert torch.equal(one[0], out[t])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden", [576, 4096, 200])
def test_norms_and_embedding_batch_invariance(dtype, hidden):
    """The other row ops of the batched step (embedding, rmsnorm, add_rmsnorm: one block per row,
    sized by H only) give each row of a B = 64 launch the bits it gets alone."""
    batch, vocab = 64, 1000
    table = randn(vocab, hidden, dtype=dtype, seed=450)
    ids = torch.randint(0, vocab, (batch,), generator=_gen(451)).to(torch.int32).to(DEV)
    x = randn(batch, hidden, dtype=dtype, seed=452)
    residual = randn(batch, hidden, dtype=dtype, seed=453, scale=3.0)
    w = randn(hidden, dtype=dtype, seed=454)
    emb, normed, added = (poisoned(batch, hidden, dtype=dtype) for _ in range(3))
    res_b = residual.clone()
    ops.embedding(ids, table, emb)
    ops.rmsnorm(x, w, 1e-5, normed)
    ops.add_rmsnorm(x, res_b, w, 1e-5, added)
    for b in range(batch):
        e1, n1, a1 = (poisoned(1, hidden, dtype=dtype) for _ in range(3))
        r1 = residual[b:b + 1].clone()
        ops.embedding(ids[b:b + 1], table, e1)
        ops.rmsnorm(x[b:b + 1].clone(), w, 1e-5, n1)
        ops.add_rmsnorm(x[b:b + 1].clone(), r1, w, 1e-5, a1)
        assert torch.equal(e1[0], emb[b]) and torch.equal(n1[0], normed[b]), b
        assert torch.equal(a1[0], added[b]) and torch.equal(r1[0], res_b[b]), b
