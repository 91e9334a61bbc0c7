"""Lines of a kernel log as the rules see them: limits, prefixes taken off, frames, titles.

The limits every field and pattern works within, the shapes of a log line and of a stack
frame in every kernel era, the log itself (``Log``: lines cut at ``LINE_LIMIT``, found with
``str.find``), and the normalisation that takes what differs per machine out of a title.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from itertools import accumulate
from operator import add

# The rules' version: raise it whenever a change can give a report another title, frame,
# module or corrupted mark (docs/crash-signatures.md).
RULES_VERSION = 2

LINE_LIMIT = 1024  # characters of a line any pattern sees (the kernel prints at most ~1000)
EXCERPT_LIMIT = 8 * 1024  # bytes of the report kept as the signature's excerpt
FRAMES_LIMIT = 256  # candidate frames looked at per report (kernel stacks are far shorter)

# The wire's limits (protocol/wire.py CrashSignature); a longer value is cut and marked.
TITLE_LIMIT = 512
FRAME_LIMIT = 256
MODULE_LIMIT = 64
CHANNEL_FILE_LIMIT = 1024
SOURCE_LIMIT = 256
TRUNCATED = "…"


def fit(value: str, limit: int) -> str:
    """``value`` if it has at most ``limit`` characters, else its start and ``…``."""
    return value if len(value) <= limit else value[: limit - 1] + TRUNCATED


# --------------------------------------------------------------------------- line shapes

# Syslog "Jan  1 00:00:00 host kernel: " or a console's "host login: ", "<4>" level (pstore),
# "[    1.234567]" timestamp,
# "[  T123]"/"[ C1]" caller id (CONFIG_PRINTK_CALLER), as the kernel and syslog print them.
_PREFIX_RE = re.compile(
    r"(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S{1,64} kernel: |[^ ]{1,64} login: )?"
    r"(?:<\d{1,3}>)?"
    r"(?:\[ {0,12}\d{1,12}\.\d{1,9}\])?"
    r"(?: ?\[ {0,8}(?P<context>[CT]\d{1,10})\])?"
    r" ?"
)
TIMESTAMP_RE = re.compile(r"\[ {0,12}\d{1,12}\.\d{1,9}\]")
SYMBOL = r"[A-Za-z_$][A-Za-z0-9_.$]*"
SYM = rf"(?P<func>{SYMBOL})"
OFFSET = r"\+0x[0-9a-f]+/0x[0-9a-f]+"
_ADDRESS = r"\[<?(?:0x)?[0-9a-f]+>?\]"
# A stack frame: "  sensor_init+0x288/0x1000 [sensor]", "  ? foo+0x1/0x2", 4.x
# "[<ffffffff81234567>] foo+0x1/0x2", "<IRQ>  [<...>] foo+0x1/0x2", powerpc
# "[c0000000] [c0000001] foo+0x1/0x2 (unreliable)", symbolized "foo+0x1/0x2 lib/x.c:12" or
# inlined "foo lib/x.c:12 [inline]".
FRAME_RE = re.compile(
    r" *(?:<(?:IRQ|EOI|NMI|TASK|SOFTIRQ|#DF)> +)?"
    rf"(?:{_ADDRESS} +){{0,2}}"
    r"(?P<unreliable>\? +)?"
    rf"(?P<func>{SYMBOL})"
    rf"(?:{OFFSET}(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?|(?P<inlined> +[^ ]+:\d+ +\[inline\]))"
)
# arm: "[<8011218c>] (unwind_backtrace) from [<8010e300>] (show_stack+0x18/0x1c)" and arm
# since 5.x: "unwind_backtrace from show_stack+0x18/0x1c": the callee, then its caller.
_ARM_FRAME_RE = re.compile(
    rf" *(?:{_ADDRESS} +)?\(?(?P<func>{SYMBOL})?(?:{OFFSET})?\)? from (?:{_ADDRESS} +)?"
    rf"\(?(?P<caller>{SYMBOL})(?:{OFFSET})?(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?"
)
# The crashing instruction: x86 "RIP: 0010:f+0x1/0x2 [m]", 4.x "RIP: 0010:[<addr>]  [<addr>]
# f+0x1/0x2", "IP: [<addr>] f+0x1/0x2", arm64 "pc : f+0x1/0x2", arm "PC is at f+0x1/0x2",
# powerpc "NIP [c000...] f+0x1/0x2", riscv "epc : f+0x1/0x2". User-space RIPs have no symbol.
RIP_RE = re.compile(
    r" *(?:(?:RIP|EIP|IP|pc|epc) {0,3}: {0,3}|NIP +|PC is at )(?:[0-9a-f]{4}:)?"
    rf"(?:{_ADDRESS} +){{0,2}}(?P<func>{SYMBOL}){OFFSET}(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?"
)
# Lockdep's "(&lock){+.+.}-{3:3}, at: f+0x1/0x2" and 4.x "at: [<addr>] f+0x1/0x2".
AT_RE = re.compile(rf"\bat: (?:{_ADDRESS} +)?(?P<func>{SYMBOL}){OFFSET}(?: +\[(?P<module>[A-Za-z0-9_-]+)\])?")
# Where a stack starts; it ends where the next one starts or the report ends.
_STACK_STARTS = (
    "Call Trace",
    "Call trace:",
    "Backtrace:",
    "Allocated by task",
    "Freed by task",
    "Allocated:",
    "Freed:",
    "Uninit was stored to memory at",
    "Uninit was created at",
    "created at:",
    "Last potentially related work creation",
    "Second to last potentially related",
)
_BACKTRACE_RE = re.compile(r"(?<!stack )backtrace(?: \(crc [0-9a-f]+\))?:")
BOOT_BANNER_RE = re.compile(r"Linux version \d")
CHANNEL_FILE_RE = re.compile(r"loading channel file (?P<path>/?[^ ]+)")
END_TRACE = "---[ end trace"
END_PANIC_RE = re.compile(r"---\[ end Kernel panic|Rebooting in \d+ seconds")
FAULT_INJECTION_RE = re.compile(rf"^ *(?:{_ADDRESS} +)?should_fail(?:slab)?(?:\.[a-z0-9.]+)?\+0x")
# A syscall's entry has other names on other architectures and kernel versions:
# __x64_sys_mount, __arm64_sys_mount, __se_sys_mount, __do_sys_mount, SyS_mount, ksys_mount.
# All are the syscall "mount": the architecture's, then the wrapper's, prefix is taken off.
_ARCH_PREFIX_RE = re.compile(r"^__(?:x64|ia32|x32|arm64|arm|riscv|s390x?|powerpc|ppc)_")
_SYSCALL_PREFIX_RE = re.compile(r"(?:compat_)?(?:__se_|__do_)?(?:_{0,4}sys_|SyS_|SYSC_|ksys_)(?=[a-z0-9_]+$)")


def normalise_function(name: str) -> str:
    """One name for a function on every build and architecture: ``widget_read_rate.constprop.0``
    and ``f.cold`` lose the compiler's clone suffix (C names have no dot), ``__x64_sys_mount``
    and ``__se_sys_mount`` are the syscall ``mount``."""
    name = name.partition(".")[0]
    bare = _SYSCALL_PREFIX_RE.sub("", _ARCH_PREFIX_RE.sub("", name, count=1), count=1)
    return bare if bare and bare != name and _is_syscall_entry(name) else name


def _is_syscall_entry(name: str) -> bool:
    return _SYSCALL_PREFIX_RE.match(_ARCH_PREFIX_RE.sub("", name, count=1)) is not None


# --------------------------------------------------------------------------- lines


@dataclass(frozen=True, slots=True)
class _Line:
    raw: str  # as logged, cut at LINE_LIMIT, without CR
    text: str  # without level, timestamp and caller id
    context: str  # "T123"/"C1" (CONFIG_PRINTK_CALLER) or ""


def _parse_line(raw: str) -> _Line:
    raw = raw[:LINE_LIMIT].rstrip("\r")
    m = _PREFIX_RE.match(raw)
    assert m is not None  # every part of the prefix is optional
    return _Line(raw, raw[m.end() :], m.group("context") or "")


def strip_prefix(line: str) -> str:
    """A log line without its syslog level, timestamp and caller id."""
    return _parse_line(line).text


class Log:
    """A kernel log's lines, each cut and parsed only when a rule reads it. Searches over the
    whole log (``lines_with``) use ``str.find``, so a log of millions of lines costs no
    Python work per line, only per line that holds what is searched for."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.raws = text.split("\n")
        # offset of each line's end (its "\n", or the end of the text for the last line)
        self._ends = list(map(add, accumulate(map(len, self.raws)), range(len(self.raws))))
        self._parsed: dict[int, _Line] = {}

    def __len__(self) -> int:
        return len(self.raws)

    def __getitem__(self, i: int) -> _Line:
        line = self._parsed.get(i)
        if line is None:
            line = self._parsed[i] = _parse_line(self.raws[i])
        return line

    def _start(self, i: int) -> int:
        return self._ends[i - 1] + 1 if i > 0 else 0

    def lines_with(self, needles: Sequence[str], start: int = 0) -> Iterator[int]:
        """Indices of the lines from ``start`` on whose first ``LINE_LIMIT`` characters hold
        one of ``needles``, in order. Each needle is searched for once over the log."""
        if start >= len(self.raws):
            return
        heap = [(pos, n) for n in needles if (pos := self.text.find(n, self._start(start))) != -1]
        heapify(heap)
        while heap:
            i = bisect_left(self._ends, heap[0][0])
            if any(n in self[i].raw for n in needles):
                yield i
            after = self._ends[i] + 1
            while heap and heap[0][0] < after:
                _pos, n = heappop(heap)
                pos = self.text.find(n, after)
                if pos != -1:
                    heappush(heap, (pos, n))

    def last_with(self, needle: str, before: int) -> int | None:
        """Index of the last line before line ``before`` that holds ``needle``."""
        end = self._start(before)
        while end > 0:
            pos = self.text.rfind(needle, 0, end)
            if pos == -1:
                return None
            i = bisect_left(self._ends, pos)
            if needle in self[i].raw:
                return i
            end = self._start(i)
        return None


