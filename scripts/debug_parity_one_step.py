#!/usr/bin/env python3
"""T=1 parity: one decode step of ours against HF transformers' own modules, per layer.

Prefills the prompt minus its last token, then runs one probed decode step on the last token and
compares Q, K, V, the attention output, o-proj, the MLP output, each layer's output, the final norm
and the logits with HF's forward over the whole prompt. Exits 1 past the per-dtype tolerance.
"""
import sys

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import add_model_args


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    add_model_args(p)
    args = p.parse_args(argv)
    import torch
    from graphserver.engine import pick_device, pick_dtype
    from graphserver.parity import (compare, hf_last_token_intermediates, load_pair, model_dir,
                                    our_last_token_intermediates, prompt_ids)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    with model_dir(args.model) as (path, tok_path):
        pair = load_pair(path, tok_path, dtype, device)
        ids = prompt_ids(pair)
        print(f"model {args.model or 'default'} on {device} {dtype}, prompt of {len(ids)} tokens")
        ref = hf_last_token_intermediates(pair.hf, ids, device)
        ref32 = (hf_last_token_intermediates(pair.hf32, ids, device)
                 if pair.hf32 is not None else None)
        ours = our_last_token_intermediates(pair, ids)
        rows = compare(ours, ref, dtype, ref32=ref32)
    bad = [r["name"] for r in rows if not r["ok"]]
    worst = max(rows, key=lambda r: r["rel"])
    print(f"{len(rows) - len(bad)}/{len(rows)} tensors within tolerance; worst {worst['name']} "
          f"rel {worst['rel']:.3e}; argmax ours {int(ours['logits'].argmax())} "
          f"hf {int(ref['logits'].argmax())}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
