"""The model runner: the decode steps and prefill, written once against custom_kernels.ops and
preallocated buffers. It knows nothing of requests or sessions.

Every tensor a step touches is allocated here, up front: the weights (one arena), the KV arena,
the static I/O buffers a replayed graph reads and writes (batch-1 `io` for session replays, the
batched rows of `batch` for continuous batching), and the scratch activations. A step allocates
nothing and never reads device memory on the host, so it can be captured into a CUDA graph; on the
CPU the same code runs on the reference ops.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from custom_kernels import ops
from custom_kernels.reference import rope_tables

from ..config import ModelConfig, inv_freq
from ..core.block_allocator import blocks_for
from ..errors import DeadlineExceeded
from .input_batch import InputBatch
from .kv_arena import KVArena

# A probe sees intermediates of an eager step (parity scripts): probe(name, layer, tensor).
Probe = Optional[Callable[[str, int, torch.Tensor], None]]

GEMM_WORKSPACE_BYTES = 8 << 20   # cuBLAS runs only prefill GEMMs; 8 MiB keeps small models lean


@dataclass
class StaticIO:
    """The buffers a captured graph is bound to. Replay copies a session's state in, not pointers."""
    token_in: torch.Tensor      # [1] int32: the token the next step consumes
    position: torch.Tensor      # [1] int32: position of token_in; the sampler increments it
    block_table: torch.Tensor   # [1, MB] int32: the replayed session's block table
    temperature: torch.Tensor   # [1] fp32 (<= 0: greedy)
    top_k: torch.Tensor         # [1] int32 (0: off)
    top_p: torch.Tensor         # [1] fp32 (1: off)
    seed: torch.Tensor          # [1] int64
    token_hist: torch.Tensor    # [1, max_len + 1] int32: sampled token lands at its position
    logits: torch.Tensor        # [1, V] model dtype


@dataclass
class Scratch:
    """Activations for up to C tokens (the prefill chunk); decode uses the first row."""
    ids: torch.Tensor           # [C] int32
    positions: torch.Tensor     # [C] int32
    residual: torch.Tensor      # [C, H]
    normed: torch.Tensor        # [C, H]
    qkv: torch.Tensor           # [C, (nq + 2 nkv) D]
    q: torch.Tensor             # [C, nq, D]
    attn: torch.Tensor          # [C, nq, D]
    proj: torch.Tensor          # [C, H]: o-proj and down-proj outputs
    gate_up: torch.Tensor       # [C, 2I]
    act: torch.Tensor           # [C, I]: SwiGLU output where swiglu_linear does not fuse
    attn_workspace: torch.Tensor  # [n] fp32 split-K scratch of decode attention
    gemm_workspace: torch.Tensor  # [bytes] uint8 cuBLAS workspace


