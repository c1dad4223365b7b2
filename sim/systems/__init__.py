"""The systems the simulator compares: baselines that are not WarmServe policies (ServerlessLLM-like,
MuxServe-like) live here; the WarmServe variants drive the live services' forecaster and placer cores."""
