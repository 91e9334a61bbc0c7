"""Faults the lab injects into a run of the recovery loop: ``recovery-lab run SCENARIO --fault NAME``.

A fault is something that goes wrong around the machine while it recovers. With one, a run no
longer has to end in a recovery; it has to end the way the fault predicts, and the run's
report lists every way it did not (:func:`expectation_problems`). The faults:

``tamper-directive``
    A man in the middle between the machine and the server (:class:`DirectiveTamperer`, an
    HTTP proxy on 127.0.0.1 that the VM's only network path leads to) changes one byte of
    every directive on its way to the machine: the last character of its first action's path,
    inside the signed payload, so the directive names another file than the one the approvers
    approved. The agent must refuse it (the server's signature does not verify), change
    nothing on the disk and report no result; the machine does not recover and, once its
    recovery attempts are used up, waits for a person.

A shorter run with this fault: ``--time-to-reboot 30 --max-attempts 1``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import ClientSession, web

TAMPER_DIRECTIVE = "tamper-directive"

# Name -> one line for ``recovery-lab run --help``.
FAULTS: dict[str, str] = {
    TAMPER_DIRECTIVE: "a proxy alters every directive in flight; the agent must refuse it and change nothing",
}

# The first action's path in a directive's canonical JSON (its keys are sorted, so "actions"
# comes first and the path is its first action's).
_FIRST_PATH = re.compile(rb'"path":"(?P<path>[^"\\]+)"')
# What the agent's timeline prints when it refuses a directive (recovery_agent.agent).
DIRECTIVE_REJECTED = "directive REJECTED"
# Headers the device protocol uses; nothing else is passed on.
_FORWARDED_HEADERS = ("authorization", "content-type")


def tamper_payload(payload: bytes) -> bytes:
    """``payload`` with the last character of its first ``"path"`` value changed (``0``, or
    ``1`` if it was ``0``): still valid JSON and a valid path, but not the bytes the server
    signed."""
    m = _FIRST_PATH.search(payload)
    if m is None:
        raise ValueError("the directive's payload names no path to alter")
    end = m.end("path") - 1
    replacement = b"1" if payload[end : end + 1] == b"0" else b"0"
    return payload[:end] + replacement + payload[end + 1 :]


def _listening_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


class DirectiveTamperer:
    """An HTTP proxy on 127.0.0.1 in front of the server at ``upstream``: passes every
    request through and alters every directive the server hands out
    (:func:`tamper_payload`), calling ``on_tamper()`` each time."""

    def __init__(self, upstream: str, on_tamper: Callable[[], None]) -> None:
        self.upstream = upstream
        self.on_tamper = on_tamper
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    async def start(self) -> int:
        """Listen on a free port of 127.0.0.1 and return it."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = ClientSession()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = _listening_port(self._runner)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as r:
            body = await r.read()
            status = r.status
        if request.path.endswith("/directive") and status == 200:
            answer = json.loads(body)
            if answer.get("status") == "directive":
                envelope = answer["envelope"]
                payload = tamper_payload(base64.b64decode(envelope["payload"]))
                envelope["payload"] = base64.b64encode(payload).decode()
                body = json.dumps(answer).encode()
                self.on_tamper()
        return web.Response(body=body, status=status, content_type="application/json")


def expectation_problems(
    fault: str | None, *, recovered: bool, console_text: str, results: Sequence[dict[str, Any]], tampered: int
) -> list[str]:
    """Every way a run missed what it should show: a recovery without a fault; with
    ``tamper-directive``, a directive altered, refused, nothing applied and no recovery."""
    if fault is None:
        return [] if recovered else ["the machine did not recover"]
    if fault == TAMPER_DIRECTIVE:
        problems = []
        if not tampered:
            problems.append("no directive reached the proxy to be altered")
        elif DIRECTIVE_REJECTED not in console_text:
            problems.append("the agent never refused an altered directive")
        if any(r.get("outcome") == "applied" for r in results):
            problems.append("a result 'applied' reached the server: an altered directive was applied")
        if recovered:
            problems.append("the machine recovered from an altered directive")
        return problems
    raise ValueError(f"unknown fault {fault!r}: use one of {', '.join(FAULTS)}")
