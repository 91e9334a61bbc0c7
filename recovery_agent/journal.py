"""The intent journal and the quarantine manifest: what the agent writes down about a directive.

Two records per directive, both JSON on the OS disk, both written atomically through
``osroot`` (temp file, fsync, rename, fsync dir) and read back through it:

- the **intent journal**, ``var/lib/recovery/journal/<directive_id>.json`` (``IntentJournal``):
  the directive's actions, one ``JournalStep`` each with what preflight found ("apply" or
  "already_applied") and how far it got ("planned", "done", "rolled_back"), and the
  directive's state: "applying" -> "applied" -> "purged", or "rolling_back" -> "rolled_back".
  ``remediate`` writes it before the first change and after every step, so after a power loss
  it knows, without the directive, what to finish or to take back.
- the **quarantine manifest**, ``var/lib/recovery/quarantine/<directive_id>/manifest.json``
  (``QuarantineManifest``): one ``QuarantineEntry`` per file moved into that folder: where it
  came from, its sha256, mode, owner and mtime, and why it is there (the directive quarantined
  it, the directive replaced it, or an undo moved the directive's own file aside).

The journal holds everything apply, roll back and undo need: each step also lists the entries
of the files it (or its undo) moved into quarantine (``JournalStep.moved``). The manifest is
the same record kept beside the files, for people (``recovery-agent quarantine list``); when
it cannot be read, the journal's entries stand in for it.

A journal that does not validate raises ``JournalError``: without it the agent cannot tell what
was applied, so it stops and says so rather than guess. So does a record over
``RECORD_LIMIT`` bytes (ours are a few KiB), which is not read at all.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import RemediationError
from .layout import JOURNAL_DIR, QUARANTINE_DIR
from .osroot import MissingFile, OSRoot, lstat_at, read_fd, write_atomic
from .protocol.wire import Action, utcnow

MANIFEST_NAME = "manifest.json"
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # wire.Identifier; also a safe file name
_RECORD_MODE = 0o600
RECORD_LIMIT = 16 * 1024 * 1024  # a journal or manifest larger than this is not ours


class JournalError(RemediationError):
    """Raised when a directive's journal or manifest is missing, unreadable or in a state that
    forbids the operation asked for (e.g. undo after purge), or a directive id is not valid."""


# --------------------------------------------------------------------------- the records


class _DiskModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


QuarantineRole = Literal["quarantined", "replaced", "undone"]
JournalState = Literal["applying", "applied", "rolling_back", "rolled_back", "purged"]


class QuarantineEntry(_DiskModel):
    """One file in a directive's quarantine folder and where it came from."""

    action_index: int
    # quarantined: the file a quarantine_file action took away; replaced: what was at the
    # target of restore_file / disable_driver; undone: a file we installed, moved aside by undo.
    role: QuarantineRole
    original_path: str
    stored_name: str
    sha256: str
    size: int
    mode: int
    mtime: float
    uid: int
    gid: int
    quarantined_at: datetime
    restored_at: datetime | None = None


class QuarantineManifest(_DiskModel):
    """Every file in one directive's quarantine folder (``manifest.json`` there)."""

    version: Literal[1] = 1
    directive_id: str
    entries: list[QuarantineEntry] = []

    def entry(self, stored_name: str) -> QuarantineEntry | None:
        return next((e for e in self.entries if e.stored_name == stored_name), None)


class JournalStep(_DiskModel):
    """One action of a directive and how far applying (or rolling back) it got."""

    index: int
    action: Action
    # What preflight found before anything changed: only "apply" steps are ever rolled back, so a
    # file that already had the wanted content is never taken away by an undo.
    plan: Literal["apply", "already_applied"]
    status: Literal["planned", "done", "rolled_back"] = "planned"
    result: Literal["applied", "already_applied"] | None = None
    detail: str = ""
    # Directories outside the agent's state that applying creates (etc/modprobe.d); undo removes
    # them again if they are empty.
    creates: list[str] = []
    # Every file this step, or its undo, moved into the quarantine folder (the manifest's
    # entries, kept here too so that nothing depends on the manifest).
    moved: list[QuarantineEntry] = []

    def keep(self, entries: list[QuarantineEntry]) -> None:
        """Record ``entries`` (replacing an entry for the same stored name)."""
        names = {e.stored_name for e in entries}
        self.moved = [e for e in self.moved if e.stored_name not in names] + entries


