"""The front end's hold on the engine: connecting (spawned or attached), its state for /health,
and one request's token stream turned into text pieces (detokenized, stop strings applied, timed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from client.aio import AsyncEngineClient
from client.rpc import RPCError, ServerProcess
from graphserver import protocol
from graphserver.api.metrics import Metrics
from graphserver.api.params import GenParams, ModelLimits
from graphserver.api.text import TextTokenizer
from graphserver.stops import StopStrings

log = logging.getLogger(__name__)

UNKNOWN_VERSION = "unknown"
HELLO_TIMEOUT_S = 15.0
VERSION_POLL_S = 0.5


@dataclass
class Piece:
    """Text newly ready for the client. The last piece of a request has finish_reason and usage."""

    text: str
    token_ids: list[int]
    model_version: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


# -------------------------------------------------------------------------------------------
# Launching or attaching


class EngineLauncher:
    """Where the engine comes from. start() -> (endpoint, process or None); stop() ends what start began."""

    async def start(self) -> tuple[str, Any]:
        raise NotImplementedError

    async def stop(self, client: AsyncEngineClient | None) -> None:
        return None


class AttachLauncher(EngineLauncher):
    """An engine someone else runs: nothing to start or stop."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    async def start(self) -> tuple[str, Any]:
        return self.endpoint, None


class SpawnLauncher(EngineLauncher):
    """`python -m graphserver --exit-with-parent [--model M] ARGS...` (client.rpc.ServerProcess)."""

    def __init__(self, model: str | None, extra_args: Sequence[str] = (),
                 spawn_timeout_s: float = protocol.DEFAULT_SPAWN_TIMEOUT_S):
        self._proc = ServerProcess(model, list(extra_args), spawn_timeout_s=spawn_timeout_s)

    async def start(self) -> tuple[str, Any]:
        await asyncio.to_thread(self._proc.__enter__)
        return self._proc.endpoint, self._proc.process

    async def stop(self, client: AsyncEngineClient | None) -> None:
        if self._proc.process is not None:
            # Sends `stop`, waits, then terminates or kills: the engine never outlives us.
            await asyncio.to_thread(self._proc.__exit__, None, None, None)


# -------------------------------------------------------------------------------------------
# State


@dataclass
class ApiSettings:
    served_model_name: str | None = None  # default: the engine's model name
    tokenizer_path: str | None = None  # default: the engine's tokenizer_path
    call_timeout_s: float = protocol.DEFAULT_CALL_TIMEOUT_S
    health_timeout_s: float = 5.0
    # How often the engine's hello is asked for the model version: another front-end process, or
    # any ZeroMQ client, may have reloaded the weights. The engine answers hello on its IO thread,
    # without waiting for a step, so this costs the engine nothing. 0: only what replies say.
    version_poll_s: float = VERSION_POLL_S
    on_ready: Callable[[], None] | None = None
    on_fatal: Callable[[str], None] | None = None


