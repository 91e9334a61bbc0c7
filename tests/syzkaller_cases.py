"""Real kernel crash reports from syzkaller's ``pkg/report`` test data, with the titles syzkaller
gives them (tests/data/syzkaller/README.md says where they come from and under which licence).

Each file is a header (``TITLE:``, ``ALT:``, ``TYPE:``, ``FRAME:``, ``CORRUPTED: Y`` ...), an
empty line, then the kernel output; a file may end with an empty line, ``REPORT:`` and the
report syzkaller cuts out of that output, which is not part of the kernel output. No title
means syzkaller finds no report in the output.

Two sets, split by a hash of the file name before any parser work was tuned: ``tuning`` (what
the parser's rules and tests were developed on) and ``heldout`` (only measured, by
``scripts/eval_crash_titles.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).parent / "data" / "syzkaller"
SETS = ("tuning", "heldout")

# Report kinds, from syzkaller's title; the first match wins.
KINDS: tuple[tuple[str, str], ...] = (
    ("KASAN", r"^KASAN:"),
    ("KMSAN", r"^KMSAN:"),
    ("KFENCE", r"^KFENCE:"),
    ("KCSAN", r"^KCSAN:"),
    ("UBSAN", r"^UBSAN:"),
    ("memory leak", r"^memory leak"),
    (
        "lockdep",
        r"possible deadlock|inconsistent lock state|suspicious RCU usage|locking bug|bad unlock balance|"
        r"held lock freed|still has locks held|nested lock|non-static key|lock held when returning|"
        r"circular locking",
    ),
    ("RCU stall", r"^INFO: rcu detected stall"),
    ("hung task", r"^INFO: task (?:hung|can't die)"),
    ("soft lockup", r"^BUG: soft lockup"),
    ("WARNING", r"^WARNING"),
    ("kernel BUG", r"^kernel BUG|^BUG: corrupted list|^BUG: bad usercopy"),
    ("GPF", r"^general protection fault"),
    ("page fault", r"^BUG: unable to handle|^Unhandled fault|^Internal error|^Unable to handle"),
    ("trap", r"^divide error|^invalid opcode|^PANIC: double fault|^stack segment|^int3"),
    ("panic", r"^kernel panic|^kernel stack overflow"),
    ("BUG (other)", r"^BUG:"),
)


def kind_of(title: str) -> str:
    """The report kind (``KINDS``) of a syzkaller title."""
    for kind, pattern in KINDS:
        if re.search(pattern, title):
            return kind
    return "other"


# The function a title names: "... in F", "... in F/usb_submit_urb", "KCSAN: data-race in F / G".
_TITLE_FUNC_RE = re.compile(r" in ([A-Za-z0-9_.]+)(?:/\S+)?(?: / ([A-Za-z0-9_.]+))?$")


@dataclass(frozen=True)
class SyzCase:
    name: str  # file name, the same as in syzkaller's tree
    title: str  # "" when syzkaller finds no report
    corrupted: bool
    log: str
    alt_titles: list[str] = field(default_factory=list)

    @property
    def functions(self) -> tuple[str, ...]:
        """The function(s) the title names; empty when it names none or the report is corrupted."""
        if self.corrupted:
            return ()
        m = _TITLE_FUNC_RE.search(self.title)
        if m is None or m.group(1) == "corrupted":
            return ()
        return tuple(g for g in m.groups() if g)


def read_case(path: Path) -> SyzCase:
    text = path.read_bytes().decode("utf-8", errors="replace")
    header, _, log = text.partition("\n\n")
    title, corrupted, alt = "", False, []
    for line in header.splitlines():
        key, _, value = line.partition(": ")
        if key == "TITLE":
            title = value
        elif key == "CORRUPTED":
            corrupted = value == "Y"
        elif key == "ALT":
            alt.append(value)
    cut = log.find("\n\nREPORT:\n")
    if cut != -1:
        log = log[: cut + 1]
    return SyzCase(path.name, title, corrupted, log, alt)


def cases(which: str) -> list[SyzCase]:
    """Every case of one set (``tuning`` or ``heldout``), in a stable order."""
    directory = DATA / which
    return [read_case(p) for p in sorted(directory.iterdir(), key=lambda p: (len(p.name), p.name))]


def case(which: str, name: str) -> SyzCase:
    return read_case(DATA / which / name)
