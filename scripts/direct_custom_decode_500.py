#!/usr/bin/env python3
"""Standalone decode, no IPC: the engine in-process generates N tokens (500 by default) with
background graph capture started right after kv_init (or, with --capture-before-kv-init, before
it, as graphclient does), and reports stalls and fallbacks.

A stall is a decode step that waited for a graph not ready yet; a fallback, one that ran eagerly
instead. The first graphs are captured before the first decode step (during the prefill when
capture is already running, else in bg_capture_start); that wait is reported apart, as
first_wait_ms.

Writes output/direct_custom_decode_500.{json,log} and _tokens.txt / _text.txt.
"""
import sys
import time

import _common
from graphserver import argtypes, protocol
from _common import Logger, add_model_args, default_prompt, write_run_outputs


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    add_model_args(p)
    p.add_argument("--prompt", default=default_prompt(), help="user message (chat template)")
    p.add_argument("--steps", type=argtypes.positive_int, default=500, help="tokens to generate")
    p.add_argument("--graph-bucket", type=argtypes.positive_int, default=1,
                   help="1 = exact-length graphs; N rounds lengths up to multiples of N")
    p.add_argument("--ahead", type=argtypes.positive_int, default=protocol.DEFAULT_CAPTURE_AHEAD,
                   help="capture window ahead of the length")
    p.add_argument("--behind", type=argtypes.nonneg_int, default=protocol.DEFAULT_CAPTURE_BEHIND,
                   help="graphs kept behind the length")
    p.add_argument("--capture-before-kv-init", action="store_true",
                   help="start background capture before kv_init (its first graphs are then "
                        "captured during the prefill)")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the model's EOS tokens")
    p.add_argument("--torch-profile", default=None, help="write a torch-profiler Chrome trace here")
    args = p.parse_args(argv)
    log = Logger()
    from graphserver.engine import Engine
    eng = Engine(model=args.model, device=args.device, dtype=args.dtype,
                 graph_bucket=args.graph_bucket, torch_profile=args.torch_profile, log=log)
    try:
        hello = eng.hello()
        tok = None
        if hello["tokenizer_path"]:
            from client.tokenizer import encode_chat, load_tokenizer
            tok = load_tokenizer(hello["tokenizer_path"])
            ids = encode_chat(tok, args.prompt)
        else:
            ids = list(range(1, 17))          # random models have no tokenizer
        graphs = hello["capabilities"]["graphs"]
        t0 = time.perf_counter()
        if graphs and args.capture_before_kv_init:
            eng.bg_capture_start(ahead=args.ahead, behind=args.behind)
        eng.kv_init("direct", ids)
        if graphs and not args.capture_before_kv_init:
            eng.bg_capture_start(ahead=args.ahead, behind=args.behind)
        t_first = time.perf_counter()
        stops = hello["eos_token_ids"] if args.stop_at_eos else []
        res = eng.replay_seq("direct", args.steps, sampling={"greedy": True},
                             stop_token_ids=stops)
        wall = time.perf_counter() - t0
        text = tok.decode(res["tokens"], skip_special_tokens=True) if tok else ""
        status = eng.status()
        record = {"model": hello["model_path"] or hello["model"], "prompt": args.prompt,
                  "prompt_ids": ids, "tokens": res["tokens"], "text": text,
                  "backend": hello["backend"], "device": hello["device_name"],
                  "dtype": hello["dtype"], "ms_per_token": res["timing"]["ms_per_token"],
                  "wall_s": round(wall, 3), "stalls": res["stalls"],
                  "fallbacks": res["fallbacks"], "eager_steps": res["eager_steps"],
                  "capture_start": "before kv_init" if args.capture_before_kv_init
                  else "after kv_init",
                  "setup_ms": round((t_first - t0) * 1e3, 3),
                  "first_wait_ms": (status["graphs"] or {}).get("first_wait_ms", 0.0),
                  "graph_stats": status["graphs"], "timing": res["timing"]}
        log(f"generated {len(res['tokens'])} tokens, {res['timing']['ms_per_token']} ms/token, "
            f"stalls {res['stalls']}, fallbacks {res['fallbacks']}, eager steps "
            f"{res['eager_steps']}, backend {hello['backend']}")
        if status["graphs"]:
            g = status["graphs"]
            log(f"graphs: captured {g['captured']}, capture p50 {g['capture_ms_p50']} ms, p99 "
                f"{g['capture_ms_p99']} ms, capture rate {g['capture_rate_per_s']}/s, stall "
                f"{g['stall_ms']} ms at keys {g['stall_keys']}, first graphs waited for "
                f"{g['first_wait_ms']} ms "
                f"(capture started {record['capture_start']}; kv_init + capture start "
                f"{record['setup_ms']} ms)")
        log(f"text: {text[:400]!r}")
        path = write_run_outputs("direct_custom_decode_500", record, log.lines)
        print(f"wrote {path}")
    finally:
        eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
