"""When `warmserve up` restarts a process that died, and when it gives up (pure: times come in as
arguments; up.py watches the processes and restarts them).

A crashed process is restarted after a backoff that doubles with each of its crashes inside the
window (0.5 s, 1 s, 2 s, ... at most 10 s); once one crashed `max_crashes` times inside the window,
the stack stops: something is wrong that restarting does not fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Restart:
    delay_s: float  # restart this long after the crash
    crashes: int  # its crashes inside the window, this one included


@dataclass(frozen=True)
class GiveUp:
    crashes: int
    window_s: float


@dataclass
class Supervisor:
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_crashes: int = 5
    window_s: float = 60.0
    crash_times: dict[str, list[float]] = field(default_factory=dict)  # name -> its crashes inside the window
    restart_at: dict[str, float] = field(default_factory=dict)  # name -> when its restart is due

    def crashed(self, name: str, now_s: float) -> Restart | GiveUp:
        recent = [t for t in self.crash_times.get(name, ()) if now_s - t < self.window_s] + [now_s]
        self.crash_times[name] = recent
        if len(recent) >= self.max_crashes:
            return GiveUp(len(recent), self.window_s)
        delay_s = min(self.first_backoff_s * 2 ** (len(recent) - 1), self.max_backoff_s)
        self.restart_at[name] = now_s + delay_s
        return Restart(delay_s, len(recent))

    def waiting(self, name: str) -> bool:
        """A restart of `name` is scheduled and not yet due."""
        return name in self.restart_at

    def due(self, now_s: float) -> list[str]:
        """The restarts whose backoff has passed, each returned once."""
        names = sorted(name for name, at_s in self.restart_at.items() if at_s <= now_s)
        for name in names:
            del self.restart_at[name]
        return names
