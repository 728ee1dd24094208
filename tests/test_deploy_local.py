"""The local two-replica deployment (deploy/local/run.py) on the real `graphserver serve`, CPU
backend, default model: 4 streaming clients through nginx while the trainer publishes 3 versions,
then a SIGKILL of one replica under load and a SIGTERM drain of the other. run.py does the
checking (deploy/local/analysis.py, oracle.py); this test runs it as a user would and holds it to
every check. About 2-3 minutes on 2 CPU cores."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "deploy" / "local" / "run.py"

EXPECTED_CHECKS = {
    "rollout.no_failed_requests", "rollout.every_response_has_version",
    "rollout.every_replica_served", "rollout.every_version_rolled_to_every_replica",
    "rollout.replicas_end_on_last_version", "rollout.rolls_one_at_a_time",
    "kill.failed_are_in_flight_on_dead", "kill.in_flight_on_dead_all_failed",
    "kill.later_requests_succeed", "kill.later_requests_on_survivor", "kill.some_were_in_flight",
    "kill.every_response_has_version",
    "sigterm.in_flight_requests_finish", "sigterm.exits_cleanly_in_grace",
    "oracle.probe_equals_checkpoint_alone", "oracle.versions_differ",
    "oracle.every_reply_is_its_versions_output",
}


@pytest.mark.slow
def test_local_deployment_rolls_three_versions_and_survives_a_dead_replica(tmp_path,
                                                                          default_model_dir):
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.skip("nginx is not installed (.ci/run installs it: apt-get install nginx)")
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, str(RUN), "--out", str(out), "--model", str(default_model_dir),
         "--device", "cpu", "--versions", "3", "--interval", "8", "--settle", "3",
         "--clients", "4", "--max-tokens", "6", "--kill-duration", "4"],
        capture_output=True, text=True, timeout=420, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert (out / "summary.json").exists(), r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = summary["checks"]
    failed = {k: v for k, v in checks.items() if not v["ok"]}
    assert not failed, (failed, r.stdout[-3000:], r.stderr[-3000:])
    assert EXPECTED_CHECKS <= set(checks), sorted(EXPECTED_CHECKS - set(checks))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "passed, 0 failed" in r.stdout
    ro = summary["rollout"]
    assert ro["requests"]["failed"] == 0 and ro["requests"]["sent"] >= 20
    assert [v["version"] for v in ro["versions"]] == ["v1", "v2", "v3"]
    assert set(ro["final_versions"].values()) == {"v3"} and len(ro["final_versions"]) == 2
    assert len(ro["served_by_replica"]) >= 2 and min(ro["served_by_replica"].values()) > 0
    assert all(n > 0 for n in ro["replica_metrics_requests_total"].values())
    fo = summary["failover"]
    assert fo["failed_in_flight_on_victim"] >= 1
    assert fo["survivor_exit"]["code"] == 0
    # Everything it started is gone, and the checkpoints (a model's size each) were removed.
    assert all(code is not None for code in summary["exit_codes"].values())
    assert not (out / "checkpoints").exists()
