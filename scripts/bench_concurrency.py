#!/usr/bin/env python3
"""Concurrency through the real server (any device; the CPU target of the batching issue): one
generate stream alone, then N streams at once, each from its own client over ZeroMQ.

Prints and writes (output/bench/concurrency_<device>_<date>.json) aggregate output tok/s for 1
and N streams, their ratio, and per-stream latency. The server is started with --max-num-seqs N.
Greedy, EOS ignored, prompts of --prompt tokens with different contents per stream.
"""
import datetime as dt
import json
import sys
import threading
import time

import _common
from _common import ROOT


def _prompt(i: int, n: int, vocab: int) -> list[int]:
    return [(7919 * (i + 1) * (j + 3) + 13 * i) % (vocab - 2) + 1 for j in range(n)]


def _run_streams(endpoint: str, n: int, args, vocab: int) -> dict:
    from client.rpc import RPCClient
    results: dict[int, dict] = {}
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        with RPCClient(endpoint, timeout_s=600) as c:
            barrier.wait()
            t0 = time.perf_counter()
            first = None
            tokens = 0
            for r in c.generate(_prompt(i, args.prompt, vocab), max_tokens=args.new,
                                sampling={"greedy": True}, ignore_eos=True):
                if r["tokens"] and first is None:
                    first = time.perf_counter()
                tokens += len(r["tokens"])
            results[i] = {"tokens": tokens, "s": time.perf_counter() - t0,
                          "ttft_s": (first or time.perf_counter()) - t0}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in results.values())
    return {"streams": n, "wall_s": round(wall, 3), "tokens": total,
            "agg_tok_s": round(total / wall, 2),
            "per_stream_s": sorted(round(r["s"], 3) for r in results.values()),
            "ttft_s_max": round(max(r["ttft_s"] for r in results.values()), 3)}


def main() -> int:
    p = _common.parser(__doc__)
    _common.add_model_args(p)
    p.add_argument("--streams", type=int, default=8, help="concurrent streams N")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per stream")
    p.add_argument("--new", type=int, default=96, help="new tokens per stream")
    args = p.parse_args()
    from client.rpc import spawn_server
    extra = ["--device", args.device, "--dtype", args.dtype, "--max-num-seqs", str(args.streams)]
    proc, endpoint = spawn_server(args.model, extra)
    try:
        from client.rpc import RPCClient
        with RPCClient(endpoint) as c:
            hello = c.hello()
        vocab = hello["vocab_size"]
        _run_streams(endpoint, 1, args, vocab)                 # warm-up
        one = _run_streams(endpoint, 1, args, vocab)
        many = _run_streams(endpoint, args.streams, args, vocab)
        with RPCClient(endpoint) as c:
            c.stop()
    finally:
        proc.wait(timeout=60)
    ratio = many["agg_tok_s"] / one["agg_tok_s"]
    rec = {"device": hello.get("device_name"), "backend": hello.get("backend"),
           "model": hello.get("model"), "date": dt.datetime.now().isoformat(timespec="seconds"),
           "prompt": args.prompt, "new": args.new, "one": one, "many": many,
           "ratio": round(ratio, 2)}
    print(f"{hello.get('model')} on {hello.get('device_name')}: 1 stream {one['agg_tok_s']} tok/s, "
          f"{args.streams} streams {many['agg_tok_s']} tok/s aggregate: {ratio:.2f}x "
          f"(slowest stream {many['per_stream_s'][-1]} s vs {one['per_stream_s'][0]} s alone)")
    out = ROOT / "output" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    path = out / f"concurrency_{str(hello.get('device_name')).replace(' ', '_')}_{stamp}.json"
    path.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
