#!/usr/bin/env python3
"""The product's main job: start the server, tokenize a chat prompt, then kv_init,
bg_capture_start, wait_precapture and replay_seq for 50 greedy steps over ZeroMQ, stop the
server, and check the tokens against HF transformers' greedy generate on the same checkpoint.

The default model (SmolLM2-135M-Instruct) is prepared on first use. On a machine without a GPU
the server runs the CPU reference backend; the graph RPCs are skipped there (they answer that
graphs are unavailable) and replay runs the eager step.

Writes output/run_custom_50.json, _tokens.txt, _text.txt and .log.
"""
import sys
import time

import _common
from graphserver import argtypes, protocol
from _common import (Logger, add_model_args, default_prompt, first_divergence, hf_greedy,
                     hf_near_tie, write_run_outputs)


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    add_model_args(p)
    p.add_argument("--prompt", default=default_prompt(), help="user message (chat template)")
    p.add_argument("--steps", type=argtypes.positive_int, default=50, help="tokens to generate")
    p.add_argument("--endpoint", default=None, type=argtypes.client_endpoint,
                   help="use a running server at this endpoint instead of starting one")
    p.add_argument("--graph-bucket", type=argtypes.positive_int, default=1,
                   help="1 = exact-length graphs; N rounds lengths up to multiples of N")
    p.add_argument("--ahead", type=argtypes.positive_int, default=protocol.DEFAULT_CAPTURE_AHEAD,
                   help="graphs captured ahead of the length")
    p.add_argument("--behind", type=argtypes.nonneg_int, default=protocol.DEFAULT_CAPTURE_BEHIND,
                   help="graphs kept behind the length")
    p.add_argument("--no-hf-check", action="store_true",
                   help="skip the comparison with HF transformers' greedy generate")
    p.add_argument("--torch-profile", default=None,
                   help="the server writes a torch-profiler Chrome trace to this path")
    p.add_argument("--timeout", type=argtypes.positive_seconds, default=600.0, help="per-RPC timeout in seconds")
    args = p.parse_args(argv)
    log = Logger()

    from client.rpc import NoServer, RPCClient, ServerProcess
    from client.tokenizer import encode_chat, load_tokenizer
    from graphserver.prepare import resolve_model

    src = resolve_model(args.model, log=log)      # prepares the default model on first use
    model_arg = str(src.path) if src.path else args.model
    server_args = ["--device", args.device, "--dtype", args.dtype,
                   "--graph-bucket", str(args.graph_bucket)]
    if args.torch_profile:
        server_args += ["--torch-profile", args.torch_profile]

    def run(client) -> dict:
        hello = client.hello()
        log(f"server: {hello['model']} on {hello['device_name']} ({hello['backend']}, "
            f"{hello['dtype']})")
        tok = load_tokenizer(hello["tokenizer_path"]) if hello.get("tokenizer_path") else None
        ids = encode_chat(tok, args.prompt) if tok else list(range(1, 17))
        t0 = time.perf_counter()
        init = client.kv_init("run50", ids, top_k=1)
        log(f"kv_init: {init['length']} prompt tokens in {(time.perf_counter() - t0) * 1e3:.1f} ms")
        if hello["capabilities"]["graphs"]:
            client.bg_capture_start(ahead=args.ahead, behind=args.behind)
            pre = client.wait_precapture(min_ahead=args.ahead, timeout_s=args.timeout)
            log(f"precapture: ready={pre['ready']} captured={pre['captured']} in "
                f"{pre['waited_ms']:.1f} ms")
        else:
            log("graphs are unavailable on this backend: replay runs the eager step")
        res = client.replay_seq("run50", args.steps, sampling={"greedy": True})
        status = client.status()
        client.kv_free("run50")
        text = tok.decode(res["tokens"], skip_special_tokens=True) if tok else ""
        return {"model": hello.get("model_path") or hello["model"], "prompt": args.prompt,
                "prompt_ids": ids, "tokens": res["tokens"], "text": text,
                "backend": hello["backend"], "device": hello["device_name"],
                "dtype": hello["dtype"], "ms_per_token": res["timing"]["ms_per_token"],
                "timing": res["timing"], "stalls": res["stalls"], "fallbacks": res["fallbacks"],
                "eager_steps": res["eager_steps"], "graph_stats": status["graphs"]}

    try:
        if args.endpoint:
            with RPCClient(args.endpoint, args.timeout) as client:
                record = run(client)
        else:
            with ServerProcess(model=model_arg, extra_args=server_args,
                               call_timeout_s=args.timeout) as client:
                record = run(client)
    except NoServer as e:  # a wrong or dead --endpoint: say so in one line
        print(f"run_custom_50: error: {e}", file=sys.stderr)
        return 1

    log(f"{len(record['tokens'])} tokens, {record['ms_per_token']} ms/token "
        f"({record['backend']}), stalls {record['stalls']}, fallbacks {record['fallbacks']}")
    if record["graph_stats"]:
        g = record["graph_stats"]
        log(f"graphs: captured {g['captured']}, replays {g['replays']}, capture p50 "
            f"{g['capture_ms_p50']} ms p99 {g['capture_ms_p99']} ms")
    log(f"text: {record['text']!r}")
    rc = 0
    if not args.no_hf_check and src.path is not None:
        device = "cuda" if record["backend"] == "cuda" else "cpu"
        want = hf_greedy(src.path, record["prompt_ids"], len(record["tokens"]), record["dtype"],
                         device)
        div = first_divergence(record["tokens"], want)
        record["hf_greedy_tokens"] = want
        record["matches_hf_greedy"] = div is None
        record["first_divergence"] = div
        if div is None:
            log(f"tokens EQUAL HF greedy ({len(want)} tokens, {record['dtype']} on {device})")
        else:
            log(f"tokens DIFFER from HF greedy at index {div}: ours {record['tokens'][div:div + 5]}"
                f" hf {want[div:div + 5]}")
            margin, step = hf_near_tie(src.path, record["prompt_ids"], want, div,
                                       record["tokens"][div], record["dtype"], device)
            near = margin <= 2 * step
            record["divergence_margin"] = {"hf_margin": margin, "logit_step": step,
                                           "near_tie": near}
            log(f"  HF's own logits put its token {margin:.4f} above ours (one {record['dtype']} "
                f"step there is {step:.4f}): "
                + ("a near-tie that rounding flips" if near else "NOT a near-tie"))
            rc = 0 if near and record["dtype"] != "float32" else 1
    path = write_run_outputs("run_custom_50", record, log.lines)
    print(f"wrote {path}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
