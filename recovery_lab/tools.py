"""The one place the lab runs external tools (mkfs, mtools, grub-mkimage, apt, make, qemu-img).

Everything that builds images calls :func:`run`; nothing else in the lab starts a process for
a build step. That gives one behaviour for every tool:

- a tool that is not installed raises :class:`ToolMissing`, naming the Debian package that
  provides it and the command that installs it;
- a tool that fails raises :class:`ToolFailed` with the command line and the tail of its
  standard error, so the reason is in the message a person reads;
- :func:`require` checks a whole list up front, so a build stops before its first stage instead
  of half-way through, and reports every missing tool at once.

Steps that are easy in Python (copying bytes to an offset, writing a partition table, hashing)
are done in Python instead of with ``dd``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import LabError

# Tool -> Debian 12 package that provides it.
PACKAGES: dict[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "debugfs": "e2fsprogs",
    "depmod": "kmod",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "gcc-12": "gcc-12",
    "grub-mkimage": "grub-common",
    "gzip": "gzip",
    "make": "make",
    "mcopy": "mtools",
    "mdir": "mtools",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.fat": "dosfstools",
    "mmdebstrap": "mmdebstrap",
    "mmd": "mtools",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "sfdisk": "fdisk",
    "strip": "binutils",
}

# Files (not commands) the builder reads, and the package that provides each.
FILES: dict[str, str] = {
    "/usr/lib/grub/i386-pc/boot.img": "grub-pc-bin",
    "/bin/busybox": "busybox-static",
}

_STDERR_TAIL_LINES = 20


class ToolError(LabError):
    """Base class of the errors this module raises; never raised itself."""


class ToolMissing(ToolError):
    """Raised when a tool (or a file a tool package provides) is not installed. The message
    names the Debian package and the ``apt-get install`` command that fixes it."""


class ToolFailed(ToolError):
    """Raised when a tool exits non-zero. ``returncode``, ``cmd`` and ``stderr`` are kept;
    the message holds the command line and the last lines of its standard error."""

    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        self.cmd = list(cmd)
        self.returncode = returncode
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-_STDERR_TAIL_LINES:])
        msg = f"{cmd[0]} failed (exit {returncode}): {shlex.join(cmd)}"
        if tail:
            msg += "\n" + "\n".join("    " + line for line in tail.splitlines())
        super().__init__(msg)


def _install_hint(package: str) -> str:
    return f"install {package} (apt-get install {package})"


def missing_message(tool: str) -> str:
    package = PACKAGES.get(tool) or FILES.get(tool)
    if package:
        return f"{tool} not found: {_install_hint(package)}"
    return f"{tool} not found: install the package that provides it"


def which(tool: str) -> str | None:
    """The path of ``tool``, also looking in the sbin directories (a non-root PATH may lack
    them, yet mkfs.ext4 and depmod work for any user on image files)."""
    found = shutil.which(tool)
    if found:
        return found
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(tool, path=path)


def require(*tools: str) -> None:
    """Check that every tool (a command name, or an absolute path from :data:`FILES`) is
    installed; raise one :class:`ToolMissing` listing all that are not."""
    missing = []
    for tool in tools:
        present = Path(tool).exists() if tool.startswith("/") else which(tool) is not None
        if not present:
            missing.append(missing_message(tool))
    if missing:
        packages = sorted(
            {
                (PACKAGES.get(t) or FILES.get(t) or t)
                for t in tools
                if (Path(t).exists() if t.startswith("/") else which(t)) is None
            }
        )
        raise ToolMissing(
            "; ".join(missing)
            + (f" (all at once: apt-get install {' '.join(packages)})" if len(missing) > 1 else "")
        )


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    stdout_to: str | os.PathLike[str] | None = None,
) -> str:
    """Run ``cmd`` and return its standard output as text.

    ``env`` is added to (not substituted for) the current environment. ``stdout_to`` sends
    standard output to that file instead (for binary output such as a cpio archive).
    Raises :class:`ToolMissing` or :class:`ToolFailed`.
    """
    argv = [os.fspath(c) for c in cmd]
    exe = which(argv[0])
    if exe is None:
        raise ToolMissing(missing_message(argv[0]))
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    full_env.setdefault("LC_ALL", "C")
    out_file = open(stdout_to, "wb") if stdout_to is not None else None
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            cwd=cwd,
            env=full_env,
            input=input,
            stdout=out_file if out_file else subprocess.PIPE,
            stderr=subprocess.PIPE,
            check=False,
        )
    finally:
        if out_file:
            out_file.close()
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise ToolFailed(argv, proc.returncode, stderr)
    return "" if out_file else proc.stdout.decode("utf-8", "replace")


def package_version(package: str) -> str:
    """The installed version of a Debian package (for cache keys and manifests)."""
    try:
        return run(["dpkg-query", "-W", "-f=${Version}", package]).strip()
    except ToolFailed:
        raise ToolMissing(f"package {package} is not installed: {_install_hint(package)}") from None
