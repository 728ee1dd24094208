"""deploy/k8s/: the manifests validate offline (kubernetes-validate, strict: unknown fields are
errors) against a named Kubernetes version, and hang together: selectors match the pods, probes
and ports agree, the commands they run parse with the real command-line parsers."""
from __future__ import annotations

import copy
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import fake_trainer  # scripts/ (conftest puts it on sys.path)

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "deploy" / "k8s"
# The oldest release the manifests promise to work on (deploy/k8s/README.md says the same); the
# preStop `sleep` action they use is on by default from 1.30 and GA in 1.34.
K8S_VERSION = "1.33.0"


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def _one(kind: str, name: str) -> dict:
    found = [d for _, d in _docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def test_every_manifest_validates_strictly():
    docs = _docs()
    kinds = sorted({d["kind"] for _, d in docs})
    assert kinds == ["ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "Role",
                     "RoleBinding", "Service", "ServiceAccount"]
    for name, doc in docs:
        got = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert got == K8S_VERSION.rsplit(".", 1)[0], (name, got)


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"].__setitem__("replicas", "two"),
    lambda d: d["spec"]["template"]["spec"].__setitem__("terminationGracePeriod", 45),
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    .__setitem__("port", [8000]),
])
def test_the_validator_rejects_a_broken_deployment(break_it):
    doc = copy.deepcopy(_one("Deployment", "graphserver"))
    break_it(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def _sh_argv(container: dict, files: dict[str, str]) -> list[str]:
    """The argv a `sh -c` container runs, with its $(cat FILE) substitutions done."""
    assert container["command"] == ["sh", "-c"]
    script = container["args"][0]
    for f, value in files.items():
        script = script.replace(f'"$(cat {f})"', shlex.quote(value))
    argv = shlex.split(script)
    assert argv[0] == "exec" and "$(" not in script, script
    return argv[1:]


def _config_files(tmp_path: Path) -> dict[str, str]:
    cm = _one("ConfigMap", "graphserver-model")
    assert set(cm["data"]) == {"model_path", "model_version"}
    model = tmp_path / "model"
    model.mkdir()
    return {"/etc/graphserver/model_path": str(model),
            "/etc/graphserver/model_version": cm["data"]["model_version"]}


def test_deployment_serves_two_gpu_replicas_with_probes_and_a_drain():
    dep = _one("Deployment", "graphserver")
    assert dep["spec"]["replicas"] == 2
    pod = _pod(dep)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
        assert c[probe]["httpGet"]["port"] in port_names, probe
    # Liveness must outlast a reload (503 throughout), whose drain is up to 60 s by default.
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > 60 + 30
    # Termination: preStop, then SIGTERM's drain, inside the grace period.
    from graphserver.api.server import GRACEFUL_SHUTDOWN_S
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + GRACEFUL_SHUTDOWN_S + 10
    # The volumes: the model PVC and the ConfigMap, both mounted.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert volumes["model-config"]["configMap"]["name"] == "graphserver-model"
    assert mounts["model-config"] == "/etc/graphserver"
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mounts["models"] == "/models"
    assert _one("ConfigMap", "graphserver-model")["data"]["model_path"].startswith("/models/")


def test_server_command_parses_with_the_real_parsers(tmp_path):
    from graphserver.__main__ import build_parser as engine_parser
    from graphserver.api.server import parse_args as serve_parse_args
    files = _config_files(tmp_path)
    (c,) = _pod(_one("Deployment", "graphserver"))["containers"]
    argv = _sh_argv(c, files)
    assert argv[:2] == ["graphserver", "serve"]
    args, engine_args = serve_parse_args(argv[2:])
    assert args.host == "0.0.0.0" and args.port == c["ports"][0]["containerPort"]
    assert args.model == files["/etc/graphserver/model_path"]
    engine = engine_parser().parse_args(["--model", args.model, *engine_args])
    assert engine.device == "cuda"
    assert engine.model_version == files["/etc/graphserver/model_version"]


def test_services_select_the_pods_and_the_headless_one_lists_unready_pods():
    dep = _one("Deployment", "graphserver")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (c,) = _pod(dep)["containers"]
    port_names = {p["name"] for p in c["ports"]}
    front = _one("Service", "graphserver")
    pods = _one("Service", "graphserver-pods")
    for svc in (front, pods):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    assert pods["spec"]["clusterIP"] == "None" and pods["spec"]["publishNotReadyAddresses"]
    assert front["spec"].get("clusterIP") != "None"


def test_trainer_job_rolls_through_the_headless_service_and_may_patch_only_the_configmap(tmp_path):
    job = _one("Job", "graphserver-trainer")
    pod = _pod(job)
    role = _one("Role", "graphserver-trainer")
    binding = _one("RoleBinding", "graphserver-trainer")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    _one("ServiceAccount", pod["serviceAccountName"])
    (rule,) = role["rules"]
    assert rule["resources"] == ["configmaps"] and rule["resourceNames"] == ["graphserver-model"]
    assert sorted(rule["verbs"]) == ["get", "patch"]
    (c,) = pod["containers"]
    argv = _sh_argv(c, _config_files(tmp_path))
    assert argv[:2] == ["python", "/opt/graphserver/scripts/fake_trainer.py"]
    args = fake_trainer.build_parser().parse_args(argv[2:])
    front = _one("Service", "graphserver")
    pods = _one("Service", "graphserver-pods")
    assert args.base_url == f"http://{front['metadata']['name']}"  # port 80
    assert front["spec"]["ports"][0]["port"] == 80
    assert args.discover == f"http://{pods['metadata']['name']}:{pods['spec']['ports'][0]['port']}"
    assert args.configmap == "graphserver-model"
    assert args.out_dir.startswith("/models/")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/models", "/etc/graphserver"} <= mounts
