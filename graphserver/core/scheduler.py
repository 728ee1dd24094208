"""Continuous batching: which requests run in the next step, and how many of their tokens.

Torch-free. Policy, in the order schedule() applies it:
- Running requests first, oldest first. A decoding request costs one token of the step's budget
  (max_num_batched_tokens); a prefilling one costs its next chunk (a prefill chunk is never split,
  so a chunk that does not fit waits for a later step while the decodes go on).
- A running request that needs a KV block when none is free preempts the newest running request
  (recompute: its blocks are freed and it goes back to the head of the queue). When it is itself
  the newest, it preempts itself; when it runs alone and still cannot grow, the arena is too
  small for it and it finishes with "length".
- Waiting requests are admitted first come, first served while the budget, max_num_seqs and free
  KV allow (a watermark of free blocks is kept for the running ones); none is admitted in a step
  that preempted, or while admission is paused (a weights reload).
- update() appends the sampled tokens, finishes requests on a stop token, max_tokens or max_len,
  and frees their blocks.
A request that fits the arena is never failed for lack of KV: it waits, or preempts.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, Optional

from graphserver.errors import BadRequest, Overloaded

from .block_allocator import BlockAllocator, blocks_for
from .outputs import DecodeRow, PrefillChunk, RequestOutput, SchedulerOutput
from .request import Request, RequestStatus


def request_owner(request_id: str) -> str:
    """The allocator key of a generate request (sessions use their own prefix)."""
    return "req:" + request_id


@dataclass
class SchedulerStats:
    steps: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    prompt_tokens: int = 0        # prompt tokens prefilled (recomputes included)
    generation_tokens: int = 0


class Scheduler:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, prefill_chunk: int,
                 max_len: int, max_waiting: int, allocator: BlockAllocator,
                 watermark_blocks: int = 1, clock: Callable[[], float] = lambda: 0.0,
                 reclaim: Callable[[], bool] = lambda: False):
        """reclaim(): asked to free KV held outside the scheduler (idle sessions) under pressure;
        returns True when it freed something."""
        if max_num_batched_tokens < prefill_chunk:
            raise ValueError("max_num_batched_tokens must be >= prefill_chunk")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_chunk = prefill_chunk
        self.max_len = max_len
        self.max_waiting = max_waiting
        self.alloc = allocator
        self.watermark = watermark_blocks
        self.clock = clock
        self.reclaim = reclaim
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}      # every live (unfinished) request by id
        self.paused = False                          # admission paused (reload)
        self.stats = SchedulerStats()
        self._pending_finished: list[RequestOutput] = []   # finished inside schedule()

    # ------------------------------------------------------------------ requests in and out

    def add(self, req: Request) -> None:
        """Queue a request. BadRequest when it can never run; Overloaded when the queue is full."""
        if req.request_id in self.requests:
            raise BadRequest(f"request_id {req.request_id!r} is already running; ids must be "
                             "unique among live requests")
        if not req.prompt_ids:
            raise BadRequest("prompt_ids must be a non-empty list of token ids")
        if len(req.prompt_ids) >= self.max_len:
            raise BadRequest(f"prompt of {len(req.prompt_ids)} tokens leaves no room to generate "
                             f"(max_len {self.max_len})")
        need = blocks_for(len(req.prompt_ids), self.alloc.block_size)
        if need > self.alloc.num_blocks:
            raise BadRequest(f"prompt of {len(req.prompt_ids)} tokens needs {need} KV blocks; the "
                             f"arena has {self.alloc.num_blocks}")
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"the waiting queue is full ({self.max_waiting} requests); retry "
                             "later")
        req.status = RequestStatus.WAITING
        req.arrival_t = self.clock()
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str, reason: str = "abort") -> Optional[RequestOutput]:
        """Finish a live request now and free its blocks; None when it is not live."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.stats.aborted += 1
        return self._finish(req, reason)

    def expire(self, now: float) -> list[RequestOutput]:
        """Abort every request whose deadline has passed."""
        late = [r.request_id for r in self.requests.values()
                if r.deadline_t is not None and now >= r.deadline_t]
        return [out for rid in late if (out := self.abort(rid)) is not None]

    def _finish(self, req: Request, reason: str) -> RequestOutput:
        owner = request_owner(req.request_id)
        if self.alloc.has(owner):
            self.alloc.free(owner)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        self.stats.finished += 1
        new = req.output_ids[req.num_emitted:]
        req.num_emitted = len(req.output_ids)
        return RequestOutput(req, new, True, reason)

    @property
    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.waiting) and not self.paused)

    @property
    def num_live(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ one step

    def _next_work(self, req: Request, budget: int) -> tuple[int, int, bool]:
        """(prefill tokens, tokens the KV must hold, decodes this step) for req's next step.

        The chunk that completes the prompt also decodes its last token in the same step, when
        the budget has room for both; otherwise the chunk runs alone and the decode comes next.
        """
        if not req.is_prefill:
            return 0, req.num_tokens, True
        start = req.num_computed
        boundary = (start // self.prefill_chunk + 1) * self.prefill_chunk
        end = min(boundary, req.num_tokens - 1)
        decodes = end == req.num_tokens - 1 and end - start + 1 <= budget
        return end - start, end + (1 if decodes else 0), decodes

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running):
            req = self.running[i]
            n_prefill, need_tokens, decodes = self._next_work(req, budget)
            cost = n_prefill + int(decodes)
            if cost > budget:
                i += 1
                continue
            if not self._make_room(req, need_tokens, i, out):
                continue        # req itself was preempted or finished: running[i] is the next
            self._emit_work(req, n_prefill, decodes, out)
            budget -= cost
            i += 1
        if not out.preempted and not self.paused:
            self._admit(budget, out)
        self.stats.steps += not out.empty
        return out

    def _make_room(self, req: Request, need_tokens: int, index: int,
                   out: SchedulerOutput) -> bool:
        """Grow req's blocks to need_tokens, preempting newer requests; False when req itself
        left the running list (preempted, or finished "length" because it can never grow)."""
        owner = request_owner(req.request_id)
        while self.alloc.blocks_needed(owner, need_tokens) > self.alloc.num_free:
            if self.reclaim():
                continue
            if len(self.running) - 1 > index:
                self._preempt(self.running[-1], out)
                continue
            if index > 0 or len(self.running) > 1 or \
                    blocks_for(need_tokens, self.alloc.block_size) <= self.alloc.num_blocks:
                # The newest (or alone, but sessions hold what it lacks): it waits.
                self._preempt(req, out)
                return False
            # Alone and larger than the whole arena: it can never grow.
            self.running.remove(req)
            self._pending_finished.append(self._finish(req, "length"))
            return False
        self.alloc.grow(owner, need_tokens)
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.alloc.free(request_owner(req.request_id))
        req.num_computed = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self.stats.preemptions += 1
        out.preempted.append(req.request_id)

    def _emit_work(self, req: Request, n_prefill: int, decodes: bool, out: SchedulerOutput) -> None:
        table = self.alloc.table_view(request_owner(req.request_id))
        if n_prefill:
            start = req.num_computed
            ids = (req.all_ids if req.output_ids else req.prompt_ids)[start: start + n_prefill]
            out.prefills.append(PrefillChunk(req, ids, start, table))
            out.num_batched_tokens += n_prefill
        if decodes:
            out.decodes.append(DecodeRow(req, req.last_token(), req.num_tokens - 1, table))
            out.num_batched_tokens += 1

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n_prefill, need_tokens, decodes = self._next_work(req, budget)
            cost = n_prefill + int(decodes)
            if cost > budget:
                return
            owner = request_owner(req.request_id)
            if not self.running:
                # Nothing running to free blocks later: admit only what can reach its first
                # token, or it would be admitted, preempted and recomputed in a cycle.
                need_tokens = max(need_tokens, min(req.num_tokens,
                                                   self.alloc.num_blocks * self.alloc.block_size))
            while self.alloc.blocks_needed(owner, need_tokens) + self.watermark > \
                    self.alloc.num_free:
                if not self.reclaim():
                    if self.running:
                        return            # FCFS: the head waits for blocks to be freed
                    break                 # nothing running: the watermark protects nobody
            if self.alloc.blocks_needed(owner, need_tokens) > self.alloc.num_free:
                return
            self.waiting.popleft()
            self.alloc.grow(owner, self._next_work(req, budget)[1])
            req.status = RequestStatus.RUNNING
            if req.admitted_t is None:
                req.admitted_t = self.clock()
            self.running.append(req)
            self._emit_work(req, n_prefill, decodes, out)
            budget -= cost

    # ------------------------------------------------------------------ after the step

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        """Advance the scheduled requests: prefill progress, sampled tokens, finishes.

        sampled maps request_id -> the token its decode row produced this step.
        """
        results = self.take_finished()
        for chunk in out.prefills:
            chunk.request.num_computed += len(chunk.token_ids)
            self.stats.prompt_tokens += len(chunk.token_ids)
        now = self.clock()
        for row in out.decodes:
            req = row.request
            if req.finished:         # aborted between schedule() and update()
                continue
            req.num_computed += 1
            tok = sampled[req.request_id]
            req.output_ids.append(tok)
            self.stats.generation_tokens += 1
            if req.first_token_t is None:
                req.first_token_t = now
            reason = None
            if tok in req.stop_token_ids:
                reason = "stop"
            elif len(req.output_ids) >= req.max_tokens or req.num_tokens >= self.max_len:
                reason = "length"
            if reason is not None:
                self.running.remove(req)
                results.append(self._finish(req, reason))
            elif len(req.output_ids) > req.num_emitted:
                new = req.output_ids[req.num_emitted:]
                req.num_emitted = len(req.output_ids)
                results.append(RequestOutput(req, new, False))
        return results

    def take_finished(self) -> list[RequestOutput]:
        """Requests schedule() finished itself (out of room), not yet reported."""
        done, self._pending_finished = self._pending_finished, []
        return done

    def snapshot(self) -> dict:
        st = self.stats
        return {"running": len(self.running), "waiting": len(self.waiting),
                "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens,
                "prefill_chunk": self.prefill_chunk, "max_waiting": self.max_waiting,
                "paused": self.paused, "steps": st.steps, "preemptions": st.preemptions,
                "finished": st.finished, "aborted": st.aborted,
                "prompt_tokens": st.prompt_tokens, "generation_tokens": st.generation_tokens}
