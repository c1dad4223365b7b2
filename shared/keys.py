"""Every Redis key, built in one place: `{namespace}:{area}:...`.

Desired state (written by the placer) and observed state (written by agents) live under
different keys; heartbeats are keys with a TTL. Nothing else in the project writes a key string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    namespace: str

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    # registry: hash model name -> ModelInfo
    def models(self) -> str:
        return self._k("registry", "models")

    # observed (agents)
    def node_view(self, node: str) -> str:
        return self._k("observed", "node", node)

    def node_alive(self, node: str) -> str:
        return self._k("observed", "alive", node)

    def node_views_pattern(self) -> str:
        return self._k("observed", "node", "*")

    def command_results(self, node: str) -> str:
        return self._k("observed", "commands", node)

    # desired (placer)
    def plan(self) -> str:
        return self._k("desired", "plan")

    # the placer lease: the token of the placer that leads, with a TTL
    def placer_lease(self) -> str:
        return self._k("lease", "placer")

    # forecaster: hash window_start -> WindowStats per model, hash model -> Forecast
    def window_history(self, model: str) -> str:
        return self._k("forecast", "history", model)

    def partial_window(self) -> str:
        return self._k("forecast", "partial")

    def forecasts(self) -> str:
        return self._k("forecast", "current")
