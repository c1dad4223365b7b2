"""Shared fixtures: one real nats-server (JetStream) and redis-server per session on free ports,
and a fresh namespace per test so tests never see each other's subjects or keys."""

from __future__ import annotations

import uuid

import pytest

from shared.logs import configure_logging
from shared.settings import Settings, load_settings
from warmserve import infra


@pytest.fixture(scope="session")
def infra_servers(tmp_path_factory):
    configure_logging("debug")
    data = tmp_path_factory.mktemp("infra")
    nats = infra.start_nats(data, infra.free_port(), data / "nats.log")
    redis = infra.start_redis(data, infra.free_port(), data / "redis.log")
    yield nats, redis
    nats.stop()
    redis.stop()


@pytest.fixture
def settings(infra_servers, tmp_path) -> Settings:
    """Settings bound to the session's servers, with a namespace unique to this test."""
    nats, redis = infra_servers
    return load_settings({
        "namespace": "t" + uuid.uuid4().hex[:10],
        "nats_url": nats.url,
        "redis_url": redis.url,
        "data_dir": str(tmp_path / "var"),
        "drain_timeout_s": 5.0,
        "request_timeout_s": 5.0,
    }, env={})


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """The demo checkpoints, built once per session (no download): name -> ModelInfo."""
    import os
    from pathlib import Path

    from warmserve.models import build_demo

    cached = os.environ.get("WARMSERVE_TEST_MODELS_DIR")  # reuse a built models dir when given
    root = Path(cached) if cached else tmp_path_factory.mktemp("models")
    return {info.name: info for info in build_demo(root, log=lambda _: None)}
