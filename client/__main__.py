"""`python -m client "prompt"`: generate text through a graph server, streaming it to stdout.

Starts (and afterwards stops) a server of its own unless --endpoint names a running one."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Sequence

from graphserver import protocol
from client.generate import generate
from client.rpc import RPCClient, RPCError, ServerProcess
from client.sampler import SamplingParams
from client.tokenizer import eos_token_ids, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    p.add_argument("prompt", help="the user message (sent through the model's chat template)")
    p.add_argument("--endpoint", metavar="EP",
                   help="a running server (ipc://PATH or tcp://127.0.0.1:PORT); default: start one")
    p.add_argument("--model", metavar="SPEC",
                   help="model for the server this command starts (see python -m graphserver --help); "
                   "default: the server's default")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the started server, repeatable (e.g. --server-arg=--device=cpu)")
    p.add_argument("--system", help="an optional system message")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="default: 128")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off (default: 1)")
    p.add_argument("--seed", type=int, metavar="S", help="sampling seed (default: random)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="HF-style penalty; anything but 1 samples on the client, one step RPC per token "
                   "(default: 1)")
    p.add_argument("--no-graphs", action="store_true",
                   help="decode with one step RPC per token and the client's sampler, instead of the "
                   "server's fused replay_seq")
    p.add_argument("--chunk", type=int, default=16, metavar="N", help="steps per replay_seq call (default: 16)")
    p.add_argument("--timeout", type=float, default=protocol.DEFAULT_CALL_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for one reply (default: {protocol.DEFAULT_CALL_TIMEOUT_S:g})")
    p.add_argument("--spawn-timeout", type=float, default=protocol.DEFAULT_SPAWN_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for a started server to be ready "
                   f"(default: {protocol.DEFAULT_SPAWN_TIMEOUT_S:g})")
    return p


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.endpoint and (args.model or args.server_arg):
        parser.error("--model/--server-arg configure a started server; they cannot go with --endpoint")
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))

    try:
        with contextlib.ExitStack() as stack:
            if args.endpoint:
                client = stack.enter_context(RPCClient(args.endpoint, args.timeout))
            else:
                client = stack.enter_context(ServerProcess(args.model, args.server_arg,
                                                           spawn_timeout_s=args.spawn_timeout,
                                                           call_timeout_s=args.timeout))
            hello = client.hello()
            tok_path = hello.get("tokenizer_path")
            if not tok_path:
                print(f"error: model {hello.get('model')!r} comes without a tokenizer (random weights?); "
                      "text generation needs a real model", file=sys.stderr)
                return 2
            tok = load_tokenizer(tok_path)
            use_graphs = not args.no_graphs
            if use_graphs and hello.get("capabilities", {}).get("graphs"):
                client.bg_capture_start()  # protocol defaults for the window
            stops = set(eos_token_ids(tok)) | {int(t) for t in hello.get("eos_token_ids") or ()}
            result = generate(client, tok, args.prompt, args.max_new_tokens, params, stream=_stream,
                              use_graphs=use_graphs, chunk=args.chunk, system=args.system, stop_token_ids=stops)
            sys.stdout.write("\n")
            sys.stdout.flush()
    except RPCError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the ExitStack has stopped a server this command started
        print("\ninterrupted", file=sys.stderr)
        return 130

    t = result["timing"]
    per_tok = f"{t['ms_per_token']:.2f} ms/token" if t["ms_per_token"] is not None else "n/a ms/token"
    print(f"[{len(result['tokens'])} tokens, {per_tok}, prefill {t['prefill_ms']:.1f} ms, mode {result['mode']}, "
          f"stalls {result['stalls']}, fallbacks {result['fallbacks']}"
          f"{', stopped at EOS' if result['stopped'] else ''}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
