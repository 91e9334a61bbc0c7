"""Ed25519 keys: the device's, the server's and each approver's, and their files.

A key id is the sha256 of the raw 32-byte public key, in hex; a public key travels and is
pinned as the base64 of those 32 bytes (the ``.pub`` file). Private keys are PEM (PKCS#8)
files of mode 0600.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ProtocolError


class KeyFileError(ProtocolError):
    """Raised when a key file is missing, unreadable or not an Ed25519 key; the message names
    the file and how to make a good one."""


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_raw(public_key)).hexdigest()


def public_raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_b64(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(public_raw(public_key)).decode()


def public_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise ValueError("public key is not valid base64: copy the whole .pub file") from None
    if len(raw) != 32:
        raise ValueError(f"public key is {len(raw)} bytes, expected 32 (a raw Ed25519 key)")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    # Derived once per key (a server signs every directive with one key).
    @functools.cached_property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @functools.cached_property
    def key_id(self) -> str:
        return key_id(self.public)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def save(self, path: Path) -> None:
        """Write the private key (PEM, mode 0600) and ``<path>.pub`` (raw base64)."""
        atomic_write(path, self.private_pem(), mode=0o600)
        atomic_write(Path(str(path) + ".pub"), (public_b64(self.public) + "\n").encode(), mode=0o644)

    @classmethod
    def load(cls, path: Path | str) -> SigningKey:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise KeyFileError(
                f"no key at {path}: create one with `recovery-agent keygen {path}` or `recovery-server init`"
            ) from None
        except OSError as exc:
            raise KeyFileError(f"cannot read the key {path}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            key = None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(
                f"{path} is not an unencrypted Ed25519 private key (PEM): it is damaged or "
                f"another kind of key; make a new one with `recovery-agent keygen {path} --force` "
                "and enroll it again"
            )
        return cls(key)


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise KeyFileError(f"no public key at {path}: copy the signer's .pub file there") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the public key {path}: {exc}") from None
    try:
        return public_from_b64(text)
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file so a crash leaves either the old or the new content, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
