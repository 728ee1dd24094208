"""scripts/fake_trainer.py and the local topology's nginx front (deploy/local/), against stand-in
replicas: small HTTP servers with the front end's routes (/generate, /v1/completions streamed,
/reload, /health, X-Model-Version), so these tests need no model and take seconds. The same
topology on the real `graphserver serve` is tests/test_deploy_local.py.

This file is also the stand-in's program: `python tests/test_deploy_trainer.py --standin ...`.
"""
from __future__ import annotations

import argparse
import http.server
import json
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "scripts", ROOT / "deploy" / "local"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

TRAINER = ROOT / "scripts" / "fake_trainer.py"


# ---------------------------------------------------------------------------------------------
# The stand-in replica


def standin_pieces(prompt: str, version: str, max_tokens: int) -> list[str]:
    """What a stand-in 'generates': a function of (prompt, version) only, like greedy decoding
    of one checkpoint."""
    h = zlib.crc32(f"{version}|{prompt}".encode())
    return [f" {version}.{(h >> i) % 1000}" for i in range(max_tokens)]


class _Standin:
    def __init__(self, version: str, token_delay: float, reload_s: float, events: Path):
        self.version = version
        self.token_delay = token_delay
        self.reload_s = reload_s
        self.events = events
        self.cond = threading.Condition()
        self.reloading = False
        self.in_flight = 0
        self.port = 0

    def event(self, **fields) -> None:
        line = json.dumps({"t": time.time(), "port": self.port, **fields}) + "\n"
        with open(self.events, "a") as f:
            f.write(line)

    def admit(self) -> str:
        """Like the engine: new requests wait while a reload runs, then take the version."""
        with self.cond:
            while self.reloading:
                self.cond.wait()
            self.in_flight += 1
            return self.version

    def done(self) -> None:
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def reload(self, path: str, version: str) -> dict:
        with self.cond:
            self.reloading = True
            self.event(kind="reload_start", version=version)
            t0 = time.monotonic()
            while self.in_flight:  # drain
                self.cond.wait()
            drain_ms = (time.monotonic() - t0) * 1e3
        time.sleep(self.reload_s)
        with self.cond:
            previous, self.version = self.version, version
            self.reloading = False
            self.cond.notify_all()
            self.event(kind="reload_end", version=version)
        return {"model_version": version, "previous_version": previous, "drain_ms": drain_ms,
                "copy_ms": self.reload_s * 1e3}


