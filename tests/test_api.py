"""The HTTP front end against the fake batching engine (tests/fake_batch_engine.py), with the
official `openai` client: routes, streaming, stops, errors, metrics, disconnects, reload."""

import asyncio
import collections
import concurrent.futures
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from client.rpc import RPCClient
from fake_batch_engine import FakeBatchEngine, write_checkpoint
from graphserver.api.app import create_app
from graphserver.api.server import listen, url_of
from graphserver.api.service import ApiSettings, ApiState, AttachLauncher
from graphserver.api.text import TextTokenizer

START_TIMEOUT_S = 20.0


class ApiThread:
    """The FastAPI app under uvicorn in a daemon thread, attached to `endpoint`."""

    def __init__(self, endpoint: str, launcher=None, wait: bool = True, **settings):
        self.sock = listen("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.ready = threading.Event()
        self.fatal = []
        self.state = ApiState(ApiSettings(on_ready=self.ready.set, on_fatal=self.fatal.append, **settings),
                              launcher or AttachLauncher(endpoint))
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.state), log_config=None, access_log=False,
                                                    lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
                                       daemon=True, name="api")
        self.thread.start()
        if wait:
            assert self.ready.wait(START_TIMEOUT_S), f"API not ready: {self.fatal}"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30.0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10.0)
        assert not self.thread.is_alive(), "API thread did not exit"


@pytest.fixture(scope="module")
def tok_dir(default_model_dir):
    return str(default_model_dir)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return TextTokenizer(tok_dir)


@pytest.fixture
def stack(tok_dir):
    """Factory: (engine, api) with the engine's knobs given; everything is stopped afterwards."""
    made = []

    def make(**engine_kw):
        engine = FakeBatchEngine(tok_dir, **engine_kw).start()
        made.append(engine)
        api = ApiThread(engine.endpoint)
        made.append(api)
        return engine, api

    yield make
    for thing in reversed(made):
        thing.stop()


@pytest.fixture(scope="module")
def shared(tok_dir):
    engine = FakeBatchEngine(tok_dir, step_s=0.002).start()
    api = ApiThread(engine.endpoint)
    yield engine, api
    api.stop()
    engine.stop()


def expected_text(engine, tok, prompt_ids, n, offset=0):
    return tok.decode(engine.rule.continuation(prompt_ids[-1], n, offset))


def chat_ids(tok, content):
    return tok.encode_chat([{"role": "user", "content": content}])


# -------------------------------------------------------------------------------------------
# Generation


def test_chat_non_streaming_matches_the_rule(shared, tok):
    engine, api = shared
    raw = api.openai().chat.completions.with_raw_response.create(
        model="fake-batch", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=7, temperature=0)
    out = raw.parse()
    assert raw.headers["x-model-version"] == "0"
    assert out.object == "chat.completion" and len(out.choices) == 1
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected_text(engine, tok, chat_ids(tok, "Name a colour."), 7)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(chat_ids(tok, "Name a colour."))
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == out.usage.prompt_tokens + 7
    # The engine got the chat template's ids and a greedy sampling map.
    method, params = [c for c in engine.calls if c[0] == "generate"][-1]
    assert params["prompt_ids"] == chat_ids(tok, "Name a colour.") and params["sampling"]["greedy"] is True


