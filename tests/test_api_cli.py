"""`graphserver serve` as a process: the READY line, attaching to an engine, clean exits, and
one-line errors with exit code 2 for command-line mistakes."""

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from client.rpc import spawn_process
from fake_batch_engine import FakeBatchEngine
from graphserver import cli

from rpc_helpers import child_env

SERVE = [sys.executable, "-m", "graphserver.cli", "serve"]


def _run(args, timeout=60):
    return subprocess.run(SERVE + args, capture_output=True, text=True, timeout=timeout, env=child_env(),
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--engine-endpoint", "ipc:///nonexistent", "--model", "x"], "--engine-endpoint attaches"),
    (["--engine-endpoint", "ipc:///no/such/engine.sock"], "no engine socket there"),
    (["--model", "/no/such/model/dir"], "no such directory"),
    (["--tokenizer", "/no/such/dir", "--engine-endpoint", "tcp://127.0.0.1:1"], "no tokenizer.json"),
    (["--engine-endpoint", "tcp://127.0.0.1:1", "--engine-timeout", "0"], "--engine-timeout must be > 0"),
    (["--engine-endpoint", "tcp://127.0.0.1:1", "--tp", "2"], "--engine-endpoint attaches"),
    (["--tp", "2", "--", "--device", "cpu", "--tp=3"], "--tp is given twice"),
])
def test_command_line_mistakes_exit_2_with_one_line(args, message):
    r = _run(args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


def test_tp_goes_to_the_started_engine():
    from graphserver.api.server import parse_args

    args, engine_args = parse_args(["--model", "random:tiny", "--tp", "2", "--", "--device", "cpu"])
    assert engine_args == ["--device", "cpu", "--tp", "2"]
    assert parse_args(["--model", "random:tiny"])[1] == []


def test_port_in_use_exits_2():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        r = _run(["--engine-endpoint", "tcp://127.0.0.1:1", "--port", str(busy.getsockname()[1])])
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr


def test_unreachable_engine_fails_with_one_clear_line():
    r = _run(["--engine-endpoint", "tcp://127.0.0.1:1", "--port", "0", "--engine-timeout", "1"])
    assert r.returncode == 1
    assert "engine start failed: RPCTimeout" in r.stderr and r.stdout == ""


def test_serve_attaches_prints_ready_and_stops_on_sigterm(default_model_dir):
    with FakeBatchEngine(str(default_model_dir)) as engine:
        proc, url = spawn_process(SERVE + ["--engine-endpoint", engine.endpoint, "--port", "0", "--exit-with-parent",
                                           "--served-model-name", "named"], timeout_s=60, env=child_env())
        try:
            assert url.startswith("http://127.0.0.1:")
            r = httpx.get(url + "/health", timeout=10)
            assert r.status_code == 200 and r.headers["x-model-version"] == "0"
            r = httpx.post(url + "/v1/completions", json={"model": "named", "prompt": "hi", "max_tokens": 3},
                           timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        # Attached, not owned: the engine still serves.
        assert engine._thread.is_alive()


def test_other_subcommands_go_to_the_engine_cli(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--engine-endpoint" not in out


def test_bench_serve_smoke_writes_a_record(default_model_dir, tmp_path):
    import json

    from rpc_helpers import REPO_ROOT

    with FakeBatchEngine(str(default_model_dir), step_s=0.002) as engine:
        r = subprocess.run([sys.executable, "scripts/bench_serve.py", "--smoke", "--engine-endpoint", engine.endpoint,
                            "--out-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                           env=child_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    [path] = tmp_path.glob("serve_*.json")
    record = json.loads(path.read_text())
    assert record["device"] == "cpu" and record["commit"] and record["date"] and record["smoke"] is True
    assert record["client_procs"] == 2 and record["api_servers"] == 1 and record["rounds"] == 2
    assert [lv["concurrency"] for lv in record["levels"]] == [1, 4]
    for lv in record["levels"]:
        for side in ("http", "engine"):
            s = lv[side]
            assert s["tokens"] == lv["concurrency"] * 2 * 8 and s["requests"] == lv["concurrency"] * 2
            assert s["output_tok_s"] > 0 and s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p99"] >= s["itl_ms"]["p50"]
            assert s["client_procs"] == min(lv["concurrency"], 2) and s["client_cpu_us_per_token"] > 0
        assert lv["ratio"] == pytest.approx(lv["http"]["output_tok_s"] / lv["engine"]["output_tok_s"], rel=1e-2)
        # Two turns a side (ABBA), one request per client each; the pooled rate lies between them.
        assert len(lv["rounds_tok_s"]) == 2
        for side in ("http", "engine"):
            rates = [r[side] for r in lv["rounds_tok_s"]]
            assert min(rates) * 0.99 <= lv[side]["output_tok_s"] <= max(rates) * 1.01, (side, rates, lv[side])
        # The engine's own counters per turn, in turn order: the stand-in steps once per token row.
        assert [t["side"] for t in lv["engine_turns"]] == ["http", "engine", "engine", "http"]
        for t in lv["engine_turns"]:
            assert t["steps"] > 0 and t["generation_tokens"] >= lv["concurrency"] * 8, t
            assert t["step_ms_mean"] > 0 and 1 <= t["rows_per_step"] <= lv["concurrency"], t
        # The started front end's own CPU (in clock ticks of 10 ms: a smoke run may count none).
        assert lv["http"]["frontend_cpu_us_per_token"] is not None and lv["http"]["frontend_cpu_us_per_token"] >= 0
    # --plot draws a record's PNG later (the GPU machine has no matplotlib), or says what it needs.
    png = path.with_suffix(".png")
    png.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "scripts/bench_serve.py", "--plot", str(path)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120, env=child_env(), stdin=subprocess.DEVNULL)
    if importlib.util.find_spec("matplotlib") is not None:
        assert r.returncode == 0 and png.stat().st_size > 1000, r.stderr[-2000:]
    else:
        assert r.returncode == 2 and "needs matplotlib" in r.stderr and not png.exists()
    bad = tmp_path / "not_a_record.json"
    bad.write_text('{"kind": "decode"}')
    r = subprocess.run([sys.executable, "scripts/bench_serve.py", "--plot", str(bad)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120, env=child_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "is not a serve record" in r.stderr and "Traceback" not in r.stderr


def test_accepted_connections_have_nagle_off():
    """Each SSE event is a small write right after another; with Nagle on, a keep-alive client's
    delayed ACK held every stream's first event back ~40 ms (seen in bench_serve: TTFT 43 ms
    through HTTP against 0.7 ms straight to the engine)."""
    import socket

    from graphserver.api.server import listen

    srv = listen("127.0.0.1", 0)
    try:
        assert srv.proto == socket.IPPROTO_TCP          # asyncio sets TCP_NODELAY only then
        client = socket.create_connection(srv.getsockname()[:2])
        conn, _ = srv.accept()
        try:
            assert conn.proto == socket.IPPROTO_TCP
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            conn.close()
            client.close()
    finally:
        srv.close()


def test_bench_serve_random_model_needs_a_fitting_tokenizer(default_model_dir, tmp_path):
    """A random:<shape> engine has no tokenizer: bench_serve says so in one line before it starts
    the HTTP server; a tokenizer whose ids pass the model's vocab is refused the same way."""
    from rpc_helpers import REPO_ROOT

    def bench(*extra):
        return subprocess.run([sys.executable, "scripts/bench_serve.py", "--smoke", "--model", "random:tiny",
                               "--out-dir", str(tmp_path), *extra], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120, env=child_env(), stdin=subprocess.DEVNULL)

    cases = [((), 1, "has no tokenizer; pass --tokenizer DIR"),
             (("--tokenizer", str(default_model_dir)), 1, "past the model's vocab of 512"),  # SmolLM2's ids
             (("--tokenizer", str(tmp_path)), 2, "no tokenizer.json there")]
    for extra, rc, message in cases:
        r = bench(*extra)
        assert r.returncode == rc and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.glob("serve_*.json"))



def _children(pid):
    """Live child pids of `pid` (whichever of its threads started them)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[1] == str(pid):
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_api_servers_share_the_port_and_the_metrics(default_model_dir):
    """--api-servers 2: a second front-end process serves the same port, attached to the same engine.
    With the first one stopped (SIGSTOP) requests still get answers, so the second one serves; a
    scrape of either counts both processes' requests; SIGTERM ends both."""
    from prometheus_client.parser import text_string_to_metric_families

    with FakeBatchEngine(str(default_model_dir), step_s=0.002) as engine:
        proc, url = spawn_process(SERVE + ["--engine-endpoint", engine.endpoint, "--port", "0", "--exit-with-parent",
                                           "--api-servers", "2", "--log-level", "WARNING"],
                                  timeout_s=90, env=child_env())
        extra = _children(proc.pid)
        try:
            assert len(extra) == 1, extra

            def complete():
                with httpx.Client(timeout=30) as c:  # a fresh connection: either process may take it
                    r = c.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 6, "ignore_eos": True})
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            first = complete()
            proc.send_signal(signal.SIGSTOP)
            try:
                alone = [complete() for _ in range(5)]  # only the extra process can accept now
            finally:
                proc.send_signal(signal.SIGCONT)
            assert first and alone == [first] * 5  # greedy: the same text from either process
            assert sum(method == "generate" for method, _ in engine.calls) == 6
            for _ in range(4):  # whichever process answers the scrape, it counts all six requests
                text = httpx.get(url + "/metrics", timeout=10).text
                families = {f.name: f for f in text_string_to_metric_families(text)}
                done = [s.value for s in families["graphserver_requests"].samples if s.name.endswith("_total")]
                tokens = [s.value for s in families["graphserver_generation_tokens"].samples
                          if s.name.endswith("_total")]
                assert done == [6.0] and tokens == [36.0], text
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{extra[0]}") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not os.path.exists(f"/proc/{extra[0]}"), "the extra front-end process outlived the first"
        finally:
            for pid in extra:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
