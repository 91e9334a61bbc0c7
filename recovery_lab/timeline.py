"""What happened in a run, in order: console lines and QMP events turned into typed entries.

This module owns reading a run: it never touches QEMU, so it works the same on a live run
(``QemuVM.console.timed_lines()`` and ``QemuVM.events.events``) and on recorded ones (tests,
``console.log`` + ``events.jsonl`` of a kept run directory).

Entries, each with host seconds since the VM started, a kind and a one-line detail:

- ``boot``: boot N started: a ``QMR-GRUB`` marker, or a ``Linux version`` banner that no
  GRUB marker announced (a kernel booted directly, or a bootloader without markers);
- ``grub_entry``: the entry GRUB chose and its ``boot_count`` (``QMR-GRUB entry=os
  boot_count=1``);
- ``panic``: a crash found in the boot's console text by ``recovery_agent.detect.parse_crash``
  (the same signature the agent computes: kind, title, guilty module and frame);
- ``guest_panicked`` (QMP ``GUEST_PANICKED``, pvpanic), ``watchdog`` (``WATCHDOG``),
  ``reset`` (``RESET``; QEMU 7.2 sends two or three per reset within a few milliseconds,
  measured, so RESETs closer than ``RESET_MERGE_S`` are one entry), ``shutdown``
  (``SHUTDOWN`` with its reason), ``stop``/``resume`` after the start (``STOP``, ``RESUME``);
- ``healthy`` (``QMR-HEALTHY``), ``recovery_begin``/``recovery_end``, ``pstore``
  (``QMR-PSTORE <record>``): markers printed by the images.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from recovery_agent.detect import parse_crash

from .qemu import ConsoleLine, QemuEvent

RESET_MERGE_S = 0.5
# Console lines are stamped when the reader sees them (it polls every 50 ms, and drains once
# more when QEMU exits), QMP events when they arrive, so a line can be stamped a little after
# an event that followed it (the last lines before a power-off come after SHUTDOWN). For
# ordering only, an event counts as this much later; nothing in a boot loop happens closer
# together than that (a reset is followed by a second of firmware before the next line).
EVENT_ORDER_LAG_S = 0.5
# The first RESUME (our ``cont`` at start) is the start itself, not news.
_START_GRACE_S = 1.0

_LINUX_BANNER_RE = re.compile(r"Linux version (?P<version>\d\S*)")
_GRUB_RE = re.compile(r"QMR-GRUB\s+(?P<rest>entry=.*)$")
_HEALTHY_RE = re.compile(r"QMR-HEALTHY\b(?P<rest>.*)$")
_PSTORE_RE = re.compile(r"QMR-PSTORE\s+(?P<name>\S+)")
_RECOVERY_BEGIN_RE = re.compile(r"QMR-RECOVERY-BEGIN\b(?P<rest>.*)$")
_RECOVERY_END_RE = re.compile(r"QMR-RECOVERY-END\b(?P<rest>.*)$")
_PANIC_LINE_RE = re.compile(r"Kernel panic - not syncing")
# The recovery agent's own timeline lines, and the environment's word on how it ended.
_AGENT_RE = re.compile(r"\[agent \+\s*[\d.]+s\]\s+(?P<phase>\w+)\s+(?P<text>.*)$")
_AGENT_EXIT_RE = re.compile(r"QMR-AGENT exit=(?P<code>\d+)")
_HEALTH_REPORTED_RE = re.compile(r"QMR-HEALTH-REPORT(?P<rest>ED|-FAILED.*)$")
_KV_RE = re.compile(r"(?P<key>[A-Za-z_][\w.-]*)=(?P<value>\S*)")


class EntryKind(str, Enum):
    BOOT = "boot"
    GRUB_ENTRY = "grub_entry"
    PANIC = "panic"
    GUEST_PANICKED = "guest_panicked"
    WATCHDOG = "watchdog"
    RESET = "reset"
    HEALTHY = "healthy"
    RECOVERY_BEGIN = "recovery_begin"
    PSTORE = "pstore"
    RECOVERY_END = "recovery_end"
    AGENT = "agent"
    AGENT_EXIT = "agent_exit"
    HEALTH_REPORT = "health_report"
    SHUTDOWN = "shutdown"
    STOP = "stop"
    RESUME = "resume"


@dataclass
class TimelineEntry:
    seconds: float
    kind: EntryKind
    detail: str
    boot: int  # the boot this happened in; 0 = before the first boot started
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "kind": self.kind.value,
            "detail": self.detail,
            "boot": self.boot,
            "data": self.data,
        }


@dataclass
class Timeline:
    entries: list[TimelineEntry]

    def of_kind(self, kind: EntryKind) -> list[TimelineEntry]:
        return [e for e in self.entries if e.kind is kind]

    def count(self, kind: EntryKind) -> int:
        return len(self.of_kind(kind))

    def kinds(self) -> list[str]:
        return [e.kind.value for e in self.entries]

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.entries]

    def render(self) -> str:
        """One line per entry: seconds, boot, kind, detail."""
        width = max((len(e.kind.value) for e in self.entries), default=4)
        return "\n".join(
            f"{e.seconds:8.2f}s  boot {e.boot:<2} {e.kind.value:<{width}}  {e.detail}" for e in self.entries
        )


def parse_markers(rest: str) -> dict[str, str]:
    """``entry=os boot_count=1`` -> ``{"entry": "os", "boot_count": "1"}``."""
    return {m.group("key"): m.group("value") for m in _KV_RE.finditer(rest)}


_MARKER_LINE_RE = re.compile(r"^QMR-[A-Z]")


@dataclass
class _Boot:
    number: int
    start_line: int  # index into the console lines
    seconds: float
    announced_by_grub: bool
    banner_seen: bool = False


def _quoted_lines(lines: Sequence[ConsoleLine]) -> set[int]:
    """Indices of lines that quote an earlier boot: the pstore record text the recovery
    environment prints after each ``QMR-PSTORE <name>``, up to the next ``QMR-`` marker.
    Their banners and panics are evidence, not events of this run."""
    quoted: set[int] = set()
    inside = False
    for i, line in enumerate(lines):
        if _MARKER_LINE_RE.match(line.text):
            inside = bool(_PSTORE_RE.search(line.text))
        elif inside:
            quoted.add(i)
    return quoted


def _console_entries(lines: Sequence[ConsoleLine]) -> tuple[list[tuple[int, TimelineEntry]], list[_Boot]]:
    """Marker and boot entries, each with the index of its console line."""
    entries: list[tuple[int, TimelineEntry]] = []
    boots: list[_Boot] = []
    quoted = _quoted_lines(lines)
    pstore_text: dict[int, list[str]] = {}  # entry index -> quoted record lines
    last_pstore: int | None = None

    def add(i: int, kind: EntryKind, detail: str, data: dict[str, Any] | None = None) -> None:
        number = boots[-1].number if boots else 0
        entries.append((i, TimelineEntry(lines[i].seconds, kind, detail, number, data or {})))

    for i, line in enumerate(lines):
        text = line.text
        if i in quoted:
            if last_pstore is not None:
                pstore_text[last_pstore].append(text)
            continue
        if m := _GRUB_RE.search(text):
            fields = parse_markers(m.group("rest"))
            boots.append(_Boot(len(boots) + 1, i, line.seconds, announced_by_grub=True))
            add(i, EntryKind.BOOT, f"boot {len(boots)} started (GRUB)")
            detail = f"entry={fields.get('entry', '?')}"
            if "boot_count" in fields:
                detail += f" boot_count={fields['boot_count']}"
            add(i, EntryKind.GRUB_ENTRY, detail, fields)
        elif m := _LINUX_BANNER_RE.search(text):
            if boots and boots[-1].announced_by_grub and not boots[-1].banner_seen:
                boots[-1].banner_seen = True
            else:
                boots.append(
                    _Boot(len(boots) + 1, i, line.seconds, announced_by_grub=False, banner_seen=True)
                )
                add(
                    i,
                    EntryKind.BOOT,
                    f"boot {len(boots)} started (Linux {m.group('version')})",
                    {"kernel": m.group("version")},
                )
        elif m := _HEALTHY_RE.search(text):
            add(i, EntryKind.HEALTHY, m.group("rest").strip() or "healthy", parse_markers(m.group("rest")))
        elif m := _RECOVERY_BEGIN_RE.search(text):
            add(
                i,
                EntryKind.RECOVERY_BEGIN,
                m.group("rest").strip() or "recovery environment",
                parse_markers(m.group("rest")),
            )
        elif m := _PSTORE_RE.search(text):
            add(i, EntryKind.PSTORE, m.group("name"), {"record": m.group("name")})
            last_pstore = len(entries) - 1
            pstore_text[last_pstore] = []
        elif m := _RECOVERY_END_RE.search(text):
            add(
                i,
                EntryKind.RECOVERY_END,
                m.group("rest").strip() or "recovery done",
                parse_markers(m.group("rest")),
            )
        elif m := _AGENT_RE.search(text):
            add(
                i,
                EntryKind.AGENT,
                f"{m.group('phase')}: {m.group('text').strip()}",
                {"phase": m.group("phase")},
            )
        elif m := _AGENT_EXIT_RE.search(text):
            add(i, EntryKind.AGENT_EXIT, f"agent exit {m.group('code')}", {"code": int(m.group("code"))})
        elif m := _HEALTH_REPORTED_RE.search(text):
            ok = m.group("rest") == "ED"
            add(i, EntryKind.HEALTH_REPORT, "reported to the server" if ok else m.group(0), {"ok": ok})
    for k, text_lines in pstore_text.items():
        sig = parse_crash("\n".join(text_lines), source=entries[k][1].detail)
        if sig is not None:
            entries[k][1].data["crash"] = sig.title
            entries[k][1].detail += f": {sig.kind.value}: {sig.title}"
    return entries, boots


def _crash_entries(lines: Sequence[ConsoleLine], boots: list[_Boot]) -> list[tuple[int, TimelineEntry]]:
    """One ``panic`` entry per boot whose console text holds an oops or panic."""
    entries: list[tuple[int, TimelineEntry]] = []
    quoted = _quoted_lines(lines)
    segments = [(b.number, b.start_line) for b in boots] or [(0, 0)]
    if boots and boots[0].start_line > 0:
        segments.insert(0, (0, 0))
    for k, (number, start) in enumerate(segments):
        end = segments[k + 1][1] if k + 1 < len(segments) else len(lines)
        # The agent's lines name the crash it found in pstore: evidence, not a new crash.
        index = [j for j in range(start, end) if j not in quoted and not _AGENT_RE.search(lines[j].text)]
        chunk = [lines[j] for j in index]
        if not chunk:
            continue
        sig = parse_crash("\n".join(ln.text for ln in chunk), source=f"console boot {number}")
        if sig is None:
            continue
        at = next((j for j, ln in enumerate(chunk) if _PANIC_LINE_RE.search(ln.text)), None)
        if at is None:
            first = sig.excerpt.splitlines()[0].strip() if sig.excerpt else ""
            at = next((j for j, ln in enumerate(chunk) if first and first in ln.text), len(chunk) - 1)
        where = f" [{sig.guilty_module}]" if sig.guilty_module else ""
        entries.append(
            (
                index[at],
                TimelineEntry(
                    chunk[at].seconds,
                    EntryKind.PANIC,
                    f"{sig.kind.value}: {sig.title}{where}",
                    number,
                    data={
                        "kind": sig.kind.value,
                        "title": sig.title,
                        "guilty_module": sig.guilty_module,
                        "guilty_frame": sig.guilty_frame,
                        "channel_file": sig.channel_file,
                        "signature_id": sig.id,
                    },
                ),
            )
        )
    return entries


def _event_entries(events: Iterable[QemuEvent]) -> list[TimelineEntry]:
    entries: list[TimelineEntry] = []
    last_reset: TimelineEntry | None = None
    for ev in events:
        if ev.name == "RESET":
            if last_reset is not None and ev.seconds - last_reset.data["last_seconds"] < RESET_MERGE_S:
                last_reset.data["events"] += 1
                last_reset.data["last_seconds"] = ev.seconds
                continue
            reason = ev.data.get("reason", "")
            last_reset = TimelineEntry(
                ev.seconds,
                EntryKind.RESET,
                reason or "reset",
                0,
                data={
                    "reason": reason,
                    "guest": ev.data.get("guest"),
                    "events": 1,
                    "last_seconds": ev.seconds,
                },
            )
            entries.append(last_reset)
        elif ev.name == "WATCHDOG":
            entries.append(
                TimelineEntry(
                    ev.seconds,
                    EntryKind.WATCHDOG,
                    f"watchdog fired, action={ev.data.get('action')}",
                    0,
                    data=dict(ev.data),
                )
            )
        elif ev.name == "GUEST_PANICKED":
            entries.append(
                TimelineEntry(
                    ev.seconds,
                    EntryKind.GUEST_PANICKED,
                    f"pvpanic, action={ev.data.get('action')}",
                    0,
                    data=dict(ev.data),
                )
            )
        elif ev.name == "SHUTDOWN":
            entries.append(
                TimelineEntry(
                    ev.seconds,
                    EntryKind.SHUTDOWN,
                    str(ev.data.get("reason", "shutdown")),
                    0,
                    data=dict(ev.data),
                )
            )
        elif ev.name in ("STOP", "RESUME") and ev.seconds > _START_GRACE_S:
            kind = EntryKind.STOP if ev.name == "STOP" else EntryKind.RESUME
            entries.append(TimelineEntry(ev.seconds, kind, ev.name.lower(), 0, data=dict(ev.data)))
    for e in entries:
        e.data.pop("last_seconds", None)
        if e.kind is EntryKind.RESET and e.data["events"] > 1:
            e.detail += f" ({e.data['events']} RESET events)"
    return entries


def build_timeline(lines: Sequence[ConsoleLine], events: Iterable[QemuEvent]) -> Timeline:
    """The timeline of a run from its timed console lines and its QMP events."""
    console_entries, boots = _console_entries(lines)
    from_console = sorted(console_entries + _crash_entries(lines, boots), key=lambda p: p[0])
    # Stable sorts: console entries stay in console order, and come before events of the
    # same second (a recorded log's lines all carry the same time).
    events_entries = _event_entries(events)
    entries = [e for _, e in from_console] + events_entries
    is_event = {id(e) for e in events_entries}
    entries.sort(key=lambda e: e.seconds + (EVENT_ORDER_LAG_S if id(e) in is_event else 0.0))
    # QMP events belong to the boot that was running when they came.
    boot = 0
    for e in entries:
        if e.kind is EntryKind.BOOT:
            boot = e.boot
        elif e.kind in (
            EntryKind.RESET,
            EntryKind.WATCHDOG,
            EntryKind.GUEST_PANICKED,
            EntryKind.SHUTDOWN,
            EntryKind.STOP,
            EntryKind.RESUME,
        ):
            e.boot = boot
    return Timeline(entries)


# --------------------------------------------------------------------------- recorded runs


def load_events(path: Path) -> list[QemuEvent]:
    """The events of a kept run directory's ``events.jsonl``."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            events.append(
                QemuEvent(rec["event"], rec.get("data") or {}, float(rec["seconds"]), rec.get("qemu_time"))
            )
    return events


def untimed_lines(text: str, seconds: float = 0.0) -> list[ConsoleLine]:
    """Console text without read times: every line at ``seconds``."""
    return [ConsoleLine(seconds, ln.replace("\r", "")) for ln in text.splitlines()]


def recorded_timeline(console_text: str, events: Sequence[QemuEvent]) -> Timeline:
    """The timeline of a kept run (``console.log`` has no read times): boot N's lines are
    placed just after the (N-1)th reset, which is when that boot began."""
    lines = untimed_lines(console_text)
    _, boots = _console_entries(lines)
    resets = [e.seconds for e in _event_entries(events) if e.kind is EntryKind.RESET]
    starts = {
        b.start_line: (resets[b.number - 2] if 2 <= b.number <= len(resets) + 1 else None) for b in boots
    }
    base = 0.0
    timed = []
    for i, ln in enumerate(lines):
        if starts.get(i) is not None:
            base = starts[i] + EVENT_ORDER_LAG_S + 0.01  # type: ignore[operator]
        timed.append(ConsoleLine(base + 1e-6 * i, ln.text))
    return build_timeline(timed, events)
