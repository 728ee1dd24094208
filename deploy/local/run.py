#!/usr/bin/env python3
"""The deploy/k8s topology on one machine, with its checks.

It starts:
  * two replicas, each `graphserver serve` on a free 127.0.0.1 port, each starting its own engine
    process (python -m graphserver; the CPU backend without a GPU);
  * nginx (the system's package), with a generated config bound to 127.0.0.1, as the Service:
    round robin over the replicas, passing a request on to the other replica when one cannot be
    reached (proxy_next_upstream), and a JSON access log naming the replica of every request;
  * scripts/fake_trainer.py: --clients streaming clients through nginx while it publishes
    --versions new weight versions and rolls /reload through the replicas one at a time.

Then, unless --no-kill, a second trainer run sends load only. One replica (front end and engine) is
SIGKILLed while it has requests in flight: nginx must route around it, and the only requests that
may fail are the ones that were in flight on it. Then the other replica's front end gets SIGTERM,
as the kubelet sends a pod's main process, while it has requests in flight: every one of them
must finish, and it must exit cleanly. Unless --no-oracle, each version's greedy
probes are compared with HF transformers' greedy generate on that checkpoint alone.

Everything it started is stopped by process group id when it ends or is interrupted
(SIGINT/SIGTERM). It prints a summary and writes summary.json, the logs, the trainer reports,
nginx's config and access log, and the checkpoints to --out.

Exit status: 0 when every check passed, 1 when one failed, 2 for usage errors.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

sys.path.insert(0, str(ROOT / "scripts"))

import analysis  # noqa: E402
import nginx  # noqa: E402
import procs  # noqa: E402
from fake_trainer import OneLineParser, bounded  # noqa: E402  (one CLI style for both)

TRAINER = ROOT / "scripts" / "fake_trainer.py"
INITIAL_VERSION = "v0"
IN_FLIGHT_METRIC = "graphserver_http_requests_in_flight"
# How long a SIGTERMed front end may take to drain and exit: its own graceful-shutdown window
# (graphserver.api.server.GRACEFUL_SHUTDOWN_S) plus stopping its engine, well inside the
# 45 s terminationGracePeriodSeconds of deploy/k8s/deployment.yaml.
DRAIN_GRACE_S = 30.0


class Interrupted(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="deploy/local/run.py", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", default=None,
                   help="HF checkpoint directory to start from (default: the embedded "
                        "SmolLM2-135M-Instruct, prepared on first use)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where logs, reports and checkpoints go (default: "
                        "output/deploy_local/<UTC time>)")
    p.add_argument("--versions", type=bounded(int, 1), default=3, metavar="N",
                   help="weight versions the trainer publishes (default: 3)")
    p.add_argument("--interval", type=bounded(float, 1), default=15.0, metavar="S",
                   help="seconds between versions (default: 15)")
    p.add_argument("--settle", type=bounded(float, 0), default=4.0, metavar="S",
                   help="seconds of load after the last roll (default: 4)")
    p.add_argument("--clients", type=bounded(int, 1), default=4, metavar="N",
                   help="concurrent streaming clients (default: 4)")
    p.add_argument("--max-tokens", type=bounded(int, 1), default=8, metavar="N",
                   help="max_tokens per request (default: 8)")
    p.add_argument("--scale", type=bounded(float, 0), default=0.02, metavar="F",
                   help="weight perturbation per version, a fraction of each tensor's standard "
                        "deviation (default: 0.02)")
    p.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                   help="then SIGKILL one replica under load (nginx must route around it), and "
                        "SIGTERM the other (it must drain its in-flight requests) (default: on)")
    p.add_argument("--kill-duration", type=bounded(float, 1), default=6.0, metavar="S",
                   help="seconds of load between the SIGKILL and the SIGTERM (default: 6)")
    p.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                   help="compare each version's greedy probes with HF transformers on that "
                        "checkpoint alone (default: on)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the derived checkpoint directories (a model's size each) under "
                        "--out (default: removed at the end)")
    p.add_argument("--device", default="auto",
                   help="the engines' --device: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--max-len", type=bounded(int, 16), default=512, metavar="N",
                   help="the engines' --max-len; small keeps the CPU KV arena small "
                        "(default: 512)")
    p.add_argument("--nginx", metavar="PATH", default=None,
                   help="the nginx binary (default: nginx on PATH, else /usr/sbin/nginx)")
    p.add_argument("--startup-timeout", type=bounded(float, 1), default=300.0, metavar="S",
                   help="seconds each replica may take to serve (default: 300)")
    return p


# ---------------------------------------------------------------------------------------------


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric_total(text: str, name: str) -> float:
    """Sum of a Prometheus text metric's samples (every label set)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{", 1)[0] == name:
                total += float(value)
    return total