class IntentJournal(_DiskModel):
    """A directive's intent journal: its steps and its state (see the module docstring)."""

    version: Literal[1] = 1
    directive_id: str
    remediation_id: str
    state: JournalState
    steps: list[JournalStep]
    created_at: datetime
    updated_at: datetime
    notes: list[str] = []


_M = TypeVar("_M", bound=_DiskModel)


# --------------------------------------------------------------------------- names


def is_directive_id(name: str) -> bool:
    """Whether ``name`` is a directive id (and so a safe file name)."""
    return bool(_ID_RE.match(name))


def check_directive_id(directive_id: object) -> str:
    """``directive_id`` if it is a valid identifier, else ``JournalError``."""
    if not isinstance(directive_id, str) or not _ID_RE.match(directive_id):
        raise JournalError(
            f"directive id {directive_id!r} is not a valid identifier (letters, "
            f"digits, _ and -, at most 64): copy it from `recovery-agent quarantine list` or "
            f"the server's directive"
        )
    return directive_id


def journal_relpath(directive_id: str) -> str:
    return f"{JOURNAL_DIR}/{directive_id}.json"


def quarantine_relpath(directive_id: str) -> str:
    return f"{QUARANTINE_DIR}/{directive_id}"


# --------------------------------------------------------------------------- reading, writing


def _read_model(root: OSRoot, dir_fd: int, name: str, relpath: str, model: type[_M]) -> _M | None:
    if lstat_at(dir_fd, name) is None:
        return None
    with root.open_file_in(dir_fd, name, relpath) as fd:
        raw = read_fd(fd, RECORD_LIMIT + 1)
    if len(raw) > RECORD_LIMIT:
        raise JournalError(
            f"{relpath} is over {RECORD_LIMIT} bytes, not a record the agent wrote: move it aside "
            f"to inspect it"
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise JournalError(
            f"{relpath} is not a valid {model.__name__} ({exc.error_count()} errors, first: "
            f"{exc.errors()[0]['msg']}): move it aside to inspect it; the agent cannot tell what "
            f"was applied without it"
        ) from exc


def _dump(model: BaseModel) -> bytes:
    return model.model_dump_json(indent=2).encode() + b"\n"


def journaled_directives(root: OSRoot) -> list[str]:
    """The ids of every directive with a journal on this OS root, sorted."""
    try:
        with root.open_dir(JOURNAL_DIR) as jfd:
            names = os.listdir(jfd)
    except MissingFile:
        return []
    ids = (n.removesuffix(".json") for n in names if n.endswith(".json"))
    return sorted(i for i in ids if is_directive_id(i))  # our temp files and strangers left out


def read_journal(root: OSRoot, directive_id: str) -> IntentJournal | None:
    """A directive's journal, or None if it was never applied here."""
    try:
        with root.open_dir(JOURNAL_DIR) as jfd:
            return _read_model(
                root, jfd, f"{directive_id}.json", journal_relpath(directive_id), IntentJournal
            )
    except MissingFile:
        return None


def write_journal(root: OSRoot, journal: IntentJournal) -> None:
    """Write the journal durably (its ``updated_at`` becomes now)."""
    journal.updated_at = utcnow()
    with root.open_dir(JOURNAL_DIR, create=True) as jfd:
        write_atomic(jfd, f"{journal.directive_id}.json", _dump(journal), _RECORD_MODE)


def read_manifest(root: OSRoot, qfd: int, directive_id: str) -> QuarantineManifest:
    """The manifest in the open quarantine folder ``qfd`` (an empty one if there is none yet)."""
    relpath = f"{quarantine_relpath(directive_id)}/{MANIFEST_NAME}"
    manifest = _read_model(root, qfd, MANIFEST_NAME, relpath, QuarantineManifest)
    return manifest or QuarantineManifest(directive_id=directive_id)


def record_entry(root: OSRoot, qfd: int, directive_id: str, entry: QuarantineEntry) -> None:
    """Add ``entry`` to the manifest in ``qfd``, replacing one with the same stored name."""
    manifest = read_manifest(root, qfd, directive_id)
    manifest.entries = [e for e in manifest.entries if e.stored_name != entry.stored_name]
    manifest.entries.append(entry)
    write_atomic(qfd, MANIFEST_NAME, _dump(manifest), _RECORD_MODE)
