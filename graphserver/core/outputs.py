"""What the scheduler hands the model runner for one step, and what comes back (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .request import Request


@dataclass
class PrefillChunk:
    """Prompt tokens [start_pos, start_pos + len(token_ids)) of one request, KV written only.

    Chunks start at multiples of the prefill chunk size, whatever else runs in the step, so the
    GEMM shapes a request's prefill sees (and hence its KV, bit for bit) never depend on the load.
    The request's last known token is never part of a chunk: it goes through the decode batch,
    which is where every token is sampled.
    """
    request: Request
    token_ids: list[int]
    start_pos: int
    block_table: list[int]


@dataclass
class DecodeRow:
    """One row of the batched decode step: the request's last token at `position`."""
    request: Request
    token: int
    position: int
    block_table: list[int]


@dataclass
class SchedulerOutput:
    prefills: list[PrefillChunk] = field(default_factory=list)
    decodes: list[DecodeRow] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes


@dataclass
class RequestOutput:
    """New tokens of one request since its last output, and whether it is done."""
    request: Request
    new_token_ids: list[int]
    finished: bool
    finish_reason: Optional[str] = None
