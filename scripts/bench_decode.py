#!/usr/bin/env python3
"""Decode benchmark (GPU): ours through the product path (replay_seq: graphs + on-device sampling)
against HF eager generate and HF static cache + torch.compile, in the same process on the same GPU.

For each model: batch-1 greedy ms/token with prefill excluded, at a short context (16 -> 16+N)
and near 4096; the floor (weight bytes + KV bytes read per step) / device-to-device copy bandwidth
measured in this run; TTFT of a long prompt against HF eager prefill; capture rate vs replay rate
and the stalls of a 500-token run started right after kv_init with background capture on, in exact
and bucket mode; GPU memory after load against weights + KV arena.

Writes output/bench/decode_<device>_<date>.json. scripts/bench_report.py turns the committed JSON
into the README table and a PNG.
"""
import argparse
import datetime as dt
import gc
import json
import os
import sys
import time

import _common
from _common import ROOT, copy_bandwidth_gbs, git_commit
from graphserver import argtypes

PEER_SHORT = (8, 136)        # HF: ms/token = (t(136 new) - t(8 new)) / 128, excludes prefill


def kv_bytes_read(cfg, length: int, elem: int) -> int:
    """K and V bytes one decode step reads at this length (all layers)."""
    return length * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * elem


def prompt(n: int, vocab: int) -> list[int]:
    return [(7919 * i + 13) % (vocab - 1) + 1 for i in range(n)]


def bench_ours(torch, spec, dtype, args, bw_gbs, log) -> dict:
    from graphserver.engine import Engine
    torch.cuda.reset_peak_memory_stats()
    mem0 = torch.cuda.memory_allocated()
    eng = Engine(model=spec, device="cuda", dtype=dtype, max_len=args.max_len, log=log)
    out = {"model": spec, "name": eng.source.name}
    try:
        cfg, elem = eng.cfg, eng.runner.dtype.itemsize
        wbytes, kvbytes = eng.runner.weight_bytes, eng.runner.kv.nbytes
        out["memory"] = {"weights": wbytes, "kv_arena": kvbytes,
                         "allocated_after_load": torch.cuda.memory_allocated() - mem0,
                         "reserved_after_load": torch.cuda.memory_reserved()}
        out["memory"]["overhead_pct"] = round(
            100 * (out["memory"]["allocated_after_load"] / (wbytes + kvbytes) - 1), 2)

        def timed_run(name, plen, steps, ahead):
            ids = prompt(plen, cfg.vocab_size)
            eng.kv_init(name, ids)
            eng.bg_capture_start(ahead=ahead, behind=2)
            eng.graphs.note_length(name, plen + 1)
            lengths_ok = eng.graphs.wait_ready(list(range(plen + 1, plen + steps + 1)), 600)
            cold = eng.replay_seq(name, steps, sampling={"greedy": True})
            eng.kv_free(name)
            # Timed twice, the second run reported: the first pays GPU clock ramp-up (seen
            # here: a first run ~20% slower than a later one on the same graphs).
            eng.kv_init(name, ids)
            res = eng.replay_seq(name, steps, sampling={"greedy": True})
            eng.kv_free(name)
            avg_len = plen + steps / 2
            floor_ms = (wbytes + kv_bytes_read(cfg, int(avg_len), elem)) / (bw_gbs * 1e9) * 1e3
            ms = res["timing"]["ms_per_token"]
            return {"prompt": plen, "steps": steps, "ms_per_token": ms, "floor_ms": floor_ms,
                    "cold_ms_per_token": cold["timing"]["ms_per_token"],
                    "pct_of_floor": round(100 * floor_ms / ms, 1), "stalls": res["stalls"],
                    "fallbacks": res["fallbacks"], "precaptured": lengths_ok}

        # Short context: graphs pre-captured for every length, so this is pure replay speed.
        # Its "stalls" are those of the second (timed) run, over graphs the first one captured.
        out["short"] = timed_run("short", 16, args.steps, args.steps + 2)
        log(f"  ours short: {out['short']}")
        eng.graphs.stop()
        eng.graphs.clear()
        if args.long:
            out["long"] = timed_run("long", args.long, 64, 66)
            log(f"  ours long: {out['long']}")
            eng.graphs.stop()
            eng.graphs.clear()

        # TTFT: prefill of a long prompt, synchronized.
        ids = prompt(args.ttft_len, cfg.vocab_size)
        eng.kv_init("ttft", ids)
        eng.kv_free("ttft")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.kv_init("ttft", ids)
        torch.cuda.synchronize()
        out["ttft_ms"] = (time.perf_counter() - t0) * 1e3
        eng.kv_free("ttft")

        # Concurrent capture: 500 tokens started right after kv_init, both graph modes.
        out["concurrent"] = {}
        for bucket in (1, 16):
            eng.graphs.stop()
            eng.graphs.clear()
            eng.graphs.bucket = bucket
            eng.graphs.stats.__init__()
            ids = prompt(16, cfg.vocab_size)
            eng.kv_init("conc", ids)
            eng.bg_capture_start(ahead=32, behind=2)
            res = eng.replay_seq("conc", 500, sampling={"greedy": True})
            snap = eng.graphs.snapshot()
            eng.kv_free("conc")
            mode = "exact" if bucket == 1 else f"bucket{bucket}"
            out["concurrent"][mode] = {
                "stalls": res["stalls"], "fallbacks": res["fallbacks"],
                "ms_per_token": res["timing"]["ms_per_token"],
                "replay_tokens_per_s": round(1e3 / max(res["timing"]["ms_per_token"], 1e-9), 1),
                "capture_ms_p50": snap["capture_ms_p50"], "capture_ms_p99": snap["capture_ms_p99"],
                "capture_rate_per_s": snap["capture_rate_per_s"], "captured": snap["captured"],
                "stall_ms": snap["stall_ms"], "stall_keys": snap.get("stall_keys"),
                # The wait for the session's first graphs, inside kv_init / bg_capture_start:
                # time that would otherwise have been stalls on the first steps.
                "first_wait_ms": snap.get("first_wait_ms")}
            log(f"  ours concurrent {mode}: {out['concurrent'][mode]}")
    finally:
        eng.close()
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    return out


