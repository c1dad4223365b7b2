"""`python -m services.forecaster [--flags]`: run the forecaster service until SIGTERM/SIGINT."""

from __future__ import annotations

import sys

from services.forecaster.service import ForecasterService
from shared.runner import main
from shared.settings import settings_from_argv

if __name__ == "__main__":
    main(ForecasterService, settings_from_argv(sys.argv[1:], "WarmServe forecaster: load samples in, forecasts out"))
