"""`warmserve service NAME [flags]`: run one service in this process (what `up` and the
compose file start)."""

from __future__ import annotations

import importlib
import sys

from shared.runner import main as run_service
from shared.settings import settings_from_argv

SERVICES = {
    "forecaster": ("services.forecaster.service", "ForecasterService"),
    "placer": ("services.placer.service", "PlacerService"),
    "gateway": ("services.gateway.service", "GatewayService"),
    "gpuagent": ("services.gpuagent.service", "AgentService"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SERVICES:
        print(f"usage: warmserve service {{{'|'.join(SERVICES)}}} [flags]", file=sys.stderr)
        return 2
    module, cls = SERVICES[argv[0]]
    factory = getattr(importlib.import_module(module), cls)
    run_service(factory, settings_from_argv(argv[1:], f"WarmServe {argv[0]}"))
    return 0
