"""Hand-derived and independently computed cases for custom_kernels/reference.py (the op spec).

Every expected value here is computed by hand, by an independent formula (fp64 loops, dense
attention, HF transformers' own modules), never by calling the function under test. Inputs are
random (fixed generators), of odd sizes, never all zeros; outputs are poisoned before each op so an
op that forgets to write shows up.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb)

from custom_kernels import reference as ref

DTYPES = [torch.float32, torch.bfloat16]
# Per-dtype tolerances against an fp64 (or HF) oracle: fp32 differs in summation order only; bf16
# is dominated by the final rounding of the output (2**-8 relative), with margin.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float32) * scale).to(dtype)


def poison_like(t: torch.Tensor, seed: int = 999) -> torch.Tensor:
    """A non-zero random fill, so 'not written' and 'written zero' are both visible."""
    return (torch.randn(t.shape, generator=gen(seed)) * 7.0 + 3.0).to(t.dtype)


# ============================================================================ embedding

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_embedding_gathers_rows(dtype, id_dtype):
    V, H = 37, 13
    table = randn(V, H, dtype=dtype, seed=1)
    ids = torch.tensor([5, 0, 36, 5, 17, 1, 36], dtype=id_dtype)   # repeats, first and last row
    out = poison_like(torch.empty(len(ids), H, dtype=dtype))
    ref.embedding(ids, table, out)
    expected = torch.stack([table[int(i)] for i in ids.tolist()])
    assert torch.equal(out, expected)


# ============================================================================ norms

def _rms_fp64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * w.double()


def _hf_rmsnorm(weight: torch.Tensor, eps: float) -> LlamaRMSNorm:
    m = LlamaRMSNorm(weight.shape[0], eps=eps)
    with torch.no_grad():
        m.weight.copy_(weight.float())
    return m.to(weight.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 7), (5, 33), (3, 129)])
def test_rmsnorm_matches_formula_and_hf(dtype, T, H):
    eps = 1e-5
    x = randn(T, H, dtype=dtype, seed=2, scale=3.0)
    w = randn(H, dtype=dtype, seed=3) + 1.0
    out = poison_like(x)
    x_before = x.clone()
    ref.rmsnorm(x, w, eps, out)
    assert torch.equal(x, x_before)                       # input untouched
    torch.testing.assert_close(out.double(), _rms_fp64(x, w, eps), **TOL[dtype])
    with torch.no_grad():
        hf = _hf_rmsnorm(w, eps)(x)
    assert hf.dtype == dtype
    # Same rounding points as HF (normalize in fp32, round, multiply in the dtype): bit-identical.
    assert torch.equal(out, hf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_bf16_rounds_before_weight_multiply(dtype):
    """HF rounds the normalized value to the dtype before multiplying by the weight; a single
    fp32 computation rounded once differs for bf16 on these inputs, so the test discriminates."""
    T, H, eps = 6, 41, 1e-6
    x = randn(T, H, dtype=dtype, seed=4, scale=2.0)
    w = randn(H, dtype=dtype, seed=5) * 1.7 + 0.3
    out = poison_like(x)
    ref.rmsnorm(x, w, eps, out)
    xf = x.float()
    two_round = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    assert torch.equal(out, two_round)
    if dtype == torch.bfloat16:
        one_round = (w.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        assert not torch.equal(two_round, one_round)      # the inputs do tell the orders apart


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 9), (4, 67)])
def test_add_rmsnorm_updates_residual_in_place(dtype, T, H):
    eps = 1e-6
    x = randn(T, H, dtype=dtype, seed=6)
    res0 = randn(T, H, dtype=dtype, seed=7, scale=2.0)
    w = randn(H, dtype=dtype, seed=8) + 1.0
    residual = res0.clone()
    ptr = residual.data_ptr()
    out = poison_like(x)
    x_before = x.clone()
    ref.add_rmsnorm(x, residual, w, eps, out)

    assert residual.data_ptr() == ptr and residual.dtype == dtype
    assert torch.equal(x, x_before)
    # HF's residual add happens in the model dtype (one rounding of the fp32-exact sum).
    summed = (res0.double() + x.double()).to(dtype)
    assert torch.equal(residual, summed)
    with torch.no_grad():
        assert torch.equal(out, _hf_rmsnorm(w, eps)(summed))
    torch.testing.assert_close(out.double(), _rms_fp64(summed, w, eps), **TOL[dtype])


# ============================================================================ GEMM and MLP

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,N", [(1, 37, 11), (5, 64, 3), (3, 9, 129)])
def test_linear_is_x_times_weight_transposed(dtype, T, K, N):
    x = randn(T, K, dtype=dtype, seed=9)
    w = randn(N, K, dtype=dtype, seed=10)
    out = poison_like(torch.empty(T, N, dtype=dtype))
    ref.linear(x, w, out)
    expected = (x.double()[:, None, :] * w.double()[None, :, :]).sum(-1)   # [T, N]
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2e-2)
    torch.testing.assert_close(out.double(), expected, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 7), (5, 23), (2, 257)])
def test_swiglu_gate_first_then_up(dtype, T, I):
    gate = randn(T, I, dtype=dtype, seed=11, scale=3.0)
    up = randn(T, I, dtype=dtype, seed=12, scale=2.0)
    gate_up = torch.cat([gate, up], dim=-1)
    out = poison_like(torch.empty(T, I, dtype=dtype))
    ref.swiglu(gate_up, out)
    # HF's LlamaMLP: act_fn(gate_proj(x)) * up_proj(x), silu rounded to the dtype first.
    # bf16: bit-exact. fp32: silu's vectorized and strided CPU paths may differ by an ulp.
    exact = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, F.silu(gate) * up, **exact)
    g = gate.double()
    torch.testing.assert_close(out.double(), g / (1.0 + torch.exp(-g)) * up.double(), **TOL[dtype])


def test_swiglu_bf16_rounding_order_is_silu_then_product():
    T, I = 8, 97
    gate = randn(T, I, dtype=torch.bfloat16, seed=13, scale=3.0)
    up = randn(T, I, dtype=torch.bfloat16, seed=14, scale=3.0)
    out = poison_like(gate)
    ref.swiglu(torch.cat([gate, up], -1), out)
    silu_first = F.silu(gate.float()).to(torch.bfloat16) * up
    fused = (F.silu(gate.float()) * up.float()).to(torch.bfloat16)
    assert torch.equal(out, silu_first)
    assert not torch.equal(out, fused)      # the inputs are rich enough to tell the orders apart


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I,N", [(1, 24, 9), (3, 7, 5), (8, 40, 33)])
def test_swiglu_linear_is_swiglu_then_linear(dtype, T, I, N):
    # Independent oracle: HF's MLP tail, act_fn(gate) * up (silu rounded to the dtype first) into a
    # dtype intermediate, then the down projection in fp64 and rounded once.
    gate = randn(T, I, dtype=dtype, seed=15, scale=3.0)
    up = randn(T, I, dtype=dtype, seed=16, scale=2.0)
    w = randn(N, I, dtype=dtype, seed=17, scale=1.0 / math.sqrt(I))
    out = poison_like(torch.empty(T, N, dtype=dtype))
    ref.swiglu_linear(torch.cat([gate, up], -1), w, out)
    act = F.silu(gate.float()).to(dtype) * up                          # [T, I] in the dtype
    expected = (act.double()[:, None, :] * w.double()[None, :, :]).sum(-1)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2e-2)
    torch.testing.assert_close(out.double(), expected, **tol)


def test_ops_swiglu_linear_cpu_matches_reference_bitwise():
    # ops.swiglu_linear on the CPU goes through the caller's scratch; the result must equal the
    # reference composition (and the old swiglu-then-linear model path) exactly.
    from custom_kernels import ops
    T, I, N = 3, 48, 17
    gate_up = randn(T, 2 * I, dtype=torch.bfloat16, seed=18, scale=3.0)
    w = randn(N, I, dtype=torch.bfloat16, seed=19, scale=0.2)
    out = poison_like(torch.empty(T, N, dtype=torch.bfloat16))
    act = poison_like(torch.empty(T, I, dtype=torch.bfloat16))
    ops.swiglu_linear(gate_up, w, out, act)
    expected = torch.empty(T, N, dtype=torch.bfloat16)
    ref.swiglu_linear(gate_up, w, expected)
    assert torch.equal(out, expected)
    two_step_act = torch.empty(T, I, dtype=torch.bfloat16)
    ref.swiglu(gate_up, two_step_act)
    assert torch.equal(act, two_step_act)


# ============================================================================ RoPE + paged KV write

def _hf_rope(head_dim: int, theta: float, max_pos: int):
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=theta,
                      intermediate_size=8, num_hidden_layers=1, vocab_size=16)
    return LlamaRotaryEmbedding(cfg)


def test_rope_tables_hand_values():
    inv_freq = torch.tensor([math.pi / 2, math.pi / 4, math.pi / 6, math.pi], dtype=torch.float32)
    cos, sin = ref.rope_tables(inv_freq, 5)
    assert cos.shape == (5, 4) and sin.shape == (5, 4)
    assert cos.dtype == torch.float32 and sin.dtype == torch.float32
    assert torch.equal(cos[0], torch.ones(4)) and torch.equal(sin[0], torch.zeros(4))
    r2, r3 = math.sqrt(2) / 2, math.sqrt(3) / 2
    torch.testing.assert_close(cos[1], torch.tensor([0.0, r2, r3, -1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[1], torch.tensor([1.0, r2, 0.5, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[2], torch.tensor([-1.0, 0.0, 0.5, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[2], torch.tensor([0.0, 1.0, r3, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[3], torch.tensor([0.0, -r2, 0.0, -1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[3], torch.tensor([-1.0, r2, 1.0, 0.0]), atol=1e-6, rtol=0)


def test_rope_tables_match_hf_rotary_embedding():
    D, P, theta = 64, 300, 10000.0
    rot = _hf_rope(D, theta, P)
    cos, sin = ref.rope_tables(rot.inv_freq, P)
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = rot(x, torch.arange(P)[None])       # [1, P, D] = cat(freqs, freqs)
    for half in (slice(0, D // 2), slice(D // 2, D)):
        torch.testing.assert_close(cos, hf_cos[0, :, half], rtol=0, atol=2e-6)
        torch.testing.assert_close(sin, hf_sin[0, :, half], rtol=0, atol=2e-6)


def _rope_setup(dtype, nq=6, nkv=2, D=10, NB=7, BS=4, MB=5, seed=20):
    g = gen(seed)
    table = torch.randperm(NB, generator=g)[:MB].to(torch.int32)   # shuffled, not identity
    assert not torch.equal(table.long(), torch.arange(MB))
    k_cache = (torch.randn(NB, BS, nkv, D, generator=g) * 5 + 2).to(dtype)
    v_cache = (torch.randn(NB, BS, nkv, D, generator=g) * 5 - 2).to(dtype)
    return table, k_cache, v_cache


def _hf_rotate(x: torch.Tensor, cos_full: torch.Tensor, sin_full: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; HF layout q [B, heads, T, D], cos [B, T, D]."""
    xh = x.permute(1, 0, 2)[None]
    qe, _ = apply_rotary_pos_emb(xh, xh, cos_full[None], sin_full[None], unsqueeze_dim=1)
    return qe[0].permute(1, 0, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_write_against_hf_and_cache_slots(dtype):
    nq, nkv, D, NB, BS, MB = 6, 2, 10, 7, 4, 5
    theta, P = 500.0, MB * BS
    table, k_cache, v_cache = _rope_setup(dtype, nq, nkv, D, NB, BS, MB)
    positions = torch.tensor([0, 3, 4, 9, 19], dtype=torch.int32)   # block edges, last slot
    T = len(positions)
    qkv = randn(T, (nq + 2 * nkv) * D, dtype=dtype, seed=21, scale=2.0)
    rot = _hf_rope(D, theta, P)
    cos, sin = ref.rope_tables(rot.inv_freq, P)
    k0, v0 = k_cache.clone(), v_cache.clone()
    q_out = poison_like(torch.empty(T, nq, D, dtype=dtype))
    qkv_before = qkv.clone()
    ref.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, table, q_out)
    assert torch.equal(qkv, qkv_before)

    q = qkv[:, : nq * D].view(T, nq, D)
    k = qkv[:, nq * D: (nq + nkv) * D].view(T, nkv, D)
    v = qkv[:, (nq + nkv) * D:].view(T, nkv, D)
    # HF in fp32 (its cos/sin are cast to x.dtype; in fp32 that is a no-op).
    hf_cos, hf_sin = rot(torch.zeros(1), positions.long()[None])
    q_hf = _hf_rotate(q.float(), hf_cos[0], hf_sin[0])
    k_hf = _hf_rotate(k.float(), hf_cos[0], hf_sin[0])
    # bf16: the reference rotates in fp32 and rounds once; HF rounds cos/sin and every product to
    # bf16, so the two agree to a couple of bf16 ulps only.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    torch.testing.assert_close(q_out.float(), q_hf, **tol)

    # Exactly the addressed slots change, through the shuffled table.
    touched = torch.zeros(NB, BS, dtype=torch.bool)
    for t, p in enumerate(positions.tolist()):
        blk, slot = int(table[p // BS]), p % BS
        touched[blk, slot] = True
        torch.testing.assert_close(k_cache[blk, slot].float(), k_hf[t], **tol)
        assert torch.equal(v_cache[blk, slot], v[t])           # v is copied, never rotated
    assert torch.equal(k_cache[~touched], k0[~touched])
    assert torch.equal(v_cache[~touched], v0[~touched])
    assert not torch.equal(k_cache[touched], k0[touched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_position_zero_is_identity(dtype):
    nq, nkv, D = 3, 1, 8
    table, k_cache, v_cache = _rope_setup(dtype, nq, nkv, D, NB=3, BS=2, MB=3)
    qkv = randn(1, (nq + 2 * nkv) * D, dtype=dtype, seed=22)
    cos, sin = ref.rope_tables(torch.tensor([1.0, 0.3, 0.01, 1e-4]), 6)
    q_out = poison_like(torch.empty(1, nq, D, dtype=dtype))
    ref.rope_kv_write(qkv, torch.tensor([0], dtype=torch.int32), cos, sin, k_cache, v_cache,
                      table, q_out)
    assert torch.equal(q_out.reshape(-1), qkv[0, : nq * D])
    blk = int(table[0])
    assert torch.equal(k_cache[blk, 0].reshape(-1), qkv[0, nq * D: (nq + nkv) * D])
    assert torch.equal(v_cache[blk, 0].reshape(-1), qkv[0, (nq + nkv) * D:])


def test_rope_quarter_turn_pairs_i_with_i_plus_half():
    """D=4 pairs (x0, x2) and (x1, x3). inv_freq[0] = pi/2 at position 1 is a quarter turn:
    (x0, x2) -> (-x2, x0); inv_freq[1] = pi is a half turn: (x1, x3) -> (-x1, -x3)."""
    nq, nkv, D = 2, 1, 4
    table, k_cache, v_cache = _rope_setup(torch.float32, nq, nkv, D, NB=2, BS=3, MB=2)
    cos, sin = ref.rope_tables(torch.tensor([math.pi / 2, math.pi]), 4)
    qkv = randn(1, (nq + 2 * nkv) * D, seed=23)
    q_out = poison_like(torch.empty(1, nq, D))
    ref.rope_kv_write(qkv, torch.tensor([1], dtype=torch.int32), cos, sin, k_cache, v_cache,
                      table, q_out)
    q = qkv[0, : nq * D].view(nq, D)
    expected = torch.stack([-q[:, 2], -q[:, 1], q[:, 0], -q[:, 3]], dim=-1)
    torch.testing.assert_close(q_out[0], expected, rtol=0, atol=1e-6)
    k = qkv[0, nq * D: (nq + nkv) * D].view(nkv, D)
    expected_k = torch.stack([-k[:, 2], -k[:, 1], k[:, 0], -k[:, 3]], dim=-1)
    torch.testing.assert_close(k_cache[int(table[0]), 1], expected_k, rtol=0, atol=1e-6)


# ============================================================================ attention

def _dense_attention_fp64(q, k_cache, v_cache, table, q_positions, scale):
    """Independent oracle. q [Tq, nq, D]; query i sits at q_positions[i] and sees 0..that position.
    Gathers K/V position by position through the table, GQA head h uses kv head h // (nq/nkv)."""
    nq, bs, nkv = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    group = nq // nkv
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, qp in enumerate(q_positions):
        ks = torch.stack([k_cache[int(table[p // bs]), p % bs] for p in range(qp + 1)]).double()
        vs = torch.stack([v_cache[int(table[p // bs]), p % bs] for p in range(qp + 1)]).double()
        for h in range(nq):
            g = h // group
            s = (ks[:, g, :] @ q[i, h].double()) * scale            # [S]
            p = torch.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vs[:, g, :]
    return out


HEADS = [(6, 2), (4, 4), (5, 1)]          # group 3, plain MHA, MQA


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nkv", HEADS)
@pytest.mark.parametrize("length", [1, 3, 4, 5, 8, 9, 20])   # BS = 4: edges and a full table
def test_decode_attention_single_row(dtype, nq, nkv, length):
    D, NB, BS, MB = 9, 11, 4, 5
    g = gen(30 + length)
    table = torch.randperm(NB, generator=g)[:MB].to(torch.int32)
    k_cache = (torch.randn(NB, BS, nkv, D, generator=g) * 1.5).to(dtype)
    v_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    q = (torch.randn(1, nq, D, generator=g) * 1.5).to(dtype)
    scale = D ** -0.5
    out = poison_like(q)
    ref.decode_attention(q, k_cache, v_cache, table[None], torch.tensor([length - 1], dtype=torch.int32),
                         scale, out)
    expected = _dense_attention_fp64(q[0][None], k_cache, v_cache, table, [length - 1], scale)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_two_rows_different_lengths(dtype):
    nq, nkv, D, NB, BS, MB = 6, 2, 9, 12, 4, 5
    g = gen(40)
    perm = torch.randperm(NB, generator=g).to(torch.int32)
    tables = torch.stack([perm[:MB], perm[MB: 2 * MB]])              # disjoint, shuffled
    k_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    v_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    q = torch.randn(2, nq, D, generator=g).to(dtype)
    positions = torch.tensor([12, 4], dtype=torch.int32)            # lengths 13 and 5
    scale = 0.37
    out = poison_like(q)
    ref.decode_attention(q, k_cache, v_cache, tables, positions, scale, out)
    for b in range(2):
        expected = _dense_attention_fp64(q[b][None], k_cache, v_cache, tables[b],
                                         [int(positions[b])], scale)
        torch.testing.assert_close(out[b].double(), expected[0], **TOL[dtype])
    # Rows are independent: swapping the rows swaps the outputs.
    out2 = poison_like(q, seed=5)
    ref.decode_attention(q.flip(0), k_cache, v_cache, tables.flip(0), positions.flip(0), scale, out2)
    assert torch.equal(out2, out.flip(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start_pos,T", [(0, 7), (0, 1), (5, 6), (8, 3), (3, 1)])
@pytest.mark.parametrize("nq,nkv", [(6, 2), (3, 3)])
def test_prefill_attention_causal(dtype, start_pos, T, nq, nkv):
    D, NB, BS, MB = 7, 9, 4, 4
    g = gen(50 + start_pos * 10 + T)
    table = torch.randperm(NB, generator=g)[:MB].to(torch.int32)
    k_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)   # holds earlier tokens too
    v_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    q = torch.randn(T, nq, D, generator=g).to(dtype)
    scale = D ** -0.5
    out = poison_like(q)
    ref.prefill_attention(q, k_cache, v_cache, table, start_pos, scale, out)
    expected = _dense_attention_fp64(q, k_cache, v_cache, table,
                                     list(range(start_pos, start_pos + T)), scale)
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos", [0, 3, 4, 10])
def test_one_token_prefill_equals_decode(dtype, pos):
    nq, nkv, D, NB, BS, MB = 6, 2, 9, 7, 4, 4
    g = gen(60 + pos)
    table = torch.randperm(NB, generator=g)[:MB].to(torch.int32)
    k_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    v_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    q = torch.randn(1, nq, D, generator=g).to(dtype)
    out_p, out_d = poison_like(q, seed=1), poison_like(q, seed=2)
    ref.prefill_attention(q, k_cache, v_cache, table, pos, 0.3, out_p)
    ref.decode_attention(q, k_cache, v_cache, table[None], torch.tensor([pos], dtype=torch.int32),
                         0.3, out_d)
    torch.testing.assert_close(out_p, out_d, rtol=1e-6, atol=1e-6)


# ============================================================================ RNG

def _splitmix64_np(z: int) -> int:
    """Vigna's splitmix64 output function, written independently with wrapping numpy uint64."""
    with np.errstate(over="ignore"):
        x = np.uint64(z) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return int(x ^ (x >> np.uint64(31)))


def test_mix64_known_values_and_independent_formula():
    # The first two outputs of splitmix64 seeded with 0 (published reference values).
    assert ref.mix64(0) == 0xE220A8397B1DCDAF
    assert ref.mix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    r = np.random.default_rng(7)
    for z in [1, 2, 12345, (1 << 64) - 1, 1 << 63] + [int(v) for v in r.integers(0, 2 ** 63, 50)]:
        assert ref.mix64(z) == _splitmix64_np(z)
        assert 0 <= ref.mix64(z) < (1 << 64)


def test_uniform_deterministic_in_range_and_varies():
    vals = [ref.uniform(1234, c) for c in range(4000)]
    assert vals == [ref.uniform(1234, c) for c in range(4000)]      # pure function
    assert all(0.0 <= u < 1.0 for u in vals)
    assert all((u * (1 << 24)).is_integer() for u in vals)          # 24-bit grid, exact in fp32
    assert len(set(vals)) >= 3990                                   # differs across counters
    assert abs(sum(vals) / len(vals) - 0.5) < 0.02
    other = [ref.uniform(1235, c) for c in range(4000)]
    assert sum(a == b for a, b in zip(vals, other)) < 5             # differs across seeds
    # Independent formula: top 24 bits of mix64(seed ^ mix64(counter)).
    for c in (0, 1, 77, 2 ** 40 + 3):
        h = _splitmix64_np(1234 ^ _splitmix64_np(c))
        assert ref.uniform(1234, c) == (h >> 40) / 2 ** 24
    assert ref.uniform(-1, 5) == ref.uniform((1 << 64) - 1, 5)      # seeds are taken mod 2**64


# ============================================================================ sampling support

def _keep_idx(keep: torch.Tensor) -> list[int]:
    return torch.nonzero(keep).flatten().tolist()


def test_sampling_support_top_k_keeps_ties():
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.5, 2.0, -1.0])
    cases = {1: [1, 3], 2: [1, 3], 3: [1, 2, 3, 5], 4: [1, 2, 3, 5], 5: [0, 1, 2, 3, 5],
             0: list(range(7)), 7: list(range(7)), 100: list(range(7))}
    for k, expected in cases.items():
        keep, w = ref.sampling_support(logits, 1.0, k, 1.0)
        assert keep.dtype == torch.bool and w.dtype == torch.float32
        assert _keep_idx(keep) == expected, k
        hand = torch.tensor([math.exp(v - 3.0) if i in expected else 0.0
                             for i, v in enumerate(logits.tolist())])
        torch.testing.assert_close(w, hand, rtol=1e-6, atol=0)


# probabilities 0.5, 0.2, 0.15, 0.1, 0.05 in a shuffled order
P5 = torch.tensor([0.15, 0.05, 0.5, 0.1, 0.2])
L5 = torch.log(P5) + 1.3                  # an offset changes nothing


@pytest.mark.parametrize("top_p,expected", [
    (0.3, [2]), (0.6, [2, 4]), (0.8, [0, 2, 4]), (0.9, [0, 2, 3, 4]), (0.99, [0, 1, 2, 3, 4]),
    (1.0, [0, 1, 2, 3, 4]), (1e-6, [2]),
])
def test_sampling_support_top_p_minimal_prefix(top_p, expected):
    keep, w = ref.sampling_support(L5, 1.0, 0, top_p)
    assert _keep_idx(keep) == expected
    p_hand = torch.where(keep, P5 / P5.max(), torch.zeros(5))       # w = exp(x - max x)
    torch.testing.assert_close(w, p_hand, rtol=1e-5, atol=0)


def test_sampling_support_top_p_keeps_ties():
    logits = torch.log(torch.tensor([0.2, 0.4, 0.2, 0.2]))
    keep, _ = ref.sampling_support(logits, 1.0, 0, 0.5)             # 0.4 + one 0.2 reaches it...
    assert _keep_idx(keep) == [0, 1, 2, 3]                          # ...and its ties stay
    keep, _ = ref.sampling_support(logits, 1.0, 0, 0.35)
    assert _keep_idx(keep) == [1]


def test_sampling_support_top_p_boundary_is_inclusive():
    """'Reaching' top_p includes equality: with top_p exactly the top token's share, the top token
    alone is kept. w = [1, e^-1] (fp32); top_p = 1 / sum(w) makes top_p * sum(w) == 1 == w[0]."""
    logits = torch.tensor([2.0, 1.0])
    w_sum = float(torch.tensor(1.0) + torch.exp(torch.tensor(-1.0)))
    keep, _ = ref.sampling_support(logits, 1.0, 0, 1.0 / w_sum)
    assert _keep_idx(keep) == [0]
    keep, _ = ref.sampling_support(logits, 1.0, 0, 1.0 / w_sum + 1e-4)
    assert _keep_idx(keep) == [0, 1]


def test_sampling_support_top_k_then_top_p_on_the_kept_mass():
    # top_k=3 keeps {0.5, 0.2, 0.15} (mass 0.85); top_p=0.8 of that is 0.68 -> {0.5, 0.2}.
    keep, w = ref.sampling_support(L5, 1.0, 3, 0.8)
    assert _keep_idx(keep) == [2, 4]
    assert torch.count_nonzero(w) == 2
    # top_p alone at 0.8 needs 0.5 + 0.2 + 0.15.
    keep, _ = ref.sampling_support(L5, 1.0, 0, 0.8)
    assert _keep_idx(keep) == [0, 2, 4]
    # top_k alone.
    keep, _ = ref.sampling_support(L5, 1.0, 3, 1.0)
    assert _keep_idx(keep) == [0, 2, 4]


def test_sampling_support_temperature_changes_top_p_support():
    logits = torch.tensor([0.0, 2.0, 1.0])
    # T=1: p = [0.090, 0.665, 0.245]; T=0.25: [0.0003, 0.982, 0.018]; T=4: [0.254, 0.419, 0.327]
    expected = {1.0: [1, 2], 0.25: [1], 4.0: [0, 1, 2]}
    for temp, idx in expected.items():
        keep, w = ref.sampling_support(logits, temp, 0, 0.8)
        assert _keep_idx(keep) == idx, temp
        hand = torch.tensor([math.exp((v - 2.0) / temp) if i in idx else 0.0
                             for i, v in enumerate(logits.tolist())])
        torch.testing.assert_close(w, hand, rtol=1e-6, atol=0)


# ============================================================================ sample_row

@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_row_greedy_first_max_on_ties(dtype):
    logits = torch.tensor([0.5, 4.0, -2.0, 4.0, 3.0, 4.0]).to(dtype)
    for temp in (0.0, -1.0):
        for top_k, top_p in ((0, 1.0), (2, 0.1)):
            assert ref.sample_row(logits, temp, top_k, top_p, seed=3, counter=9) == 1
    r = randn(1001, dtype=dtype, seed=70)
    assert ref.sample_row(r, 0.0, 0, 1.0, 0, 0) == max(range(1001), key=lambda i: (float(r[i]), -i))


def test_sample_row_seeded_determinism_and_variation():
    logits = randn(50, seed=71, scale=0.3)                          # fairly flat
    a = [ref.sample_row(logits, 1.0, 0, 1.0, seed=11, counter=c) for c in range(200)]
    b = [ref.sample_row(logits, 1.0, 0, 1.0, seed=11, counter=c) for c in range(200)]
    other = [ref.sample_row(logits, 1.0, 0, 1.0, seed=12, counter=c) for c in range(200)]
    assert a == b
    assert len(set(a)) >= 25
    assert sum(x == y for x, y in zip(a, other)) < 40
    assert all(0 <= t < 50 for t in a)


_M64 = (1 << 64) - 1


def _inv_mix64(h: int) -> int:
    """Inverse of splitmix64's finalizer (xor-shifts and odd multipliers are bijections mod 2**64)."""
    def unxorshift(y: int, s: int) -> int:
        x = y
        for _ in range(64 // s + 1):
            x = y ^ (x >> s)
        return x
    z = unxorshift(h, 31)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & _M64
    z = unxorshift(z, 27)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & _M64
    z = unxorshift(z, 30)
    return (z - 0x9E3779B97F4A7C15) & _M64


def _seed_for_uniform(u24: int, counter: int) -> int:
    """A seed that makes uniform(seed, counter) == u24 / 2**24 exactly."""
    return _inv_mix64(u24 << 40) ^ _splitmix64_np(counter)


@pytest.mark.parametrize("u24,expected", [
    (0, 0), (1, 0), (1 << 22, 1), ((1 << 22) - 1, 0), (1 << 23, 2), (3 << 22, 3),
    ((1 << 24) - 1, 3),
])
def test_sample_row_inverse_cdf_uses_half_open_intervals(u24, expected):
    """Four tied tokens have weights exactly 1, so token i owns u in [i/4, (i+1)/4). The seed is
    solved for so that u lands exactly on the boundaries."""
    counter = 12345
    seed = _seed_for_uniform(u24, counter)
    assert ref.uniform(seed, counter) == u24 / 2 ** 24            # the precondition holds
    logits = torch.full((4,), 1.3)
    assert ref.sample_row(logits, 1.0, 0, 1.0, seed, counter) == expected


def _kept_probs_fp64(logits, temperature, top_k, top_p):
    """Independent: softmax in fp64, top_k by sorting with ties, top_p by a python scan."""
    x = [v / temperature for v in logits.double().tolist()]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    kept = set(range(len(x)))
    if 0 < top_k < len(x):
        kth = x[order[top_k - 1]]
        kept = {i for i in kept if x[i] >= kth}
    m = max(x)
    w = {i: math.exp(x[i] - m) for i in kept}
    if top_p < 1.0:
        total, acc, tau = sum(w.values()), 0.0, None
        for i in sorted(w, key=lambda i: -w[i]):
            acc += w[i]
            if acc >= top_p * total:
                tau = w[i]
                break
        w = {i: v for i, v in w.items() if v >= tau}
    s = sum(w.values())
    return {i: v / s for i, v in w.items()}


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.9),
])
def test_sample_row_frequencies_match_kept_probabilities(temperature, top_k, top_p):
    V, N = 11, 12000
    logits = randn(V, seed=80, scale=1.2)
    probs = _kept_probs_fp64(logits, temperature, top_k, top_p)
    assert 2 <= len(probs) <= V
    counts = [0] * V
    for c in range(N):
        counts[ref.sample_row(logits, temperature, top_k, top_p, seed=2024, counter=c)] += 1
    assert all(counts[i] == 0 for i in range(V) if i not in probs)   # never a dropped token
    chi2 = sum((counts[i] - N * p) ** 2 / (N * p) for i, p in probs.items())
    # df <= 10; P(chi2 > 35) < 2e-4. Deterministic (fixed seed and counters), so it cannot flake.
    assert chi2 < 35.0, (chi2, counts, probs)


def test_sample_row_never_returns_zero_weight_tokens_at_the_edges():
    # Only interior tokens are kept (top_k drops both edges), so a cumulative search that runs off
    # either end of the kept range would show up as an edge token.
    logits = torch.tensor([-30.0, 2.0, 2.5, 1.0, -30.0])
    seen = {ref.sample_row(logits, 1.0, 3, 1.0, seed=5, counter=c) for c in range(3000)}
    assert seen == {1, 2, 3}


# ============================================================================ sample (batched, in buffers)

def test_sample_writes_token_in_history_slot_and_advances():
    B, V, MAXLEN = 3, 13, 12
    logits = randn(B, V, seed=90, scale=2.0)
    logits[0, 4] = 50.0                                              # greedy row: argmax known
    temperature = torch.tensor([0.0, 0.8, 1.0], dtype=torch.float32)
    top_k = torch.tensor([0, 3, 0], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 0.5], dtype=torch.float32)
    seed = torch.tensor([1, 2, 3], dtype=torch.int64)
    positions = torch.tensor([0, 4, 10], dtype=torch.int32)
    token_in = torch.full((B,), -7, dtype=torch.int32)
    hist = torch.randint(100, 1000, (B, MAXLEN), generator=gen(91), dtype=torch.int32)
    hist0 = hist.clone()

    ref.sample(logits, temperature, top_k, top_p, seed, positions, token_in, hist)

    assert positions.dtype == torch.int32 and positions.tolist() == [1, 5, 11]
    assert token_in.dtype == torch.int32
    assert int(token_in[0]) == 4
    for b, pos in enumerate([0, 4, 10]):
        keep, _ = ref.sampling_support(logits[b], float(temperature[b]), int(top_k[b]),
                                       float(top_p[b]))
        tok = int(token_in[b])
        if b:
            assert keep[tok], b
            # keyed by (seed, the position the logits belong to)
            assert tok == ref.sample_row(logits[b], float(temperature[b]), int(top_k[b]),
                                         float(top_p[b]), int(seed[b]), pos)
        assert int(hist[b, pos + 1]) == tok
    changed = hist != hist0
    expected_changed = torch.zeros_like(changed)
    for b, pos in enumerate([0, 4, 10]):
        expected_changed[b, pos + 1] = True
    assert torch.equal(changed, expected_changed)
    # Every other slot keeps its poison.
    assert torch.equal(hist[~expected_changed], hist0[~expected_changed])


def test_sample_two_calls_continue_from_advanced_positions():
    B, V = 1, 9
    logits = randn(B, V, seed=92)
    args = (torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32), torch.tensor([1.0]),
            torch.tensor([77], dtype=torch.int64))
    positions = torch.tensor([2], dtype=torch.int32)
    token_in = torch.full((B,), -1, dtype=torch.int32)
    hist = torch.full((B, 8), -5, dtype=torch.int32)
    ref.sample(logits, *args, positions, token_in, hist)
    ref.sample(logits, *args, positions, token_in, hist)
    assert positions.tolist() == [4]
    assert hist[0, :3].tolist() == [-5, -5, -5] and hist[0, 5:].tolist() == [-5, -5, -5]
    assert int(hist[0, 3]) == ref.sample_row(logits[0], 1.0, 0, 1.0, 77, 2)
    assert int(hist[0, 4]) == ref.sample_row(logits[0], 1.0, 0, 1.0, 77, 3) == int(token_in[0])


# ============================================================================ batched engine rows
# (a decode batch: rows of different sequences, padded to a bucket with position < 0 rows)

def test_rope_kv_write_per_token_tables_and_padding():
    """block_table [T, MB]: token t goes through its own table; padding tokens (position < 0)
    write no K/V and get a zero q row. Checked slot by slot against HF's rotation."""
    dtype, nq, nkv, D, NB, BS, MB = torch.float32, 6, 2, 10, 23, 4, 5
    theta, P = 500.0, MB * BS
    g = gen(120)
    perm = torch.randperm(NB, generator=g).to(torch.int32)
    seq_tables = torch.stack([perm[0:MB], perm[MB:2 * MB], perm[2 * MB:3 * MB]])   # [3, MB]
    # Tokens of three sequences, interleaved, at block edges; two padding rows.
    seq = [0, 1, 2, 0, 1, 0, 2, 1]
    positions = torch.tensor([3, 4, 19, -1, 7, 8, -5, 0], dtype=torch.int32)
    T = len(seq)
    tables = seq_tables[seq]                                          # [T, MB]
    k_cache = (torch.randn(NB, BS, nkv, D, generator=g) * 5 + 2).to(dtype)
    v_cache = (torch.randn(NB, BS, nkv, D, generator=g) * 5 - 2).to(dtype)
    k0, v0 = k_cache.clone(), v_cache.clone()
    qkv = randn(T, (nq + 2 * nkv) * D, dtype=dtype, seed=121, scale=2.0)
    rot = _hf_rope(D, theta, P)
    cos, sin = ref.rope_tables(rot.inv_freq, P)
    q_out = poison_like(torch.empty(T, nq, D, dtype=dtype))
    ref.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, tables, q_out)

    q = qkv[:, : nq * D].view(T, nq, D)
    k = qkv[:, nq * D: (nq + nkv) * D].view(T, nkv, D)
    v = qkv[:, (nq + nkv) * D:].view(T, nkv, D)
    touched = torch.zeros(NB, BS, dtype=torch.bool)
    for t, p in enumerate(positions.tolist()):
        if p < 0:
            assert torch.equal(q_out[t], torch.zeros(nq, D)), t
            continue
        hf_cos, hf_sin = rot(torch.zeros(1), torch.tensor([[p]]))
        torch.testing.assert_close(q_out[t], _hf_rotate(q[t:t + 1].float(), hf_cos[0], hf_sin[0])[0],
                                   rtol=1e-5, atol=1e-5)
        blk, slot = int(seq_tables[seq[t], p // BS]), p % BS
        touched[blk, slot] = True
        torch.testing.assert_close(k_cache[blk, slot],
                                   _hf_rotate(k[t:t + 1].float(), hf_cos[0], hf_sin[0])[0],
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(v_cache[blk, slot], v[t])
    assert int(touched.sum()) == 6
    assert torch.equal(k_cache[~touched], k0[~touched])
    assert torch.equal(v_cache[~touched], v0[~touched])


def test_rope_kv_write_rejects_a_table_of_the_wrong_rows():
    table, k_cache, v_cache = _rope_setup(torch.float32, 2, 1, 4, NB=4, BS=2, MB=2)
    cos, sin = ref.rope_tables(torch.tensor([1.0, 0.5]), 4)
    qkv = randn(3, 16, seed=122)
    with pytest.raises(ValueError, match=r"block_table must be \[MB\] or \[T, MB\] with T = 3"):
        ref.rope_kv_write(qkv, torch.tensor([0, 1, 2], dtype=torch.int32), cos, sin, k_cache,
                          v_cache, table[None].expand(2, -1), torch.empty(3, 2, 4))


def test_rope_kv_write_rows_are_batch_invariant():
    """A token's q_out row and cache slot are bitwise the same whether it is written alone (with its
    [MB] table) or inside a batch (with a [T, MB] table)."""
    dtype, nq, nkv, D, NB, BS, MB = torch.bfloat16, 4, 2, 8, 40, 4, 6
    g = gen(123)
    perm = torch.randperm(NB, generator=g).to(torch.int32)
    T = 9
    tables = perm[: T * 4].view(T, 4).repeat(1, 2)[:, :MB].contiguous()   # distinct blocks per row
    positions = torch.tensor([5, -1, 0, 15, 3, -2, 8, 12, 1], dtype=torch.int32)
    k_cache = randn(NB, BS, nkv, D, dtype=dtype, seed=124)
    v_cache = randn(NB, BS, nkv, D, dtype=dtype, seed=125)
    qkv = randn(T, (nq + 2 * nkv) * D, dtype=dtype, seed=126)
    cos, sin = ref.rope_tables(1.0 / (100.0 ** (torch.arange(0, D, 2) / D)), 16)
    kb, vb = k_cache.clone(), v_cache.clone()
    qb = poison_like(torch.empty(T, nq, D, dtype=dtype))
    ref.rope_kv_write(qkv, positions, cos, sin, kb, vb, tables, qb)
    ka, va = k_cache.clone(), v_cache.clone()
    for t in range(T):
        qa = poison_like(torch.empty(1, nq, D, dtype=dtype), seed=t)
        ref.rope_kv_write(qkv[t:t + 1], positions[t:t + 1], cos, sin, ka, va, tables[t], qa)
        assert torch.equal(qa[0], qb[t]), t
    assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_padding_rows_are_zero(dtype):
    nq, nkv, D, NB, BS, MB = 6, 2, 9, 30, 4, 5
    g = gen(130)
    perm = torch.randperm(NB, generator=g).to(torch.int32)
    tables = perm[: 5 * MB].view(5, MB).clone()
    tables[1] = 10 ** 6          # a padding row's table is never read
    k_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    v_cache = torch.randn(NB, BS, nkv, D, generator=g).to(dtype)
    q = torch.randn(5, nq, D, generator=g).to(dtype)
    positions = torch.tensor([12, -1, 0, -3, 19], dtype=torch.int32)
    out = poison_like(q)
    ref.decode_attention(q, k_cache, v_cache, tables, positions, 0.4, out)
    for b, p in enumerate(positions.tolist()):
        if p < 0:
            assert torch.equal(out[b], torch.zeros(nq, D, dtype=dtype))
        else:
            expected = _dense_attention_fp64(q[b][None], k_cache, v_cache, tables[b], [p], 0.4)
            torch.testing.assert_close(out[b].double(), expected[0], **TOL[dtype])


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-7, 9.9e-6])
def test_sample_row_tiny_temperature_is_greedy(temperature):
    """Tiny temperatures overflow x = logits / T; they must mean greedy (first index of the max),
    not the last token id the overflowed draw lands on."""
    V = 37
    logits = randn(V, seed=140, scale=3.0)
    logits[[4, 20]] = 9.0                                   # tied maximum: the first wins
    for top_k, top_p in ((0, 1.0), (5, 0.9)):
        for seed in range(5):
            assert ref.sample_row(logits, temperature, top_k, top_p, seed, 3) == 4
    assert ref.is_greedy(temperature)


def test_greedy_threshold_is_the_fp32_constant():
    assert ref.GREEDY_TEMPERATURE == 1e-5
    assert ref.is_greedy(0.0) and ref.is_greedy(-2.0) and ref.is_greedy(float("nan"))
    assert not ref.is_greedy(1e-5) and not ref.is_greedy(0.5)
    # fp32 comparison: the fp32 value nearest 1e-5 (slightly below it) is not greedy, like the
    # kernel's `temp >= 1e-5f`; the next fp32 value below it is.
    t32 = float(torch.tensor(1e-5, dtype=torch.float32))
    below = float(torch.nextafter(torch.tensor(t32), torch.tensor(0.0)))
    assert t32 < 1e-5 and not ref.is_greedy(t32) and ref.is_greedy(below)
    # Just above the threshold the sampled path runs and, with a gap of many units, still
    # picks the max (the non-max weights underflow to 0).
    logits = torch.tensor([0.0, 1.0, 0.5])
    assert ref.sample_row(logits, 2e-5, 0, 1.0, 7, 0) == 1


def test_sample_padding_rows_write_nothing():
    B, V, MAXLEN = 5, 17, 10
    logits = randn(B, V, seed=141, scale=2.0)
    temperature = torch.tensor([0.9, 0.9, 0.0, 1e-30, 1.1], dtype=torch.float32)
    top_k = torch.tensor([0, 3, 0, 0, 5], dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0, 0.8], dtype=torch.float32)
    seed = torch.tensor([11, 12, 13, 14, 15], dtype=torch.int64)
    positions = torch.tensor([2, -1, 0, 8, -4], dtype=torch.int32)
    token_in = torch.full((B,), -7, dtype=torch.int32)
    hist = torch.randint(100, 1000, (B, MAXLEN), generator=gen(142), dtype=torch.int32)
    hist0 = hist.clone()
    ref.sample(logits, temperature, top_k, top_p, seed, positions, token_in, hist)
    assert positions.tolist() == [3, -1, 1, 9, -4]
    assert int(token_in[1]) == -7 and int(token_in[4]) == -7
    assert torch.equal(hist[1], hist0[1]) and torch.equal(hist[4], hist0[4])
    assert int(token_in[2]) == int(torch.argmax(logits[2]))
    assert int(token_in[3]) == int(torch.argmax(logits[3]))       # 1e-30: greedy
    assert int(token_in[0]) == ref.sample_row(logits[0], 0.9, 0, 1.0, 11, 2) == int(hist[0, 3])


def _linear_fp64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.double()[:, None, :] * w.double()[None, :, :]).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17, 64])
def test_linear_invariant_rows_equal_rows_alone(dtype, T):
    K, N = 77, 29
    x = randn(T, K, dtype=dtype, seed=150 + T)
    w = randn(N, K, dtype=dtype, seed=151, scale=1.0 / math.sqrt(K))
    out = poison_like(torch.empty(T, N, dtype=dtype))
    ref.linear_invariant(x, w, out)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2e-2)
    torch.testing.assert_close(out.double(), _linear_fp64(x, w), **tol)
    for t in range(T):
        alone = poison_like(torch.empty(1, N, dtype=dtype), seed=t)
        ref.linear_invariant(x[t:t + 1].clone(), w, alone)
        assert torch.equal(alone[0], out[t]), t


@pytest.mark.parametrize("T", [1, 5, 33])
def test_swiglu_linear_invariant_rows_equal_rows_alone(T):
    from custom_kernels import ops
    dtype, I, N = torch.bfloat16, 40, 19
    gate_up = randn(T, 2 * I, dtype=dtype, seed=160 + T, scale=3.0)
    w = randn(N, I, dtype=dtype, seed=161, scale=1.0 / math.sqrt(I))
    out = poison_like(torch.empty(T, N, dtype=dtype))
    act = poison_like(torch.empty(T, I, dtype=dtype))
    ops.swiglu_linear_invariant(gate_up, w, out, act)
    expected_act = F.silu(gate_up[:, :I].float()).to(dtype) * gate_up[:, I:]
    assert torch.equal(act, expected_act)
    torch.testing.assert_close(out.double(), _linear_fp64(expected_act, w), rtol=2 ** -7, atol=2e-2)
    ref_out = poison_like(torch.empty(T, N, dtype=dtype), seed=3)
    ref.swiglu_linear_invariant(gate_up, w, ref_out)
    assert torch.equal(ref_out, out)
    for t in (0, T // 2, T - 1):
        alone = poison_like(torch.empty(1, N, dtype=dtype), seed=t)
        ref.swiglu_linear_invariant(gate_up[t:t + 1].clone(), w, alone)
        assert torch.equal(alone[0], out[t]), t
