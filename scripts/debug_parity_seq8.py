#!/usr/bin/env python3
"""T=8 parity: prefill plus 8 decode steps against HF transformers with a DynamicCache.

Both sides are fed HF's greedy token at every step. Compares the logits at every step, then our
paged K and V of every layer against HF's cache contents. Exits 1 past the per-dtype tolerance.
"""
import sys

import _common  # noqa: F401
from _common import add_model_args
from graphserver import argtypes


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    add_model_args(p)
    p.add_argument("--steps", type=argtypes.positive_int, default=8, help="decode steps")
    args = p.parse_args(argv)
    from graphserver.engine import pick_device, pick_dtype
    from graphserver.parity import load_pair, model_dir, prompt_ids, seq_parity
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    with model_dir(args.model) as (path, tok_path):
        pair = load_pair(path, tok_path, dtype, device)
        ids = prompt_ids(pair)
        print(f"model {args.model or 'default'} on {device} {dtype}, prompt of {len(ids)} tokens, "
              f"{args.steps} steps")
        rows = seq_parity(pair, ids, args.steps, dtype)
    bad = [r["name"] for r in rows if not r["ok"]]
    worst = max(rows, key=lambda r: r["rel"])
    print(f"{len(rows) - len(bad)}/{len(rows)} tensors within tolerance; worst {worst['name']} "
          f"rel {worst['rel']:.3e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
