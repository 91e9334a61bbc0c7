"""The agent's own state files on the OS disk, besides journals and quarantines.

Two moments of the recovery loop leave a trace there (``layout`` names the paths):

1. In the recovery environment, once a directive was applied, ``record_applied`` writes its id
   to ``var/lib/recovery/last-directive``.
2. In the OS, once its health check passed, ``recovery-agent health`` reports the good boot
   with that id (``last_directive``), then ``confirm_last_directive`` renames the file to
   ``confirmed-directive``: the directive has booted well. Only then may its quarantine be
   purged (``purge_quarantine``; ``force`` skips the check for a person who knows better). The
   same step moves the crash records out of pstore into ``var/lib/recovery/pstore/<time>/``
   (``archive_pstore``, as systemd-pstore does), which frees the ramoops slots so the next
   recovery reports only new crashes. The recovery environment never archives: it writes the
   OS disk only to apply a verified directive.

Every read and write goes through ``osroot.OSRoot``: a symlink planted at one of these names, at
its temp name or at a folder on the way is refused or replaced, never followed, so nothing
outside the OS root is read or changed.
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

from .errors import RemediationError
from .journal import check_directive_id, is_directive_id
from .layout import CONFIRMED_DIRECTIVE, LAST_DIRECTIVE, PSTORE_ARCHIVE, SENT_INVENTORY
from .osroot import MissingFile, OSRoot, write_atomic
from .protocol.wire import INVENTORY_MAX, utcnow
from .remediate import purge

log = logging.getLogger(__name__)

_ID_LIMIT = 256  # a directive id is at most 64 characters; more is not ours
_INVENTORY_LIMIT = INVENTORY_MAX * 1200  # a path of up to 1024 characters and its sha256, each


class NotConfirmed(RemediationError):
    """Raised when asked to purge the quarantine of a directive that no healthy boot confirmed
    (``confirmed-directive`` names another one, or none)."""


def _read_id(root: OSRoot, relpath: str) -> str | None:
    data = root.read_file(relpath, _ID_LIMIT)
    if data is None:
        return None
    text = data.decode("utf-8", errors="replace").strip()
    if not is_directive_id(text):
        log.warning("%s does not hold a directive id (%r): ignored", relpath, text[:64])
        return None
    return text


def record_applied(os_root: Path | str, directive_id: str) -> None:
    """In the recovery environment: remember the directive just applied, for the next healthy
    boot to confirm."""
    directive_id = check_directive_id(directive_id)
    with OSRoot(os_root) as root:
        root.write_file(LAST_DIRECTIVE, f"{directive_id}\n".encode())


def last_directive(os_root: Path | str) -> str | None:
    """The directive applied since the last healthy boot, if any."""
    with OSRoot(os_root) as root:
        return _read_id(root, LAST_DIRECTIVE)


def confirm_last_directive(os_root: Path | str) -> bool:
    """In the OS, after its good boot was reported: ``last-directive`` becomes
    ``confirmed-directive``. False if there was none."""
    with OSRoot(os_root) as root:
        try:
            return root.rename(LAST_DIRECTIVE, CONFIRMED_DIRECTIVE)
        except MissingFile:
            return False  # no state folder: nothing was ever applied


def confirmed_directive(os_root: Path | str) -> str | None:
    """The directive the last healthy boot confirmed, if any."""
    with OSRoot(os_root) as root:
        return _read_id(root, CONFIRMED_DIRECTIVE)


def purge_quarantine(os_root: Path | str, directive_id: str, *, force: bool = False) -> None:
    """Delete a directive's quarantine, only if a healthy boot confirmed the directive (or
    ``force``); its journal becomes "purged" (``remediate.purge``)."""
    directive_id = check_directive_id(directive_id)
    if not force:
        confirmed = confirmed_directive(os_root)
        if confirmed != directive_id:
            names = f"names {confirmed}" if confirmed else "does not exist"
            raise NotConfirmed(
                f"directive {directive_id} was not confirmed by a healthy boot ({CONFIRMED_DIRECTIVE} "
                f"{names}): its quarantine is what an undo needs, so it stays until the OS has "
                f"booted well with it (`recovery-agent health` confirms the last directive "
                f"applied); add --force if you know the machine is fine"
            )
    purge(os_root, directive_id)


def sent_inventory(os_root: Path | str) -> dict[str, str] | None:
    """The inventory (path -> sha256) the server last stored for this device, or None if there
    is none, or it is damaged (the next health report then sends the whole)."""
    with OSRoot(os_root) as root:
        data = root.read_file(SENT_INVENTORY, _INVENTORY_LIMIT)
    if data is None:
        return None
    try:
        files = json.loads(data)
    except ValueError:
        files = None
    if not (
        isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
    ):
        log.warning("%s is damaged: the next health report sends the whole inventory", SENT_INVENTORY)
        return None
    return files


def record_sent_inventory(os_root: Path | str, files: dict[str, str]) -> None:
    """Remember the inventory (path -> sha256) the server just stored."""
    with OSRoot(os_root) as root:
        root.write_file(SENT_INVENTORY, json.dumps(files, sort_keys=True).encode())


def archive_pstore(pstore_dir: Path | None, os_root: Path | str) -> int:
    """Move the crash records in ``pstore_dir`` into ``var/lib/recovery/pstore/<time>/`` on the
    OS root (mode and mtime kept); returns how many. A record is removed from pstore only once
    its copy is durable."""
    if pstore_dir is None or not pstore_dir.is_dir():
        return 0
    records = sorted(p for p in pstore_dir.iterdir() if p.is_file())
    if not records:
        return 0
    dest = f"{PSTORE_ARCHIVE}/{utcnow().strftime('%Y%m%dT%H%M%SZ')}"
    with OSRoot(os_root) as root, root.open_dir(dest, create=True) as dir_fd:
        for record in records:
            st = record.stat()
            write_atomic(
                dir_fd,
                record.name,
                record.read_bytes(),
                stat.S_IMODE(st.st_mode),
                shown=f"{dest}/{record.name}",
                mtime_ns=st.st_mtime_ns,
            )
            record.unlink()
    return len(records)
