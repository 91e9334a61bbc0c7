"""Finding the report in a log, judging it and making its signature (``parse_crash``,
``rederive``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, islice

from ..wire import CrashKind, CrashSignature
from .lines import (
    CHANNEL_FILE_LIMIT,
    CHANNEL_FILE_RE,
    END_PANIC_RE,
    END_TRACE,
    EXCERPT_LIMIT,
    FAULT_INJECTION_RE,
    FRAME_LIMIT,
    FRAME_RE,
    FRAMES_LIMIT,
    LINE_LIMIT,
    MODULE_LIMIT,
    RIP_RE,
    RULES_VERSION,
    SOURCE_LIMIT,
    TIMESTAMP_RE,
    TITLE_LIMIT,
    TRUNCATED,
    Log,
    fit,
    frames_of,
    is_stack_start,
    normalise_function,
    normalise_panic_message,
)
from .shapes import (
    BANNER,
    INTERRUPT_MARKERS,
    MARKERS,
    REPORT_LINES,
    SCAN_LINES,
    STALL_ANCHORS,
    TRIGGER_LINES,
    TRIGGERS,
    WARNING_SITE_SKIP,
    WARNING_SITES,
    Report,
    Shape,
    is_banner,
    match_shape,
    pick_stalled,
)

# --------------------------------------------------------------------------- finding a report


def _find_report(log: Log) -> Report | None:
    """The first report; a plain WARNING only if no worse report follows it in the same boot,
    or if the WARNING's own task goes on to panic because of it (``panic_on_warn``)."""
    weak: Report | None = None
    worse: Report | None = None  # after the WARNING, printed by another task
    for i in islice(log.lines_with((*TRIGGERS, BANNER)), TRIGGER_LINES):
        line = log[i]
        if weak is not None and is_banner(line.text):
            break
        found = match_shape(line.text)
        if found is None:
            continue
        shape, m = found
        if shape.weak:
            weak = weak or Report(shape, m, log, i)
            continue
        if weak is not None:
            same_task = not (weak.context and line.context) or weak.context == line.context
            if shape.panic and "panic_on_warn" in line.text and same_task:
                return weak  # panic_on_warn: the WARNING is the cause of the panic
            if not same_task:
                worse = worse or _report(shape, m, log, i)
                continue
        return worse or _report(shape, m, log, i)
    return worse or weak


def _report(shape: Shape, m: re.Match[str], log: Log, i: int) -> Report:
    if shape.name == "RCU stall":
        return _prefer_soft_lockup(log, i) or Report(shape, m, log, i)
    return Report(shape, m, log, i)


def _prefer_soft_lockup(log: Log, start: int) -> Report | None:
    """A CPU spinning in a driver trips the RCU stall detector (about 21 s) and the soft
    lockup detector (about 22 s and more) in either order; both reports name the same code.
    Report the soft lockup whenever the same boot's log holds one, so that one bug gives one
    title however long the machine ran before it was reset."""
    for j in log.lines_with(("soft lockup", BANNER), start + 1):
        text = log[j].text
        if is_banner(text):
            return None
        found = match_shape(text)
        if found is not None and found[0].name == "soft lockup":
            return Report(found[0], found[1], log, j)
    return None


def _own_lines(r: Report) -> list[int]:
    """The report's own lines: from its first line to its end trace, the next report, the
    panic that ends it or the next boot; only the lines of its caller when the log has caller
    ids (and, after "Sending NMI", the other CPUs' backtraces it asked for). At most
    ``REPORT_LINES`` of them, found among the next ``SCAN_LINES`` lines."""
    log = r.lines
    context = r.context
    own = [r.index]
    seen_stack = False
    nmi = False
    for j in range(r.index + 1, min(len(log), r.index + SCAN_LINES)):
        line = log[j]
        text = line.text
        if context and line.context != context and not (nmi and line.context.startswith("C")):
            continue
        if is_banner(text):
            break
        found = match_shape(text)
        if found is not None:
            shape = found[0]
            if shape.panic:
                if seen_stack or r.shape.panic:
                    break
                continue  # a WARNING whose only stack is the panic_on_warn panic's
            if not shape.continues:
                break
        if "Sending NMI from CPU" in text:
            nmi = True
        if is_stack_start(text):
            seen_stack = True
        own.append(j)
        if END_TRACE in text or len(own) == REPORT_LINES:
            break
    return own


# --------------------------------------------------------------------------- the signature


@dataclass(frozen=True)
class _Verdict:
    title: str
    frame: str | None
    module: str | None
    corrupted: bool
    decisive: frozenset[int]  # lines whose frames decided: the guilty one and its anchor


