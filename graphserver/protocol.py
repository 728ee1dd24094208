"""The wire protocol: the one place that defines what travels between client and server.

Torch-free on purpose, so the client can import it without pulling in the server's dependencies.

Message shapes (msgpack maps):
    request: {"id": int | str, "method": str, "params": map, "auth"?: str}
    reply:   {"id": <echoed, or None when the request's id could not be read>, "ok": true,  "result": ...,
              "more"?: true}
             {"id": ..., "ok": false, "error": {"type": <exception class name>, "message": str}}

`auth` is the shared token a server bound to a non-loopback address requires on every request.
A streamed method (`generate` with stream=true) answers one request with several replies of the same
id: every one but the last carries "more": true.

generate streaming (see GENERATE_RESULT_KEYS): each reply's result is
    {"request_id": str, "tokens": [new ids since the previous reply], "finished": bool,
     "finish_reason": None | "stop" | "length" | "abort", "model_version": str,
     and, on the last reply only: "usage": {"prompt_tokens", "completion_tokens"},
                                  "metrics": {"queue_ms", "ttft_ms", "e2e_ms"}}
finish_reason "stop": a stop token (stop_token_ids, or the model's EOS unless ignore_eos) was produced;
it is the last of `tokens`. "length": max_tokens reached, or the sequence reached max_len. "abort": an
`abort`, the request's deadline_s passed, or the server is shutting down.

Arrays travel as {"__nd__": True, "dtype": str, "shape": [int, ...], "data": bytes} (little-endian, C order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import msgpack
import numpy as np

from graphserver.errors import BadRequest

# Limits and defaults. Both ends import these; the server enforces the size limit with zmq MAXMSGSIZE.
DEFAULT_MAX_MSG_SIZE = 64 * 1024 * 1024  # bytes, per message frame
DEFAULT_CALL_TIMEOUT_S = 120.0  # one RPC; generous because a CPU prefill of a long prompt is slow
DEFAULT_SPAWN_TIMEOUT_S = 600.0  # first start may convert the default model before READY
DEFAULT_POLL_MS = 100  # how often loops wake up to notice stop flags, dead peers, signals
DEFAULT_SERVER_LINGER_MS = 1000  # lets the reply to `stop` leave before the socket closes, bounded
DEFAULT_CAPTURE_AHEAD = 32
DEFAULT_CAPTURE_BEHIND = 2  # graphs kept behind it before eviction
DEFAULT_PRECAPTURE_TIMEOUT_S = 30.0
MAX_NESTING = 32  # deepest structure unpack_arrays walks; messages are shallow, anything deeper is hostile
READY_PREFIX = "READY "  # the server prints "READY <endpoint>" on stdout once it serves
PROTOCOL_VERSION = 2  # hello reports it; 2 added generate / abort / reload and streamed replies
FINISH_REASONS = ("stop", "length", "abort")
MAX_REQUEST_ID_LEN = 256  # request ids and session names longer than this are refused
DEFAULT_MAX_TOKENS = 16
DEFAULT_RELOAD_DRAIN_S = 60.0

ARRAY_TAG = "__nd__"
# Dtypes accepted on the wire. bfloat16 has no numpy dtype, so senders widen it to float32 (pack_array).
ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"}
)
MAX_NDIM = 8


class ProtocolError(ValueError):
    """A message that does not follow the protocol: undecodable, wrong envelope, bad array.

    `msg_id` is the request id when it could be read, so an error reply can still echo it."""

    def __init__(self, message: str, msg_id: Any = None):
        super().__init__(message)
        self.msg_id = msg_id


# ---------------------------------------------------------------------------------------------
# Arrays


def pack_array(arr: Any) -> dict:
    """np.ndarray (or a torch tensor, duck-typed) -> wire map. bfloat16 is widened to float32."""
    arr = _to_numpy(arr)
    if arr.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: numpy users cannot read it back
        arr = arr.astype(np.float32)
    name = arr.dtype.name
    if name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {name!r} cannot be sent; allowed: {sorted(ALLOWED_DTYPES)}")
    if arr.ndim > MAX_NDIM:
        raise ProtocolError(f"array has {arr.ndim} dims; at most {MAX_NDIM} can be sent")
    # Fixed little-endian C order so the receiver needs no flags.
    arr = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")  # (ascontiguousarray makes 0-d 1-d)
    return {ARRAY_TAG: True, "dtype": name, "shape": list(arr.shape), "data": arr.tobytes()}


def unpack_array(obj: Any) -> np.ndarray:
    """Wire map -> a fresh writable np.ndarray. Raises ProtocolError on anything malformed."""
    if not isinstance(obj, dict) or obj.get(ARRAY_TAG) is not True:
        raise ProtocolError("not an array map")
    if set(obj) != {ARRAY_TAG, "dtype", "shape", "data"}:
        raise ProtocolError(f"array map keys must be {ARRAY_TAG}, dtype, shape, data; got {sorted(obj)}")
    name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise ProtocolError(f"array dtype {name!r} not allowed; allowed: {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"array shape must be a list of at most {MAX_NDIM} ints")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"array shape {shape!r} must hold non-negative ints")
    if not isinstance(data, bytes):
        raise ProtocolError(f"array data must be bytes, got {type(data).__name__}")
    dtype = np.dtype(name).newbyteorder("<")
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize  # object: no int64 overflow
    if expected != len(data):
        raise ProtocolError(
            f"array of shape {shape} and dtype {name} needs {expected} bytes, got {len(data)}"
        )
    # Copy: frombuffer over bytes is read-only, and callers (samplers) may edit in place.
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def unpack_arrays(obj: Any, depth: int = 0) -> Any:
    """Replace every array map inside lists/maps with an np.ndarray."""
    if depth > MAX_NESTING:
        raise ProtocolError(f"message nested deeper than {MAX_NESTING} levels")
    if isinstance(obj, dict):
        if obj.get(ARRAY_TAG) is True:
            return unpack_array(obj)
        return {k: unpack_arrays(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_arrays(v, depth + 1) for v in obj]
    return obj


def _to_numpy(arr: Any) -> np.ndarray:
    if isinstance(arr, np.ndarray):
        return arr
    # torch.Tensor without importing torch: detach, move to host, widen bf16 (numpy has none).
    if type(arr).__module__.startswith("torch") and hasattr(arr, "detach"):
        t = arr.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    raise ProtocolError(f"cannot send {type(arr).__name__} as an array")


# ---------------------------------------------------------------------------------------------
# Encoding


def _default(obj: Any) -> Any:
    """msgpack hook for types it does not know: arrays, numpy scalars, tuples/sets of ids."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or type(obj).__module__.startswith("torch"):
        return pack_array(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(obj: Any) -> bytes:
    """Python object -> msgpack bytes (str as str, bytes as bin)."""
    return msgpack.packb(obj, use_bin_type=True, default=_default)


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} not allowed")


