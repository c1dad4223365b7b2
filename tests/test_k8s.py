"""Kubernetes manifests (deploy/k8s): no cluster here, so every object the kustomization names (and
the Secret and ConfigMap it generates) is validated offline against the Kubernetes schemas, and,
as tests/test_deploy.py does for compose, every service, setting, port and probe they name is checked
against the code."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shared.settings import Settings, env_name, load_settings
from warmserve.service import SERVICES

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
OBJECTS = [doc for name in KUSTOMIZATION["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())]
BY_NAME = {(o["kind"], o["metadata"]["name"]): o for o in OBJECTS}
WORKLOADS = [o for o in OBJECTS if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]
SETTING_VARS = {env_name(f.name) for f in dataclasses.fields(Settings)}
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest supported here, and the newest schemas bundled
SECRET = KUSTOMIZATION["secretGenerator"][0]["name"]
SECRET_KEYS = [line.split("=", 1)[0] for line in (K8S / "credentials.env.example").read_text().splitlines()
               if line and not line.startswith("#")]


def generated() -> list[dict]:
    """The Secret (from the example credentials) and ConfigMap the kustomization generates."""
    (auth,) = [g for g in KUSTOMIZATION["configMapGenerator"] if g["name"] == "nats-auth"]
    key, path = auth["files"][0].split("=")
    return [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET},
             "stringData": {k: "x" for k in SECRET_KEYS}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "nats-auth"},
             "data": {key: (K8S / path).read_text()}}]


def app_containers() -> dict[str, dict]:
    """WarmServe service name -> its container (the one running `warmserve service NAME`)."""
    found = {}
    for workload in WORKLOADS:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            line = " ".join(container.get("command", []) + container.get("args", []))
            started = re.search(r"(?:^|warmserve )service (\w+)", line)
            if started:
                found[started.group(1)] = container
    return found


def environment(container: dict) -> dict[str, str]:
    """The container's variables as a pod sees them: ConfigMaps, then its own (secrets as "x",
    $(NAME) expanded as Kubernetes does)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(BY_NAME["ConfigMap", source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        value = var.get("value", "x")
        env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    return env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(version):
    for obj in OBJECTS + generated():
        kubernetes_validate.validate(obj, version, strict=True)  # raises naming the bad field
    typo = copy.deepcopy(BY_NAME["Deployment", "gateway"])
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: an unknown field is an error
        kubernetes_validate.validate(typo, version, strict=True)


def test_the_kustomization_names_every_manifest():
    assert set(KUSTOMIZATION["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_every_service_runs_and_each_exists_in_code():
    assert set(app_containers()) == set(SERVICES)


def test_every_setting_exists_and_each_service_starts_with_valid_settings():
    for name, container in app_containers().items():
        env = environment(container)
        unknown = {k for k in env if k.startswith("WARMSERVE_")} - SETTING_VARS
        assert not unknown, f"{name}: {unknown}"
        env.setdefault(env_name("node"), "node-a")  # the agent's is set by its command from the node's name
        load_settings({}, env=env)  # raises listing every invalid value


def test_probes_hit_livez_and_readyz_on_the_port_the_service_listens_on():
    for name, container in app_containers().items():
        env = environment(container)
        listens = int(env["WARMSERVE_GATEWAY_PORT"] if name == "gateway" else env["WARMSERVE_HEALTH_PORT"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("health") == int(env["WARMSERVE_HEALTH_PORT"]), name
        for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and ports[get["port"]] == listens, (name, probe)


def test_metrics_are_scraped_from_each_health_port():
    for workload in WORKLOADS:
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if workload["metadata"]["name"] in SERVICES:
            (container,) = workload["spec"]["template"]["spec"]["containers"]
            assert annotations["prometheus.io/port"] == environment(container)["WARMSERVE_HEALTH_PORT"]
            assert annotations["prometheus.io/path"] == "/metrics"


def test_services_point_at_ports_their_pods_have():
    for service in (o for o in OBJECTS if o["kind"] == "Service"):
        (workload,) = [w for w in WORKLOADS
                       if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        names = {p["name"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    gateway = app_containers()["gateway"]
    gateway_port = int(environment(gateway)["WARMSERVE_GATEWAY_PORT"])
    assert BY_NAME["Service", "gateway"]["spec"]["ports"][0]["port"] == gateway_port
    nats_url = BY_NAME["ConfigMap", "warmserve-config"]["data"]["WARMSERVE_NATS_URL"]
    assert nats_url == f"nats://nats:{BY_NAME['Service', 'nats']['spec']['ports'][0]['port']}"


def test_shape_of_the_deployment():
    assert BY_NAME["Deployment", "placer"]["spec"]["replicas"] == 2  # leader and standby (Redis lease)
    assert BY_NAME["HorizontalPodAutoscaler", "gateway"]["spec"]["scaleTargetRef"]["name"] == "gateway"
    agent = BY_NAME["DaemonSet", "gpuagent"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" in agent["containers"][0]["resources"]["limits"]
    assert any(v.get("hostPath") for v in agent["volumes"])  # checkpoints from the node
    nats = BY_NAME["StatefulSet", "nats"]["spec"]
    assert "-js" in nats["template"]["spec"]["containers"][0]["args"] and nats["volumeClaimTemplates"]
    redis = BY_NAME["StatefulSet", "redis"]["spec"]
    assert "--appendonly" in redis["template"]["spec"]["containers"][0]["command"] and redis["volumeClaimTemplates"]


def test_credentials_come_from_the_generated_secret():
    refs = [(w["metadata"]["name"], v["valueFrom"]["secretKeyRef"]) for w in WORKLOADS
            for c in w["spec"]["template"]["spec"]["containers"] for v in c.get("env", [])
            if "secretKeyRef" in v.get("valueFrom", {})]
    assert refs and all(ref["name"] == SECRET and ref["key"] in SECRET_KEYS for _, ref in refs)
    for name, container in app_containers().items():
        env = environment(container)
        assert env["WARMSERVE_NATS_USER"] == name and env["WARMSERVE_REDIS_URL"].startswith(f"redis://{name}:")
    assert not (K8S / "credentials.env").exists() or "credentials.env" in (ROOT / ".gitignore").read_text()


def test_nats_and_redis_give_each_identity_what_compose_gives_it():
    assert (K8S / "nats-auth.conf").read_text() == (ROOT / "deploy" / "nats-auth.conf").read_text(), \
        "kustomize reads no file outside deploy/k8s: cp deploy/nats-auth.conf deploy/k8s/"
    nats_env = {v["name"] for v in BY_NAME["StatefulSet", "nats"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    passwords = set(re.findall(r"password\": \$(\w+)", (K8S / "nats-auth.conf").read_text()))
    assert passwords and passwords <= nats_env
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    as_compose = [re.sub(r"\$\{(\w+):\?[^}]*\}", r"$(\1)", arg) for arg in compose]
    assert BY_NAME["StatefulSet", "redis"]["spec"]["template"]["spec"]["containers"][0]["command"] == as_compose
