"""Envelopes: every way a signed message can be forged, swapped or replayed is refused."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest

from recovery_agent.protocol import keys
from recovery_agent.protocol.envelope import (
    BadSignature,
    DirectiveRejected,
    MalformedEnvelope,
    UnknownKey,
    WrongPayloadType,
    open_directive,
    open_envelope,
    pae,
    seal,
    seal_bytes,
)
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    Directive,
    QuarantineFile,
    SystemInfo,
    utcnow,
)

SHA = "a" * 64


def diagnostics(device: str = "dev-1") -> Diagnostics:
    return Diagnostics(
        device_id=device,
        server_nonce="n" * 32,
        agent_nonce="m" * 32,
        created_at=utcnow(),
        agent_version="0.1.0",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=CrashSignature(kind=CrashKind.KERNEL_PANIC, title="general protection fault in f"),
        system=SystemInfo(),
    )


def directive(device: str = "dev-1", ttl: timedelta = timedelta(hours=1)) -> Directive:
    now = utcnow()
    return Directive(
        directive_id="dir-1",
        device_id=device,
        agent_nonce="m" * 32,
        diagnostics_sha256=SHA,
        remediation_id="rem-1",
        issued_at=now,
        expires_at=now + ttl,
        actions=[QuarantineFile(path="var/lib/sensor/channels/C-1.sys", sha256=SHA)],
    )


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


def ring(k: SigningKey) -> dict:
    return {k.key_id: k.public}


def test_round_trip_gives_typed_message_and_key(key):
    raw = seal_bytes(diagnostics(), key)
    v = open_envelope(raw, Diagnostics, ring(key))
    assert v.message.device_id == "dev-1"
    assert v.key_id == key.key_id
    assert v.message.crash.kind is CrashKind.KERNEL_PANIC


def test_key_id_is_sha256_of_raw_public_key(key):
    import hashlib

    assert key.key_id == hashlib.sha256(keys.public_raw(key.public)).hexdigest()


def test_signature_covers_pae_of_type_and_payload(key):
    env = seal(diagnostics(), key)
    payload = base64.b64decode(env["payload"])
    key.public.verify(base64.b64decode(env["signatures"][0]["sig"]), pae(env["payloadType"], payload))
    assert pae("t", b"ab") == b"DSSEv1 1 t 2 ab"


def test_tampered_payload_is_refused(key):
    env = seal(diagnostics(), key)
    payload = base64.b64decode(env["payload"]).replace(b"dev-1", b"dev-2")
    env["payload"] = base64.b64encode(payload).decode()
    with pytest.raises(BadSignature, match="altered"):
        open_envelope(json.dumps(env), Diagnostics, ring(key))


def test_unknown_key_is_refused(key):
    other = SigningKey.generate()
    with pytest.raises(UnknownKey, match="no signature by a trusted key"):
        open_envelope(seal_bytes(diagnostics(), other), Diagnostics, ring(key))


def test_diagnostics_presented_as_directive_is_refused(key):
    """A payload-type swap: a validly signed diagnostics envelope cannot pass as a directive,
    even when signed by the very key the verifier trusts for directives."""
    raw = seal_bytes(diagnostics(), key)
    with pytest.raises(WrongPayloadType, match="directive"):
        open_envelope(raw, Directive, ring(key))


def test_relabelled_payload_type_breaks_the_signature(key):
    env = seal(diagnostics(), key)
    env["payloadType"] = Directive.PAYLOAD_TYPE
    with pytest.raises(BadSignature):
        open_envelope(json.dumps(env), Directive, ring(key))


def test_duplicate_keys_in_signed_payload_are_refused(key):
    payload = b'{"device_id":"dev-1","device_id":"dev-2"}'
    sig = key.private.sign(pae(Diagnostics.PAYLOAD_TYPE, payload))
    env = {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": Diagnostics.PAYLOAD_TYPE,
        "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
    }
    with pytest.raises(MalformedEnvelope, match="duplicate JSON key 'device_id'"):
        open_envelope(json.dumps(env), Diagnostics, ring(key))


def test_duplicate_keys_in_envelope_are_refused(key):
    env = seal(diagnostics(), key)
    raw = json.dumps(env)[:-1] + ', "payloadType": "x"}'
    with pytest.raises(MalformedEnvelope, match="duplicate JSON key 'payloadType'"):
        open_envelope(raw, Diagnostics, ring(key))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"{}",
        b'{"payload": 1, "payloadType": "x", "signatures": []}',
        b"NaN",
        b'{"payload": "!!", "payloadType": "x", "signatures": [{"sig": "x"}]}',
        '{"payload": "\u00fa", "payloadType": "x", "signatures": [{"sig": "x"}]}'.encode(),
    ],
)
def test_garbage_is_malformed_not_a_crash(key, raw):
    with pytest.raises(MalformedEnvelope):
        open_envelope(raw, Diagnostics, ring(key))


def test_signed_but_invalid_payload_is_refused(key):
    payload = b'{"device_id": "dev-1"}'
    sig = key.private.sign(pae(Diagnostics.PAYLOAD_TYPE, payload))
    env = {
        "payload": base64.b64encode(payload).decode(),
        "payloadType": Diagnostics.PAYLOAD_TYPE,
        "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
    }
    with pytest.raises(MalformedEnvelope, match="does not fit the protocol"):
        open_envelope(json.dumps(env), Diagnostics, ring(key))


def bind(key, d, **over):
    args = dict(device_id="dev-1", agent_nonce="m" * 32, diagnostics_sha256=SHA, now=utcnow())
    args.update(over)
    return open_directive(seal(d, key), ring(key), **args)


def test_directive_bound_to_device_nonce_diagnostics_and_time(key):
    assert bind(key, directive()).message.directive_id == "dir-1"


def test_directive_for_another_device_is_refused(key):
    with pytest.raises(DirectiveRejected, match="for device 'dev-2', not this device"):
        bind(key, directive(device="dev-2"))


def test_directive_with_another_nonce_is_refused(key):
    with pytest.raises(DirectiveRejected, match="nonce mismatch"):
        bind(key, directive(), agent_nonce="z" * 32)


def test_directive_for_other_diagnostics_is_refused(key):
    with pytest.raises(DirectiveRejected, match="other diagnostics"):
        bind(key, directive(), diagnostics_sha256="b" * 64)


def test_expired_directive_is_refused(key):
    with pytest.raises(DirectiveRejected, match="expired"):
        bind(key, directive(ttl=timedelta(seconds=30)), now=utcnow() + timedelta(minutes=1))


def test_directive_action_paths_are_checked_at_the_wire():
    with pytest.raises(ValueError, match="'..' component"):
        QuarantineFile(path="var/../etc/shadow", sha256=SHA)
    with pytest.raises(ValueError, match="absolute"):
        QuarantineFile(path="/etc/shadow", sha256=SHA)


def test_key_files_round_trip(tmp_path, key):
    key.save(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert SigningKey.load(tmp_path / "k").key_id == key.key_id
    assert keys.key_id(keys.load_public_key(tmp_path / "k.pub")) == key.key_id
