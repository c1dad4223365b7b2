"""Restart policy of device workers (pure, no clock reads: times come in as arguments).

A worker that dies soon after it started waits twice as long as the last time before it is
started again (up to a cap); one that had been up for a while is started again after the base
delay. The shell records starts and deaths and asks when the next start may happen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RestartPolicy:
    base_s: float  # delay before the first restart
    max_s: float  # the longest delay
    stable_s: float  # a worker up this long has its crash count forgotten


@dataclass
class WorkerLife:
    """One device's worker history: when the current one started, how many died young in a row."""

    started_at_s: float = 0.0
    crashes: int = 0

    def started(self, now_s: float) -> None:
        self.started_at_s = now_s

    def died(self, now_s: float, policy: RestartPolicy) -> float:
        """Record a death at `now_s`; return when the next worker may start."""
        if now_s - self.started_at_s >= policy.stable_s:
            self.crashes = 0
        self.crashes += 1
        return now_s + min(policy.base_s * 2 ** (self.crashes - 1), policy.max_s)
