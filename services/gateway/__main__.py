"""`python -m services.gateway`: run the gateway (settings from flags and WARMSERVE_* variables)."""

import sys

from services.gateway.service import GatewayService
from shared.runner import main
from shared.settings import settings_from_argv

if __name__ == "__main__":
    main(GatewayService, settings_from_argv(sys.argv[1:], "WarmServe gateway: OpenAI-compatible API"))
