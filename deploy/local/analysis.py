"""Checks of one local run, from the trainer's report and per-request log and nginx's access log.
Pure functions over those records, so the tests run them on stand-in servers too."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

# nginx's $msec and $request_time have millisecond resolution; the trainer's clock is the same
# machine's time.time(). Two events closer than this are not ordered.
CLOCK_SLACK_S = 0.01


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check(ok: bool, detail: Any) -> dict:
    return {"ok": bool(ok), "detail": detail}


GENERATION_ROUTES = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


def generate_entries(entries: Iterable[dict]) -> list[dict]:
    """The access-log entries of generation requests (not /health, /reload, /metrics)."""
    return [e for e in entries if e["uri"] in GENERATION_ROUTES]


def served_counts(entries: Iterable[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in generate_entries(entries):
        key = e["served_by"] or "none"
        counts[key] = counts.get(key, 0) + 1
    return counts


def rollout_checks(report: dict, entries: list[dict], replicas: dict[str, str]) -> dict:
    """replicas: name -> host:port. The rollout must lose no request, spread traffic over every
    replica, label every response with a version and leave every replica on the last version."""
    req = report["requests"]
    last = report["versions"][-1]["version"] if report["versions"] else None
    served = served_counts(entries)
    published = [v["version"] for v in report["versions"]]
    rolled = [v["version"] for v in report["versions"]
              if v["roll"] and all(ev["error"] is None for ev in v["roll"])
              and len(v["roll"]) == len(replicas)]
    return {
        "no_failed_requests": _check(req["failed"] == 0 and req["sent"] > 0,
                                     {"sent": req["sent"], "failed": req["failed"]}),
        "every_response_has_version": _check(req["missing_version_header"] == 0 and
                                             "?" not in req["by_version"],
                                             {"missing": req["missing_version_header"]}),
        "every_replica_served": _check(all(served.get(addr, 0) > 0 for addr in replicas.values()),
                                       {name: served.get(addr, 0)
                                        for name, addr in replicas.items()}),
        "every_version_rolled_to_every_replica": _check(
            published and rolled == published, {"published": published, "rolled": rolled}),
        "replicas_end_on_last_version": _check(
            last is not None and len(report["final_versions"]) == len(replicas) and
            all(v == last for v in report["final_versions"].values()),
            {"last": last, "final": report["final_versions"]}),
        "rolls_one_at_a_time": _check(rolls_disjoint(report), "no two reloads overlapped"),
    }


def rolls_disjoint(report: dict) -> bool:
    spans = sorted((ev["t_start"], ev["t_end"]) for v in report["versions"] for ev in v["roll"])
    return all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def kill_checks(report: dict, records: list[dict], entries: list[dict], dead: str,
                survivor: str, kill_epoch: float, until_epoch: float = float("inf")) -> dict:
    """After one replica (host:port `dead`) was SIGKILLed at kill_epoch: the only requests that
    failed are those nginx had in flight on it at that moment, and every later request (started
    before until_epoch) was served by the survivor."""
    epoch0 = report["epoch0"]
    records = [r for r in records if epoch0 + r["t_start"] < until_epoch]
    by_id = {e["request_id"]: e for e in generate_entries(entries) if e["request_id"]}
    in_flight = {rid for rid, e in by_id.items()
                 if e["served_by"] == dead and e["t_start"] <= kill_epoch + CLOCK_SLACK_S
                 and e["t_end"] >= kill_epoch - CLOCK_SLACK_S}
    failed = {r["id"] for r in records if r["error"] is not None}
    unlogged = sorted(failed - set(by_id))
    started_after = [r for r in records if epoch0 + r["t_start"] > kill_epoch + CLOCK_SLACK_S]
    after_failed = [r["id"] for r in started_after if r["error"] is not None]
    after_served = served_counts(by_id[r["id"]] for r in started_after if r["id"] in by_id)
    rerouted = sum(1 for e in by_id.values() if len(e["tried"]) > 1 and e["tried"][0] == dead
                   and e["served_by"] == survivor)
    return {
        "failed_are_in_flight_on_dead": _check(
            failed <= in_flight and not unlogged,
            {"failed": len(failed), "in_flight_on_dead": len(in_flight),
             "failed_not_in_flight": sorted(failed - in_flight)[:10], "not_in_log": unlogged[:10]}),
        # An ok one may only be a request that ended within the clock's slack of the kill.
        "in_flight_on_dead_all_failed": _check(
            all(by_id[rid]["t_end"] <= kill_epoch + CLOCK_SLACK_S for rid in in_flight - failed),
            {"in_flight_but_ok": sorted(in_flight - failed)[:10]}),
        "later_requests_succeed": _check(
            started_after and not after_failed,
            {"started_after_kill": len(started_after), "failed": after_failed[:10]}),
        "later_requests_on_survivor": _check(
            after_served.get(survivor, 0) > 0 and after_served.get(dead, 0) == 0,
            {"served_after_kill": after_served, "rerouted_after_connect_error": rerouted}),
    }


def drain_checks(report: dict, records: list[dict], entries: list[dict], replica: str,
                 sigterm_epoch: float, exit_code: int | None, exit_s: float,
                 grace_s: float) -> dict:
    """After SIGTERM reached one replica's front end (host:port `replica`) at sigterm_epoch: every
    request in flight on it then finished successfully (the drain), and it exited cleanly within
    grace_s. Requests that started later are not judged here (the caller stopped the load)."""
    epoch0 = report["epoch0"]
    by_id = {e["request_id"]: e for e in generate_entries(entries) if e["request_id"]}
    in_flight = [r for r in records
                 if r["id"] in by_id and by_id[r["id"]]["served_by"] == replica
                 and epoch0 + r["t_start"] < sigterm_epoch - CLOCK_SLACK_S
                 and epoch0 + r["t_end"] > sigterm_epoch + CLOCK_SLACK_S]
    # A request whose reply never reached nginx has no log line to place it; count those too.
    unplaced = [r["id"] for r in records if r["id"] not in by_id
                and epoch0 + r["t_start"] < sigterm_epoch]
    failed = [r["id"] for r in in_flight if r["error"] is not None]
    return {
        "in_flight_requests_finish": _check(
            in_flight and not failed and not unplaced,
            {"in_flight_at_sigterm": len(in_flight), "failed": failed[:10],
             "not_in_log": unplaced[:10]}),
        "exits_cleanly_in_grace": _check(
            exit_code == 0 and exit_s <= grace_s,
            {"exit_code": exit_code, "exit_s": round(exit_s, 2), "grace_s": grace_s}),
    }
