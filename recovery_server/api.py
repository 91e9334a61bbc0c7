"""The HTTP API's contract: what a route is, how a handler reads a request and writes an
answer, and the OpenAPI document made from the route table.

A route (``Route``) names its handler and the models of its body and its answer; the route
tables (``device_api.py``, ``admin_api.py``, and ``app.py`` for operations) register every
route with aiohttp and describe it here, so what is served and what is described cannot drift
apart. Bodies are read into their model (``read_body``), answers written from theirs
(``answer``). Schemathesis checks the live server against the document in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema

from recovery_agent.protocol.envelope import MalformedEnvelope, strict_json_loads
from recovery_agent.protocol.errors import describe_validation
from recovery_agent.protocol.wire import DeviceId

from . import metrics
from .access import User
from .changefeed import ChangeFeed
from .errors import BadRequest
from .listener import ConnectionLimits
from .service import RecoveryService

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What every handler reaches through its request's app.
SERVICE = web.AppKey("service", RecoveryService)
FEED = web.AppKey("feed", ChangeFeed)  # wakes the long polls of an incident whose fix changed
METRICS = web.AppKey("metrics", metrics.HttpMetrics)
LIMITS = web.AppKey("limits", ConnectionLimits)
# Who may read /metrics: a person with a token (any role), anyone, or no one.
MetricsAccess = Literal["token", "public", "off"]
METRICS_ACCESS = web.AppKey("metrics_access", str)
# The longest a long poll waits, in seconds (device_api.MAX_POLL_S unless the server says).
MAX_POLL = web.AppKey("max_poll_s", float)


@dataclass(frozen=True)
class Route:
    """One route: how aiohttp dispatches it and how the OpenAPI document describes it."""

    method: str
    path: str
    handler: Handler
    summary: str
    auth: str = "none"  # none | admin | poll
    body: type[BaseModel] | None = None
    body_required: bool = True
    response: type[BaseModel] | str | None = None  # a model, or a name in _PLAIN
    many: bool = False  # the answer is a list of ``response``
    status: int = 200
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, str, str], ...] = ()  # (name, type, description)
    content: str = "application/json"
    hidden: bool = False  # served, but not part of the API document


def service(request: web.Request) -> RecoveryService:
    return request.app[SERVICE]


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else None


def person(request: web.Request) -> User:
    """The person whose token the request carries; what they may do, the service decides."""
    return service(request).authenticate(bearer(request))


M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request, model: type[M]) -> M:
    """The JSON body as ``model`` (an empty body is ``{}``), or BadRequest naming the problem."""
    raw = await request.read()
    try:
        return model.model_validate(strict_json_loads(raw or b"{}"))
    except MalformedEnvelope as exc:
        raise BadRequest(f"request body: {exc}") from None
    except ValidationError as exc:
        raise BadRequest(f"request body does not fit {model.__name__}: {describe_validation(exc)}") from None


def answer(obj: BaseModel | Sequence[BaseModel], status: int = 200) -> web.Response:
    """A model, or a list of models, as the JSON answer."""
    if isinstance(obj, BaseModel):
        text = obj.model_dump_json()
    else:
        text = "[" + ",".join(item.model_dump_json() for item in obj) + "]"
    return web.Response(text=text, content_type="application/json", status=status)


def query_number(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        raise BadRequest(f"{name} must be a number") from None
    if not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number")
    return min(max(value, lo), hi)


class ChallengeRequest(BaseModel):
    """The body of ``POST /v1/challenge`` (the agent sends it as plain JSON)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    device_id: DeviceId


# ---------------------------------------------------------------- the document