def decode(payload: bytes, max_size: int = DEFAULT_MAX_MSG_SIZE) -> Any:
    """msgpack bytes -> Python object, arrays left as wire maps. Raises ProtocolError."""
    # This length check is unpackb's max_buffer_size (only the streaming Unpacker takes that kwarg).
    if len(payload) > max_size:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the limit of {max_size}")
    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size,
            max_ext_len=0,
            ext_hook=_reject_ext,
        )
    except ProtocolError:
        raise
    except Exception as e:  # ExtraData, FormatError, StackError, UnicodeDecodeError, ...
        raise ProtocolError(f"malformed msgpack: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Envelopes


def make_request(msg_id: int | str, method: str, params: Mapping[str, Any] | None = None) -> dict:
    return {"id": msg_id, "method": method, "params": dict(params or {})}


def make_ok(msg_id: Any, result: Any, more: bool = False) -> dict:
    """A success reply; more=True marks a streamed reply that later ones of the same id follow."""
    reply = {"id": msg_id, "ok": True, "result": result}
    if more:
        reply["more"] = True
    return reply


def make_error(msg_id: Any, type_name: str, message: str) -> dict:
    return {"id": msg_id, "ok": False, "error": {"type": type_name, "message": message}}


def error_type_name(exc: BaseException) -> str:
    """The `type` an error reply carries: the exception's class name."""
    return type(exc).__name__


def parse_request(obj: Any) -> tuple[int | str, str, dict]:
    """Decoded request -> (id, method, params with arrays unpacked). Raises ProtocolError.

    Checks only the envelope; validate_params checks the params against METHODS."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"request must be a map, got {type(obj).__name__}")
    msg_id = obj.get("id")
    if not _is_valid_id(msg_id):
        raise ProtocolError(f"request 'id' must be an int or str, got {type(msg_id).__name__}")
    unknown = set(obj) - {"id", "method", "params", "auth"}
    if unknown:
        raise ProtocolError(f"unknown request keys {sorted(unknown)}", msg_id)
    method = obj.get("method")
    if not isinstance(method, str):
        raise ProtocolError(f"request 'method' must be a str, got {type(method).__name__}", msg_id)
    params = obj.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ProtocolError(f"request 'params' must be a map, got {type(params).__name__}", msg_id)
    try:
        params = unpack_arrays(params)
    except ProtocolError as e:
        raise ProtocolError(str(e), msg_id) from None
    return msg_id, method, params


def request_auth(obj: Any) -> str | None:
    """The `auth` token of a decoded request map (None when absent or not a str)."""
    tok = obj.get("auth") if isinstance(obj, dict) else None
    return tok if isinstance(tok, str) else None


def reply_has_more(obj: Any) -> bool:
    """True for a streamed reply that more replies of the same id follow."""
    return isinstance(obj, dict) and obj.get("more") is True


def parse_reply(obj: Any) -> tuple[Any, bool, Any]:
    """Decoded reply -> (id, ok, result or {"type", "message"}). Raises ProtocolError.
    (A streamed reply's "more" flag is read with reply_has_more.)"""
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool) or "id" not in obj:
        raise ProtocolError("reply must be a map with 'id' and a bool 'ok'")
    if obj["ok"]:
        return obj["id"], True, unpack_arrays(obj.get("result"))
    err = obj.get("error")
    if not (isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str)):
        raise ProtocolError("error reply must carry {'type': str, 'message': str}")
    return obj["id"], False, err


