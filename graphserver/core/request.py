"""A generation request and its lifecycle, as the scheduler sees it (torch-free)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k 0 and top_p 1.0 are off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # not admitted yet (or preempted: back at the head of the queue)
    RUNNING = "running"        # holds KV blocks and a place in the batch
    FINISHED = "finished"


@dataclass
class Request:
    """One generate request.

    Token bookkeeping: all_ids = prompt_ids + output_ids. num_computed tokens of all_ids have their
    K/V in the cache. While num_computed < len(all_ids) - 1 the request is prefilling (several
    tokens per step, in chunks); then it decodes (one token per step, the last of all_ids).
    Preemption by recompute sets num_computed back to 0: the prompt and the output so far are
    prefilled again when it is readmitted, and generation continues where it stopped.
    """
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    arrival_t: float = 0.0
    deadline_t: Optional[float] = None     # engine clock; past it the request is aborted
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[str] = None
    num_preemptions: int = 0
    admitted_t: Optional[float] = None
    first_token_t: Optional[float] = None
    model_version: Optional[str] = None   # the weights its tokens came from (set at admission)
    num_emitted: int = 0                  # output tokens already reported to the client

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_prefill(self) -> bool:
        return self.num_computed < self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]
