"""The wire's limits hold wherever a message is read: numbers a device sends are bounded, a
directive's lifetime is bounded, a restore copies only from the driver store, and a malformed
signature entry is a refusal, never a crash."""

from __future__ import annotations

import base64
import itertools
import json
from datetime import datetime, timedelta

import aiohttp
import pytest
from pydantic import ValidationError

from recovery_agent.protocol.client import DeviceClient
from recovery_agent.protocol.envelope import (
    MAX_ENVELOPE_BYTES,
    DirectiveRejected,
    MalformedEnvelope,
    UnknownKey,
    canonical_json,
    open_directive,
    open_envelope,
    pae,
)
from recovery_agent.protocol.errors import describe_validation
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import (
    COUNTER_MAX,
    MAX_DIRECTIVE_LIFETIME,
    BootState,
    Diagnostics,
    Directive,
    FileRecord,
    PathRuleError,
    RestoreFile,
    check_relative_path,
    utcnow,
)
from recovery_server.app import MAX_BODY
from recovery_server.errors import BadRequest

from .conftest import FAST_RETRY

SHA = "a" * 64
NONCE = "m" * 32


def signed(payload: dict, key: SigningKey, payload_type: str = Directive.PAYLOAD_TYPE) -> dict:
    """An envelope over ``payload`` as given, whether or not the model would build it (what a
    compromised or buggy signer could send)."""
    raw = canonical_json(payload)
    sig = key.private.sign(pae(payload_type, raw))
    return {
        "payload": base64.b64encode(raw).decode(),
        "payloadType": payload_type,
        "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
    }


def directive_payload(issued_at: datetime, expires_at: datetime) -> dict:
    return {
        "directive_id": "dir-1",
        "device_id": "dev-1",
        "agent_nonce": NONCE,
        "diagnostics_sha256": SHA,
        "remediation_id": "rem-1",
        "issued_at": issued_at.isoformat(),
        "expires_at": expires_at.isoformat(),
        "actions": [{"type": "quarantine_file", "path": "var/lib/sensor/channels/C-1.sys", "sha256": SHA}],
    }


def open_it(env: dict, key: SigningKey, now: datetime | None = None):
    return open_directive(
        env,
        {key.key_id: key.public},
        device_id="dev-1",
        agent_nonce=NONCE,
        diagnostics_sha256=SHA,
        now=now or utcnow(),
    )


# --------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("keyid", [["x"], {"k": 1}, 7, None, 1.5, True])
def test_a_non_string_keyid_is_a_refusal_not_a_type_error(keyid) -> None:
    key = SigningKey.generate()
    env = signed(directive_payload(utcnow(), utcnow() + timedelta(hours=1)), key)
    env["signatures"] = [{"keyid": keyid, "sig": env["signatures"][0]["sig"]}]
    with pytest.raises(UnknownKey, match="no signature by a trusted key"):
        open_envelope(json.dumps(env), Directive, {key.key_id: key.public})


def test_a_non_string_keyid_beside_a_good_signature_is_skipped() -> None:
    key = SigningKey.generate()
    env = signed(directive_payload(utcnow(), utcnow() + timedelta(hours=1)), key)
    env["signatures"].insert(0, {"keyid": ["unhashable"], "sig": "AAAA"})
    assert open_it(env, key).message.directive_id == "dir-1"


# --------------------------------------------------------------------------- directive lifetime


def test_a_directive_expiring_in_year_9999_is_refused() -> None:
    key = SigningKey.generate()
    env = signed(directive_payload(utcnow(), datetime.fromisoformat("9999-12-31T23:59:59+00:00")), key)
    with pytest.raises(MalformedEnvelope, match="longer than the 1 day, 0:00:00 a directive may"):
        open_it(env, key)


def test_a_directive_issued_in_year_9999_is_refused() -> None:
    key = SigningKey.generate()
    issued = datetime.fromisoformat("9999-12-31T00:00:00+00:00")
    env = signed(directive_payload(issued, issued + timedelta(hours=1)), key)
    with pytest.raises(DirectiveRejected, match="check the device clock"):
        open_it(env, key)


def test_a_directive_expiring_before_it_was_issued_is_refused() -> None:
    key = SigningKey.generate()
    now = utcnow()
    env = signed(directive_payload(now + timedelta(minutes=10), now + timedelta(minutes=5)), key)
    with pytest.raises(MalformedEnvelope, match="before it was issued"):
        open_it(env, key)


