"""The wire protocol alone: encoding, arrays, envelopes, and per-method param validation."""

import inspect

import msgpack
import numpy as np
import pytest

from graphserver import protocol
from graphserver.errors import BadRequest
from graphserver.protocol import METHODS, ProtocolError, validate_params

from fake_engine import FakeEngine


# -- arrays ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32", "int64", "int8", "int16", "uint8", "bool"])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 1, 4)])
def test_array_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    arr = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)  # 0-d stays an ndarray
    back = protocol.unpack_arrays(protocol.decode(protocol.encode({"a": [arr]})))["a"][0]
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable  # callers may edit logits in place


def test_pack_array_normalizes_layout_and_byte_order():
    base = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian
    view = base.T  # [4, 3], not C-contiguous
    wire = protocol.pack_array(view)
    assert wire["shape"] == [4, 3] and wire["dtype"] == "float32"
    np.testing.assert_array_equal(protocol.unpack_array(wire), view)
    assert wire["data"] == np.ascontiguousarray(view, dtype="<f4").tobytes()


def test_torch_bfloat16_is_sent_as_float32():
    torch = pytest.importorskip("torch")
    t = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    wire = protocol.pack_array(t)
    assert wire["dtype"] == "float32"
    np.testing.assert_array_equal(protocol.unpack_array(wire), np.array([1.5, -2.25, 3.0], np.float32))


def _wire(**over):
    w = protocol.pack_array(np.arange(6, dtype=np.float32).reshape(2, 3))
    w.update(over)
    return w


