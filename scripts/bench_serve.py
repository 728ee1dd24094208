"""Benchmark the HTTP front end with N concurrent streaming clients, beside the engine's own rate.

For each concurrency C, C clients each stream --requests completions (the same prompt, --max-tokens
tokens, ignore_eos so every request makes exactly that many) from `graphserver serve`, and the
same workload goes straight to the engine through client/aio.py `generate`. The two sides take
turns in --rounds rounds, in the order http, engine, engine, http, ... (ABBA), so a drift in the
engine's own rate during a level weighs on both alike. Both report TTFT and inter-token latency
p50/p95/p99, output tok/s and requests/s over all their rounds; `ratio` is HTTP tok/s over engine
tok/s (near 1: the front end is not the bottleneck).

By default it starts an engine (`python -m graphserver`, arguments after a lone `--`) and a
`graphserver serve` attached to it. --engine-endpoint attaches to a running engine instead (and
still starts the HTTP server); --url with --engine-endpoint uses both as they are.
Writes output/bench/serve_<device>_<date>.json, and a .png beside it when matplotlib is installed.
--smoke: a quick CPU run with small counts. --plot RECORD.json draws a record's PNG later, on a
machine that has matplotlib."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import queue
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import copy_bandwidth_gbs, git_commit, output_dir, parser

import httpx
import numpy as np

from client.aio import AsyncEngineClient
from client.rpc import ServerProcess, spawn_process
from graphserver.api.text import TextTokenizer

SMOKE = {"concurrency": [1, 4], "requests": 2, "max_tokens": 8, "client_procs": 2}
QUANTILES = (50, 95, 99)


def build_parser():
    p = parser(__doc__)
    p.add_argument("--model", help="the engine's --model (default: the engine's default model)")
    p.add_argument("--engine-endpoint", metavar="EP", help="attach to this running engine instead of starting one")
    p.add_argument("--url", help="use this running HTTP server (needs --engine-endpoint, the engine behind it)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory for the HTTP server and the prompt (default: the engine's; a "
                        "random:<shape> model has none, so give one, e.g. the default model's prepared directory)")
    p.add_argument("--api-servers", type=int, default=1, metavar="N",
                   help="front-end processes of the HTTP server this script starts (its --api-servers)")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=16,
                   help="requests per client at each concurrency: enough that a level's ramp-up and its tail, "
                   "where fewer than C streams run, weigh little (at 4, one 64-stream level lasted 2-3 s and "
                   "its HTTP/engine ratio moved 0.87-0.95 between runs)")
    p.add_argument("--rounds", type=int, default=2,
                   help="turns each side takes per level, ABBA order, --requests split evenly over them "
                   "(the engine's own rate moved by 10%% between consecutive 10-s windows on the H200)")
    p.add_argument("--client-procs", type=int, default=4,
                   help="load-generator processes per level, the streams spread over them (fewer when there "
                   "are fewer streams); one process saturates a core near 15k tokens/s")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="first run every level once straight to the engine, unmeasured, so both sides meet "
                   "an engine whose batched graphs are captured")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--prompt", default=_common.default_prompt(), help="the prompt of every request (plain text)")
    p.add_argument("--smoke", action="store_true",
                   help=f"quick CPU mode: concurrency {SMOKE['concurrency']}, {SMOKE['requests']} requests per "
                   f"client, {SMOKE['max_tokens']} tokens, {SMOKE['client_procs']} load generators, engine on --device cpu")
    p.add_argument("--out-dir", type=Path, help="where the JSON and PNG go (default: output/bench)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--plot", type=Path, metavar="RECORD",
                   help="measure nothing: draw RECORD.json's PNG beside it (needs matplotlib)")
    return p


def parse(argv: list[str]) -> tuple[Any, list[str]]:
    engine_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, engine_args = argv[:cut], argv[cut + 1:]
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency must be comma-separated ints, got {args.concurrency!r}")
    if args.smoke:
        args.concurrency, args.requests, args.max_tokens = SMOKE["concurrency"], SMOKE["requests"], SMOKE["max_tokens"]
        args.client_procs = SMOKE["client_procs"]
        if "--device" not in engine_args and not args.engine_endpoint:
            engine_args += ["--device", "cpu"]
    if any(c < 1 for c in args.concurrency) or min(args.requests, args.max_tokens, args.client_procs,
                                                    args.api_servers, args.rounds) < 1:
        p.error("--concurrency, --requests, --max-tokens, --rounds, --client-procs and --api-servers must be >= 1")
    if args.requests % args.rounds:
        p.error(f"--requests {args.requests} must split evenly over --rounds {args.rounds}")
    if args.url and args.api_servers != 1:
        p.error("--api-servers is for the HTTP server this script starts; --url uses one as it is")
    if args.url and not args.engine_endpoint:
        p.error("--url needs --engine-endpoint (the engine's own rate is measured beside it)")
    if args.engine_endpoint and (args.model or engine_args):
        p.error("--engine-endpoint attaches to a running engine; --model and engine arguments are for one it starts")
    if args.tokenizer and not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        p.error(f"--tokenizer {args.tokenizer!r}: no tokenizer.json there")
    if args.tokenizer and args.url:
        p.error("--tokenizer is for the HTTP server this script starts; --url uses one as it is")
    return args, engine_args


# -------------------------------------------------------------------------------------------
# Measurement


def summarize(ttft: list[float], itl: list[float], tokens: int, requests: int, wall_s: float) -> dict:
    def q(xs: list[float]) -> dict:
        if not xs:
            return {f"p{p}": None for p in QUANTILES}
        return {f"p{p}": round(float(np.percentile(xs, p)) * 1e3, 3) for p in QUANTILES}

    return {"ttft_ms": q(ttft), "itl_ms": q(itl), "output_tok_s": round(tokens / wall_s, 2),
            "requests_s": round(requests / wall_s, 3), "tokens": tokens, "requests": requests,
            "wall_s": round(wall_s, 3)}


async def http_one(client: httpx.AsyncClient, url: str, body: dict, ttft: list, itl: list) -> int:
    t0 = time.perf_counter()
    last, usage = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            now = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if last is None:
                    ttft.append(now - t0)
                else:
                    itl.append(now - last)
                last = now
    if usage is None:
        raise RuntimeError("the stream carried no usage")
    return int(usage["completion_tokens"])


def http_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def http_share(url: str, body: dict, conc: int, n: int, timeout: float, go: Any) -> dict:
    """`conc` concurrent HTTP streamers, each making `n` requests, once `go` (a barrier) lets them."""
    ttft: list[float] = []
    itl: list[float] = []
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await http_one(client, url, {**body, "max_tokens": 2}, [], [])  # warm-up (connects)

        async def worker() -> int:
            return sum([await http_one(client, url, body, ttft, itl) for _ in range(n)])

        await asyncio.to_thread(go.wait)
        return await timed(ttft, itl, asyncio.gather(*(worker() for _ in range(conc))))


async def engine_one(engine: AsyncEngineClient, ids: list[int], max_tokens: int, ttft: list, itl: list) -> int:
    t0 = time.perf_counter()
    last, n = None, 0
    async for r in engine.generate(f"bench-{uuid.uuid4().hex}", ids, max_tokens=max_tokens, ignore_eos=True):
        now = time.perf_counter()
        if r["tokens"]:
            if last is None:
                ttft.append(now - t0)
            else:
                itl.append(now - last)
            last = now
            n += len(r["tokens"])
    return n


async def engine_share(endpoint: str, ids: list[int], max_tokens: int, conc: int, n: int, timeout: float,
                       go: Any) -> dict:
    """The same workload straight to the engine, over this process's own DEALER socket."""
    ttft: list[float] = []
    itl: list[float] = []
    async with AsyncEngineClient(endpoint, timeout) as engine:
        await engine_one(engine, ids, 2, [], [])  # warm-up

        async def worker() -> int:
            return sum([await engine_one(engine, ids, max_tokens, ttft, itl) for _ in range(n)])

        await asyncio.to_thread(go.wait)
        return await timed(ttft, itl, asyncio.gather(*(worker() for _ in range(conc))))


