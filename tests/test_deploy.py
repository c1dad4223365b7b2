"""Deployment files: Docker cannot run here, so the compose file is parsed and checked against
the code (services, settings, health endpoints, GPU reservation, Dockerfiles), and so is CI."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from shared.settings import Settings, env_name
from warmserve.service import SERVICES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SETTING_VARS = {env_name(f.name) for f in dataclasses.fields(Settings)}
APP_SERVICES = {name: svc for name, svc in COMPOSE["services"].items() if svc.get("command", [None])[0] == "service"}


def test_every_service_runs_and_each_exists_in_code():
    started = {svc["command"][1] for svc in APP_SERVICES.values()}
    assert started == set(SERVICES)


def test_infrastructure_has_jetstream_and_persistence():
    assert "-js" in COMPOSE["services"]["nats"]["command"]
    assert "--appendonly" in COMPOSE["services"]["redis"]["command"]
    assert all("healthcheck" in COMPOSE["services"][n] for n in ("nats", "redis"))


def test_every_environment_variable_is_a_setting_and_valid():
    from shared.settings import load_settings

    for name, svc in COMPOSE["services"].items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        unknown = {k for k in env if k.startswith("WARMSERVE_")} - SETTING_VARS
        assert not unknown, f"{name}: {unknown}"
        if name in APP_SERVICES:
            load_settings({}, env=env)  # raises listing every invalid value


def test_healthchecks_probe_readyz_on_the_configured_port():
    for name, svc in APP_SERVICES.items():
        probe = " ".join(svc["healthcheck"]["test"])
        port = re.search(r"127\.0\.0\.1:(\d+)/readyz", probe)
        assert port, f"{name} healthcheck does not probe /readyz"
        env = svc["environment"]
        expected = env["WARMSERVE_GATEWAY_PORT"] if name == "gateway" else env["WARMSERVE_HEALTH_PORT"]
        assert port.group(1) == str(expected), name


def test_gateway_port_published_and_gpu_reserved_for_the_gpu_agent():
    assert "8000:8000" in COMPOSE["services"]["gateway"]["ports"]
    devices = COMPOSE["services"]["gpuagent"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert COMPOSE["services"]["gpuagent-cpu"]["profiles"] == ["cpu"]
    assert COMPOSE["services"]["demo-models"]["command"] == ["models", "build-demo"]


def test_dockerfiles_exist_and_copy_every_package():
    for svc in COMPOSE["services"].values():
        build = svc.get("build")
        if build:
            text = (ROOT / build["dockerfile"]).read_text()
            for package in ("shared", "services", "warmserve"):
                assert f"COPY {package} " in text


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci and "make run" in readme