def test_chat_streaming_equals_non_streaming_and_reports_usage(shared, tok):
    engine, api = shared
    client = api.openai()
    kw = dict(model="fake-batch", messages=[{"role": "user", "content": "Count."}], max_tokens=9, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole == expected_text(engine, tok, chat_ids(tok, "Count."), 9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(shared):
    _, api = shared
    body = {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", api.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-model-version"] == "0"
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(isinstance(c["choices"], list) and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_streaming_and_not(shared, tok):
    engine, api = shared
    client = api.openai()
    prompt = "The capital of France is"
    want = expected_text(engine, tok, tok.encode_plain(prompt), 6)
    out = client.completions.create(model="fake-batch", prompt=prompt, max_tokens=6, temperature=0)
    assert out.choices[0].text == want and out.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="fake-batch", prompt=prompt, max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    # A prompt given as token ids goes to the engine as they are.
    ids = tok.encode_plain("Token ids")
    out = client.completions.create(model="fake-batch", prompt=ids, max_tokens=3, temperature=0)
    assert out.choices[0].text == expected_text(engine, tok, ids, 3)


def test_completions_default_max_tokens_is_16(shared):
    _, api = shared
    out = api.openai().completions.create(model="fake-batch", prompt="x", temperature=0)
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_sampling_params_reach_the_engine(shared):
    engine, api = shared
    api.openai().completions.create(model="fake-batch", prompt="x", max_tokens=2, temperature=0.7, top_p=0.9,
                                    seed=1234, extra_body={"top_k": 5})
    _, params = [c for c in engine.calls if c[0] == "generate"][-1]
    assert params["sampling"] == {"greedy": False, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 1234}
    # Unseeded sampled requests get distinct seeds: the engine's default seed would repeat one stream.
    for _ in range(2):
        api.openai().completions.create(model="fake-batch", prompt="x", max_tokens=1, temperature=1.0)
    seeds = [p["sampling"]["seed"] for m, p in engine.calls[-2:] if m == "generate"]
    assert len(seeds) == 2 and seeds[0] != seeds[1]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_text_and_aborts(shared, tok, stream):
    engine, api = shared
    prompt = "Stop strings"
    full = expected_text(engine, tok, tok.encode_plain(prompt), 12)
    stop = full[len(full) // 2: len(full) // 2 + 3]  # spans token boundaries in general
    assert stop.strip(), full
    client = api.openai()
    kw = dict(model="fake-batch", prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "\x00never"])
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(**kw)
        text, reason = out.choices[0].text, out.choices[0].finish_reason
    assert text == full[:full.find(stop)] and reason == "stop"
    rid = [p["request_id"] for m, p in engine.calls if m == "generate"][-1]
    # The front end stopped reading at the match: it tells the engine to stop generating.
    deadline = time.monotonic() + 5
    while ("abort", {"request_id": rid}) not in engine.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ("abort", {"request_id": rid}) in engine.calls


def test_stop_token_ids_finish_with_stop(shared, tok):
    engine, api = shared
    ids = tok.encode_plain("Stop tokens")
    tokens = engine.rule.continuation(ids[-1], 10)
    k = 4
    out = api.openai().completions.create(model="fake-batch", prompt=ids, max_tokens=10, temperature=0,
                                          extra_body={"stop_token_ids": [tokens[k]]})
    # The stop token ends generation and is counted, but is not part of the text.
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == tok.decode(tokens[:k])
    assert out.usage.completion_tokens == k + 1


def test_native_generate(shared, tok):
    engine, api = shared
    ids = tok.encode_plain("Native")
    r = httpx.post(api.url + "/generate", json={"prompt": "Native", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == engine.rule.continuation(ids[-1], 5)
    assert body["text"] == tok.decode(body["tokens"]) and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 5, "total_tokens": len(ids) + 5}
    assert body["model_version"] == r.headers["x-model-version"] == "0"


def test_multibyte_text_never_streams_broken_characters(stack, tok):
    text = "héllo 🙂 wörld, 日本語のテキスト ✓ ok"
    script = tok.encode_plain(text)
    engine, api = stack(script=script, step_s=0.001)
    pieces = [c.choices[0].text for c in api.openai().completions.create(
        model="fake-batch", prompt="x", max_tokens=len(script), temperature=0, stream=True)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 5  # it really streamed piece by piece


# -------------------------------------------------------------------------------------------
# Errors


def _error(resp: httpx.Response) -> dict:
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(shared):
    _, api = shared
    url = api.url
    chat = url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (url + "/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None),
        (url + "/v1/completions", b'["not", "an", "object"]', 400, None),
        (chat, {"messages": msgs, "max_tokens": "5"}, 400, "max_tokens"),
        (chat, {"messages": "hi"}, 400, "messages"),
        (chat, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        (chat, {"messages": msgs, "n": 2}, 400, "n"),
        (chat, {"messages": msgs, "temperature": -0.5}, 400, "temperature"),
        (chat, {"messages": msgs, "temperature": True}, 400, "temperature"),
        (chat, {"messages": msgs, "top_p": 0}, 400, "top_p"),
        (chat, {"messages": msgs, "max_tokens": 100000}, 400, "max_tokens"),
        (chat, {"messages": msgs, "max_tokens": 0}, 400, "max_tokens"),
        (chat, {"messages": msgs, "model": "gpt-9"}, 404, "model"),
        (chat, {"messages": msgs, "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
        (chat, {"messages": msgs, "stop": [""]}, 400, "stop"),
        (url + "/v1/completions", {"prompt": [10**9], "max_tokens": 2}, 400, "prompt"),
        (url + "/v1/completions", {"prompt": "a " * 400, "max_tokens": 2}, 400, "prompt"),
        (url + "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
        (url + "/generate", {"prompt": "x", "bogus": 1}, 400, "bogus"),
    ]
    for target, body, status, param in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(target, timeout=30, **kw)
        assert r.status_code == status, (body, r.text)
        err = _error(r)
        assert err["param"] == param, (body, err)
        assert r.headers["x-model-version"] == "0"
    assert _error(httpx.post(chat, json={"messages": msgs, "model": "gpt-9"}))["code"] == "model_not_found"
    assert _error(httpx.post(chat, json={"messages": msgs, "max_tokens": 100000}))["code"] == "context_length_exceeded"
    # The official client sees the same as typed errors.
    client = api.openai()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="fake-batch", messages=msgs, n=3)
    assert e.value.status_code == 400 and "n must be 1" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=msgs)
    r = httpx.get(url + "/no/such/route")
    assert r.status_code == 404 and _error(r)["type"] == "not_found_error" and r.headers["x-model-version"] == "0"
    # Still serving.
    assert client.chat.completions.create(model="fake-batch", messages=msgs, max_tokens=2).choices[0].message.content


def test_overloaded_engine_is_429(stack):
    engine, api = stack(max_waiting=0)  # every generate is refused as Overloaded
    with pytest.raises(openai.RateLimitError) as e:
        api.openai().completions.create(model="fake-batch", prompt="x", max_tokens=2)
    assert e.value.status_code == 429 and "overloaded" in e.value.message
    r = httpx.post(api.url + "/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status_code == 429 and _error(r)["type"] == "rate_limit_error" and "retry-after" in r.headers
    assert httpx.get(api.url + "/health").status_code == 200


# -------------------------------------------------------------------------------------------
# Service routes


def test_models_health_and_version_header(shared):
    _, api = shared
    models = api.openai().models.list()
    assert [m.id for m in models.data] == ["fake-batch"]
    for path in ("/health", "/v1/models", "/metrics"):
        r = httpx.get(api.url + path)
        assert r.status_code == 200 and r.headers["x-model-version"] == "0", path
    assert httpx.get(api.url + "/health").json()["status"] == "ok"


def _metrics(url: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(metrics: dict, metric: str, **labels) -> float:
    return metrics.get((metric, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move(shared):
    _, api = shared
    before = _metrics(api.url)
    list(api.openai().completions.create(model="fake-batch", prompt="metrics", max_tokens=5, temperature=0,
                                         stream=True))
    after = _metrics(api.url)
    assert _value(after, "graphserver_generation_tokens_total") - _value(before, "graphserver_generation_tokens_total") == 5
    assert _value(after, "graphserver_prompt_tokens_total") > _value(before, "graphserver_prompt_tokens_total")
    assert (_value(after, "graphserver_requests_total", endpoint="completions", finish_reason="length")
            == _value(before, "graphserver_requests_total", endpoint="completions", finish_reason="length") + 1)
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert _value(after, f"graphserver_{hist}_count") == _value(before, f"graphserver_{hist}_count") + 1
    assert _value(after, "graphserver_inter_token_latency_seconds_count") >= _value(
        before, "graphserver_inter_token_latency_seconds_count") + 4
    for gauge in ("graphserver_requests_running", "graphserver_requests_waiting", "graphserver_kv_cache_usage_ratio",
                  "graphserver_engine_steps_total", "graphserver_batch_graph_eager_steps_total"):
        assert (gauge, ()) in after, gauge
    assert _value(after, "graphserver_engine_up") == 1.0
    assert _value(after, "graphserver_model_info", name="fake-batch", version="0") == 1.0


# -------------------------------------------------------------------------------------------
# Disconnects


def _wait_idle(engine, timeout_s=5.0) -> dict:
    with RPCClient(engine.endpoint, timeout_s=5.0) as c:
        deadline = time.monotonic() + timeout_s
        while True:
            st = c.status()
            if (st["scheduler"]["running"] == 0 and st["kv"]["blocks_used"] == 0) or time.monotonic() > deadline:
                return st


def test_disconnect_mid_stream_aborts_and_frees_blocks(stack):
    engine, api = stack(step_s=0.05)
    body = {"prompt": "a long one", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", api.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data: ")]
        assert got
        with RPCClient(engine.endpoint, timeout_s=5.0) as c:
            assert c.status()["kv"]["blocks_used"] > 0  # it is running
    st = _wait_idle(engine)
    assert st["scheduler"]["running"] == 0 and st["kv"]["blocks_used"] == 0
    rid = [p["request_id"] for m, p in engine.calls if m == "generate"][-1]
    assert ("abort", {"request_id": rid}) in engine.calls
    assert st["scheduler"]["aborted"] == 1


def test_disconnect_while_waiting_for_a_non_streamed_answer_aborts(stack):
    engine, api = stack(step_s=0.05)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api.url + "/v1/completions", json={"prompt": "x", "max_tokens": 200}, timeout=0.5)
    st = _wait_idle(engine)
    assert st["scheduler"]["running"] == 0 and st["kv"]["blocks_used"] == 0 and st["scheduler"]["aborted"] == 1


# -------------------------------------------------------------------------------------------
# Reload


def test_reload_under_load_and_bad_checkpoint(stack, tok, tmp_path):
    engine, api = stack(step_s=0.005, reload_copy_s=0.3, max_num_seqs=4)
    ckpt_a = write_checkpoint(str(tmp_path / "a"), offset=0)
    ckpt_b = write_checkpoint(str(tmp_path / "b"), offset=1)
    prompt, n = "Reload me", 12
    want = {"0": expected_text(engine, tok, tok.encode_plain(prompt), n, 0),
            "A": expected_text(engine, tok, tok.encode_plain(prompt), n, 0),
            "B": expected_text(engine, tok, tok.encode_plain(prompt), n, 1)}
    assert want["A"] != want["B"]
    client = api.openai()

    def one_stream():
        with client.completions.with_streaming_response.create(
                model="fake-batch", prompt=prompt, max_tokens=n, temperature=0, stream=True) as resp:
            version = resp.headers["x-model-version"]
            text = "".join(c.choices[0].text for c in resp.parse())
        return version, text

    health = []
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(one_stream) for _ in range(8)]
        time.sleep(0.02)
        reload_b = pool.submit(httpx.post, api.url + "/reload", json={"path": ckpt_b, "version": "B"}, timeout=30)
        while not reload_b.done() and 503 not in health:  # /health says 503 while it reloads
            health.append(httpx.get(api.url + "/health").status_code)
            time.sleep(0.01)
        streams += [pool.submit(one_stream) for _ in range(4)]  # queued behind the reload
        r = reload_b.result()
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "B" and r.json()["previous_version"] == "0"
        assert r.headers["x-model-version"] == "B"
        streams += [pool.submit(one_stream) for _ in range(4)]
        r = httpx.post(api.url + "/reload", json={"path": ckpt_a, "version": "A"}, timeout=30)
        assert r.status_code == 200 and r.json()["previous_version"] == "B"
        streams += [pool.submit(one_stream) for _ in range(4)]
        results = [f.result() for f in streams]  # raises if any request failed
    assert 503 in health
    assert len(results) == 20
    for version, text in results:
        assert text == want[version], (version, text)
    assert {v for v, _ in results} >= {"B", "A"}

    # A bad checkpoint: a clear 400, and the old weights keep serving.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    r = httpx.post(api.url + "/reload", json={"path": str(bad), "version": "C"}, timeout=30)
    assert r.status_code == 400
    err = _error(r)
    assert err["code"] == "bad_checkpoint" and "old weights keep serving" in err["message"]
    assert r.headers["x-model-version"] == "A"
    assert one_stream() == ("A", want["A"])
    assert httpx.get(api.url + "/health").status_code == 200
    r = httpx.post(api.url + "/reload", json={"path": str(bad)}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "version"


def test_reload_under_32_streams_fails_none(stack, tok, tmp_path):
    """The issue's target at its own size: 32 streams in flight while the weights switch, and 32
    more sent during the switch. None fails, and each text is what its header's version gives."""
    engine, api = stack(step_s=0.003, reload_copy_s=0.2, max_num_seqs=32, max_waiting=64, num_blocks=256)
    ckpt = write_checkpoint(str(tmp_path / "b"), offset=3)
    prompt, n = "Thirty-two at once", 10
    ids = tok.encode_plain(prompt)
    want = {"0": expected_text(engine, tok, ids, n, 0), "B": expected_text(engine, tok, ids, n, 3)}
    assert want["0"] != want["B"]
    client = api.openai()

    def one_stream():
        with client.completions.with_streaming_response.create(
                model="fake-batch", prompt=prompt, max_tokens=n, temperature=0, stream=True) as resp:
            return resp.headers["x-model-version"], "".join(c.choices[0].text for c in resp.parse())

    with concurrent.futures.ThreadPoolExecutor(66) as pool:
        streams = [pool.submit(one_stream) for _ in range(32)]
        while engine.counters["steps"] < 2:  # the first streams are running
            time.sleep(0.002)
        reload_b = pool.submit(httpx.post, api.url + "/reload", json={"path": ckpt, "version": "B"}, timeout=60)
        while engine._reload is None and not reload_b.done():
            time.sleep(0.002)
        streams += [pool.submit(one_stream) for _ in range(32)]  # wait behind the switch
        r = reload_b.result()
        assert r.status_code == 200, r.text
        results = [f.result() for f in streams]  # raises if any request failed
    assert len(results) == 64
    for version, text in results:
        assert text == want[version], (version, text)
    counts = collections.Counter(v for v, _ in results)
    assert counts["0"] >= 1 and counts["B"] >= 32, counts


def test_reload_through_one_front_end_is_seen_by_another(stack, tok, tmp_path):
    """Two front ends on one engine (as --api-servers runs them): a reload sent to one while the
    other's reload runs is a 409, not a bad checkpoint; the other learns the new version from the
    engine (its /health, its /metrics, its responses' header)."""
    engine, api = stack(step_s=0.005, reload_copy_s=0.4, max_num_seqs=4)
    other = ApiThread(engine.endpoint)
    try:
        ckpt = write_checkpoint(str(tmp_path / "b"), offset=1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, api.url + "/reload", json={"path": ckpt, "version": "B"}, timeout=30)
            while engine._reload is None:  # until the engine holds the first reload
                assert not first.done(), first.result().text
                time.sleep(0.005)
            second = httpx.post(other.url + "/reload", json={"path": ckpt, "version": "B2"}, timeout=30)
            assert second.status_code == 409 and _error(second)["code"] == "reload_in_progress", second.text
            assert first.result().status_code == 200
        r = httpx.get(other.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == "B" and r.headers["x-model-version"] == "B"
        assert _value(_metrics(other.url), "graphserver_model_info", name="fake-batch", version="B") == 1.0
        prompt = "after"
        r = httpx.post(other.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 5}, timeout=30)
        assert r.headers["x-model-version"] == "B"
        assert r.json()["choices"][0]["text"] == expected_text(engine, tok, tok.encode_plain(prompt), 5, 1)
    finally:
        other.stop()


def test_a_reload_from_outside_reaches_the_header_of_every_response(stack, tmp_path):
    """Weights reloaded over ZeroMQ by someone else (another front-end process, graphclient): the
    front end learns the version from its hello poll, so even responses that made no tokens (here
    /v1/models) name it soon after, without a generation, /health or /metrics call in between."""
    engine, api = stack(step_s=0.005, reload_copy_s=0.05)
    models = lambda: httpx.get(api.url + "/v1/models", timeout=10).headers["x-model-version"]  # noqa: E731
    assert models() == "0"
    with RPCClient(engine.endpoint, timeout_s=10.0) as c:
        assert c.call("reload", path=write_checkpoint(str(tmp_path / "b"), offset=1), version="B",
                      drain_timeout_s=5.0)["model_version"] == "B"
    t0 = time.monotonic()
    while (seen := models()) != "B":
        assert time.monotonic() - t0 < 5 * api.state.settings.version_poll_s + 2.0, seen
        time.sleep(0.05)
    assert _value(_metrics(api.url), "graphserver_model_info", name="fake-batch", version="B") == 1.0


class _HeldLauncher(AttachLauncher):
    """Attaches only once `release` is set: the engine is "loading" until then."""

    def __init__(self, endpoint):
        super().__init__(endpoint)
        self.release = threading.Event()

    async def start(self):
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return await super().start()


def test_health_is_503_while_the_engine_loads(tok_dir):
    with FakeBatchEngine(tok_dir) as engine:
        launcher = _HeldLauncher(engine.endpoint)
        api = ApiThread(engine.endpoint, launcher=launcher, wait=False)
        try:
            r = httpx.get(api.url + "/health")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = httpx.post(api.url + "/v1/completions", json={"prompt": "x"})
            assert r.status_code == 503 and _error(r)["code"] == "engine_loading" and "retry-after" in r.headers
            launcher.release.set()
            assert api.ready.wait(START_TIMEOUT_S)
            assert httpx.get(api.url + "/health").status_code == 200
        finally:
            api.stop()