# Answers that have no model in the protocol package: the error shape and the device API's
# small acknowledgements.
_PLAIN: dict[str, dict[str, Any]] = {
    "Any": {},
    "Error": {
        "type": "object",
        "required": ["error", "code"],
        "properties": {"error": {"type": "string"}, "code": {"type": "string"}},
    },
    "Healthz": {
        "type": "object",
        "required": ["status", "version"],
        "properties": {"status": {"type": "string"}, "version": {"type": "string"}},
    },
    "ServerKey": {
        "type": "object",
        "required": ["public_key", "key_id"],
        "properties": {"public_key": {"type": "string"}, "key_id": {"type": "string"}},
    },
    "EnrollAnswer": {
        "type": "object",
        "required": ["device_id", "key_id", "status"],
        "properties": {
            "device_id": {"type": "string"},
            "key_id": {"type": "string"},
            "status": {"enum": ["enrolled", "already_enrolled"]},
        },
    },
    "Recorded": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"enum": ["recorded", "duplicate"]}},
    },
    "Escrowed": {
        "type": "object",
        "required": ["status", "key_id", "replaced"],
        "properties": {
            "status": {"enum": ["escrowed"]},
            "key_id": {"type": "string"},
            "replaced": {"type": "array", "items": {"type": "string"}},
        },
    },
    "SignedEnvelope": {
        "type": "object",
        "required": ["payload", "payloadType", "signatures"],
        "properties": {
            "payload": {"type": "string"},
            "payloadType": {"type": "string"},
            "signatures": {"type": "array", "items": {"type": "object"}},
        },
    },
}

_STATUS_TEXT = {
    400: "Malformed or refused request",
    401: "Not authenticated",
    403: "Refused: a role too low, or a rule that says no (the error says which)",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "Body too large",
    429: "Too many messages from this device: wait Retry-After seconds",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _schemas(routes: Sequence[Route]) -> dict[str, Any]:
    """Every model the routes name: bodies as they are read, answers as they are written."""
    models: dict[tuple[type[BaseModel], str], None] = {}
    for r in routes:
        if r.body is not None:
            models[(r.body, "validation")] = None
        if isinstance(r.response, type):
            models[(r.response, "serialization")] = None
    _, defs = models_json_schema(list(models), ref_template="#/components/schemas/{model}")  # type: ignore[arg-type]
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    schemas.update(_PLAIN)
    # The action's "type" has a default in Python but is what tells actions apart on the wire.
    for name in ("QuarantineFile", "RestoreFile", "DisableDriver"):
        schemas[name].setdefault("required", []).insert(0, "type")
    # A wave is either a canary list or a percentage.
    schemas["Wave"]["oneOf"] = [
        {"required": ["percent"], "properties": {"devices": {"maxItems": 0}}},
        {"required": ["devices"], "properties": {"devices": {"minItems": 1}, "percent": {"type": "null"}}},
    ]
    return schemas


def openapi_document(routes: Sequence[Route], version: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in routes:
        if r.hidden:
            continue
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": r.handler.__name__
            + "_"
            + r.path.rsplit("/", 1)[-1].strip("{}").replace("-", "_").replace(".", "_"),
        }
        params = [
            {"name": n.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
            for n in r.path.split("/")
            if n.startswith("{")
        ]
        params += [
            {"name": n, "in": "query", "required": False, "description": d, "schema": {"type": t}}
            for n, t, d in r.query
        ]
        if params:
            op["parameters"] = params
        if r.body:
            op["requestBody"] = {
                "required": r.body_required,
                "content": {"application/json": {"schema": _ref(r.body.__name__)}},
            }
        if r.auth == "admin":
            op["security"] = [{"adminToken": []}]
        elif r.auth == "poll":
            op["security"] = [{"pollToken": []}]
        if r.response is None:
            ok_schema: dict[str, Any] = {"type": "string"}
        else:
            ok_schema = _ref(r.response if isinstance(r.response, str) else r.response.__name__)
            if r.many:
                ok_schema = {"type": "array", "items": ok_schema}
        responses: dict[str, Any] = {
            str(r.status): {"description": "OK", "content": {r.content: {"schema": ok_schema}}}
        }
        for status in r.errors:
            responses[str(status)] = {
                "description": _STATUS_TEXT[status],
                "content": {"application/json": {"schema": _ref("Error")}},
            }
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Quick Machine Recovery server",
            "version": version,
            "description": "Device API (signed envelopes) and admin API (per-person Bearer tokens).",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(routes),
            "securitySchemes": {
                "adminToken": {"type": "http", "scheme": "bearer", "description": "a person's token"},
                "pollToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the poll_token from the diagnostics receipt",
                },
            },
        },
    }
