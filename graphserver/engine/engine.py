"""The RPC surface the server process serves (engine/proc.py): the session RPCs (sessions.py),
`generate` / `abort` / `reload` on EngineCore, and `hello` / `status`.

Every method runs on the server's loop thread. Streamed and deferred methods (generate, reload)
take a `reply` callback, called from later run_step() calls:
    reply(result: dict, more: bool = False)          a success reply (more=True: others follow)
    reply_error(exc: BaseException)                  a deferred failure (reload)
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import EngineConfig
from ..core.outputs import RequestOutput
from ..core.request import Request
from ..errors import BadRequest, ShuttingDown
from ..protocol import PROTOCOL_VERSION
from .core import EngineCore
from .sessions import Sessions
from .validate import check_deadline, check_ids, check_name, check_token, parse_sampling

Reply = Callable[..., None]


@dataclass
class Stream:
    """Where one generate request's outputs go."""
    reply: Reply
    stream: bool
    tokens: list[int]           # with stream=false: every token, sent in the final reply
    t_arrival: float


# EngineConfig fields a caller (the CLI, tests, benchmarks) may set by keyword.
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(EngineConfig))


class Engine:
    def __init__(self, model: Optional[str] = None, device: str = "auto", dtype: str = "auto",
                 *, cache_dir: Optional[str] = None, gguf: Optional[str] = None,
                 torch_profile: Optional[str] = None, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 log: Optional[Callable[[str], None]] = None, request_log=None, **knobs):
        unknown = sorted(set(knobs) - set(CONFIG_KEYS))
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; known: {sorted(CONFIG_KEYS)}")
        config = EngineConfig(**{k: v for k, v in knobs.items() if v is not None})
        self.core = EngineCore(model, device=device, dtype=dtype, config=config,
                               cache_dir=cache_dir, gguf=gguf, torch_profile=torch_profile,
                               seed=seed, clock=clock, log=log)
        self.sessions_api = Sessions(self.core)
        self.streams: dict[str, Stream] = {}
        self.request_log = request_log or (lambda msg: None)
        self.closing = False

    # ---------------------------------------------------------- what scripts and tests read

    @property
    def source(self):
        return self.core.source

    @property
    def cfg(self):
        return self.core.cfg

    @property
    def runner(self):
        return self.core.runner

    @property
    def device(self):
        return self.core.device

    @property
    def is_cuda(self) -> bool:
        return self.core.is_cuda

    @property
    def max_len(self) -> int:
        return self.core.max_len

    @property
    def tracer(self):
        return self.core.tracer

    @property
    def sessions(self):
        return self.sessions_api.sessions

    @property
    def graphs(self):
        return self.sessions_api.graphs

    @property
    def alloc(self):
        return self.core.alloc

    @property
    def load_s(self) -> float:
        return self.core.load_s

    # ---------------------------------------------------------- info

    def hello(self) -> dict:
        out = self.core.info()
        graphs = self.sessions_api.graphs
        out["protocol_version"] = PROTOCOL_VERSION
        out["capabilities"] = {"graphs": self.is_cuda, "on_device_sampling": True,
                               "graph_bucket": graphs.bucket if graphs else None,
                               "batch_graphs": self.core.batch_graphs is not None,
                               "generate": True, "reload": True}
        return out

    def status(self) -> dict:
        out = self.hello()
        out.update(self.core.snapshot())
        out.update(self.sessions_api.snapshot())
        out["requests_streaming"] = len(self.streams)
        return out

    # ---------------------------------------------------------- sessions (batch-1 product path)

    def kv_init(self, session, input_ids, top_k=None, replace=False, deadline_s=None) -> dict:
        return self.sessions_api.kv_init(session, input_ids, top_k, replace, deadline_s)

    def step(self, session, token) -> dict:
        return self.sessions_api.step(session, token)

    def replay_seq(self, session, steps, start_token=None, sampling=None, stop_token_ids=None,
                   deadline_s=None, check_every: int = 16) -> dict:
        return self.sessions_api.replay_seq(session, steps, start_token, sampling,
                                            stop_token_ids, deadline_s, check_every)

    def kv_free(self, session) -> dict:
        return self.sessions_api.kv_free(session)

    def bg_capture_start(self, ahead: int = 32, behind: int = 2) -> dict:
        return self.sessions_api.bg_capture_start(ahead, behind)

    def wait_precapture(self, min_ahead: int = 1, timeout_s: float = 30.0) -> dict:
        return self.sessions_api.wait_precapture(min_ahead, timeout_s)

    def bg_capture_stop(self) -> dict:
        return self.sessions_api.bg_capture_stop()

    # ---------------------------------------------------------- continuous batching

    def generate(self, reply: Reply, request_id: str, prompt_ids: list, max_tokens: int = 16,
                 sampling=None, stop_token_ids=(), ignore_eos: bool = False,
                 stream: bool = True, deadline_s: Optional[float] = None) -> None:
        """Queue a request; its tokens arrive through reply() from later run_step() calls.
        Everything is checked first: a refused request changes nothing."""
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        check_name(request_id, "request_id")
        cfg = self.core.cfg
        ids = check_ids(prompt_ids, "prompt_ids", cfg.vocab_size)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        sp = parse_sampling(sampling)
        stops = {check_token(t, "stop_token_ids[]", cfg.vocab_size) for t in stop_token_ids}
        if not ignore_eos:
            stops |= set(cfg.eos_token_ids)
        deadline = check_deadline(deadline_s)
        now = self.core.clock()
        req = Request(request_id, ids, max_tokens, sp, frozenset(stops),
                      deadline_t=None if deadline is None else now + deadline)
        self.core.add_request(req)         # BadRequest / Overloaded leave nothing behind
        self.streams[request_id] = Stream(reply, stream, [], now)

    def abort(self, request_id: str) -> dict:
        check_name(request_id, "request_id")
        out = self.core.abort(request_id)
        if out is not None:
            self._deliver([out])
        return {"aborted": out is not None}

    def reload(self, reply: Reply, reply_error: Callable[[BaseException], None], path: str,
               version: str, drain_timeout_s: float = 60.0) -> None:
        check_name(version, "version")

        def done(result, error):
            if error is not None:
                reply_error(error)
            else:
                reply(result)

        self.core.start_reload(path, version, drain_timeout_s, done)

    # ---------------------------------------------------------- the loop's hooks

    @property
    def has_work(self) -> bool:
        return self.core.has_work

    @property
    def idle(self) -> bool:
        """The last step did nothing: work is queued but cannot run yet (KV held by sessions, a
        reload staging). The server loop then waits for a message or poll_ms before stepping."""
        return self.core.idle

    def run_step(self) -> None:
        self._deliver(self.core.step())

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            st = self.streams.get(out.request.request_id)
            if st is None:
                continue
            req = out.request
            result = {"request_id": req.request_id, "finished": out.finished,
                      "finish_reason": out.finish_reason, "model_version": req.model_version}
            if not out.finished:
                if st.stream:
                    st.reply(dict(result, tokens=out.new_token_ids), more=True)
                else:
                    st.tokens += out.new_token_ids
                continue
            del self.streams[req.request_id]
            tokens = out.new_token_ids if st.stream else st.tokens + out.new_token_ids
            now = self.core.clock()
            queue_ms = ((req.admitted_t or now) - req.arrival_t) * 1e3
            ttft_ms = ((req.first_token_t or now) - req.arrival_t) * 1e3
            e2e_ms = (now - req.arrival_t) * 1e3
            result.update(tokens=tokens,
                          usage={"prompt_tokens": len(req.prompt_ids),
                                 "completion_tokens": len(req.output_ids)},
                          metrics={"queue_ms": round(queue_ms, 3), "ttft_ms": round(ttft_ms, 3),
                                   "e2e_ms": round(e2e_ms, 3),
                                   "preemptions": req.num_preemptions})
            st.reply(result)
            n = len(req.output_ids)
            self.request_log(
                f"generate {req.request_id!r}: {len(req.prompt_ids)} in, {n} out, "
                f"{out.finish_reason}, queue {queue_ms:.1f} ms, ttft {ttft_ms:.1f} ms, "
                f"{e2e_ms:.1f} ms, {(e2e_ms - ttft_ms) / max(1, n - 1):.2f} ms/token")

    def fail_running(self) -> None:
        """After a failed step (a bug): end every live request (final reply, finish_reason
        "abort", blocks freed), so no client waits for ever and the loop does not spin on it."""
        for rid in list(self.core.scheduler.requests):
            out = self.core.abort(rid)
            if out is not None:
                self._deliver([out])

    def shutdown(self) -> None:
        """Refuse new work and end every live request (finish_reason "abort")."""
        self.closing = True
        self.fail_running()

    def close(self) -> Optional[dict]:
        """Stop the capture threads; with --torch-profile, write the trace and return (and log)
        the capture/replay overlap summary."""
        self.sessions_api.close()
        self.core.close()
        summary = self.core.tracer.close()
        if summary:
            self.core.log(
                f"torch profile: {summary['trace']}; capture {summary['capture_ms']} ms in "
                f"{summary['captures']} captures, replay {summary['replay_ms']} ms in "
                f"{summary['replay_calls']} calls, overlapping {summary['overlap_ms']} ms; "
                f"replay ms/step with capture running "
                f"{summary['replay_ms_per_step_with_capture']}, without "
                f"{summary['replay_ms_per_step_without_capture']}")
        return summary
