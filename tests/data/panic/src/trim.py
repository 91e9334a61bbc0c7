#!/usr/bin/env python3
"""Cut the test logs out of raw QEMU serial captures (used by capture.sh).

    trim.py console RAW OUT        kernel banner + command line, then everything
                                   from "Run /init as init process" on
    trim.py pstore:KIND RAW OUT    the pstore record whose first line starts with
                                   KIND ("Panic" or "Oops", e.g. "Panic#2 Part1"),
                                   or the record named KIND (e.g. dmesg-ramoops-1),
                                   exactly as init.sh cat'ed it

Lines are kept verbatim except that the serial line's CR of CRLF is dropped and
the console's leading terminal escape sequences (SeaBIOS) are cut off the banner.
"""
from __future__ import annotations

import re
import sys


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace").replace("\r", "")


def trim_console(raw: str) -> str:
    lines = raw.split("\n")
    out: list[str] = []
    for line in lines:
        m = re.search(r"\[ *0\.000000\] Linux version .*", line)
        if m:
            out.append(m.group(0))
            break
    for line in lines:
        if re.match(r"\[ *0\.000000\] Command line:", line):
            out.append(line)
            break
    start = next(i for i, line in enumerate(lines) if "Run /init as init process" in line)
    for line in lines[start:]:
        # QEMU's own messages, or the firmware banner of a second boot, end the capture.
        if line.startswith("qemu-system-") or "\x1b" in line:
            break
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + "\n"


def pstore_record(raw: str, kind: str) -> str:
    records = re.findall(
        r"^=== pstore: /sys/fs/pstore/(\S+) ===\n(.*?)^=== end pstore: /sys/fs/pstore/\1 ===$",
        raw,
        flags=re.S | re.M,
    )
    for name, body in records:
        if name == kind or body.startswith(kind):
            return body
    raise SystemExit(f"no pstore record {kind!r} in capture (found {[n for n, _ in records]})")


def main() -> int:
    kind, src, dst = sys.argv[1:4]
    raw = _read(src)
    data = trim_console(raw) if kind == "console" else pstore_record(raw, kind.split(":", 1)[1])
    with open(dst, "w") as f:
        f.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