@dataclass
class ApiState:
    settings: ApiSettings
    launcher: EngineLauncher
    metrics: Metrics = field(default_factory=Metrics)
    phase: str = "loading"  # loading -> ready | failed; closed at shutdown
    error: str | None = None
    engine: AsyncEngineClient | None = None
    tokenizer: TextTokenizer | None = None
    hello: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    model_version: str = UNKNOWN_VERSION
    limits: ModelLimits | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reloading: bool = False
    version_watch: asyncio.Task | None = None

    async def load(self) -> None:
        """Start or attach to the engine, say hello, load the tokenizer; then ready (or failed)."""
        try:
            endpoint, process = await self.launcher.start()
            self.engine = await AsyncEngineClient.connect(endpoint, self.settings.call_timeout_s, process=process)
            # hello is answered at once even by a busy engine: a long wait means nothing is there.
            hello = await self.engine.hello(timeout_s=min(self.settings.call_timeout_s, HELLO_TIMEOUT_S))
            self._check_hello(hello)
            path = self.settings.tokenizer_path or hello.get("tokenizer_path")
            if not path:
                raise ValueError("the engine reports no tokenizer_path; pass --tokenizer DIR")
            self.tokenizer = await asyncio.to_thread(TextTokenizer, path)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure here means the server cannot serve
            self.phase, self.error = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
            log.error("engine start failed: %s", e)
            if self.settings.on_fatal is not None:
                self.settings.on_fatal(self.error)
            return
        self.hello = hello
        self.model_name = self.settings.served_model_name or str(hello.get("model") or "model")
        self.limits = ModelLimits(vocab_size=int(hello["vocab_size"]), max_len=int(hello["max_len"]))
        self.set_version(str(hello.get("model_version", "0")))
        self.phase = "ready"
        if self.settings.version_poll_s > 0:
            self.version_watch = asyncio.create_task(self._watch_version(), name="version-watch")
        log.info("serving %s (version %s) from %s", self.model_name, self.model_version, self.engine.endpoint)
        if self.settings.on_ready is not None:
            self.settings.on_ready()

    @staticmethod
    def _check_hello(hello: dict) -> None:
        missing = [k for k in ("vocab_size", "max_len") if not isinstance(hello.get(k), int)]
        if missing:
            raise ValueError(f"the engine's hello lacks {missing}: is it a batching engine (protocol "
                             f"{protocol.PROTOCOL_VERSION})?")
        version = hello.get("protocol_version")
        if version is not None and version < protocol.PROTOCOL_VERSION:
            raise ValueError(f"the engine speaks protocol {version}; generate needs {protocol.PROTOCOL_VERSION}")

    async def _watch_version(self) -> None:
        """Keep model_version (the header of responses that made no tokens, the version metric)
        within version_poll_s of the engine's, whoever reloaded it."""
        assert self.engine is not None
        period = self.settings.version_poll_s
        while True:
            await asyncio.sleep(period)
            try:
                hello = await self.engine.hello(timeout_s=max(period, 1.0))
            except RPCError as e:  # /health reports an engine that stopped answering
                log.debug("version poll failed: %s", e)
                continue
            if "model_version" in hello:
                self.set_version(str(hello["model_version"]))

    async def close(self) -> None:
        self.phase = "closed"
        if self.version_watch is not None:
            self.version_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.version_watch
        try:
            await self.launcher.stop(self.engine)
        finally:
            if self.engine is not None:
                await self.engine.close()

    def set_version(self, version: str) -> None:
        if version != self.model_version:
            self.model_version = version
            self.metrics.set_model(self.model_name, version)

    async def engine_status(self) -> dict | None:
        """The engine's status (also fed to the metrics), or None when it does not answer in time."""
        if self.engine is None:
            return None
        try:
            status = await self.engine.status(timeout_s=self.settings.health_timeout_s)
        except RPCError as e:
            log.warning("engine status failed: %s", e)
            self.metrics.set_engine_status(None)
            return None
        self.metrics.set_engine_status(status)
        if "model_version" in status:  # another front-end process may have run the reload
            self.set_version(str(status["model_version"]))
        return status

    # -- one request --------------------------------------------------------------------------

    async def generate(self, params: GenParams, endpoint: str, arrival: float) -> AsyncIterator[Piece]:
        """The request's text as it becomes ready. Raises RPCError subclasses for engine failures
        (before the first piece: the request was refused). Leaving early aborts it in the engine."""
        assert self.engine is not None and self.tokenizer is not None
        request_id = f"{endpoint}-{uuid.uuid4().hex}"
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else
                                                 set(self.hello.get("eos_token_ids") or ()))
        detok = self.tokenizer.detokenizer()
        stops = StopStrings(params.stop)
        used: list[int] = []  # tokens behind the text so far (all of them, unless a stop string cut)
        last = None  # when the previous tokens arrived
        m = self.metrics
        m.in_flight.inc()
        try:
            replies = self.engine.generate(
                request_id, params.prompt_ids, max_tokens=params.max_tokens, sampling=params.sampling,
                stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos, stream=True)
            async with contextlib.aclosing(replies):
                async for r in replies:
                    now = time.perf_counter()
                    tokens = [int(t) for t in r.get("tokens") or ()]
                    version = str(r.get("model_version", self.model_version))
                    self.set_version(version)
                    if tokens:
                        if last is None:
                            m.ttft.observe(now - arrival)
                        else:
                            for _ in tokens:
                                m.itl.observe((now - last) / len(tokens))
                        last = now
                    finished = bool(r.get("finished"))
                    reason = r.get("finish_reason") if finished else None
                    text = []
                    for i, t in enumerate(tokens):
                        used.append(t)
                        if reason == "stop" and i == len(tokens) - 1 and t in stop_ids:
                            break  # the stop token itself is not text
                        text.append(stops.push(detok.push([t])))
                        if stops.matched is not None:
                            break
                    if stops.matched is not None:
                        # Cut here; leaving the loop aborts the rest of the request in the engine.
                        yield self._last(params, "".join(text), used, version, "stop", len(used), endpoint, arrival)
                        return
                    if finished:
                        text.append(stops.push(detok.flush()))
                        text.append(stops.flush())
                        usage = r.get("usage") or {}
                        n = int(usage.get("completion_tokens", len(used)))
                        yield self._last(params, "".join(text), used, version, reason, n, endpoint, arrival)
                        return
                    if text and any(text):
                        yield Piece("".join(text), tokens, version)
        finally:
            m.in_flight.dec()

    def _last(self, params: GenParams, text: str, used: list[int], version: str, reason: str | None,
              completion_tokens: int, endpoint: str, arrival: float) -> Piece:
        m = self.metrics
        m.e2e.observe(time.perf_counter() - arrival)
        m.prompt_tokens.inc(len(params.prompt_ids))
        m.generation_tokens.inc(completion_tokens)
        m.requests.labels(endpoint=endpoint, finish_reason=str(reason)).inc()
        usage = {"prompt_tokens": len(params.prompt_ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(params.prompt_ids) + completion_tokens}
        return Piece(text, list(used), version, reason, usage)


def absolute(path: str) -> str:
    """A checkpoint path as the engine should read it (its working directory may differ)."""
    return os.path.abspath(os.path.expanduser(path))