def _handler(state: _Standin):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Model-Version", state.version)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(503 if state.reloading else 200,
                           {"status": "reloading" if state.reloading else "ok"})
            else:
                self.reply(404, {"error": "no such route"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/reload":
                if not list(Path(body["path"]).glob("*.safetensors")):
                    self.reply(400, {"error": {"message": "no safetensors"}})
                    return
                self.reply(200, state.reload(body["path"], body["version"]))
                return
            allowed = {"/generate": {"prompt", "max_tokens", "temperature"},
                       "/v1/completions": {"prompt", "max_tokens", "temperature", "stream"}}
            if self.path not in allowed or set(body) - allowed[self.path]:
                self.reply(400, {"error": {"message": f"bad request {self.path} {sorted(body)}"}})
                return
            version = state.admit()
            try:
                pieces = standin_pieces(body["prompt"], version, body["max_tokens"])
                if self.path == "/generate":
                    time.sleep(state.token_delay * len(pieces))
                    self.reply(200, {"text": "".join(pieces), "tokens": list(range(len(pieces))),
                                     "finish_reason": "length", "model_version": version})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("X-Model-Version", version)
                self.end_headers()
                events = [{"choices": [{"text": p, "finish_reason": None}]} for p in pieces]
                events[-1]["choices"][0]["finish_reason"] = "length"
                for ev in [json.dumps(e) for e in events] + ["[DONE]"]:
                    time.sleep(state.token_delay)
                    data = f"data: {ev}\n\n".encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            finally:
                state.done()

    return Handler


def standin_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--standin", action="store_true")
    p.add_argument("--version", default="v0")
    p.add_argument("--token-delay", type=float, default=0.01)
    p.add_argument("--reload-s", type=float, default=0.3)
    p.add_argument("--events", required=True)
    args = p.parse_args(argv)
    state = _Standin(args.version, args.token_delay, args.reload_s, Path(args.events))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    print(f"READY {state.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    standin_main(sys.argv[1:])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# Tests

import pytest  # noqa: E402  (after the stand-in's entry point, which needs none of it)
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import analysis  # noqa: E402  (deploy/local)
import fake_trainer  # noqa: E402  (scripts/)
import nginx as local_nginx  # noqa: E402  (deploy/local)
import procs  # noqa: E402  (deploy/local)


def _tiny_checkpoint(d: Path) -> Path:
    """A checkpoint-shaped directory: odd shapes, bf16 and fp32 tensors, an integer buffer, a
    config and a tokenizer file."""
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(1234)
    tensors = {
        "model.embed_tokens.weight": torch.randn(37, 11, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(13, 29, generator=g),
        "model.norm.weight": 1 + 0.1 * torch.randn(11, generator=g),
        "model.position_ids": torch.arange(7, dtype=torch.int64),
    }
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text('{"model_type": "llama"}\n')
    (d / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return d


def test_next_version():
    assert fake_trainer.next_version("v3") == "v4"
    assert fake_trainer.next_version("7") == "8"
    assert fake_trainer.next_version("v09") == "v10"
    assert fake_trainer.next_version("rc-2.19") == "rc-2.20"
    assert fake_trainer.next_version("base") == "base-1"


def test_derive_checkpoint_is_a_small_deterministic_perturbation(tmp_path):
    src = _tiny_checkpoint(tmp_path / "v0")
    a = tmp_path / "a" / "v1"
    b = tmp_path / "b" / "v1"
    info = fake_trainer.derive_checkpoint(src, a, "v1", 0.02, seed=5)
    assert info["tensors"] == 4 and not info["reused"]
    fake_trainer.derive_checkpoint(src, b, "v1", 0.02, seed=5)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a / "config.json").read_text() == (src / "config.json").read_text()
    assert (a / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    old, new = load_file(str(src / "model.safetensors")), load_file(str(a / "model.safetensors"))
    assert old.keys() == new.keys()
    for name, w in old.items():
        assert new[name].dtype == w.dtype and new[name].shape == w.shape, name
        if not w.is_floating_point():
            assert torch.equal(new[name], w), name
            continue
        rel = ((new[name].float() - w.float()).std() / w.float().std()).item()
        assert 0.01 < rel < 0.04, (name, rel)  # about scale=0.02 of the tensor's spread
    fake_trainer.derive_checkpoint(src, tmp_path / "c" / "v1", "v1", 0.02, seed=6)
    fake_trainer.derive_checkpoint(src, tmp_path / "d" / "v2", "v2", 0.02, seed=5)
    for other in (tmp_path / "c" / "v1", tmp_path / "d" / "v2"):  # another seed, version
        to = load_file(str(other / "model.safetensors"))
        assert not torch.equal(to["model.layers.0.mlp.down_proj.weight"],
                               ta["model.layers.0.mlp.down_proj.weight"])
    # A rerun with the same recipe reuses the directory; a different one refuses to touch it.
    assert fake_trainer.derive_checkpoint(src, a, "v1", 0.02, seed=5)["reused"]
    with pytest.raises(fake_trainer.UsageError, match="not derived the same way"):
        fake_trainer.derive_checkpoint(src, a, "v1", 0.05, seed=5)
    # The recipe file is not inherited by the next version's directory.
    fake_trainer.derive_checkpoint(a, tmp_path / "v2", "v2", 0.02, seed=5)
    recipe = json.loads((tmp_path / "v2" / fake_trainer.RECIPE_FILE).read_text())
    assert recipe["derived_from"] == str(a.resolve()) and recipe["version"] == "v2"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(fake_trainer.UsageError, match="no \\*.safetensors"):
        fake_trainer.derive_checkpoint(empty, tmp_path / "x", "v1", 0.02, seed=5)
    assert not list(tmp_path.glob("**/.*partial*"))


def _trainer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAINER), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_help_shows_defaults():
    r = _trainer("--help")
    assert r.returncode == 0
    for text in ("--interval", "(default: 20)", "--versions", "(default: 3)", "--clients",
                 "(default: 4)", "--max-tokens", "(default: 8)", "X-Upstream-Addr"):
        assert text in r.stdout, text


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "x"], "the following arguments are required: --base-url"),
    (["--base-url", "http://127.0.0.1:1", "--checkpoint", "x"], "needs --replica"),
    (["--base-url", "ftp://x", "--checkpoint", "x", "--replica", "http://127.0.0.1:1"],
     "not an http(s) URL"),
    (["--base-url", "http://127.0.0.1:1", "--checkpoint", "x", "--replica", "http://a:1",
      "--interval", "0"], "must be >= 0.1 s"),
    (["--base-url", "http://127.0.0.1:1", "--checkpoint", "x", "--replica", "http://a:1",
      "--clients", "two"], "not an integer"),
])
def test_usage_errors_are_one_line(args, message):
    r = _trainer(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_server_is_a_one_line_error(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "v0")
    port = procs.free_port()
    r = _trainer("--base-url", f"http://127.0.0.1:{port}", "--replica",
                 f"http://127.0.0.1:{port}", "--checkpoint", str(ckpt), "--wait-ready", "0.5",
                 "--quiet")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not 200 within --wait-ready" in lines[0], r.stderr


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lasts until its new parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_supervisor_stops_a_process_and_the_children_it_left(tmp_path):
    sup = procs.Supervisor(tmp_path)
    # A leader that starts a long-lived child, says so, and ignores SIGTERM itself.
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
            "print('READY', c.pid, flush=True); time.sleep(120)")
    proc = sup.start("leader", [sys.executable, "-c", code], stdout_pipe=True)
    child = int(sup.wait_line(proc, "READY ", 30))
    assert _running(child)
    t0 = time.monotonic()
    codes = sup.stop_all(grace=1)
    assert codes == {"leader": -9} and time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while _running(child):  # the child is not ours to reap: wait for it to end
        assert time.monotonic() < deadline, "the child outlived stop_all"
        time.sleep(0.05)
    assert "[stdout] READY" in (tmp_path / "leader.log").read_text()


