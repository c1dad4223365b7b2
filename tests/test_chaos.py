"""The chaos benchmark, shorter (bench.chaos with the fake engine in worker processes): the real
`warmserve up` with embedded NATS and Redis and supervision, kill -9 of every service, a device
worker, nats-server and redis-server, and SIGTERM of the gateway, under load. Each fault: no hung
request, no obscure failure, requests succeed again within 10 s, and the state converges."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import FAULTS, run

pytestmark = pytest.mark.slow
RECOVERY_TARGET_S = 10.0


async def test_every_fault_heals_without_hangs_or_obscure_failures(demo_models, tmp_path):
    models_dir = Path(next(iter(demo_models.values())).path).parent
    result = await run("fake", list(FAULTS), devices=2, concurrency=2, max_tokens=4, say=print,
                       data_dir=str(tmp_path / "stack"), models_dir=str(models_dir), baseline_s=2.0)
    assert [f["fault"] for f in result["faults"]] == list(FAULTS)
    for fault in result["faults"]:
        assert (fault["hung"], fault["obscure_failures"]) == (0, 0), fault
        assert fault["unreachable"] == 0, fault  # even the gateway's restart: up holds its socket
        assert fault["recovery_s"] is not None and fault["recovery_s"] < RECOVERY_TARGET_S, fault
        assert fault["converged"], fault
        assert fault["ok"] > 0, fault
