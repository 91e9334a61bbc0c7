"""The recovery server's HTTP surface (aiohttp): device API under /v1, admin API under
/v1/admin (Bearer token per person), ``/metrics`` (Prometheus text), ``/openapi.json``, and the
dashboard at ``/``. Handlers only translate HTTP to ``RecoveryService`` calls; the rules live
there. One table, ``ROUTES``, registers every route and describes it for the OpenAPI document,
so the two cannot drift apart.

A directive is fetched by long poll: the handler looks, and if nothing is approved yet waits
for an approval in this process or a short tick (another server process may approve), until
the agent's ``wait`` runs out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from recovery_agent.protocol.envelope import MalformedEnvelope, strict_json_loads
from recovery_agent.protocol.keys import public_b64
from recovery_agent.protocol.version import __version__

from . import api, dashboard, metrics
from .access import User
from .errors import BadRequest, ServiceError, Unauthorized
from .rollout import RolloutPlan
from .service import RecoveryService

log = logging.getLogger("recovery_server")

MAX_BODY = 1 << 20
MAX_POLL_S = 60.0
# A long poll re-reads the store this often even when no event in this process woke it: another
# server process may have approved, or a rollout may have been promoted.
POLL_TICK_S = 1.0
ROLLOUT_TICK_S = 1.0
SERVICE = web.AppKey("service", RecoveryService)
CHANGED = web.AppKey("changed", asyncio.Event)
METRICS = web.AppKey("metrics", metrics.HttpMetrics)
POLL_TICK = web.AppKey("poll_tick_s", float)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


@web.middleware
async def _errors(request: web.Request, handler: Handler):
    started = time.perf_counter()
    try:
        response = await handler(request)
    except ServiceError as exc:
        response = _error(exc.status, exc.code, str(exc))
    except MalformedEnvelope as exc:
        response = _error(400, "bad_request", str(exc))
    except web.HTTPRequestEntityTooLarge:
        response = _error(413, "too_large", f"request body over {MAX_BODY} bytes")
    except web.HTTPException as exc:  # unknown route, wrong method: answer in JSON too
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        for header in ("Allow",):
            if header in exc.headers:
                response.headers[header] = exc.headers[header]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    request.app[METRICS].observe(request.method, route, response.status, time.perf_counter() - started)
    return response


async def _parse(request: web.Request, model: type[BaseModel]) -> Any:
    raw = await request.read()
    try:
        body = strict_json_loads(raw or b"{}")
        return model.model_validate(body)
    except MalformedEnvelope as exc:
        raise BadRequest(f"request body: {exc}") from None
    except ValidationError as exc:
        raise BadRequest(f"request body does not fit {model.__name__}: {exc}") from None


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else None


def _user(request: web.Request) -> User:
    """The person whose token the request carries; what they may do, the service decides."""
    return request.app[SERVICE].authenticate(_bearer(request))


def _svc(request: web.Request) -> RecoveryService:
    return request.app[SERVICE]


def _model(obj: BaseModel, status: int = 200) -> web.Response:
    return web.Response(text=obj.model_dump_json(), content_type="application/json", status=status)


def _query_number(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number")
    return min(max(value, lo), hi)


# ---------------------------------------------------------------- device API


async def server_key(request: web.Request) -> web.Response:
    key = _svc(request).server_key
    return web.json_response({"public_key": public_b64(key.public), "key_id": key.key_id})


async def enroll(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).enroll(await request.read()))


async def challenge(request: web.Request) -> web.Response:
    body = await _parse(request, api.ChallengeRequest)
    return _model(_svc(request).challenge(body.device_id))


async def diagnostics(request: web.Request) -> web.Response:
    return _model(_svc(request).accept_diagnostics(await request.read()))


async def directive(request: web.Request) -> web.Response:
    svc = _svc(request)
    token = _bearer(request)
    if not token:
        raise Unauthorized("no poll token: send the poll_token of the diagnostics receipt as a Bearer token")
    wait = _query_number(request, "wait", 0, 0, MAX_POLL_S)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    changed, tick, gauge = request.app[CHANGED], request.app[POLL_TICK], request.app[METRICS]
    while True:
        answer = svc.poll(request.match_info["report_id"], token)
        remaining = deadline - loop.time()
        if answer.status != "pending" or remaining <= 0:
            return _model(answer)
        gauge.long_polls_waiting += 1
        try:
            await asyncio.wait_for(changed.wait(), timeout=min(tick, remaining))
        except TimeoutError:
            pass
        finally:
            gauge.long_polls_waiting -= 1


async def result(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).accept_result(await request.read()))


async def health(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).accept_health(await request.read()))


# ---------------------------------------------------------------- admin API


async def whoami(request: web.Request) -> web.Response:
    user = _user(request)
    return web.json_response({"name": user.name, "role": user.role})


async def list_devices(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).devices(_user(request)))


async def list_incidents(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).incidents(_user(request)))


async def get_incident(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).incident(_user(request), request.match_info["incident_id"]))


async def suggest(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).suggest_actions(_user(request), request.match_info["incident_id"]))


async def list_remediations(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).remediations(_user(request)))


async def create_remediation(request: web.Request) -> web.Response:
    user = _user(request)
    body = await _parse(request, api.RemediationRequest)
    rem = _svc(request).create_remediation(
        user,
        title=body.title,
        actions=body.actions,
        incident_id=body.incident_id,
        required_approvals=body.required_approvals,
    )
    return web.json_response(rem, status=201)


async def approve(request: web.Request) -> web.Response:
    user = _user(request)
    body = await _parse(request, api.ApproveRequest)
    signed = body.signed.model_dump() if body.signed else None
    return web.json_response(_svc(request).approve(user, request.match_info["remediation_id"], signed))


async def register_key(request: web.Request) -> web.Response:
    user = _user(request)
    body = await _parse(request, api.RegisterKeyRequest)
    return web.json_response(_svc(request).register_key(user, body.public_key))


async def revoke(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).revoke(_user(request), request.match_info["remediation_id"]))


async def create_user(request: web.Request) -> web.Response:
    user = _user(request)
    body = await _parse(request, api.UserRequest)
    token = _svc(request).create_user(user, body.name, body.role)
    return web.json_response({"name": body.name, "role": body.role, "token": token}, status=201)


async def create_enrollment_token(request: web.Request) -> web.Response:
    user = _user(request)
    body = await _parse(request, api.EnrollmentTokenRequest)
    token = _svc(request).create_enrollment_token(user, body.label)
    return web.json_response({"token": token, "label": body.label}, status=201)


async def list_events(request: web.Request) -> web.Response:
    user = _user(request)
    text = request.query.get("after", "0")
    if not text.isdigit() or len(text) > 18:
        raise BadRequest("after must be an event number (a whole number)")
    return web.json_response(_svc(request).events(user, request.query.get("device"), int(text)))


async def audit_verify(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).verify_audit(_user(request), request.query.get("expect_head")))


async def create_rollout(request: web.Request) -> web.Response:
    user = _user(request)
    plan = await _parse(request, RolloutPlan)
    ro = _svc(request).create_rollout(user, request.match_info["remediation_id"], plan.model_dump())
    return web.json_response(ro, status=201)


async def list_rollouts(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).rollouts(_user(request)))


async def get_rollout(request: web.Request) -> web.Response:
    return web.json_response(_svc(request).rollout(_user(request), request.match_info["rollout_id"]))


async def rollout_action(request: web.Request) -> web.Response:
    action = request.path.rsplit("/", 1)[1]  # the route names it: pause, resume or revoke
    return web.json_response(
        _svc(request).set_rollout_state(_user(request), request.match_info["rollout_id"], action)
    )


# ---------------------------------------------------------------- operations


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def metrics_text(request: web.Request) -> web.Response:
    text = metrics.render(_svc(request), request.app[METRICS])
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(api.openapi_document(ROUTES, __version__))


def _static(text: str, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(
            text=text,
            content_type=content_type,
            charset="utf-8",
            headers={
                "Content-Security-Policy": dashboard.CSP,
                "X-Frame-Options": "DENY",
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-cache",
            },
        )

    return serve


dashboard_page = _static(dashboard.PAGE, "text/html")
dashboard_js = _static(dashboard.SCRIPT, "application/javascript")
dashboard_css = _static(dashboard.CSS, "text/css")


@dataclass(frozen=True)
class Route:
    """One route: how aiohttp dispatches it and how the OpenAPI document describes it."""

    method: str
    path: str
    handler: Handler
    summary: str
    auth: str = "none"  # none | admin | poll
    body: str | None = None  # a schema name in api.SCHEMAS
    body_required: bool = True
    response: str | None = None  # a schema name in api.SCHEMAS
    status: int = 200
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)
    content: str = "application/json"
    hidden: bool = False  # served, but not part of the API document


_ADMIN = (401, 403)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", healthz, "Liveness", response="Healthz"),
    Route("GET", "/metrics", metrics_text, "Prometheus metrics", content="text/plain"),
    Route("GET", "/openapi.json", openapi_json, "This document", response="Any"),
    Route("GET", "/", dashboard_page, "The dashboard", content="text/html", hidden=True),
    Route("GET", "/dashboard.js", dashboard_js, "The dashboard", hidden=True),
    Route("GET", "/dashboard.css", dashboard_css, "The dashboard", hidden=True),
    Route("GET", "/v1/server-key", server_key, "The directive signing key to pin", response="ServerKey"),
    Route(
        "POST",
        "/v1/enroll",
        enroll,
        "Enroll a device key (self-signed, with an enrollment token)",
        body="Envelope",
        response="EnrollAnswer",
        errors=(400, 401, 409, 413),
    ),
    Route(
        "POST",
        "/v1/challenge",
        challenge,
        "A one-time nonce for the next diagnostics",
        body="ChallengeRequest",
        response="Challenge",
        errors=(400, 404, 413),
    ),
    Route(
        "POST",
        "/v1/diagnostics",
        diagnostics,
        "Signed diagnostics from a recovery environment",
        body="Envelope",
        response="DiagnosticsReceipt",
        errors=(400, 401, 409, 413),
    ),
    Route(
        "GET",
        "/v1/reports/{report_id}/directive",
        directive,
        "Long poll for a signed directive",
        auth="poll",
        response="DirectivePoll",
        errors=(400, 401, 404),
        query=(("wait", "number", "seconds to wait for an answer, 0 to 60"),),
    ),
    Route(
        "POST",
        "/v1/results",
        result,
        "Signed result of applying a directive",
        body="Envelope",
        response="Recorded",
        errors=(400, 401, 404, 413),
    ),
    Route(
        "POST",
        "/v1/health",
        health,
        "Signed report of a healthy boot",
        body="Envelope",
        response="Recorded",
        errors=(400, 401, 413),
    ),
    Route("GET", "/v1/admin/whoami", whoami, "The caller", auth="admin", response="Whoami", errors=(401,)),
    Route("GET", "/v1/admin/devices", list_devices, "Devices", auth="admin", response="List", errors=_ADMIN),
    Route(
        "GET",
        "/v1/admin/incidents",
        list_incidents,
        "Incidents",
        auth="admin",
        response="List",
        errors=_ADMIN,
    ),
    Route(
        "GET",
        "/v1/admin/incidents/{incident_id}",
        get_incident,
        "One incident with its reports",
        auth="admin",
        response="Object",
        errors=(*_ADMIN, 404),
    ),
    Route(
        "GET",
        "/v1/admin/incidents/{incident_id}/suggestion",
        suggest,
        "A proposed fix",
        auth="admin",
        response="Object",
        errors=(*_ADMIN, 404),
    ),
    Route(
        "GET",
        "/v1/admin/remediations",
        list_remediations,
        "Remediations",
        auth="admin",
        response="List",
        errors=_ADMIN,
    ),
    Route(
        "POST",
        "/v1/admin/remediations",
        create_remediation,
        "Write a remediation (operator)",
        auth="admin",
        body="RemediationRequest",
        response="Object",
        status=201,
        errors=(400, *_ADMIN, 404, 413),
    ),
    Route(
        "POST",
        "/v1/admin/remediations/{remediation_id}/approve",
        approve,
        "Approve (not the author)",
        auth="admin",
        body="ApproveRequest",
        body_required=False,
        response="Object",
        errors=(400, *_ADMIN, 404, 409, 413),
    ),
    Route(
        "POST",
        "/v1/admin/me/key",
        register_key,
        "Register your own approval key",
        auth="admin",
        body="RegisterKeyRequest",
        response="KeyAnswer",
        errors=(400, 401, 409, 413),
    ),
    Route(
        "POST",
        "/v1/admin/remediations/{remediation_id}/revoke",
        revoke,
        "Revoke",
        auth="admin",
        response="Object",
        errors=(*_ADMIN, 404),
    ),
    Route(
        "POST",
        "/v1/admin/remediations/{remediation_id}/rollout",
        create_rollout,
        "Set a staged rollout (operator)",
        auth="admin",
        body="RolloutPlan",
        response="Object",
        status=201,
        errors=(400, *_ADMIN, 404, 409, 413),
    ),
    Route(
        "GET",
        "/v1/admin/rollouts",
        list_rollouts,
        "Rollouts with per-wave progress",
        auth="admin",
        response="List",
        errors=_ADMIN,
    ),
    Route(
        "GET",
        "/v1/admin/rollouts/{rollout_id}",
        get_rollout,
        "One rollout",
        auth="admin",
        response="Object",
        errors=(*_ADMIN, 404),
    ),
    Route(
        "POST",
        "/v1/admin/rollouts/{rollout_id}/pause",
        rollout_action,
        "Pause (operator)",
        auth="admin",
        response="Object",
        errors=(400, *_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/rollouts/{rollout_id}/resume",
        rollout_action,
        "Resume (approver)",
        auth="admin",
        response="Object",
        errors=(400, *_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/rollouts/{rollout_id}/revoke",
        rollout_action,
        "Revoke (approver)",
        auth="admin",
        response="Object",
        errors=(400, *_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/users",
        create_user,
        "Add a person (admin)",
        auth="admin",
        body="UserRequest",
        response="UserAnswer",
        status=201,
        errors=(400, *_ADMIN, 409, 413),
    ),
    Route(
        "POST",
        "/v1/admin/enrollment-tokens",
        create_enrollment_token,
        "A fleet enrollment token (admin)",
        auth="admin",
        body="EnrollmentTokenRequest",
        body_required=False,
        response="TokenAnswer",
        status=201,
        errors=(400, *_ADMIN, 413),
    ),
    Route(
        "GET",
        "/v1/admin/events",
        list_events,
        "The audit log",
        auth="admin",
        response="List",
        errors=(400, *_ADMIN),
        query=(
            ("device", "string", "only this device"),
            ("after", "integer", "entries after this sequence number"),
        ),
    ),
    Route(
        "GET",
        "/v1/admin/audit/verify",
        audit_verify,
        "Check the audit log's hash chain",
        auth="admin",
        response="AuditVerify",
        errors=(400, *_ADMIN),
        query=(("expect_head", "string", "a head SEQ:HASH recorded elsewhere"),),
    ),
)


def make_app(service: RecoveryService, *, poll_tick_s: float = POLL_TICK_S) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[POLL_TICK] = poll_tick_s
    app[METRICS] = metrics.HttpMetrics()
    changed = asyncio.Event()
    app[CHANGED] = changed

    def notify() -> None:
        # Wake every long poll once; they re-check the store and wait again.
        changed.set()
        changed.clear()

    service.on_change = notify
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.cleanup_ctx.append(_rollout_ticker)
    return app


async def _rollout_ticker(app: web.Application):
    """Soak time passes with no device event: re-judge active rollouts every second."""
    service = app[SERVICE]

    async def loop() -> None:
        while True:
            await asyncio.sleep(ROLLOUT_TICK_S)
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
