"""The port file: how ``recovery-server serve --port 0 --port-file F`` tells whoever started
it where it listens.

The server writes the file whole (a temporary name, then a rename), so a reader sees either
no file or the port; :func:`wait_for_port_file` is the reader's side, for the lab's demo and
the tests that start a server process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


class ServerDidNotStart(RuntimeError):
    """The server process ended (or the caller's deadline passed) before it wrote its port."""


def write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)


def wait_for_port_file(
    path: Path, running: Callable[[], bool], *, timeout_s: float | None = None, interval_s: float = 0.05
) -> int:
    """The port in ``path`` once the server wrote it. Waits as long as ``running()`` says the
    server process lives, and no longer than ``timeout_s`` when one is given."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            return int(path.read_text())
        except (FileNotFoundError, ValueError):  # not written yet (or by a server that wrote in place)
            pass
        if not running():
            raise ServerDidNotStart(f"the server ended before it wrote {path}")
        if deadline is not None and time.monotonic() > deadline:
            raise ServerDidNotStart(f"the server wrote no {path} within {timeout_s:g} s")
        time.sleep(interval_s)
