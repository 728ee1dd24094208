#!/usr/bin/env python3
"""A stand-in for a trainer that keeps publishing new weights to a set of serving replicas.

While it runs it:
  * keeps --clients prompt senders busy against BASE_URL (greedy; streamed through
    POST /v1/completions, or POST /generate with --no-stream), recording every response's status,
    X-Model-Version header and text;
  * every --interval seconds publishes a new weight version: a new checkpoint directory derived
    from the current one (every floating tensor plus a small deterministic perturbation, saved as
    safetensors; config and tokenizer files copied) and the next version id;
  * rolls POST /reload {path, version} through the replicas one at a time, waiting for each to
    answer and to report the new version on GET /health before it moves to the next, so at most
    one replica is ever out of service;
  * at the end, writes a JSON report: requests sent and failed, versions seen per replica over
    time, each roll's timings, and greedy probes (POST /generate: text and token ids) of every
    prompt on every version.

Replicas come from --replica (repeatable) or --discover URL, whose host name is resolved on every
roll (a Kubernetes headless Service gives one address per pod). With --configmap it also patches
that ConfigMap after each roll, so pods started later load the newest version.

Exit status: 0 when every request and every roll succeeded, 1 otherwise, 2 for usage errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import Any, Sequence

VERSION_HEADER = "X-Model-Version"
REQUEST_ID_HEADER = "X-Request-Id"
DEFAULT_PROMPTS = ("The capital of France is", "One, two, three,", "Water is made of")
RECIPE_FILE = "fake_trainer.json"  # written into each derived checkpoint: how it was made
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")  # the in-cluster service account


class UsageError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# HTTP (stdlib only: the trainer must run in a bare image, and needs exact control of errors)


@dataclasses.dataclass
class HttpResult:
    status: int | None  # None: no HTTP response (connection refused, reset, timeout)
    headers: dict[str, str]  # lower-case names
    body: bytes
    error: str | None  # why the exchange failed at the transport level, else None


def _connection(url: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    port = url.port or (443 if url.scheme == "https" else 80)
    if url.scheme == "https":
        return http.client.HTTPSConnection(url.hostname, port, timeout=timeout)
    return http.client.HTTPConnection(url.hostname, port, timeout=timeout)


def http_call(method: str, url: str, body: Any = None, *, timeout: float,
              headers: dict[str, str] | None = None, stream_lines: bool = False,
              context: ssl.SSLContext | None = None,
              content_type: str = "application/json") -> HttpResult:
    """One request on a fresh connection. With stream_lines the body is read line by line (an
    event stream), so a stream cut off mid-way shows up as an error instead of a short body."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", content_type)
    if context is not None:
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                           context=context)
    else:
        conn = _connection(parts, timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        got = {k.lower(): v for k, v in resp.getheaders()}
        if stream_lines:
            chunks = []
            while True:
                line = resp.readline()
                if not line:
                    break
                chunks.append(line)
            raw = b"".join(chunks)
        else:
            raw = resp.read()
        return HttpResult(resp.status, got, raw, None)
    except (OSError, http.client.HTTPException) as e:
        return HttpResult(None, {}, b"", f"{type(e).__name__}: {e}".strip())
    finally:
        conn.close()


def generate_call(base_url: str, prompt: str, max_tokens: int, stream: bool, timeout: float,
                  request_id: str) -> HttpResult:
    """One greedy completion. Streamed: POST /v1/completions with stream=true (server-sent
    events); else POST /generate (one JSON reply, with the token ids)."""
    headers = {REQUEST_ID_HEADER: request_id}
    if stream:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        return http_call("POST", f"{base_url}/v1/completions", body, timeout=timeout,
                         headers=headers, stream_lines=True)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    return http_call("POST", f"{base_url}/generate", body, timeout=timeout, headers=headers)


def parse_generate(result: HttpResult, stream: bool) -> tuple[dict | None, str | None]:
    """({"text", "tokens"?, "finish_reason"}, None) or (None, error) for a generate_call.

    A stream is `data: <chunk>` lines, each chunk's choices[0].text a piece of the text, ended by
    `data: [DONE]`; one that stops before [DONE] is an error (the replica died mid-request)."""
    if result.error is not None:
        return None, result.error
    if result.status != 200:
        snippet = result.body[:200].decode(errors="replace").strip()
        return None, f"HTTP {result.status}: {snippet}"
    try:
        if not stream:
            obj = json.loads(result.body)
            return {"text": str(obj["text"]), "tokens": list(obj["tokens"]),
                    "finish_reason": obj.get("finish_reason")}, None
        pieces, finish, done = [], None, False
        for line in result.body.decode().splitlines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            obj = json.loads(payload)
            if "error" in obj:
                return None, f"stream error: {obj['error']}"
            for choice in obj.get("choices") or []:
                pieces.append(str(choice.get("text") or ""))
                finish = choice.get("finish_reason") or finish
        if not done:
            return None, "stream ended before data: [DONE]"
        return {"text": "".join(pieces), "finish_reason": finish}, None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return None, f"unparseable reply: {type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# Checkpoints


def next_version(version: str) -> str:
    """The id after `version`: its trailing number plus one ("v3" -> "v4", "7" -> "8"), else
    "-1" appended. Restarting the trainer from the newest version thus never reuses an id."""
    m = re.fullmatch(r"(.*?)(\d+)", version)
    if m is None:
        return f"{version}-1"
    return f"{m.group(1)}{int(m.group(2)) + 1}"


def _tensor_seed(base_seed: int, version: str, name: str) -> int:
    return zlib.crc32(f"{base_seed}:{version}:{name}".encode())


def derive_checkpoint(src: Path, dst: Path, version: str, scale: float, seed: int) -> dict:
    """Write dst = src with every floating tensor w replaced by w + scale * std(w) * noise, where
    noise ~ N(0, 1) is seeded by (seed, version, tensor name): the same inputs give the same bytes.
    Other files (config, tokenizer, shard index) are copied. dst appears complete or not at all
    (written beside it, then renamed), with RECIPE_FILE saying how it was derived."""
    import torch  # the trainer side may use torch; only the perturbation needs it
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise UsageError(f"{src}: no *.safetensors files in the checkpoint directory")
    recipe = {"derived_from": str(src.resolve()), "version": version, "scale": scale,
              "seed": seed}
    if dst.exists():
        # A rerun (a restarted Job) may find the directory it wrote before; the derivation is
        # deterministic, so the same recipe means the same bytes and it is reused.
        try:
            if json.loads((dst / RECIPE_FILE).read_text()) == recipe:
                return {"tensors": None, "derive_s": 0.0, "reused": True}
        except (OSError, ValueError):
            pass
        raise UsageError(f"{dst}: already exists and was not derived the same way; "
                         "choose another --out-dir")
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.monotonic()
    n_tensors = 0
    try:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith(".") \
                    and f.name != RECIPE_FILE:
                shutil.copy2(f, tmp / f.name)
        for shard in shards:
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(shard), framework="pt") as fh:
                metadata = dict(fh.metadata() or {})
                for name in fh.keys():
                    w = fh.get_tensor(name)
                    if w.is_floating_point() and w.numel() > 1:
                        g = torch.Generator().manual_seed(_tensor_seed(seed, version, name))
                        w32 = w.float()
                        noise = torch.randn(w32.shape, generator=g)  # same shape as w
                        w = (w32 + scale * w32.std() * noise).to(w.dtype)
                    out[name] = w.contiguous()
                    n_tensors += 1
            metadata["format"] = metadata.get("format", "pt")
            metadata["graphserver_version"] = version
            save_file(out, str(tmp / shard.name), metadata=metadata)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors": n_tensors, "derive_s": round(time.monotonic() - t0, 3), "reused": False}


