"""Applying a verified directive's actions to a machine's OS root, and taking them back.

This module owns the workflow of every change a directive makes to the OS partition; what
each action does is ``actions``, the records are ``journal``, the safe file access ``osroot``:

1. ``apply_directive(os_root, directive)`` first runs a **preflight** that changes nothing:
   every action names one path, none inside the agent's own state and none twice; each path
   is walked one directory at a time from an fd on the OS root (no ``..``, no absolute path,
   no symlink, no mount crossing), each file is hashed through the handle it was opened with,
   and the quarantine and journal folders are walked too. Any failure raises a
   ``RemediationError`` and the disk is exactly as it was.
2. It then writes an **intent journal** (``var/lib/recovery/journal/<directive_id>.json``:
   the actions, each step "planned", state "applying") durably.
3. It runs the steps in order, updating the journal after each one. Files are never deleted:
   a file taken off the machine is moved into ``var/lib/recovery/quarantine/<directive_id>/``
   and recorded in ``manifest.json`` there. Each step is idempotent, so running it twice is
   harmless. A step that fails rolls back what was done. Final state: "applied".
4. At agent start, ``settle_journals(os_root)`` finds journals left "applying" by a power loss
   and rolls each one forward (the remaining steps still preflight) or else back; one left
   "rolling_back" (a roll back is journaled too) is rolled back to the end. A directive rolled
   forward is applied now, but the run that started it never finished its work (``Settled``
   says so): the agent does that next.
5. ``undo`` puts everything back; ``list_quarantine`` reports what is held; ``purge`` deletes a
   directive's quarantine, and only once the machine has booted well with it (the caller
   decides that: ``recovery-agent quarantine purge`` asks for the healthy boot's confirmation).

The journal and the manifest hold everything needed for steps 4 and 5 without the directive.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import holds
from .actions import DirectiveSteps, StepOutcome, action_target
from .errors import RemediationError
from .journal import (
    IntentJournal,
    JournalError,
    JournalStep,
    QuarantineEntry,
    check_directive_id,
    is_directive_id,
    journal_relpath,
    journaled_directives,
    quarantine_relpath,
    read_journal,
    write_journal,
)
from .layout import JOURNAL_DIR, QUARANTINE_DIR, STATE_DIR
from .osroot import MissingFile, OSRoot, PathRejected, file_kind, lstat_at, split_relpath
from .protocol.wire import Action, ActionResult, Directive, RecoveryTest, RestoreFile, utcnow
from .quarantine import Quarantine

# --------------------------------------------------------------------------- the workflow


def _preflight(steps: DirectiveSteps, planned: Sequence[tuple[int, Action]]) -> list[StepOutcome]:
    """Check every step against the disk as it is now; raise on the first that cannot be
    applied. Changes nothing."""
    targets: dict[str, int] = {}
    for index, action in planned:
        target = action_target(action)
        split_relpath(target)
        # (a recovery test's record is the one write there: a path the agent makes itself)
        if (target == STATE_DIR or target.startswith(STATE_DIR + "/")) and not isinstance(
            action, RecoveryTest
        ):
            raise PathRejected(
                f"action {index}: {target} is inside the agent's own state "
                f"({STATE_DIR}): a remediation may not touch it"
            )
        if target in targets:
            raise RemediationError(
                f"actions {targets[target]} and {index} both change "
                f"{target}: fix the remediation so each file is named once"
            )
        targets[target] = index
    for index, action in planned:
        if isinstance(action, RestoreFile) and action.source in targets:
            raise RemediationError(
                f"action {index} restores from {action.source}, which action "
                f"{targets[action.source]} changes: fix the remediation"
            )
    # Walked now so that a symlinked or foreign-mounted state folder fails before any change.
    steps.root.missing_dirs(steps.quarantine.relpath)
    steps.root.missing_dirs(JOURNAL_DIR)
    return [steps.step(index, action, dry_run=True) for index, action in planned]


def _run(
    steps: DirectiveSteps, journal: IntentJournal, on_step: Callable[[int], None] | None
) -> list[ActionResult]:
    """Run the journal's planned steps in order, recording each; on a step's failure roll
    back what was done and raise."""
    for step in journal.steps:
        if step.status != "planned":
            continue
        try:
            outcome = steps.step(step.index, step.action, dry_run=False)
        except (RemediationError, OSError) as exc:
            lines, _ = _roll_back(steps, journal)
            undone = "; ".join(lines) if lines else "nothing had been changed"
            raise RemediationError(
                f"directive {journal.directive_id}: step {step.index} ({step.action.type}) "
                f"failed: {exc} -- rolled back: {undone}"
            ) from exc
        holds.reached("manifest")
        step.status = "done"
        step.result = "already_applied" if outcome.status == "already_applied" else "applied"
        step.detail = outcome.detail
        step.keep(outcome.moved)
        if all(s.status == "done" for s in journal.steps):
            journal.state = "applied"
        write_journal(steps.root, journal)
        # After the journal is durable: a crash inside on_step is a crash after this step.
        if on_step is not None:
            on_step(step.index)
    if journal.state != "applied":
        journal.state = "applied"
        write_journal(steps.root, journal)
    return [
        ActionResult(index=s.index, type=s.action.type, status=s.result or "applied", detail=s.detail[:2048])
        for s in journal.steps
    ]


def _roll_back(steps: DirectiveSteps, journal: IntentJournal) -> tuple[list[str], bool]:
    """Undo the journal's steps, last first: ``(one line per step, whether all are undone)``.
    The journal says "rolling_back" first, so a power loss midway is finished at the next start
    rather than rolled forward over half-undone steps; it becomes "rolled_back" only if every
    step could be undone, otherwise it stays "rolling_back" (retried at each start) and the
    lines say what blocks it."""
    if journal.state != "rolling_back":
        journal.state = "rolling_back"
        write_journal(steps.root, journal)
    lines: list[str] = []
    complete = True
    for step in reversed(journal.steps):
        if step.status == "rolled_back" or step.plan == "already_applied":
            continue
        try:
            line, done = steps.undo_step(step)
        except (RemediationError, OSError) as exc:
            line, done = f"step {step.index}: could not be undone: {exc}", False
        lines.append(line)
        if done:
            step.status = "rolled_back"
        else:
            complete = False
    if complete:
        journal.state = "rolled_back"
    journal.notes.append(f"{utcnow().isoformat()} roll back: " + "; ".join(lines))
    write_journal(steps.root, journal)
    return lines, complete


# --------------------------------------------------------------------------- public API


def apply_directive(
    os_root: Path | str, directive: Directive, *, on_step: Callable[[int], None] | None = None
) -> list[ActionResult]:
    """Apply a verified directive to the OS root: preflight, journal, steps (see the module
    docstring). ``on_step(i)`` runs after step ``i`` and its journal update are durable.

    Raises a ``RemediationError`` if preflight fails (nothing changed) or a step fails (what was
    done is rolled back first)."""
    directive_id = check_directive_id(directive.directive_id)
    actions = list(directive.actions)
    with OSRoot(os_root) as root, DirectiveSteps(root, directive_id) as steps:
        journal = read_journal(root, directive_id)
        if journal is not None:
            if journal.state in ("applied", "purged"):
                return [
                    ActionResult(
                        index=s.index,
                        type=s.action.type,
                        status="already_applied",
                        detail=f"directive {directive_id} was applied before "
                        f"({journal.state} {journal.updated_at.isoformat()})",
                    )
                    for s in journal.steps
                ]
            if journal.state in ("applying", "rolling_back"):
                raise JournalError(
                    f"directive {directive_id} has an unfinished {journal.state[:-3]} in "
                    f"{journal_relpath(directive_id)}: run recover_journals first (the agent "
                    f"does at start)"
                )
            raise JournalError(
                f"directive {directive_id} was rolled back on this machine: ask the server for a "
                f"new directive if it should be applied again"
            )
        outcomes = _preflight(steps, list(enumerate(actions)))
        now = utcnow()
        journal = IntentJournal(
            directive_id=directive_id,
            remediation_id=directive.remediation_id,
            state="applying",
            created_at=now,
            updated_at=now,
            steps=[
                JournalStep(
                    index=i,
                    action=a,
                    creates=o.creates,
                    plan="already_applied" if o.status == "already_applied" else "apply",
                )
                for i, (a, o) in enumerate(zip(actions, outcomes, strict=True))
            ],
        )
        # The first change to the disk: from here on, a power loss is recovered from the journal.
        try:
            write_journal(root, journal)
        except OSError as exc:  # a full or read-only OS partition, say: refused before any change
            raise RemediationError(
                f"cannot write the intent journal {journal_relpath(directive_id)} ({exc.strerror or exc}): "
                f"nothing was changed; free space on the OS partition (or repair it), then let the "
                f"agent run again"
            ) from exc
        holds.reached("journal")
        return _run(steps, journal, on_step)


@dataclass(frozen=True)
class Settled:
    """What settling did with one journal a power loss left unfinished (``line`` says it).
    ``results`` is set when the apply was rolled forward: the directive is applied now, but the
    run that started it never reset the boot count, recorded the directive or reported it."""

    directive_id: str
    line: str
    results: tuple[ActionResult, ...] | None = None

    @property
    def rolled_forward(self) -> bool:
        return self.results is not None


def settle_journals(os_root: Path | str) -> list[Settled]:
    """At agent start: finish or revert every apply a power loss interrupted. A journal is
    rolled forward when all its remaining steps still preflight, else rolled back."""
    settled: list[Settled] = []
    with OSRoot(os_root) as root:
        for directive_id in journaled_directives(root):
            try:
                journal = read_journal(root, directive_id)
            except RemediationError as exc:
                settled.append(Settled(directive_id, f"directive {directive_id}: journal not usable: {exc}"))
                continue
            if journal is None or journal.state not in ("applying", "rolling_back"):
                continue
            settled.append(_recover_one(root, journal))
    return settled


def recover_journals(os_root: Path | str) -> list[str]:
    """``settle_journals``, one line per journal handled."""
    return [s.line for s in settle_journals(os_root)]


def _recover_one(root: OSRoot, journal: IntentJournal) -> Settled:
    directive_id = journal.directive_id
    with DirectiveSteps(root, directive_id) as steps:
        if journal.state == "rolling_back":
            undone, complete = _roll_back(steps, journal)
            verdict = "finished" if complete else "still incomplete, retried at next start"
            return Settled(
                directive_id,
                f"directive {directive_id}: interrupted roll back {verdict}: " + "; ".join(undone),
            )
        remaining = [s for s in journal.steps if s.status == "planned"]
        try:
            _preflight(steps, [(s.index, s.action) for s in remaining])
        except RemediationError as exc:
            undone, complete = _roll_back(steps, journal)
            verdict = "rolled back" if complete else "roll back incomplete, retried at next start"
            return Settled(
                directive_id,
                f"directive {directive_id}: interrupted apply {verdict}, because a remaining "
                f"step no longer applies ({exc}): " + "; ".join(undone),
            )
        try:
            results = _run(steps, journal, None)
        except RemediationError as exc:
            return Settled(directive_id, f"directive {directive_id}: roll forward failed: {exc}")
        done = ", ".join(str(s.index) for s in remaining) or "none left"
        return Settled(
            directive_id,
            f"directive {directive_id}: interrupted apply rolled forward (steps run: {done})",
            tuple(results),
        )


def undo(os_root: Path | str, directive_id: str) -> list[str]:
    """Put back everything a directive changed; the journal becomes "rolled_back". Raises a
    ``RemediationError`` listing what blocks it if something cannot be put back."""
    directive_id = check_directive_id(directive_id)
    with OSRoot(os_root) as root, DirectiveSteps(root, directive_id) as steps:
        journal = read_journal(root, directive_id)
        if journal is None:
            raise JournalError(
                f"no journal {journal_relpath(directive_id)}: directive "
                f"{directive_id} was never applied to this OS root; check the id "
                f"with `recovery-agent quarantine list`"
            )
        if journal.state == "rolled_back":
            return [f"directive {directive_id} is already rolled back; nothing changed"]
        if journal.state == "purged":
            raise JournalError(
                f"directive {directive_id} was purged after a good boot: its "
                f"quarantine is gone, so it cannot be undone; ask for a "
                f"remediation that reverses it"
            )
        lines, complete = _roll_back(steps, journal)
        if not complete:
            raise RemediationError(f"directive {directive_id}: undo incomplete: " + "; ".join(lines))
        return lines


def purge(os_root: Path | str, directive_id: str) -> None:
    """After a confirmed good boot: delete the directive's quarantine folder; the journal
    becomes "purged" (kept, so the directive is never applied twice). Whether the boot was
    good is the caller's to decide."""
    directive_id = check_directive_id(directive_id)
    with OSRoot(os_root) as root:
        journal = read_journal(root, directive_id)
        if journal is None:
            raise JournalError(
                f"no journal {journal_relpath(directive_id)}: nothing to purge "
                f"for directive {directive_id}; check the id with `recovery-agent quarantine list`"
            )
        if journal.state == "purged":
            return
        if journal.state in ("applying", "rolling_back"):
            raise JournalError(
                f"directive {directive_id} is still {journal.state}: run the agent "
                f"(it recovers interrupted journals at start) first, and purge only after a good boot"
            )
        qdir = quarantine_relpath(directive_id)
        try:
            with root.open_dir(QUARANTINE_DIR) as qroot:
                st = lstat_at(qroot, directive_id)
                if st is not None:
                    if not stat.S_ISDIR(st.st_mode):
                        raise PathRejected(f"{qdir} is {file_kind(st.st_mode)}: remove it by hand")
                    # fd-relative and symlink-safe (shutil.rmtree.avoids_symlink_attacks).
                    shutil.rmtree(directive_id, dir_fd=qroot)
                    os.fsync(qroot)
        except MissingFile:
            pass  # nothing was ever quarantined
        journal.state = "purged"
        journal.notes.append(f"{utcnow().isoformat()} purged {qdir}")
        write_journal(root, journal)