def _is_valid_id(x: Any) -> bool:
    return _is_int(x) or isinstance(x, str)


def _is_int(x: Any) -> bool:
    # bool is an int subclass in Python, but True is not a token id.
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# ---------------------------------------------------------------------------------------------
# Methods and their params

REQUIRED = object()  # sentinel default: the param must be given


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # a key of _CHECKERS
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def _check_int(method: str, name: str, v: Any) -> int:
    if not _is_int(v):
        raise BadRequest(f"{method}: param {name!r} must be an int, got {_type_name(v)}")
    return int(v)


def _check_opt_int(method: str, name: str, v: Any) -> int | None:
    return None if v is None else _check_int(method, name, v)


def _check_float(method: str, name: str, v: Any) -> float:
    # ints are accepted as floats (timeout_s=5); bools are not numbers here.
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise BadRequest(f"{method}: param {name!r} must be a number, got {_type_name(v)}")
    return float(v)


def _check_opt_float(method: str, name: str, v: Any) -> float | None:
    return None if v is None else _check_float(method, name, v)


def _check_str(method: str, name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise BadRequest(f"{method}: param {name!r} must be a str, got {_type_name(v)}")
    return v


def _check_int_list(method: str, name: str, v: Any) -> list[int]:
    if isinstance(v, np.ndarray):  # an int array is a compact way to send many ids
        if v.ndim != 1 or v.dtype.kind not in "iu":
            raise BadRequest(
                f"{method}: param {name!r} as an array must be 1-D integer, got {v.dtype} {list(v.shape)}"
            )
        return [int(x) for x in v]
    if not isinstance(v, (list, tuple)):
        raise BadRequest(f"{method}: param {name!r} must be a list of ints, got {_type_name(v)}")
    for i, x in enumerate(v):
        if not _is_int(x):
            raise BadRequest(f"{method}: param {name}[{i}] must be an int, got {_type_name(x)}")
    return [int(x) for x in v]


# Server-side sampling. repetition_penalty is deliberately absent: it needs the token history on
# the client and runs in the client's CPU sampler over `step` logits.
SAMPLING_KEYS: Mapping[str, str] = MappingProxyType(
    {"greedy": "bool", "temperature": "float", "top_k": "int", "top_p": "float", "seed": "int"}
)


def _check_sampling(method: str, name: str, v: Any) -> dict:
    """Sampling map -> a complete, normalized one the engine can read without defaults:
    {"greedy": bool, "temperature": float, "top_k": int (0 = off), "top_p": float (1.0 = off), "seed": int}.
    greedy defaults to True unless a temperature > 0 is given; ranges are the engine's to check."""
    if not isinstance(v, dict):
        raise BadRequest(f"{method}: param {name!r} must be a map, got {_type_name(v)}")
    for key in v:
        if key not in SAMPLING_KEYS:
            hint = " (client-side only: sample over step() logits)" if key == "repetition_penalty" else ""
            raise BadRequest(
                f"{method}: param {name!r} has unknown key {key!r}{hint}; known: {sorted(SAMPLING_KEYS)}"
            )
    out: dict[str, Any] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    for key, kind in SAMPLING_KEYS.items():
        if key in v:
            out[key] = _CHECKERS[kind](method, f"{name}.{key}", v[key])
    if "greedy" not in v:
        out["greedy"] = "temperature" not in v or out["temperature"] == 0.0
    return out


def _check_bool(method: str, name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise BadRequest(f"{method}: param {name!r} must be a bool, got {_type_name(v)}")
    return v


def _type_name(v: Any) -> str:
    return "None" if v is None else type(v).__name__


_CHECKERS: Mapping[str, Callable[[str, str, Any], Any]] = MappingProxyType(
    {
        "int": _check_int,
        "opt_int": _check_opt_int,
        "float": _check_float,
        "opt_float": _check_opt_float,
        "str": _check_str,
        "bool": _check_bool,
        "int_list": _check_int_list,
        "sampling": _check_sampling,
    }
)


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...] = field(default_factory=tuple)


def _methods(*ms: Method) -> Mapping[str, Method]:
    return MappingProxyType({m.name: m for m in ms})


# The RPC surface. The engine has a method of the same name taking exactly these params
# (except `stop`, which the server handles itself).
METHODS: Mapping[str, Method] = _methods(
    Method("hello"),
    Method("status"),
    # replace: a kv_init on a live session name is refused unless the caller asks to replace it.
    # deadline_s (kv_init, replay_seq, generate): the client's timeout; past it the server stops the
    # work (kv_init frees the half-built session, replay_seq returns what it has, stopped "deadline").
    Method(
        "kv_init",
        (Param("session", "str"), Param("input_ids", "int_list"), Param("top_k", "opt_int", None),
         Param("replace", "bool", False), Param("deadline_s", "opt_float", None)),
    ),
    Method(
        "bg_capture_start",
        (Param("ahead", "int", DEFAULT_CAPTURE_AHEAD), Param("behind", "int", DEFAULT_CAPTURE_BEHIND)),
    ),
    Method(
        "wait_precapture",
        (Param("min_ahead", "int", 1), Param("timeout_s", "float", DEFAULT_PRECAPTURE_TIMEOUT_S)),
    ),
    Method("bg_capture_stop"),
    Method(
        "replay_seq",
        (
            Param("session", "str"),
            Param("steps", "int"),
            Param("start_token", "opt_int", None),
            Param("sampling", "sampling", MappingProxyType({})),
            Param("stop_token_ids", "int_list", ()),
            Param("deadline_s", "opt_float", None),
        ),
    ),
    Method("step", (Param("session", "str"), Param("token", "int"))),
    Method("kv_free", (Param("session", "str"),)),
    # Continuous batching: requests share the batched step with every other running request.
    Method(
        "generate",
        (
            Param("request_id", "str"),
            Param("prompt_ids", "int_list"),
            Param("max_tokens", "int", DEFAULT_MAX_TOKENS),
            Param("sampling", "sampling", MappingProxyType({})),
            Param("stop_token_ids", "int_list", ()),
            Param("ignore_eos", "bool", False),
            Param("stream", "bool", True),
            # The client's own timeout: past it the server aborts the request (finish_reason "abort").
            Param("deadline_s", "opt_float", None),
        ),
    ),
    Method("abort", (Param("request_id", "str"),)),
    Method(
        "reload",
        (Param("path", "str"), Param("version", "str"),
         Param("drain_timeout_s", "float", DEFAULT_RELOAD_DRAIN_S)),
    ),
    Method("stop"),
)

# Methods whose one request may get several replies (generate with stream=true).
STREAMED_METHODS = frozenset({"generate"})


def validate_params(method: str, params: Any) -> dict:
    """Check params' names and types against METHODS; fill defaults. Raises BadRequest naming
    the method or param. Semantic ranges (ids < vocab, steps <= max) are the engine's job."""
    spec = METHODS.get(method) if isinstance(method, str) else None
    if spec is None:
        raise BadRequest(f"unknown method {method!r}; known: {sorted(METHODS)}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f"{method}: params must be a map, got {_type_name(params)}")
    known = {p.name for p in spec.params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadRequest(f"{method}: unknown param {unknown[0]!r}; known: {sorted(known)}")
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.name in params:
            out[p.name] = _CHECKERS[p.kind](method, p.name, params[p.name])
        elif p.required:
            raise BadRequest(f"{method}: missing required param {p.name!r}")
        else:
            # Defaults run through the checker too, so the engine gets fresh, normalized values.
            d = p.default
            d = dict(d) if isinstance(d, Mapping) else list(d) if isinstance(d, tuple) else d
            out[p.name] = _CHECKERS[p.kind](method, p.name, d) if d is not None else None
    return out
