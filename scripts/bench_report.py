#!/usr/bin/env python3
"""Builds the README's performance table (markdown, on stdout) and output/bench/decode.png from the
committed output/bench/decode_*.json records. Every ratio comes from one record (one run)."""
import glob
import json
import sys
from pathlib import Path

import _common
from _common import ROOT


MODEL_ORDER = ["default", "random:smollm2-135m", "random:llama-3.2-1b", "random:llama-2-7b"]


def load(paths, latest_only: bool = True):
    """(record, model row, file name) per model; by default only each model's newest record."""
    rows = []
    for path in paths:
        rec = json.loads(Path(path).read_text())
        for m in rec["models"]:
            rows.append((rec, m, Path(path).name))
    if latest_only:
        newest = {}
        for row in rows:
            if row[1]["model"] not in newest or row[0]["date"] > newest[row[1]["model"]][0]["date"]:
                newest[row[1]["model"]] = row
        rows = list(newest.values())
    order = {m: i for i, m in enumerate(MODEL_ORDER)}
    return sorted(rows, key=lambda r: order.get(r[1]["model"], len(order)))


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def table(rows) -> str:
    out = ["| model | ours ms/token | floor ms | % of floor | 4k ctx % of floor | HF eager | HF static+compile | x vs compile | TTFT 1024 ours / HF eager (ms) | stalls exact / bucket16 | mem over weights+KV | record |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for rec, m, name in rows:
        pe, conc = m.get("peers", {}), m.get("concurrent", {})
        long = m.get("long", {})
        out.append(
            f"| {m['model']} | {m['short']['ms_per_token']:.3f} | {m['short']['floor_ms']:.3f} | "
            f"{m['short']['pct_of_floor']:.1f}% | {_pct(long.get('pct_of_floor'))} | "
            f"{pe.get('hf_eager_ms_per_token', float('nan')):.2f} | "
            f"{pe.get('hf_compiled_ms_per_token', float('nan')):.3f} | "
            f"{m.get('speedup_vs_hf_compiled', float('nan')):.2f}x | "
            f"{m.get('ttft_ms', float('nan')):.1f} / {pe.get('hf_eager_ttft_ms', float('nan')):.1f} | "
            f"{conc.get('exact', {}).get('stalls', '-')} / {conc.get('bucket16', {}).get('stalls', '-')} | "
            f"{m['memory']['overhead_pct']:.1f}% | {name} ({rec['device']}, {rec['commit']}, "
            f"copy {rec['copy_bandwidth_gbs']:.0f} GB/s) |")
    return "\n".join(out)


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_report: matplotlib is not installed (pip install -e .[bench]); no PNG written",
              file=sys.stderr)
        return False
    names = [m["model"] for _, m, _ in rows]
    series = {
        "ours": [m["short"]["ms_per_token"] for _, m, _ in rows],
        "HF static+compile": [m.get("peers", {}).get("hf_compiled_ms_per_token", 0) for _, m, _ in rows],
        "HF eager": [m.get("peers", {}).get("hf_eager_ms_per_token", 0) for _, m, _ in rows],
    }
    floors = [m["short"]["floor_ms"] for _, m, _ in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for i, (label, vals) in enumerate(series.items()):
        ax.bar([x + (i - 1) * width for x in range(len(names))], vals, width, label=label)
    ax.scatter(range(len(names)), floors, marker="_", s=900, color="black", zorder=3,
               label="bandwidth floor")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms / token (batch 1, greedy; log scale)")
    dev = rows[0][0]["device"] if rows else ""
    ax.set_title(f"Decode latency on {dev}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("records", nargs="*", help="JSON records (default: output/bench/decode_*.json)")
    p.add_argument("--png", default=str(ROOT / "output" / "bench" / "decode.png"),
                   help="where the chart goes (needs matplotlib: pip install -e .[bench])")
    p.add_argument("--all", action="store_true", help="every record, not only each model's newest")
    args = p.parse_args(argv)
    paths = args.records or sorted(glob.glob(str(ROOT / "output" / "bench" / "decode_*.json")))
    if not paths:
        print("bench_report: no records found", file=sys.stderr)
        return 1
    rows = load(paths, latest_only=not args.all)
    print(table(rows))
    if plot(rows, Path(args.png)):
        print(f"\nwrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
