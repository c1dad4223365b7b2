"""`python -m services.gpuagent [flags]`: run this node's GPU agent."""

from services.gpuagent.service import AgentService
from shared.runner import main
from shared.settings import settings_from_argv

if __name__ == "__main__":
    main(AgentService, settings_from_argv(None, "WarmServe GPU agent: weight pool, prewarm/promote on this node"))
