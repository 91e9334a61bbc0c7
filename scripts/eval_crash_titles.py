#!/usr/bin/env python3
"""How often our crash parser blames the function syzkaller blames, on real kernel reports.

Runs ``recovery_agent.protocol.crashreport.parse_crash`` over a set of syzkaller's ``pkg/report`` test
reports (tests/data/syzkaller/, see its README) and compares our guilty frame with the function
in syzkaller's title (``KASAN: use-after-free Read in ip6_send_skb`` -> ``ip6_send_skb``), per
report kind. Only reports whose title names a function and that syzkaller does not mark
corrupted are scored; the others are counted apart (found or not, marked corrupted or not).

Both names are compared after ``normalise_function``: syzkaller's titles keep the syscall
entry's name as one architecture spells it (``sys_rmdir`` from ``__x64_sys_rmdir``), ours name
the syscall (``rmdir``) on every architecture; ``strict`` counts exact equality of the strings.

    scripts/eval_crash_titles.py                  # the held-out set: the number to quote
    scripts/eval_crash_titles.py --set tuning     # the set the rules were developed on
    scripts/eval_crash_titles.py --misses         # also list each disagreement

Exit code 0 always (this is a measurement, not a test); the tests hold the per-kind minimums.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recovery_agent.protocol.crashreport import normalise_function, parse_crash
from tests.syzkaller_cases import KINDS, SETS, cases, kind_of


@dataclass
class Tally:
    scored: int = 0
    agree: int = 0
    strict: int = 0  # the very same string
    not_found: int = 0  # syzkaller names a function, we find no report at all
    corrupted_total: int = 0  # syzkaller marks it corrupted
    corrupted_marked: int = 0  # ... and so do we
    none_total: int = 0  # syzkaller finds no report
    none_agree: int = 0  # ... nor do we


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="heldout", help=f"one of {', '.join(SETS)} (default heldout)")
    ap.add_argument("--misses", action="store_true", help="list every disagreement")
    args = ap.parse_args(argv)
    if args.set not in SETS:
        print(f"eval_crash_titles: unknown set {args.set!r}: use one of {', '.join(SETS)}", file=sys.stderr)
        return 2

    tallies: dict[str, Tally] = defaultdict(Tally)
    misses: list[str] = []
    for case in cases(args.set):
        sig = parse_crash(case.log, case.name)
        if not case.title:
            t = tallies["(no report)"]
            t.none_total += 1
            t.none_agree += sig is None
            continue
        t = tallies[kind_of(case.title)]
        if case.corrupted:
            t.corrupted_total += 1
            t.corrupted_marked += bool(sig is not None and getattr(sig, "corrupted", False))
            continue
        functions = case.functions
        if not functions:
            continue
        t.scored += 1
        if sig is None:
            t.not_found += 1
            misses.append(f"{case.name:>5}  {case.title}\n       ours: (no report found)")
            continue
        t.strict += sig.guilty_frame in functions
        if sig.guilty_frame in {normalise_function(f) for f in functions}:
            t.agree += 1
        else:
            misses.append(
                f"{case.name:>5}  {case.title}\n       ours: {sig.title} [frame {sig.guilty_frame}]"
            )

    print(f"set: {args.set}")
    print(f"{'kind':<14} {'scored':>6} {'agree':>6} {'%':>5} {'not found':>9}   corrupted (we mark)")
    total = Tally()
    for kind in [k for k, _ in KINDS] + ["other", "(no report)"]:
        t = tallies.get(kind)
        if t is None:
            continue
        for f in ("scored", "agree", "strict", "not_found", "corrupted_total", "corrupted_marked"):
            setattr(total, f, getattr(total, f) + getattr(t, f))
        if kind == "(no report)":
            print(f"{kind:<14} syzkaller finds none in {t.none_total}, nor do we in {t.none_agree}")
            continue
        pct = f"{100 * t.agree / t.scored:.0f}" if t.scored else "-"
        corrupted = f"{t.corrupted_total} ({t.corrupted_marked})" if t.corrupted_total else ""
        print(f"{kind:<14} {t.scored:>6} {t.agree:>6} {pct:>5} {t.not_found:>9}   {corrupted}")
    pct = f"{100 * total.agree / total.scored:.1f}" if total.scored else "-"
    print(
        f"{'all':<14} {total.scored:>6} {total.agree:>6} {pct:>5} {total.not_found:>9}   "
        f"{total.corrupted_total} ({total.corrupted_marked})"
    )
    print(f"strict (same string): {total.strict}/{total.scored}")
    if args.misses:
        print("\ndisagreements:")
        print("\n".join(misses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
