"""The paged KV cache: a torch-free block allocator with per-session block tables, and the device
arena it indexes.

The allocator knows nothing of tensors so it can be tested (and reasoned about) alone; the arena is
one allocation holding K and V of every layer, for kv heads only (GQA is never expanded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadRequest, KVExhausted, UnknownSession


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Hands fixed-size KV blocks to sessions. Every failure leaves the state unchanged."""

    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int):
        if num_blocks <= 0 or block_size <= 0 or max_blocks_per_seq <= 0:
            raise ValueError("num_blocks, block_size and max_blocks_per_seq must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        # Popped from the end: the most recently freed block is reused first (warm in L2).
        self._free = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    @property
    def max_tokens_per_seq(self) -> int:
        return self.max_blocks_per_seq * self.block_size

    def has(self, session: str) -> bool:
        return session in self._tables

    def table(self, session: str) -> list[int]:
        """A copy of the session's block table (callers must not edit the allocator's own)."""
        try:
            return list(self._tables[session])
        except KeyError:
            raise UnknownSession(f"unknown session {session!r}") from None

    def ensure(self, session: str, num_tokens: int) -> list[int]:
        """Grow (or create) the session's table to hold num_tokens tokens; returns the table."""
        if num_tokens < 0:
            raise BadRequest(f"session {session!r}: num_tokens must be >= 0, got {num_tokens}")
        if num_tokens > self.max_tokens_per_seq:
            raise BadRequest(f"session {session!r} would hold {num_tokens} tokens; the limit is "
                             f"{self.max_tokens_per_seq} (max_len)")
        table = self._tables.get(session, [])
        need = blocks_for(num_tokens, self.block_size) - len(table)
        if need > len(self._free):
            raise KVExhausted(f"KV cache exhausted: session {session!r} needs {need} more blocks of "
                              f"{self.block_size} tokens, {len(self._free)} are free of "
                              f"{self.num_blocks}")
        if need > 0:
            table = table + [self._free.pop() for _ in range(need)]
        self._tables[session] = table
        return list(table)

    def free(self, session: str) -> int:
        """Return the session's blocks to the pool; returns how many were freed."""
        table = self._tables.pop(session, None)
        if table is None:
            raise UnknownSession(f"unknown session {session!r}")
        self._free.extend(reversed(table))
        return len(table)

    def usage(self) -> dict:
        used = self.num_blocks - len(self._free)
        return {"blocks_total": self.num_blocks, "blocks_used": used,
                "blocks_free": len(self._free), "block_size": self.block_size,
                "sessions": len(self._tables)}


@dataclass
class KVArena:
    """K and V of every layer in one allocation.

    data [L, 2, NB, BS, nkv, D]: index [layer, 0] is K and [layer, 1] is V, each [NB, BS, nkv, D].
    """
    data: torch.Tensor

    @classmethod
    def allocate(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device) -> "KVArena":
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device))

    def k(self, layer: int) -> torch.Tensor:      # [NB, BS, nkv, D]
        return self.data[layer, 0]

    def v(self, layer: int) -> torch.Tensor:      # [NB, BS, nkv, D]
        return self.data[layer, 1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
