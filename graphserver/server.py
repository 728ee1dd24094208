"""Compatibility name: the server loop now lives in graphserver/engine/proc.py (IO thread +
engine loop). Kept until every caller imports EngineProc directly."""
from graphserver.engine.proc import (EndpointError, EngineProc as RPCServer,  # noqa: F401
                                     arm_parent_death_signal)