@pytest.mark.parametrize(
    "bad, match",
    [
        (_wire(dtype="complex64"), "not allowed"),
        (_wire(dtype="object"), "not allowed"),
        (_wire(dtype="bfloat16"), "not allowed"),
        (_wire(dtype=3), "not allowed"),
        (_wire(shape=[2, 4]), "needs 32 bytes, got 24"),
        (_wire(shape=[7]), "needs 28 bytes, got 24"),
        (_wire(data=b"\x00" * 23), "needs 24 bytes, got 23"),
        (_wire(shape=[-2, -3]), "non-negative"),
        (_wire(shape=[True, 6]), "non-negative ints"),
        (_wire(shape=[2.0, 3.0]), "non-negative ints"),
        (_wire(shape="2,3"), "list"),
        (_wire(shape=[1] * 9), "at most 8"),
        (_wire(data="abc"), "must be bytes"),
        ({**_wire(), "extra": 1}, "keys must be"),
    ],
)
def test_unpack_array_rejects(bad, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.unpack_array(bad)


def test_pack_array_rejects_unlisted_dtype():
    with pytest.raises(ProtocolError, match="complex64"):
        protocol.pack_array(np.zeros(3, np.complex64))


def test_huge_shape_does_not_overflow_the_size_check():
    # 2**40 * 2**40 would wrap in int64 arithmetic; the check must still refuse it.
    with pytest.raises(ProtocolError, match="needs"):
        protocol.unpack_array(_wire(shape=[2**40, 2**40], data=b""))


# -- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\xc1", "malformed"),  # the one byte msgpack never uses
        (msgpack.packb({"id": 1}) + b"\x01", "malformed"),  # trailing data
        (b"\x92\x01", "malformed"),  # truncated array
        (b"\xa2\xff\xfe", "malformed"),  # str that is not UTF-8
        (msgpack.packb(msgpack.ExtType(5, b"xy")), "ext"),
        (msgpack.packb({1: "int key"}), "malformed"),  # strict_map_key
        (b"", "malformed"),
    ],
)
def test_decode_rejects(payload, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.decode(payload)


def test_decode_enforces_size_limit():
    payload = protocol.encode({"data": b"x" * 1000})
    assert protocol.decode(payload, max_size=2000)["data"] == b"x" * 1000
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.decode(payload, max_size=500)


def test_deep_nesting_is_refused():
    obj = [1]
    for _ in range(protocol.MAX_NESTING + 5):
        obj = [obj]
    with pytest.raises(ProtocolError, match="nested"):
        protocol.unpack_arrays(protocol.decode(protocol.encode(obj)))


def test_numpy_scalars_and_sets_encode_as_plain_values():
    obj = protocol.decode(protocol.encode({"n": np.int64(7), "f": np.float32(0.5), "s": {3, 1}}))
    assert obj == {"n": 7, "f": 0.5, "s": [1, 3]}
    assert type(obj["n"]) is int


# -- envelopes -------------------------------------------------------------------------------


def test_request_round_trip_unpacks_arrays():
    ids = np.array([5, 6, 7], np.int32)
    msg = protocol.decode(protocol.encode(protocol.make_request(9, "kv_init", {"session": "s", "input_ids": ids})))
    msg_id, method, params = protocol.parse_request(msg)
    assert (msg_id, method, params["session"]) == (9, "kv_init", "s")
    np.testing.assert_array_equal(params["input_ids"], ids)


@pytest.mark.parametrize(
    "obj, match, msg_id",
    [
        ([1, 2], "must be a map", None),
        ("hello", "must be a map", None),
        ({"method": "hello"}, "'id'", None),
        ({"id": None, "method": "hello"}, "'id'", None),
        ({"id": True, "method": "hello"}, "'id'", None),  # a bool is not an id
        ({"id": 1.5, "method": "hello"}, "'id'", None),
        ({"id": 4}, "'method'", 4),
        ({"id": "a", "method": 3}, "'method'", "a"),
        ({"id": 5, "method": "hello", "params": [1]}, "'params'", 5),
        ({"id": 6, "method": "hello", "extra": 1}, "unknown request keys", 6),
        ({"id": 7, "method": "kv_init", "params": {"input_ids": _wire(dtype="object")}}, "not allowed", 7),
    ],
)
def test_parse_request_rejects(obj, match, msg_id):
    with pytest.raises(ProtocolError, match=match) as ei:
        protocol.parse_request(obj)
    assert ei.value.msg_id == msg_id  # the server echoes this id in its error reply


def test_parse_reply():
    arr = np.ones(4, np.float32)
    ok = protocol.decode(protocol.encode(protocol.make_ok(3, {"logits": arr})))
    msg_id, is_ok, result = protocol.parse_reply(ok)
    assert (msg_id, is_ok) == (3, True)
    np.testing.assert_array_equal(result["logits"], arr)
    err = protocol.decode(protocol.encode(protocol.make_error(None, "BadRequest", "no")))
    assert protocol.parse_reply(err) == (None, False, {"type": "BadRequest", "message": "no"})
    with pytest.raises(ProtocolError):
        protocol.parse_reply({"id": 1, "ok": False, "error": "text"})
    with pytest.raises(ProtocolError):
        protocol.parse_reply({"id": 1, "ok": 1})


def test_error_type_name_is_the_class_name():
    assert protocol.error_type_name(BadRequest("x")) == "BadRequest"


# -- METHODS and validate_params -------------------------------------------------------------


def test_methods_table_is_the_documented_surface():
    assert set(METHODS) == {"hello", "status", "kv_init", "bg_capture_start", "wait_precapture",
                            "bg_capture_stop", "replay_seq", "step", "kv_free", "generate",
                            "abort", "reload", "stop"}


# Streamed and deferred methods (generate, reload) take the server's reply callbacks first.
CALLBACKS = ("self", "reply", "reply_error")


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"stop"}))
def test_fake_engine_matches_methods(name):
    # The server calls engine.<method>(**validated params): the signature must take exactly these.
    sig = inspect.signature(getattr(FakeEngine, name))
    assert [p for p in sig.parameters if p not in CALLBACKS] == [p.name for p in METHODS[name].params]


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"stop"}))
def test_real_engine_accepts_methods(name):
    # The real engine takes every protocol param by name; extra params of its own need defaults,
    # since the server never passes them.
    engine_mod = pytest.importorskip("graphserver.engine")
    sig = inspect.signature(getattr(engine_mod.Engine, name))
    engine_params = {k: p for k, p in sig.parameters.items() if k not in CALLBACKS}
    wire = [p.name for p in METHODS[name].params]
    assert set(wire) <= set(engine_params), f"Engine.{name} lacks {set(wire) - set(engine_params)}"
    extra = [k for k, p in engine_params.items() if k not in wire and p.default is inspect.Parameter.empty]
    assert not extra, f"Engine.{name} requires params the protocol never sends: {extra}"


