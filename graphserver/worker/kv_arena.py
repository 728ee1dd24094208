"""The paged K/V tensors: one allocation holding K and V of every layer, for kv heads only (GQA is
never expanded). Block ids come from core/block_allocator.py."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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