# -- topology fixtures


@pytest.fixture
def sup(tmp_path):
    s = procs.Supervisor(tmp_path)
    yield s
    s.stop_all(grace=5)


def _start_standin(sup: procs.Supervisor, name: str, events: Path, token_delay: float,
                   reload_s: float = 0.3) -> str:
    proc = sup.start(name, [sys.executable, __file__, "--standin", "--events", str(events),
                            "--token-delay", str(token_delay), "--reload-s", str(reload_s)],
                     stdout_pipe=True)
    return f"127.0.0.1:{sup.wait_line(proc, 'READY ', 30)}"


def _start_nginx(sup: procs.Supervisor, run_dir: Path, upstreams: list[str]) -> str:
    try:
        binary = local_nginx.find_nginx(None)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    port = procs.free_port()
    conf = local_nginx.write_config(run_dir, port, upstreams)
    proc = sup.start("nginx", local_nginx.command(binary, run_dir, conf))
    sup.wait_http(proc, "127.0.0.1", port, "/health", 30)
    return f"http://127.0.0.1:{port}"


def test_rollout_through_nginx_loses_nothing_and_goes_one_replica_at_a_time(tmp_path, sup):
    events = tmp_path / "standin_events.jsonl"
    replicas = {f"r{i}": _start_standin(sup, f"standin{i}", events, token_delay=0.01)
                for i in (1, 2)}
    base = _start_nginx(sup, tmp_path, list(replicas.values()))
    ckpt = _tiny_checkpoint(tmp_path / "ckpt" / "v0")
    report_path = tmp_path / "report.json"
    r = _trainer("--base-url", base, *[a for u in replicas.values()
                                       for a in ("--replica", f"http://{u}")],
                 "--checkpoint", str(ckpt), "--out-dir", str(tmp_path / "ckpt"),
                 "--versions", "2", "--interval", "2", "--settle", "1", "--clients", "3",
                 "--max-tokens", "4", "--report", str(report_path), "--quiet")
    assert r.returncode == 0, r.stderr
    report = json.loads(report_path.read_text())
    entries = local_nginx.read_access_log(tmp_path / "nginx_access.log")
    checks = analysis.rollout_checks(report, entries, replicas)
    assert all(c["ok"] for c in checks.values()), checks
    assert report["requests"]["sent"] > 20
    # The replicas' own record: reloads never overlapped, each got both versions in order.
    ev = analysis.read_jsonl(events)
    spans = sorted((a["t"], b["t"]) for a, b in zip(ev[::2], ev[1::2]))
    assert len(spans) == 4 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert [e["version"] for e in ev if e["kind"] == "reload_end"] == ["v1", "v1", "v2", "v2"]
    # The versions seen by the traffic, and the probes: what each version alone produces.
    assert set(report["requests"]["by_version"]) == {"v0", "v1", "v2"}
    probed = {(p["expected_version"], p["prompt"]): p for p in report["probes"]}
    assert len(probed) == 3 * len(fake_trainer.DEFAULT_PROMPTS)
    for (version, prompt), probe in probed.items():
        assert probe["error"] is None and probe["version"] == version
        assert probe["text"] == "".join(standin_pieces(prompt, version, 4))
    for version, texts in report["greedy_texts"].items():
        for prompt, text in texts.items():
            assert text == "".join(standin_pieces(prompt, version, 4)), (version, prompt)
    assert {Path(v["path"]).name for v in report["versions"]} == {"v1", "v2"}
    assert all((Path(v["path"]) / "model.safetensors").exists() for v in report["versions"])