def hf_model(torch, spec, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from graphserver.config import RANDOM_SHAPES
    from graphserver.prepare import resolve_model
    if spec.startswith("random:"):
        cfg = LlamaConfig(**RANDOM_SHAPES[spec.split(":", 1)[1]])
        with torch.device("cuda"):          # random init on the GPU: seconds, not minutes
            model = LlamaForCausalLM(cfg)
        return model.to(dtype).eval()
    src = resolve_model(spec)
    return AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype,
                                                local_files_only=True).to("cuda").eval()


def hf_generate_ms(torch, model, plen: int, vocab: int, new_tokens: int, **kw) -> float:
    ids = torch.tensor([prompt(plen, vocab)], device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None,
                       temperature=None, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench_peers(torch, spec, dtype, args, log) -> dict:
    out = {}
    model = hf_model(torch, spec, dtype)
    vocab = model.config.vocab_size
    lo, hi = PEER_SHORT
    try:
        hf_generate_ms(torch, model, 16, vocab, lo)
        t_lo = hf_generate_ms(torch, model, 16, vocab, lo)
        t_hi = hf_generate_ms(torch, model, 16, vocab, hi)
        out["hf_eager_ms_per_token"] = (t_hi - t_lo) / (hi - lo)
        log(f"  hf eager: {out['hf_eager_ms_per_token']:.3f} ms/token")
        ids = torch.tensor([prompt(args.ttft_len, vocab)], device="cuda")
        with torch.no_grad():
            model(ids)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids)
            torch.cuda.synchronize()
        out["hf_eager_ttft_ms"] = (time.perf_counter() - t0) * 1e3
        if not args.skip_compile:
            # HF's own recipe: with a static cache, generate() compiles the forward itself
            # (torch.compile, fullgraph, "reduce-overhead" CUDA graphs); compiling by hand on
            # top of it trips over its CUDA-graph outputs.
            model.generation_config.cache_implementation = "static"
            model.generation_config.disable_compile = False
            t_c0 = time.perf_counter()
            for n in (lo, hi):
                hf_generate_ms(torch, model, 16, vocab, n)
            out["hf_compile_warmup_s"] = time.perf_counter() - t_c0
            t_lo = hf_generate_ms(torch, model, 16, vocab, lo)
            t_hi = hf_generate_ms(torch, model, 16, vocab, hi)
            out["hf_compiled_ms_per_token"] = (t_hi - t_lo) / (hi - lo)
            out["hf_compiled_forward"] = hasattr(model, "_compiled_call")
            log(f"  hf static+compile: {out['hf_compiled_ms_per_token']:.3f} ms/token")
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return out


