"""The shapes of the admin API's request bodies, and the OpenAPI document of the whole API.

The document is made from the route table in ``app.py`` and the pydantic models (the wire
protocol's and the ones below), so what is served and what is described are the same thing.
Schemathesis checks the live server against it in the tests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from recovery_agent.protocol.wire import Action, Challenge, DiagnosticsReceipt, DirectivePoll, Identifier

from .rollout import RolloutPlan


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChallengeRequest(_Request):
    device_id: str = Field(min_length=1, max_length=64)


class RemediationRequest(_Request):
    title: str = Field(min_length=1, max_length=256)
    incident_id: Identifier | None = None
    actions: list[Action] = Field(min_length=1, max_length=64)
    required_approvals: int = Field(default=1, ge=1, le=16)


class UserRequest(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    role: Literal["viewer", "operator", "approver", "admin"]


class EnrollmentTokenRequest(_Request):
    label: str = Field(default="fleet", min_length=1, max_length=64)


class RegisterKeyRequest(_Request):
    public_key: str = Field(pattern=r"^[A-Za-z0-9+/]{43}=$", description="raw Ed25519 key, base64")


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keyid: str
    sig: str


class Envelope(BaseModel):
    """A DSSE envelope: base64 payload, its type, and Ed25519 signatures over PAE(type, payload)."""

    model_config = ConfigDict(extra="forbid")

    payload: str
    payloadType: str
    signatures: list[Signature] = Field(min_length=1, max_length=8)


class ApproveRequest(_Request):
    signed: Envelope | None = Field(
        default=None,
        description="the approver's own signed RemediationApproval; required once they registered a key",
    )


_MODELS: dict[str, type[BaseModel]] = {
    "ChallengeRequest": ChallengeRequest,
    "RemediationRequest": RemediationRequest,
    "UserRequest": UserRequest,
    "EnrollmentTokenRequest": EnrollmentTokenRequest,
    "Envelope": Envelope,
    "Signature": Signature,
    "ApproveRequest": ApproveRequest,
    "RegisterKeyRequest": RegisterKeyRequest,
    "Challenge": Challenge,
    "DiagnosticsReceipt": DiagnosticsReceipt,
    "DirectivePoll": DirectivePoll,
    "RolloutPlan": RolloutPlan,
}

_PLAIN: dict[str, dict[str, Any]] = {
    "Any": {},
    "Object": {"type": "object"},
    "List": {"type": "array", "items": {"type": "object"}},
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
    "Whoami": {
        "type": "object",
        "required": ["name", "role"],
        "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
    },
    "UserAnswer": {
        "type": "object",
        "required": ["name", "role", "token"],
        "properties": {"name": {"type": "string"}, "role": {"type": "string"}, "token": {"type": "string"}},
    },
    "KeyAnswer": {
        "type": "object",
        "required": ["name", "key_id"],
        "properties": {"name": {"type": "string"}, "key_id": {"type": "string"}},
    },
    "TokenAnswer": {
        "type": "object",
        "required": ["token", "label"],
        "properties": {"token": {"type": "string"}, "label": {"type": "string"}},
    },
    "AuditVerify": {
        "type": "object",
        "required": ["ok", "entries", "head", "problems"],
        "properties": {
            "ok": {"type": "boolean"},
            "entries": {"type": "integer"},
            "head": {"type": "string"},
            "problems": {"type": "array", "items": {"type": "string"}},
        },
    },
}

_STATUS_TEXT = {
    400: "Malformed or refused request",
    401: "Not authenticated",
    403: "Role too low",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "Body too large",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document(routes, version: str) -> dict[str, Any]:
    _, defs = models_json_schema(
        [(m, "validation") for m in _MODELS.values()], ref_template="#/components/schemas/{model}"
    )
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
                "content": {"application/json": {"schema": _ref(r.body)}},
            }
        if r.auth == "admin":
            op["security"] = [{"adminToken": []}]
        elif r.auth == "poll":
            op["security"] = [{"pollToken": []}]
        ok_schema = _ref(r.response) if r.response else {"type": "string"}
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
            "schemas": schemas,
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
