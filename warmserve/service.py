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
        asked = argv[:1] in (["-h"], ["--help"])
        print(f"usage: warmserve service {{{'|'.join(SERVICES)}}} [flags]\n\n{__doc__}\n"
              f"`warmserve service NAME --help` lists the settings of that service.",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    module, cls = SERVICES[argv[0]]
    settings = settings_from_argv(argv[1:], f"Run the WarmServe {argv[0]} in this process.", ("shared", argv[0]),
                                  prog=f"warmserve service {argv[0]}")
    run_service(getattr(importlib.import_module(module), cls), settings)
    return 0
