"""Sealing a secret to an X25519 public key (for encrypted disks: the escrowed recovery key).

``seal(recipient, secret, context)`` is an ECIES construction from ``cryptography``'s
primitives: a fresh X25519 key pair, the shared secret with the recipient's key, HKDF-SHA256
over it (salted with both public keys, and ``context`` as its info), and AES-256-GCM with a
random nonce over the secret, ``context`` as associated data. The sealed text is base64 of
``version || ephemeral public key || nonce || ciphertext``. Only the recipient's private key
opens it, and only for the same ``context``: a key escrowed for one device and slot cannot be
passed off as another's, and a release wrapped for one request cannot answer another.

``open_sealed`` returns a ``bytearray`` the caller overwrites when done (``wipe``): Python
cannot promise no other copy exists (the decryption's own bytes are dropped at once), but the
secret does not outlive its use in the objects this code keeps.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolError

VERSION = b"\x01"
_RAW = serialization.Encoding.Raw
_PUB = serialization.PublicFormat.Raw
_NONCE = 12
MAX_SECRET = 512  # bytes: a disk key or passphrase, never more


class SealError(ProtocolError):
    """Raised when a sealed secret cannot be opened: another key, another context, or bytes
    changed on the way."""


def public_raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(_RAW, _PUB)


def public_b64(key: X25519PublicKey) -> str:
    return base64.b64encode(public_raw(key)).decode()


def public_from_b64(text: str) -> X25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SealError("not a base64 X25519 public key") from None
    if len(raw) != 32:
        raise SealError(f"an X25519 public key is 32 bytes, not {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def _key(shared: bytes, eph: bytes, recipient: bytes, context: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=eph + recipient, info=b"qmr-seal-v1|" + context
    ).derive(shared)


def seal(recipient: X25519PublicKey, secret: bytes | bytearray, context: bytes) -> str:
    """``secret`` sealed to ``recipient`` for ``context`` (base64 text)."""
    if not 0 < len(secret) <= MAX_SECRET:
        raise SealError(f"a sealed secret is 1 to {MAX_SECRET} bytes, not {len(secret)}")
    eph = X25519PrivateKey.generate()
    eph_pub, rec_pub = public_raw(eph.public_key()), public_raw(recipient)
    key = _key(eph.exchange(recipient), eph_pub, rec_pub, context)
    nonce = os.urandom(_NONCE)
    ct = AESGCM(key).encrypt(nonce, bytes(secret), context)
    return base64.b64encode(VERSION + eph_pub + nonce + ct).decode()


def open_sealed(private: X25519PrivateKey, sealed: str, context: bytes) -> bytearray:
    """The secret ``seal`` sealed to ``private``'s public key for ``context``; SealError if it
    was sealed to another key, for another context, or changed."""
    try:
        raw = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError):
        raise SealError("the sealed secret is not base64") from None
    if len(raw) < 1 + 32 + _NONCE + 16 + 1 or raw[:1] != VERSION:
        raise SealError("the sealed secret is too short or of an unknown version")
    eph_pub, nonce, ct = raw[1:33], raw[33 : 33 + _NONCE], raw[33 + _NONCE :]
    try:
        eph = X25519PublicKey.from_public_bytes(eph_pub)
        key = _key(private.exchange(eph), eph_pub, public_raw(private.public_key()), context)
        plain = AESGCM(key).decrypt(nonce, ct, context)
    except (InvalidTag, ValueError):
        raise SealError(
            "the sealed secret does not open with this key for this purpose: sealed to another key, "
            "for another device or request, or changed on the way"
        ) from None
    out = bytearray(plain)
    del plain
    return out


def wipe(secret: bytearray) -> None:
    """Overwrite a secret in place (as far as Python allows: see the module docstring)."""
    for i in range(len(secret)):
        secret[i] = 0
