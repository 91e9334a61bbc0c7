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

Whatever bytes the evidence holds, reading it is bounded (docs/recovery-loop.md, "The limits
of a report"): the tail of each log and record (``BOOT_LOG_LIMIT``, ``PROGRESS_LOG_LIMIT``,
``PSTORE_RECORD_LIMIT``), ``PSTORE_TOTAL_LIMIT`` bytes of pstore in all (newest records
first), lines cut at ``LINE_LIMIT`` characters before the parser sees them. Only regular files
are read (a FIFO would block), never through a symlink. What the parser returns is fitted to the
wire's limits (``report.fit_signature``), and a parser that fails on one text costs that text
only. Each cut or failure is a note of the ``Detection``, which the report carries.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .protocol.crashreport import parse_crash
from .protocol.wire import CrashKind, CrashSignature
from .report import fit_signature, wire_text

__all__ = [
    "Detection",
    "PstoreRecord",
    "PstoreScan",
    "detect",
    "examine",
    "parse_crash",
    "read_pstore",
    "stopped_step",
]

log = logging.getLogger(__name__)

# What is read of the evidence, whatever is there; more is cut, and the cut is noted.
BOOT_LOG_LIMIT = 4 * 1024 * 1024  # the tail of the boot log
PROGRESS_LOG_LIMIT = 1024 * 1024  # the tail of the boot progress log
PSTORE_RECORD_LIMIT = 1024 * 1024  # the tail of one pstore record (its first line kept)
PSTORE_TOTAL_LIMIT = 4 * 1024 * 1024  # pstore records in all, newest first
PSTORE_ENTRIES_LIMIT = 1024  # entries of the pstore directory looked at
LINE_LIMIT = 1024  # characters of one line given to the parser (printk's own line limit)

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotAFile(OSError):
    """Raised when evidence to read is not a regular file (a FIFO, a device, a directory)."""


@dataclass
class Evidence:
    """One text read from a log or record: the text, and the bytes left out."""

    text: str
    size: int  # of the file
    cut: int = 0  # bytes not read (from the start of the file)