class LocalRun:
    def __init__(self, args: argparse.Namespace, run_dir: Path, model: Path):
        self.args = args
        self.run_dir = run_dir
        self.model = model
        self.sup = procs.Supervisor(run_dir, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.replicas: dict[str, dict] = {}  # name -> {"proc", "addr", "url"}
        self.base_url = ""
        self.summary: dict[str, Any] = {"run_dir": str(run_dir), "model": str(model)}
        self.checks: dict[str, dict] = {}

    def say(self, msg: str) -> None:
        print(f"[local] {msg}", file=sys.stderr, flush=True)

    # -- topology

    def start_replicas(self) -> None:
        for name in ("replica1", "replica2"):
            argv = [sys.executable, "-m", "graphserver.cli", "serve", "--host", "127.0.0.1",
                    "--port", "0", "--model", str(self.model), "--exit-with-parent",
                    "--", "--device", self.args.device, "--max-len", str(self.args.max_len),
                    "--model-version", INITIAL_VERSION]
            proc = self.sup.start(name, argv, stdout_pipe=True)
            self.replicas[name] = {"proc": proc}
        for name, r in self.replicas.items():  # both load at once; wait for each
            url = self.sup.wait_line(r["proc"], "READY ", self.args.startup_timeout)
            r["url"] = url.rstrip("/")
            r["addr"] = url.split("://", 1)[1].rstrip("/")
            self.say(f"{name} serves at {url} (pid {r['proc'].pid})")

    def start_nginx(self) -> None:
        binary = nginx.find_nginx(self.args.nginx)
        port = procs.free_port()
        conf = nginx.write_config(self.run_dir, port,
                                  [r["addr"] for r in self.replicas.values()])
        proc = self.sup.start("nginx", nginx.command(binary, self.run_dir, conf))
        self.sup.wait_http(proc, "127.0.0.1", port, "/health", 30)
        self.base_url = f"http://127.0.0.1:{port}"
        self.say(f"nginx at {self.base_url} (pid {proc.pid}), config {conf}")

    def trainer_argv(self, tag: str, replicas: Sequence[str], *extra: str) -> list[str]:
        a = self.args
        argv = [sys.executable, str(TRAINER), "--base-url", self.base_url,
                "--checkpoint", str(self.model), "--initial-version", INITIAL_VERSION,
                "--out-dir", str(self.run_dir / "checkpoints"), "--clients", str(a.clients),
                "--max-tokens", str(a.max_tokens), "--scale", str(a.scale),
                "--report", str(self.run_dir / f"trainer_{tag}.json"),
                "--requests-log", str(self.run_dir / f"requests_{tag}.jsonl")]
        for name in replicas:
            argv += ["--replica", self.replicas[name]["url"]]
        return argv + list(extra)

    # -- phases

    def rollout(self) -> dict:
        a = self.args
        proc = self.sup.start("trainer_rollout", self.trainer_argv(
            "rollout", list(self.replicas), "--versions", str(a.versions),
            "--interval", str(a.interval), "--settle", str(a.settle)))
        timeout = a.versions * a.interval + a.settle + 600
        code = self.sup.stop(proc, grace=timeout, sig=None)
        report_path = self.run_dir / "trainer_rollout.json"
        if not report_path.exists():
            raise RuntimeError(f"the trainer wrote no report (exit {code}); last lines of "
                               f"{proc.log_path}:\n{procs.log_tail(proc.log_path)}")
        report = json.loads(report_path.read_text())
        metrics = {}
        for name, r in self.replicas.items():
            text = _get(f"{r['url']}/metrics")
            metrics[name] = metric_total(text, "graphserver_requests_total")
        entries = nginx.read_access_log(self.run_dir / "nginx_access.log")
        self.checks.update({f"rollout.{k}": v for k, v in analysis.rollout_checks(
            report, entries, {n: r["addr"] for n, r in self.replicas.items()}).items()})
        self.summary["rollout"] = {
            "trainer_exit": code, "requests": report["requests"],
            "served_by_replica": analysis.served_counts(entries),
            "replica_metrics_requests_total": metrics,
            "versions": [{k: v[k] for k in ("version", "path", "published_at")} |
                         {"roll_s": [round(ev["t_end"] - ev["t_start"], 2) for ev in v["roll"]]}
                         for v in report["versions"]],
            "final_versions": report["final_versions"],
        }
        self.say(f"rollout: {report['requests']['sent']} requests, "
                 f"{report['requests']['failed']} failed, final {report['final_versions']}")
        return report

    def wait_in_flight(self, name: str, trainer: procs.Proc, log_path: Path,
                       timeout: float) -> float:
        """Until `name` reports requests in flight (its /metrics) while the trainer's load runs,
        so a kill or SIGTERM then has something to cut or drain. Two are waited for (one could
        finish between this look and the signal), one accepted at the timeout. Returns the
        gauge's last value."""
        deadline = time.monotonic() + timeout
        value = 0.0
        while time.monotonic() < deadline and trainer.alive():
            done = len(log_path.read_text().splitlines()) if log_path.exists() else 0
            if done >= self.args.clients:
                value = metric_total(_get(f"{self.replicas[name]['url']}/metrics"),
                                     IN_FLIGHT_METRIC)
                if value >= min(2, self.args.clients):
                    return value
            time.sleep(0.05)
        while value < 1 and trainer.alive() and time.monotonic() < deadline + timeout:
            value = metric_total(_get(f"{self.replicas[name]['url']}/metrics"), IN_FLIGHT_METRIC)
            time.sleep(0.05)
        return value

    def failover(self) -> None:
        """SIGKILL replica2 under load (a crash), keep the load on replica1 for a while, then
        SIGTERM replica1's front end (a pod's shutdown) and stop the load."""
        a = self.args
        victim, survivor = "replica2", "replica1"
        log_path = self.run_dir / "requests_failover.jsonl"
        trainer = self.sup.start("trainer_failover", self.trainer_argv(
            "failover", [survivor], "--versions", "0", "--duration", str(a.kill_duration + 300),
            "--no-probe"))
        in_flight = self.wait_in_flight(victim, trainer, log_path, a.kill_duration)
        kill_epoch = time.time()
        self.sup.kill(self.replicas[victim]["proc"])
        self.say(f"SIGKILLed {victim} (process group {self.replicas[victim]['proc'].pid}) with "
                 f"{in_flight:g} requests in flight on it")
        time.sleep(a.kill_duration)  # the survivor alone takes the load
        drain_in_flight = self.wait_in_flight(survivor, trainer, log_path, a.kill_duration)
        term_epoch = time.time()
        survivor_proc = self.replicas[survivor]["proc"]
        self.sup.signal_leader(survivor_proc, signal.SIGTERM)
        self.sup.signal_leader(trainer, signal.SIGTERM)  # no new requests; in-flight ones finish
        self.say(f"SIGTERM to {survivor}'s front end (pid {survivor_proc.pid}) with "
                 f"{drain_in_flight:g} requests in flight on it")
        exited = self.sup.wait_exit(survivor_proc, DRAIN_GRACE_S)
        exit_s = time.time() - term_epoch
        survivor_code = self.sup.stop(survivor_proc, grace=1)
        code = self.sup.stop(trainer, grace=a.kill_duration + 300, sig=None)
        report = json.loads((self.run_dir / "trainer_failover.json").read_text())
        records = analysis.read_jsonl(log_path)
        entries = nginx.read_access_log(self.run_dir / "nginx_access.log")
        addr = {n: r["addr"] for n, r in self.replicas.items()}
        checks = analysis.kill_checks(report, records, entries, addr[victim], addr[survivor],
                                      kill_epoch, until_epoch=term_epoch)
        failed_at_kill = sum(1 for r in records if r["error"] is not None
                             and report["epoch0"] + r["t_start"] < term_epoch)
        checks["some_were_in_flight"] = {"ok": in_flight >= 1 and failed_at_kill >= 1,
                                        "detail": {"victim_in_flight_metric": in_flight,
                                                   "failed": failed_at_kill}}
        checks["every_response_has_version"] = {
            "ok": report["requests"]["missing_version_header"] == 0,
            "detail": {"missing": report["requests"]["missing_version_header"]}}
        self.checks.update({f"kill.{k}": v for k, v in checks.items()})
        drain = analysis.drain_checks(report, records, entries, addr[survivor], term_epoch,
                                      survivor_code if exited else None, exit_s, DRAIN_GRACE_S)
        self.checks.update({f"sigterm.{k}": v for k, v in drain.items()})
        after = [r for r in records if report["epoch0"] + r["t_start"] >= term_epoch]
        self.summary["failover"] = {
            "trainer_exit": code, "victim": victim, "survivor": survivor,
            "kill_at_s": round(kill_epoch - report["epoch0"], 3),
            "sigterm_at_s": round(term_epoch - report["epoch0"], 3),
            "requests": report["requests"],
            "failed_in_flight_on_victim": failed_at_kill,
            "failures": [{k: f[k] for k in ("id", "t_start", "t_end", "error")}
                         for f in report["failures"]],
            "survivor_exit": {"code": survivor_code, "seconds": round(exit_s, 2)},
            "started_after_sigterm": {"sent": len(after),
                                      "failed": sum(r["error"] is not None for r in after)},
        }
        self.say(f"failover: {failed_at_kill} requests failed, all in flight on {victim}; "
                 f"{survivor} drained and exited {survivor_code} in {exit_s:.1f}s")

    def oracle(self, report: dict) -> None:
        import oracle
        paths = {INITIAL_VERSION: self.model}
        paths.update({v["version"]: Path(v["path"]) for v in report["versions"]})
        by_version: dict[str, list[dict]] = {}
        for p in report["probes"]:
            by_version.setdefault(p["expected_version"], []).append(p)
        results, texts_per_version = {}, {}
        ok = bool(by_version) and set(by_version) == set(paths)
        for version, probes in sorted(by_version.items()):
            alone = oracle.greedy_alone(paths[version], [p["prompt"] for p in probes],
                                        self.args.max_tokens)
            rows = []
            for p in probes:
                want = alone[p["prompt"]]
                same = (p["error"] is None and p["version"] == version and
                        p.get("tokens") == want["tokens"] and p.get("text") == want["text"])
                ok = ok and same
                rows.append({"prompt": p["prompt"], "served": p.get("text"),
                             "alone": want["text"], "equal": same})
            results[version] = rows
            texts_per_version[version] = tuple(r["alone"] for r in rows)
        self.checks["oracle.probe_equals_checkpoint_alone"] = {"ok": ok, "detail": results}
        # The check means something only if the versions differ in what they produce.
        distinct = len(set(texts_per_version.values()))
        self.checks["oracle.versions_differ"] = {
            "ok": distinct == len(texts_per_version) > 1,
            "detail": {"versions": len(texts_per_version), "distinct_outputs": distinct}}
        # Every streamed reply of the load, not only the probes: its text must be what the
        # version its X-Model-Version header names produces alone. A reply made by other weights
        # than it names shows up here (and which version's text it has instead).
        alone_text = {(v, r["prompt"]): r["alone"] for v, rows in results.items() for r in rows}
        prompts = report_prompts(report)
        checked, wrong = 0, []
        for tag in ("rollout", "failover"):
            path = self.run_dir / f"requests_{tag}.jsonl"
            for rec in analysis.read_jsonl(path) if path.exists() else []:
                if rec["error"] is not None:
                    continue
                key = (rec["version"], prompts[rec["prompt"]])
                checked += 1
                if alone_text.get(key) != rec["text"]:
                    like = [v for (v, p), t in alone_text.items()
                            if p == key[1] and t == rec["text"]]
                    wrong.append({"id": rec["id"], "labelled": rec["version"], "text": rec["text"],
                                  "equals_alone_of": like, "t_start": rec["t_start"]})
        self.checks["oracle.every_reply_is_its_versions_output"] = {
            "ok": checked > 0 and not wrong,
            "detail": {"checked": checked, "mismatched": len(wrong), "first": wrong[:5]}}
        self.summary["oracle"] = {"probes": results, "mismatched_replies": wrong,
                                  "streamed_distinct_texts": report["greedy_distinct_texts"]}

    def execute(self) -> None:
        self.start_replicas()
        self.start_nginx()
        report = self.rollout()
        if self.args.kill:
            self.failover()
        codes = self.sup.stop_all()
        self.summary["exit_codes"] = codes
        if self.args.oracle:
            self.say("comparing each version's probes with the checkpoint alone (HF)")
            self.oracle(report)


def report_prompts(report: dict) -> list[str]:
    """The trainer's prompt list, in its order (records name prompts by index)."""
    return report["settings"]["prompts"]


def print_summary(summary: dict, checks: dict) -> None:
    print(f"\nlocal deployment run: {summary['run_dir']}")
    ro = summary.get("rollout")
    if ro:
        req = ro["requests"]
        print(f"  rollout: {req['sent']} requests sent, {req['failed']} failed; versions "
              f"{[v['version'] for v in ro['versions']]}; final {ro['final_versions']}")
        print(f"  served per replica (nginx log): {ro['served_by_replica']}")
    fo = summary.get("failover")
    if fo:
        print(f"  failover: {fo['victim']} SIGKILLed at {fo['kill_at_s']}s: "
              f"{fo['failed_in_flight_on_victim']} requests failed (in flight on it), the rest "
              f"went to {fo['survivor']}; SIGTERM to {fo['survivor']} at {fo['sigterm_at_s']}s: "
              f"it drained and exited {fo['survivor_exit']['code']} in "
              f"{fo['survivor_exit']['seconds']}s")
    width = max((len(k) for k in checks), default=0)
    for name, c in checks.items():
        detail = json.dumps(c["detail"])
        if len(detail) > 110:
            detail = detail[:107] + "..."
        print(f"  {'PASS' if c['ok'] else 'FAIL'}  {name:<{width}}  {detail}")
    passed = sum(c["ok"] for c in checks.values())
    print(f"{passed} passed, {len(checks) - passed} failed")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        print(f"deploy/local/run.py: error: --model {args.model}: no config.json there",
              file=sys.stderr)
        return 2
    try:
        nginx.find_nginx(args.nginx)
    except FileNotFoundError as e:
        print(f"deploy/local/run.py: error: {e}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_dir = Path(args.out or ROOT / "output" / "deploy_local" / stamp).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from graphserver.prepare import prepare_default_model
        model = Path(prepare_default_model())
    else:
        model = Path(args.model).resolve()
    run = LocalRun(args, run_dir, model)

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    error = None
    try:
        run.execute()
    except Interrupted as e:
        error = f"interrupted by {e}"
    except (procs.StartError, RuntimeError, OSError, ValueError) as e:
        error = str(e)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing may stop the clean-up halfway
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        codes = run.sup.stop_all()
        if codes:
            run.summary.setdefault("exit_codes", {}).update(codes)
        if not args.keep_checkpoints:  # a model's size per version
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if error is not None:
        run.summary["error"] = error
        run.checks["run.completed"] = {"ok": False, "detail": error.splitlines()[0]}
    run.summary["checks"] = run.checks
    (run_dir / "summary.json").write_text(json.dumps(run.summary, indent=1) + "\n")
    print_summary(run.summary, run.checks)
    if error is not None:
        print(f"deploy/local/run.py: error: {error}", file=sys.stderr)
    return 0 if run.checks and all(c["ok"] for c in run.checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
