"""The lab's faults without a VM (recovery_lab.faults): the tampering proxy's alteration is
refused by the agent's signature check, and each fault's expectations are judged."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest

from recovery_agent.protocol.envelope import BadSignature, open_envelope, seal
from recovery_agent.protocol.keys import SigningKey, key_id
from recovery_agent.protocol.wire import Directive, utcnow
from recovery_lab.faults import TAMPER_DIRECTIVE, expectation_problems, tamper_payload

PATH = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"


def directive() -> Directive:
    now = utcnow()
    return Directive(
        directive_id="dir-1",
        device_id="dev-1",
        agent_nonce="n" * 32,
        diagnostics_sha256="0" * 64,
        remediation_id="rem-1",
        issued_at=now,
        expires_at=now + timedelta(minutes=5),
        actions=[{"type": "quarantine_file", "path": PATH, "sha256": "a" * 64}],
    )


def test_tampered_directive_names_another_file_and_does_not_verify() -> None:
    key = SigningKey.generate()
    envelope = seal(directive(), key)
    payload = base64.b64decode(envelope["payload"])
    altered = tamper_payload(payload)
    assert len(altered) == len(payload) and altered != payload
    assert PATH.encode() in payload and PATH[:-1].encode() + b"0" in altered
    envelope["payload"] = base64.b64encode(altered).decode()
    with pytest.raises(BadSignature):
        open_envelope(envelope, Directive, {key_id(key.public): key.public})


def test_a_payload_without_a_path_is_not_altered_silently() -> None:
    with pytest.raises(ValueError, match="names no path"):
        tamper_payload(b'{"actions":[]}')


def test_expectations_without_and_with_the_tampering_fault() -> None:
    assert expectation_problems(None, recovered=True, console_text="", results=[], tampered=0) == []
    assert expectation_problems(None, recovered=False, console_text="", results=[], tampered=0)
    refused = "[agent +  3.0s] verify   directive REJECTED: signature does not verify"
    assert (
        expectation_problems(TAMPER_DIRECTIVE, recovered=False, console_text=refused, results=[], tampered=1)
        == []
    )
    applied = [{"outcome": "applied"}]
    problems = expectation_problems(
        TAMPER_DIRECTIVE, recovered=True, console_text="", results=applied, tampered=1
    )
    assert len(problems) == 3
    assert expectation_problems(TAMPER_DIRECTIVE, recovered=False, console_text="", results=[], tampered=0)


async def test_the_proxy_alters_directives_and_passes_everything_else() -> None:
    from aiohttp import ClientSession, web
    from aiohttp.test_utils import TestServer

    from recovery_lab.faults import DirectiveTamperer

    key = SigningKey.generate()
    envelope = seal(directive(), key)

    async def directive_poll(request: web.Request) -> web.Response:
        return web.json_response({"status": "directive", "envelope": envelope})

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"seen": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_get("/v1/reports/r-1/directive", directive_poll)
    app.router.add_post("/v1/reports", other)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    tampered: list[int] = []
    proxy = DirectiveTamperer(f"http://127.0.0.1:{upstream.port}", on_tamper=lambda: tampered.append(1))
    port = await proxy.start()
    try:
        async with ClientSession(f"http://127.0.0.1:{port}") as s:
            async with s.get("/v1/reports/r-1/directive") as r:
                answer = await r.json()
            async with s.post("/v1/reports", headers={"Authorization": "Bearer x"}, data=b"{}") as r:
                assert await r.json() == {"seen": "Bearer x"}
    finally:
        await proxy.stop()
        await upstream.close()
    assert tampered == [1]
    got = base64.b64decode(answer["envelope"]["payload"])
    assert got == tamper_payload(base64.b64decode(envelope["payload"]))
    with pytest.raises(BadSignature):
        open_envelope(answer["envelope"], Directive, {key_id(key.public): key.public})