def test_defaults_are_filled_and_normalized():
    assert validate_params("hello", None) == {}
    assert validate_params("kv_init", {"session": "s", "input_ids": [1, 2]}) == {
        "session": "s", "input_ids": [1, 2], "top_k": None, "replace": False, "deadline_s": None}
    assert validate_params("bg_capture_start", {}) == {
        "ahead": protocol.DEFAULT_CAPTURE_AHEAD, "behind": protocol.DEFAULT_CAPTURE_BEHIND}
    assert validate_params("wait_precapture", {"min_ahead": 4, "timeout_s": 2}) == {"min_ahead": 4, "timeout_s": 2.0}
    r = validate_params("replay_seq", {"session": "s", "steps": 8})
    assert r == {"session": "s", "steps": 8, "start_token": None, "stop_token_ids": [], "deadline_s": None,
                 "sampling": {"greedy": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0}}


def test_defaults_are_fresh_objects():
    a = validate_params("replay_seq", {"session": "s", "steps": 1})
    a["stop_token_ids"].append(5)
    a["sampling"]["seed"] = 9
    b = validate_params("replay_seq", {"session": "s", "steps": 1})
    assert b["stop_token_ids"] == [] and b["sampling"]["seed"] == 0


@pytest.mark.parametrize(
    "sampling, expected",
    [
        ({}, {"greedy": True}),
        ({"temperature": 0}, {"greedy": True, "temperature": 0.0}),
        ({"temperature": 0.7}, {"greedy": False, "temperature": 0.7}),
        ({"temperature": 0.7, "greedy": True}, {"greedy": True}),
        ({"top_k": 40, "top_p": 0.9, "seed": 3, "greedy": False},
         {"greedy": False, "top_k": 40, "top_p": 0.9, "seed": 3}),
    ],
)
def test_sampling_normalization(sampling, expected):
    got = validate_params("replay_seq", {"session": "s", "steps": 1, "sampling": sampling})["sampling"]
    assert set(got) == {"greedy", "temperature", "top_k", "top_p", "seed"}
    assert {k: got[k] for k in expected} == expected
    assert type(got["temperature"]) is float and type(got["top_p"]) is float


def test_input_ids_as_integer_array():
    r = validate_params("kv_init", {"session": "s", "input_ids": np.array([3, 4], np.int64)})
    assert r["input_ids"] == [3, 4] and all(type(x) is int for x in r["input_ids"])


_REQ = {
    "kv_init": {"session": "s", "input_ids": [1]},
    "replay_seq": {"session": "s", "steps": 2},
    "step": {"session": "s", "token": 1},
    "kv_free": {"session": "s"},
    "wait_precapture": {"min_ahead": 1},
    "bg_capture_start": {},
}