def read_evidence(path: Path, limit: int, *, keep_first_line: bool = False) -> Evidence:
    """The last ``limit`` bytes of the regular file at ``path``, as text (invalid UTF-8
    replaced), starting at a line; with ``keep_first_line`` its first line too (a pstore dump's
    header). Never follows a symlink at ``path`` nor opens a FIFO or device."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is not a regular file")
        size = st.st_size
        if size <= limit:
            data = os.pread(fd, limit + 1, 0)[:limit]
            return Evidence(data.decode("utf-8", errors="replace"), size)
        tail = os.pread(fd, limit, size - limit)
        nl = tail.find(b"\n")
        tail = tail[nl + 1 :] if nl >= 0 else b""  # start at a line, not in one
        head = b""
        if keep_first_line:
            first = os.pread(fd, LINE_LIMIT * 4, 0)
            head = first[: first.find(b"\n") + 1] if b"\n" in first else first + b"\n"
        return Evidence((head + tail).decode("utf-8", errors="replace"), size, size - len(tail) - len(head))
    finally:
        os.close(fd)


def cap_lines(text: str) -> tuple[str, int]:
    """``text`` with every line cut to ``LINE_LIMIT`` characters, and how many were cut."""
    lines = text.splitlines()
    cut = 0
    for i, line in enumerate(lines):
        if len(line) > LINE_LIMIT:
            lines[i] = line[:LINE_LIMIT]
            cut += 1
    return "\n".join(lines), cut


def _read_notes(what: str, evidence: Evidence, limit: int) -> list[str]:
    notes = []
    if evidence.cut:
        notes.append(f"{what}: {evidence.size} bytes, only the last {limit} read")
    return notes


# --------------------------------------------------------------------------- pstore


_RECORD_NAME_RE = re.compile(r"^(?P<type>dmesg|console)-(?P<backend>[a-z0-9_]+)-(?P<id>\d+)\Z")
_DUMP_HEADER_RE = re.compile(r"^(?P<reason>[A-Za-z]{1,32})#(?P<count>\d{1,20}) Part(?P<part>\d{1,9})\s*$")


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


def read_pstore(pstore_dir: Path) -> PstoreScan:
    """The crash records under ``pstore_dir`` (``/sys/fs/pstore``), newest first; panic dumps
    before oops dumps of the same time, dumps before console logs. At most
    ``PSTORE_TOTAL_LIMIT`` bytes are read, newest records first."""
    scan = PstoreScan()
    names: list[str] = []
    try:
        with os.scandir(pstore_dir) as it:
            for entry in it:
                if len(names) >= PSTORE_ENTRIES_LIMIT:
                    scan.notes.append(
                        f"pstore: more than {PSTORE_ENTRIES_LIMIT} entries in {pstore_dir}; the rest "
                        "not looked at"
                    )
                    break
                names.append(entry.name)
    except FileNotFoundError:
        scan.notes.append(
            f"pstore directory {pstore_dir} does not exist: mount pstore there "
            f"(mount -t pstore pstore {pstore_dir})"
        )
        return scan
    except NotADirectoryError:
        scan.notes.append(f"pstore path {pstore_dir} is not a directory")
        return scan
    except OSError as e:
        scan.notes.append(f"could not list pstore directory {pstore_dir}: {e.strerror}")
        return scan

    compressed = sorted(n for n in names if n.endswith(".enc.z"))
    if compressed:
        more = f" and {len(compressed) - 1} more" if len(compressed) > 1 else ""
        scan.notes.append(
            f"skipped {compressed[0]}{more}: the kernel could not decompress this pstore record "
            f"(check the pstore compression algorithm is built into this kernel)"
        )
    found: list[tuple[float, str, str]] = []  # (mtime, name, type)
    for name in names:
        m = _RECORD_NAME_RE.match(name)
        if m is None:
            continue  # pmsg, ftrace and other record types hold no crash
        try:
            st = os.lstat(pstore_dir / name)
        except OSError as e:
            scan.notes.append(f"could not read {pstore_dir / name}: {e.strerror}")
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((st.st_mtime, name, m.group("type")))
    found.sort(key=lambda f: (-f[0], f[1]))

    budget = PSTORE_TOTAL_LIMIT
    dumps: dict[tuple[float, str, str], list[tuple[int, str, str]]] = {}
    left_out: list[str] = []
    for mtime, name, kind in found:
        if budget <= 0:
            left_out.append(name)
            continue
        limit = min(PSTORE_RECORD_LIMIT, budget)
        try:
            evidence = read_evidence(pstore_dir / name, limit, keep_first_line=kind == "dmesg")
        except OSError as e:
            scan.notes.append(f"could not read {pstore_dir / name}: {e.strerror or e}")
            continue
        budget -= min(evidence.size, limit)
        scan.notes += _read_notes(f"pstore {name}", evidence, limit)
        text = evidence.text
        if kind == "console":
            scan.records.append(PstoreRecord(name, "console", mtime, text))
            continue
        first, _, body = text.partition("\n")
        header = _DUMP_HEADER_RE.match(first)
        if header is None:
            scan.records.append(PstoreRecord(name, "dmesg", mtime, text))
            continue
        key = (mtime, header.group("reason"), header.group("count"))
        dumps.setdefault(key, []).append((int(header.group("part")), name, body))
    if left_out:
        scan.notes.append(
            f"pstore: {len(left_out)} older records not read ({PSTORE_TOTAL_LIMIT} bytes read in all): "
            + ", ".join(sorted(left_out)[:8])
        )

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
    None if the last boot completed or the log says nothing. Linear in the log: a ``done``
    closes the earliest open ``start`` of the same step."""
    lines = progress_text.splitlines()
    last_start = next(
        (i for i in range(len(lines) - 1, -1, -1) if lines[i].split(" ", 1)[-1] == "boot start"), None
    )
    if last_start is None:
        return None
    opened: dict[str, deque[int]] = {}  # step -> line numbers of its starts still open
    for i in range(last_start + 1, len(lines)):
        event = lines[i].split(" ", 1)[-1].strip()
        if event == "boot complete":
            return None
        if event.startswith("start "):
            opened.setdefault(event[6:], deque()).append(i)
        elif event.startswith("done ") and opened.get(event[5:]):
            opened[event[5:]].popleft()
    still_open = [(starts[-1], step) for step, starts in opened.items() if starts]
    return max(still_open)[1] if still_open else None


def _fitted(notes: list[str], **fields: object) -> CrashSignature:
    """A signature from ``fields`` cut to the wire's limits (a step or note may be long)."""
    sig, cut = fit_signature(SimpleNamespace(**fields))
    notes += cut
    return sig


