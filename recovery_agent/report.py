"""The diagnostics report, fitted to the wire: whatever the evidence held, what the agent sends
validates, fits the server's body limit and says what was cut.

This module is the agent's last line of defence against its own evidence (docs/recovery-
loop.md, "The limits of a report"); nothing the disks, pstore or the crash parser hand it can
make the report fail to build:

1. ``wire_text`` makes any text sendable: valid UTF-8 (a file name that was not UTF-8 comes
   with lone surrogates), no NUL (a database column cannot hold one), cut to a field's length.
2. ``fit_signature`` turns whatever the crash parser returned into a ``CrashSignature`` that
   validates: each field cut to its wire limit, a channel file path that does not fit left out
   (a cut path would name another file), a kind the wire does not know made ``unknown``. Each
   change is a note.
3. ``Findings`` is what the detect and collect steps found; ``Findings.diagnostics`` builds the
   message, its notes fitted to ``NOTES_MAX`` lines of ``NOTE_MAX`` characters.
4. ``seal_within`` signs the diagnostics and measures the envelope; while it is over
   ``MAX_ENVELOPE_BYTES`` (the server's body limit) it drops the least recently changed files,
   from the largest list first, and says so in a note. What it returns has been read back
   through the wire model, so it validates.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from .protocol.envelope import MAX_ENVELOPE_BYTES, canonical_json, seal
from .protocol.keys import SigningKey
from .protocol.wire import (
    EXCERPT_MAX,
    FRAME_MAX,
    MODULE_MAX,
    NOTE_MAX,
    NOTES_MAX,
    PATH_MAX,
    SOURCE_MAX,
    TITLE_MAX,
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    FileRecord,
    SystemInfo,
)

# --------------------------------------------------------------------------- text


def wire_text(text: object, limit: int) -> str:
    """``text`` as a wire string of at most ``limit`` characters: lone surrogates (from bytes
    that were not UTF-8) and NUL become U+FFFD."""
    s = (text if isinstance(text, str) else str(text))[:limit]
    s = s.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
    return s.replace("\x00", "\ufffd")[:limit]


def _cut(value: object, limit: int, name: str, notes: list[str]) -> str:
    text = wire_text(value, limit + 1)
    if len(text) > limit:
        length = f"{len(value)} characters" if isinstance(value, str) else "too long"
        notes.append(f"crash {name}: {length}, cut to {limit}")
        text = text[:limit]
    return text


# --------------------------------------------------------------------------- crash signature


def fit_signature(parsed: object) -> tuple[CrashSignature, list[str]]:
    """A ``CrashSignature`` that validates, from whatever the parser returned (a signature, or
    any object with its fields), and a note for each field that had to change."""
    notes: list[str] = []
    raw_kind = getattr(parsed, "kind", CrashKind.UNKNOWN)
    try:
        kind = CrashKind(getattr(raw_kind, "value", raw_kind))
    except ValueError:
        notes.append(f"crash kind {wire_text(repr(raw_kind), 64)} is not one the wire knows: sent as unknown")
        kind = CrashKind.UNKNOWN

    def optional(name: str, limit: int) -> str | None:
        value = getattr(parsed, name, None)
        return None if value is None else _cut(value, limit, name, notes)

    title = _cut(getattr(parsed, "title", "") or "", TITLE_MAX, "title", notes)
    channel_file = getattr(parsed, "channel_file", None)
    if channel_file is not None:
        channel_file = wire_text(channel_file, PATH_MAX + 1)
        if len(channel_file) > PATH_MAX:
            notes.append(
                f"crash channel_file: the path named in the log is over {PATH_MAX} characters; "
                "left out (a cut path would name another file)"
            )
            channel_file = None
    signature = CrashSignature(
        kind=kind,
        title=title,
        guilty_frame=optional("guilty_frame", FRAME_MAX),
        guilty_module=optional("guilty_module", MODULE_MAX),
        channel_file=channel_file,
        source=_cut(getattr(parsed, "source", "") or "", SOURCE_MAX, "source", notes),
        excerpt=_cut(getattr(parsed, "excerpt", "") or "", EXCERPT_MAX, "excerpt", notes),
    )
    return signature, notes


def fit_notes(notes: list[str]) -> list[str]:
    """At most ``NOTES_MAX`` notes of at most ``NOTE_MAX`` characters, duplicates dropped."""
    unique = list(dict.fromkeys(wire_text(n, NOTE_MAX) for n in notes))
    if len(unique) > NOTES_MAX:
        left_out = len(unique) - (NOTES_MAX - 1)
        unique = [*unique[: NOTES_MAX - 1], f"{left_out} more notes left out"]
    return unique


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Findings:
    """What the detect and collect steps found: the diagnostics but for the nonces and the
    time, which only the report step knows."""

    device_id: str
    agent_version: str
    boot: BootState
    crash: CrashSignature
    system: SystemInfo
    drivers: list[FileRecord]
    channel_files: list[FileRecord]
    driver_store: list[FileRecord]
    recent_changes: list[FileRecord]
    notes: list[str] = field(default_factory=list)
    # A recovery test visit (test mode): no crash, the loop run on purpose.
    test_mode: bool = False

    def diagnostics(self, *, server_nonce: str, agent_nonce: str, created_at: datetime) -> Diagnostics:
        return Diagnostics(
            test_mode=self.test_mode,
            server_nonce=server_nonce,
            agent_nonce=agent_nonce,
            created_at=created_at,
            device_id=self.device_id,
            agent_version=self.agent_version,
            boot=self.boot,
            crash=self.crash,
            system=self.system,
            drivers=self.drivers,
            channel_files=self.channel_files,
            driver_store=self.driver_store,
            recent_changes=self.recent_changes,
            notes=fit_notes(self.notes),
        )

    def as_json(self) -> dict[str, Any]:
        """The findings as JSON values (what ``recovery-agent inspect`` prints)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, BaseModel):
                out[f.name] = value.model_dump(mode="json")
            elif isinstance(value, list):
                out[f.name] = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
            else:
                out[f.name] = value
        return out


