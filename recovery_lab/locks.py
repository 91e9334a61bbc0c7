"""One build at a time per cache entry, across processes.

The lab's caches (the image stages, the Python runtime, the harness guest) build into a
temporary directory and rename it when done. Two builds of the same entry at once (two test
workers, a test run beside ``recovery-lab build``) would remove each other's temporary
directory. :func:`build_lock` holds an exclusive ``flock`` on a lock file beside the entry while
it is checked and built: the second build waits, then finds the entry built and reuses it. The
kernel drops the lock when its holder exits, also when it is killed, so a dead build never
blocks the next one.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def build_lock(lock_file: Path, log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``lock_file`` exclusively for the ``with`` block (created if missing; it stays,
    empty). Logs one line if another process holds it and this one waits."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build to finish ({lock_file.name})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