def _judge(r: Report) -> _Verdict:
    shape = r.shape
    groups = {k: v or "" for k, v in r.match.groupdict().items()}
    skip = shape.skip_re
    prefix = shape.title
    if shape.weak:
        site = next((s for s in WARNING_SITES if s[0] in r.lines[r.index].text), None)
        if site is not None:
            prefix = site[1]
            skip = WARNING_SITE_SKIP[site[0]]
    if "what" in groups:
        groups["what"] = _what(shape, groups["what"])
    for name in ("func", "other"):
        if groups.get(name):
            groups[name] = fit(normalise_function(groups[name]), FRAME_LIMIT)
    if "msg" in groups:
        groups["msg"] = normalise_panic_message(groups["msg"])
    prefix = prefix.format(**groups)

    candidates = list(islice(chain.from_iterable(source(r) for source in shape.sources), FRAMES_LIMIT))
    chosen = shape.pick(candidates, skip) if shape.sources else None
    decisive = {r.index}
    if chosen is not None:
        decisive.add(chosen.line)
        later = [f for f in candidates if f.line > chosen.line and STALL_ANCHORS.search(f.function)]
        if shape.pick is pick_stalled and later:
            decisive.add(later[0].line)

    corrupted = shape.corrupted or (bool(shape.sources) and shape.frame_in_title and chosen is None)
    evidence = _stack_evidence(r)
    if evidence is not None:
        decisive.add(evidence)
    elif not corrupted and shape.needs_stack and shape.sources:
        corrupted = True
    if TIMESTAMP_RE.search(r.lines[r.index].text, r.match.start()):
        corrupted = True  # another line was printed into the middle of the first one
    if any(FAULT_INJECTION_RE.match(r.lines[i].text) for i in r.own):
        corrupted = True  # a fault-injection stack is mixed into this one

    frame = fit(chosen.function, FRAME_LIMIT) if chosen is not None else None
    module = fit(chosen.module, MODULE_LIMIT) if chosen is not None and chosen.module else None
    title = f"{prefix} in {frame}" if frame and shape.frame_in_title else prefix
    return _Verdict(fit(title, TITLE_LIMIT), frame, module, corrupted, frozenset(decisive))


def _what(shape: Shape, what: str) -> str:
    if shape.name == "KASAN" and "free" in what and "after" not in what:
        return "invalid-free"  # double-free, invalid-free and either-or are one kind of bug
    if shape.name == "UBSAN":
        return what.strip().lower().replace(" ", "-")
    return what


def _stack_evidence(r: Report) -> int | None:
    """The first reliable frame of a call trace, among the first lines after the trace's
    start (unreliable ``?`` frames left out, as if not printed), or None: no usable trace."""
    for pos, i in enumerate(r.own):
        if not is_stack_start(r.lines[i].text):
            continue
        looked = 0
        for j in r.own[pos + 1 :]:
            text = r.lines[j].text
            m = FRAME_RE.match(text)
            if m is not None and m.group("unreliable"):
                continue
            if frames_of(text, j) or "(stack is not available)" in text:
                return j
            looked += 1
            if looked == 15 or is_stack_start(text):
                break
    return None


def _panic_after(r: Report) -> int | None:
    """Index of the ``Kernel panic`` line the report led to in the same boot, if any."""
    for j in r.lines.lines_with(("Kernel panic - not syncing", BANNER), r.index + 1):
        text = r.lines[j].text
        if is_banner(text):
            return None
        if "Kernel panic - not syncing" in text and "end Kernel panic" not in text:
            return j
    return None


def _excerpt_end(r: Report, panic: int | None) -> int:
    """Index one past the excerpt's last line: the end of the panic if the kernel panicked
    (``---[ end Kernel panic`` or ``Rebooting in``), else the report's own last line."""
    end = r.own[-1] + 1
    if panic is None:
        return end
    limit = min(len(r.lines), max(end, panic + 1) + SCAN_LINES)
    for j in r.lines.lines_with(("---[ end Kernel panic", "Rebooting in ", BANNER), panic):
        if j >= limit or is_banner(r.lines[j].text):
            return max(end, min(j, limit))
        if END_PANIC_RE.search(r.lines[j].text):
            return max(end, j + 1)
    return max(end, limit)


# Lines a report prints that no rule reads: registers, code bytes, raw stack words, unreliable
# frames. The excerpt leaves them out when the whole report does not fit.
_NOISE_RE = re.compile(
    r" *(?:(?:R[A-Z0-9]{1,3}|E[A-Z]{2}|[CDFGE]S|CR\d|DR\d|[xr]\d{1,2}|[a-z]\d{1,2}|sp|lr|fp|ip|gp|tp"
    r"|t\d|s\d{1,2}|a\d|ra|psr|pc) {0,3}: {0,3}[0-9a-fA-F]{8,}(?: |$)"
    r"|Code: |Stack: |[0-9a-f]{4,16}: [0-9a-f]{8}|(?:\[<[0-9a-f]+>\] +)?\? )"
)


