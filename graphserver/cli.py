"""The `graphserver` console command: `graphserver serve ...` runs the HTTP front end; anything else
goes to `python -m graphserver` (graphserver.__main__.main) unchanged."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from graphserver.api.server import main as serve  # torch-free: keeps `serve` light

        return serve(argv[1:])
    from graphserver.__main__ import main as engine

    return engine(argv)


if __name__ == "__main__":
    sys.exit(main())
