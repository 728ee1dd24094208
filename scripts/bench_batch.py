#!/usr/bin/env python3
"""Continuous-batching benchmark (GPU): the engine's generate path at concurrency B against HF
transformers' static-cache batched generate at the same B, in the same process on the same GPU.

For each model and B: B requests of --prompt random tokens each, --new tokens each (EOS ignored),
submitted at once and served by EngineCore.step() (batched graphs captured in the background,
warmed up before timing). Reported per B:
- step time of steady decode steps (all B rows decoding) against the DESIGN §9.5 roofline
  max((weight bytes + KV bytes read) / copy bandwidth, 2 * params * B / 790 TFLOP/s);
- aggregate output tok/s (all tokens / wall time from submit to the last finish, prefill included)
  and decode tok/s (B / steady step time);
- p50 / p95 inter-token latency over every request's consecutive tokens;
- memory: peak allocated against weights + KV arena + graph memory;
- HF static cache batched generate: ms/step from (t(new) - t(8)) / (new - 8), tok/s = B / that.
--modes invariant,fast runs the engine with batch-invariant GEMMs (the default) and without.

Writes output/bench/batch_<device>_<date>.json. `--report FILE...` turns records into a PNG
(output/bench/batch.png, when matplotlib is installed) and a markdown table on stdout.
"""
import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import time

import _common
from _common import ROOT, copy_bandwidth_gbs, git_commit

PEAK_BF16_FLOPS = 790e12       # H200 dense bf16 (DESIGN §9.5)


def prompts(b: int, n: int, vocab: int) -> list[list[int]]:
    return [[(7919 * (i + 1) * (j + 3) + 13 * i) % (vocab - 2) + 1 for j in range(n)]
            for i in range(b)]