def _excerpt(r: Report, end: int, decisive: frozenset[int]) -> str:
    """The report as logged, from its first line to ``end``, in at most ``EXCERPT_LIMIT``
    bytes, such that parsing it again gives the same signature (``rederive``). When it does not
    fit: only its own lines (not those other tasks printed in between); then without the lines
    no rule reads (registers, code bytes, unreliable frames); then the lines that decided the
    signature (markers, the guilty frame and its anchor) and as many others from the start as
    fit, the cut marked."""
    lines = r.lines
    everything = list(range(r.index, end))
    own = set(r.own)
    tail_start = r.own[-1] + 1
    mine = [i for i in everything if i in own or (i >= tail_start and lines[i].context in ("", r.context))]
    quiet = [i for i in mine if i == r.index or not _NOISE_RE.match(lines[i].text)]
    for chosen in (everything, mine, quiet):
        if _size(lines, chosen) <= EXCERPT_LIMIT:
            return "\n".join(lines[i].raw for i in chosen)
    must = [i for i in quiet if i in decisive or _structural(lines[i].text)]
    budget = EXCERPT_LIMIT - 80 - _size(lines, must)
    keep = set(must)
    for i in quiet:
        if i in keep:
            continue
        cost = _size(lines, [i])
        if cost > budget:
            break
        keep.add(i)
        budget -= cost
    kept = [lines[i].raw for i in sorted(keep)]
    size = _size_raw(kept)
    while kept and size > EXCERPT_LIMIT - 80:  # the decisive lines alone are too long: cut them
        size -= _size_raw([kept.pop()])
    kept.append(f"{TRUNCATED} (excerpt: {len(quiet) - len(keep)} lines of the report left out)")
    return "\n".join(kept)


def _size(lines: Log, indices: Sequence[int]) -> int:
    return _size_raw([lines[i].raw for i in indices])


def _size_raw(raws: Sequence[str]) -> int:
    return sum(len(raw.encode("utf-8", errors="replace")) + 1 for raw in raws)


def _structural(text: str) -> bool:
    """A line the rules read for its words, not its frame: stack starts, RIPs, lockdep's
    ``at:`` and markers, interrupt and NMI markers, the stall printer's lines, panics."""
    return (
        is_stack_start(text)
        or RIP_RE.match(text) is not None
        or "at: " in text
        or any(m in text for m in MARKERS)
        or any(m in text for m in INTERRUPT_MARKERS)
        or text.startswith("rcu:")
        or "NMI" in text
        or "Kernel panic" in text
        or END_TRACE in text
    )


def parse_crash(text: str, source: str = "") -> CrashSignature | None:
    """The signature of the first report in ``text`` (a dmesg, pstore record or console log),
    or ``None`` if it holds none. ``source`` names where the text came from."""
    log = Log(text)
    report = _find_report(log)
    if report is None:
        return None
    report.own = _own_lines(report)
    shape = report.shape
    verdict = _judge(report)

    panic = report.index if shape.panic else _panic_after(report)
    if shape.kind is not None:
        kind = shape.kind
    else:
        kind = CrashKind.KERNEL_PANIC if panic is not None else CrashKind.OOPS
    if kind is CrashKind.KERNEL_PANIC and shape.panic and _HANG_PANIC.search(log[report.index].text):
        kind = CrashKind.HANG  # e.g. "softlockup: hung tasks" with the report itself lost

    return CrashSignature(
        kind=kind,
        title=verdict.title,
        guilty_frame=verdict.frame,
        guilty_module=verdict.module,
        channel_file=_channel_file(log, report.index),
        source=fit(source, SOURCE_LIMIT),
        excerpt=_excerpt(report, _excerpt_end(report, panic), verdict.decisive),
        corrupted=verdict.corrupted,
        rules_version=RULES_VERSION,
    )


def _channel_file(log: Log, before: int) -> str | None:
    """The last ``loading channel file <path>`` before the report, in the same boot (a file
    loaded in an earlier boot of a multi-boot log is not this crash's)."""
    i = log.last_with("loading channel file ", before)
    if i is None:
        return None
    banner = log.last_with(BANNER, before)
    if banner is not None and banner > i and is_banner(log[banner].text):
        return None
    line = log[i]
    m = CHANNEL_FILE_RE.search(line.text)
    if m is None:
        return None
    path = m.group("path").lstrip("/")
    if m.end() == len(line.text) and len(log.raws[i].rstrip("\r")) > LINE_LIMIT:
        path = path[:-1] + TRUNCATED  # the line was cut at LINE_LIMIT inside the path
    return fit(path, CHANNEL_FILE_LIMIT)


_HANG_PANIC = re.compile(r"softlockup|hard ?lockup|hung_task|rcu|watchdog", re.IGNORECASE)


def rederive(sig: CrashSignature) -> CrashSignature:
    """``sig`` as these rules make it: a signature made by another version of the rules (an
    older or newer agent) is re-made from its excerpt, keeping what only the whole log knew
    (kind, channel file, source). Unchanged when the versions match or the excerpt holds no
    report (a hang named from the boot progress log, a boot with no crash record)."""
    if sig.rules_version == RULES_VERSION or not sig.excerpt:
        return sig
    again = parse_crash(sig.excerpt, sig.source)
    if again is None:
        return sig
    return sig.model_copy(
        update={
            "title": again.title,
            "guilty_frame": again.guilty_frame,
            "guilty_module": again.guilty_module,
            "corrupted": again.corrupted,
            "rules_version": RULES_VERSION,
        }
    )