@dataclass(frozen=True, slots=True)
class Frame:
    function: str  # normalised
    module: str | None
    line: int  # index of the line it came from


def _frame(text: str, index: int) -> Frame | None:
    """The frame a call-trace line names, or None for other lines, unreliable (``?``,
    ``(unreliable)``) and inlined frames."""
    m = FRAME_RE.match(text)
    if m is None:
        return None
    if m.group("unreliable") or m.group("inlined") or text.endswith("(unreliable)"):
        return None
    return Frame(normalise_function(m.group("func")), m.group("module"), index)


def frames_of(text: str, index: int) -> list[Frame]:
    frame = _frame(text, index)
    if frame is not None:
        return [frame]
    if " from " in text:
        m = _ARM_FRAME_RE.match(text)
        if m is not None:
            out = [Frame(normalise_function(m.group("func")), None, index)] if m.group("func") else []
            return [*out, Frame(normalise_function(m.group("caller")), m.group("module"), index)]
    return []


def is_stack_start(text: str) -> bool:
    return any(s in text for s in _STACK_STARTS) or (
        "backtrace" in text and _BACKTRACE_RE.search(text) is not None
    )


# --------------------------------------------------------------------------- normalisation

_OFFSET_RE = re.compile(OFFSET)
_COMM_PID_RE = re.compile(r"\[[^]\s]{1,64}:\d{1,10}\]")  # [insmod:63]
_CPU_RE = re.compile(r"CPU#? ?\d+")
_PARENS_RE = re.compile(r"\([^()]*\)")  # (0,0), (error -2)
_NUMBER_RE = re.compile(
    r"(?<![\w.])-?(?:0x[0-9a-fA-F]+|[0-9a-f]{8,}|\d+(?:\.\d+)?(?:s|ms|us|ns|[KMG]i?B|kB|[KMG]|%)?)(?!\w)"
)
_SPACES_RE = re.compile(r"\s+")


