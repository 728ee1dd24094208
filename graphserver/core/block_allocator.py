"""Hands fixed-size KV blocks to owners (generate requests and sessions). Torch-free.

Every failure leaves the state unchanged. The arena the block ids index is worker/kv_arena.py.
"""
from __future__ import annotations

from graphserver.errors import BadRequest, KVExhausted, UnknownSession


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold num_tokens tokens."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """A free list of block ids and one block table per owner (a request id or a session key)."""

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

    @property
    def num_free(self) -> int:
        return len(self._free)

    def has(self, owner: str) -> bool:
        return owner in self._tables

    def table(self, owner: str) -> list[int]:
        """A copy of the owner's block table (callers must not edit the allocator's own)."""
        try:
            return list(self._tables[owner])
        except KeyError:
            raise UnknownSession(f"unknown session {owner!r}") from None

    def table_view(self, owner: str) -> list[int]:
        """The owner's table itself, read-only by contract (the scheduler's hot path)."""
        return self._tables.get(owner, [])

    def blocks_needed(self, owner: str, num_tokens: int) -> int:
        """More blocks the owner needs to hold num_tokens tokens (0 when it has enough)."""
        have = len(self._tables.get(owner, ()))
        return max(0, blocks_for(num_tokens, self.block_size) - have)

    def ensure(self, owner: str, num_tokens: int) -> list[int]:
        """Grow (or create) the owner's table to hold num_tokens tokens; returns a copy of it."""
        self._grow(owner, num_tokens)
        return list(self._tables[owner])

    def _grow(self, owner: str, num_tokens: int) -> None:
        if num_tokens < 0:
            raise BadRequest(f"{owner!r}: num_tokens must be >= 0, got {num_tokens}")
        if num_tokens > self.max_tokens_per_seq:
            raise BadRequest(f"{owner!r} would hold {num_tokens} tokens; the limit is "
                             f"{self.max_tokens_per_seq} (max_len)")
        table = self._tables.get(owner)
        need = blocks_for(num_tokens, self.block_size) - (len(table) if table is not None else 0)
        if need > len(self._free):
            raise KVExhausted(f"KV cache exhausted: {owner!r} needs {need} more blocks of "
                              f"{self.block_size} tokens, {len(self._free)} are free of "
                              f"{self.num_blocks}")
        if table is None:
            table = self._tables[owner] = []
        for _ in range(need):
            table.append(self._free.pop())

    def grow(self, owner: str, num_tokens: int) -> None:
        """ensure() without the copy (the scheduler's hot path)."""
        self._grow(owner, num_tokens)

    def free(self, owner: str) -> int:
        """Return the owner's blocks to the pool; returns how many were freed."""
        table = self._tables.pop(owner, None)
        if table is None:
            raise UnknownSession(f"unknown session {owner!r}")
        self._free.extend(reversed(table))
        return len(table)

    def usage(self) -> dict:
        used = self.num_blocks - len(self._free)
        return {"blocks_total": self.num_blocks, "blocks_used": used,
                "blocks_free": len(self._free), "block_size": self.block_size,
                "owners": len(self._tables),
                "usage": round(used / self.num_blocks, 6)}
