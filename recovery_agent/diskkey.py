"""The device's side of encrypted disks (``recovery_server.diskkeys`` is the server's).

- ``escrow``: seal a recovery key of the disk (the LUKS keyslot ``slot`` QMR added) to the
  server's escrow key, which is taken only under the pinned server key's signature, and send
  it signed by the device key. The key itself never leaves the device in clear. Offline (at
  install, from the server's signed escrow key in a file): ``seal_escrow`` and
  ``save_pending``; the first health report delivers it (``deliver_pending``).
- ``fetch_key``: in recovery, after the diagnostics of this visit, ask for the key: a fresh
  challenge, the report's id, and an ephemeral X25519 key made for this one request; the
  answer (signed by the pinned server key, bound to this request) is opened with the
  ephemeral key into a ``bytearray`` the caller wipes once the disk is open. While a person
  has to approve the release, it asks again at the retry interval until the deadline (then
  None: the agent reboots as with no fix); a refusal raises ``KeyRefused`` (the machine needs
  a person).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .clock import Clock
from .errors import AgentError
from .layout import ESCROW_PENDING, ESCROW_SENT
from .protocol import sealing
from .protocol.client import DeviceClient, ServerRefused, ServerUnreachable
from .protocol.envelope import EnvelopeError, canonical_json, open_envelope, payload_sha256, seal, seal_bytes
from .protocol.keys import SigningKey, key_id, public_from_b64
from .protocol.wire import (
    EscrowKey,
    KeyEscrow,
    KeyRelease,
    KeyRequest,
    escrow_context,
    release_context,
    utcnow,
)


class KeyRefused(AgentError):
    """The server refused to release the disk key (the message says why)."""


def seal_escrow(
    device_key: SigningKey,
    server_public_key: str,
    device_id: str,
    secret: bytes | bytearray,
    slot: int,
    escrow_key_envelope: dict[str, Any],
    *,
    tpm_sealed: bool = False,
) -> bytes:
    """The signed ``KeyEscrow`` of ``secret`` (the disk's recovery key in ``slot``), sealed to
    the escrow key in ``escrow_key_envelope`` (the server's ``EscrowKey``, taken only under the
    pinned server key's signature)."""
    pinned = public_from_b64(server_public_key)
    try:
        v = open_envelope(escrow_key_envelope, EscrowKey, {key_id(pinned): pinned})
    except EnvelopeError as exc:
        raise AgentError(f"the server's escrow key is not signed by the pinned server key: {exc}") from None
    escrow_key = v.message.public_key
    sealed = sealing.seal(sealing.public_from_b64(escrow_key), secret, escrow_context(device_id, slot))
    message = KeyEscrow(
        device_id=device_id,
        slot=slot,
        sealed=sealed,
        escrow_key=escrow_key,
        tpm_sealed=tpm_sealed,
        created_at=utcnow(),
    )
    return seal_bytes(message, device_key)


async def escrow(
    client: DeviceClient,
    device_key: SigningKey,
    server_public_key: str,
    device_id: str,
    secret: bytes | bytearray,
    slot: int,
    *,
    tpm_sealed: bool = False,
    record_in: Path | None = None,
) -> dict[str, Any]:
    """Escrow ``secret`` (the disk's recovery key in ``slot``) with the server, now; once it
    took it, the escrow is kept as sent under the OS root ``record_in`` if given (what a later
    rotation reads its slot from)."""
    raw = seal_escrow(
        device_key,
        server_public_key,
        device_id,
        secret,
        slot,
        await client.escrow_key(),
        tpm_sealed=tpm_sealed,
    )
    answer = await client.send_escrow(raw)
    if record_in is not None:
        _write_private(record_in / ESCROW_SENT, raw)
    return answer


def escrowed_slot(os_root: Path, device_key: SigningKey) -> int | None:
    """The keyslot of this machine's last escrow (sent, else pending), or None if it has none."""
    for rel in (ESCROW_PENDING, ESCROW_SENT):
        try:
            raw = (os_root / rel).read_bytes()
        except FileNotFoundError:
            continue
        try:
            v = open_envelope(raw, KeyEscrow, {device_key.key_id: device_key.public})
        except EnvelopeError as exc:
            raise AgentError(f"{os_root / rel} is not this device's escrow: {exc}") from None
        return v.message.slot
    return None


def _write_private(path: Path, raw: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


def save_pending(os_root: Path, raw: bytes) -> Path:
    """Keep an escrow made offline (at install) for the next health report to deliver."""
    return _write_private(os_root / ESCROW_PENDING, raw)


async def deliver_pending(client: DeviceClient, os_root: Path) -> dict[str, Any] | None:
    """Send the escrow made at install, if one waits; once the server took it, it is kept as
    sent. None if none waits. A refusal raises ``ServerRefused`` and the escrow stays pending."""
    path = os_root / ESCROW_PENDING
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    answer = await client.send_escrow(raw)
    path.replace(os_root / ESCROW_SENT)
    return answer


async def fetch_key(
    client: DeviceClient,
    device_key: SigningKey,
    server_public_key: str,
    device_id: str,
    report_id: str,
    *,
    clock: Clock,
    deadline: float,
    retry_interval_s: float,
    say: Callable[[str], None],
) -> bytearray | None:
    """The disk key, released for this recovery visit; None if none came before ``deadline``."""
    pinned = public_from_b64(server_public_key)
    while clock.monotonic() < deadline:
        ephemeral = X25519PrivateKey.generate()  # one per request: an answer opens only once
        try:
            challenge = await client.challenge(device_id)
            request = KeyRequest(
                device_id=device_id,
                server_nonce=challenge.nonce,
                report_id=report_id,
                ephemeral_key=sealing.public_b64(ephemeral.public_key()),
                created_at=utcnow(),
            )
            env = seal(request, device_key)
            answer = await client.request_disk_key(canonical_json(env))
        except ServerUnreachable as exc:
            say(f"asking for the disk key: {exc}")
            answer = None
        except ServerRefused as exc:
            raise KeyRefused(f"the server refused to release the disk key: {exc.message}") from None
        if answer is not None and answer.status == "released":
            return _open_release(answer.envelope or {}, pinned, ephemeral, device_id, payload_sha256(env))
        if answer is not None:
            say(f"the disk key's release {answer.release_id} waits for a person to approve it")
        pause = min(retry_interval_s, deadline - clock.monotonic())
        if pause > 0:
            await clock.sleep(pause)
    return None


def _open_release(
    env: dict[str, Any], pinned: Any, ephemeral: X25519PrivateKey, device_id: str, request_sha: str
) -> bytearray:
    try:
        v = open_envelope(env, KeyRelease, {key_id(pinned): pinned})
    except EnvelopeError as exc:
        raise KeyRefused(f"the disk key's release is not signed by the pinned server key: {exc}") from None
    m = v.message
    if m.device_id != device_id or m.request_sha256 != request_sha:
        raise KeyRefused("the disk key's release answers another device or request: refused")
    try:
        return sealing.open_sealed(ephemeral, m.sealed, release_context(device_id, request_sha))
    except sealing.SealError as exc:
        raise KeyRefused(f"the released disk key does not open: {exc}") from None
