"""GRUB's environment block (``grubenv``): the boot counter's home.

This module owns reading and rewriting the one file both GRUB and the recovery agent write.
The protocol around it (see DESIGN.md §3):

1. ``grub.cfg`` runs ``load_env``, bumps ``boot_count`` with an if/elif chain (GRUB has no
   arithmetic), runs ``save_env`` and boots the recovery entry once ``boot_count`` reaches
   ``boot_limit`` (default 2).
2. The OS sets ``boot_count=0`` only after its health check passed; the recovery agent does the
   same after it applied a remediation (``reset_boot_count``).

The file format is GRUB's (grub-core/lib/envblk.c): exactly 1024 bytes, the line
``# GRUB Environment Block``, then ``name=value`` lines, then ``#`` padding up to the size.
Lines starting with ``#`` are comments (newer grub-editenv writes a warning line) and are kept.
In values a backslash and a newline are escaped with a backslash.

GRUB's ``save_env`` does not go through a filesystem driver's allocator: it finds the file's
blocks and overwrites them in place, and refuses if the file is not exactly one block long.
So writers here never truncate, recreate or rename the file: they open it ``r+b``, check it is
still 1024 bytes, overwrite it at offset 0 and ``fsync``. Only ``create`` (for image builders)
makes a new file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import AgentError
from .protocol.limits import COUNTER_MAX

ENVBLK_SIZE = 1024
ENVBLK_SIGNATURE = b"# GRUB Environment Block\n"

BOOT_COUNT = "boot_count"
BOOT_LIMIT = "boot_limit"
RECOVERY_ATTEMPTS = "recovery_attempts"
# Test mode (testmode.py): set, the next recovery visit is a test; its value says who armed it.
RECOVERY_TEST = "recovery_test"
DEFAULT_BOOT_LIMIT = 2

# GRUB itself accepts any name without '=' or a newline; a script can only use these.
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_NUMBER_RE = re.compile(r"^[0-9]+$")
_REBUILD_HINT = "rebuild the image with recovery-lab build"


class BootEnvError(AgentError):
    """Raised when a grubenv file cannot be read or written safely: wrong size, no GRUB
    header, a malformed line, or new content that would not fit in 1024 bytes."""


@dataclass
class _Line:
    """One line of the block: a variable (``name`` set) or a comment kept verbatim."""

    name: str | None
    value: str  # unescaped value for a variable; the raw text (without newline) for a comment


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\\n")


def _decode(raw: bytes) -> str:
    # surrogateescape: any byte GRUB wrote survives a read/write round trip unchanged.
    return raw.decode("utf-8", errors="surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


class BootEnv(Mapping[str, str]):
    """The variables of one GRUB environment block, in file order, comments kept.

    Read with ``BootEnv.read(path)``, change with ``set``/``unset``, write back in place with
    ``write(path)``. Reading it as a mapping gives the variables only.
    """

    def __init__(self, lines: list[_Line] | None = None) -> None:
        self._lines: list[_Line] = list(lines or [])

    # ------------------------------------------------------------------ construction

    @classmethod
    def new(cls, variables: Mapping[str, str | int] | None = None) -> BootEnv:
        """A fresh block holding ``variables`` (for image builders and tests)."""
        env = cls()
        for name, value in (variables or {}).items():
            env.set(name, value)
        return env

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "grubenv") -> BootEnv:
        """Parse a block; ``where`` names it in errors (usually the file's path)."""
        if len(data) != ENVBLK_SIZE:
            raise BootEnvError(
                f"grubenv at {where} is {len(data)} bytes, expected {ENVBLK_SIZE}: {_REBUILD_HINT}"
            )
        if not data.startswith(ENVBLK_SIGNATURE):
            raise BootEnvError(
                f"grubenv at {where} does not start with {ENVBLK_SIGNATURE!r}: it is not a GRUB "
                f"environment block; {_REBUILD_HINT}"
            )
        body = data[len(ENVBLK_SIGNATURE) :]
        # GRUB finds the free space by walking back over '#' to a newline (envblk.c).
        end = len(body.rstrip(b"#"))
        if end and body[end - 1 : end] != b"\n":
            raise BootEnvError(
                f"grubenv at {where} has no newline before its '#' padding (byte "
                f"{len(ENVBLK_SIGNATURE) + end}): the block is damaged; {_REBUILD_HINT}"
            )
        return cls(cls._parse_lines(body[:end], where))

    @staticmethod
    def _parse_lines(body: bytes, where: str) -> list[_Line]:
        lines: list[_Line] = []
        pos = 0
        offset = len(ENVBLK_SIGNATURE)
        while pos < len(body):
            if body[pos : pos + 1] == b"#":
                nl = body.index(b"\n", pos)
                lines.append(_Line(None, _decode(body[pos:nl])))
                pos = nl + 1
                continue
            nl = body.find(b"\n", pos)
            eq = body.find(b"=", pos)
            if eq < 0 or eq > nl or eq == pos:
                line = body[pos:nl]
                raise BootEnvError(
                    f"grubenv at {where}: malformed line {line!r} at byte {offset + pos} "
                    f"(expected name=value); {_REBUILD_HINT}"
                )
            name = _decode(body[pos:eq])
            value = bytearray()
            i = eq + 1
            while True:
                if i >= len(body):
                    raise BootEnvError(
                        f"grubenv at {where}: the value of {name!r} is not ended by a newline; "
                        f"{_REBUILD_HINT}"
                    )
                c = body[i]
                if c == 0x5C and i + 1 < len(body):  # backslash: the next byte is literal
                    value.append(body[i + 1])
                    i += 2
                    continue
                if c == 0x0A:
                    break
                value.append(c)
                i += 1
            lines.append(_Line(name, _decode(bytes(value))))
            pos = i + 1
        return lines

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> BootEnv:
        """Read and parse the grubenv file at ``path``."""
        try:
            with open(path, "rb") as f:
                data = f.read(ENVBLK_SIZE + 1)
        except FileNotFoundError:
            raise BootEnvError(f"grubenv at {path} does not exist: {_REBUILD_HINT}") from None
        return cls.from_bytes(data, str(path))

    # ------------------------------------------------------------------ mapping

    def __getitem__(self, name: str) -> str:
        for line in self._lines:
            if line.name == name:
                return line.value
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (line.name for line in self._lines if line.name is not None)

    def __len__(self) -> int:
        return sum(1 for line in self._lines if line.name is not None)

    def __repr__(self) -> str:
        return f"BootEnv({dict(self)!r})"

    # ------------------------------------------------------------------ changes

    def set(self, name: str, value: str | int) -> None:
        """Set ``name`` to ``value``: in its place if it exists, else at the end (as GRUB)."""
        if not _NAME_RE.match(name):
            raise BootEnvError(
                f"grubenv variable name {name!r} is not usable from grub.cfg: use letters, "
                f"digits and '_' only"
            )
        text = str(value)
        for line in self._lines:
            if line.name == name:
                line.value = text
                return
        self._lines.append(_Line(name, text))

    def unset(self, name: str) -> None:
        """Remove ``name``; nothing happens if it is not set."""
        self._lines = [line for line in self._lines if line.name != name]

    # ------------------------------------------------------------------ project keys

    def _int(self, name: str, default: int) -> int:
        value = self.get(name, "")
        if not _NUMBER_RE.match(value):
            return default
        # A damaged block may hold any digits: a counter is at most COUNTER_MAX (and int() of
        # thousands of digits is refused by Python itself).
        return COUNTER_MAX if self.clamped(name) else int(value)

    def clamped(self, name: str) -> bool:
        """Whether ``name`` holds a number over ``COUNTER_MAX``, which reads as COUNTER_MAX."""
        value = self.get(name, "").strip()
        digits = value.lstrip("0")
        return value.isascii() and value.isdigit() and (len(digits) > 10 or int(digits or "0") > COUNTER_MAX)

    @property
    def boot_count(self) -> int:
        """Failed boots since the last good one; 0 if unset or not a number, at most
        ``COUNTER_MAX``."""
        return self._int(BOOT_COUNT, 0)

    @property
    def boot_limit(self) -> int:
        """Boot count at which GRUB boots the recovery entry; 2 (as Windows) if unset."""
        limit = self._int(BOOT_LIMIT, DEFAULT_BOOT_LIMIT)
        return limit if limit >= 1 else DEFAULT_BOOT_LIMIT

    @property
    def recovery_attempts(self) -> int:
        return self._int(RECOVERY_ATTEMPTS, 0)

    def reset_boot_count(self, path: str | os.PathLike[str]) -> None:
        """Set ``boot_count=0`` and write the block back to ``path`` in place."""
        self.set(BOOT_COUNT, 0)
        self.write(path)

    # ------------------------------------------------------------------ writing

    def to_bytes(self) -> bytes:
        """Serialise to exactly 1024 bytes, or raise if the content does not fit."""
        parts = [ENVBLK_SIGNATURE]
        for line in self._lines:
            if line.name is None:
                parts.append(_encode(line.value) + b"\n")
            else:
                parts.append(_encode(f"{line.name}={_escape(line.value)}") + b"\n")
        content = b"".join(parts)
        if len(content) > ENVBLK_SIZE:
            raise BootEnvError(
                f"grubenv content is {len(content)} bytes, {len(content) - ENVBLK_SIZE} bytes "
                f"over the {ENVBLK_SIZE}-byte block: shorten or unset variables"
            )
        return content + b"#" * (ENVBLK_SIZE - len(content))

    def write(self, path: str | os.PathLike[str]) -> None:
        """Overwrite the existing grubenv at ``path`` in place (never truncate or recreate:
        GRUB's ``save_env`` writes the file's blocks directly, so they must not move)."""
        data = self.to_bytes()  # fails before the file is touched
        try:
            f = open(path, "r+b")
        except FileNotFoundError:
            raise BootEnvError(
                f"grubenv at {path} does not exist: it is made once when the image is built "
                f"({_REBUILD_HINT}), never by the agent"
            ) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != ENVBLK_SIZE:
                raise BootEnvError(
                    f"grubenv at {path} is {size} bytes, expected {ENVBLK_SIZE}: {_REBUILD_HINT}"
                )
            f.seek(0)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def create(self, path: str | os.PathLike[str]) -> None:
        """Make a new grubenv file at ``path`` (image builders only); fails if it exists."""
        data = self.to_bytes()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise BootEnvError(
                f"grubenv at {path} already exists: update it with BootEnv.write, or remove "
                f"it first if you are building a new image"
            ) from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        dir_fd = os.open(Path(path).parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
