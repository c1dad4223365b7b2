"""Placer leadership from lease answers (pure: times come in as arguments; the service keeps the
lease in Redis, acts only while `holds`, and reports the changes as events).

A placer leads from an acquired lease until a renewal is refused, or until the lease may have
expired unseen (no renewal answered for a TTL, e.g. Redis is down): it stops acting before any
other placer can take the lease over.
"""

from __future__ import annotations

from dataclasses import dataclass

ELECTED = "leader_elected"
LOST = "leader_lost"


@dataclass
class Leadership:
    ttl_s: float  # the lease's time to live, set anew by every acquire or renewal
    leading: bool = False
    valid_until_s: float = 0.0  # the lease holds at least until then (counted from when it was asked for)

    def answered(self, asked_at_s: float, held: bool) -> str | None:
        """The store answered an acquire or renewal sent at `asked_at_s`: ELECTED, LOST or None."""
        was = self.leading
        self.leading = held
        if held:
            self.valid_until_s = asked_at_s + self.ttl_s
        return self._change(was)

    def unanswered(self, now_s: float) -> str | None:
        """The store could not be asked: leading only while the last lease still holds."""
        was = self.leading
        self.leading = self.holds(now_s)
        return self._change(was)

    def holds(self, now_s: float) -> bool:
        return self.leading and now_s < self.valid_until_s

    def _change(self, was: bool) -> str | None:
        if self.leading != was:
            return ELECTED if self.leading else LOST
        return None

