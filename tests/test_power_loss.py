"""The lab's holds (recovery_agent.holds): the agent stops at a named step of an apply."""

from __future__ import annotations

from recovery_agent.holds import hold_at


def test_a_hold_says_its_marker_and_waits_only_at_its_step() -> None:
    said: list[str] = []
    slept: list[float] = []
    hold = hold_at("moved", said.append, slept.append)
    hold("journal")
    assert said == [] and slept == []
    hold("moved")
    assert said[0].startswith("QMR-HOLD moved:") and len(slept) == 1
