"""Secrets written to disk by the command lines (a person's token, an approval key): always a
new file, readable by its owner only.

A secret is never written into a file that exists: opening an existing file keeps its mode
(a token written into a 0644 file was readable by everyone), and a symlink planted at the path
would send the secret wherever it points. ``SecretFile`` creates the file first, with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, before the secret exists, so a path that
cannot be used is refused before anything is made (no user whose token was lost); the secret
is written once it exists, and the file removed again if it never comes.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from .errors import ServerError


class SecretFileError(ServerError):
    """Raised when a secret's file cannot be created new: it exists (or is a symlink), or its
    folder cannot be written. Nothing was written."""


class SecretFile:
    """A new file of mode 0600 for one secret. Use as ``with SecretFile(path) as f: f.write(...)``;
    leaving the block without writing (or by an exception) removes the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            self._fd: int | None = os.open(self.path, flags, 0o600)
        except FileExistsError:
            raise SecretFileError(
                f"{self.path} exists (a file or a symlink): a secret is only written to a new "
                "file; remove it, or name a path that does not exist"
            ) from None
        except OSError as exc:
            raise SecretFileError(f"cannot create {self.path}: {exc.strerror}") from None
        os.fchmod(self._fd, 0o600)  # whatever the umask
        self._written = False

    def write(self, data: bytes | str) -> None:
        assert self._fd is not None, "one secret per file"
        raw = data.encode() if isinstance(data, str) else data
        while raw:
            raw = raw[os.write(self._fd, raw) :]
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        self._written = True

    def __enter__(self) -> SecretFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._written:
            self.path.unlink(missing_ok=True)
