"""Every route, fed hostile input by hypothesis: no 500, bounded error answers, and nothing
stored that a later read cannot serve back.

The classes of input come from an audit of the HTTP edge: numbers JSON cannot carry
(``1e400``, ``NaN``, whole numbers past 2**53), deep nesting, other encodings (UTF-16, a BOM),
lone surrogates and NUL characters, wrong types in every field, unknown fields, long strings.
Each is put into an otherwise valid body of each route (for the device routes, a payload
signed by an enrolled device, so the payload's own checks are reached), or sent as the whole
body; query parameters and path parameters get the same treatment. After the run every admin
read view must still answer, and the audit chain must verify.

The server runs on its own event loop in a thread, so hypothesis drives it with plain
blocking requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recovery_agent.protocol.envelope import pae, strict_json_loads
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import Diagnostics, Enrollment, Health, Result
from recovery_server.app import MAX_ERROR_CHARS, ROUTES
from recovery_server.limits import RateLimit
from recovery_server.service import ServiceSettings

from .conftest import Fleet

BAD_PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
PLACEHOLDER = "@@hostile@@"

# Raw JSON text for one value: what a hand-made body can hold, valid JSON or not.
HOSTILE_VALUES = [
    "1e400",
    "-1e400",
    "NaN",
    "Infinity",
    "-Infinity",
    "99999999999999999999",
    "9007199254740993",
    "-1",
    "0",
    "1.7e308",
    "4.9e-324",
    "[]",
    "{}",
    "null",
    "true",
    '"\\u0000"',
    '"a\\u0000b"',
    '"\\ud800"',
    '"\\udfff\\ud800"',
    '"\U0001f4a5"',
    json.dumps("x" * 5000),
    "[" * 100 + "]" * 100,
    "[" * 60 + "1" + "]" * 60,
    json.dumps([1, 2, 3] * 500),
    json.dumps({"a": {"b": {"c": [None, 1.5, "x"]}}}),
    '"1e400"',
    '""',
]

HOSTILE_BODIES = [
    b"",
    b"null",
    b"[]",
    b"1e400",
    b"[" * 200_000 + b"]" * 200_000,
    b"{" * 10_000,
    b'{"a": 1, "a": 2}',
    b"\xff\xfe{\x00}\x00",
    b"\xef\xbb\xbf{}",
    b"\x00" * 100,
    b"not json at all",
    b'{"a": "\\ud800"}',
]


@dataclass
class LiveFleet:
    fleet: Fleet
    loop: asyncio.AbstractEventLoop
    admin_token: str
    device_key: SigningKey
    ids: dict[str, str]

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def request(
        self, method: str, path: str, body: bytes | None = None, token: str | None = None
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(self.fleet.url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@pytest.fixture(params=["sqlite", "postgresql"])
def live(request, tmp_path) -> Iterator[LiveFleet]:
    from .conftest import postgres_schema

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with contextlib.ExitStack() as stack:
        stack.callback(thread.join, 10)
        stack.callback(loop.call_soon_threadsafe, loop.stop)
        if request.param == "sqlite":
            url = str(tmp_path / "server/recovery.db")
        else:
            url = stack.enter_context(postgres_schema())
        # A poll the fuzzer makes with its valid token may wait: as long as its requests'
        # timeout at most, whatever wait it asks for.
        fleet = Fleet(store_url=url, key=SigningKey.generate(), settings=FUZZ_SETTINGS, max_poll_s=1)
        asyncio.run_coroutine_threadsafe(fleet.start(), loop).result(timeout=60)
        stack.callback(lambda: asyncio.run_coroutine_threadsafe(fleet.stop(), loop).result(timeout=60))
        token = fleet.service.create_user(fleet.admin, "fuzz", "admin").token
        live = LiveFleet(fleet, loop, token, SigningKey.generate(), {})
        live.run(fleet.enroll("dev-1", live.device_key))
        status, receipt = live.request("POST", "/v1/diagnostics", diagnostics_envelope(live, "dev-1"))
        assert status == 200, receipt
        ids = json.loads(receipt)
        rem = fleet.service.create_remediation(
            fleet.user("oscar"),
            title="q",
            incident_id=ids["incident_id"],
            actions=[{"type": "quarantine_file", "path": BAD_PATH, "sha256": "b" * 64}],
        )
        ro = fleet.service.create_rollout(
            fleet.user("oscar"), rem.remediation_id, {"waves": [{"name": "all", "percent": 100}]}
        )
        # A second device and a token of its own, for the routes that name one (an admin may
        # revoke them; the fuzzer's own device keeps reporting).
        live.run(fleet.enroll("dev-2", SigningKey.generate()))
        spare = fleet.service.create_enrollment_token(fleet.admin, "spare")
        rule = fleet.service.create_rule(
            fleet.user("oscar"), {"title": "bad", "path_pattern": BAD_PATH, "sha256": "b" * 64}
        )
        live.ids = {
            "rule_id": rule.rule_id,
            "release_id": "rel-000000000000",  # none made: every answer must still be 4xx, not 5xx
            "device_id": "dev-2",
            "token_id": spare.token_id,
            "incident_id": ids["incident_id"],
            "remediation_id": rem.remediation_id,
            "rollout_id": ro.rollout_id,
            "report_id": ids["report_id"],
            "poll_token": ids["poll_token"],
        }
        yield live


# The fuzzer sends many reports from one device: no flood limit in its way.
FUZZ_SETTINGS = ServiceSettings(device_rate=RateLimit(burst=10**6, per_minute=10**6))


def sign(payload: bytes, payload_type: str, key: SigningKey) -> bytes:
    sig = key.private.sign(pae(payload_type, payload))
    return json.dumps(
        {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": payload_type,
            "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(sig).decode()}],
        }
    ).encode()


def challenge(live: LiveFleet, device_id: str) -> str:
    status, body = live.request("POST", "/v1/challenge", json.dumps({"device_id": device_id}).encode())
    assert status == 200, body
    return str(json.loads(body)["nonce"])


def diagnostics_body(live: LiveFleet, device_id: str) -> dict[str, Any]:
    return {
        "device_id": device_id,
        "server_nonce": challenge(live, device_id),
        "agent_nonce": "a" * 32,
        "created_at": "2026-01-01T00:00:00Z",
        "agent_version": "fuzz",
        "test_mode": False,
        "boot": {
            "boot_count": 2,
            "boot_limit": 2,
            "recovery_attempts": 1,
            "max_recovery_attempts": 3,
            "history": [{"index": 0, "outcome": "crashed", "detail": "x"}],
        },
        "crash": {
            "kind": "kernel_panic",
            "title": "general protection fault in sensor_parse_channel",
            "guilty_module": "sensor",
            "channel_file": BAD_PATH,
            "excerpt": "RIP: sensor_parse_channel",
        },
        "system": {"os_release": "Debian", "kernel_version": "6.1", "hostname": "h"},
        "channel_files": [{"path": BAD_PATH, "size": 172, "mtime": 1.5, "sha256": "b" * 64}],
        "drivers": [],
    }


def diagnostics_envelope(live: LiveFleet, device_id: str) -> bytes:
    payload = json.dumps(diagnostics_body(live, device_id)).encode()
    return sign(payload, Diagnostics.PAYLOAD_TYPE, live.device_key)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document a value sits: keys of objects, indexes of lists."""
    out = [prefix]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*prefix, i))
    return out


