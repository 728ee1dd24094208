"""The batch-1 session RPCs (kv_init / replay_seq / step / kv_free and the graph RPCs), as an
adapter on EngineCore: same KV arena and allocator as the batched requests, the runner's batch-1
static I/O, and exact-length graphs captured in the background (worker/graphs/seq.py).

A session RPC runs to completion between two batched steps. Its KV blocks are owned by
"session:<name>" in the shared allocator. Every check runs before any state changes, so a refused
call leaves the session exactly as it was.
"""
from __future__ import annotations

import collections
import ctypes
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.block_allocator import BlockAllocator
from ..errors import BadRequest, KVExhausted, Unavailable, UnknownSession
from ..worker.graphs import GraphManager
from .core import EngineCore
from .validate import check_deadline, check_ids, check_name, check_token, parse_sampling

CHECK_EVERY = 16      # replay_seq reads tokens back for stop checks every this many steps
EVENT_EVERY = 8       # replay_seq records a GPU progress event every this many steps
MAX_TOP_K_REPLY = 4096


def session_owner(name: str) -> str:
    return "session:" + name


def heap_trimmer() -> Optional[Callable[[], int]]:
    """glibc's malloc_trim(0), or None where there is none (not Linux, or not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim       # already loaded: the process's own libc
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


@dataclass
class Session:
    """Everything the server keeps of one session, in one place."""
    length: int                            # tokens whose K/V are in the cache
    pending: Optional[int] = None          # sampled token not yet in the cache (next input)
    logits: Optional[torch.Tensor] = None  # [1, V] last logits while no token is pending
    last_used: float = 0.0                 # engine clock at the END of the session's last call


class Sessions:
    def __init__(self, core: EngineCore):
        self.core = core
        cfg = core.config
        self.session_ttl_s = cfg.session_ttl_s
        self.wait_s = cfg.wait_s
        self.max_inflight = cfg.max_inflight
        # The lengths a session's first replay reaches before the GPU has run any of its steps:
        # _bound_inflight lets steps 0 .. max_inflight + EVENT_EVERY - 1 be enqueued with no
        # wait on a decode step (the first event it waits on is recorded before step 0). No
        # capture finishes in no time, so those graphs must be ready beforehand: kv_init has them
        # captured during the prefill (see _wait_first). From there the GPU paces the host (step
        # i waits for steps below i - max_inflight, rounded down to EVENT_EVERY), which leaves
        # the capture thread at least EVENT_EVERY steps of GPU time for the next split count.
        self.first_lead = self.max_inflight + EVENT_EVERY
        self.sessions: dict[str, Session] = {}
        self.reclaimed = 0
        self.graphs: Optional[GraphManager] = None
        # On the CPU a session's logits ([1, V] float32, 196 KB at V = 49152) live on the glibc
        # heap, below the heap top that later allocations keep in use, so glibc never hands them
        # back by itself: RSS stayed at its high-water mark after every session was freed
        # (1000 sessions: +196 MB, none of it returned). A trim on each free returns them (about
        # 15 us). On CUDA the logits live on the device: nothing to trim.
        self._trim_heap = None if core.is_cuda else heap_trimmer()
        if core.is_cuda:
            self.hist_host = torch.empty(core.max_len + 1, dtype=torch.int32).pin_memory()
        if core.is_cuda:
            self.graphs = GraphManager(core.graph_capturer("seq"), core.max_len,
                                       bucket=cfg.graph_bucket, log=core.log)
        core.reclaimers.append(lambda: self.reclaim_idle(keep=None) > 0)

    # ------------------------------------------------------------------ helpers

    @property
    def alloc(self) -> BlockAllocator:
        return self.core.alloc

    @property
    def runner(self):
        return self.core.runner

    def _session(self, name) -> Session:
        check_name(name, "session")
        try:
            return self.sessions[name]
        except KeyError:
            raise UnknownSession(f"unknown session {name!r}") from None

    def _touch(self, s: Session) -> None:
        s.last_used = self.core.clock()

    def _ensure_blocks(self, name: str, num_tokens: int) -> list[int]:
        """alloc.ensure, reclaiming idle sessions (see session_ttl_s) when the arena is full."""
        owner = session_owner(name)
        try:
            return self.alloc.ensure(owner, num_tokens)
        except KVExhausted as e:
            if not self.reclaim_idle(keep=name):
                hint = (f"; no other session has been idle for {self.session_ttl_s:g} s, so none "
                        "was reclaimed" if self.session_ttl_s else "; idle reclaim is off")
                raise KVExhausted(f"{e}{hint}") from None
        return self.alloc.ensure(owner, num_tokens)

    def reclaim_idle(self, keep: Optional[str]) -> int:
        """Free every session but `keep` idle for session_ttl_s or longer; returns how many."""
        if not self.session_ttl_s:
            return 0
        now = self.core.clock()
        idle = [k for k, s in self.sessions.items()
                if k != keep and now - s.last_used >= self.session_ttl_s]
        for k in idle:
            idle_s = now - self.sessions[k].last_used
            freed = self._free(k)
            self.core.log(f"reclaimed session {k!r}: idle {idle_s:.0f} s, {freed} KV blocks freed")
        self.reclaimed += len(idle)
        return len(idle)

    def _free(self, name: str) -> int:
        freed = self.alloc.free(session_owner(name)) if self.alloc.has(session_owner(name)) else 0
        del self.sessions[name]
        if self.graphs:
            self.graphs.forget(name)
        if self._trim_heap is not None:
            self._trim_heap()
        return freed

    def _logits_reply(self, logits: torch.Tensor, top_k: Optional[int]) -> dict:
        row = logits[0].float()                       # [V]
        if top_k:
            vals, ids = torch.topk(row, min(int(top_k), row.numel()))
            return {"top_ids": ids.to(torch.int32).cpu().numpy(),
                    "top_logits": vals.cpu().numpy()}
        return {"logits": row.cpu().numpy()}

    def _key(self, length: int) -> int:
        return self.graphs.key_for(length) if self.graphs else length

    def _deadline(self, deadline_s: Optional[float]) -> Optional[float]:
        d = check_deadline(deadline_s)
        return None if d is None else time.monotonic() + d

    # ------------------------------------------------------------------ RPCs

    def kv_init(self, session: str, input_ids: list, top_k: Optional[int] = None,
                replace: bool = False, deadline_s: Optional[float] = None) -> dict:
        check_name(session, "session")
        vocab = self.core.cfg.vocab_size
        ids = check_ids(input_ids, "input_ids", vocab)
        if top_k is not None and not 1 <= top_k <= min(vocab, MAX_TOP_K_REPLY):
            raise BadRequest(f"top_k must be in [1, {min(vocab, MAX_TOP_K_REPLY)}] or omitted, "
                             f"got {top_k}")
        if len(ids) >= self.core.max_len:
            raise BadRequest(f"prompt of {len(ids)} tokens leaves no room to decode "
                             f"(max_len {self.core.max_len})")
        if session in self.sessions and not replace:
            raise BadRequest(f"session {session!r} already exists; kv_free it first, pass "
                             "replace=true, or pick another name")
        deadline = self._deadline(deadline_s)
        if session in self.sessions:
            self._free(session)
        table = self._ensure_blocks(session, len(ids))
        first = None
        if self.graphs:
            # Announce the session before prefill, with the lengths its first replay reaches at
            # once: the capture thread captures them while the prefill is enqueued and runs.
            first = self.graphs.prepare(session, len(ids) + 1, self.first_lead)
        runner = self.runner
        try:
            with self.core.tracer.range(f"prefill {len(ids)}", "prefill"), self.core.on_stream():
                runner.prefill(ids, table, deadline=deadline)
                if first is not None:
                    self._wait_first(first, deadline)
                logits = runner.io.logits.clone()          # [1, V]
                reply = self._logits_reply(logits, top_k)
        except BaseException:
            self.alloc.free(session_owner(session))
            if self.graphs:
                self.graphs.forget(session)
            raise
        s = self.sessions[session] = Session(length=len(ids), logits=logits)
        self._touch(s)
        reply["length"] = len(ids)
        return reply

    def _wait_first(self, lengths: list[int], deadline: Optional[float]) -> None:
        """Wait (bounded by wait_s and the deadline) for a session's first graphs.

        Called with the prefill enqueued, so the wait overlaps it on the device; what remains
        after it is time the first replay would otherwise have stalled for, since it reaches
        these lengths before the GPU paces it. Not a stall: no decode step waits; the time is
        reported as the graphs' first_wait_ms. No wait while background capture is off.
        """
        timeout = self.wait_s
        if deadline is not None:
            timeout = min(timeout, max(0.0, deadline - time.monotonic()))
        self.graphs.wait_first(lengths, timeout)

    def step(self, session: str, token) -> dict:
        """One eager step on a client-chosen token; returns its logits (client-side sampling)."""
        s = self._session(session)
        tok = check_token(token, "token", self.core.cfg.vocab_size)
        if s.length + 1 >= self.core.max_len:
            raise BadRequest(f"session {session!r} is at max_len {self.core.max_len}")
        table = self._ensure_blocks(session, s.length + 1)
        runner = self.runner
        with self.core.tracer.range("step"), self.core.on_stream():
            runner.load_session(table, s.length, tok)
            runner.set_sampling(0.0, 0, 1.0, 0)
            runner.decode_step(attn_max_len=self._key(s.length + 1))
            logits = runner.io.logits.clone()
            reply = self._logits_reply(logits, None)
        s.length += 1
        s.pending, s.logits = None, logits
        self._touch(s)
        if self.graphs:
            self.graphs.note_length(session, s.length + 1)
        reply["length"] = s.length
        return reply

    def replay_seq(self, session: str, steps: int, start_token=None, sampling=None,
                   stop_token_ids=None, deadline_s: Optional[float] = None,
                   check_every: int = CHECK_EVERY) -> dict:
        """Generate `steps` tokens with fused on-device steps; see DESIGN §5.

        Tokens land in io.token_hist at their positions. The first token comes from the session's
        last logits when nothing is pending; every other token is one decode step (a graph replay
        where one is ready). Stop tokens are found by reading back every check_every steps while
        the next chunk runs, and the overshoot is discarded. Past the deadline the replay stops
        early (stopped "deadline") and keeps what it produced.
        """
        s = self._session(session)
        vocab = self.core.cfg.vocab_size
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise BadRequest(f"steps must be a positive int, got {steps!r}")
        sp = parse_sampling(sampling)
        stops = {check_token(t, "stop_token_ids[]", vocab) for t in (stop_token_ids or [])}
        start = None if start_token is None else check_token(start_token, "start_token", vocab)
        deadline = self._deadline(deadline_s)
        pending = start if start is not None else s.pending
        sample_first = pending is None
        if sample_first and s.logits is None:
            raise BadRequest(f"session {session!r} has neither logits nor a pending token")
        # Positions touched: the pending token sits at s.length; graph steps write up to last_pos.
        first_pos = s.length if sample_first else s.length + 1
        last_pos = first_pos + steps - 1
        if last_pos >= self.core.max_len:
            raise BadRequest(f"steps={steps} would run past max_len {self.core.max_len} "
                             f"(session length {s.length}); at most "
                             f"{self.core.max_len - first_pos} more")
        table = self._ensure_blocks(session, last_pos)    # K/V up to position last_pos - 1
        # Every check passed: from here on the session changes.
        if start is not None:
            s.pending, s.logits = start, None
        graph_steps = steps - 1 if sample_first else steps
        eager = fallbacks = 0
        graphs = self.graphs
        stalls_before = graphs.stats.stalls if graphs else 0
        runner, io, core = self.runner, self.runner.io, self.core
        t_host0 = time.perf_counter()
        deadline_hit = False
        with core.tracer.range(f"replay_seq {steps}", "replay"), core.on_stream():
            if sample_first:
                runner.restore_logits(s.logits)
                runner.load_session(table, s.length - 1, 0)
            else:
                runner.load_session(table, s.length, s.pending)
            runner.set_sampling(sp.temperature, sp.top_k, sp.top_p, sp.seed)
            ev_start = ev_end = None
            if core.is_cuda:
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
                if core.is_cuda:
                    self._bound_inflight(inflight, i)
                used_graph = self._one_step(session, pos)
                eager += not used_graph
                fallbacks += (not used_graph) and graphs is not None
                pos += 1
                if stops and ((i + 1) % check_every == 0 or i + 1 == graph_steps):
                    stop_at, checked_upto = self._check_stops(pending_checks, checked_upto, pos,
                                                              stops)
                    if stop_at is not None:
                        break
                if deadline is not None and i % 8 == 7 and time.monotonic() > deadline:
                    deadline_hit = True
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
        self._touch(s)
        if graphs:
            graphs.note_length(session, s.length + 1)
            graphs.stats.fallbacks += fallbacks
        gpu_ms = ev_start.elapsed_time(ev_end) if ev_start is not None else host_ms
        core.tracer.note_replay(t_host0, time.perf_counter(), graph_steps, gpu_ms)
        n = max(1, graph_steps)
        return {
            "tokens": tokens, "stopped": stop_at is not None, "length": s.length,
            "deadline": deadline_hit,
            "stalls": (graphs.stats.stalls - stalls_before) if graphs else 0,
            "fallbacks": fallbacks, "eager_steps": eager,
            "graphs": graphs is not None and eager < graph_steps,
            "timing": {"total_ms": round(gpu_ms, 3), "host_ms": round(host_ms, 3),
                       "steps": graph_steps, "ms_per_token": round(gpu_ms / n, 4)},
        }

    def _bound_inflight(self, inflight: collections.deque, i: int) -> None:
        """Keep at most max_inflight steps queued ahead of the GPU.

        Without a bound the host enqueues a whole replay_seq in a few ms and reaches lengths the
        capture thread has not got to yet (a stall on the host while the GPU still has plenty
        queued). Bounded, the capture window stays ahead of where the host is.
        """
        if i % EVENT_EVERY == 0:
            ev = torch.cuda.Event()
            ev.record()
            inflight.append((i, ev))
        while inflight and inflight[0][0] <= i - self.max_inflight:
            inflight.popleft()[1].synchronize()

    def _one_step(self, session: str, pos: int) -> bool:
        """Enqueue the step whose input sits at `pos`; True when it was a graph replay."""
        length = pos + 1
        runner, tracer, graphs = self.runner, self.core.tracer, self.graphs
        if graphs is None:
            with tracer.range(f"eager T={length}", "eager"):
                runner.decode_step(attn_max_len=length)
            return False
        key = graphs.key_for(length)
        graph = graphs.acquire(key, self.wait_s if graphs.running else 0.0)
        if graph is not None:
            with tracer.range(f"replay T={length}"):
                graph.replay()
            graphs.unpin(key)
        else:
            with tracer.range(f"eager T={length}", "eager"):
                runner.decode_step(attn_max_len=key)
        # Keep the capture window moving with the session (ahead of where replay is going).
        graphs.note_length(session, length + 1)
        return graph is not None

    def _read_tokens(self, lo: int, hi: int) -> list[int]:
        """Tokens at positions lo..hi from token_hist (waits only for this stream's work)."""
        hist = self.runner.io.token_hist[0, lo: hi + 1]
        if not self.core.is_cuda:
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
            if self.core.is_cuda:
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
        return {"freed_blocks": self._free(session)}

    # ------------------------------------------------------------------ graph RPCs

    def _need_graphs(self) -> GraphManager:
        if self.graphs is None:
            raise Unavailable(f"CUDA graphs are unavailable on the {self.core.device.type} "
                              "backend; replay_seq runs the eager step there")
        return self.graphs

    def bg_capture_start(self, ahead: int = 32, behind: int = 2) -> dict:
        for name, v in (("ahead", ahead), ("behind", behind)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 4096:
                raise BadRequest(f"{name} must be an int in [0, 4096], got {v!r}")
        mgr = self._need_graphs()
        mgr.start(ahead=ahead, behind=behind)
        # Sessions prefilled before capture started (kv_init, then bg_capture_start): their first
        # graphs are captured now, before their next replay reaches them all at once.
        lengths: list[int] = []
        for name, s in self.sessions.items():
            if s.pending is None:          # not decoded by replay yet: the first replay is next
                lengths += mgr.prepare(name, s.length + 1, self.first_lead)
        if lengths:
            self._wait_first(lengths, None)
        return mgr.snapshot()

    def wait_precapture(self, min_ahead: int = 1, timeout_s: float = 30.0) -> dict:
        mgr = self._need_graphs()
        if not mgr.running:
            raise BadRequest("background capture is not running: call bg_capture_start first")
        if isinstance(min_ahead, bool) or not isinstance(min_ahead, int) or min_ahead < 0:
            raise BadRequest(f"min_ahead must be an int >= 0, got {min_ahead!r}")
        if not 0 <= timeout_s <= 3600:
            raise BadRequest(f"timeout_s must be in [0, 3600], got {timeout_s}")
        # prepare() stretches each window to T + min_ahead: with min_ahead > ahead the lengths
        # past the window were never captured, and the wait sat out its whole timeout.
        lengths = []
        for name, s in self.sessions.items():
            lengths += mgr.prepare(name, s.length + 1, min_ahead)
        t0 = time.perf_counter()
        ready = mgr.wait_ready(lengths, float(timeout_s))
        out = mgr.snapshot()
        out.update(ready=ready, waited_ms=round((time.perf_counter() - t0) * 1e3, 3))
        return out

    def bg_capture_stop(self) -> dict:
        mgr = self._need_graphs()
        mgr.stop()
        return mgr.snapshot()

    def snapshot(self) -> dict:
        now = self.core.clock()
        return {"sessions": {k: {"length": s.length, "pending": s.pending,
                                 "idle_s": round(now - s.last_used, 3)}
                             for k, s in self.sessions.items()},
                "session_ttl_s": self.session_ttl_s, "sessions_reclaimed": self.reclaimed,
                "graphs": self.graphs.snapshot() if self.graphs else None}

    def close(self) -> None:
        if self.graphs:
            self.graphs.stop()