@pytest.mark.parametrize(
    "method, bad, needle",
    [
        ("kv_init", {"session": 3}, "'session' must be a str, got int"),
        ("kv_init", {"session": None}, "'session' must be a str, got None"),
        ("kv_init", {"input_ids": "1 2 3"}, "'input_ids' must be a list of ints"),
        ("kv_init", {"input_ids": [1, "2"]}, "input_ids[1] must be an int, got str"),
        ("kv_init", {"input_ids": [1, True]}, "input_ids[1] must be an int, got bool"),
        ("kv_init", {"input_ids": [1, 2.0]}, "input_ids[1] must be an int, got float"),
        ("kv_init", {"input_ids": [[1]]}, "input_ids[0] must be an int, got list"),
        ("kv_init", {"input_ids": np.zeros(3, np.float32)}, "'input_ids' as an array must be 1-D integer"),
        ("kv_init", {"input_ids": np.zeros((1, 3), np.int32)}, "'input_ids' as an array must be 1-D integer"),
        ("kv_init", {"top_k": 2.5}, "'top_k' must be an int, got float"),
        ("kv_init", {"top_k": False}, "'top_k' must be an int, got bool"),
        ("replay_seq", {"steps": True}, "'steps' must be an int, got bool"),
        ("replay_seq", {"steps": "8"}, "'steps' must be an int, got str"),
        ("replay_seq", {"start_token": 1.0}, "'start_token' must be an int, got float"),
        ("replay_seq", {"sampling": "greedy"}, "'sampling' must be a map, got str"),
        ("replay_seq", {"sampling": {"temperature": "hot"}}, "'sampling.temperature' must be a number, got str"),
        ("replay_seq", {"sampling": {"temperature": True}}, "'sampling.temperature' must be a number, got bool"),
        ("replay_seq", {"sampling": {"top_k": 1.5}}, "'sampling.top_k' must be an int, got float"),
        ("replay_seq", {"sampling": {"top_p": None}}, "'sampling.top_p' must be a number, got None"),
        ("replay_seq", {"sampling": {"seed": "x"}}, "'sampling.seed' must be an int, got str"),
        ("replay_seq", {"sampling": {"greedy": 1}}, "'sampling.greedy' must be a bool, got int"),
        ("replay_seq", {"sampling": {"repetition_penalty": 1.1}}, "client-side only"),
        ("replay_seq", {"sampling": {"tempreature": 1.0}}, "unknown key 'tempreature'"),
        ("replay_seq", {"stop_token_ids": 2}, "'stop_token_ids' must be a list of ints, got int"),
        ("replay_seq", {"stop_token_ids": [2, None]}, "stop_token_ids[1] must be an int, got None"),
        ("step", {"token": "7"}, "'token' must be an int, got str"),
        ("step", {"token": None}, "'token' must be an int, got None"),
        ("kv_free", {"session": b"s"}, "'session' must be a str, got bytes"),
        ("wait_precapture", {"min_ahead": 1.5}, "'min_ahead' must be an int, got float"),
        ("wait_precapture", {"timeout_s": "5"}, "'timeout_s' must be a number, got str"),
        ("bg_capture_start", {"ahead": [4]}, "'ahead' must be an int, got list"),
        ("bg_capture_start", {"behind": 2.0}, "'behind' must be an int, got float"),
    ],
)
def test_param_type_errors_name_the_param(method, bad, needle):
    params = {**_REQ[method], **bad}
    with pytest.raises(BadRequest) as ei:
        validate_params(method, params)
    assert needle in str(ei.value)
    assert str(ei.value).startswith(f"{method}:")


@pytest.mark.parametrize("method, missing", [("kv_init", "session"), ("kv_init", "input_ids"),
                                             ("replay_seq", "steps"), ("step", "token"), ("kv_free", "session"),
                                             ("replay_seq", "session")])
def test_missing_required_param(method, missing):
    params = {k: v for k, v in _REQ[method].items() if k != missing}
    with pytest.raises(BadRequest, match=f"missing required param '{missing}'"):
        validate_params(method, params)


def test_unknown_param_and_method():
    with pytest.raises(BadRequest, match="unknown param 'tokens'"):
        validate_params("step", {"session": "s", "token": 1, "tokens": [1]})
    with pytest.raises(BadRequest, match="unknown param 'x'"):
        validate_params("hello", {"x": 1})
    with pytest.raises(BadRequest, match="unknown method 'close'"):
        validate_params("close", {})
    with pytest.raises(BadRequest, match="unknown method"):
        validate_params(None, {})
    with pytest.raises(BadRequest, match="params must be a map"):
        validate_params("hello", [1])