# --------------------------------------------------------------------------- size


@dataclass(frozen=True)
class Sealed:
    """Diagnostics signed and serialised, within the size limit."""

    diagnostics: Diagnostics
    envelope: dict[str, Any]
    body: bytes  # what is sent: the envelope's canonical JSON


class ReportTooLarge(ValueError):
    """Raised when diagnostics with no files listed still do not fit (it cannot happen with
    the wire's limits: a sign that a limit changed without this module)."""


_TRIMMED = ("channel_files", "drivers", "driver_store", "recent_changes")


def _sealed(diagnostics: Diagnostics, key: SigningKey) -> tuple[dict[str, Any], bytes]:
    envelope = seal(diagnostics, key)
    return envelope, canonical_json(envelope)


def seal_within(diagnostics: Diagnostics, key: SigningKey, limit: int = MAX_ENVELOPE_BYTES) -> Sealed:
    """Seal ``diagnostics`` into an envelope of at most ``limit`` bytes, dropping the least
    recently changed files (largest list first) with a note if it is over."""
    envelope, body = _sealed(diagnostics, key)
    original = {name: list(getattr(diagnostics, name)) for name in _TRIMMED}
    kept = {name: list(records) for name, records in original.items()}
    sizes = {name: [len(canonical_json(r.model_dump(mode="json"))) + 1 for r in kept[name]] for name in kept}
    while len(body) > limit:
        if not any(kept.values()):
            raise ReportTooLarge(f"diagnostics without any file listed are {len(body)} bytes, over {limit}")
        # base64 makes 3 payload bytes 4; a few hundred more for the notes this adds.
        need = (len(body) - limit) * 3 // 4 + 2 * NOTE_MAX
        while need > 0 and any(kept.values()):
            name = max(kept, key=lambda n: sum(sizes[n]))
            # The least recently changed record of that list goes first.
            at = min(range(len(kept[name])), key=lambda i: (kept[name][i].mtime, kept[name][i].path))
            need -= sizes[name].pop(at)
            kept[name].pop(at)
        trimmed = [
            f"{name}: {len(original[name])} listed, {len(kept[name])} sent: the report must stay "
            f"under {limit} bytes (the most recently changed kept)"
            for name in _TRIMMED
            if len(kept[name]) < len(original[name])
        ]
        others = [n for n in diagnostics.notes if "the report must stay under" not in n]
        diagnostics = diagnostics.model_copy(update={**kept, "notes": fit_notes(trimmed + others)})
        envelope, body = _sealed(diagnostics, key)
    # Read back what is sent through the model: the report validates, whatever went into it.
    checked = Diagnostics.model_validate_json(base64.b64decode(envelope["payload"]))
    return Sealed(checked, envelope, body)
