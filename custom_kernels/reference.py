"""Pure-torch specification of every op.

This module is three things at once: the spec each CUDA kernel must match, the CPU backend the whole
pipeline runs on when there is no GPU, and the oracle of the kernel tests. Every op writes into
caller-owned output tensors (like the kernels, which never allocate) and returns nothing unless noted.

Numerics follow HF transformers' Llama where it matters for parity: values that HF rounds to the
model dtype between stages are rounded here too, and reductions run in fp32.

Shape letters: T tokens, B batch rows, H hidden, V vocab, nq/nkv query/kv heads, D head_dim,
I intermediate, NB KV blocks, BS tokens per block, MB max blocks per sequence, P max positions.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- gathers and norms

def embedding(ids: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """ids [T] int32/int64, table [V, H], out [T, H]."""
    out.copy_(table.index_select(0, ids.long()))


def _rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF LlamaRMSNorm: fp32 statistics, normalized value rounded to the input dtype, then the weight
    # multiply in the input dtype.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """x [T, H], weight [H], out [T, H]."""
    out.copy_(_rms_normalize(x, weight, eps))


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                out: torch.Tensor) -> None:
    """residual += x (rounded to the dtype, as HF's residual add is), then out = rmsnorm(residual).

    x [T, H], residual [T, H] (updated in place), weight [H], out [T, H].
    """
    residual.add_(x)
    out.copy_(_rms_normalize(residual, weight, eps))


# ----------------------------------------------------------------------------- GEMM and MLP

def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ weight.T. x [T, K], weight [N, K], out [T, N]."""
    torch.matmul(x, weight.t(), out=out)


# Rows per matmul of linear_invariant on the CPU: one, so that every row is computed by the very
# same call shape as that row alone (a [1, K] @ [K, N] product). torch's CPU GEMM picks kernels and
# blockings by shape, so a [T, K] matmul could sum a row in a T-dependent order; a fixed row count
# per call cannot.
_INVARIANT_ROWS = 1


def linear_invariant(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ weight.T with batch invariance: row t of out is bitwise what this op gives for
    x[t] alone (T = 1), whatever T is. x [T, K], weight [N, K], out [T, N].

    Values equal linear() up to fp32 summation order. Here every row block of _INVARIANT_ROWS rows
    is copied into a fresh buffer (same alignment for every row) and multiplied on its own, so the
    reduction order is that of the fixed block shape and cannot depend on T or on the other rows.
    """
    wt = weight.t()
    rows = x.shape[0]
    for t0 in range(0, rows, _INVARIANT_ROWS):
        t1 = min(t0 + _INVARIANT_ROWS, rows)
        block = torch.empty(_INVARIANT_ROWS, x.shape[1], dtype=x.dtype, device=x.device)
        block[: t1 - t0].copy_(x[t0:t1])
        block[t1 - t0:].zero_()
        res = torch.matmul(block, wt)                     # [_INVARIANT_ROWS, N]
        out[t0:t1].copy_(res[: t1 - t0])


def swiglu(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """gate_up [T, 2I] (gate columns first, then up), out [T, I] = silu(gate) * up.

    HF rounds silu(gate) to the dtype before the product, so this does too.
    """
    inter = out.shape[-1]
    gate, up = gate_up[..., :inter], gate_up[..., inter:]
    out.copy_(torch.nn.functional.silu(gate.float()).to(gate.dtype) * up)


def swiglu_linear(gate_up: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = swiglu(gate_up) @ weight.T: the MLP's activation and down projection in one op.

    gate_up [T, 2I] (gate columns first), weight [N, I], out [T, N]. Exactly swiglu() into a
    [T, I] intermediate (rounded to the dtype like HF) followed by linear(); the intermediate is a
    temporary here (the CUDA kernel never materializes it).
    """
    act = torch.empty(*gate_up.shape[:-1], weight.shape[1], dtype=gate_up.dtype,
                      device=gate_up.device)
    swiglu(gate_up, act)
    linear(act, weight, out)


def swiglu_linear_invariant(gate_up: torch.Tensor, weight: torch.Tensor,
                            out: torch.Tensor) -> None:
    """swiglu_linear with batch invariance: swiglu() (elementwise, so row-independent) into a
    [T, I] intermediate rounded to the dtype, then linear_invariant(). gate_up [T, 2I],
    weight [N, I], out [T, N]."""
    act = torch.empty(*gate_up.shape[:-1], weight.shape[1], dtype=gate_up.dtype,
                      device=gate_up.device)
    swiglu(gate_up, act)
    linear_invariant(act, weight, out)


# ----------------------------------------------------------------------------- RoPE + paged KV

def rope_tables(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, D/2] fp32, the same products HF forms (position * inv_freq in fp32)."""
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq.float())
    return freqs.cos(), freqs.sin()


def _cache_slots(positions: torch.Tensor, block_table: torch.Tensor, block_size: int):
    """Positions [N] -> (block ids [N], slot-in-block [N]) through a block table [MB]."""
    pos = positions.long()
    return block_table.long()[pos // block_size], pos % block_size


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, D] (model dtype); cos/sin [T, D/2] fp32. rotate_half layout: pairs (i, i + D/2).
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_kv_write(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  q_out: torch.Tensor) -> None:
    """Rotate q and k, write k and v into the paged cache, write rotated q.

    qkv [T, (nq + 2*nkv) * D]   positions [T] int32   cos, sin [P, D/2] fp32
    k_cache, v_cache [NB, BS, nkv, D]   q_out [T, nq, D]
    block_table [MB] int32 (every token belongs to one sequence) or [T, MB] int32 (row t is token
    t's table: a batch of sequences, one token each or several).
    A token with position < 0 is padding: it writes no K/V anywhere and its q_out row is zeros.
    """
    _, bs, nkv, d = k_cache.shape
    nq = q_out.shape[1]
    t = qkv.shape[0]
    if block_table.dim() == 1:
        tables = block_table.long()[None].expand(t, -1)        # [T, MB]
    elif block_table.dim() == 2 and block_table.shape[0] == t:
        tables = block_table.long()
    else:
        raise ValueError(f"rope_kv_write: block_table must be [MB] or [T, MB] with T = {t}, got "
                         f"{tuple(block_table.shape)}")
    q = qkv[:, : nq * d].view(t, nq, d)
    k = qkv[:, nq * d: (nq + nkv) * d].view(t, nkv, d)
    v = qkv[:, (nq + nkv) * d:].view(t, nkv, d)
    pos = positions.long()
    live = pos >= 0                                            # [T] False: padding
    q_out.zero_()
    if not bool(live.any()):
        return
    lp = pos[live]
    c, s = cos[lp], sin[lp]
    q_out[live] = _rotate(q[live], c, s)
    blocks = tables[live].gather(1, (lp // bs)[:, None])[:, 0]
    slots = lp % bs
    k_cache[blocks, slots] = _rotate(k[live], c, s)
    v_cache[blocks, slots] = v[live]


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, nkv, D]."""
    blocks, slots = _cache_slots(torch.arange(length), block_table, cache.shape[1])
    return cache[blocks, slots]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask: torch.Tensor | None) -> torch.Tensor:
    """q [Tq, nq, D], k/v [S, nkv, D] -> [Tq, nq, D] fp32; query heads grouped onto kv heads."""
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)        # [S, nq, D]
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) * scale   # [nq, Tq, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, vf)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, positions: torch.Tensor, scale: float,
                     out: torch.Tensor) -> None:
    """One query token per row, attending to cached positions 0..positions[b] inclusive.

    q [B, nq, D]   k_cache, v_cache [NB, BS, nkv, D]   block_tables [B, MB] int32
    positions [B] int32 (the query's own position; its k/v are already in the cache)   out [B, nq, D]
    A row with position < 0 is padding: its out row is zeros (its block table is not read).
    Rows are independent: a row's result does not depend on the batch it is computed in (the CUDA
    kernel guarantees this bitwise: its split-K partition of a row depends on that row's length
    only).
    """
    for b in range(q.shape[0]):
        length = int(positions[b]) + 1
        if length <= 0:
            out[b].zero_()
            continue
        k = _gather_kv(k_cache, block_tables[b], length)
        v = _gather_kv(v_cache, block_tables[b], length)
        out[b] = _attend(q[b: b + 1], k, v, scale, None)[0].to(out.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, start_pos: int, scale: float,
                      out: torch.Tensor) -> None:
    """Causal attention for T new tokens at positions start_pos..start_pos+T-1 of one sequence.

    q [T, nq, D]   k_cache, v_cache [NB, BS, nkv, D]   block_table [MB] int32   out [T, nq, D]
    """
    t = q.shape[0]
    length = start_pos + t
    k = _gather_kv(k_cache, block_table, length)
    v = _gather_kv(v_cache, block_table, length)
    qpos = torch.arange(start_pos, length)[:, None]
    mask = torch.arange(length)[None, :] <= qpos           # [T, S]
    out.copy_(_attend(q, k, v, scale, mask[None]).to(out.dtype))


