"""The serving engine: EngineCore (core.py: scheduler + batched step + reload), the session
adapter (sessions.py), the RPC surface (engine.py: Engine) and the server process (proc.py)."""
from ..worker.device import DTYPE_NAMES, pick_device, pick_dtype
from .core import EngineCore
from .engine import Engine
from .validate import parse_sampling

__all__ = ["DTYPE_NAMES", "Engine", "EngineCore", "parse_sampling", "pick_device", "pick_dtype"]