@dataclass(frozen=True)
class QuarantinedFile:
    """One file held in a directive's quarantine, as ``list_quarantine`` reports it."""

    directive_id: str
    journal_state: str  # the directive's journal state, or why there is none to tell
    entry: QuarantineEntry
    present: bool  # the stored file is still in the quarantine folder


def list_quarantine(os_root: Path | str) -> list[QuarantinedFile]:
    """Every quarantined file on the OS root, one per manifest entry, directive by directive."""
    found: list[QuarantinedFile] = []
    with OSRoot(os_root) as root:
        try:
            with root.open_dir(QUARANTINE_DIR) as qroot:
                directive_ids = sorted(n for n in os.listdir(qroot) if is_directive_id(n))
        except MissingFile:
            return []
        for directive_id in directive_ids:
            state: str
            journal: IntentJournal | None = None
            try:
                journal = read_journal(root, directive_id)
                state = journal.state if journal is not None else "no journal"
            except RemediationError:
                state = "journal unreadable"
            with Quarantine(root, directive_id) as quarantine:
                try:
                    entries = quarantine.manifest().entries
                except JournalError:
                    # The journal keeps the same entries: list what it says is held.
                    entries = [e for s in journal.steps for e in s.moved] if journal is not None else []
                    state += ", manifest unreadable"
                for entry in entries:
                    found.append(
                        QuarantinedFile(directive_id, state, entry, quarantine.holds(entry.stored_name))
                    )
    return found