def normalise_title(text: str) -> str:
    """Remove what differs between machines and boots: timestamps, addresses, offsets,
    ``comm:pid`` tags, CPU numbers, numbers; keep words such as ``ext4`` or ``rcu_preempt``.
    Linear in the text, which is cut at ``LINE_LIMIT`` first."""
    text = text[:LINE_LIMIT]
    text = TIMESTAMP_RE.sub(" ", text)
    text = _OFFSET_RE.sub("", text)
    text = _COMM_PID_RE.sub(" ", text)
    text = _CPU_RE.sub("CPU", text)
    text = _PARENS_RE.sub(lambda m: " " if any(c.isdigit() for c in m.group()) else m.group(), text)
    words = [w for w in text.split() if not ("=" in w and any(c.isdigit() for c in w.partition("=")[2]))]
    text = _NUMBER_RE.sub("", " ".join(words))
    text = _SPACES_RE.sub(" ", text).strip()
    return text.rstrip(" ,:;-")


def normalise_panic_message(msg: str) -> str:
    """The message of ``Kernel panic - not syncing: <msg>``, per machine details removed."""
    for fixed in ("VFS: Unable to mount root fs", "VFS: Cannot open root device", "Attempted to kill init!"):
        if msg.startswith(fixed):
            return fixed  # device names and exit codes differ between machines
    return normalise_title(msg)