def _put(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, *rest = path
    copy = dict(obj) if isinstance(obj, dict) else list(obj)
    copy[head] = _put(copy[head], tuple(rest), value)
    return copy


def mutated(doc: Any, draw: Any) -> bytes:
    """``doc`` with one value replaced by a hostile one (raw JSON text), or one unknown field
    added, as JSON bytes."""
    hostile = draw(st.sampled_from(HOSTILE_VALUES))
    if isinstance(doc, dict) and draw(st.booleans()) and draw(st.booleans()):
        doc = dict(doc, unknown_field=PLACEHOLDER)
    else:
        doc = _put(doc, draw(st.sampled_from(_paths(doc))), PLACEHOLDER)
    return json.dumps(doc).replace(json.dumps(PLACEHOLDER), hostile, 1).encode()


def valid_body(live: LiveFleet, path: str, draw: Any) -> tuple[Any, str | None, SigningKey]:
    """A body the route would accept; for the device routes, the payload type to sign it with
    and the key that signs it (a new device's own for an enrollment, the enrolled one's else)."""
    key = live.device_key
    n = draw(st.integers(0, 10**6))
    if path == "/v1/enroll":
        key = SigningKey.generate()
        return (
            {
                "device_id": f"fz-{n}",
                "public_key": public_b64(key.public),
                "enrollment_token": live.fleet.enrollment_token,
                "hostname": "h",
                "created_at": "2026-01-01T00:00:00Z",
            },
            Enrollment.PAYLOAD_TYPE,
            key,
        )
    if path == "/v1/diagnostics":
        return diagnostics_body(live, "dev-1"), Diagnostics.PAYLOAD_TYPE, key
    if path == "/v1/results":
        return (
            {
                "device_id": "dev-1",
                "directive_id": "dir-x",
                "outcome": "applied",
                "actions": [{"index": 0, "type": "quarantine_file", "status": "applied", "detail": ""}],
                "created_at": "2026-01-01T00:00:00Z",
            },
            Result.PAYLOAD_TYPE,
            key,
        )
    if path == "/v1/health":
        body = {"device_id": "dev-1", "boot_id": f"b-{n}", "created_at": "2026-01-01T00:00:00Z"}
        return body, Health.PAYLOAD_TYPE, key
    bodies: dict[str, Any] = {
        "/v1/challenge": {"device_id": "dev-1"},
        "/v1/admin/remediations": {
            "title": "fix",
            "incident_id": live.ids["incident_id"],
            "actions": [{"type": "quarantine_file", "path": BAD_PATH, "sha256": "b" * 64}],
            "required_approvals": 1,
        },
        "/v1/admin/remediations/{remediation_id}/rollout": {
            "waves": [{"name": "c", "devices": ["dev-1"]}, {"name": "all", "percent": 100}],
            "min_devices": 1,
            "min_success_rate": 0.9,
            "soak_s": 10.5,
            "halt_failure_rate": 0.2,
            "halt_min_devices": 1,
        },
        "/v1/admin/rules": {"title": "bad", "path_pattern": "var/lib/*.sys", "sha256": "c" * 64},
        "/v1/admin/me/key": {"public_key": public_b64(SigningKey.generate().public)},
        "/v1/admin/users": {"name": f"u{n}", "role": "viewer"},
        "/v1/admin/enrollment-tokens": {"label": "lab"},
    }
    return bodies.get(path, {}), None, key


@st.composite
def hostile_requests(draw: Any, live: LiveFleet) -> tuple[str, str, bytes | None, str | None]:
    route = draw(st.sampled_from(ROUTES))
    ids = dict(live.ids)
    if draw(st.integers(0, 4)) == 0:  # a path parameter no one made
        junk = draw(st.sampled_from(["x", "%00", "..", "a" * 300, "%ff%fe", "INC-" + "0" * 12]))
        ids = {k: junk for k in ids}
    path = route.path.format(**ids)
    token = draw(st.sampled_from([live.admin_token, None, "qmr_nope"]))
    if route.auth == "poll":
        token = draw(st.sampled_from([live.ids["poll_token"], None, "x"]))
    if route.query:
        name = draw(st.sampled_from([q[0] for q in route.query]))
        value = draw(
            st.sampled_from(
                ["nan", "inf", "-inf", "1e400", "-1", "abc", "9" * 40, "", "0:" + "a" * 64, "\x00"]
            )
            | st.text(max_size=30)
        )
        path += "?" + urllib.parse.urlencode({name: value})
    if route.method == "GET":
        return route.method, path, None, token
    if route.body is None or draw(st.integers(0, 5)) == 0:
        return route.method, path, draw(st.sampled_from(HOSTILE_BODIES)), token
    doc, payload_type, signer = valid_body(live, route.path, draw)
    body = mutated(doc, draw)
    if payload_type is not None:
        body = sign(body, payload_type, signer)
        if draw(st.integers(0, 5)) == 0:  # the envelope itself hostile
            body = mutated(json.loads(body), draw)
    return route.method, path, body, token


def check_answer(method: str, path: str, status: int, body: bytes) -> None:
    assert status < 500, (method, path, status, body[:500])
    if status >= 400 and body[:1] == b"{":
        answer = json.loads(body)
        assert len(answer["error"]) <= MAX_ERROR_CHARS, (method, path)
    elif body[:1] in (b"{", b"["):
        strict_json_loads(body)


def every_view_answers(live: LiveFleet) -> None:
    paths = [r.path for r in ROUTES if r.method == "GET" and r.auth == "admin" and "{" not in r.path]
    viewer = live.fleet.viewer
    for inc in live.fleet.service.incidents(viewer):
        paths += [
            f"/v1/admin/incidents/{inc.incident_id}",
            f"/v1/admin/incidents/{inc.incident_id}/suggestion",
        ]
    for ro in live.fleet.service.rollouts(viewer):
        paths.append(f"/v1/admin/rollouts/{ro.rollout_id}")
    paths += ["/metrics", "/openapi.json", "/healthz", "/"]
    for path in paths:
        status, body = live.request("GET", path, token=live.admin_token)
        assert status == 200, (path, body[:300])
        if body[:1] in (b"{", b"["):
            strict_json_loads(body)
    status, body = live.request(
        "GET", f"/v1/reports/{live.ids['report_id']}/directive", token=live.ids["poll_token"]
    )
    assert status == 200, body
    live.fleet.service.tick()
    assert live.fleet.service.verify_audit(viewer).ok


@pytest.mark.timeout(600)
def test_hostile_requests_on_every_route_never_fail_the_server_nor_a_later_read(live):
    @settings(
        max_examples=300,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        deadline=None,
    )
    @given(data=st.data())
    def one_request(data: st.DataObject) -> None:
        method, path, body, token = data.draw(hostile_requests(live))
        status, answer = live.request(method, path, body, token)
        check_answer(method, path, status, answer)

    one_request()
    every_view_answers(live)
