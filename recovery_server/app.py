"""The recovery server's HTTP surface (aiohttp): the device API under /v1
(``device_api.py``), the admin API under /v1/admin (``admin_api.py``), and the operations
routes here: ``/healthz``, ``/metrics`` (Prometheus text; a person's token by default, see
``make_app``), ``/openapi.json`` and the dashboard at ``/``. Handlers only translate HTTP to
``RecoveryService`` calls; the rules live there. ``ROUTES`` registers every route and
describes it for the OpenAPI document (``api.py``), so the two cannot drift apart. ``runner``
serves the app with its connection limits (``listener.py``).

Every refusal is answered as JSON, ``{"error": ..., "code": ...}``, with the status of the
service's error (``errors.py``), in at most ``MAX_ERROR_CHARS`` characters whatever the request
was; every answer is counted for ``/metrics`` by route template.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from recovery_agent.protocol.envelope import MalformedEnvelope
from recovery_agent.protocol.version import __version__

from . import admin_api, dashboard, device_api, metrics
from .access import console
from .api import (
    FEED,
    LIMITS,
    MAX_POLL,
    METRICS,
    METRICS_ACCESS,
    SERVICE,
    Handler,
    MetricsAccess,
    Route,
    openapi_document,
    person,
    service,
)
from .changefeed import ChangeFeed
from .errors import NotFound, ServiceError, TooManyRequests
from .listener import ConnectionLimits, GuardedRunner
from .retention import Pruned
from .service import RecoveryService

log = logging.getLogger("recovery_server")

MAX_BODY = 1 << 20
# The change feed reads the audit log this often even when this process changed nothing: another
# server process may have approved, or promoted a rollout (changefeed.py). One read per process.
POLL_TICK_S = 1.0
ROLLOUT_TICK_S = 1.0
PRUNE_EVERY_S = 3600.0


# An error answer says what is wrong in a sentence or two: never more than this, whatever the
# request was (errors.py messages are short; a pydantic summary lists a few problems).
MAX_ERROR_CHARS = 1000


def _error(status: int, code: str, message: str) -> web.Response:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 1] + "…"
    return web.json_response({"error": message, "code": code}, status=status)


class _BodyTooSlow(Exception):
    """Raised when a request's body did not arrive within the body timeout."""


async def _read_body(request: web.Request) -> None:
    limit = request.app[LIMITS].body_timeout_s
    try:
        async with asyncio.timeout(limit):  # no task of its own, unlike wait_for
            await request.read()
    except TimeoutError:
        raise _BodyTooSlow(
            f"the request body did not arrive within {limit:g} s: send it whole, at once"
        ) from None


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        if request.body_exists:  # read it here, under the body deadline; handlers get it read
            await _read_body(request)
        response = await handler(request)
    except TooManyRequests as exc:
        response = _error(exc.status, exc.code, str(exc))
        response.headers["Retry-After"] = str(exc.retry_after_s)
    except ServiceError as exc:
        response = _error(exc.status, exc.code, str(exc))
    except _BodyTooSlow as exc:
        request.app[METRICS].timeouts["body"] += 1
        response = _error(408, "request_timeout", str(exc))
        response.force_close()
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
    except Exception:  # a bug: say so in JSON, log it, keep the details out of the answer
        log.exception("%s %s failed", request.method, request.path[:200])
        response = _error(500, "internal", "the server failed on this request and logged why")
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    request.app[METRICS].observe(request.method, route, response.status, time.perf_counter() - started)
    return response


# ---------------------------------------------------------------- operations


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def metrics_text(request: web.Request) -> web.Response:
    access = request.app[METRICS_ACCESS]
    if access == "off":
        raise NotFound("metrics are off on this server: start it with --metrics token (or public)")
    if access == "token":
        service(request).check_metrics_reader(person(request))
    text = metrics.render(service(request), request.app[METRICS])
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def openapi_json(request: web.Request) -> web.Response:
    access = request.app[METRICS_ACCESS]
    routes = [
        dataclasses.replace(r, auth="none" if access == "public" else r.auth, hidden=access == "off")
        if r.handler is metrics_text
        else r
        for r in ROUTES
    ]
    return web.json_response(openapi_document(routes, __version__))


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

ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", healthz, "Liveness", response="Healthz"),
    Route(
        "GET",
        "/metrics",
        metrics_text,
        "Prometheus metrics (a person's token, unless the server serves them publicly)",
        auth="admin",
        content="text/plain",
        errors=(401, 403),
    ),
    Route("GET", "/openapi.json", openapi_json, "This document", response="Any"),
    Route("GET", "/", dashboard_page, "The dashboard", content="text/html", hidden=True),
    Route("GET", "/dashboard.js", dashboard_js, "The dashboard", hidden=True),
    Route("GET", "/dashboard.css", dashboard_css, "The dashboard", hidden=True),
    *device_api.ROUTES,
    *admin_api.ROUTES,
)


def make_app(
    service: RecoveryService,
    *,
    poll_tick_s: float = POLL_TICK_S,
    limits: ConnectionLimits | None = None,
    metrics_access: MetricsAccess = "token",
    max_poll_s: float = device_api.MAX_POLL_S,
) -> web.Application:
    """The server's app. Serve it with ``runner`` (connections held to ``limits``).
    ``metrics_access`` says who may read /metrics: a person with a token, anyone, or no one;
    ``max_poll_s`` how long a long poll may wait."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[SERVICE] = service
    app[LIMITS] = limits or ConnectionLimits()
    app[METRICS_ACCESS] = metrics_access
    app[MAX_POLL] = max_poll_s
    app[METRICS] = metrics.HttpMetrics()
    feed = app[FEED] = ChangeFeed(service.store, poll_tick_s)
    service.on_change = feed.poke
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    app.cleanup_ctx.append(_change_feed)
    app.cleanup_ctx.append(_group_commit)
    app.cleanup_ctx.append(_rollout_ticker)
    app.cleanup_ctx.append(_retention)
    return app


def runner(app: web.Application, **kwargs: Any) -> GuardedRunner:
    """The runner for ``make_app``'s app: aiohttp's, with the app's connection limits enforced
    (``listener.py``); ``kwargs`` go to aiohttp's runner."""
    return GuardedRunner(app, app[LIMITS], app[METRICS], **kwargs)


async def _retention(app: web.Application) -> AsyncIterator[None]:
    """Prune what retention allows (retention.py) every PRUNE_EVERY_S, in a thread: a prune
    runs in short transactions, and requests keep being served between them."""
    service = app[SERVICE]
    running: asyncio.Task[Pruned] | None = None

    async def loop() -> None:
        nonlocal running
        while True:
            await asyncio.sleep(PRUNE_EVERY_S)
            if service.settings.report_retention is not None:
                prune = running = asyncio.create_task(asyncio.to_thread(service.prune, console("server")))
                try:
                    await asyncio.shield(prune)
                except Exception:  # a failed prune must not stop the next ones
                    log.exception("retention prune failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if running is not None:  # let a prune in its thread finish before the store closes
        with contextlib.suppress(Exception):
            await running


async def _group_commit(app: web.Application) -> AsyncIterator[None]:
    """At shutdown, let the reports already handed to the writer commit (groupcommit.py)."""
    yield
    await app[SERVICE].commits.drain()


async def _change_feed(app: web.Application) -> AsyncIterator[None]:
    """The long polls' change feed (changefeed.py), read while the app serves."""
    feed = app[FEED]
    feed.start()
    task = asyncio.create_task(feed.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _rollout_ticker(app: web.Application) -> AsyncIterator[None]:
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
