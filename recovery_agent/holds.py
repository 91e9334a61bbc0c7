"""Lab-only holds: the agent stops at a named step of applying a directive so that the lab can
cut the power exactly there.

The lab's power-loss faults (``recovery_lab.faults``) must reset the machine at a known point
of the apply, not at whatever moment a timer fires. With ``lab_hold_at`` in the agent's
settings, the agent, on reaching that step, prints ``QMR-HOLD <step>`` on the console and
waits (at most :data:`HOLD_MAX_S`, then goes on) for the host to reset the machine. Without it,
which is every real machine, a step is a no-op. The steps, in the order an apply reaches them:

``journal``
    the intent journal is durable; nothing was changed yet
``moved``
    a file was renamed into quarantine; its manifest entry is not written yet
``manifest``
    a step is done, its manifest entry written; the journal does not say so yet
``grubenv``
    the directive is applied and recorded for the next boot, ``boot_count`` is reset; the
    result is not sent yet
``result``
    just before the result is sent

The code that applies (``remediate``, ``quarantine``, ``agent``) calls :func:`reached`; the
agent installs its hold for the run (:func:`install`). Each agent run installs its own (or
none), in its own context, so one run's hold never reaches another.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Literal, get_args

HoldStep = Literal["journal", "moved", "manifest", "grubenv", "result"]
HOLD_STEPS: tuple[str, ...] = get_args(HoldStep)
# The lab resets the machine within seconds of the marker; a hold never stops a machine for good.
HOLD_MAX_S = 600.0
MARKER = "QMR-HOLD"

Hold = Callable[[HoldStep], None]

_hold: ContextVar[Hold | None] = ContextVar("recovery_agent_hold", default=None)


def install(hold: Hold | None) -> None:
    """Call ``hold(step)`` at every step from now on in this context (None: at none)."""
    _hold.set(hold)


def reached(step: HoldStep) -> None:
    """The apply reached ``step``: hold there if the run asked to."""
    hold = _hold.get()
    if hold is not None:
        hold(step)


def hold_at(
    wanted: HoldStep, say: Callable[[str], None], sleep: Callable[[float], None] = time.sleep
) -> Hold:
    """The lab's hold: at ``wanted``, say the marker and wait for the power to go."""

    def hold(step: HoldStep) -> None:
        if step != wanted:
            return
        say(f"{MARKER} {step}: waiting for the lab to cut the power")
        sleep(HOLD_MAX_S)
        say(f"{MARKER} {step}: nobody cut the power in {HOLD_MAX_S:.0f}s; going on")

    return hold
