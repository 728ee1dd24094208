"""`graphserver serve` on the GPU engine (default model, bf16, --batch-invariant): a weights reload
under 32 concurrent streams, the issue's target size, fails none, and each response's text is the
one its version header's checkpoint gives alone. Batch invariance is what lets a stream that ran
beside 31 others be compared with the same request run alone. Marked cuda."""

import concurrent.futures
import sys
import time

import httpx
import openai
import pytest

from checkpoints import misshaped_copy, perturbed_copy
from rpc_helpers import served_api

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

STREAMS = 32
SERVE = [sys.executable, "-m", "graphserver.cli", "serve", "--port", "0", "--exit-with-parent",
         "--", "--device", "cuda", "--batch-invariant", "--max-num-seqs", "64"]


@pytest.fixture(scope="module")
def api(default_model_dir):
    from custom_kernels import ops
    if not ops.cuda_kernels_available():
        pytest.skip("needs the compiled kernels")
    with served_api(SERVE) as api:
        yield api


def test_reload_under_32_streams_on_the_gpu(api, default_model_dir, tmp_path):
    url, model = api
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120.0)
    prompts = [f"Story number {i}: once upon a time" for i in range(4)]  # a few distinct texts
    n = 48
    ckpt_b = perturbed_copy(default_model_dir, tmp_path / "b", seed=int(time.time()))

    def one_stream(prompt):
        with client.completions.with_streaming_response.create(
                model=model, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                extra_body={"ignore_eos": True}) as resp:
            version = resp.headers["x-model-version"]
            return prompt, version, "".join(c.choices[0].text for c in resp.parse())

    def alone(version):
        """Each prompt's text with the server otherwise idle, checking the version it ran on."""
        out = {}
        for p in prompts:
            _, v, text = one_stream(p)
            assert v == version, (v, version)
            out[p] = text
        return out

    def reload(path, version):
        t0 = time.perf_counter()
        r = httpx.post(url + "/reload", json={"path": str(path), "version": version}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == version == r.headers["x-model-version"]
        return time.perf_counter() - t0

    want = {"0": alone("0")}
    results, reload_s = [], []
    with concurrent.futures.ThreadPoolExecutor(STREAMS + 8) as pool:
        for target, version in ((ckpt_b, "B"), (default_model_dir, "A")):
            streams = [pool.submit(one_stream, prompts[i % len(prompts)]) for i in range(STREAMS)]
            time.sleep(0.1)  # let the streams reach the engine before the reload does
            pending = pool.submit(reload, target, version)
            # Sent while it reloads: on the old weights before admission pauses, else on the new.
            streams += [pool.submit(one_stream, prompts[i % len(prompts)]) for i in range(4)]
            reload_s.append(pending.result())
            streams += [pool.submit(one_stream, prompts[i % len(prompts)]) for i in range(4)]
            results += [f.result() for f in streams]  # raises if any request failed
            want[version] = alone(version)
    assert want["A"] == want["0"], "reloading the original weights must give the original text"
    assert want["B"] != want["A"], "the perturbed checkpoint must change the greedy text"
    versions = [v for _, v, _ in results]
    assert {"0", "B", "A"} <= set(versions), versions
    for prompt, version, text in results:
        assert text == want[version][prompt], (version, prompt, text, want[version][prompt])
    print(f"reload under {STREAMS} streams: {len(results)} requests, 0 failed; versions "
          f"{ {v: versions.count(v) for v in sorted(set(versions))} }; reload wall "
          f"{', '.join(f'{s:.2f}' for s in reload_s)} s")

    # A bad checkpoint: a clear 400, and the weights that serve stay those of "A".
    bad = misshaped_copy(default_model_dir, tmp_path / "bad")
    r = httpx.post(url + "/reload", json={"path": str(bad), "version": "C"}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_checkpoint", r.text
    assert one_stream(prompts[0])[1:] == ("A", want["A"][prompts[0]])
