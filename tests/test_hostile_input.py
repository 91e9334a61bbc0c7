"""Hostile input at the HTTP edge: the server never stores what it cannot serve back.

Each test feeds an input that an audit found (a rollout plan with ``"soak_s": 1e400``,
diagnostics with ``mtime: 1e400``, 200,000 nested brackets, a list ``keyid``, a numeric
``public_key``, a UTF-16 body, a 0.87 MB request with 50,000 mistakes) and checks three
things: the answer is a 400 that names the problem, in a bounded size; nothing was stored;
and every read view still answers afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recovery_agent.protocol.admin import RolloutPlan
from recovery_agent.protocol.envelope import (
    MAX_JSON_DEPTH,
    MalformedEnvelope,
    pae,
    seal,
    strict_json_loads,
)
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import (
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    Enrollment,
    FileRecord,
    SystemInfo,
    utcnow,
)
from recovery_server import admin_cli
from recovery_server.app import MAX_ERROR_CHARS, ROUTES
from recovery_server.errors import BadRequest

BAD_PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
BODY_ROUTES = sorted({r.path for r in ROUTES if r.body is not None})


def seal_payload(payload: bytes, payload_type: str, key: SigningKey) -> bytes:
    """An envelope over exactly ``payload``, signed by ``key``: what a device (or anyone
    holding a key) can send, whatever the bytes are."""
    sig = key.private.sign(pae(payload_type, payload))
    return json.dumps(
        {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": payload_type,
            "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
        }
    ).encode()


async def post(fleet, path: str, body: bytes, token: str | None = None) -> tuple[int, dict, int]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s:
        async with s.post(fleet.url + path, data=body, headers=headers) as r:
            raw = await r.read()
            return r.status, json.loads(raw), len(raw)


async def get(fleet, path: str, token: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + path, headers={"Authorization": f"Bearer {token}"}) as r:
            return r.status, await r.read()


async def every_view_answers(fleet, token: str) -> None:
    """Every admin read view, and each incident and rollout in it, answers 200 with JSON that
    a strict parser accepts (no NaN, no Infinity)."""
    paths = [
        r.path
        for r in ROUTES
        if r.method == "GET" and r.auth == "admin" and r.content == "application/json" and "{" not in r.path
    ]
    for inc in fleet.service.incidents(fleet.viewer):
        paths += [
            f"/v1/admin/incidents/{inc.incident_id}",
            f"/v1/admin/incidents/{inc.incident_id}/suggestion",
            f"/v1/admin/incidents/{inc.incident_id}/summary",
            f"/v1/admin/incidents/{inc.incident_id}/timeline",
        ]
    for dev in fleet.service.devices(fleet.viewer):
        paths.append(f"/v1/admin/devices/{quote(dev.device_id, safe='')}")
    for ro in fleet.service.rollouts(fleet.viewer):
        paths.append(f"/v1/admin/rollouts/{ro.rollout_id}")
    for path in paths:
        status, body = await get(fleet, path, token)
        assert status == 200, (path, body[:300])
        strict_json_loads(body)


@pytest.fixture
async def admin_token(fleet) -> str:
    return fleet.service.create_user(fleet.admin, "ada", "admin").token


async def enrolled(fleet, device_id: str = "dev-1") -> SigningKey:
    key = SigningKey.generate()
    await fleet.enroll(device_id, key)
    return key


def diagnostics(device_id: str, nonce: str, *, mtime: float = 1234.5) -> Diagnostics:
    return Diagnostics(
        device_id=device_id,
        server_nonce=nonce,
        agent_nonce="a" * 32,
        created_at=utcnow(),
        agent_version="t",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=CrashSignature(kind=CrashKind.KERNEL_PANIC, title="general protection fault in f"),
        system=SystemInfo(),
        channel_files=[FileRecord(path=BAD_PATH, size=1, mtime=mtime, sha256="b" * 64)],
    )


# ---------------------------------------------------------------- non-finite numbers


async def test_a_rollout_plan_with_an_infinite_soak_is_refused_and_nothing_breaks(fleet, admin_token):
    key = await enrolled(fleet)
    receipt = await send_diagnostics(fleet, key, "dev-1")
    rem = fleet.service.create_remediation(
        fleet.user("oscar"),
        title="q",
        incident_id=receipt["incident_id"],
        actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": "b" * 64}],
    )
    body = b'{"waves": [{"name": "all", "percent": 100}], "soak_s": 1e400}'
    status, answer, _ = await post(
        fleet, f"/v1/admin/remediations/{rem.remediation_id}/rollout", body, admin_token
    )
    assert status == 400 and "1e400" in answer["error"] and "finite" in answer["error"]
    assert fleet.count("rollouts") == 0
    # The models refuse it too, whoever builds the plan (the lab, a test, recovery-admin).
    with pytest.raises(BadRequest, match="soak_s: Input should be a finite number"):
        fleet.service.create_rollout(
            fleet.user("oscar"),
            rem.remediation_id,
            {"waves": [{"name": "all", "percent": 100}], "soak_s": float("inf")},
        )
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="finite"):
            RolloutPlan.model_validate({"waves": [{"name": "all", "percent": bad}]})
    status, answer, _ = await post(
        fleet,
        f"/v1/admin/remediations/{rem.remediation_id}/rollout",
        b'{"waves": [{"name": "all", "percent": 100}], "soak_s": 1e300}',
        admin_token,
    )
    assert status == 201, answer
    fleet.service.tick()  # the rollout ticker reads every active plan
    async with aiohttp.ClientSession() as s:
        async with s.get(
            fleet.url + f"/v1/reports/{receipt['report_id']}/directive",
            headers={"Authorization": f"Bearer {receipt['poll_token']}"},
        ) as r:
            assert r.status == 200 and (await r.json())["status"] == "pending"
    await every_view_answers(fleet, admin_token)


async def send_diagnostics(fleet, key: SigningKey, device_id: str, *, edit=None) -> dict:
    """Signed diagnostics over real HTTP; ``edit`` rewrites the payload bytes before signing."""
    status, ch, _ = await post(fleet, "/v1/challenge", json.dumps({"device_id": device_id}).encode())
    assert status == 200, ch
    payload = json.dumps(diagnostics(device_id, ch["nonce"]).model_dump(mode="json")).encode()
    if edit:
        payload = edit(payload)
    status, answer, _ = await post(
        fleet, "/v1/diagnostics", seal_payload(payload, Diagnostics.PAYLOAD_TYPE, key)
    )
    answer["status_code"] = status
    return answer


async def test_diagnostics_with_an_infinite_mtime_are_refused_and_the_incident_view_stays_valid(
    fleet, admin_token
):
    key = await enrolled(fleet)
    answer = await send_diagnostics(
        fleet, key, "dev-1", edit=lambda p: p.replace(b'"mtime": 1234.5', b'"mtime": 1e400')
    )
    assert answer["status_code"] == 400 and "number 1e400 is out of range" in answer["error"]
    assert fleet.count("reports") == 0 and fleet.count("incidents") == 0
    # The largest finite numbers are fine: stored, served back, read by recovery-admin.
    answer = await send_diagnostics(
        fleet, key, "dev-1", edit=lambda p: p.replace(b'"mtime": 1234.5', b'"mtime": 1.7e308')
    )
    assert answer["status_code"] == 200, answer
    await every_view_answers(fleet, admin_token)
    for argv in (["incidents"], ["incidents", answer["incident_id"]]):
        code = await asyncio.to_thread(
            admin_cli.main, ["--server", fleet.url, "--token", admin_token, "--json", *argv]
        )
        assert code == 0


@pytest.mark.parametrize(
    "text, problem",
    [
        ("1e400", "number 1e400 is out of range"),
        ("-1e400", "number -1e400 is out of range"),
        ("NaN", "JSON constant NaN is not allowed"),
        ("Infinity", "JSON constant Infinity is not allowed"),
        ("-Infinity", "JSON constant -Infinity is not allowed"),
        ("99999999999999999999", "whole number 99999999999999999999 is out of range"),
        ("1" * 5000, "is out of range"),
        ('"\\ud800"', "lone surrogate"),
        ("[" * 200_000 + "]" * 200_000, f"nested deeper than {MAX_JSON_DEPTH} levels"),
    ],
)
def test_the_strict_parser_refuses_what_cannot_be_stored_and_served_back(text, problem):
    with pytest.raises(MalformedEnvelope, match=problem):
        strict_json_loads(json.dumps({"x": 1})[:-1] + f', "y": {text}}}')
    assert strict_json_loads('{"y": [1.7e308, -9007199254740991, "\\ud83d\\ude00"]}') == {
        "y": [1.7e308, -9007199254740991, "\U0001f600"]
    }


@pytest.mark.parametrize(
    "encoded, problem",
    [
        ('{"device_id": "dev-1"}'.encode("utf-16"), "byte-order mark"),
        (b"\xef\xbb\xbf" + b'{"device_id": "dev-1"}', "byte-order mark"),
        ('{"device_id": "dev-1"}'.encode("utf-16-le"), "not UTF-8"),
        (b'{"device_id": "d\xe9v"}', "not UTF-8"),
    ],
)
def test_the_strict_parser_takes_utf8_only(encoded, problem):
    with pytest.raises(MalformedEnvelope, match=problem):
        strict_json_loads(encoded)


# ---------------------------------------------------------------- malformed bodies on every route


@pytest.mark.parametrize("path", BODY_ROUTES)
async def test_deep_nesting_and_utf16_bodies_are_400s_on_every_route(fleet, admin_token, path):
    path = path.format(
        remediation_id="rem-x",
        rollout_id="ro-x",
        device_id="dev-x",
        token_id="et-x",
        rule_id="kbr-x",
        release_id="rel-x",
    )
    deep = b"[" * 200_000 + b"]" * 200_000  # 400 KB: under the body limit
    for body, problem in (
        (deep, "nested deeper than"),
        (json.dumps({"device_id": "dev-1"}).encode("utf-16"), "byte-order mark"),
        (json.dumps({"device_id": "dev-1"}).encode("utf-16-le"), "not UTF-8"),
    ):
        status, answer, _ = await post(fleet, path, body, admin_token)
        assert status == 400 and problem in answer["error"], (path, status, answer)
    assert fleet.count("devices") == 0 and fleet.count("rollouts") == 0


async def test_enrollments_with_a_list_keyid_or_a_numeric_public_key_are_400s(fleet):
    key = SigningKey.generate()
    msg = Enrollment(
        device_id="dev-1",
        public_key=public_b64(key.public),
        enrollment_token=fleet.enrollment_token,
        created_at=utcnow(),
    )
    env = seal(msg, key)
    payload = json.loads(base64.b64decode(env["payload"]))
    cases = []
    for keyid in (["x"], [key.key_id], {"k": 1}, 5, None):
        cases.append(
            (dict(env, signatures=[{"keyid": keyid, "sig": env["signatures"][0]["sig"]}]), "no signature")
        )
    for public_key, problem in (
        (5, "public_key"),
        (1.5, "public_key"),
        (["x"], "public_key"),
        (None, "public_key"),
        ({"a": 1}, "public_key"),
        ("not base64!", "public_key"),
        ("A" * 40, "public_key"),
        ("A" * 43 + "=", "no signature"),  # a well-formed key, but not the one that signed
    ):
        changed = json.dumps(dict(payload, public_key=public_key)).encode()
        cases.append((json.loads(seal_payload(changed, Enrollment.PAYLOAD_TYPE, key)), problem))
    for body, problem in cases:
        status, answer, _ = await post(fleet, "/v1/enroll", json.dumps(body).encode())
        assert status == 400 and problem in answer["error"], (body, answer)
    assert fleet.count("devices") == 0


# ---------------------------------------------------------------- bounded error answers


async def test_a_large_request_with_many_mistakes_gets_a_small_answer(fleet, admin_token):
    """0.87 MB of enrollment with 50,000 unknown fields, self-signed (anyone can make one):
    the answer names the first few problems and stays under MAX_ERROR_CHARS."""
    key = SigningKey.generate()
    fields = {f"x{i:05d}": 0 for i in range(50_000)}
    payload = json.dumps(
        {"device_id": "dev-1", "public_key": public_b64(key.public), "created_at": "x", **fields}
    ).encode()
    body = seal_payload(payload, Enrollment.PAYLOAD_TYPE, key)
    assert 800_000 < len(body) < 1 << 20
    status, answer, size = await post(fleet, "/v1/enroll", body)
    assert status == 400 and "problems" in answer["error"] and "more)" in answer["error"]
    assert size < MAX_ERROR_CHARS + 100
    # The same for an admin request: a rollout plan with 50,000 unknown fields.
    plan = {"waves": [{"name": "all", "percent": 100}], **fields}
    status, answer, size = await post(
        fleet, "/v1/admin/remediations/rem-x/rollout", json.dumps(plan).encode(), admin_token
    )
    assert status == 400 and size < MAX_ERROR_CHARS + 100, answer
    assert fleet.count("devices") == 0 and fleet.count("rollouts") == 0


# ---------------------------------------------------------------- property: any JSON value


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(value=_json)
def test_the_strict_parser_accepts_exactly_what_json_can_carry(value):
    text = json.dumps(value)
    try:
        parsed = strict_json_loads(text)
    except MalformedEnvelope as exc:
        assert "out of range" in str(exc), exc  # only integers beyond 2**53 are refused
        return
    assert parsed == value


def test_every_model_of_the_protocol_and_the_server_refuses_non_finite_numbers():
    """One config per model family; this walks every model so a new one cannot forget it."""
    import importlib
    import pkgutil

    from pydantic import BaseModel

    import recovery_agent.protocol
    import recovery_server

    models = []
    for package in (recovery_agent.protocol, recovery_server):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            models += [
                obj
                for obj in vars(module).values()
                if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == info.name
            ]
    assert len(models) > 30
    lax = [m.__qualname__ for m in models if m.model_config.get("allow_inf_nan") is not False]
    assert not lax, f"models that would take NaN or infinity: {lax}"


async def test_nul_characters_are_stored_on_both_databases_and_read_back(fleet, admin_token):
    """A kernel log may hold NUL; PostgreSQL text cannot. Hostnames, crash titles, boot ids,
    labels and titles with NUL are kept (as U+FFFD) on both databases, the audit chain holds."""
    from recovery_agent.protocol.envelope import seal_bytes
    from recovery_agent.protocol.wire import Health

    key = SigningKey.generate()
    msg = Enrollment(
        device_id="dev-1",
        public_key=public_b64(key.public),
        enrollment_token=fleet.enrollment_token,
        hostname="host\x00one",
        created_at=utcnow(),
    )
    status, answer, _ = await post(fleet, "/v1/enroll", seal_bytes(msg, key))
    assert status == 200, answer
    answer = await send_diagnostics(
        fleet, key, "dev-1", edit=lambda p: p.replace(b"general protection", b"general\\u0000protection")
    )
    assert answer["status_code"] == 200, answer
    health = Health(device_id="dev-1", boot_id="boot\x00id", created_at=utcnow())
    status, answer, _ = await post(fleet, "/v1/health", seal_bytes(health, key))
    assert status == 200, answer
    for path, body in (
        ("/v1/admin/enrollment-tokens", {"label": "lab\x00el"}),
        (
            "/v1/admin/remediations",
            {"title": "t\x00", "actions": [{"type": "disable_driver", "name": "sensor"}]},
        ),
    ):
        status, answer, _ = await post(fleet, path, json.dumps(body).encode(), admin_token)
        assert status == 201, answer
    await every_view_answers(fleet, admin_token)
    [device] = fleet.service.devices(fleet.viewer)
    assert device.hostname == "host\ufffdone"
    assert fleet.service.incidents(fleet.viewer)[0].title == "general\ufffdprotection fault in f"
    assert fleet.service.verify_audit(fleet.viewer).ok


@pytest.mark.parametrize("after", ["%C2%B9", "%D9%A3", "%EF%BC%91"])  # ¹, Arabic-Indic 3, fullwidth 1
async def test_a_digit_int_refuses_or_a_foreign_one_is_a_400_not_a_500(fleet, admin_token, after):
    """str.isdigit() takes "¹"; int() refuses it. The audit log's ?after= must say 400, not fail."""
    status, body = await get(fleet, f"/v1/admin/events?after={after}", admin_token)
    assert status == 400 and b"whole number" in body


def test_recovery_admin_expires_with_a_superscript_digit_is_a_usage_error():
    from recovery_server.admin_cli import CommandError, duration_s

    for text in ("¹h", "٣d", "30m"):
        if text == "30m":
            assert duration_s(text) == 1800
        else:
            with pytest.raises(CommandError, match="give a duration"):
                duration_s(text)
