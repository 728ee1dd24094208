"""EngineCore: the model on the device, the KV arena, the scheduler and the batched step.

step() is the whole serving loop body: expire late requests, schedule, execute on the device,
advance the requests. Everything device-side runs on the replay stream; the capture threads work
on their own streams meanwhile.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from custom_kernels.weights import Shard, load_weights

from ..config import EngineConfig
from ..core.block_allocator import BlockAllocator
from ..core.outputs import RequestOutput
from ..core.request import Request
from ..core.scheduler import Scheduler
from ..errors import BadRequest, ReloadInProgress
from ..prepare import resolve_model
from ..tracing import Tracer
from ..worker.device import pick_device, pick_dtype
from ..worker.executor import Executor
from ..worker.graphs import BatchGraphManager, default_buckets
from ..worker.graphs.cuda import capturer_for
from ..worker.model_runner import ModelRunner
from ..worker.tp_graphs import TPCapturer
from ..worker.reload import copy_into, stage_checkpoint


@dataclass
class PendingReload:
    """A reload between its request and its copy: staged in a thread, then drained."""
    path: str
    version: str
    drain_timeout_s: float
    reply: Callable[[Optional[dict], Optional[BaseException]], None]
    t0: float
    staged: object = None
    error: Optional[BaseException] = None
    done: threading.Event = None      # set when staging finished (well or not)
    drain_t0: Optional[float] = None


class EngineCore:
    def __init__(self, model: Optional[str] = None, *, device: str = "auto", dtype: str = "auto",
                 config: EngineConfig = EngineConfig(), cache_dir: Optional[str] = None,
                 gguf: Optional[str] = None, torch_profile: Optional[str] = None, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 log: Optional[Callable[[str], None]] = None):
        # stderr by default: a server's stdout carries only its READY line.
        self.log = log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.clock = clock
        self.device = pick_device(device)
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Measured on a 2-core machine: one intra-op thread ran a SmolLM2 decode step 7x
            # faster than two at batch 1 (thread hand-offs dominate the tiny reference ops).
            torch.set_num_threads(1)
        self.dtype = pick_dtype(dtype, self.device)
        self.source = resolve_model(model, cache_dir=cache_dir, gguf=gguf, log=log)
        self.cfg = self.source.config
        if config.max_len and config.max_len > self.cfg.max_position_embeddings:
            log(f"max_len {config.max_len} is past the model's max_position_embeddings "
                f"{self.cfg.max_position_embeddings}; using {self.cfg.max_position_embeddings}")
        self.config = config = config.resolved(self.cfg.max_position_embeddings)
        self.tp = config.tp
        self.tp_group = None
        if self.tp > 1:
            from ..worker.tp import check_tp
            check_tp(self.cfg, self.tp)       # before anything is loaded or started
            if self.is_cuda:                  # rank r on cuda:r; rank 0 is this process
                if self.device.index not in (None, 0):
                    log(f"--tp {self.tp}: rank r runs on cuda:r; ignoring {self.device}")
                self.device = torch.device("cuda", 0)
        self.max_len = config.max_len
        self.model_version = config.model_version
        self.tracer = Tracer(torch_profile)
        t0 = time.perf_counter()
        self.replay_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        with self.on_stream():
            if self.tp > 1:
                self.runner = self._start_tp(seed)
            else:
                weights = load_weights(self.source, self.cfg, self.device, self.dtype, seed=seed)
                self.runner = ModelRunner(self.cfg, weights, max_len=self.max_len,
                                          kv_blocks=config.kv_blocks,
                                          block_size=config.block_size,
                                          prefill_chunk=config.prefill_chunk,
                                          max_num_seqs=config.max_num_seqs,
                                          batch_invariant=config.batch_invariant)
            self.runner.bind_stream()
        self.alloc = BlockAllocator(config.kv_blocks, config.block_size,
                                    self.runner.max_blocks_per_seq)
        self.reclaimers: list[Callable[[], bool]] = []     # e.g. idle sessions (sessions.py)
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            prefill_chunk=config.prefill_chunk, max_len=self.max_len,
            max_waiting=config.max_waiting, allocator=self.alloc,
            watermark_blocks=config.kv_watermark_blocks, clock=clock, reclaim=self._reclaim)
        self.batch_graphs: Optional[BatchGraphManager] = None
        if self.is_cuda and config.batch_graphs:
            self.batch_graphs = BatchGraphManager(
                self.graph_capturer("batch"), default_buckets(config.max_num_seqs), self.max_len,
                max_graphs=config.max_batch_graphs, log=log)
        self.executor = Executor(self.runner, self.batch_graphs, self.tracer)
        self.reload_pending: Optional[PendingReload] = None
        self.reloads = 0
        self.idle = False             # the last step did nothing (see step())
        if self.is_cuda:
            torch.cuda.synchronize(self.device)   # load time only: weights are resident
        self.load_s = time.perf_counter() - t0
        if self.batch_graphs is not None:
            self.batch_graphs.start()   # captures while serving: requests are taken from now on
        log(f"engine: {self.source.name} on {self.device} ({str(self.dtype).split('.')[-1]}), "
            f"weights {self.runner.weight_bytes / 1e9:.3f} GB, KV arena "
            f"{self.runner.kv.nbytes / 1e9:.3f} GB ({config.kv_blocks} blocks x "
            f"{config.block_size}), max_len {self.max_len}, max_num_seqs {config.max_num_seqs}, "
            f"{f'tp {self.tp} (per rank), ' if self.tp > 1 else ''}loaded in {self.load_s:.1f} s")

    def _start_tp(self, seed: int):
        """Start ranks 1..tp-1, join the group as rank 0, and return rank 0's runner proxy."""
        from ..worker.tp import RunnerProxy, TPGroup, build_runner

        c = self.config
        spec = dict(source=self.source, device_type=self.device.type, dtype=self.dtype,
                    seed=seed, max_len=self.max_len, kv_blocks=c.kv_blocks,
                    block_size=c.block_size, prefill_chunk=c.prefill_chunk,
                    max_num_seqs=c.max_num_seqs, batch_invariant=c.batch_invariant)
        self.tp_group = group = TPGroup(spec, self.tp, self.log)
        try:
            runner = build_runner(group.spec, 0, group.capture_group)
            group.wait_ready()
        except BaseException:
            group.close()
            raise
        return RunnerProxy(runner, group)

    # ------------------------------------------------------------------ helpers

    def graph_capturer(self, kind: str):
        """The CUDA capturer of the session step ("seq") or the batched step ("batch"). It
        captures rank 0's own runner; under TP it is wrapped so every worker captures and replays
        the same graphs (worker/tp_graphs.py)."""
        local = self.runner.local if self.tp_group is not None else self.runner
        capturer = capturer_for(local, self.device, kind, self.tracer)
        return capturer if self.tp_group is None else TPCapturer(capturer, self.tp_group, kind)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def on_stream(self):
        """Make the replay stream current (every device op of the request side runs there)."""
        if self.replay_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.replay_stream)

    def _reclaim(self) -> bool:
        return any(r() for r in self.reclaimers)

    # ------------------------------------------------------------------ requests

    def add_request(self, req: Request) -> None:
        req.model_version = self.model_version
        self.scheduler.add(req)

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        return self.scheduler.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self.reload_pending is not None

    def step(self) -> list[RequestOutput]:
        """One engine iteration; returns every request's new tokens and finishes."""
        outputs = self.scheduler.expire(self.clock())
        if self.reload_pending is not None:
            outputs += self._advance_reload()
        sched = self.scheduler.schedule()
        if not sched.empty:
            with self.on_stream():
                sampled = self.executor.execute(sched)
            outputs += self.scheduler.update(sched, sampled)
        else:
            outputs += self.scheduler.take_finished()
        self.idle = sched.empty and not outputs   # waiting for KV (or a reload): loop may sleep
        return outputs

    # ------------------------------------------------------------------ reload (DESIGN §9.4)

    def start_reload(self, path: str, version: str, drain_timeout_s: float,
                     reply: Callable[[Optional[dict], Optional[BaseException]], None]) -> None:
        """Begin a reload; reply(result, None) or reply(None, error) comes from a later step().

        The checkpoint is validated and staged on a thread (the engine keeps serving); then
        admission pauses, running requests finish (up to drain_timeout_s; later ones are aborted),
        the weights are copied into the same arena and the version is bumped.
        """
        if self.reload_pending is not None:
            raise ReloadInProgress(f"a reload to version {self.reload_pending.version!r} is in progress")
        if not version:
            raise BadRequest("reload: version must be a non-empty string")
        if not drain_timeout_s >= 0:
            raise BadRequest(f"reload: drain_timeout_s must be >= 0, got {drain_timeout_s}")
        pending = PendingReload(path, version, drain_timeout_s, reply, time.perf_counter(),
                                done=threading.Event())

        def stage():
            try:
                pending.staged = stage_checkpoint(path, self.cfg, self.dtype, Shard(0, self.tp))
            except BaseException as e:      # handed to the loop thread, which replies
                pending.error = e
            finally:
                pending.done.set()

        if self.tp_group is not None:    # every worker stages its own shard meanwhile
            self.tp_group.reload_stage(path)
        threading.Thread(target=stage, name="reload-stage", daemon=True).start()
        self.reload_pending = pending

    def _advance_reload(self) -> list[RequestOutput]:
        p = self.reload_pending
        if not p.done.is_set():
            return []
        if self.tp_group is not None and p.drain_t0 is None:
            # Before admission pauses: a rank that could not stage its shard fails the reload
            # while every rank still serves the old weights.
            try:
                problems = self.tp_group.reload_check() if p.error is None else []
            except RuntimeError as e:       # a worker died: the reply says so (the step fails next)
                problems = [str(e)]
            if problems:
                p.error = BadRequest(f"reload: {p.path}: " + "; ".join(problems))
            if p.error is not None:
                self.tp_group.reload_drop()
        if p.error is not None:
            self.reload_pending = None
            self.scheduler.paused = False
            p.reply(None, p.error)
            return []
        outputs: list[RequestOutput] = []
        if p.drain_t0 is None:
            p.drain_t0 = time.perf_counter()
            self.scheduler.paused = True
            # A preempted request already streamed old-version tokens: it cannot continue on
            # the new weights and still name one version, so it ends here.
            for req in [r for r in self.scheduler.waiting if r.output_ids]:
                outputs.append(self.scheduler.abort(req.request_id))
        if self.scheduler.running:
            if time.perf_counter() - p.drain_t0 < p.drain_timeout_s:
                return outputs
            for req in list(self.scheduler.running):
                self.log(f"reload: drain timeout, aborting request {req.request_id!r}")
                outputs.append(self.scheduler.abort(req.request_id))
        drain_ms = (time.perf_counter() - p.drain_t0) * 1e3
        t1 = time.perf_counter()
        if self.tp_group is not None:
            self.tp_group.reload_commit()    # the workers copy while rank 0 does
        with self.on_stream():
            copy_into(self.runner.w, p.staged)
        if self.is_cuda:
            self.replay_stream.synchronize()
        previous, self.model_version = self.model_version, p.version
        for req in self.scheduler.waiting:    # queued during the reload: they run on the new weights
            req.model_version = self.model_version
        self.reloads += 1
        self.reload_pending = None
        self.scheduler.paused = False
        copy_ms = (time.perf_counter() - t1) * 1e3
        self.log(f"reload: version {previous!r} -> {p.version!r} from {p.path} "
                 f"(drain {drain_ms:.0f} ms, copy {copy_ms:.0f} ms)")
        p.reply({"model_version": p.version, "previous_version": previous,
                 "drain_ms": round(drain_ms, 3), "copy_ms": round(copy_ms, 3),
                 "total_ms": round((time.perf_counter() - p.t0) * 1e3, 3)}, None)
        return outputs

    # ------------------------------------------------------------------ info

    def info(self) -> dict:
        src = self.source
        return {
            "model": src.name, "model_path": str(src.path) if src.path else None,
            "tokenizer_path": str(src.tokenizer_path) if src.tokenizer_path else None,
            "dtype": str(self.dtype).split(".")[-1], "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu",
            "backend": "cuda" if self.is_cuda else "cpu",
            "vocab_size": self.cfg.vocab_size, "eos_token_ids": list(self.cfg.eos_token_ids),
            "bos_token_id": self.cfg.bos_token_id, "max_len": self.max_len,
            "weight_bytes": self.runner.weight_bytes, "kv_bytes": self.runner.kv.nbytes,
            "model_version": self.model_version, "max_num_seqs": self.config.max_num_seqs,
            "batch_invariant": self.config.batch_invariant, "tp": self.tp,
        }

    def snapshot(self) -> dict:
        out = {"scheduler": self.scheduler.snapshot(), "kv": self.alloc.usage(),
               "batch_graphs": self.batch_graphs.snapshot() if self.batch_graphs else None,
               "eager_batch_steps": self.executor.eager_steps,
               "reloading": self.reload_pending is not None, "reloads": self.reloads}
        if self.is_cuda:
            out["gpu_memory_allocated"] = torch.cuda.memory_allocated(self.device)
            out["gpu_memory_reserved"] = torch.cuda.memory_reserved(self.device)
        return out

    def close(self) -> None:
        if self.batch_graphs is not None:
            self.batch_graphs.stop()
        if self.tp_group is not None:
            self.tp_group.close()
            self.tp_group = None
