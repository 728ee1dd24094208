"""The engine: sessions on the paged KV arena, prefill, and graph replay of fused decode steps.

Request-thread device work (prefill, state copies, replays, read-backs) runs on the replay stream;
the graph manager's thread captures on its own stream. Nothing here synchronizes the device: the
request thread waits only on events it recorded itself.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from custom_kernels import ops
from custom_kernels.weights import load_weights

from .errors import BadRequest, KVExhausted, Unavailable, UnknownSession
from .graphs import CudaGraphCapturer, GraphManager
from .kv import BlockAllocator, blocks_for
from .model import ModelRunner
from .prepare import resolve_model
from .tracing import Tracer

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Session:
    length: int                            # tokens whose K/V are in the cache
    pending: Optional[int] = None          # sampled token not yet in the cache (next input)
    logits: Optional[torch.Tensor] = None  # [1, V] last logits while no token is pending
    last_used: float = 0.0                 # engine clock at the session's last RPC


def pick_device(device: str) -> torch.device:
    if device == "auto":
        use_cuda = torch.cuda.is_available() and ops.cuda_kernels_available()
        if use_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        # an explicit index: streams and the capture thread's set_device need one
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        if not ops.cuda_kernels_available():
            raise ValueError("--device cuda needs the compiled kernels: "
                             "run `python setup.py build_ext --inplace`")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on the CPU: the reference path is the parity oracle, and bf16 matmuls crawl there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if device.type == "cuda" and dtype == "fp32":
        raise ValueError("the CUDA kernels run bf16 and fp16 only")
    return DTYPES[dtype]


def parse_sampling(sampling: Optional[dict]) -> tuple[float, int, float, int]:
    """(temperature, top_k, top_p, seed) from the wire dict; temperature 0 means greedy."""
    s = dict(sampling or {})
    known = {"temperature", "top_k", "top_p", "seed", "greedy"}
    unknown = set(s) - known
    if unknown:
        raise BadRequest(f"unknown sampling keys {sorted(unknown)}; known: {sorted(known)}")
    greedy = bool(s.get("greedy", False))
    temperature = 0.0 if greedy else float(s.get("temperature", 0.0))
    top_k, top_p, seed = int(s.get("top_k", 0)), float(s.get("top_p", 1.0)), int(s.get("seed", 0))
    if temperature < 0 or not np.isfinite(temperature):
        raise BadRequest(f"sampling.temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise BadRequest(f"sampling.top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"sampling.top_p must be in (0, 1], got {top_p}")
    if not -(1 << 63) <= seed < (1 << 63):
        raise BadRequest("sampling.seed must fit in int64")
    return temperature, top_k, top_p, seed


class Engine:
    def __init__(self, model: Optional[str] = None, device: str = "auto", dtype: str = "auto",
                 kv_blocks: Optional[int] = None, block_size: int = 16, graph_bucket: int = 1,
                 max_len: Optional[int] = None, cache_dir: Optional[str] = None,
                 gguf: Optional[str] = None, torch_profile: Optional[str] = None,
                 wait_s: float = 10.0, prefill_chunk: int = 1024, seed: int = 0,
                 max_inflight: int = 32, session_ttl_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 log: Optional[Callable[[str], None]] = None):
        if not session_ttl_s >= 0:
            raise ValueError(f"session_ttl_s must be >= 0, got {session_ttl_s}")
        # stderr by default: a server's stdout carries only its READY line.
        self.log = log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.device = pick_device(device)
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # The reference ops are tiny at batch 1: measured on a 2-core machine, one intra-op
            # thread ran a SmolLM2 decode step 7x faster than two (thread hand-offs dominate).
            torch.set_num_threads(1)
        self.dtype = pick_dtype(dtype, self.device)
        self.source = resolve_model(model, cache_dir=cache_dir, gguf=gguf, log=log)
        cfg = self.cfg = self.source.config
        self.max_len = min(max_len or 8192, cfg.max_position_embeddings)
        if kv_blocks is None:   # room for four sequences of max_len by default
            kv_blocks = 4 * blocks_for(self.max_len, block_size)
        self.tracer = Tracer(torch_profile)
        t0 = time.perf_counter()
        self.replay_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        with self._on_replay_stream():
            weights = load_weights(self.source, cfg, self.device, self.dtype, seed=seed)
            self.runner = ModelRunner(cfg, weights, max_len=self.max_len, kv_blocks=kv_blocks,
                                      block_size=block_size, prefill_chunk=prefill_chunk)
            self.runner.bind_stream()
        self.alloc = BlockAllocator(kv_blocks, block_size, self.runner.max_blocks_per_seq)
        self.sessions: dict[str, Session] = {}
        # A client that goes away without kv_free would keep its blocks for ever: when the arena
        # is full, sessions idle for session_ttl_s or longer are freed (0: never).
        self.session_ttl_s = session_ttl_s
        self.clock = clock
        self.reclaimed = 0
        self.wait_s = wait_s
        self.max_inflight = max_inflight
        self.graphs: Optional[GraphManager] = None
        if self.is_cuda:
            self.hist_host = torch.empty(self.max_len + 1, dtype=torch.int32).pin_memory()
            capturer = CudaGraphCapturer(self.runner, self.device, self.tracer)
            self.graphs = GraphManager(capturer, self.max_len, bucket=graph_bucket, log=log)
            torch.cuda.synchronize(self.device)   # load time only: weights are resident
        self.load_s = time.perf_counter() - t0
        log(f"engine: {self.source.name} on {self.device} ({str(self.dtype).split('.')[-1]}), "
            f"weights {self.runner.weight_bytes / 1e9:.3f} GB, KV arena "
            f"{self.runner.kv.nbytes / 1e9:.3f} GB ({kv_blocks} blocks x {block_size}), "
            f"max_len {self.max_len}, loaded in {self.load_s:.1f} s")

    # ------------------------------------------------------------------ helpers

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def _on_replay_stream(self):
        if self.replay_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.replay_stream)

    def _session(self, session) -> Session:
        if not isinstance(session, str) or not session:
            raise BadRequest("session must be a non-empty string")
        try:
            s = self.sessions[session]
        except KeyError:
            raise UnknownSession(f"unknown session {session!r}") from None
        s.last_used = self.clock()
        return s

    def _ensure_blocks(self, session: str, num_tokens: int) -> list[int]:
        """alloc.ensure, reclaiming idle sessions (see session_ttl_s) when the arena is full."""
        try:
            return self.alloc.ensure(session, num_tokens)
        except KVExhausted as e:
            if not self._reclaim_idle(keep=session):
                hint = (f"; no other session has been idle for {self.session_ttl_s:g} s, so none "
                        "was reclaimed" if self.session_ttl_s else "; idle reclaim is off")
                raise KVExhausted(f"{e}{hint}") from None
        return self.alloc.ensure(session, num_tokens)

    def _reclaim_idle(self, keep: str) -> int:
        """Free every session but `keep` idle for session_ttl_s or longer; returns how many."""
        if not self.session_ttl_s:
            return 0
        now = self.clock()
        idle = [k for k, s in self.sessions.items()
                if k != keep and now - s.last_used >= self.session_ttl_s]
        for k in idle:
            idle_s = now - self.sessions[k].last_used
            freed = self.kv_free(k)["freed_blocks"]
            self.log(f"reclaimed session {k!r}: idle {idle_s:.0f} s, {freed} KV blocks freed")
        self.reclaimed += len(idle)
        return len(idle)

    def _check_token(self, token, what: str) -> int:
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise BadRequest(f"{what} must be an int, got {type(token).__name__}")
        if not 0 <= int(token) < self.cfg.vocab_size:
            raise BadRequest(f"{what} {int(token)} is out of range [0, {self.cfg.vocab_size})")
        return int(token)

    def _logits_reply(self, logits: torch.Tensor, top_k: Optional[int]) -> dict:
        row = logits[0].float()                       # [V]
        if top_k:
            vals, ids = torch.topk(row, min(int(top_k), row.numel()))
            return {"top_ids": ids.to(torch.int32).cpu().numpy(),
                    "top_logits": vals.cpu().numpy()}
        return {"logits": row.cpu().numpy()}

    # ------------------------------------------------------------------ RPCs

    def hello(self) -> dict:
        src = self.source
        return {
            "model": src.name, "model_path": str(src.path) if src.path else None,
            "tokenizer_path": str(src.tokenizer_path) if src.tokenizer_path else None,
            "dtype": str(self.dtype).split(".")[-1], "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu",
            "backend": "cuda" if self.is_cuda else "cpu",
            "capabilities": {"graphs": self.is_cuda, "on_device_sampling": True,
                             "graph_bucket": self.graphs.bucket if self.graphs else None},
            "vocab_size": self.cfg.vocab_size, "eos_token_ids": list(self.cfg.eos_token_ids),
            "bos_token_id": self.cfg.bos_token_id, "max_len": self.max_len,
            "weight_bytes": self.runner.weight_bytes, "kv_bytes": self.runner.kv.nbytes,
        }

    def status(self) -> dict:
        out = self.hello()
        out["kv"] = self.alloc.usage()
        now = self.clock()
        out["sessions"] = {k: {"length": s.length, "pending": s.pending,
                               "idle_s": round(now - s.last_used, 3)}
                           for k, s in self.sessions.items()}
        out["session_ttl_s"] = self.session_ttl_s
        out["sessions_reclaimed"] = self.reclaimed
        out["graphs"] = self.graphs.snapshot() if self.graphs else None
        if self.is_cuda:
            out["gpu_memory_allocated"] = torch.cuda.memory_allocated(self.device)
            out["gpu_memory_reserved"] = torch.cuda.memory_reserved(self.device)
        return out

    def kv_init(self, session: str, input_ids: list, top_k: Optional[int] = None) -> dict:
        if not isinstance(session, str) or not session:
            raise BadRequest("session must be a non-empty string")
        if not isinstance(input_ids, (list, tuple)) or not input_ids:
            raise BadRequest("input_ids must be a non-empty list of token ids")
        ids = [self._check_token(t, f"input_ids[{i}]") for i, t in enumerate(input_ids)]
        if len(ids) >= self.max_len:
            raise BadRequest(f"prompt of {len(ids)} tokens leaves no room to decode "
                             f"(max_len {self.max_len})")
        if session in self.sessions:      # re-initialising a session replaces it
            self.kv_free(session)
        table = self._ensure_blocks(session, len(ids))
        if self.graphs:
            # Announce the length before prefill: the capture thread can work during it.
            self.graphs.note_length(session, len(ids) + 1)
        try:
            with self.tracer.range(f"prefill {len(ids)}", "prefill"), self._on_replay_stream():
                self.runner.prefill(ids, table)
                logits = self.runner.io.logits.clone()          # [1, V]
                reply = self._logits_reply(logits, top_k)
        except BaseException:
            self.alloc.free(session)
            if self.graphs:
                self.graphs.forget(session)
            raise
        self.sessions[session] = Session(length=len(ids), logits=logits, last_used=self.clock())
        if self.graphs:
            self.graphs.note_length(session, len(ids) + 1)
        reply["length"] = len(ids)
        return reply

    def step(self, session: str, token) -> dict:
        """One eager step on a client-chosen token; returns its logits (client-side sampling)."""
        s = self._session(session)
        tok = self._check_token(token, "token")
        table = self._ensure_blocks(session, s.length + 1)
        with self.tracer.range("step"), self._on_replay_stream():
            self.runner.load_session(table, s.length, tok)
            self.runner.set_sampling(0.0, 0, 1.0, 0)
            self.runner.decode_step(attn_max_len=self._key(s.length + 1))
            logits = self.runner.io.logits.clone()
            reply = self._logits_reply(logits, None)
        s.length += 1
        s.pending, s.logits = None, logits
        if self.graphs:
            self.graphs.note_length(session, s.length + 1)
        reply["length"] = s.length
        return reply

    def _key(self, length: int) -> int:
        return self.graphs.key_for(length) if self.graphs else length

    def replay_seq(self, session: str, steps: int, start_token=None, sampling=None,
                   stop_token_ids=None, check_every: int = 16) -> dict:
        """Generate `steps` tokens with fused on-device steps; see DESIGN §5.

        Tokens land in io.token_hist at their positions. The first token comes from the session's
        last logits when nothing is pending; every other token is one decode step (a graph replay
        where one is ready). Stop tokens are found by reading back every check_every steps while
        the next chunk runs, and the overshoot is discarded.
        """
        s = self._session(session)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise BadRequest(f"steps must be a positive int, got {steps!r}")
        temperature, top_k, top_p, seed = parse_sampling(sampling)
        stops = {self._check_token(t, "stop_token_ids[]") for t in (stop_token_ids or [])}
        if start_token is not None:
            s.pending, s.logits = self._check_token(start_token, "start_token"), None
        sample_first = s.pending is None
        if s.pending is None and s.logits is None:
            raise BadRequest(f"session {session!r} has neither logits nor a pending token")
        # Positions touched: the pending token sits at s.length; graph steps write up to last_pos.
        first_pos = s.length if sample_first else s.length + 1
        last_pos = first_pos + steps - 1
        if last_pos >= self.max_len:
            raise BadRequest(f"steps={steps} would run past max_len {self.max_len} "
                             f"(session length {s.length})")
        table = self._ensure_blocks(session, last_pos)    # K/V up to position last_pos - 1
        graph_steps = steps - 1 if sample_first else steps
        eager = fallbacks = 0
        stalls_before = self.graphs.stats.stalls if self.graphs else 0
        runner, io = self.runner, self.runner.io
        t_host0 = time.perf_counter()
        with self.tracer.range(f"replay_seq {steps}", "replay"), self._on_replay_stream():
            if sample_first:
                io.logits.copy_(s.logits)
                runner.load_session(table, s.length - 1, 0)
            else:
                runner.load_session(table, s.length, s.pending)
            runner.set_sampling(temperature, top_k, top_p, seed)
            ev_start = ev_end = None
            if self.is_cuda:
                ev_start = torch.cuda.Event(enable_timing=True)
                ev_end = torch.cuda.Event(enable_timing=True)
                ev_start.record()
            if sample_first:
                runner.sample_pending()
            pos = first_pos if sample_first else s.length       # position of the next input
            checked_upto = first_pos - 1
            stop_at = None
            pending_checks: list = []
            inflight: collections.deque = collections.deque()
            for i in range(graph_steps):
                if self.is_cuda:
                    self._bound_inflight(inflight, i)
                used_graph = self._one_step(session, pos)
                eager += not used_graph
                fallbacks += (not used_graph) and self.graphs is not None
                pos += 1
                if stops and ((i + 1) % check_every == 0 or i + 1 == graph_steps):
                    stop_at, checked_upto = self._check_stops(pending_checks, checked_upto, pos,
                                                              stops)
                    if stop_at is not None:
                        break
            if ev_end is not None:
                ev_end.record()
            produced_to = pos if graph_steps else first_pos      # last position written
            if stops and stop_at is None:
                stop_at, checked_upto = self._check_stops(pending_checks, checked_upto,
                                                          produced_to, stops, drain=True)
            tokens = self._read_tokens(first_pos, produced_to)
        host_ms = (time.perf_counter() - t_host0) * 1e3
        if stop_at is not None:
            tokens = tokens[: stop_at - first_pos + 1]
        last = first_pos + len(tokens) - 1
        s.length, s.pending, s.logits = last, tokens[-1], None
        if self.graphs:
            self.graphs.note_length(session, s.length + 1)
            self.graphs.stats.fallbacks += fallbacks
        gpu_ms = ev_start.elapsed_time(ev_end) if ev_start is not None else host_ms
        self.tracer.note_replay(t_host0, time.perf_counter(), graph_steps, gpu_ms)
        n = max(1, graph_steps)
        return {
            "tokens": tokens, "stopped": stop_at is not None, "length": s.length,
            "stalls": (self.graphs.stats.stalls - stalls_before) if self.graphs else 0,
            "fallbacks": fallbacks, "eager_steps": eager,
            "graphs": self.graphs is not None and eager < graph_steps,
            "timing": {"total_ms": round(gpu_ms, 3), "host_ms": round(host_ms, 3),
                       "steps": graph_steps, "ms_per_token": round(gpu_ms / n, 4)},
        }

    def _bound_inflight(self, inflight: collections.deque, i: int) -> None:
        """Keep at most max_inflight steps queued ahead of the GPU.

        Without a bound the host enqueues a whole replay_seq in a few ms and reaches lengths the
        capture thread has not got to yet (a stall on the host while the GPU still has plenty
        queued). Bounded, the capture window stays ahead of where the host is.
        """
        if i % 8 == 0:
            ev = torch.cuda.Event()
            ev.record()
            inflight.append((i, ev))
        while inflight and inflight[0][0] <= i - self.max_inflight:
            inflight.popleft()[1].synchronize()

    def _one_step(self, session: str, pos: int) -> bool:
        """Enqueue the step whose input sits at `pos`; True when it was a graph replay."""
        length = pos + 1
        if self.graphs is None:
            with self.tracer.range(f"eager T={length}", "eager"):
                self.runner.decode_step(attn_max_len=length)
            return False
        key = self.graphs.key_for(length)
        graph = self.graphs.acquire(key, self.wait_s if self.graphs.running else 0.0)
        if graph is not None:
            with self.tracer.range(f"replay T={length}"):
                graph.replay()
            self.graphs.unpin(key)
        else:
            with self.tracer.range(f"eager T={length}", "eager"):
                self.runner.decode_step(attn_max_len=key)
        # Keep the capture window moving with the session (ahead of where replay is going).
        self.graphs.note_length(session, length + 1)
        return graph is not None

    def _read_tokens(self, lo: int, hi: int) -> list[int]:
        """Tokens at positions lo..hi from token_hist (waits only for this stream's work)."""
        hist = self.runner.io.token_hist[0, lo: hi + 1]
        if not self.is_cuda:
            return [int(t) for t in hist]
        host = self.hist_host[lo: hi + 1]
        host.copy_(hist, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host.tolist()

    def _check_stops(self, pending: list, checked_upto: int, produced_to: int, stops: set,
                     drain: bool = False):
        """Queue a read-back of positions (checked_upto, produced_to]; scan the previous one.

        Scanning one chunk behind keeps the device busy with the next chunk meanwhile.
        Returns (position of the first stop token or None, new checked_upto).
        """
        if produced_to > checked_upto:
            lo, hi = checked_upto + 1, produced_to
            if self.is_cuda:
                host = self.hist_host[lo: hi + 1]
                host.copy_(self.runner.io.token_hist[0, lo: hi + 1], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                pending.append((lo, hi, ev))
            else:
                pending.append((lo, hi, None))
            checked_upto = produced_to
        while pending and (drain or len(pending) > 1):
            lo, hi, ev = pending.pop(0)
            if ev is not None:
                ev.synchronize()
                toks = self.hist_host[lo: hi + 1].tolist()
            else:
                toks = [int(t) for t in self.runner.io.token_hist[0, lo: hi + 1]]
            for j, t in enumerate(toks):
                if t in stops:
                    pending.clear()
                    return lo + j, checked_upto
        return None, checked_upto

    def kv_free(self, session: str) -> dict:
        self._session(session)
        freed = self.alloc.free(session)
        del self.sessions[session]
        if self.graphs:
            self.graphs.forget(session)
        return {"freed_blocks": freed}

    # ------------------------------------------------------------------ graph RPCs

    def _need_graphs(self) -> GraphManager:
        if self.graphs is None:
            raise Unavailable(f"CUDA graphs are unavailable on the {self.device.type} backend; "
                              "replay_seq runs the eager step there")
        return self.graphs

    def bg_capture_start(self, ahead: int = 32, behind: int = 2) -> dict:
        for name, v in (("ahead", ahead), ("behind", behind)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 4096:
                raise BadRequest(f"{name} must be an int in [0, 4096], got {v!r}")
        mgr = self._need_graphs()
        mgr.start(ahead=ahead, behind=behind)
        return mgr.snapshot()

    def wait_precapture(self, min_ahead: int = 1, timeout_s: float = 30.0) -> dict:
        mgr = self._need_graphs()
        if not mgr.running:
            raise BadRequest("background capture is not running: call bg_capture_start first")
        lengths = []
        for s in self.sessions.values():
            t = s.length + 1
            lengths += list(range(t, min(self.max_len, t + min_ahead) + 1))
        t0 = time.perf_counter()
        ready = mgr.wait_ready(lengths, float(timeout_s))
        out = mgr.snapshot()
        out.update(ready=ready, waited_ms=round((time.perf_counter() - t0) * 1e3, 3))
        return out

    def bg_capture_stop(self) -> dict:
        mgr = self._need_graphs()
        mgr.stop()
        return mgr.snapshot()

    def close(self) -> Optional[dict]:
        """Stop the capture thread; with --torch-profile, write the trace and return (and log)
        the capture/replay overlap summary."""
        if self.graphs:
            self.graphs.stop()
        summary = self.tracer.close()
        if summary:
            self.log(f"torch profile: {summary['trace']}; capture {summary['capture_ms']} ms in "
                     f"{summary['captures']} captures, replay {summary['replay_ms']} ms in "
                     f"{summary['replay_calls']} calls, overlapping {summary['overlap_ms']} ms; "
                     f"replay ms/step with capture running "
                     f"{summary['replay_ms_per_step_with_capture']}, without "
                     f"{summary['replay_ms_per_step_without_capture']}")
        return summary
