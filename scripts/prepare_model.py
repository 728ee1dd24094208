"""Prepare the default model once (see graphserver/prepare.py); prints its directory last."""
import _common  # noqa: F401  (puts the repo root on sys.path)
from graphserver.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
