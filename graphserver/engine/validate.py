"""Checks of request parameters, done in full before any state is touched (BadRequest names the
parameter and its valid range)."""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..core.request import SamplingParams
from ..errors import BadRequest
from ..protocol import MAX_REQUEST_ID_LEN

MAX_TEMPERATURE = 1e4     # past this every distribution is uniform to fp32 precision anyway
GREEDY_BELOW = 1e-5       # smaller temperatures are greedy (logits / T would overflow fp32)
INT31 = (1 << 31) - 1


def parse_sampling(sampling: Optional[dict]) -> SamplingParams:
    """SamplingParams from the wire dict (protocol.validate_params normalized its types)."""
    s = dict(sampling or {})
    known = {"temperature", "top_k", "top_p", "seed", "greedy"}
    unknown = set(s) - known
    if unknown:
        raise BadRequest(f"unknown sampling keys {sorted(unknown)}; known: {sorted(known)}")
    greedy = bool(s.get("greedy", False))
    temperature = 0.0 if greedy else float(s.get("temperature", 0.0))
    top_k, top_p, seed = s.get("top_k", 0), float(s.get("top_p", 1.0)), s.get("seed", 0)
    if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise BadRequest(f"sampling.temperature must be in [0, {MAX_TEMPERATURE:g}], got "
                         f"{temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) \
            or not 0 <= int(top_k) <= INT31:
        raise BadRequest(f"sampling.top_k must be an int in [0, {INT31}] (0: off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"sampling.top_p must be in (0, 1], got {top_p}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not -(1 << 63) <= int(seed) < (1 << 63):
        raise BadRequest(f"sampling.seed must be an int in [-2^63, 2^63), got {seed!r}")
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    return SamplingParams(temperature, int(top_k), top_p, int(seed))


def check_token(token: Any, what: str, vocab_size: int) -> int:
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise BadRequest(f"{what} must be an int, got {type(token).__name__}")
    if not 0 <= int(token) < vocab_size:
        raise BadRequest(f"{what} {int(token)} is out of range [0, {vocab_size})")
    return int(token)


def check_ids(ids: Any, what: str, vocab_size: int, allow_empty: bool = False) -> list[int]:
    if not isinstance(ids, (list, tuple)) or (not ids and not allow_empty):
        raise BadRequest(f"{what} must be a non-empty list of token ids")
    return [check_token(t, f"{what}[{i}]", vocab_size) for i, t in enumerate(ids)]


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{what} must be a non-empty string")
    if len(name) > MAX_REQUEST_ID_LEN:
        raise BadRequest(f"{what} is {len(name)} characters; the limit is {MAX_REQUEST_ID_LEN}")
    return name


def check_deadline(deadline_s: Optional[float]) -> Optional[float]:
    if deadline_s is None:
        return None
    if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s) and deadline_s > 0):
        raise BadRequest(f"deadline_s must be a number of seconds > 0, got {deadline_s!r}")
    return float(deadline_s)