def test_a_directive_of_the_longest_lifetime_is_accepted() -> None:
    key = SigningKey.generate()
    now = utcnow()
    env = signed(directive_payload(now, now + MAX_DIRECTIVE_LIFETIME), key)
    assert open_it(env, key).message.expires_at == now + MAX_DIRECTIVE_LIFETIME


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("field", ["boot_count", "recovery_attempts", "boot_limit", "max_recovery_attempts"])
def test_device_counters_are_bounded(field: str) -> None:
    base = {"boot_count": 2, "boot_limit": 2}
    assert BootState.model_validate({**base, field: COUNTER_MAX})
    with pytest.raises(ValidationError, match="less than or equal to 2147483647"):
        BootState.model_validate({**base, field: 99999999999999999999})


def test_boot_history_is_bounded() -> None:
    history = [{"index": i, "outcome": "crashed"} for i in range(65)]
    with pytest.raises(ValidationError, match="at most 64 items"):
        BootState.model_validate({"boot_count": 65, "boot_limit": 2, "history": history})


def test_the_agent_envelope_limit_fits_the_server_body_limit() -> None:
    assert MAX_ENVELOPE_BYTES <= MAX_BODY


async def test_twenty_digit_recovery_attempts_are_a_400_not_a_500(fleet) -> None:
    key = SigningKey.generate()
    await fleet.enroll("dev-1", key)
    async with DeviceClient(fleet.url, retry=FAST_RETRY) as c:
        challenge = await c.challenge("dev-1")
    payload = {
        "device_id": "dev-1",
        "server_nonce": challenge.nonce,
        "agent_nonce": NONCE,
        "created_at": utcnow().isoformat(),
        "agent_version": "t",
        "boot": {"boot_count": 2, "boot_limit": 2, "recovery_attempts": 99999999999999999999},
        "crash": {"kind": "unknown", "title": "boot failed twice"},
        "system": {},
    }
    env = signed(payload, key, Diagnostics.PAYLOAD_TYPE)
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.url + "/v1/diagnostics", data=canonical_json(env)) as r:
            assert r.status == 400, await r.text()
            assert "99999999999999999999" in (await r.json())["error"]
    assert fleet.count("reports") == 0
    assert [d.recovery_attempts for d in fleet.service.devices(fleet.viewer)] == [0]


# --------------------------------------------------------------------------- restore source


@pytest.mark.parametrize("source", ["etc/shadow", "var/lib/driver-storex/a.ko", "var/lib/driver-store"])
def test_a_restore_source_outside_the_driver_store_is_refused_at_the_wire(source: str) -> None:
    with pytest.raises(ValidationError, match="is not in the driver store"):
        RestoreFile(path="lib/modules/6.1/extra/sensor.ko", source=source, sha256=SHA)


async def test_the_server_refuses_a_remediation_restoring_from_outside_the_driver_store(fleet) -> None:
    with pytest.raises(BadRequest, match="'etc/shadow' is not in the driver store"):
        fleet.service.create_remediation(
            fleet.user("alice"),
            title="x",
            incident_id=None,
            actions=[
                {
                    "type": "restore_file",
                    "path": "lib/modules/6.1/extra/sensor.ko",
                    "source": "etc/shadow",
                    "sha256": SHA,
                }
            ],
        )
    assert fleet.count("remediations") == 0


# Every string of up to five of these parts: the pieces a path rule turns on.
_PATH_PIECES = ["a", ".", "..", "/", "\x00", "\n", "é", "b."]


def _reported_path_ok(path: str) -> bool:
    try:
        FileRecord(path=path, size=1, mtime=0.0, sha256="0" * 64)
    except ValidationError:
        return False
    return True


def _relative_path_ok(path: str) -> bool:
    try:
        check_relative_path(path)
    except PathRuleError:
        return False
    return True


def test_a_reported_path_follows_the_same_rule_as_any_path_and_is_refused_in_its_words():
    """A report's file paths are checked by a pattern in pydantic's own regex engine (no Python
    call per path); it accepts exactly what check_relative_path accepts, and a refusal says
    what is wrong in check_relative_path's words."""
    differ = [
        path
        for n in range(6)
        for path in map("".join, itertools.product(_PATH_PIECES, repeat=n))
        if _reported_path_ok(path) != _relative_path_ok(path)
    ]
    assert differ == []
    assert _reported_path_ok("var/lib/sensor/.hidden/..x/C-291.sys")
    for path, words in [
        ("var/../etc/shadow", "has a '..' component"),
        ("/etc/shadow", "is absolute"),
        ("var//x", "empty component"),
        ("", "path is empty"),
    ]:
        with pytest.raises(ValidationError) as caught:
            FileRecord(path=path, size=1, mtime=0.0, sha256="0" * 64)
        assert words in describe_validation(caught.value)
