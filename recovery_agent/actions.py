"""The remediation actions, each a step that can be checked, applied and undone.

- ``quarantine_file``: the file at ``path``, if its sha256 (read through the open handle) is
  the directive's and it has no other hard link, is moved into the directive's quarantine.
- ``restore_file``: the driver store's copy at ``source`` (which must be in the driver store;
  checked by sha256, and hashed again while it is copied) replaces ``path``, keeping the old
  file's mode and owner; the old file, if it has no other hard link, goes to quarantine.
- ``disable_driver``: ``etc/modprobe.d/recovery-disable-<module>.conf`` (``blacklist`` and
  ``install <module> /bin/false``) is written; a different file of that name goes to
  quarantine.
- ``recovery_test`` (test mode only): ``var/lib/recovery/tests/<test id>.json`` is written, a
  record of the test in the agent's own state; nothing else changes.

``DirectiveSteps.step(index, action, dry_run=True)`` is one step's preflight: every check,
no change. With ``dry_run=False`` the same function makes the change, so what preflight
approved and what runs can never drift apart. Each step is idempotent: it recognises its own
work as "already_applied", which is what lets ``remediate`` roll a journal forward after a
power loss. ``undo_step`` takes one step back; when the original name is taken again, the
file stays in quarantine and the step says what blocks it.

Files are never deleted: a file a step takes away goes to the directive's quarantine folder
(``quarantine.Quarantine``); the step's outcome lists what it moved (``StepOutcome.moved``) and
an undo records its own moves in the journal step, so the journal holds what undo needs. Every
path is reached through ``osroot.OSRoot``. The order of the steps, the journal and the roll
back are ``remediate``'s.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Literal

from .digest import CHUNK, sha256_fd
from .errors import RemediationError
from .journal import JournalStep, QuarantineEntry, check_directive_id
from .layout import DRIVER_STORE, MODPROBE_DIR, RECOVERY_TESTS_DIR
from .osroot import (
    DEFAULT_FILE_MODE,
    STATE_DIR_MODE,
    SYSTEM_DIR_MODE,
    MissingFile,
    OSRoot,
    PathRejected,
    create_new,
    lstat_at,
    read_fd,
    remove_stale,
    write_all,
    write_atomic,
)
from .protocol.envelope import canonical_json
from .protocol.wire import Action, DisableDriver, QuarantineFile, RecoveryTest, RestoreFile, utcnow
from .quarantine import Quarantine, slot_name, undone_slot_name

_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # wire.ModuleName


class HashMismatch(RemediationError):
    """Raised when a file's sha256, read through its open handle, is not the directive's."""

    def __init__(self, path: str, expected: str, actual: str, fix: str) -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        super().__init__(f"{path}: sha256 is {actual}, the directive expects {expected}: {fix}")


# --------------------------------------------------------------------------- names


def modprobe_conf_path(module: str) -> str:
    """Where ``disable_driver`` writes its modprobe.d entry for ``module``."""
    return f"{MODPROBE_DIR}/recovery-disable-{module}.conf"


def modprobe_conf_content(module: str) -> bytes:
    # "install ... /bin/false" also stops explicit modprobe calls and dependency loads, which a
    # blacklist line alone does not.
    return f"blacklist {module}\ninstall {module} /bin/false\n".encode()


def action_target(action: Action) -> str:
    """The one path an action changes; ``PathRejected`` for a bad module name, and
    ``RemediationError`` for an action type this agent does not know."""
    if isinstance(action, (QuarantineFile, RestoreFile)):
        return action.path
    if isinstance(action, DisableDriver):
        if not isinstance(action.name, str) or not _MODULE_RE.match(action.name):
            raise PathRejected(
                f"module name {action.name!r} is not a kernel module name "
                f"(letters, digits, _ and -): fix the remediation"
            )
        return modprobe_conf_path(action.name)
    if isinstance(action, RecoveryTest):
        return recovery_test_path(action.test_id)
    raise RemediationError(
        f"action type {getattr(action, 'type', action)!r} is unknown to this "
        f"agent: update the agent or remove the action from the remediation"
    )


def recovery_test_path(test_id: str) -> str:
    """Where ``recovery_test`` records the test ``test_id`` (the agent's own state)."""
    if not isinstance(test_id, str) or not _MODULE_RE.match(test_id):  # wire.Identifier
        raise PathRejected(
            f"recovery test id {test_id!r} is not an identifier: the server's directive is bad"
        )
    return f"{RECOVERY_TESTS_DIR}/{test_id}.json"


def recovery_test_content(test_id: str, directive_id: str) -> bytes:
    return canonical_json({"directive_id": directive_id, "test_id": test_id}) + b"\n"


def _tmp_name(directive_id: str, index: int) -> str:
    return f".recovery-{directive_id}-{index}.tmp"


def _only_link(fd: int, relpath: str, doing: str) -> None:
    """Refuse a file that has other hard links: taking one name away (quarantine, or replace
    by a restore) would leave the same bad content loadable through the others."""
    links = os.fstat(fd).st_nlink
    if links > 1:
        raise PathRejected(
            f"{relpath} has {links} hard links: {doing} this name would leave the content "
            f"reachable through the others; find them (find / -samefile) and quarantine every "
            f"name in one remediation"
        )


# --------------------------------------------------------------------------- the steps


@dataclass
class StepOutcome:
    """What one step did, or (preflight) would do."""

    status: Literal["apply", "applied", "already_applied"]  # "apply": preflight says go
    detail: str
    creates: list[str] = field(default_factory=list)
    # The quarantine entries of the files the step moved there (or found there, its own).
    moved: list[QuarantineEntry] = field(default_factory=list)


class DirectiveSteps:
    """One directive's steps on one OS root: check (``dry_run``), apply and undo.
    Each step function does the checks and the change in one place, so that what preflight
    approved and what is executed can never drift apart."""

    def __init__(self, root: OSRoot, directive_id: str) -> None:
        self.root = root
        self.directive_id = check_directive_id(directive_id)
        self.quarantine = Quarantine(root, self.directive_id)

    def __enter__(self) -> DirectiveSteps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.quarantine.close()

    # -- apply (dry_run: preflight)

    def step(self, index: int, action: Action, *, dry_run: bool) -> StepOutcome:
        """Check one step against the disk as it is now (``dry_run``: change nothing) or apply it;
        raise a ``RemediationError`` if it cannot be applied."""
        if isinstance(action, QuarantineFile):
            outcome = self._quarantine(index, action, dry_run=dry_run)
        elif isinstance(action, RestoreFile):
            outcome = self._restore(index, action, dry_run=dry_run)
        elif isinstance(action, DisableDriver):
            outcome = self._disable(index, action, dry_run=dry_run)
        elif isinstance(action, RecoveryTest):
            outcome = self._record_test(action, dry_run=dry_run)
        else:
            action_target(action)  # raises the "unknown action" error
            raise AssertionError("unreachable")
        notes = self.quarantine.take_notes()
        if notes:
            outcome.detail = "; ".join([outcome.detail, *notes])
        return outcome

    def _quarantine(self, index: int, action: QuarantineFile, *, dry_run: bool) -> StepOutcome:
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = slot_name(index, name)
            held = self.quarantine.held_hash(slot)
            if held == action.sha256:
                moved = []
                if not dry_run:
                    moved = [self.quarantine.ensure_recorded(slot, action.path, index, held, "quarantined")]
                return StepOutcome(
                    "already_applied",
                    f"{action.path} is already quarantined as {self.quarantine.relpath}/{slot}",
                    moved=moved,
                )
            if held is not None:
                raise RemediationError(
                    f"{self.quarantine.relpath}/{slot} holds a file with sha256 {held}, not {action.sha256}: "
                    f"the quarantine was changed by hand; inspect it, then undo the directive"
                )
            with self.root.open_file_in(dir_fd, name, action.path) as fd:
                actual = sha256_fd(fd)
                if actual != action.sha256:
                    raise HashMismatch(
                        action.path,
                        action.sha256,
                        actual,
                        "this device's file is not the one the remediation targets; leave it and "
                        "ask for a remediation matching the content in the diagnostics",
                    )
                _only_link(fd, action.path, "quarantining")
                if dry_run:
                    return StepOutcome("apply", f"will quarantine {action.path}")
                entry = self.quarantine.move_in(
                    dir_fd, name, fd, actual, action.path, slot, index, "quarantined"
                )
        return StepOutcome(
            "applied", f"moved {action.path} to {self.quarantine.relpath}/{slot}", moved=[entry]
        )

    def _restore(self, index: int, action: RestoreFile, *, dry_run: bool) -> StepOutcome:
        # The wire refuses any other source too; checked again where it is applied.
        if not action.source.startswith(DRIVER_STORE + "/"):
            raise PathRejected(
                f"action {index}: restore_file source {action.source} is not in the driver store "
                f"({DRIVER_STORE}): a restore puts back a kept driver version, never another "
                f"file; fix the remediation"
            )
        moved: list[QuarantineEntry] = []
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = slot_name(index, name)
            tmp = _tmp_name(self.directive_id, index)
            current = lstat_at(dir_fd, name)
            held = self.quarantine.held_hash(slot)
            if current is not None:
                with self.root.open_file_in(dir_fd, name, action.path) as fd:
                    if sha256_fd(fd) == action.sha256:
                        if not dry_run:
                            remove_stale(dir_fd, tmp)
                            if held is not None:
                                moved.append(
                                    self.quarantine.ensure_recorded(
                                        slot, action.path, index, held, "replaced"
                                    )
                                )
                        return StepOutcome(
                            "already_applied",
                            f"{action.path} already has the driver store's content ({action.sha256[:12]}…)",
                            moved=moved,
                        )
                    _only_link(fd, action.path, "replacing")
                if held is not None:
                    raise RemediationError(
                        f"{action.path} exists but its previous version is already in "
                        f"{self.quarantine.relpath}/{slot}: something wrote {action.path} since; "
                        f"inspect both, then undo the directive"
                    )
            with self.root.open_file(action.source) as src:
                actual = sha256_fd(src)
                if actual != action.sha256:
                    raise HashMismatch(
                        action.source,
                        action.sha256,
                        actual,
                        "the driver store's copy is damaged or not the version the remediation "
                        "names; repair the driver store or fix the remediation",
                    )
                if dry_run:
                    return StepOutcome("apply", f"will replace {action.path} with {action.source}")
                if held is not None:
                    moved.append(self.quarantine.ensure_recorded(slot, action.path, index, held, "replaced"))
                moved += self._install_copy(dir_fd, name, tmp, src, action, index, slot, current)
        return StepOutcome(
            "applied",
            f"replaced {action.path} with {action.source}"
            + (f"; the previous file is {self.quarantine.relpath}/{slot}" if current else ""),
            moved=moved,
        )

    def _install_copy(
        self,
        dir_fd: int,
        name: str,
        tmp: str,
        src: int,
        action: RestoreFile,
        index: int,
        slot: str,
        current: os.stat_result | None,
    ) -> list[QuarantineEntry]:
        """Copy the store file in under ``tmp``, move the current file (if any) to quarantine,
        rename the copy into place; the entries of what moved to quarantine."""
        # The new file takes the old one's mode and owner, so e.g. a root-only module stays so.
        # If an earlier attempt already moved the old file away, the held file (a rename kept its
        # metadata) says what they were.
        original = current if current is not None else self.quarantine.held_stat(slot)
        if original is not None:
            mode, uid, gid = stat.S_IMODE(original.st_mode), original.st_uid, original.st_gid
        else:
            mode, uid, gid = DEFAULT_FILE_MODE, -1, -1
        moved: list[QuarantineEntry] = []
        remove_stale(dir_fd, tmp)
        out = create_new(dir_fd, tmp)
        try:
            try:
                # Hash what is actually written, from the same handle, not the preflight read.
                os.lseek(src, 0, os.SEEK_SET)
                digest = hashlib.sha256()
                while chunk := os.read(src, CHUNK):
                    digest.update(chunk)
                    write_all(out, chunk)
                if digest.hexdigest() != action.sha256:
                    raise HashMismatch(
                        action.source,
                        action.sha256,
                        digest.hexdigest(),
                        "the driver store's copy changed while being copied; "
                        "check the disk, then run the agent again",
                    )
                os.fchmod(out, mode)
                st = os.fstat(out)
                if (uid, gid) != (-1, -1) and (st.st_uid, st.st_gid) != (uid, gid):
                    try:
                        os.fchown(out, uid, gid)
                    except PermissionError:
                        pass  # only outside the recovery environment (tests, not root)
                os.fsync(out)
            finally:
                os.close(out)
            if current is not None:
                with self.root.open_file_in(dir_fd, name, action.path) as fd:
                    moved.append(
                        self.quarantine.move_in(
                            dir_fd, name, fd, sha256_fd(fd), action.path, slot, index, "replaced"
                        )
                    )
            if lstat_at(dir_fd, name) is not None:
                raise RemediationError(
                    f"{action.path} reappeared while being replaced: run the "
                    f"agent again; if it persists, something is writing there"
                )
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            remove_stale(dir_fd, tmp)
            raise
        os.fsync(dir_fd)
        return moved

    def _disable(self, index: int, action: DisableDriver, *, dry_run: bool) -> StepOutcome:
        relpath = action_target(action)
        content = modprobe_conf_content(action.name)
        creates = self.root.missing_dirs(MODPROBE_DIR)
        if dry_run and creates:
            return StepOutcome("apply", f"will write {relpath}", creates=creates)
        moved: list[QuarantineEntry] = []
        with self.root.open_dir(MODPROBE_DIR, create=not dry_run, mode=SYSTEM_DIR_MODE) as dir_fd:
            name = relpath.rsplit("/", 1)[1]
            slot = slot_name(index, name)
            if lstat_at(dir_fd, name) is not None:
                with self.root.open_file_in(dir_fd, name, relpath) as fd:
                    if read_fd(fd, len(content) + 1) == content:
                        if not dry_run:
                            held = self.quarantine.held_hash(slot)
                            if held is not None:
                                moved.append(
                                    self.quarantine.ensure_recorded(slot, relpath, index, held, "replaced")
                                )
                        return StepOutcome(
                            "already_applied", f"{relpath} already disables {action.name}", moved=moved
                        )
                    if dry_run:
                        return StepOutcome("apply", f"will replace {relpath}")
                    moved.append(
                        self.quarantine.move_in(
                            dir_fd, name, fd, sha256_fd(fd), relpath, slot, index, "replaced"
                        )
                    )
            if dry_run:
                return StepOutcome("apply", f"will write {relpath}")
            write_atomic(dir_fd, name, content, DEFAULT_FILE_MODE)
        return StepOutcome("applied", f"wrote {relpath}: {action.name} will not load at boot", moved=moved)

    def _record_test(self, action: RecoveryTest, *, dry_run: bool) -> StepOutcome:
        """Write the test's record into the agent's own state (and nothing else)."""
        relpath = recovery_test_path(action.test_id)
        name = relpath.rsplit("/", 1)[1]
        content = recovery_test_content(action.test_id, self.directive_id)
        creates = self.root.missing_dirs(RECOVERY_TESTS_DIR)
        if dry_run and creates:
            return StepOutcome("apply", f"will write {relpath}", creates=creates)
        with self.root.open_dir(RECOVERY_TESTS_DIR, create=not dry_run, mode=STATE_DIR_MODE) as dir_fd:
            if lstat_at(dir_fd, name) is not None:
                with self.root.open_file_in(dir_fd, name, relpath) as fd:
                    if read_fd(fd, len(content) + 1) == content:
                        return StepOutcome("already_applied", f"{relpath} already records the test")
            if dry_run:
                return StepOutcome("apply", f"will write {relpath}")
            write_atomic(dir_fd, name, content, DEFAULT_FILE_MODE)
        return StepOutcome(
            "applied",
            f"recovery test {action.test_id}: recorded in {relpath}; nothing else on the OS changed",
        )

    # -- undo

    def undo_step(self, step: JournalStep) -> tuple[str, bool]:
        """Take one applied step back: ``(what was done, whether the step is now undone)``; a
        step that cannot be undone yet says what blocks it. What the undo moves is recorded in
        ``step`` (its ``moved`` entries), for the caller to write to the journal."""
        action = step.action
        if isinstance(action, QuarantineFile):
            line, done = self._undo_quarantine(step, action)
        elif isinstance(action, RestoreFile):
            line, done = self._undo_restore(step, action)
        elif isinstance(action, DisableDriver):
            line, done = self._undo_disable(step, action)
        elif isinstance(action, RecoveryTest):
            line, done = self._undo_test(step, action)
        else:
            raise RemediationError(f"step {step.index}: unknown action {action!r}")
        notes = self.quarantine.take_notes()
        return "; ".join([line, *notes]), done

    def _move_back(self, step: JournalStep, slot: str, dir_fd: int, name: str) -> None:
        self.quarantine.move_back(slot, dir_fd, name)
        now = utcnow()
        for entry in step.moved:
            if entry.stored_name == slot:
                entry.restored_at = now

    def _blocked(self, index: int, slot: str, relpath: str) -> tuple[str, bool]:
        return (
            f"step {index}: left {self.quarantine.relpath}/{slot} in quarantine because {relpath} exists "
            f"again: move that file aside and run undo again",
            False,
        )

    def _undo_quarantine(self, step: JournalStep, action: QuarantineFile) -> tuple[str, bool]:
        index = step.index
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = slot_name(index, name)
            if not self.quarantine.holds(slot):
                return f"step {index}: {action.path} was never moved; nothing to undo", True
            if lstat_at(dir_fd, name) is not None:
                return self._blocked(index, slot, action.path)
            self._move_back(step, slot, dir_fd, name)
        return f"step {index}: moved {action.path} back from quarantine", True

    def _undo_restore(self, step: JournalStep, action: RestoreFile) -> tuple[str, bool]:
        index = step.index
        with self.root.open_parent(action.path) as (dir_fd, name):
            slot = slot_name(index, name)
            remove_stale(dir_fd, _tmp_name(self.directive_id, index))
            held = self.quarantine.holds(slot)
            moved_ours = False
            if lstat_at(dir_fd, name) is not None:
                with self.root.open_file_in(dir_fd, name, action.path) as fd:
                    digest = sha256_fd(fd)
                    if digest != action.sha256:
                        if held:
                            return self._blocked(index, slot, action.path)
                        return (f"step {index}: {action.path} was never replaced; nothing to undo", True)
                    # Our copy of the store file goes to quarantine too: nothing is ever deleted.
                    undone = undone_slot_name(index, name)
                    step.keep(
                        [
                            self.quarantine.move_in(
                                dir_fd, name, fd, digest, action.path, undone, index, "undone"
                            )
                        ]
                    )
                    moved_ours = True
            if held:
                self._move_back(step, slot, dir_fd, name)
                return f"step {index}: put the previous {action.path} back", True
        if moved_ours:
            return (f"step {index}: moved the restored {action.path} aside (there was no file before)", True)
        return f"step {index}: {action.path} was never replaced; nothing to undo", True

    def _undo_disable(self, step: JournalStep, action: DisableDriver) -> tuple[str, bool]:
        index, creates = step.index, step.creates
        relpath = action_target(action)
        try:
            with self.root.open_dir(MODPROBE_DIR) as dir_fd:
                name = relpath.rsplit("/", 1)[1]
                slot = slot_name(index, name)
                held = self.quarantine.holds(slot)
                if lstat_at(dir_fd, name) is not None:
                    with self.root.open_file_in(dir_fd, name, relpath) as fd:
                        content = modprobe_conf_content(action.name)
                        ours = read_fd(fd, len(content) + 1) == content
                    if not ours:
                        if held:
                            return self._blocked(index, slot, relpath)
                        return f"step {index}: {relpath} is not ours; nothing to undo", True
                    # A file we generated from the module name alone: removing it loses nothing.
                    os.unlink(name, dir_fd=dir_fd)
                    os.fsync(dir_fd)
                if held:
                    self._move_back(step, slot, dir_fd, name)
        except MissingFile:
            return f"step {index}: {MODPROBE_DIR} does not exist; nothing to undo", True
        for directory in reversed(creates):
            with self.root.open_parent(directory) as (parent_fd, dir_name):
                try:
                    os.rmdir(dir_name, dir_fd=parent_fd)
                    os.fsync(parent_fd)
                except OSError:
                    break  # not empty (someone else uses it): it stays
        return f"step {index}: removed {relpath}; {action.name} loads at boot again", True

    def _undo_test(self, step: JournalStep, action: RecoveryTest) -> tuple[str, bool]:
        relpath = recovery_test_path(action.test_id)
        name = relpath.rsplit("/", 1)[1]
        try:
            with self.root.open_dir(RECOVERY_TESTS_DIR) as dir_fd:
                if lstat_at(dir_fd, name) is not None:
                    os.unlink(name, dir_fd=dir_fd)  # the agent's own record, nothing else
                    os.fsync(dir_fd)
        except MissingFile:
            pass
        return f"step {step.index}: removed the record {relpath}", True
