"""Detect why the OS failed to boot: the evidence in, one ``CrashSignature`` out.

This module owns reading the evidence the failed boots left and choosing what it says; the
parsing of one kernel report is ``crashreport``'s (``parse_crash``):

1. Evidence: the pstore records of the previous boots (``dmesg-ramoops-N``, the kernel's own
   panic/oops dumps, multi-part dumps joined; ``console-ramoops-N``, the previous boot's
   console) and, optionally, a boot or console log. Records pstore could not decompress
   (``*.enc.z``) are skipped with a note.
2. Sources are tried in order, pstore dumps (newest first), pstore console logs, the boot log;
   the first one holding a report gives the signature. A dump may start after the driver named
   its channel file: the console log of the same crash fills it in.
3. With no crash record: the OS's boot progress log (``start STEP`` / ``done STEP`` / ``boot
   complete``) names the step the last boot never finished, a hang in it
   (``boot hung: load module sensor``); a watchdog reset is a hang; failed boots with nothing
   else are ``unknown``, no failed boot at all ``none``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .crashreport import parse_crash
from .protocol.wire import CrashKind, CrashSignature

__all__ = ["PstoreRecord", "PstoreScan", "detect", "parse_crash", "read_pstore", "stopped_step"]

log = logging.getLogger(__name__)

BOOT_LOG_LIMIT = 4 * 1024 * 1024  # read at most the tail of a boot log this long

# --------------------------------------------------------------------------- pstore


_RECORD_NAME_RE = re.compile(r"^(?P<type>dmesg|console)-(?P<backend>[a-z0-9_]+)-(?P<id>\d+)$")
_DUMP_HEADER_RE = re.compile(r"^(?P<reason>[A-Za-z]+)#(?P<count>\d+) Part(?P<part>\d+)\s*$")


@dataclass
class PstoreRecord:
    """One crash text from pstore: a dmesg dump (parts already joined) or a console log."""

    name: str  # file name, or "dmesg-ramoops-1+dmesg-ramoops-0" for joined parts
    type: str  # "dmesg" or "console"
    mtime: float
    text: str
    reason: str = ""  # "Panic", "Oops", ... from the dump header


@dataclass
class PstoreScan:
    records: list[PstoreRecord] = field(default_factory=list)  # newest first
    notes: list[str] = field(default_factory=list)  # what was skipped and why


def _read_text(path: Path, limit: int | None = None) -> str:
    with open(path, "rb") as f:
        if limit is not None:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                f.seek(size - limit)
        data = f.read()
    return data.decode("utf-8", errors="replace")


def read_pstore(pstore_dir: Path) -> PstoreScan:
    """The crash records under ``pstore_dir`` (``/sys/fs/pstore``), newest first; panic dumps
    before oops dumps of the same time, dumps before console logs."""
    scan = PstoreScan()
    try:
        entries = sorted(pstore_dir.iterdir())
    except FileNotFoundError:
        scan.notes.append(
            f"pstore directory {pstore_dir} does not exist: mount pstore there "
            f"(mount -t pstore pstore {pstore_dir})"
        )
        return scan
    except NotADirectoryError:
        scan.notes.append(f"pstore path {pstore_dir} is not a directory")
        return scan

    dumps: dict[tuple[float, str, str], list[tuple[int, str, str]]] = {}
    for path in entries:
        if path.name.endswith(".enc.z"):
            scan.notes.append(
                f"skipped {path.name}: the kernel could not decompress this pstore record "
                f"(check the pstore compression algorithm is built into this kernel)"
            )
            continue
        m = _RECORD_NAME_RE.match(path.name)
        if m is None:
            continue  # pmsg, ftrace and other record types hold no crash
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                continue
            text = _read_text(path)
        except OSError as e:
            scan.notes.append(f"could not read {path}: {e.strerror}")
            continue
        if m.group("type") == "console":
            scan.records.append(PstoreRecord(path.name, "console", st.st_mtime, text))
            continue
        first, _, body = text.partition("\n")
        header = _DUMP_HEADER_RE.match(first)
        if header is None:
            scan.records.append(PstoreRecord(path.name, "dmesg", st.st_mtime, text))
            continue
        key = (st.st_mtime, header.group("reason"), header.group("count"))
        dumps.setdefault(key, []).append((int(header.group("part")), path.name, body))

    for (mtime, reason, _count), parts in dumps.items():
        # Part1 is the newest end of the log; the highest part number is its oldest start.
        parts.sort(reverse=True)
        name = "+".join(p[1] for p in parts)
        scan.records.append(PstoreRecord(name, "dmesg", mtime, "".join(p[2] for p in parts), reason))

    reason_rank = {"Panic": 2, "Oops": 1}
    scan.records.sort(
        key=lambda r: (r.type == "dmesg", r.mtime, reason_rank.get(r.reason, 0), r.name), reverse=True
    )
    return scan


# --------------------------------------------------------------------------- detect


def _failed_title(boot_count: int) -> str:
    times = "once" if boot_count == 1 else f"{boot_count} times"
    return f"boot failed {times} with no crash record"


def _fill_channel_file(sig: CrashSignature, others: Iterable[CrashSignature]) -> CrashSignature:
    """A dump may start after the driver named its file; the console log of the same crash
    (same kind and title) may still hold the line."""
    if sig.channel_file is not None:
        return sig
    for other in others:
        if other.title == sig.title and other.channel_file:
            return sig.model_copy(update={"channel_file": other.channel_file})
    return sig


_MODULE_STEP_RE = re.compile(r"^load module (?P<module>[A-Za-z0-9_-]+)$")


def stopped_step(progress_text: str) -> str | None:
    """The step the last boot started and never finished, from the OS's boot progress log
    (``<uptime> boot start`` / ``start STEP`` / ``done STEP`` / ``boot complete`` lines), or
    None if the last boot completed or the log says nothing."""
    lines = progress_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.split(" ", 1)[-1] == "boot start"]
    if not starts:
        return None
    open_steps: list[str] = []
    for line in lines[starts[-1] + 1 :]:
        event = line.split(" ", 1)[-1].strip()
        if event == "boot complete":
            return None
        if event.startswith("start "):
            open_steps.append(event[6:])
        elif event.startswith("done ") and event[5:] in open_steps:
            open_steps.remove(event[5:])
    return open_steps[-1] if open_steps else None


def _hang_in_step(step: str, detail: str) -> CrashSignature:
    m = _MODULE_STEP_RE.match(step)
    return CrashSignature(
        kind=CrashKind.HANG,
        title=f"boot hung: {step}",
        guilty_module=m.group("module") if m else None,
        source="boot progress log",
        excerpt=detail,
    )


def detect(
    pstore_dir: Path | None,
    boot_log: Path | None = None,
    boot_count: int = 0,
    boot_limit: int = 2,
    watchdog_reset: bool = False,
    boot_progress: Path | None = None,
) -> CrashSignature:
    """Classify the last failed boots from pstore records and an optional boot log.

    Sources are tried in order: pstore dumps (newest first), pstore console logs, the boot
    log; the first one holding a report gives the signature. ``watchdog_reset`` (the lab saw
    the watchdog fire, or the bootloader recorded it) makes a crash without panic a hang.
    With no crash record, ``boot_progress`` (the OS's own log of boot steps) names the step
    the last boot never finished: a hang in it.
    With nothing found, the kind is ``unknown`` after failed boots and ``none`` otherwise.
    """
    notes: list[str] = []
    sources: list[tuple[str, str]] = []
    if pstore_dir is not None:
        scan = read_pstore(Path(pstore_dir))
        notes.extend(scan.notes)
        sources.extend((f"pstore:{r.name}", r.text) for r in scan.records)
    if boot_log is not None:
        try:
            sources.append((f"log:{boot_log}", _read_text(Path(boot_log), BOOT_LOG_LIMIT)))
        except OSError as e:
            notes.append(f"could not read boot log {boot_log}: {e.strerror}")
    for note in notes:
        log.warning("%s", note)

    found: list[CrashSignature] = []
    for source, text in sources:
        sig = parse_crash(text, source)
        if sig is not None:
            found.append(sig)

    if found:
        sig = _fill_channel_file(found[0], found[1:])
        if watchdog_reset and sig.kind is CrashKind.OOPS:
            sig = sig.model_copy(update={"kind": CrashKind.HANG})
        return sig

    detail = "\n".join([f"boot_count={boot_count} boot_limit={boot_limit}", *notes])
    # No crash record, and the OS wrote down a step it began and never finished: the boot
    # stopped there without a panic (a hang the watchdog reset, most likely).
    if boot_progress is not None and boot_count > 0:
        try:
            step = stopped_step(_read_text(Path(boot_progress), BOOT_LOG_LIMIT))
        except OSError:
            step = None
        if step:
            return _hang_in_step(step, detail)
    if watchdog_reset:
        return CrashSignature(
            kind=CrashKind.HANG,
            title="boot hung: watchdog reset the machine",
            source="watchdog",
            excerpt=detail,
        )
    if boot_count > 0:
        return CrashSignature(
            kind=CrashKind.UNKNOWN, title=_failed_title(boot_count), source="grubenv", excerpt=detail
        )
    return CrashSignature(kind=CrashKind.NONE, title="no boot failure", excerpt=detail)
