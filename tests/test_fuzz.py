"""Hostile input against a running stack (bench.fuzz, shorter): hypothesis-generated request bodies
and raw bus messages; never a 5xx, no service loop dies, a valid request after each still succeeds."""

from __future__ import annotations

import pytest

from bench.fuzz import fuzz_local

pytestmark = pytest.mark.slow


async def test_hostile_bodies_and_bus_messages_hurt_no_one():
    result, dead = await fuzz_local(bodies=400, messages=300, progress=lambda _: None)
    assert (result.bodies, result.messages) == (400, 300)
    assert [s for s in result.statuses if s >= 500] == [], result.server_errors
    assert result.follow_up_failures == [] and dead == []
    assert result.statuses[400] > 300  # most hostile bodies are refused as bad input
