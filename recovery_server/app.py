"""The recovery server's HTTP surface (aiohttp): device API under /v1, admin API under
/v1/admin (Bearer token per person). Handlers only translate HTTP to ``RecoveryService`` calls;
the rules live there.

A directive is fetched by long poll: the handler looks, and if nothing is approved yet waits
for an approval in this process or a short tick (another server process may approve), until
the agent's ``wait`` runs out.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from recovery_agent import __version__
from recovery_agent.envelope import MalformedEnvelope, public_b64, strict_json_loads

from .service import BadRequest, RecoveryService, ServiceError, User

log = logging.getLogger("recovery_server")

MAX_BODY = 1 << 20
MAX_POLL_S = 60.0
SERVICE = web.AppKey("service", RecoveryService)
CHANGED = web.AppKey("changed", asyncio.Event)


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await handler(request)
    except ServiceError as exc:
        return web.json_response({"error": str(exc), "code": exc.code}, status=exc.status)
    except MalformedEnvelope as exc:
        return web.json_response({"error": str(exc), "code": "bad_request"}, status=400)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": f"request body over {MAX_BODY} bytes", "code": "too_large"},
                                 status=413)


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return strict_json_loads(raw)
    except MalformedEnvelope as exc:
        raise BadRequest(f"request body: {exc}") from None


def _user(request: web.Request) -> User:
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else None
    return request.app[SERVICE].authenticate(token)


def _svc(request: web.Request) -> RecoveryService:
    return request.app[SERVICE]


def _model(obj: Any) -> web.Response:
    return web.Response(text=obj.model_dump_json(), content_type="application/json")


# ---------------------------------------------------------------- device API


async def server_key(request: web.Request) -> web.Response:
    key = _svc(request).server_key
    return web.json_response({"public_key": public_b64(key.public), "key_id": key.key_id})


async def enroll(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).enroll(await request.read()))


async def challenge(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("device_id"), str):
        raise BadRequest('send {"device_id": "..."}')
    return _model(_svc(request).challenge(body["device_id"]))


async def diagnostics(request: web.Request) -> web.Response:
    return _model(_svc(request).accept_diagnostics(await request.read()))


async def directive(request: web.Request) -> web.Response:
    svc = _svc(request)
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth.startswith("Bearer ") else ""
    try:
        wait = min(max(float(request.query.get("wait", "0")), 0.0), MAX_POLL_S)
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    changed = request.app[CHANGED]
    while True:
        answer = svc.poll(request.match_info["report_id"], token)
        remaining = deadline - loop.time()
        if answer.status != "pending" or remaining <= 0:
            return _model(answer)
        try:
            await asyncio.wait_for(changed.wait(), timeout=min(1.0, remaining))
        except asyncio.TimeoutError:
            pass


async def result(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).accept_result(await request.read()))


async def health(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).accept_health(await request.read()))


# ---------------------------------------------------------------- admin API


async def whoami(request: web.Request) -> web.Response:
    user = _user(request)
    return web.json_response({"name": user.name, "role": user.role})


async def list_devices(request: web.Request) -> web.Response:
    svc = _svc(request)
    svc.require(_user(request), "viewer")
    return web.json_response(svc.devices())


async def list_incidents(request: web.Request) -> web.Response:
    svc = _svc(request)
    svc.require(_user(request), "viewer")
    return web.json_response(svc.incidents())


async def get_incident(request: web.Request) -> web.Response:
    svc = _svc(request)
    svc.require(_user(request), "viewer")
    return web.json_response(svc.incident(request.match_info["incident_id"]))


async def suggest(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).suggest_actions(_user(request), request.match_info["incident_id"]))


async def list_remediations(request: web.Request) -> web.Response:
    svc = _svc(request)
    svc.require(_user(request), "viewer")
    return web.json_response(svc.remediations())


async def create_remediation(request: web.Request) -> web.Response:
    user = _user(request)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object with title, incident_id, actions")
    rem = _svc(request).create_remediation(
        user, title=body.get("title", ""), actions=body.get("actions", []),
        incident_id=body.get("incident_id"), required_approvals=int(body.get("required_approvals", 1)))
    return web.json_response(rem, status=201)


async def approve(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).approve(_user(request), request.match_info["remediation_id"]))


async def revoke(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).revoke(_user(request), request.match_info["remediation_id"]))


async def create_user(request: web.Request) -> web.Response:
    user = _user(request)
    svc = _svc(request)
    svc.require(user, "admin")
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest('send {"name": ..., "role": ...}')
    token = svc.create_user(str(body.get("name", "")), str(body.get("role", "")), actor=user.name)
    return web.json_response({"name": body["name"], "role": body["role"], "token": token}, status=201)


async def create_enrollment_token(request: web.Request) -> web.Response:
    body = await _json_body(request) if request.can_read_body else {}
    label = str(body.get("label", "fleet")) if isinstance(body, dict) else "fleet"
    token = _svc(request).create_enrollment_token(_user(request), label)
    return web.json_response({"token": token, "label": label}, status=201)


async def list_events(request: web.Request) -> web.Response:
    svc = _svc(request)
    svc.require(_user(request), "viewer")
    try:
        after = int(request.query.get("after", "0"))
    except ValueError:
        raise BadRequest("after must be an event number") from None
    return web.json_response(svc.events(request.query.get("device"), after))


async def create_rollout(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("send a rollout plan: {waves: [...], min_devices, min_success_rate, soak_s, "
                         "halt_failure_rate}")
    ro = _svc(request).create_rollout(_user(request), request.match_info["remediation_id"], body)
    return web.json_response(ro, status=201)


async def list_rollouts(request: web.Request) -> web.Response:
    svc = _svc(request)
    svc.require(_user(request), "viewer")
    return web.json_response(svc.rollouts())


async def get_rollout(request: web.Request) -> web.Response:
    svc = _svc(request)
    svc.require(_user(request), "viewer")
    return web.json_response(svc.rollout(request.match_info["rollout_id"]))


async def rollout_action(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).set_rollout_state(
        _user(request), request.match_info["rollout_id"], request.match_info["action"]))


async def audit_verify(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).verify_audit(_user(request), request.query.get("expect_head")))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


def make_app(service: RecoveryService) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[SERVICE] = service
    changed = asyncio.Event()
    app[CHANGED] = changed

    def notify() -> None:
        # Wake every long poll once; they re-check the store and wait again.
        changed.set()
        changed.clear()

    service.on_change = notify
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/v1/server-key", server_key),
        web.post("/v1/enroll", enroll),
        web.post("/v1/challenge", challenge),
        web.post("/v1/diagnostics", diagnostics),
        web.get("/v1/reports/{report_id}/directive", directive),
        web.post("/v1/results", result),
        web.post("/v1/health", health),
        web.get("/v1/admin/whoami", whoami),
        web.get("/v1/admin/devices", list_devices),
        web.get("/v1/admin/incidents", list_incidents),
        web.get("/v1/admin/incidents/{incident_id}", get_incident),
        web.get("/v1/admin/incidents/{incident_id}/suggestion", suggest),
        web.get("/v1/admin/remediations", list_remediations),
        web.post("/v1/admin/remediations", create_remediation),
        web.post("/v1/admin/remediations/{remediation_id}/approve", approve),
        web.post("/v1/admin/remediations/{remediation_id}/revoke", revoke),
        web.post("/v1/admin/users", create_user),
        web.post("/v1/admin/enrollment-tokens", create_enrollment_token),
        web.get("/v1/admin/events", list_events),
        web.get("/v1/admin/audit/verify", audit_verify),
        web.post("/v1/admin/remediations/{remediation_id}/rollout", create_rollout),
        web.get("/v1/admin/rollouts", list_rollouts),
        web.get("/v1/admin/rollouts/{rollout_id}", get_rollout),
        web.post("/v1/admin/rollouts/{rollout_id}/{action:pause|resume|revoke}", rollout_action),
    ])
    app.cleanup_ctx.append(_rollout_ticker)
    return app


TICK_S = 1.0


async def _rollout_ticker(app: web.Application):
    """Soak time passes with no device event: re-judge active rollouts every second."""
    service = app[SERVICE]

    async def loop() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                service.tick()
            except Exception:  # a bad tick must not stop the next ones
                log.exception("rollout tick failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
