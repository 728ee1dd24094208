#!/usr/bin/env python
"""Microbenchmark of the custom CUDA kernels at decode shapes, against the device's copy bandwidth.

Decode at batch 1 is memory-bound: each kernel's floor is (minimum bytes it must move) / bandwidth.
This script measures a large device-to-device copy (bytes read + written) in the same run, then
times every kernel at the decode shapes of SmolLM2-135M and Llama-2-7B (attention at lengths 512
and 4096), and reports achieved GB/s and the percentage of the copy bandwidth. The linear rows also
time torch.matmul (cuBLAS) at the same shapes next to the custom GEMV.

Timing: each case is captured into a CUDA graph of many launches that rotate through enough copies
of the inputs to exceed the L2 cache (so weights and KV come from HBM, as in a real decode step),
then the graph is replayed `--reps` times; the reported time per launch is the median replay time
divided by the launches in the graph.

Programmatic dependent launch (PDL) is on unless CUSTOM_KERNELS_PDL=0 (read when the kernels
load): with it, consecutive launches in these graphs overlap (a launch's weight prefetch runs under
the previous launch's tail), as they do in the decode step; the JSON records which mode ran. The
"step_graph" rows time a CUDA graph of one whole decode step (embedding, every layer's kernels,
lm_head, sampling; random weights at the model's shapes) and, with --pdl-compare (default), the
same graph in a child process with CUSTOM_KERNELS_PDL=0, for an A/B of PDL itself.

Writes a table to stdout and JSON to output/bench/kernels_<device>.json (device name, date, git
commit, copy bandwidth, PDL mode, rows).

    python scripts/bench_kernels.py
    python scripts/bench_kernels.py --models smollm2 --reps 20 --dtype float16
    python scripts/bench_kernels.py --step-graph-only --no-pdl-compare
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    # hidden, intermediate, vocab, q heads, kv heads, head_dim, layers
    "smollm2": dict(name="SmolLM2-135M", H=576, I=1536, V=49152, nq=9, nkv=3, D=64, L=30),
    "llama2-7b": dict(name="Llama-2-7B", H=4096, I=11008, V=32000, nq=32, nkv=32, D=128, L=32),
}
# Layers in the step graph by default: all of SmolLM2; 4 of Llama-2-7B (its 13 GB of weights would
# not fit next to the rotated copies of the other cases; per-layer time is what matters there).
STEP_LAYERS = {"smollm2": 30, "llama2-7b": 4}
ATTN_LENGTHS = (512, 4096)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS),
                   help="model shapes to benchmark (default: all)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--reps", type=int, default=30, help="graph replays per case (median taken)")
    p.add_argument("--rotate-mb", type=float, default=256.0,
                   help="total MiB of rotated input copies per case (should exceed L2)")
    p.add_argument("--copy-gib", type=float, default=1.0, help="size of the bandwidth copy (GiB)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size for attention")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "output", "bench"),
                   help="where kernels_<device>.json goes")
    p.add_argument("--no-json", action="store_true", help="print the table only")
    p.add_argument("--step-graph-only", action="store_true",
                   help="only the whole-decode-step graph rows")
    p.add_argument("--no-step-graph", action="store_true", help="skip the decode-step graph rows")
    p.add_argument("--no-pdl-compare", dest="pdl_compare", action="store_false",
                   help="do not re-time the step graph in a child with CUSTOM_KERNELS_PDL=0")
    p.add_argument("--step-layers", type=int, default=0,
                   help="layers in the step graph (default: all for SmolLM2, 4 for Llama-2-7B)")
    p.add_argument("--step-len", type=int, default=512, help="KV length of the step graph")
    p.add_argument("--invariant-tokens", type=int, nargs="*", default=[16, 64],
                   help="token counts T > 1 at which linear_invariant is timed against cuBLAS "
                        "(default: 16 64; none to skip)")
    p.add_argument("--emit-rows", action="store_true", help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class Bench:
    def __init__(self, torch, ops, args):
        self.torch = torch
        self.ops = ops
        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.dev = torch.device("cuda")
        self.stream = torch.cuda.Stream()
        self.gemm_ws = torch.empty(32 << 20, dtype=torch.uint8, device=self.dev)
        with torch.cuda.stream(self.stream):
            ops.bind_gemm_stream(self.gemm_ws)
        self.rows = []
        self.copy_gbps = None

    # ------------------------------------------------------------------ timing machinery

    def copies_for(self, bytes_per_copy: int) -> int:
        """How many rotated copies of a case's inputs push the working set past the L2 cache."""
        want = int(self.args.rotate_mb * (1 << 20))
        return max(1, min(512, math.ceil(want / max(1, bytes_per_copy))))

    def time_graph(self, launches) -> float:
        """Median seconds per launch of `launches` (a list of callables) captured in one graph."""
        torch = self.torch
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for fn in launches[: min(len(launches), 3)]:  # warm-up (module loading, autotuning)
                fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            for fn in launches:
                fn()
        graph.replay()  # warm
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(self.args.reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del graph
        return statistics.median(times) / len(launches)

    def copy_bandwidth(self) -> float:
        torch = self.torch
        n = int(self.args.copy_gib * (1 << 30))
        src = torch.empty(n, dtype=torch.uint8, device=self.dev).random_(0, 255)
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(max(5, self.args.reps // 2)):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
        self.copy_gbps = 2 * n / statistics.median(times) / 1e9  # bytes read + written
        return self.copy_gbps

    def record(self, kernel, model, shape, seconds, min_bytes, impl="custom", pdl=None):
        gbps = min_bytes / seconds / 1e9
        row = dict(kernel=kernel, impl=impl, model=model, shape=shape, dtype=self.args.dtype,
                   us=round(seconds * 1e6, 3), min_bytes=int(min_bytes), gbps=round(gbps, 1),
                   pct_of_copy=round(100.0 * gbps / self.copy_gbps, 1),
                   pdl=self.ops.pdl_enabled() if pdl is None else pdl)
        self.rows.append(row)
        print(f"{kernel:<22} {impl:<8} {model:<13} {shape:<28} {row['us']:>10.2f} "
              f"{row['gbps']:>9.1f} {row['pct_of_copy']:>7.1f}%", flush=True)

    # ------------------------------------------------------------------ cases

    @staticmethod
    def rotate(n, fn, min_launches=20):
        """Launch callables cycling through n input copies: launch j uses copy j % n."""
        return [lambda i=j % n: fn(i) for j in range(max(n, min_launches))]

    def rand(self, *shape, dtype=None, scale=1.0):
        return (self.torch.randn(*shape, device=self.dev) * scale).to(dtype or self.dtype)

    def bench_model(self, key):
        torch, ops = self.torch, self.ops
        m = MODELS[key]
        H, I, V, nq, nkv, D = m["H"], m["I"], m["V"], m["nq"], m["nkv"], m["D"]
        es = torch.tensor([], dtype=self.dtype).element_size()
        name = m["name"]

        # embedding: one row gathered
        table = self.rand(V, H)
        ids = torch.randint(0, V, (1,), device=self.dev, dtype=torch.int32)
        emb_out = torch.empty(1, H, dtype=self.dtype, device=self.dev)
        t = self.time_graph([lambda: ops.embedding(ids, table, emb_out)] * 20)
        self.record("embedding", name, f"T=1 H={H}", t, 2 * H * es)

        # norms
        n = self.copies_for(3 * H * es)
        xs = [self.rand(1, H) for _ in range(n)]
        ws = [self.rand(H) for _ in range(n)]
        outs = [torch.empty(1, H, dtype=self.dtype, device=self.dev) for _ in range(n)]
        t = self.time_graph(self.rotate(n, lambda i: ops.rmsnorm(xs[i], ws[i], 1e-5, outs[i])))
        self.record("rmsnorm", name, f"T=1 H={H}", t, 3 * H * es)
        res = [self.rand(1, H) for _ in range(n)]
        t = self.time_graph(
            self.rotate(n, lambda i: ops.add_rmsnorm(xs[i], res[i], ws[i], 1e-5, outs[i])))
        self.record("add_rmsnorm", name, f"T=1 H={H}", t, 5 * H * es)
        del xs, ws, outs, res

        # swiglu
        n = self.copies_for(3 * I * es)
        gu = [self.rand(1, 2 * I) for _ in range(n)]
        so = [torch.empty(1, I, dtype=self.dtype, device=self.dev) for _ in range(n)]
        t = self.time_graph(self.rotate(n, lambda i: ops.swiglu(gu[i], so[i])))
        self.record("swiglu", name, f"T=1 I={I}", t, 3 * I * es)
        del gu, so

        # rope + KV write (decode: one token)
        block_size, max_pos = self.args.block_size, 8192
        mb = max_pos // block_size
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        pos_t = torch.arange(max_pos, dtype=torch.float32)
        freqs = torch.outer(pos_t, inv_freq)
        cos, sin = freqs.cos().to(self.dev), freqs.sin().to(self.dev)
        kc = torch.zeros(mb, block_size, nkv, D, dtype=self.dtype, device=self.dev)
        vc = torch.zeros_like(kc)
        bt = torch.randperm(mb, device=self.dev).to(torch.int32)
        qkv = self.rand(1, (nq + 2 * nkv) * D)
        positions = torch.tensor([1234], dtype=torch.int32, device=self.dev)
        q_out = torch.empty(1, nq, D, dtype=self.dtype, device=self.dev)
        t = self.time_graph([lambda: ops.rope_kv_write(qkv, positions, cos, sin, kc, vc, bt,
                                                       q_out)] * 20)
        rope_bytes = 2 * (nq + 2 * nkv) * D * es + D * 4
        self.record("rope_kv_write", name, f"T=1 nq={nq} nkv={nkv} D={D}", t, rope_bytes)
        del kc, vc

        # decode attention, B = 1
        for length in ATTN_LENGTHS:
            mbl = math.ceil(length / block_size)
            kv_bytes = 2 * length * nkv * D * es
            n = self.copies_for(kv_bytes)
            caches = []
            for _ in range(n):
                k = self.rand(mbl, block_size, nkv, D)
                v = self.rand(mbl, block_size, nkv, D)
                caches.append((k, v, torch.randperm(mbl, device=self.dev).to(torch.int32)[None]))
            q = self.rand(1, nq, D)
            pos = torch.tensor([length - 1], dtype=torch.int32, device=self.dev)
            out = torch.empty(1, nq, D, dtype=self.dtype, device=self.dev)
            wsa = torch.empty(ops.attention_workspace_numel(1, nq, D, length),
                              dtype=torch.float32, device=self.dev)
            scale = 1.0 / math.sqrt(D)
            t = self.time_graph(self.rotate(
                n, lambda i: ops.decode_attention(q, caches[i][0], caches[i][1], caches[i][2], pos,
                                                  scale, out, wsa, length)))
            self.record("decode_attention", name, f"B=1 len={length} nq={nq} nkv={nkv} D={D}", t,
                        kv_bytes + 2 * nq * D * es)
            del caches

        # linear at T = 1: custom GEMV vs torch.matmul (cuBLAS)
        shapes = [("qkv", (nq + 2 * nkv) * D, H), ("o_proj", H, nq * D), ("gate_up", 2 * I, H),
                  ("down", H, I), ("lm_head", V, H)]
        if key == "llama2-7b":
            shapes += [("square", 4096, 4096), ("up", 11008, 4096)]
        for label, N, K in shapes:
            wbytes = N * K * es
            n = self.copies_for(wbytes)
            wts = [self.rand(N, K, scale=1.0 / math.sqrt(K)) for _ in range(n)]
            x = self.rand(1, K)
            out = torch.empty(1, N, dtype=self.dtype, device=self.dev)
            min_bytes = wbytes + (K + N) * es
            t = self.time_graph(self.rotate(n, lambda i: ops.linear(x, wts[i], out)))
            self.record(f"linear:{label}", name, f"T=1 N={N} K={K}", t, min_bytes, impl="gemv")
            t = self.time_graph(self.rotate(n, lambda i: torch.matmul(x, wts[i].t(), out=out)))
            self.record(f"linear:{label}", name, f"T=1 N={N} K={K}", t, min_bytes, impl="cublas")
            del wts

        # batch-invariant linear (the batched decode engine) at T > 1 vs torch.matmul (cuBLAS,
        # whose kernel choice depends on T, hence not invariant)
        for tokens in self.args.invariant_tokens:
            for label, N, K in shapes:
                wbytes = N * K * es
                n = self.copies_for(wbytes)
                wts = [self.rand(N, K, scale=1.0 / math.sqrt(K)) for _ in range(n)]
                x = self.rand(tokens, K)
                out = torch.empty(tokens, N, dtype=self.dtype, device=self.dev)
                min_bytes = wbytes + tokens * (K + N) * es
                t = self.time_graph(self.rotate(n, lambda i: ops.linear_invariant(x, wts[i], out)))
                self.record(f"linear:{label}", name, f"T={tokens} N={N} K={K}", t, min_bytes,
                            impl="invar")
                t = self.time_graph(self.rotate(n, lambda i: torch.matmul(x, wts[i].t(), out=out)))
                self.record(f"linear:{label}", name, f"T={tokens} N={N} K={K}", t, min_bytes,
                            impl="cublas")
                del wts

        # fused SwiGLU + down projection at T = 1 vs swiglu then linear (two launches)
        wbytes = H * I * es
        n = self.copies_for(wbytes)
        wts = [self.rand(H, I, scale=1.0 / math.sqrt(I)) for _ in range(n)]
        gu = self.rand(1, 2 * I, scale=3.0)
        act = torch.empty(1, I, dtype=self.dtype, device=self.dev)
        out = torch.empty(1, H, dtype=self.dtype, device=self.dev)
        min_bytes = wbytes + (2 * I + H) * es
        t = self.time_graph(self.rotate(n, lambda i: ops.swiglu_linear(gu, wts[i], out, act)))
        self.record("swiglu_linear", name, f"T=1 N={H} I={I}", t, min_bytes, impl="fused")

        def two_step(i):
            ops.swiglu(gu, act)
            ops.linear(act, wts[i], out)

        t = self.time_graph(self.rotate(n, two_step))
        self.record("swiglu_linear", name, f"T=1 N={H} I={I}", t, min_bytes, impl="2-launch")
        del wts

        # sampling, B = 1, logits in the model dtype
        logits = self.rand(1, V, scale=3.0)
        for label, temp, top_k, top_p in [("greedy", 0.0, 0, 1.0), ("top_k50", 0.8, 50, 1.0),
                                          ("top_p0.9", 0.8, 0, 0.9),
                                          ("top_k50_p0.9", 0.8, 50, 0.9)]:
            bufs = dict(
                temperature=torch.tensor([temp], dtype=torch.float32, device=self.dev),
                top_k=torch.tensor([top_k], dtype=torch.int32, device=self.dev),
                top_p=torch.tensor([top_p], dtype=torch.float32, device=self.dev),
                seed=torch.tensor([1234], dtype=torch.int64, device=self.dev),
                positions=torch.tensor([0], dtype=torch.int32, device=self.dev),
                token_in=torch.empty(1, dtype=torch.int32, device=self.dev),
                token_hist=torch.empty(1, 1 << 16, dtype=torch.int32, device=self.dev),
            )
            t = self.time_graph([lambda: ops.sample(logits, bufs["temperature"], bufs["top_k"],
                                                    bufs["top_p"], bufs["seed"], bufs["positions"],
                                                    bufs["token_in"], bufs["token_hist"])] * 20)
            self.record(f"sample:{label}", name, f"B=1 V={V}", t, V * es)


    # ------------------------------------------------------------------ whole decode step

    def step_graph(self, key):
        """Seconds per replay of a CUDA graph of one decode step at this model's shapes."""
        torch, ops = self.torch, self.ops
        m = MODELS[key]
        H, I, V, nq, nkv, D = m["H"], m["I"], m["V"], m["nq"], m["nkv"], m["D"]
        layers = self.args.step_layers or STEP_LAYERS[key]
        length, bs = self.args.step_len, self.args.block_size
        max_len = length + 4 * (self.args.reps + 8)   # positions advance one per replay
        mb = math.ceil(max_len / bs)
        dev, dt = self.dev, self.dtype
        qkv_n = (nq + 2 * nkv) * D

        def w(*shape, fan_in=None):
            return self.rand(*shape, scale=1.0 / math.sqrt(fan_in) if fan_in else 1.0)

        lw = [dict(ln1=w(H), wqkv=w(qkv_n, H, fan_in=H), wo=w(H, nq * D, fan_in=nq * D),
                   ln2=w(H), w13=w(2 * I, H, fan_in=H), w2=w(H, I, fan_in=I),
                   k=w(mb, bs, nkv, D), v=w(mb, bs, nkv, D)) for _ in range(layers)]
        embed, norm, lm_head = w(V, H), w(H), w(V, H, fan_in=H)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos().to(dev), freqs.sin().to(dev)
        i32 = dict(dtype=torch.int32, device=dev)
        table = torch.randperm(mb, device=dev).to(torch.int32)[None]
        position = torch.tensor([length - 1], **i32)
        token_in = torch.tensor([1], **i32)
        temperature = torch.zeros(1, dtype=torch.float32, device=dev)
        top_k = torch.zeros(1, **i32)
        top_p = torch.ones(1, dtype=torch.float32, device=dev)
        seed = torch.zeros(1, dtype=torch.int64, device=dev)
        hist = torch.zeros(1, max_len + 1, **i32)
        logits = torch.empty(1, V, dtype=dt, device=dev)
        residual, normed, proj = (torch.empty(1, H, dtype=dt, device=dev) for _ in range(3))
        qkv = torch.empty(1, qkv_n, dtype=dt, device=dev)
        q, attn = (torch.empty(1, nq, D, dtype=dt, device=dev) for _ in range(2))
        gate_up = torch.empty(1, 2 * I, dtype=dt, device=dev)
        act = torch.empty(1, I, dtype=dt, device=dev)
        ws = torch.empty(max(1, ops.attention_workspace_numel(1, nq, D, max_len)),
                         dtype=torch.float32, device=dev)
        scale = 1.0 / math.sqrt(D)

        def step():
            ops.embedding(token_in, embed, residual)
            for n, L in enumerate(lw):
                if n == 0:
                    ops.rmsnorm(residual, L["ln1"], 1e-5, normed)
                else:
                    ops.add_rmsnorm(proj, residual, L["ln1"], 1e-5, normed)
                ops.linear(normed, L["wqkv"], qkv)
                ops.rope_kv_write(qkv, position, cos, sin, L["k"], L["v"], table[0], q)
                ops.decode_attention(q, L["k"], L["v"], table, position, scale, attn, ws, max_len)
                ops.linear(attn.view(1, nq * D), L["wo"], proj)
                ops.add_rmsnorm(proj, residual, L["ln2"], 1e-5, normed)
                ops.linear(normed, L["w13"], gate_up)
                ops.swiglu_linear(gate_up, L["w2"], proj, act)
            ops.add_rmsnorm(proj, residual, norm, 1e-5, normed)
            ops.linear(normed, lm_head, logits)
            ops.sample(logits, temperature, top_k, top_p, seed, position, token_in, hist)

        secs = self.time_graph([step])
        wbytes = sum(t.numel() * t.element_size() for L in lw
                     for k, t in L.items() if k not in ("k", "v"))
        wbytes += (lm_head.numel() + norm.numel() + H) * es_of(dt)
        kv_bytes = 2 * layers * length * nkv * D * es_of(dt)
        del lw
        torch.cuda.empty_cache()
        return secs, layers, wbytes + kv_bytes

    def bench_step_graph(self, key, pdl=None, seconds=None):
        m = MODELS[key]
        secs, layers, min_bytes = self.step_graph(key) if seconds is None else seconds
        shape = f"T=1 layers={layers} len={self.args.step_len}"
        self.record("step_graph", m["name"], shape, secs, min_bytes,
                    impl="pdl" if (self.ops.pdl_enabled() if pdl is None else pdl) else "no-pdl",
                    pdl=pdl)
        return secs, layers, min_bytes


def es_of(dtype) -> int:
    import torch
    return torch.tensor([], dtype=dtype).element_size()


def step_graph_without_pdl(args, key):
    """Times the step graph in a child process started with CUSTOM_KERNELS_PDL=0."""
    cmd = [sys.executable, os.path.abspath(__file__), "--step-graph-only", "--no-pdl-compare",
           "--no-json", "--emit-rows", "--models", key, "--dtype", args.dtype, "--reps",
           str(args.reps), "--block-size", str(args.block_size), "--step-len", str(args.step_len),
           "--step-layers", str(args.step_layers), "--copy-gib", str(args.copy_gib)]
    env = dict(os.environ, CUSTOM_KERNELS_PDL="0")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    for line in res.stdout.splitlines():
        if line.startswith("STEP_GRAPH_ROW "):
            row = json.loads(line[len("STEP_GRAPH_ROW "):])
            if row.get("pdl") is False:
                return row
            raise RuntimeError("the CUSTOM_KERNELS_PDL=0 child still ran with PDL on")
    raise RuntimeError("the CUSTOM_KERNELS_PDL=0 child printed no row:\n" + res.stdout[-2000:] +
                       res.stderr[-2000:])


def main(argv=None):
    args = parse_args(argv)
    import torch

    sys.path.insert(0, ROOT)
    from custom_kernels import ops

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing to measure.", file=sys.stderr)
        return 2
    if not ops.cuda_kernels_available():
        print("bench_kernels: custom_kernels._C is not built (python setup.py build_ext --inplace).",
              file=sys.stderr)
        return 2

    bench = Bench(torch, ops, args)
    device = torch.cuda.get_device_name()
    copy = bench.copy_bandwidth()
    print(f"device: {device}   dtype: {args.dtype}   copy bandwidth (read+write): {copy:.1f} GB/s"
          f"   PDL: {'on' if ops.pdl_enabled() else 'off'}")
    print(f"{'kernel':<22} {'impl':<8} {'model':<13} {'shape':<28} {'us':>10} {'GB/s':>9} "
          f"{'%copy':>8}")
    for key in args.models:
        if not args.step_graph_only:
            bench.bench_model(key)
        if args.no_step_graph:
            continue
        bench.bench_step_graph(key)
        if args.emit_rows:
            print("STEP_GRAPH_ROW " + json.dumps(bench.rows[-1]), flush=True)
        if args.pdl_compare and ops.pdl_enabled():
            try:
                row = step_graph_without_pdl(args, key)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"step_graph without PDL: {exc}", file=sys.stderr)
                continue
            # Re-expressed against this process's copy bandwidth.
            bench.record("step_graph", row["model"], row["shape"], row["us"] / 1e6,
                         row["min_bytes"], impl="no-pdl", pdl=False)
            on, off = bench.rows[-2]["us"], bench.rows[-1]["us"]
            print(f"  step graph {MODELS[key]['name']}: PDL on {on:.1f} us, off {off:.1f} us "
                  f"({100.0 * (off - on) / off:+.1f}% with PDL)", flush=True)

    record = dict(
        device=device,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        dtype=args.dtype,
        copy_bandwidth_gbps=round(copy, 1),
        pdl=ops.pdl_enabled(),
        method="CUDA graph of rotated launches; median replay / launches; min bytes / time",
        rows=bench.rows,
    )
    if not args.no_json:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"kernels_{device_slug(device)}.json")
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