def _half_dtype(text: str) -> str:
    value = argtypes.dtype(text)
    if value not in ("bf16", "fp16"):
        raise argparse.ArgumentTypeError(f"the benchmark runs bf16 or fp16, got {text!r}")
    return value


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--models", nargs="+",
                   default=["default", "random:smollm2-135m", "random:llama-3.2-1b",
                            "random:llama-2-7b"],
                   help="model specs ('default' = the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bf16", type=_half_dtype,
                   help="bf16 (bfloat16) or fp16 (float16, half): the kernels' dtypes")
    p.add_argument("--steps", type=argtypes.positive_int, default=512, help="tokens of the short-context run")
    p.add_argument("--long", type=argtypes.nonneg_int, default=4000,
                   help="prompt length of the near-4096 run (0 skips it)")
    p.add_argument("--ttft-len", type=argtypes.positive_int, default=1024, help="prompt length for TTFT")
    p.add_argument("--max-len", type=argtypes.positive_int, default=4160, help="engine max_len")
    p.add_argument("--skip-peers", action="store_true", help="only measure ours")
    p.add_argument("--skip-compile", action="store_true", help="skip HF static + torch.compile")
    p.add_argument("--out", default=None, help="JSON path (default: output/bench/decode_<device>_<time>.json)")
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU", file=sys.stderr)
        return 2
    log = _common.Logger()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    bw = copy_bandwidth_gbs(torch)
    device = torch.cuda.get_device_name()
    log(f"device {device}; device-to-device copy {bw:.0f} GB/s (read + write)")
    record = {"device": device, "date": dt.datetime.now(dt.timezone.utc).isoformat(),
              "commit": git_commit(), "copy_bandwidth_gbs": round(bw, 1), "dtype": args.dtype,
              "torch": torch.__version__, "models": []}
    for spec in args.models:
        log(f"== {spec}")
        engine_spec = None if spec == "default" else spec
        row = bench_ours(torch, engine_spec, args.dtype, args, bw, log)
        row["model"] = spec
        if not args.skip_peers:
            row["peers"] = bench_peers(torch, spec if spec != "default" else "default", dtype,
                                       args, log)
            comp = row["peers"].get("hf_compiled_ms_per_token")
            row["speedup_vs_hf_eager"] = round(row["peers"]["hf_eager_ms_per_token"]
                                               / row["short"]["ms_per_token"], 2)
            if comp:
                row["speedup_vs_hf_compiled"] = round(comp / row["short"]["ms_per_token"], 2)
        record["models"].append(row)
    out_dir = ROOT / "output" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out or out_dir / f"decode_{device.replace(' ', '_')}_{stamp}.json"
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    log(f"wrote {path}")
    log(f"{'model':<22} {'ours ms':>8} {'floor%':>7} {'long%':>6} {'hf eager':>9} "
        f"{'hf comp':>8} {'xcomp':>6} {'stalls e/b':>10}")
    for r in record["models"]:
        pe = r.get("peers", {})
        conc = r.get("concurrent", {})
        log(f"{r['model']:<22} {r['short']['ms_per_token']:>8.4f} "
            f"{r['short']['pct_of_floor']:>7.1f} {r.get('long', {}).get('pct_of_floor', 0):>6.1f} "
            f"{pe.get('hf_eager_ms_per_token', 0):>9.3f} {pe.get('hf_compiled_ms_per_token', 0):>8.3f} "
            f"{r.get('speedup_vs_hf_compiled', 0):>6.2f} "
            f"{conc.get('exact', {}).get('stalls', -1):>5}/{conc.get('bucket16', {}).get('stalls', -1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