# ---------------------------------------------------------------------------------------------
# Replicas and the ConfigMap


def discover_replicas(url: str) -> list[str]:
    """Every address the host of `url` resolves to, as base URLs with the same scheme and port
    (a headless Service name resolves to one A record per ready, or published, pod)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RuntimeError(f"cannot resolve {parts.hostname}: {e}") from None
    addrs = sorted({info[4][0] for info in infos})
    return [f"{parts.scheme}://{f'[{a}]' if ':' in a else a}:{port}" for a in addrs]


class ConfigMapPatcher:
    """Merge-patches data.model_path / data.model_version of one ConfigMap through the API server,
    authenticated as the pod's service account (RBAC in deploy/k8s/trainer.yaml allows exactly
    get and patch on that one ConfigMap)."""

    def __init__(self, name: str, namespace: str | None, api_url: str | None, token_file: Path,
                 ca_file: Path, timeout: float):
        self.name = name
        if namespace is None:
            ns_file = SA_DIR / "namespace"
            namespace = ns_file.read_text().strip() if ns_file.exists() else "default"
        self.namespace = namespace
        if api_url is None:
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise UsageError("--configmap needs --kube-api or KUBERNETES_SERVICE_HOST "
                                 "(it runs inside a pod)")
            api_url = f"https://{host}:{port}"
        self.api_url = api_url.rstrip("/")
        self.token_file = token_file
        self.context = None
        if self.api_url.startswith("https://"):
            self.context = ssl.create_default_context(cafile=str(ca_file) if ca_file.exists()
                                                      else None)
        self.timeout = timeout

    def publish(self, path: str, version: str) -> str | None:
        """Returns None on success, else the error."""
        url = f"{self.api_url}/api/v1/namespaces/{self.namespace}/configmaps/{self.name}"
        headers = {}
        if self.token_file.exists():
            headers["Authorization"] = f"Bearer {self.token_file.read_text().strip()}"
        body = {"data": {"model_path": path, "model_version": version}}
        r = http_call("PATCH", url, body, timeout=self.timeout, headers=headers,
                      context=self.context, content_type="application/merge-patch+json")
        if r.error is not None:
            return r.error
        if r.status != 200:
            return f"HTTP {r.status}: {r.body[:200].decode(errors='replace').strip()}"
        return None


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class RequestRecord:
    id: str
    client: int
    prompt: int  # index into the prompt list
    t_start: float  # seconds since the run's start
    t_end: float
    status: int | None
    version: str | None  # the X-Model-Version header, None when absent
    upstream: str | None  # the replica that served it, when a proxy says so (--upstream-header)
    text: str | None
    error: str | None


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.base_url = args.base_url.rstrip("/")
        self.prompts: list[str] = list(args.prompt or DEFAULT_PROMPTS)
        self.epoch0 = time.time()
        self.t0 = time.monotonic()
        self.stop_load = threading.Event()
        self.interrupted = threading.Event()
        self.lock = threading.Lock()
        self.records: list[RequestRecord] = []
        self.replica_versions: dict[str, list[dict]] = {}  # replica -> [{t, version}] on change
        self.versions: list[dict] = []
        self.probes: list[dict] = []
        self.errors: list[str] = []
        self.run_id = f"{os.getpid():x}{int(self.epoch0) % 100000:05d}"
        self.log_file = open(args.requests_log, "w") if args.requests_log else None
        self.patcher = None
        if args.configmap:
            self.patcher = ConfigMapPatcher(args.configmap, args.namespace, args.kube_api,
                                            Path(args.kube_token_file), SA_DIR / "ca.crt",
                                            args.request_timeout)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[trainer {self.now():8.2f}s] {msg}", file=sys.stderr, flush=True)

    # -- replicas

    def replicas(self) -> list[str]:
        if self.args.replica:
            return [r.rstrip("/") for r in self.args.replica]
        if self.args.discover:
            return discover_replicas(self.args.discover)
        return []

    def poll_version(self, replica: str) -> tuple[int | None, str | None]:
        r = http_call("GET", f"{replica}/health", timeout=self.args.request_timeout)
        version = r.headers.get(VERSION_HEADER.lower())
        if version is not None:
            self.note_version(replica, version)
        return r.status, version

    def note_version(self, replica: str, version: str) -> None:
        with self.lock:
            seen = self.replica_versions.setdefault(replica, [])
            if not seen or seen[-1]["version"] != version:
                seen.append({"t": self.now(), "version": version})

    def wait_ready(self) -> None:
        """Until BASE_URL and every replica answer /health with 200."""
        deadline = time.monotonic() + self.args.wait_ready
        targets = [self.base_url] + self.replicas()
        while targets:
            if self.interrupted.is_set():
                raise KeyboardInterrupt
            status, _ = self.poll_version(targets[0])
            if status == 200:
                targets.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"{targets[0]}/health not 200 within --wait-ready "
                                   f"{self.args.wait_ready:g}s (last: {status})")
            time.sleep(0.5)

    # -- load

    def client_loop(self, client: int) -> None:
        args = self.args
        n = 0
        while not self.stop_load.is_set():
            prompt_idx = (client + n) % len(self.prompts)
            rid = f"{self.run_id}-{client}-{n}"
            n += 1
            t_start = self.now()
            r = generate_call(self.base_url, self.prompts[prompt_idx], args.max_tokens,
                              args.stream, args.request_timeout, rid)
            reply, error = parse_generate(r, args.stream)
            text = None if reply is None else reply["text"]
            version = r.headers.get(VERSION_HEADER.lower())
            upstream = r.headers.get(args.upstream_header.lower()) if args.upstream_header else None
            rec = RequestRecord(rid, client, prompt_idx, t_start, self.now(), r.status, version,
                                upstream, text, error)
            with self.lock:
                self.records.append(rec)
                if self.log_file is not None:
                    self.log_file.write(json.dumps(dataclasses.asdict(rec)) + "\n")
                    self.log_file.flush()
            if upstream is not None and version is not None and error is None:
                self.note_version(f"upstream:{upstream}", version)
            if error is not None:
                self.log(f"request {rid} failed: {error}")
                time.sleep(0.05)  # a dead front door must not become a busy loop

    # -- greedy probes

    def probe(self, expected_version: str) -> None:
        """Every prompt once, greedy, through BASE_URL with POST /generate (which returns the token
        ids too): the per-version sample that can be checked against the checkpoint alone."""
        for i, prompt in enumerate(self.prompts):
            rid = f"{self.run_id}-probe-{expected_version}-{i}"
            r = generate_call(self.base_url, prompt, self.args.max_tokens, False,
                              self.args.request_timeout, rid)
            reply, error = parse_generate(r, False)
            entry = {"t": self.now(), "id": rid, "prompt": prompt,
                     "expected_version": expected_version,
                     "version": r.headers.get(VERSION_HEADER.lower()),
                     "upstream": (r.headers.get(self.args.upstream_header.lower())
                                  if self.args.upstream_header else None),
                     "error": error, **(reply or {})}
            with self.lock:
                self.probes.append(entry)
            if error is not None or entry["version"] != expected_version:
                self.errors.append(f"probe {rid}: {error or 'version ' + repr(entry['version'])}")

    # -- publishing

    def roll(self, path: Path, version: str) -> list[dict]:
        """POST /reload to one replica at a time; the next starts only once this one reports the
        new version on /health (200), so the others keep serving meanwhile."""
        events: list[dict] = []
        try:
            replicas = self.replicas()
        except RuntimeError as e:
            replicas, why = [], str(e)
        else:
            why = "no replicas to roll to"
        if not replicas:
            events.append({"replica": None, "t_start": self.now(), "t_end": self.now(),
                           "status": None, "error": why})
            self.errors.append(f"reload {version}: {why}")
            return events
        for replica in replicas:
            t_start = self.now()
            ev: dict[str, Any] = {"replica": replica, "t_start": t_start}
            r = http_call("POST", f"{replica}/reload", {"path": str(path), "version": version},
                          timeout=self.args.reload_timeout)
            ev["status"] = r.status
            error = r.error
            if error is None and r.status != 200:
                error = f"HTTP {r.status}: {r.body[:200].decode(errors='replace').strip()}"
            if error is None:
                try:
                    result = json.loads(r.body)
                    ev.update({k: result[k] for k in ("previous_version", "drain_ms", "copy_ms")
                               if k in result})
                except ValueError:
                    pass
                error = self.wait_version(replica, version)
            ev["t_end"] = self.now()
            ev["error"] = error
            events.append(ev)
            if error is not None:
                self.errors.append(f"reload {version} on {replica}: {error}")
                self.log(f"reload {version} on {replica} FAILED: {error}")
                break  # the rest keep the old version rather than risk a second outage
            self.log(f"{replica} now serves {version} ({ev['t_end'] - t_start:.1f}s)")
        return events

    def wait_version(self, replica: str, version: str) -> str | None:
        deadline = time.monotonic() + self.args.reload_timeout
        while True:
            status, got = self.poll_version(replica)
            if status == 200 and got == version:
                return None
            if time.monotonic() > deadline:
                return f"/health still {status} with version {got!r} after the reload"
            time.sleep(0.2)

    def publish_loop(self, checkpoint: Path, version: str, start: float) -> None:
        args = self.args
        out_dir = Path(args.out_dir) if args.out_dir else checkpoint.parent
        for k in range(1, args.versions + 1):
            due = start + k * args.interval
            while time.monotonic() < due:
                if self.interrupted.wait(min(0.5, max(0.0, due - time.monotonic()))):
                    return
            new_version = next_version(version)
            dst = out_dir / re.sub(r"[^A-Za-z0-9._-]", "_", new_version)
            self.log(f"deriving {new_version} from {version} into {dst}")
            info = derive_checkpoint(checkpoint, dst, new_version, args.scale, args.seed)
            entry: dict[str, Any] = {"version": new_version, "path": str(dst),
                                     "derived_from": version, "published_at": self.now(), **info}
            entry["roll"] = self.roll(dst, new_version)
            if any(ev["error"] for ev in entry["roll"]):
                self.versions.append(entry)
                return
            if self.patcher is not None:
                entry["configmap_error"] = self.patcher.publish(str(dst), new_version)
                if entry["configmap_error"]:
                    self.errors.append(f"configmap {new_version}: {entry['configmap_error']}")
            self.versions.append(entry)
            if args.probe:
                self.probe(new_version)
            checkpoint, version = dst, new_version

    # -- the whole run

    def execute(self) -> dict:
        args = self.args
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_dir():
            raise UsageError(f"--checkpoint {checkpoint}: not a directory")
        if args.versions and not list(checkpoint.glob("*.safetensors")):
            raise UsageError(f"--checkpoint {checkpoint}: no *.safetensors files to derive "
                             "new versions from")
        self.wait_ready()
        version = args.initial_version
        if version is None:
            replicas = self.replicas()
            _, version = self.poll_version(replicas[0] if replicas else self.base_url)
            if version is None:
                raise RuntimeError(f"no {VERSION_HEADER} header on /health; pass "
                                   "--initial-version")
        self.log(f"start: version {version}, replicas {self.replicas()}, {args.clients} clients")
        threads = [threading.Thread(target=self.client_loop, args=(i,), daemon=True)
                   for i in range(args.clients)]
        if args.probe:
            self.probe(version)
        for t in threads:
            t.start()
        try:
            self.publish_loop(checkpoint, version, time.monotonic())
            end = time.monotonic() + (args.settle if args.versions else args.duration)
            while time.monotonic() < end and not self.interrupted.is_set():
                self.interrupted.wait(min(0.5, max(0.0, end - time.monotonic())))
        finally:
            self.stop_load.set()
            for t in threads:
                t.join(args.request_timeout + 5)
        final = {}
        for replica in self.replicas():
            final[replica] = self.poll_version(replica)[1]
        return self.report(final)

    def report(self, final: dict[str, str | None]) -> dict:
        with self.lock:
            records = list(self.records)
            if self.log_file is not None:
                self.log_file.close()
                self.log_file = None
        failed = [r for r in records if r.error is not None]
        by_upstream: dict[str, int] = {}
        by_version: dict[str, int] = {}
        samples: dict[str, dict[str, str]] = {}
        distinct: dict[str, dict[str, set]] = {}
        for r in records:
            if r.error is None:
                by_upstream[r.upstream or "?"] = by_upstream.get(r.upstream or "?", 0) + 1
                by_version[r.version or "?"] = by_version.get(r.version or "?", 0) + 1
                if r.version is not None:
                    prompt = self.prompts[r.prompt]
                    samples.setdefault(r.version, {}).setdefault(prompt, r.text)
                    distinct.setdefault(r.version, {}).setdefault(prompt, set()).add(r.text)
        return {
            "base_url": self.base_url,
            "epoch0": self.epoch0,
            "duration_s": self.now(),
            "interrupted": self.interrupted.is_set(),
            "settings": {"prompts": self.prompts,
                         **{k: getattr(self.args, k) for k in
                            ("clients", "max_tokens", "stream", "interval", "versions", "scale",
                             "seed")}},
            "requests": {
                "sent": len(records),
                "ok": len(records) - len(failed),
                "failed": len(failed),
                # among the successful replies; a proxy's own 502 cannot carry one
                "missing_version_header": sum(1 for r in records
                                              if r.error is None and r.version is None),
                "errors_without_version_header": sum(1 for r in records if r.error is not None
                                                     and r.status is not None
                                                     and r.version is None),
                "by_upstream": by_upstream,
                "by_version": by_version,
            },
            "failures": [dataclasses.asdict(r) for r in failed],
            "versions": self.versions,
            "replica_versions": self.replica_versions,
            "final_versions": final,
            "probes": self.probes,
            "greedy_texts": samples,
            "greedy_distinct_texts": {v: {p: len(s) for p, s in d.items()}
                                      for v, d in distinct.items()},
            "errors": self.errors,
        }


# ---------------------------------------------------------------------------------------------
# Command line


def bounded(kind: type, minimum: float, what: str | None = None):
    """An argparse type: `kind` (int or float) at least `minimum`, else a one-line error."""
    what = what or f">= {minimum:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes print one line (no usage block), exit status 2; --help stays complete."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="fake_trainer.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, metavar="URL",
                   help="where the prompts go: the load balancer / Service, e.g. "
                        "http://127.0.0.1:8080 (required)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--replica", action="append", metavar="URL",
                     help="one replica's own base URL, for /reload and /health; repeat per replica")
    who.add_argument("--discover", metavar="URL",
                     help="resolve this URL's host name on every roll, one replica per address "
                          "(a headless Service: http://graphserver-pods:8000)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the HF checkpoint directory the replicas serve now (required)")
    p.add_argument("--initial-version", metavar="V", default=None,
                   help="its version id (default: the X-Model-Version of the first replica)")
    p.add_argument("--out-dir", metavar="DIR", default=None,
                   help="where new checkpoint directories go, one per version "
                        "(default: the parent of --checkpoint)")
    p.add_argument("--versions", type=bounded(int, 0, ">= 0"), metavar="N", default=3,
                   help="versions to publish, then --settle seconds of load and stop; 0: only "
                        "send load for --duration seconds (default: 3)")
    p.add_argument("--interval", type=bounded(float, 0.1, ">= 0.1 s"), metavar="S", default=20.0,
                   help="seconds between versions, counted from the start of the load "
                        "(default: 20)")
    p.add_argument("--settle", type=bounded(float, 0, ">= 0 s"), metavar="S", default=5.0,
                   help="seconds of load after the last version is rolled out (default: 5)")
    p.add_argument("--duration", type=bounded(float, 0, ">= 0 s"), metavar="S", default=30.0,
                   help="seconds of load when --versions is 0 (default: 30)")
    p.add_argument("--clients", type=bounded(int, 0, ">= 0"), metavar="N", default=4,
                   help="concurrent prompt senders (default: 4)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help=f"a prompt to send, repeatable (default: {list(DEFAULT_PROMPTS)})")
    p.add_argument("--max-tokens", type=bounded(int, 1, ">= 1"), metavar="N", default=8,
                   help="max_tokens of every request (default: 8)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="prompt traffic streams (POST /v1/completions, stream=true); "
                        "--no-stream: POST /generate (default: on)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="at the start and after each roll, send every prompt once through "
                        "POST /generate and keep text and token ids per version (default: on)")
    p.add_argument("--scale", type=bounded(float, 0, ">= 0"), metavar="F", default=0.02,
                   help="perturbation size, a fraction of each tensor's standard deviation "
                        "(default: 0.02)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="perturbation seed (default: 0)")
    p.add_argument("--request-timeout", type=bounded(float, 0.1, ">= 0.1 s"), metavar="S",
                   default=120.0,
                   help="seconds to wait for one /generate or /health reply (default: 120)")
    p.add_argument("--reload-timeout", type=bounded(float, 0.1, ">= 0.1 s"), metavar="S",
                   default=300.0,
                   help="seconds to wait for one replica's reload (default: 300)")
    p.add_argument("--wait-ready", type=bounded(float, 0, ">= 0 s"), metavar="S", default=120.0,
                   help="seconds to wait for every /health to be 200 before starting "
                        "(default: 120)")
    p.add_argument("--upstream-header", default="X-Upstream-Addr", metavar="NAME",
                   help="response header naming the replica that served a request, set by the "
                        "proxy; '' to ignore (default: X-Upstream-Addr)")
    p.add_argument("--configmap", metavar="NAME", default=None,
                   help="after each roll, patch this ConfigMap's model_path/model_version "
                        "(in a pod, as its service account) (default: off)")
    p.add_argument("--namespace", default=None,
                   help="the ConfigMap's namespace (default: the pod's own)")
    p.add_argument("--kube-api", metavar="URL", default=None,
                   help="the API server (default: https://$KUBERNETES_SERVICE_HOST:"
                        "$KUBERNETES_SERVICE_PORT)")
    p.add_argument("--kube-token-file", metavar="FILE", default=str(SA_DIR / "token"),
                   help=f"bearer token for --kube-api (default: {SA_DIR / 'token'})")
    p.add_argument("--report", metavar="FILE", default=None,
                   help="write the JSON report here (default: stdout)")
    p.add_argument("--requests-log", metavar="FILE", default=None,
                   help="also write one JSON line per request here (default: off)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.replica and not args.discover and args.versions:
        parser.error("publishing versions needs --replica URL (repeatable) or --discover URL")
    for url in [args.base_url] + (args.replica or []) + ([args.discover] if args.discover else []):
        if urllib.parse.urlsplit(url).scheme not in ("http", "https") or \
                not urllib.parse.urlsplit(url).hostname:
            parser.error(f"not an http(s) URL: {url!r}")
    try:
        run = Run(args)
    except (UsageError, OSError) as e:
        print(f"fake_trainer.py: error: {e}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: Any) -> None:
        run.interrupted.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        report = run.execute()
    except UsageError as e:
        print(f"fake_trainer.py: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"fake_trainer.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fake_trainer.py: interrupted before the load started", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=1) + "\n"
    if args.report:
        Path(args.report).write_text(text)
    else:
        sys.stdout.write(text)
    r = report["requests"]
    run.log(f"done: {r['sent']} requests, {r['failed']} failed, final versions "
            f"{report['final_versions']}")
    return 0 if r["failed"] == 0 and not report["errors"] and not report["interrupted"] else 1


if __name__ == "__main__":
    sys.exit(main())
