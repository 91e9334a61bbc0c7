"""The device API under ``/v1``: what recovery agents (and the OS's health report) call.

Every message but the challenge request is a signed envelope that the service opens; the
handlers pass the raw bytes through. A directive is fetched by long poll: the handler looks,
and if nothing is due yet waits until the fix for the report's incident changes (an approval,
a revocation, a rollout's move, in this process or another: changefeed.py) or the agent's
``wait`` runs out.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from recovery_agent.protocol.admin import Envelope
from recovery_agent.protocol.keys import public_b64
from recovery_agent.protocol.wire import Challenge, DiagnosticsReceipt, DirectivePoll, KeyAnswer

from .api import (
    FEED,
    MAX_POLL,
    METRICS,
    ChallengeRequest,
    Route,
    answer,
    bearer,
    query_number,
    read_body,
    service,
)
from .errors import Unauthorized

# The longest a poll waits by default (the agent's default): a waiting poll costs nothing until
# then, and its renewal is what a fleet of waiting devices costs (scripts/bench_longpoll.py).
# ``recovery-server serve --max-poll`` lowers it, e.g. below a proxy's read timeout.
MAX_POLL_S = 300.0


async def server_key(request: web.Request) -> web.Response:
    key = service(request).server_key
    return web.json_response({"public_key": public_b64(key.public), "key_id": key.key_id})


async def enroll(request: web.Request) -> web.Response:
    return web.json_response(service(request).enroll(await request.read()))


async def challenge(request: web.Request) -> web.Response:
    body = await read_body(request, ChallengeRequest)
    return answer(service(request).challenge(body.device_id))


async def diagnostics(request: web.Request) -> web.Response:
    return answer(await service(request).submit_diagnostics(await request.read()))


async def directive(request: web.Request) -> web.Response:
    svc = service(request)
    token = bearer(request)
    if not token:
        raise Unauthorized("no poll token: send the poll_token of the diagnostics receipt as a Bearer token")
    wait = query_number(request, "wait", 0, 0, request.app[MAX_POLL])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    feed, gauge = request.app[FEED], request.app[METRICS]
    report_id = request.match_info["report_id"]
    issued = 0
    while True:
        looked = svc.look(report_id, token)
        if not isinstance(looked, DirectivePoll):  # due: issue it (in a shared transaction)
            poll = await svc.issue_directive(looked)
            issued += 1
            if poll.status == "pending" and issued < 3:
                continue  # it changed in between: look again (with no await before the wait)
        else:
            poll = looked
        remaining = deadline - loop.time()
        if poll.status != "pending" or remaining <= 0:
            return answer(poll)
        incident_id, wave = svc.waiting_on(report_id)
        # (no await between the look above and this wait: no change can fall between them)
        gauge.long_polls_waiting += 1
        try:
            await feed.wait(incident_id, remaining, wave)
        finally:
            gauge.long_polls_waiting -= 1


async def escrow_key(request: web.Request) -> web.Response:
    return web.json_response(service(request).escrow_key())


async def escrow(request: web.Request) -> web.Response:
    return web.json_response(service(request).escrow_disk_key(await request.read()))


async def disk_key(request: web.Request) -> web.Response:
    # Decrypting the escrowed key and sealing it again: a few milliseconds, off the event loop.
    raw = await request.read()
    return answer(await asyncio.to_thread(service(request).request_disk_key, raw))


async def result(request: web.Request) -> web.Response:
    return web.json_response(await service(request).submit_result(await request.read()))


async def health(request: web.Request) -> web.Response:
    return web.json_response(await service(request).submit_health(await request.read()))


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/server-key", server_key, "The directive signing key to pin", response="ServerKey"),
    Route(
        "POST",
        "/v1/enroll",
        enroll,
        "Enroll a device key (self-signed, with an enrollment token)",
        body=Envelope,
        response="EnrollAnswer",
        errors=(400, 401, 409, 413),
    ),
    Route(
        "POST",
        "/v1/challenge",
        challenge,
        "A one-time nonce for the next diagnostics (any device id gets one)",
        body=ChallengeRequest,
        response=Challenge,
        errors=(400, 413),
    ),
    Route(
        "POST",
        "/v1/diagnostics",
        diagnostics,
        "Signed diagnostics from a recovery environment",
        body=Envelope,
        response=DiagnosticsReceipt,
        errors=(400, 401, 409, 413, 429),
    ),
    Route(
        "GET",
        "/v1/reports/{report_id}/directive",
        directive,
        "Long poll for a signed directive",
        auth="poll",
        response=DirectivePoll,
        errors=(400, 401, 404),
        query=(("wait", "number", "seconds to wait for an answer, 0 to 300"),),
    ),
    Route(
        "GET",
        "/v1/escrow-key",
        escrow_key,
        "The server's escrow public key (X25519), signed by its directive key (EscrowKey envelope)",
        response="SignedEnvelope",
        errors=(409,),
    ),
    Route(
        "POST",
        "/v1/escrow",
        escrow,
        "Escrow the disk's recovery key, sealed to the escrow key (signed KeyEscrow)",
        body=Envelope,
        response="Escrowed",
        errors=(400, 401, 409, 413, 429),
    ),
    Route(
        "POST",
        "/v1/disk-key",
        disk_key,
        "In recovery: the disk's key, sealed to the request's ephemeral key, or pending a person "
        "(signed KeyRequest)",
        body=Envelope,
        response=KeyAnswer,
        errors=(400, 401, 403, 404, 409, 413, 429),
    ),
    Route(
        "POST",
        "/v1/results",
        result,
        "Signed result of applying a directive",
        body=Envelope,
        response="Recorded",
        errors=(400, 401, 404, 413, 429),
    ),
    Route(
        "POST",
        "/v1/health",
        health,
        "Signed report of a healthy boot",
        body=Envelope,
        response="Recorded",
        errors=(400, 401, 413, 429),
    ),
)
