#!/usr/bin/env python3
"""Cost of one Tracer.range (an nvtx push/pop in the 'graphserver' domain) with no profiler
attached, against a decode step's time. Prints ns per range; run it anywhere."""
import argparse
import sys
import time

import _common  # noqa: F401


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200_000, help="ranges to time (default 200000)")
    p.add_argument("--step-ms", type=float, default=0.2,
                   help="decode step time to compare against (default 0.2 ms)")
    args = p.parse_args(argv)
    from graphserver.tracing import Tracer
    tr = Tracer()
    for _ in range(1000):
        with tr.range("warm"):
            pass
    t0 = time.perf_counter()
    for _ in range(args.n):
        with tr.range("replay T=123"):
            pass
    per = (time.perf_counter() - t0) / args.n
    t0 = time.perf_counter()
    for _ in range(args.n):
        pass
    empty = (time.perf_counter() - t0) / args.n
    ns = (per - empty) * 1e9
    print(f"nvtx range, no profiler: {ns:.0f} ns each; two per replayed step = "
          f"{200 * ns * 1e-9 / (args.step_ms * 1e-3):.3f}% of a {args.step_ms} ms step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
