"""`graphserver serve` on the real engine and the default model (CPU, fp32), through the official
`openai` client: greedy text equal to HF transformers' greedy, streaming, stops, metrics, a
disconnect that frees its KV blocks, and weights hot reload under load."""

import concurrent.futures
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from checkpoints import misshaped_copy, perturbed_copy
from rpc_helpers import served_api

pytestmark = pytest.mark.slow

# Small arena and context: the CPU test machine is shared. fp32 so greedy matches HF's fp32 exactly.
ENGINE_ARGS = ["--device", "cpu", "--dtype", "fp32", "--max-len", "512", "--kv-blocks", "192"]
SERVE = [sys.executable, "-m", "graphserver.cli", "serve", "--port", "0", "--exit-with-parent"]


@pytest.fixture(scope="module")
def api(default_model_dir):
    with served_api(SERVE + ["--"] + ENGINE_ARGS) as api:
        yield api


@pytest.fixture(scope="module")
def hf(default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from client.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    return model, load_tokenizer(str(default_model_dir))


def hf_greedy(hf, prompt_ids, n):
    """HF's greedy continuation (stopping at EOS, as the server does), as (text, finish_reason)."""
    import torch

    model, tok = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    if tok.eos_token_id in new:
        return tok.decode(new[:new.index(tok.eos_token_id)], skip_special_tokens=True), "stop"
    return tok.decode(new, skip_special_tokens=True), "length"


def client_of(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120.0)


def metrics(url):
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_chat_greedy_equals_hf_streaming_or_not(api, hf):
    from client.tokenizer import encode_chat

    url, model = api
    question = "What is the capital of France?"
    want, reason = hf_greedy(hf, encode_chat(hf[1], question), 20)
    client = client_of(url)
    kw = dict(model=model, messages=[{"role": "user", "content": question}], max_tokens=20, temperature=0)
    raw = client.chat.completions.with_raw_response.create(**kw)
    out = raw.parse()
    assert raw.headers["x-model-version"] == "0"
    assert out.choices[0].message.content == want and out.choices[0].finish_reason == reason
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert out.usage.prompt_tokens == len(encode_chat(hf[1], question))


def test_completion_greedy_equals_hf_then_stop_and_length(api, hf):
    from client.tokenizer import encode_plain

    url, model = api
    prompt = "The three primary colours are"
    want, _ = hf_greedy(hf, encode_plain(hf[1], prompt), 16)
    client = client_of(url)
    out = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    assert out.choices[0].text == want
    # A stop string from the middle of that text: cut before it, finish_reason "stop".
    stop = want[len(want) // 2: len(want) // 2 + 4]
    assert len(want) > 8 and stop.strip(), want
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want[:want.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    assert want.startswith(out.choices[0].text)


def test_bad_inputs_on_the_real_server(api):
    url, model = api
    msgs = [{"role": "user", "content": "hi"}]
    for body, status, param in ((b"{", 400, None), ({"messages": msgs, "n": 2}, 400, "n"),
                                ({"messages": msgs, "max_tokens": 600}, 400, "max_tokens"),
                                ({"messages": msgs, "temperature": -1}, 400, "temperature"),
                                ({"messages": msgs, "model": "other"}, 404, "model")):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(url + "/v1/chat/completions", timeout=30, **kw)
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_move(api):
    url, model = api
    before = metrics(url)
    client_of(url).completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0)
    after = metrics(url)
    key = ("graphserver_generation_tokens_total", ())
    assert after[key] - before.get(key, 0.0) == 4
    assert after[("graphserver_time_to_first_token_seconds_count", ())] > before.get(
        ("graphserver_time_to_first_token_seconds_count", ()), 0.0)
    assert after[("graphserver_engine_generation_tokens_total", ())] >= before.get(
        ("graphserver_engine_generation_tokens_total", ()), 0.0) + 4
    assert ("graphserver_kv_cache_usage_ratio", ()) in after and ("graphserver_requests_running", ()) in after


def test_disconnect_mid_stream_frees_blocks(api):
    url, model = api
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert [line for line in (next(lines) for _ in range(4)) if line.startswith("data: ")]
        m = metrics(url)
        assert m[("graphserver_requests_running", ())] == 1 and m[("graphserver_kv_blocks_used", ())] > 0
    deadline = time.monotonic() + 10
    while True:
        m = metrics(url)
        if m[("graphserver_requests_running", ())] == 0 and m[("graphserver_kv_blocks_used", ())] == 0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)
    assert m[("graphserver_engine_aborted_total", ())] >= 1


def test_reload_under_load_and_back(api, default_model_dir, tmp_path):
    url, model = api
    client = client_of(url)
    prompt, n = "Once upon a time", 10
    ckpt_b = perturbed_copy(default_model_dir, tmp_path / "b", seed=int(time.time()))

    def one_stream():
        with client.completions.with_streaming_response.create(
                model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) as resp:
            version = resp.headers["x-model-version"]
            return version, "".join(c.choices[0].text for c in resp.parse())

    def reload(path, version):
        r = httpx.post(url + "/reload", json={"path": str(path), "version": version}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == version == r.headers["x-model-version"]

    want = {}
    v0, want["0"] = one_stream()
    assert v0 == "0"
    results, health = [], []
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for target, version in ((ckpt_b, "B"), (default_model_dir, "A")):
            streams = [pool.submit(one_stream) for _ in range(8)]
            time.sleep(0.3)
            pending = pool.submit(reload, target, version)
            while not pending.done() and 503 not in health:  # /health says 503 while it reloads
                health.append(httpx.get(url + "/health", timeout=30).status_code)
                time.sleep(0.02)
            # Sent during the reload: before admission pauses they run on the old weights, after
            # it they wait for the new ones; either way they must not fail.
            streams += [pool.submit(one_stream) for _ in range(2)]
            pending.result()
            streams += [pool.submit(one_stream) for _ in range(2)]  # certainly on the new weights
            results += [f.result() for f in streams]  # raises if any request failed
            v, want[version] = one_stream()  # the checkpoint alone
            assert v == version
    assert want["A"] == want["0"] and want["B"] != want["A"], want
    assert 503 in health
    for version, text in results:
        assert text == want[version], (version, text, want)
    assert {"B", "A"} <= {v for v, _ in results}

    # A checkpoint with a misshaped tensor: a clear 400, and the old weights keep serving.
    bad = misshaped_copy(default_model_dir, tmp_path / "bad")
    r = httpx.post(url + "/reload", json={"path": str(bad), "version": "C"}, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_checkpoint" and r.headers["x-model-version"] == "A"
    assert one_stream() == ("A", want["A"])
