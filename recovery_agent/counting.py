"""The count step: GRUB's count of failed boots, and the agent's count of its own visits.

GRUB counts boots in ``boot_count`` (grubenv on the ESP) and starts the recovery environment
at ``boot_limit``; the agent counts its visits in ``recovery_attempts`` and, once it has made
``max_recovery_attempts`` of them, stops for a person instead of looping (docs/recovery-loop.md,
docs/boot-counting.md). This module reads and writes those counters for the agent:

1. ``count_visit`` reads grubenv and, when asked, adds this visit to ``recovery_attempts``.
   A damaged block of the right size (GRUB cannot read it either, and would start recovery for
   ever) is replaced by a fresh one. A block that cannot be read or rewritten, or a count that
   cannot be saved, makes this visit the last, and says why: the agent reports all the same.
   Values over ``COUNTER_MAX`` read as ``COUNTER_MAX``.
2. ``boot_history`` turns the count into the report's boot records, the last ``HISTORY_LIMIT``.
3. ``reset_boot_count`` sets ``boot_count`` to 0 so the next boot tries the OS (after a fix, or
   to let the OS try again); it says when it cannot.

Nothing here raises for a grubenv it cannot use: the caller gets the count it can trust and the
notes that say what it could not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .bootenv import BOOT_COUNT, BOOT_LIMIT, RECOVERY_ATTEMPTS, BootEnv, BootEnvError
from .protocol.wire import COUNTER_MAX, BootRecord, CrashKind, CrashSignature

# What the boots GRUB counted ended in, by the kind of crash found (the rest crashed).
_BOOT_OUTCOME: dict[CrashKind, Literal["crashed", "hung", "healthy", "unknown"]] = {
    CrashKind.HANG: "hung",
    CrashKind.UNKNOWN: "unknown",
    CrashKind.NONE: "unknown",
    CrashKind.AGENT_ERROR: "unknown",
}
# Boot records kept in a report: the last boots; a boot_count of millions is one number.
HISTORY_LIMIT = 16


@dataclass(frozen=True)
class BootCount:
    """What the count step found in grubenv, and whether it could keep this visit's count."""

    boot_count: int
    attempts: int  # recovery_attempts, this visit included
    # recovery_attempts was saved: else the agent cannot bound its visits and this one is the
    # last (attempts is then max_recovery_attempts).
    kept: bool = True
    notes: list[str] = field(default_factory=list)


def count_visit(
    grubenv: Path,
    *,
    boot_limit: int,
    max_attempts: int,
    count: bool,
    say: Callable[[str], None],
) -> BootCount:
    """grubenv's ``boot_count`` and, with ``count``, this visit added to ``recovery_attempts``
    and saved. A damaged block of the right size is replaced by a fresh one (``count`` only).
    Never raises: a grubenv that cannot be read or written makes this visit the last, and
    says why."""
    notes: list[str] = []
    try:
        try:
            env = BootEnv.read(grubenv)
        except BootEnvError as damaged:
            if not count:
                raise
            env = _rewrite_damaged(grubenv, boot_limit, damaged, say)
            notes.append(f"grubenv was damaged ({damaged}): a fresh block was written in its place")
    except (BootEnvError, OSError) as exc:
        return BootCount(
            boot_count=boot_limit,
            attempts=max_attempts,
            kept=False,
            notes=[
                f"grubenv cannot be read ({exc}): boot_count taken as {boot_limit} (GRUB "
                f"starts recovery when it cannot keep its count); this recovery attempt is the "
                f"last: without a fix the machine waits for a person"
            ],
        )
    notes += [
        f"grubenv {name} is over {COUNTER_MAX}: read as {COUNTER_MAX}"
        for name in (BOOT_COUNT, RECOVERY_ATTEMPTS)
        if env.clamped(name)
    ]
    if not count:
        return BootCount(env.boot_count, env.recovery_attempts, notes=notes)
    attempts = min(env.recovery_attempts + 1, COUNTER_MAX)
    env.set(RECOVERY_ATTEMPTS, attempts)
    try:
        env.write(grubenv)
    except (BootEnvError, OSError) as exc:
        notes.append(
            f"recovery_attempts could not be saved in grubenv ({exc}): the agent cannot count "
            f"its visits, so this recovery attempt is the last: without a fix the machine waits "
            f"for a person"
        )
        return BootCount(env.boot_count, max(attempts, max_attempts), kept=False, notes=notes)
    return BootCount(env.boot_count, attempts, notes=notes)


def _rewrite_damaged(
    grubenv: Path, boot_limit: int, exc: BootEnvError, say: Callable[[str], None]
) -> BootEnv:
    """A fresh block in place of a damaged one. GRUB cannot read it either, so it could not
    count this boot and chose recovery, and would choose it for ever: the count could never be
    reset (docs/boot-counting.md). GRUB counted nothing, so the fresh block says no failed
    boots; the crash records still tell what happened. A block that cannot be rewritten (the
    wrong size, an I/O error) raises."""
    env = BootEnv.new({BOOT_COUNT: 0, BOOT_LIMIT: boot_limit})
    env.write(grubenv)  # in place; a block of the wrong size is refused here too
    say(f"{exc}: wrote a fresh block in its place ({dict(env)})")
    return env


def boot_history(boot_count: int, crash: CrashSignature) -> tuple[list[BootRecord], list[str]]:
    """Records of the last ``HISTORY_LIMIT`` boots GRUB counted, and a note if there were more."""
    outcome = _BOOT_OUTCOME.get(crash.kind, "crashed")
    boots = max(boot_count, 1)
    first = max(0, boots - HISTORY_LIMIT)
    history = [BootRecord(index=i, outcome=outcome, detail=crash.title[:512]) for i in range(first, boots)]
    notes = (
        [f"boot history: {boot_count} failed boots counted, the last {HISTORY_LIMIT} listed"] if first else []
    )
    return history, notes


def reset_boot_count(grubenv: Path, say: Callable[[str], None]) -> bool:
    """Set grubenv's ``boot_count`` to 0, so the next boot tries the OS; False (and said) if
    grubenv cannot be read or written."""
    try:
        BootEnv.read(grubenv).reset_boot_count(grubenv)
    except (BootEnvError, OSError) as exc:
        say(f"could not reset boot_count: {exc}")
        return False
    return True