def _hang_in_step(step: str, detail: str, notes: list[str]) -> CrashSignature:
    m = _MODULE_STEP_RE.match(step)
    return _fitted(
        notes,
        kind=CrashKind.HANG,
        title=f"boot hung: {step}",
        guilty_module=m.group("module") if m else None,
        source="boot progress log",
        excerpt=detail,
    )


@dataclass(frozen=True)
class Detection:
    """What the detect step concluded, and what it cut, skipped or could not read."""

    crash: CrashSignature
    notes: list[str] = field(default_factory=list)


def _parse(source: str, text: str, notes: list[str]) -> CrashSignature | None:
    """The parser's signature of one text, fitted to the wire; a parser that fails costs this
    text only (and says so)."""
    capped, cut = cap_lines(text)
    if cut:
        notes.append(f"{source}: {cut} lines over {LINE_LIMIT} characters cut")
    try:
        parsed = parse_crash(capped, source)
    except Exception as exc:  # a parser bug must never cost the report
        notes.append(
            f"{source}: the crash parser failed ({type(exc).__name__}: {str(exc)[:160]}); this text "
            "was left out"
        )
        log.exception("the crash parser failed on %s", source)
        return None
    if parsed is None:
        return None
    sig, fitted = fit_signature(parsed)
    notes += [f"{source}: {n}" for n in fitted]
    return sig


def detect(
    pstore_dir: Path | None,
    boot_log: Path | None = None,
    boot_count: int = 0,
    boot_limit: int = 2,
    watchdog_reset: bool = False,
    boot_progress: Path | None = None,
) -> CrashSignature:
    """The crash signature alone (``examine`` says what was cut too)."""
    return examine(pstore_dir, boot_log, boot_count, boot_limit, watchdog_reset, boot_progress).crash


def examine(
    pstore_dir: Path | None,
    boot_log: Path | None = None,
    boot_count: int = 0,
    boot_limit: int = 2,
    watchdog_reset: bool = False,
    boot_progress: Path | None = None,
) -> Detection:
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
            evidence = read_evidence(Path(boot_log), BOOT_LOG_LIMIT)
        except OSError as e:
            notes.append(f"could not read boot log {boot_log}: {e.strerror or e}")
        else:
            notes += _read_notes(f"boot log {boot_log}", evidence, BOOT_LOG_LIMIT)
            sources.append((f"log:{boot_log}", evidence.text))

    found: list[CrashSignature] = []
    for source, text in sources:
        sig = _parse(source, text, notes)
        if sig is not None:
            found.append(sig)

    crash: CrashSignature
    if found:
        crash = _fill_channel_file(found[0], found[1:])
        if watchdog_reset and crash.kind is CrashKind.OOPS:
            crash = crash.model_copy(update={"kind": CrashKind.HANG})
    else:
        crash = _without_record(notes, boot_count, boot_limit, watchdog_reset, boot_progress)
    notes = [wire_text(n, 512) for n in notes]
    for note in notes:
        log.warning("%s", note)
    return Detection(crash, notes)


def _without_record(
    notes: list[str], boot_count: int, boot_limit: int, watchdog_reset: bool, boot_progress: Path | None
) -> CrashSignature:
    detail = "\n".join([f"boot_count={boot_count} boot_limit={boot_limit}", *notes])
    # No crash record, and the OS wrote down a step it began and never finished: the boot
    # stopped there without a panic (a hang the watchdog reset, most likely).
    if boot_progress is not None and boot_count > 0:
        step = None
        try:
            evidence = read_evidence(Path(boot_progress), PROGRESS_LOG_LIMIT)
        except OSError as e:
            notes.append(f"could not read boot progress log {boot_progress}: {e.strerror or e}")
        else:
            notes += _read_notes(f"boot progress log {boot_progress}", evidence, PROGRESS_LOG_LIMIT)
            capped, cut = cap_lines(evidence.text)
            if cut:
                notes.append(f"boot progress log: {cut} lines over {LINE_LIMIT} characters cut")
            step = stopped_step(capped)
        if step:
            return _hang_in_step(step, detail, notes)
    if watchdog_reset:
        return _fitted(
            notes,
            kind=CrashKind.HANG,
            title="boot hung: watchdog reset the machine",
            source="watchdog",
            excerpt=detail,
        )
    if boot_count > 0:
        return _fitted(
            notes, kind=CrashKind.UNKNOWN, title=_failed_title(boot_count), source="grubenv", excerpt=detail
        )
    return _fitted(notes, kind=CrashKind.NONE, title="no boot failure", excerpt=detail)