def test_killed_replica_fails_only_its_in_flight_requests(tmp_path, sup):
    events = tmp_path / "standin_events.jsonl"
    replicas = {f"r{i}": _start_standin(sup, f"standin{i}", events, token_delay=0.08)
                for i in (1, 2)}
    base = _start_nginx(sup, tmp_path, list(replicas.values()))
    ckpt = _tiny_checkpoint(tmp_path / "v0")
    report_path, log_path = tmp_path / "report.json", tmp_path / "requests.jsonl"
    trainer = sup.start("trainer", [
        sys.executable, str(TRAINER), "--base-url", base, "--checkpoint", str(ckpt),
        "--versions", "0", "--duration", "4", "--clients", "4", "--max-tokens", "6",
        "--no-probe", "--report", str(report_path), "--requests-log", str(log_path)])
    deadline = time.monotonic() + 30
    while not log_path.exists() or len(log_path.read_text().splitlines()) < 8:
        assert time.monotonic() < deadline and trainer.alive(), procs.log_tail(trainer.log_path)
        time.sleep(0.1)
    victim = next(p for p in sup.procs if p.name == "standin2")
    kill_epoch = time.time()
    sup.kill(victim)
    assert sup.stop(trainer, grace=60, sig=None) == 1  # exit 1: some requests failed
    report = json.loads(report_path.read_text())
    records = analysis.read_jsonl(log_path)
    entries = local_nginx.read_access_log(tmp_path / "nginx_access.log")
    checks = analysis.kill_checks(report, records, entries, replicas["r2"], replicas["r1"],
                                  kill_epoch)
    assert all(c["ok"] for c in checks.values()), checks
    # 4 streaming clients over 2 replicas, ~0.5 s per request: some were on the victim.
    assert 1 <= report["requests"]["failed"] <= 4, report["failures"]


class _FakeApiServer(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *args) -> None:
        pass

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"),
                          "type": self.headers.get("Content-Type"), "body": body})
        data = b'{"kind": "ConfigMap"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_configmap_is_patched_after_each_roll(tmp_path, sup):
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeApiServer)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    try:
        replica = _start_standin(sup, "standin1", tmp_path / "events.jsonl", token_delay=0.0)
        ckpt = _tiny_checkpoint(tmp_path / "v0")
        token = tmp_path / "token"
        token.write_text("sekrit-for-test\n")
        r = _trainer("--base-url", f"http://{replica}", "--replica", f"http://{replica}",
                     "--checkpoint", str(ckpt), "--versions", "2", "--interval", "0.5",
                     "--settle", "0", "--clients", "1", "--max-tokens", "2", "--no-probe",
                     "--configmap", "graphserver-model", "--namespace", "serving",
                     "--kube-api", f"http://127.0.0.1:{api.server_address[1]}",
                     "--kube-token-file", str(token), "--report", str(tmp_path / "r.json"),
                     "--quiet")
    finally:
        api.shutdown()
    assert r.returncode == 0, r.stderr
    assert [s["body"]["data"]["model_version"] for s in _FakeApiServer.seen] == ["v1", "v2"]
    for s, name in zip(_FakeApiServer.seen, ("v1", "v2")):
        assert s["path"] == "/api/v1/namespaces/serving/configmaps/graphserver-model"
        assert s["auth"] == "Bearer sekrit-for-test"
        assert s["type"] == "application/merge-patch+json"
        assert s["body"]["data"]["model_path"] == str(tmp_path / name)