async def timed(ttft: list, itl: list, work: Any) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    tokens = sum(await work)
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "t0": t0, "t1": time.perf_counter(),
            "cpu_s": time.process_time() - cpu0}


def run_share(side: str, spec: tuple, go: Any, results: Any) -> None:
    """A load-generator process: one share of the streams of one level (`side` http or engine)."""
    try:
        coro = http_share(*spec, go) if side == "http" else engine_share(*spec, go)
        results.put(asyncio.run(coro))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails the run
        go.abort()
        results.put(f"{type(e).__name__}: {e}")


def shares(conc: int, procs: int) -> list[int]:
    """Streams per load-generator process: `conc` spread as evenly as `procs` processes allow."""
    procs = max(1, min(procs, conc))
    return [conc // procs + (i < conc % procs) for i in range(procs)]


def level(side: str, make_spec: Any, conc: int, n: int, procs: int, timeout: float) -> dict:
    """One turn of one side at one concurrency, its streams spread over load-generator processes
    (one Python process tops out near 15k streamed tokens/s through httpx: the client must not be
    the bound). Every process starts at one barrier; wall time runs from the first start to the last
    end. Returns the raw samples (pooled() sums turns)."""
    ctx = mp.get_context("spawn")  # no inherited sockets or threads of this process
    counts = shares(conc, procs)
    go, results = ctx.Barrier(len(counts) + 1), ctx.Queue()
    workers = [ctx.Process(target=run_share, args=(side, make_spec(c), go, results), daemon=True) for c in counts]
    for w in workers:
        w.start()
    try:
        go.wait(timeout)
        parts = [results.get(timeout=timeout + 60) for _ in workers]
    except (threading.BrokenBarrierError, queue.Empty):
        parts = [results.get_nowait() for _ in range(results.qsize())] or ["a load generator died"]
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.kill()
    failed = [p for p in parts if isinstance(p, str)]
    if failed:
        raise RuntimeError(f"{side} load generator failed: {failed[0]}")
    return {"ttft": [x for p in parts for x in p["ttft"]], "itl": [x for p in parts for x in p["itl"]],
            "tokens": sum(p["tokens"] for p in parts), "requests": conc * n, "client_procs": len(counts),
            "wall_s": max(p["t1"] for p in parts) - min(p["t0"] for p in parts),
            "cpu_s": sum(p["cpu_s"] for p in parts)}


def pooled(turns: list[dict]) -> dict:
    """One side's summary over its turns at a level: samples joined, tokens and wall time summed.
    client_cpu_us_per_token is the load generators' CPU, which says whether they kept up."""
    tokens = sum(t["tokens"] for t in turns)
    out = summarize([x for t in turns for x in t["ttft"]], [x for t in turns for x in t["itl"]], tokens,
                    sum(t["requests"] for t in turns), sum(t["wall_s"] for t in turns))
    out["client_procs"] = turns[0]["client_procs"]
    out["client_cpu_us_per_token"] = round(sum(t["cpu_s"] for t in turns) / tokens * 1e6, 1) if tokens else None
    return out


def engine_call(endpoint: str, method: str) -> dict:
    """One control RPC (hello, status) on a short-lived client, outside any measured turn."""
    async def call():
        async with AsyncEngineClient(endpoint, 30.0) as engine:
            return await getattr(engine, method)()
    return asyncio.run(call())


def engine_counters(status: dict) -> dict:
    """The engine's cumulative step counters (a stand-in engine may lack some: those are absent)."""
    sched, graphs = status.get("scheduler") or {}, status.get("batch_graphs") or {}
    out = {k: sched[k] for k in ("steps", "generation_tokens", "preemptions") if isinstance(sched.get(k), int)}
    out.update({f"graph_{k}": graphs[k] for k in ("replays", "new_captures") if isinstance(graphs.get(k), int)})
    # Every step run without a graph (the graph pool's own eager count is a subset of this one).
    if isinstance(status.get("eager_batch_steps"), int):
        out["executor_eager_steps"] = status["eager_batch_steps"]
    return out


def turn_engine_stats(before: dict, after: dict, wall_s: float) -> dict:
    """What the engine did during one turn: the counter deltas (steps, graph-less steps, new
    captures, preemptions), rows per step, and step_ms_mean, the turn's wall time per step (its
    ramp-up, tail and the prefill of requests turning over included, so above a steady decode
    step). The turn's rate is rows per step / step_ms_mean by construction: which of the two
    moved says whether a slow turn ran smaller batches or slower steps."""
    d = {k: after[k] - before[k] for k in after if k in before}
    if d.get("steps"):
        d["step_ms_mean"] = round(wall_s / d["steps"] * 1e3, 3)
        if "generation_tokens" in d:
            d["rows_per_step"] = round(d["generation_tokens"] / d["steps"], 2)
    return d


# -------------------------------------------------------------------------------------------
# Records


def process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds so far of a process and its live children (Linux /proc: the extra
    front-end processes of --api-servers), None where unknown."""
    if pid is None:
        return None
    def stat(p: int | str) -> list[str]:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

    try:
        own = stat(pid)
    except (OSError, IndexError):
        return None
    fields = [own]
    for entry in Path("/proc").iterdir():  # children, whichever of its threads started them
        if entry.name.isdigit() and entry.name != str(pid):
            try:
                f = stat(entry.name)
            except (OSError, IndexError):
                continue  # gone meanwhile
            if f[1] == str(pid):  # ppid
                fields.append(f)
    return sum(int(f[11]) + int(f[12]) for f in fields) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure_copy_bandwidth() -> float | None:
    """The device-to-device copy GB/s of this run (None without a GPU here), measured before the
    engine starts so the two never share the GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    gbs = round(copy_bandwidth_gbs(torch), 1)
    torch.cuda.empty_cache()
    return gbs


def plot(record: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    levels = record["levels"]
    cs = [lv["concurrency"] for lv in levels]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for side in ("http", "engine"):
        axes[0].plot(cs, [lv[side]["output_tok_s"] for lv in levels], marker="o", label=side)
        for p, style in (("p50", "-"), ("p99", "--")):
            axes[1].plot(cs, [lv[side]["ttft_ms"][p] for lv in levels], style, marker="o", label=f"{side} {p}")
            axes[2].plot(cs, [lv[side]["itl_ms"][p] for lv in levels], style, marker="o", label=f"{side} {p}")
    for ax, title in zip(axes, ("output tok/s", "TTFT ms", "inter-token ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{record['model']} on {record['device']} ({record['commit']}, {record['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def replot(record_path: Path) -> int:
    try:
        record = json.loads(record_path.read_text())
        record["levels"]  # noqa: B018  (a serve record has them)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"bench_serve: {record_path} is not a serve record ({e})", file=sys.stderr)
        return 2
    png = record_path.with_suffix(".png")
    if not plot(record, png):
        print("bench_serve: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    print(png)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, engine_args = parse(sys.argv[1:] if argv is None else list(argv))
    if args.plot is not None:
        return replot(args.plot)
    copy_gbs = measure_copy_bandwidth()
    started: list[Any] = []  # things to stop, newest first
    try:
        endpoint = args.engine_endpoint
        if endpoint is None:
            engine = ServerProcess(args.model, engine_args)
            engine.__enter__()
            started.append(engine)
            endpoint = engine.endpoint
        hello = engine_call(endpoint, "hello")
        # Before the HTTP server starts: it would refuse a model without a tokenizer too, less plainly.
        tokenizer = args.tokenizer or hello.get("tokenizer_path")
        if not tokenizer:
            raise SystemExit(f"bench_serve: the engine's model {hello.get('model')!r} has no tokenizer; pass --tokenizer DIR")
        ids = TextTokenizer(tokenizer).encode_plain(args.prompt)
        if ids and max(ids) >= hello["vocab_size"]:
            raise SystemExit(f"bench_serve: the prompt's token ids reach {max(ids)}, past the model's vocab of "
                             f"{hello['vocab_size']}: the tokenizer {tokenizer} does not fit this model")
        url, front_pid = args.url, None
        if url is None:
            proc, url = spawn_process([sys.executable, "-m", "graphserver.cli", "serve", "--engine-endpoint", endpoint,
                                       "--port", "0", "--exit-with-parent", "--log-level", "WARNING",
                                       "--api-servers", str(args.api_servers),
                                       *(["--tokenizer", args.tokenizer] if args.tokenizer else [])])
            started.append(proc)
            front_pid = proc.pid
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        if args.warmup:
            # The engine captures batched graphs while it serves: its first pass at each batch size
            # runs partly eager. Without this, whichever side went first at a level was measured
            # against a slower engine (on the H200: engine-direct 10.8k tok/s at 64 streams first,
            # 13.2k three runs later).
            for conc in args.concurrency:
                level("engine", lambda c: (endpoint, ids, args.max_tokens, c, 1, args.timeout),
                      conc, 1, args.client_procs, args.timeout)
        levels = []
        n = args.requests // args.rounds  # requests per client per turn
        specs = {"http": lambda c: (url, http_body(model, args.prompt, args.max_tokens), c, n, args.timeout),
                 "engine": lambda c: (endpoint, ids, args.max_tokens, c, n, args.timeout)}
        for conc in args.concurrency:
            turns: dict[str, list[dict]] = {"http": [], "engine": []}
            front_cpu = 0.0 if front_pid is not None else None
            engine_turns = []
            counters = engine_counters(engine_call(endpoint, "status"))  # one snapshot per turn boundary
            for r in range(args.rounds):
                for side in ("http", "engine") if r % 2 == 0 else ("engine", "http"):
                    cpu0 = process_cpu_s(front_pid) if side == "http" else None
                    turns[side].append(level(side, specs[side], conc, n, args.client_procs, args.timeout))
                    cpu1 = process_cpu_s(front_pid) if side == "http" else None
                    before, counters = counters, engine_counters(engine_call(endpoint, "status"))
                    engine_turns.append({"side": side, **turn_engine_stats(before, counters, turns[side][-1]["wall_s"])})
                    if side == "http":
                        front_cpu = None if None in (front_cpu, cpu0, cpu1) else front_cpu + cpu1 - cpu0
            h, e = pooled(turns["http"]), pooled(turns["engine"])
            # The front end's own CPU per token: whether it can keep up does not depend on the GPU.
            h["frontend_cpu_us_per_token"] = (round(front_cpu / h["tokens"] * 1e6, 1)
                                              if front_cpu is not None and h["tokens"] else None)
            ratio = round(h["output_tok_s"] / e["output_tok_s"], 3) if e["output_tok_s"] else None
            rounds = [{side: round(turns[side][r]["tokens"] / turns[side][r]["wall_s"], 2) for side in turns}
                      for r in range(args.rounds)]  # each turn's tok/s: how much the rate moved
            levels.append({"concurrency": conc, "http": h, "engine": e, "ratio": ratio, "rounds_tok_s": rounds,
                           "engine_turns": engine_turns})
            print(f"C={conc:3d}  http {h['output_tok_s']:9.1f} tok/s  TTFT p50 {h['ttft_ms']['p50']} ms  "
                  f"ITL p50 {h['itl_ms']['p50']} ms  CPU/token front end {h['frontend_cpu_us_per_token']} us, "
                  f"client {h['client_cpu_us_per_token']} us | engine {e['output_tok_s']:9.1f} tok/s "
                  f"(client {e['client_cpu_us_per_token']} us) | ratio {ratio}",
                  file=sys.stderr, flush=True)
    finally:
        for thing in reversed(started):
            if isinstance(thing, ServerProcess):
                thing.__exit__(None, None, None)
            else:
                thing.terminate()
                thing.wait(30)
    device = str(hello.get("device_name") or hello.get("device") or "unknown")
    now = dt.datetime.now(dt.timezone.utc)
    record = {"kind": "serve", "device": device, "backend": hello.get("backend"), "date": now.isoformat(timespec="seconds"),
              "commit": git_commit(), "copy_bandwidth_gbs": copy_gbs, "model": hello.get("model"), "dtype": hello.get("dtype"),
              "max_num_seqs": hello.get("max_num_seqs"), "prompt_tokens": len(ids), "max_tokens": args.max_tokens,
              "requests_per_client": args.requests, "rounds": args.rounds, "client_procs": args.client_procs, "api_servers": args.api_servers, "warmup": args.warmup, "smoke": args.smoke, "engine_args": engine_args, "levels": levels}
    out = args.out_dir or (output_dir() / "bench")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"serve_{re.sub(r'[^A-Za-z0-9]+', '_', device)}_{now.strftime('%Y%m%d-%H%M%S')}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(path)
    if plot(record, out / f"{stem}.png"):
        print(out / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