# ----------------------------------------------------------------------------- sampling

def mix64(z: int) -> int:
    """splitmix64's finalizer on a 64-bit unsigned int (the kernels use the same constants)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform(seed: int, counter: int) -> float:
    """Counter-based uniform in [0, 1): a pure function of (seed, counter), 24 bits exact in fp32."""
    h = mix64((seed & _MASK64) ^ mix64(counter & _MASK64))
    return (h >> 40) * (1.0 / (1 << 24))


def sampling_support(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """The kept tokens and their unnormalized weights for one row.

    logits [V]. Returns (keep [V] bool, weights [V] fp32, zero outside keep).
    x = logits / temperature (fp32 division); top-k keeps x >= the k-th largest x (ties stay);
    weights w = exp(x - max x); top-p keeps w >= tau, tau being the largest value with
    sum(w >= tau) >= top_p * sum(w) (the smallest top set reaching top_p; ties stay).
    """
    x = logits.float() / temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        keep = x >= kth
    w = torch.where(keep, torch.exp(x - x.max()), torch.zeros_like(x))
    if top_p < 1.0:
        sorted_w, _ = torch.sort(w, descending=True)
        csum = torch.cumsum(sorted_w, 0)
        need = top_p * float(w.sum())
        last = int(torch.searchsorted(csum, torch.tensor(need), right=False).clamp(max=x.numel() - 1))
        tau = sorted_w[last]
        keep = keep & (w >= tau)
        w = torch.where(keep, w, torch.zeros_like(w))
    return keep, w


# Temperatures below this (zero, negative, tiny, NaN) mean greedy decoding. Dividing logits by a
# tiny temperature overflows fp32 (1e-38 turns every logit into +-inf, and the draw then lands on
# the last token); greedy is what such a temperature means. Mirrored by the sampling kernel
# (csrc/sampling.cu kGreedyTemperature).
GREEDY_TEMPERATURE = 1e-5


def _fp32(x: float) -> float:
    """x rounded to fp32 (overflowing to +-inf), as a Python float."""
    return float(torch.tensor(x, dtype=torch.float32))


def is_greedy(temperature: float) -> bool:
    """True when `temperature` selects greedy decoding: not (fp32(temperature) >=
    fp32(GREEDY_TEMPERATURE)), so NaN is greedy too. The comparison is in fp32, as the kernel makes
    it (its temperatures are fp32 and its threshold is the fp32 constant 1e-5f)."""
    return not _fp32(temperature) >= _fp32(GREEDY_TEMPERATURE)


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, seed: int,
               counter: int) -> int:
    """One token from logits [V]. A temperature below GREEDY_TEMPERATURE is greedy (first index of
    the max)."""
    if is_greedy(temperature):
        return int(torch.argmax(logits.float()))
    keep, w = sampling_support(logits, temperature, top_k, top_p)
    target = uniform(seed, counter) * float(w.sum())
    csum = torch.cumsum(w, 0)
    idx = int(torch.searchsorted(csum, torch.tensor(target), right=True))
    kept = torch.nonzero(keep).flatten()
    return min(max(idx, int(kept[0])), int(kept[-1]))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, seed: torch.Tensor, positions: torch.Tensor,
           token_in: torch.Tensor, token_hist: torch.Tensor) -> None:
    """Sample the next token of each row and advance the row, all in device buffers.

    logits [B, V]   temperature, top_p [B] fp32   top_k [B] int32 (0 = off)   seed [B] int64
    positions [B] int32: the position the logits belong to; it keys the RNG and is then incremented.
    token_in [B] int32: receives the token (the next step's input).
    token_hist [B, MAXLEN] int32: receives the token at index positions[b] + 1.
    A row with position < 0 is padding: nothing is written and its position stays as it is.
    Rows are independent (a row's token depends on its own logits, parameters, seed and position).
    """
    for b in range(logits.shape[0]):
        pos = int(positions[b])
        if pos < 0:
            continue
        tok = sample_row(logits[b], float(temperature[b]), int(top_k[b]), float(top_p[b]),
                         int(seed[b]), pos)
        token_in[b] = tok
        token_hist[b, pos + 1] = tok
        positions[b] = pos + 1