def percentile(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def kv_bytes_per_token(cfg, elem: int) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem


def run_engine_batch(torch, eng, b: int, n_prompt: int, n_new: int) -> dict:
    """Serve b requests at once; per-step and per-token timings."""
    arrivals: dict[str, list[float]] = {}
    done: dict[str, dict] = {}

    def replier(rid):
        def reply(result, more=False):
            arrivals[rid].extend([time.perf_counter()] * len(result["tokens"]))
            if not more:
                done[rid] = result
        return reply

    ps = prompts(b, n_prompt, eng.cfg.vocab_size)
    # A stream sync, not torch.cuda.synchronize(): a device-wide sync is illegal while the
    # background thread is capturing a graph (and would invalidate its capture).
    eng.core.replay_stream.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i, p in enumerate(ps):
        rid = f"b{b}-{i}"
        arrivals[rid] = []
        eng.generate(replier(rid), rid, p, max_tokens=n_new, sampling={"greedy": True},
                     ignore_eos=True)
    steps = []          # (seconds, decode rows, prefill tokens)
    sched = eng.core.scheduler
    while eng.has_work:
        running_before = len(sched.running) + len(sched.waiting)
        ts = time.perf_counter()
        prompt_before = sched.stats.prompt_tokens
        eng.run_step()
        steps.append((time.perf_counter() - ts, running_before,
                      sched.stats.prompt_tokens - prompt_before))
    wall = time.perf_counter() - t0
    total = sum(len(v) for v in arrivals.values())
    # Steady decode: every request decoding, no prefill in the step.
    steady = [s for s, rows, pre in steps if rows == b and pre == 0]
    steady = steady[len(steady) // 10:] or steady        # drop the first tenth (warm-up)
    itl = []
    for ts in arrivals.values():
        itl += [(y - x) * 1e3 for x, y in zip(ts, ts[1:])]
    step_ms = statistics.median(steady) * 1e3 if steady else None
    return {"B": b, "wall_s": round(wall, 3), "tokens": total,
            "agg_tok_s": round(total / wall, 1),
            "step_ms": round(step_ms, 4) if step_ms else None,
            "decode_tok_s": round(b / (step_ms / 1e3), 1) if step_ms else None,
            "steady_steps": len(steady), "steps": len(steps),
            "itl_p50_ms": round(percentile(itl, 50), 4) if itl else None,
            "itl_p95_ms": round(percentile(itl, 95), 4) if itl else None,
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "finish": sorted({r["finish_reason"] for r in done.values()})}


def warm_graphs(eng, b: int, lengths: range, timeout_s: float) -> bool:
    mgr = eng.core.batch_graphs
    if mgr is None:
        return False
    keys = sorted({mgr.key_for(b, L) for L in lengths})
    return mgr.wait_ready(keys, timeout_s)


def bench_engine(torch, spec: str, args, bw_gbs: float, invariant: bool, log) -> dict:
    from graphserver.engine import Engine
    max_b = max(args.batches)
    max_len = args.prompt + args.new + 8
    blocks_per_seq = -(-max_len // 16)
    eng = Engine(model=spec, device="cuda", dtype=args.dtype, max_len=max_len,
                 kv_blocks=blocks_per_seq * max_b + 8, block_size=16, max_num_seqs=max_b,
                 prefill_chunk=args.prefill_chunk, batch_invariant=invariant,
                 max_batch_graphs=args.max_graphs, log=log)
    try:
        cfg, w_bytes = eng.cfg, eng.runner.weight_bytes
        elem = 2
        params = w_bytes / elem
        rows = []
        for b in args.batches:
            t0 = time.perf_counter()
            warmed = warm_graphs(eng, b, range(args.prompt + 1, max_len, 32), args.warm_s)
            warm_s = time.perf_counter() - t0
            r = run_engine_batch(torch, eng, b, args.prompt, args.new)
            mean_len = args.prompt + args.new / 2
            kv_read = b * mean_len * kv_bytes_per_token(cfg, elem)
            floor_ms = max((w_bytes + kv_read) / (bw_gbs * 1e9), 2 * params * b / PEAK_BF16_FLOPS) * 1e3
            r.update(floor_ms=round(floor_ms, 4),
                     pct_of_roofline=round(100 * floor_ms / r["step_ms"], 1) if r["step_ms"] else None,
                     graphs_warmed=warmed, warm_s=round(warm_s, 2))
            log(f"  ours {'inv ' if invariant else 'fast'} B={b}: step {r['step_ms']} ms "
                f"(floor {floor_ms:.3f}, {r['pct_of_roofline']}%), {r['agg_tok_s']} tok/s agg, "
                f"{r['decode_tok_s']} tok/s decode, itl p50/p95 {r['itl_p50_ms']}/{r['itl_p95_ms']} ms")
            rows.append(r)
        # The batch-1 product path on the same engine, for "batch 1 through the batched engine
        # <= 1.05x replay_seq": exact-length session graphs, precaptured.
        ids = prompts(1, args.prompt, cfg.vocab_size)[0]
        eng.kv_init("bench-replay", ids)
        eng.bg_capture_start(ahead=64, behind=2)
        eng.wait_precapture(min_ahead=64, timeout_s=60)
        eng.replay_seq("bench-replay", 64, sampling={"greedy": True})
        rep = eng.replay_seq("bench-replay", args.new - 64, sampling={"greedy": True})
        eng.bg_capture_stop()
        eng.kv_free("bench-replay")
        replay_ms = rep["timing"]["ms_per_token"]
        b1 = next((r for r in rows if r["B"] == 1), None)
        log(f"  replay_seq batch 1: {replay_ms} ms/token; batched engine at B=1: "
            f"{b1['step_ms'] if b1 else None} ms/step")
        st = eng.status()
        mem = {"weights": w_bytes, "kv_arena": eng.runner.kv.nbytes,
               "graphs": (st.get("batch_graphs") or {}).get("graph_bytes", 0),
               "allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}
        base = mem["weights"] + mem["kv_arena"] + mem["graphs"]
        mem["over_weights_kv_graphs_pct"] = round(100 * (mem["reserved"] - base) / base, 2)
        return {"batch_invariant": invariant, "rows": rows, "memory": mem,
                "replay_seq_ms_per_token": replay_ms,
                "b1_over_replay_seq": round(b1["step_ms"] / replay_ms, 3) if b1 and b1["step_ms"] else None,
                "batch_graphs": st.get("batch_graphs"), "scheduler": st.get("scheduler")}
    finally:
        eng.close()
        del eng
        gc.collect()
        torch.cuda.empty_cache()


def bench_hf(torch, spec: str, args, log) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM
    from graphserver.config import random_shape_config
    if not spec.startswith("random:"):
        raise SystemExit("the HF peer runs on random: shapes here (same config, random weights)")
    cfg = LlamaConfig(**random_shape_config(spec.split(":", 1)[1]))
    dtype = torch.bfloat16
    with torch.device("cuda"):
        hf = LlamaForCausalLM(cfg).to(dtype).eval()
    out = []
    try:
        for b in args.batches:
            if b > args.hf_max_b:
                continue
            ids = torch.tensor(prompts(b, args.prompt, cfg.vocab_size), device="cuda")

            def run(new):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, top_p=None, top_k=None,
                                temperature=None, cache_implementation="static")
                torch.cuda.synchronize()
                return time.perf_counter() - t

            # Two warm-ups, one per cache length: HF compiles its static-cache forward, and the
            # second length makes that compile dynamic, so neither timed run includes a compile
            # (one warm-up left the 2026-12-03 record's B=1 figures with a recompile inside).
            run(8)
            run(args.hf_new)
            t_short, t_long = run(8), run(args.hf_new)
            ms = (t_long - t_short) / (args.hf_new - 8) * 1e3
            out.append({"B": b, "step_ms": round(ms, 4), "decode_tok_s": round(b / ms * 1e3, 1)})
            log(f"  HF static B={b}: {ms:.3f} ms/step, {b / ms * 1e3:.0f} tok/s")
    finally:
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    return out


def report(files: list[str], hf_min_b: int = 1) -> None:
    recs = [json.loads(open(f).read()) for f in files]
    print("| model | mode | B | step ms | floor ms | % roofline | agg tok/s | decode tok/s | "
          "HF static tok/s | x HF | ITL p50/p95 ms | record |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f, rec in zip(files, recs):
        for m in rec["models"]:
            hf = {r["B"]: r for r in m.get("hf", []) if r["B"] >= hf_min_b}
            for run in m["engine"]:
                mode = "invariant" if run["batch_invariant"] else "fast"
                for r in run["rows"]:
                    h = hf.get(r["B"])
                    ratio = (f"{r['decode_tok_s'] / h['decode_tok_s']:.2f}x"
                             if h and r["decode_tok_s"] else "-")
                    print(f"| {m['model']} | {mode} | {r['B']} | {r['step_ms']} | {r['floor_ms']} | "
                          f"{r['pct_of_roofline']}% | {r['agg_tok_s']} | {r['decode_tok_s']} | "
                          f"{h['decode_tok_s'] if h else '-'} | {ratio} | "
                          f"{r['itl_p50_ms']}/{r['itl_p95_ms']} | {f.split('/')[-1]} ({rec['device']}, "
                          f"{rec['commit']}) |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG; pip install matplotlib)", file=sys.stderr)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for rec in recs:
        for m in rec["models"]:
            for run in m["engine"]:
                mode = "inv" if run["batch_invariant"] else "fast"
                bs = [r["B"] for r in run["rows"] if r["decode_tok_s"]]
                a1.plot(bs, [r["decode_tok_s"] for r in run["rows"] if r["decode_tok_s"]], "o-",
                        label=f"{m['model']} ours ({mode})")
                a2.plot(bs, [r["pct_of_roofline"] for r in run["rows"] if r["decode_tok_s"]], "o-",
                        label=f"{m['model']} ({mode})")
            hf_rows = [r for r in m.get("hf", []) if r["B"] >= hf_min_b]
            if hf_rows:
                a1.plot([r["B"] for r in hf_rows], [r["decode_tok_s"] for r in hf_rows], "x--",
                        label=f"{m['model']} HF static")
    for ax, title in ((a1, "decode tok/s"), (a2, "% of §9.5 roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests B")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    a1.set_yscale("log")
    out = ROOT / "output" / "bench" / "batch.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


def main() -> int:
    p = _common.parser(__doc__)
    p.add_argument("--models", default="random:llama-3.2-1b,random:llama-2-7b",
                   help="comma-separated random:<shape> specs")
    p.add_argument("--batches", default="1,4,16,64,256",
                   help="comma-separated concurrency levels B")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=256, help="new tokens per request")
    p.add_argument("--dtype", default="bf16", help="bf16 or fp16")
    p.add_argument("--modes", default="invariant,fast",
                   help="engine GEMM modes: invariant (batch-invariant) and/or fast")
    p.add_argument("--prefill-chunk", type=int, default=512, help="engine prefill chunk")
    p.add_argument("--max-graphs", type=int, default=96, help="resident batched graphs")
    p.add_argument("--warm-s", type=float, default=60.0,
                   help="seconds to wait per B for the background capture before timing")
    p.add_argument("--hf-new", type=int, default=72,
                   help="HF peer: new tokens of the long run (ms/step from 8 vs this)")
    p.add_argument("--hf-max-b", type=int, default=256, help="largest B the HF peer runs")
    p.add_argument("--no-hf", action="store_true", help="skip the HF peer")
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="print the table of these records and write output/bench/batch.png")
    p.add_argument("--hf-min-b", type=int, default=1,
                   help="with --report: leave out HF peer rows below this B (the 2026-12-03 "
                   "record's HF B=1 row includes a recompile: report it with --hf-min-b 2)")
    args = p.parse_args()
    if args.report:
        report(args.report, args.hf_min_b)
        return 0
    import torch
    if not torch.cuda.is_available():
        print("bench_batch.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    args.batches = [int(x) for x in args.batches.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    bw = copy_bandwidth_gbs(torch)
    dev = torch.cuda.get_device_name()
    log(f"{dev}: copy bandwidth {bw:.0f} GB/s")
    record = {"device": dev, "date": dt.datetime.now().isoformat(timespec="seconds"),
              "commit": git_commit(), "copy_bandwidth_gbs": round(bw, 1),
              "prompt": args.prompt, "new": args.new, "batches": args.batches, "models": []}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    path = ROOT / "output" / "bench" / f"batch_{dev.replace(' ', '_')}_{stamp}{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.models.split(","):
        log(f"== {spec}")
        m = {"model": spec, "engine": []}
        record["models"].append(m)
        for mode in modes:
            m["engine"].append(bench_engine(torch, spec, args, bw, mode == "invariant", log))
            path.write_text(json.dumps(record, indent=1) + "\n")
        if not args.no_hf:
            m["hf"] = bench_hf(torch, spec, args, log)
        path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
