"""`graphserver serve`: the HTTP front end as a process.

It binds its port first (so /health answers 503 while the engine loads), then starts the engine
(`python -m graphserver`) or attaches to one, and prints exactly one line on stdout,
`READY http://HOST:PORT`, once it serves. Logs go to stderr. With --api-servers N it also starts
N-1 more front-end processes on the same socket once the engine is up (graphserver.api.workers),
and is ready when they all are."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, Sequence

import uvicorn

from graphserver import argtypes, defaults, protocol

# The app modules (graphserver.api.app, .service, .workers) import prometheus_client, which picks
# its single- or multi-process mode at import: they are imported in main() after that is decided.
MULTIPROC_ENV = defaults.METRICS_MULTIPROC_ENV

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
PARENT_POLL_S = 1.0
GRACEFUL_SHUTDOWN_S = 5


class UsageError(Exception):
    """A mistake in the command line: one line on stderr, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graphserver serve",
        description="Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
        "/generate, /reload, /health, /metrics) in front of a graphserver engine. Prints 'READY http://HOST:PORT' "
        "on stdout when it serves.",
        epilog="Arguments after a lone '--' go to the engine unchanged, e.g. "
        "'graphserver serve --model M -- --device cpu --max-num-seqs 32' (see python -m graphserver --help).",
    )
    p.add_argument("--model", metavar="SPEC",
                   help="the engine's --model: an HF model directory or random:<shape> (default: the engine's "
                   "default model, prepared on first use)")
    p.add_argument("--tp", type=argtypes.positive_int, metavar="N",
                   help="tensor-parallel ranks of the engine it starts (that engine's --tp; "
                   f"default: {defaults.DEFAULT_TP})")
    p.add_argument("--engine-endpoint", metavar="EP",
                   help="attach to a running engine at this ZeroMQ endpoint instead of starting one")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"0 picks a free port (default: {DEFAULT_PORT})")
    p.add_argument("--api-servers", type=argtypes.positive_int, default=1, metavar="N",
                   help="front-end processes serving the port, each attached to the engine: one process's CPU "
                   "bounds it near 12-20k streamed tokens/s (default: 1)")
    p.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)  # an extra worker's inherited socket
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory (tokenizer.json, tokenizer_config.json) (default: the engine's "
                   "tokenizer_path from its hello)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients must name (default: the engine's model name)")
    p.add_argument("--engine-timeout", type=float, default=protocol.DEFAULT_CALL_TIMEOUT_S, metavar="SECONDS",
                   help="longest wait for one engine reply, or between two tokens of a stream "
                   f"(default: {protocol.DEFAULT_CALL_TIMEOUT_S:g})")
    p.add_argument("--spawn-timeout", type=float, default=protocol.DEFAULT_SPAWN_TIMEOUT_S, metavar="SECONDS",
                   help=f"longest wait for a started engine to be ready (default: {protocol.DEFAULT_SPAWN_TIMEOUT_S:g})")
    p.add_argument("--exit-with-parent", action=argparse.BooleanOptionalAction, default=False,
                   help="exit when the parent process dies (default: off)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="log every HTTP request to stderr (default: off)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="stderr log level (default: INFO)")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    engine_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, engine_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.engine_endpoint and (args.model or args.tp or engine_args):
        raise UsageError("--engine-endpoint attaches to a running engine; --model, --tp and engine "
                         "arguments are for one it starts")
    if args.tp is not None:
        if any(a == "--tp" or a.startswith("--tp=") for a in engine_args):
            raise UsageError("--tp is given twice (before and after '--')")
        engine_args += ["--tp", str(args.tp)]
    if args.engine_endpoint and args.engine_endpoint.startswith("ipc://") and not os.path.exists(
            args.engine_endpoint[len("ipc://"):]):
        raise UsageError(f"--engine-endpoint {args.engine_endpoint}: no engine socket there")
    if args.listen_fd is not None and (args.api_servers > 1 or not args.engine_endpoint):
        raise UsageError("--listen-fd is for the extra workers that --api-servers starts")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.model and not args.model.startswith("random:") and not os.path.isdir(args.model):
        raise UsageError(f"--model {args.model!r}: no such directory (or use random:<shape>)")
    if args.tokenizer and not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        raise UsageError(f"--tokenizer {args.tokenizer!r}: no tokenizer.json there")
    for name in ("engine_timeout", "spawn_timeout"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0")
    return args, engine_args


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, with TCP_NODELAY set for every accepted connection.

    asyncio turns Nagle off only on sockets whose proto is IPPROTO_TCP, and a socket made by
    socket.create_server (proto 0) passes that on to its accepted sockets. With Nagle on, an SSE
    event written right after the response headers waits for the client's delayed ACK: on a
    keep-alive connection every stream's first token came ~40 ms late. Linux hands the listener's
    TCP_NODELAY down to accepted sockets; the proto is set as well for asyncio's own check."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, port))
            sock.listen()
        except BaseException:
            sock.close()
            raise
        return sock
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _watch_parent(server: uvicorn.Server, parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(PARENT_POLL_S)
    logging.getLogger("graphserver.api").warning("parent process %s died; shutting down", parent_pid)
    server.should_exit = True


async def _serve(server: uvicorn.Server, sock: socket.socket, parent_pid: int | None) -> None:
    watcher = asyncio.create_task(_watch_parent(server, parent_pid)) if parent_pid is not None else None
    try:
        await server.serve(sockets=[sock])
    finally:
        if watcher is not None:
            watcher.cancel()


def inherited(fd: int) -> socket.socket:
    """An extra worker's listening socket, inherited from the first front-end process."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise UsageError(f"--listen-fd {fd}: not a socket ({e.strerror or e})") from None
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        raise UsageError(f"--listen-fd {fd}: not a listening socket")
    return sock


def run(launcher: Any, sock: socket.socket, settings: Any, *, access_log: bool = False,
        parent_pid: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or the parent's death); 1 when the engine failed to start."""
    from graphserver.api.app import create_app
    from graphserver.api.service import ApiState

    url = url_of(sock)
    state = ApiState(settings, launcher)
    config = uvicorn.Config(create_app(state), log_config=None, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)

    def on_ready() -> None:
        print(f"{protocol.READY_PREFIX}{url}", flush=True)

    def on_fatal(message: str) -> None:
        print(f"graphserver serve: error: engine start failed: {message}", file=sys.stderr, flush=True)
        server.should_exit = True

    settings.on_ready, settings.on_fatal = on_ready, on_fatal
    # uvicorn handles SIGINT/SIGTERM while it serves (graceful shutdown), then restores the previous
    # handlers and raises the signal again; with these no-op handlers that ends in a clean exit 0
    # instead of a death by signal or a KeyboardInterrupt traceback.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)
    # uvicorn's loop choice (uvloop when installed); asyncio.Runner takes a factory from 3.11 on.
    factory = config.get_loop_factory()
    if factory is None or sys.version_info < (3, 11):
        asyncio.run(_serve(server, sock, parent_pid))
    else:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(server, sock, parent_pid))
    return 1 if state.phase == "failed" or state.error else 0


def worker_args(args: argparse.Namespace) -> list[str]:
    """The options an extra worker shares with the first process (it attaches; it starts nothing)."""
    out = ["--engine-timeout", str(args.engine_timeout), "--log-level", args.log_level,
           "--access-log" if args.access_log else "--no-access-log"]
    for flag, value in (("--tokenizer", args.tokenizer), ("--served-model-name", args.served_model_name)):
        if value:
            out += [flag, value]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, engine_args = parse_args(sys.argv[1:] if argv is None else argv)
        sock = inherited(args.listen_fd) if args.listen_fd is not None else listen(args.host, args.port)
    except UsageError as e:
        print(f"graphserver serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    made_dir = None
    if args.api_servers > 1 and not os.environ.get(MULTIPROC_ENV):
        # Before the app modules import prometheus_client; the extra workers inherit it.
        made_dir = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="graphserver-metrics-")
    try:
        from graphserver.api.service import ApiSettings, AttachLauncher, EngineLauncher, SpawnLauncher
        from graphserver.api.workers import ExtraWorkers, WithExtraWorkers

        launcher: EngineLauncher = (AttachLauncher(args.engine_endpoint) if args.engine_endpoint else
                                    SpawnLauncher(args.model, engine_args, args.spawn_timeout))
        if args.api_servers > 1:
            launcher = WithExtraWorkers(launcher, ExtraWorkers(args.api_servers - 1, sock, worker_args(args),
                                                               args.spawn_timeout))
        settings = ApiSettings(served_model_name=args.served_model_name, tokenizer_path=args.tokenizer,
                               call_timeout_s=args.engine_timeout)
        return run(launcher, sock, settings, access_log=args.access_log,
                   parent_pid=os.getppid() if args.exit_with_parent else None)
    finally:
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)
