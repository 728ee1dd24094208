"""Shared fixtures. The default model is prepared once per machine (cached), by the same code the
scripts use; tests that need it say so through the `default_model_dir` fixture."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from graphserver.prepare import prepare_default_model
    return prepare_default_model(log=lambda *a, **k: None)