class ModelRunner:
    """Owns the device state of one model and runs its steps on the current stream."""

    def __init__(self, cfg: ModelConfig, weights, *, max_len: int, kv_blocks: int, block_size: int,
                 prefill_chunk: int = 512, max_num_seqs: int = 1, batch_invariant: bool = True):
        """max_num_seqs: rows of the batched decode step (`batch`). batch_invariant: the batched
        step's GEMMs give each row the bits it would get alone (see decode_batch)."""
        self.cfg = cfg
        self.w = weights
        self.dtype = weights.embed.dtype
        self.device = weights.embed.device
        self.max_len = max_len
        self.block_size = block_size
        self.max_blocks_per_seq = blocks_for(max_len, block_size)
        self.prefill_chunk = prefill_chunk
        self.max_num_seqs = max_num_seqs
        self.batch_invariant = batch_invariant
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # Tensor parallelism (worker/tp.py): cfg is then one rank's shard config, and this sums
        # the row-parallel outputs (o-proj, down-proj) over the ranks in place. None at TP=1.
        self.all_reduce: Optional[Callable[[torch.Tensor], None]] = None
        dev, dt = self.device, self.dtype

        self.kv = KVArena.allocate(cfg.num_layers, kv_blocks, block_size, cfg.num_kv_heads,
                                   cfg.head_dim, dt, dev)
        cos, sin = rope_tables(inv_freq(cfg), max_len)
        self.cos, self.sin = cos.to(dev), sin.to(dev)           # [max_len, D/2] fp32

        i32 = dict(dtype=torch.int32, device=dev)
        self.io = StaticIO(
            token_in=torch.zeros(1, **i32), position=torch.zeros(1, **i32),
            block_table=torch.zeros(1, self.max_blocks_per_seq, **i32),
            temperature=torch.zeros(1, dtype=torch.float32, device=dev),
            top_k=torch.zeros(1, **i32), top_p=torch.ones(1, dtype=torch.float32, device=dev),
            seed=torch.zeros(1, dtype=torch.int64, device=dev),
            token_hist=torch.zeros(1, max_len + 1, **i32),
            logits=torch.empty(1, cfg.vocab_size, dtype=dt, device=dev))
        # One prefill chunk's table (batched engine); sessions' prefill uses io.block_table.
        self.chunk_table = torch.zeros(self.max_blocks_per_seq, **i32)        # [MB]
        self.batch = InputBatch(max_num_seqs, self.max_blocks_per_seq, max_len, cfg.vocab_size,
                                dt, dev)
        c, h = max(prefill_chunk, max_num_seqs), cfg.hidden_size
        nq, d, inter = cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        ws = max(ops.attention_workspace_numel(b, nq, d, max_len) for b in (1, max_num_seqs)) \
            if dev.type == "cuda" else 0
        self.scratch = Scratch(
            ids=torch.zeros(c, **i32), positions=torch.zeros(c, **i32),
            residual=torch.empty(c, h, dtype=dt, device=dev),
            normed=torch.empty(c, h, dtype=dt, device=dev),
            qkv=torch.empty(c, cfg.qkv_size, dtype=dt, device=dev),
            q=torch.empty(c, nq, d, dtype=dt, device=dev),
            attn=torch.empty(c, nq, d, dtype=dt, device=dev),
            proj=torch.empty(c, h, dtype=dt, device=dev),
            gate_up=torch.empty(c, 2 * inter, dtype=dt, device=dev),
            act=torch.empty(c, inter, dtype=dt, device=dev),
            attn_workspace=torch.empty(max(ws, 1), dtype=torch.float32, device=dev),
            gemm_workspace=torch.empty(GEMM_WORKSPACE_BYTES if dev.type == "cuda" else 1,
                                       dtype=torch.uint8, device=dev))

    # ------------------------------------------------------------------ streams

    def bind_stream(self) -> None:
        """Prepare the current stream for GEMMs (call once per stream, outside any capture)."""
        ops.bind_gemm_stream(self.scratch.gemm_workspace)

    # ------------------------------------------------------------------ the layers

    def _layers(self, n: int, attend: Callable[[int, torch.Tensor, torch.Tensor], None],
                positions: torch.Tensor, block_table: torch.Tensor, probe: Probe,
                linear=ops.linear, swiglu_linear=ops.swiglu_linear) -> torch.Tensor:
        """Run every layer over n tokens whose embeddings are in scratch.residual[:n].

        attend(layer, q [n, nq, D], out [n, nq, D]) is the attention variant (decode or prefill).
        positions [n] int32; block_table [MB] (one sequence) or [n, MB] (row t: token t's table).
        linear / swiglu_linear: the GEMM ops (the batched step passes batch-invariant ones).
        Returns normed [n, H], the final-norm output.
        """
        cfg, s, eps = self.cfg, self.scratch, self.cfg.rms_norm_eps
        residual, normed, proj = s.residual[:n], s.normed[:n], s.proj[:n]
        qkv, q, attn = s.qkv[:n], s.q[:n], s.attn[:n]
        gate_up, act = s.gate_up[:n], s.act[:n]
        reduce = self.all_reduce
        for i, lw in enumerate(self.w.layers):
            if i == 0:
                ops.rmsnorm(residual, lw.ln1, eps, normed)
            else:
                ops.add_rmsnorm(proj, residual, lw.ln1, eps, normed)
                if probe:
                    probe("layer_out", i - 1, residual)
            linear(normed, lw.wqkv, qkv)
            if probe:
                probe("qkv", i, qkv)
            ops.rope_kv_write(qkv, positions, self.cos, self.sin, self.kv.k(i), self.kv.v(i),
                              block_table, q)
            if probe:
                probe("q_rot", i, q)
            attend(i, q, attn)
            if probe:
                probe("attn", i, attn)
            linear(attn.view(n, cfg.q_size), lw.wo, proj)
            if reduce is not None:      # each rank holds a partial sum over its heads
                reduce(proj)
            if probe:
                probe("o_proj", i, proj)
            ops.add_rmsnorm(proj, residual, lw.ln2, eps, normed)
            if probe:
                probe("resid_mid", i, residual)
            linear(normed, lw.w13, gate_up)
            # SwiGLU + down projection: one fused kernel at decode sizes (n <= 8 on CUDA);
            # swiglu into `act` then linear elsewhere (CPU, prefill chunks): same results.
            swiglu_linear(gate_up, lw.w2, proj, act)
            if reduce is not None:      # a partial sum over this rank's intermediate columns
                reduce(proj)
            if probe:
                probe("mlp", i, proj)
        ops.add_rmsnorm(proj, residual, self.w.norm, eps, normed)
        if probe:
            probe("layer_out", cfg.num_layers - 1, residual)
            probe("final_norm", -1, normed)
        return normed

    # ------------------------------------------------------------------ decode

    def decode_step(self, attn_max_len: int, probe: Probe = None) -> None:
        """One token: io.token_in at io.position -> io.logits -> sampled into io.token_in.

        attn_max_len is the longest sequence length this step may see (the graph key); the
        actual length is read from io.position on the device. Graph-capturable.
        """
        io, s = self.io, self.scratch
        ops.embedding(io.token_in, self.w.embed, s.residual[:1])

        def attend(layer, q, out):
            ops.decode_attention(q, self.kv.k(layer), self.kv.v(layer), io.block_table,
                                 io.position, self.scale, out, s.attn_workspace, attn_max_len)

        normed = self._layers(1, attend, io.position, io.block_table[0], probe)
        ops.linear(normed, self.w.lm_head, io.logits)
        if probe:
            probe("logits", -1, io.logits)
        self.sample_pending()

    def step_signature(self, attn_max_len: int) -> tuple:
        """What of decode_step's launch configuration depends on attn_max_len: the attention
        split count. Steps with equal signatures launch identical kernels with identical
        arguments (lengths are read from io.position on the device)."""
        return (ops.decode_attention_splits(1, self.cfg.num_kv_heads, attn_max_len),)

    # ------------------------------------------------------------------ batched decode

    def _batch_gemms(self):
        """The GEMM ops of the batched step. Batch-invariant ones give row b the same bits
        whatever the bucket (so a request's tokens do not depend on what else runs); else the
        fastest (GEMV up to 8 rows, cuBLAS above)."""
        if self.batch_invariant and hasattr(ops, "linear_invariant"):
            return ops.linear_invariant, ops.swiglu_linear_invariant
        return ops.linear, ops.swiglu_linear

    def decode_batch(self, bucket: int, attn_max_len: int, probe: Probe = None) -> None:
        """One decode step of rows [0, bucket) of `batch`: token_in at position -> logits ->
        sampled into token_in (position advanced). Rows with position < 0 are padding.

        attn_max_len bounds the longest row (it sizes the attention grid); every row's own length
        is read from batch.position on the device. Graph-capturable.
        """
        b, s = self.batch.dev, self.scratch
        n = bucket
        ops.embedding(b.token_in[:n], self.w.embed, s.residual[:n])
        pos, tables = b.position[:n], b.block_table[:n]

        def attend(layer, q, out):
            ops.decode_attention(q, self.kv.k(layer), self.kv.v(layer), tables, pos, self.scale,
                                 out, s.attn_workspace, attn_max_len)

        linear, swiglu_linear = self._batch_gemms()
        normed = self._layers(n, attend, pos, tables, probe, linear, swiglu_linear)
        linear(normed, self.w.lm_head, b.logits[:n])
        ops.sample(b.logits[:n], b.temperature[:n], b.top_k[:n], b.top_p[:n], b.seed[:n], pos,
                   b.token_in[:n], b.token_hist[:n])

    def batch_signature(self, bucket: int, attn_max_len: int) -> tuple:
        """What of decode_batch's launches depends on its arguments: the bucket and the attention
        split count (lengths are read on the device). Equal signatures, identical graphs."""
        return (bucket, ops.decode_attention_splits(bucket, self.cfg.num_kv_heads, attn_max_len))

    def prefill_kv(self, input_ids: list[int], start_pos: int, block_table: list[int]) -> None:
        """Write the K/V of input_ids at positions start_pos.. (one chunk of one request; no
        logits). block_table must already cover start_pos + len(input_ids) tokens."""
        s, n, dev = self.scratch, len(input_ids), self.device
        if n > s.ids.numel():
            raise ValueError(f"a prefill chunk of {n} tokens exceeds the scratch ({s.ids.numel()})")
        self.chunk_table[: len(block_table)].copy_(torch.tensor(block_table, dtype=torch.int32),
                                                   non_blocking=True)
        s.ids[:n].copy_(torch.tensor(input_ids, dtype=torch.int32), non_blocking=True)
        s.positions[:n].copy_(torch.arange(start_pos, start_pos + n, dtype=torch.int32),
                              non_blocking=True)
        ops.embedding(s.ids[:n], self.w.embed, s.residual[:n])
        bt = self.chunk_table

        def attend(layer, q, out):
            ops.prefill_attention(q, self.kv.k(layer), self.kv.v(layer), bt, start_pos,
                                  self.scale, out)

        self._layers(n, attend, s.positions[:n], bt, None)

    def restore_logits(self, logits: torch.Tensor) -> None:
        """Put a session's saved last logits [1, V] back into io.logits (before sample_pending)."""
        self.io.logits.copy_(logits)

    def sample_pending(self) -> None:
        """Sample from io.logits into io.token_in / token_hist and advance io.position."""
        io = self.io
        ops.sample(io.logits, io.temperature, io.top_k, io.top_p, io.seed, io.position,
                   io.token_in, io.token_hist)

    # ------------------------------------------------------------------ prefill

    def prefill(self, input_ids: list[int], block_table: list[int], start_pos: int = 0,
                probe: Probe = None, deadline: Optional[float] = None) -> None:
        """Write the KV of input_ids at start_pos.. into the cache; io.logits gets the last
        token's logits, io.position its position and io.token_in the token itself.

        Runs eagerly in chunks of prefill_chunk tokens. block_table must already cover
        start_pos + len(input_ids) tokens. Past `deadline` (time.monotonic()) it stops between
        chunks with DeadlineExceeded.
        """
        s, io, dev = self.scratch, self.io, self.device
        table = torch.tensor(block_table, dtype=torch.int32)
        io.block_table.zero_()
        io.block_table[0, : len(block_table)].copy_(table)
        bt = io.block_table[0]
        ids_all = torch.tensor(input_ids, dtype=torch.int32)
        pos = start_pos
        normed = None
        for lo in range(0, len(input_ids), self.prefill_chunk):
            if deadline is not None and lo and time.monotonic() > deadline:
                raise DeadlineExceeded(f"prefill passed its deadline after {lo} of "
                                       f"{len(input_ids)} tokens")
            chunk = ids_all[lo: lo + self.prefill_chunk]
            n = chunk.numel()
            s.ids[:n].copy_(chunk.to(dev, non_blocking=True))
            s.positions[:n].copy_(torch.arange(pos, pos + n, dtype=torch.int32).to(dev))
            ops.embedding(s.ids[:n], self.w.embed, s.residual[:n])
            chunk_start = pos

            def attend(layer, q, out, chunk_start=chunk_start):
                ops.prefill_attention(q, self.kv.k(layer), self.kv.v(layer), bt, chunk_start,
                                      self.scale, out)

            normed = self._layers(n, attend, s.positions[:n], bt, probe)
            pos += n
        ops.linear(normed[-1:], self.w.lm_head, io.logits)
        io.position.fill_(pos - 1)
        io.token_in.fill_(int(input_ids[-1]))

    # ------------------------------------------------------------------ state in and out

    def load_session(self, block_table: list[int], position: int, token: int) -> None:
        """Copy one session's state into the static buffers (before a replay)."""
        io = self.io
        io.block_table.zero_()
        io.block_table[0, : len(block_table)].copy_(torch.tensor(block_table, dtype=torch.int32))
        io.position.fill_(position)
        io.token_in.fill_(token)

    def set_sampling(self, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        io = self.io
        io.temperature.fill_(temperature)
        io.top_k.fill_(top_k)
        io.top_p.fill_(top_p)
        io.seed.fill_(seed)

    @property
    def weight_bytes(self) -> int:
        return self.w.nbytes
