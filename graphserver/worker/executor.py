"""Runs one SchedulerOutput on the device: the prefill chunks, then the batched decode step (a
graph replay when its key is ready, else eager), then reads the sampled tokens back.

All device work goes to the current stream (the engine's replay stream). The only wait is on an
event recorded after the token copy, once per step: the scheduler needs the tokens to decide
what runs next.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.outputs import SchedulerOutput
from .graphs import BatchGraphManager
from .model_runner import ModelRunner


class Executor:
    def __init__(self, runner: ModelRunner, graphs: Optional[BatchGraphManager], tracer=None):
        self.runner = runner
        self.graphs = graphs
        self.tracer = tracer
        self.is_cuda = runner.device.type == "cuda"
        self.eager_steps = 0

    def _range(self, name: str):
        from contextlib import nullcontext
        return self.tracer.range(name, "step") if self.tracer else nullcontext()

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run the step; returns request_id -> sampled token for every decode row."""
        runner = self.runner
        for chunk in out.prefills:
            with self._range(f"prefill_chunk {len(chunk.token_ids)}"):
                runner.prefill_kv(chunk.token_ids, chunk.start_pos, chunk.block_table)
        rows = out.decodes
        if not rows:
            return {}
        n = len(rows)
        longest = max(r.position for r in rows) + 1
        # Padding to a bucket only pays where a graph can serve it; the CPU runs exact rows.
        key = self.graphs.key_for(n, longest) if self.graphs is not None else (n, longest)
        bucket, attn_len = key
        batch = runner.batch
        batch.fill([(r.token, r.position, r.block_table, r.request.sampling.temperature,
                     r.request.sampling.top_k, r.request.sampling.top_p, r.request.sampling.seed)
                    for r in rows], bucket)
        batch.upload(bucket)
        handle = self.graphs.acquire(key) if self.graphs is not None else None
        try:
            with self._range(f"{'replay' if handle else 'eager'} B={bucket} L={attn_len}"):
                if handle is not None:
                    handle.replay()
                else:
                    self.eager_steps += 1
                    runner.decode_batch(bucket, attn_len)
        finally:
            if handle is not None:
                self.graphs.unpin(key)
        toks = batch.download_tokens(n)
        if self.is_cuda:
            done = torch.cuda.Event()
            done.record()
            done.synchronize()
        values = toks.tolist()
        return {r.request.request_id: values[i] for i, r in enumerate(rows)}
