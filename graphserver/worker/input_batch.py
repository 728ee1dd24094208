"""The static I/O of the batched decode step: max_num_seqs rows on the device, bound into every
batched graph, and their pinned host mirrors (one H2D copy per buffer per step, no allocation).

A row whose position is < 0 is padding: it writes no KV, and its sampled token is never read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BatchIO:
    token_in: torch.Tensor      # [R] int32: each row's input token; the sampler writes the next one
    position: torch.Tensor      # [R] int32: position of token_in (-1: padding row)
    block_table: torch.Tensor   # [R, MB] int32: each row's block table
    temperature: torch.Tensor   # [R] fp32 (0: greedy)
    top_k: torch.Tensor         # [R] int32 (0: off)
    top_p: torch.Tensor         # [R] fp32 (1: off)
    seed: torch.Tensor          # [R] int64
    token_hist: torch.Tensor    # [R, max_len + 1] int32: the sampler's per-position record
    logits: torch.Tensor        # [R, V] model dtype

    @classmethod
    def allocate(cls, rows: int, max_blocks_per_seq: int, max_len: int, vocab: int,
                 dtype: torch.dtype, device, pin: bool = False) -> "BatchIO":
        def z(*shape, dt=torch.int32):
            t = torch.zeros(*shape, dtype=dt, device=device)
            return t.pin_memory() if pin else t
        return cls(token_in=z(rows), position=z(rows),
                   block_table=z(rows, max_blocks_per_seq),
                   temperature=z(rows, dt=torch.float32), top_k=z(rows),
                   top_p=z(rows, dt=torch.float32), seed=z(rows, dt=torch.int64),
                   # the host mirror needs neither the history nor logits: one-element stand-ins
                   token_hist=z(rows, max_len + 1) if not pin else z(1, 1),
                   logits=(torch.empty(rows, vocab, dtype=dtype, device=device) if not pin
                           else z(1, 1, dt=dtype)))


# The inputs the host writes before each step (the rest is written on the device).
INPUT_FIELDS = ("token_in", "position", "block_table", "temperature", "top_k", "top_p", "seed")


class InputBatch:
    """Device rows + host mirrors; fill() writes the mirrors, upload() copies the used rows."""

    def __init__(self, rows: int, max_blocks_per_seq: int, max_len: int, vocab: int,
                 dtype: torch.dtype, device: torch.device):
        self.rows = rows
        self.device = device
        self.dev = BatchIO.allocate(rows, max_blocks_per_seq, max_len, vocab, dtype, device)
        pin = device.type == "cuda"
        self.host = BatchIO.allocate(rows, max_blocks_per_seq, max_len, vocab, dtype, "cpu",
                                     pin=pin) if pin else None
        # Sampled tokens come back here (pinned on CUDA so the copy is asynchronous).
        self.out_host = torch.zeros(rows, dtype=torch.int32, pin_memory=pin)
        side = self.host if self.host is not None else self.dev      # where fill() writes
        self._np = {name: getattr(side, name).numpy() for name in INPUT_FIELDS}

    def fill(self, rows: list[tuple[int, int, list[int], float, int, float, int]],
             bucket: int) -> None:
        """rows: (token, position, block table, temperature, top_k, top_p, seed) per request;
        rows [len(rows), bucket) become padding. Writes through numpy views (no tensor per row)."""
        h = self._np
        n = len(rows)
        for b, (tok, pos, table, temp, top_k, top_p, seed) in enumerate(rows):
            h["token_in"][b] = tok
            h["position"][b] = pos
            h["block_table"][b, : len(table)] = table
            h["temperature"][b] = temp
            h["top_k"][b] = top_k
            h["top_p"][b] = top_p
            h["seed"][b] = seed
        if bucket > n:
            h["position"][n:bucket] = -1
            h["token_in"][n:bucket] = 0
            h["temperature"][n:bucket] = 0.0

    def upload(self, bucket: int) -> None:
        """Copy rows [0, bucket) of every input to the device (asynchronously on CUDA)."""
        if self.host is None:
            return
        for name in INPUT_FIELDS:
            getattr(self.dev, name)[:bucket].copy_(getattr(self.host, name)[:bucket],
                                                   non_blocking=True)

    def download_tokens(self, n: int) -> torch.Tensor:
        """Queue the copy of the first n sampled tokens to out_host; the caller syncs."""
        self.out_host[:n].copy_(self.dev.token_in[:n], non_blocking=True)
        return self.out_host[:n]


