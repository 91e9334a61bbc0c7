"""One directive's quarantine folder: where the files a remediation takes away are kept.

Nothing a directive takes off the machine is deleted. A file is renamed into
``var/lib/recovery/quarantine/<directive_id>/`` under a slot name (``<index>-<name>``, or
``<index>.undone-<name>`` for a file of ours an undo moved aside), on the same filesystem so the
move is atomic, and recorded in that folder's manifest (``journal.QuarantineManifest``) with
where it came from, its sha256, mode, owner and mtime. The workflow, as ``actions`` uses it:

1. ``move_in`` renames a file the caller opened and hashed into its slot (mode 0700 folder,
   made on first use), checks that the inode that arrived is the one that was hashed (else it
   gives the file back), fsyncs both directories, then records the entry and returns it.
2. A power loss between the rename and the manifest write leaves the file held but unlisted;
   ``ensure_recorded`` rebuilds its entry from the file itself (a rename keeps its metadata).
3. ``move_back`` (undo) renames a slot back to its original name and marks the entry restored.

The caller keeps every entry in the directive's intent journal too (``JournalStep.moved``):
the journal, not the manifest, is what apply and undo rely on. Once a file has moved, a
manifest that cannot be read or written does not fail the move: the trouble is noted
(``take_notes``) and reported with the step, and the manifest is left for a person to inspect.

``remediate.purge`` deletes the folder once the machine has booted well with the directive.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import ExitStack

from . import holds
from .digest import sha256_fd
from .errors import RemediationError
from .journal import (
    MANIFEST_NAME,
    JournalError,
    QuarantineEntry,
    QuarantineManifest,
    QuarantineRole,
    quarantine_relpath,
    read_manifest,
    record_entry,
)
from .layout import STATE_DIR
from .osroot import MissingFile, OSRoot, lstat_at
from .protocol.wire import utcnow


def slot_name(index: int, name: str) -> str:
    """Where step ``index`` keeps the file ``name`` it took away."""
    return f"{index}-{name}"


def undone_slot_name(index: int, name: str) -> str:
    """Where an undo of step ``index`` keeps the file the step had installed as ``name``."""
    return f"{index}.undone-{name}"


class Quarantine:
    """The quarantine folder of one directive on one OS root; its fd stays open until
    ``close``."""

    def __init__(self, root: OSRoot, directive_id: str) -> None:
        self.root = root
        self.directive_id = directive_id
        self.relpath = quarantine_relpath(directive_id)
        self._open = ExitStack()
        self._fd: int | None = None
        self._notes: list[str] = []

    def close(self) -> None:
        self._fd = None
        self._open.close()

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fd(self, *, create: bool) -> int | None:
        """An fd on the folder (made if ``create``), or None if there is none."""
        if self._fd is None:
            try:
                self._fd = self._open.enter_context(self.root.open_dir(self.relpath, create=create))
            except MissingFile:
                return None
        return self._fd

    # -- what is held

    def manifest(self) -> QuarantineManifest:
        """The folder's manifest (an empty one if there is no folder or no manifest yet)."""
        qfd = self.fd(create=False)
        if qfd is None:
            return QuarantineManifest(directive_id=self.directive_id)
        return read_manifest(self.root, qfd, self.directive_id)

    def take_notes(self) -> list[str]:
        """What went wrong with the manifest since the last call (each trouble once)."""
        notes, self._notes = list(dict.fromkeys(self._notes)), []
        return notes

    def _record(self, qfd: int, entry: QuarantineEntry) -> None:
        """Add ``entry`` to the manifest if it can be; the move it records has happened, so a
        manifest that cannot be read or written is noted, not raised."""
        try:
            record_entry(self.root, qfd, self.directive_id, entry)
        except (JournalError, OSError) as exc:
            self._manifest_trouble(exc)

    def _manifest_trouble(self, exc: JournalError | OSError) -> None:
        why = "it is not a valid manifest" if isinstance(exc, JournalError) else exc.strerror or str(exc)
        self._notes.append(
            f"{self.relpath}/{MANIFEST_NAME} not updated ({why}); the intent journal holds the "
            f"record; move the manifest aside to inspect it"
        )

    def _recorded(self, qfd: int, slot: str) -> QuarantineEntry | None:
        try:
            return read_manifest(self.root, qfd, self.directive_id).entry(slot)
        except JournalError:
            return None

    def holds(self, slot: str) -> bool:
        """Whether something is stored under ``slot``."""
        qfd = self.fd(create=False)
        return qfd is not None and lstat_at(qfd, slot) is not None

    def held_hash(self, slot: str) -> str | None:
        """The sha256 of the file stored under ``slot``, or None if there is none."""
        qfd = self.fd(create=False)
        if qfd is None or lstat_at(qfd, slot) is None:
            return None
        with self.root.open_file_in(qfd, slot, f"{self.relpath}/{slot}") as fd:
            return sha256_fd(fd)

    # -- moving files in and out

    def _new_entry(
        self, st: os.stat_result, digest: str, relpath: str, slot: str, index: int, role: QuarantineRole
    ) -> QuarantineEntry:
        return QuarantineEntry(
            action_index=index,
            role=role,
            original_path=relpath,
            stored_name=slot,
            sha256=digest,
            size=st.st_size,
            mode=stat.S_IMODE(st.st_mode),
            mtime=st.st_mtime,
            uid=st.st_uid,
            gid=st.st_gid,
            quarantined_at=utcnow(),
        )

    def _folder(self) -> int:
        qfd = self.fd(create=True)
        assert qfd is not None  # create=True makes it or raises
        return qfd

    def held_stat(self, slot: str) -> os.stat_result | None:
        """``lstat`` of the file held under ``slot`` (a rename kept the original's mode, owner
        and mtime), or None if nothing is held there."""
        qfd = self.fd(create=False)
        return None if qfd is None else lstat_at(qfd, slot)

    def ensure_recorded(
        self, slot: str, relpath: str, index: int, digest: str, role: QuarantineRole
    ) -> QuarantineEntry:
        """The entry of the file held under ``slot``, recorded in the manifest if it was not."""
        # A power loss between the rename and the manifest write leaves the file in quarantine
        # but unlisted; rename keeps its metadata, so the entry can be rebuilt from it.
        qfd = self._folder()
        entry = self._recorded(qfd, slot)
        if entry is None:
            st = os.stat(slot, dir_fd=qfd, follow_symlinks=False)
            entry = self._new_entry(st, digest, relpath, slot, index, role)
            self._record(qfd, entry)
        return entry

    def move_in(
        self,
        dir_fd: int,
        name: str,
        fd: int,
        digest: str,
        relpath: str,
        slot: str,
        index: int,
        role: QuarantineRole,
    ) -> QuarantineEntry:
        """Move ``name`` in ``dir_fd`` (open as ``fd``, hashed as ``digest``; ``relpath`` on the
        OS root) to ``slot``, record it and return its entry."""
        qfd = self._folder()
        if lstat_at(qfd, slot) is not None:
            raise RemediationError(
                f"{self.relpath}/{slot} already exists: the quarantine of directive "
                f"{self.directive_id} was changed by hand; inspect it, then undo the directive"
            )
        st = os.fstat(fd)
        try:
            os.rename(name, slot, src_dir_fd=dir_fd, dst_dir_fd=qfd)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise RemediationError(
                    f"cannot move {relpath} to {self.relpath}: they are on different mounts; the "
                    f"quarantine must be on the OS partition itself (no bind mount on "
                    f"{STATE_DIR})"
                ) from exc
            raise
        moved = os.stat(slot, dir_fd=qfd, follow_symlinks=False)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            # The name was swapped for another file between hashing and renaming: give back what
            # we took rather than keep a file nobody checked.
            os.rename(slot, name, src_dir_fd=qfd, dst_dir_fd=dir_fd)
            raise RemediationError(
                f"{relpath} was replaced while being quarantined: run the "
                f"agent again; if it persists, something is writing there"
            )
        os.fsync(qfd)
        os.fsync(dir_fd)
        holds.reached("moved")
        entry = self._new_entry(st, digest, relpath, slot, index, role)
        self._record(qfd, entry)
        return entry

    def move_back(self, slot: str, dir_fd: int, name: str) -> None:
        """Rename ``slot`` back to ``name`` in ``dir_fd``; its manifest entry, if it can be
        read, is marked restored."""
        qfd = self.fd(create=False)
        if qfd is None:
            raise MissingFile(f"{self.relpath} does not exist: nothing to move back from it")
        os.rename(slot, name, src_dir_fd=qfd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
        os.fsync(qfd)
        try:
            entry = read_manifest(self.root, qfd, self.directive_id).entry(slot)
        except JournalError as exc:
            self._manifest_trouble(exc)
            return
        if entry is not None:
            self._record(qfd, entry.model_copy(update={"restored_at": utcnow()}))
