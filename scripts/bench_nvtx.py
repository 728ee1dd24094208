#!/usr/bin/env python3
"""Cost of one Tracer.range (an nvtx push/pop in the 'graphserver' domain) with no profiler
attached, against a decode step's time. Prints ns per range; run it anywhere."""
import sys
import time

import _common
from graphserver import argtypes


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--n", type=argtypes.positive_int, default=200_000, help="ranges to time")
    p.add_argument("--step-ms", type=argtypes.positive_seconds, default=0.2,
                   help="decode step time to compare against, in ms")
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
