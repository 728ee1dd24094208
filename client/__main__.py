"""`python -m client "prompt"` (installed as `graphclient`): generate text through a graph server,
streaming it to stdout.

Starts (and afterwards stops) a server of its own unless --endpoint names a running one. A user
mistake ends with one line on stderr and exit code 2; a server that cannot be reached or fails, with
one line and exit code 1."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import NoReturn, Sequence

from graphserver import argtypes, defaults, protocol
from graphserver import __main__ as server_cli
from client.generate import STREAM_INTERVAL_S, PromptTooLong, generate
from client.rpc import (DEFAULT_HANDSHAKE_S, NoServer, RemoteUnauthorized, RPCClient, RPCError, ServerExited,
                        ServerProcess)
from client.sampler import SamplingParams
from client.tokenizer import eos_token_ids, load_tokenizer

PROG = "python -m client"
EXIT_USAGE = 2


def _existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return text


def _chunk(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else argtypes.positive_int(text)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or argtypes.prog_name(PROG, sys.argv[0]),
                                description=__doc__, formatter_class=argtypes.HelpFormatter)
    p.add_argument("prompt", help="the user message (sent through the model's chat template unless --raw)")
    p.add_argument("--endpoint", metavar="EP", type=argtypes.client_endpoint,
                   help="a running server (ipc://PATH or tcp://HOST:PORT); default: start one")
    p.add_argument("--model", metavar="SPEC",
                   help="model for the server this command starts (see python -m graphserver --help); "
                   "default: the server's default")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the started server, repeatable (e.g. --server-arg=--device=cpu)")
    p.add_argument("--tokenizer", metavar="DIR", type=_existing_dir,
                   help="a local HF tokenizer directory to use instead of the model's own (needed for "
                   "random:<shape> models and model directories without one)")
    p.add_argument("--system", help="an optional system message")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text, without the chat template")
    p.add_argument("--max-new-tokens", type=argtypes.positive_int, default=128, metavar="N",
                   help="most tokens to generate; fewer when the server's max_len is reached first")
    p.add_argument("--stop", action="append", default=[], metavar="STRING", type=argtypes.nonempty_str,
                   help="end the reply where its text first contains STRING (not printed); repeatable")
    p.add_argument("--temperature", type=argtypes.nonneg_float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=argtypes.nonneg_int, default=0, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, metavar="S", help="sampling seed (default: random)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="HF-style penalty; anything but 1 samples on the client, one step RPC per token")
    p.add_argument("--no-graphs", action="store_true",
                   help="decode with one step RPC per token and the client's sampler, instead of the "
                   "server's fused replay_seq")
    p.add_argument("--chunk", type=_chunk, default=None, metavar="N",
                   help="tokens per replay_seq call: text streams in pieces of this many tokens "
                   f"(default: auto, as many as decode in about {STREAM_INTERVAL_S * 1e3:g} ms)")
    p.add_argument("--timeout", type=argtypes.positive_seconds, default=protocol.DEFAULT_CALL_TIMEOUT_S,
                   metavar="S", help="seconds to wait for one reply; also the server-side deadline of each call")
    p.add_argument("--connect-timeout", type=argtypes.positive_seconds, default=DEFAULT_HANDSHAKE_S,
                   metavar="S", help="seconds an --endpoint gets to answer the hello handshake")
    p.add_argument("--spawn-timeout", type=argtypes.positive_seconds, default=protocol.DEFAULT_SPAWN_TIMEOUT_S,
                   metavar="S", help="seconds to wait for a started server to be ready")
    p.add_argument("--auth-token", metavar="TOKEN", type=argtypes.nonempty_str,
                   help=f"token for a server that requires one (default: ${defaults.AUTH_TOKEN_ENV} when set)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log to stderr: -v each RPC's time, -vv more")
    return p


class _ServerArgError(Exception):
    pass


def _raise_server_arg_error(message: str) -> NoReturn:
    raise _ServerArgError(message)


def check_server_args(extra: Sequence[str], model: str | None) -> str | None:
    """Parse what a started server would get with the server's own parser, so a bad --server-arg
    fails here in one line instead of in the child. Returns the error message, or None."""
    sp = server_cli.build_parser(prog="server")
    sp.error = _raise_server_arg_error  # raise instead of printing the server's usage and exiting
    argv = (["--model", model] if model is not None else []) + list(extra)
    try:
        server_cli.check_args(sp, sp.parse_args(argv))
    except _ServerArgError as e:
        return str(e)
    return None


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.endpoint and (args.model or args.server_arg):
        parser.error("--model/--server-arg configure a started server; they cannot go with --endpoint")
    if args.raw and args.system:
        parser.error("--system needs the chat template; it cannot go with --raw")
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    if not args.endpoint:
        bad = check_server_args(args.server_arg, args.model)
        if bad:
            parser.error(f"--server-arg: {bad}")
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose:
        logging.getLogger("client").setLevel(logging.DEBUG)  # client.rpc logs each call's time at DEBUG

    def fail(msg: str, code: int) -> int:
        print(f"{parser.prog}: error: {msg}", file=sys.stderr)
        return code

    try:
        with contextlib.ExitStack() as stack:
            if args.endpoint:
                client = stack.enter_context(RPCClient(args.endpoint, args.timeout, handshake_s=args.connect_timeout,
                                                       auth_token=args.auth_token))
            else:
                client = stack.enter_context(ServerProcess(args.model, args.server_arg,
                                                           spawn_timeout_s=args.spawn_timeout,
                                                           call_timeout_s=args.timeout, auth_token=args.auth_token))
            hello = client.server_info or client.hello()
            tok_path = args.tokenizer or hello.get("tokenizer_path")
            if not tok_path:
                return fail(f"model {hello.get('model')!r} comes without a tokenizer (random weights?): "
                            "pass --tokenizer DIR", EXIT_USAGE)
            tok = load_tokenizer(tok_path)
            if args.tokenizer and hello.get("vocab_size") and len(tok) > hello["vocab_size"]:
                logging.getLogger("client").warning("the tokenizer has %d tokens, the model's vocab %d: "
                                                    "ids beyond it are refused", len(tok), hello["vocab_size"])
            use_graphs = not args.no_graphs
            if use_graphs and hello.get("capabilities", {}).get("graphs"):
                client.bg_capture_start()  # protocol defaults for the window
            stops = set(eos_token_ids(tok)) | {int(t) for t in hello.get("eos_token_ids") or ()}
            result = generate(client, tok, args.prompt, args.max_new_tokens, params, stream=_stream,
                              use_graphs=use_graphs, chunk=args.chunk, system=args.system, stop_token_ids=stops,
                              stop_strings=args.stop, raw=args.raw, max_len=hello.get("max_len"))
            sys.stdout.write("\n")
            sys.stdout.flush()
    except PromptTooLong as e:
        return fail(str(e), EXIT_USAGE)
    except ServerExited as e:
        if e.returncode == EXIT_USAGE:
            return EXIT_USAGE  # the server refused its arguments; its one-line reason is above
        return fail(f"{e.summary} (its log is above)", 1)
    except RemoteUnauthorized as e:
        return fail(f"the server refused the auth token ({e.message}); set --auth-token or "
                    f"${defaults.AUTH_TOKEN_ENV}", EXIT_USAGE)
    except NoServer as e:
        return fail(str(e), 1)
    except RPCError as e:
        return fail(f"{type(e).__name__}: {e}", 1)
    except KeyboardInterrupt:  # the ExitStack has stopped a server this command started
        print("\ninterrupted", file=sys.stderr)
        return 130

    t = result["timing"]
    per_tok = (f"{t['ms_per_token']:.2f} ms/token, {t['tokens_per_s']:.1f} tokens/s"
               if t["ms_per_token"] is not None else "n/a ms/token")
    print(f"[{len(result['tokens'])} tokens, {per_tok}, prefill {t['prefill_ms']:.1f} ms, mode {result['mode']}, "
          f"stalls {result['stalls']}, fallbacks {result['fallbacks']}, "
          f"finish {result['finish_reason']}: {result['finish_detail']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
