"""`python -m services.placer [--flags]`: run the placer service until SIGTERM."""

from __future__ import annotations

import sys

from services.placer.service import PlacerService
from shared.runner import main
from shared.settings import settings_from_argv

if __name__ == "__main__":
    main(PlacerService, settings_from_argv(sys.argv[1:], "WarmServe placer: prewarm placement and autoscaling"))
