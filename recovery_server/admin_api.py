"""The admin API under ``/v1/admin``: a person's Bearer token, their request read into its
model, one call to the service (which asks ``access.py`` whether they may), the answer
written from its model. The models are the protocol's (``recovery_agent.protocol.admin``),
shared with ``recovery-admin`` and the tests.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from aiohttp import web

from recovery_agent.protocol.admin import (
    INCIDENT_REPORTS_PAGE,
    INCIDENT_REPORTS_PAGE_MAX,
    LIST_PAGE,
    LIST_PAGE_MAX,
    ApproveRequest,
    AuditEntry,
    AuditReport,
    Correlation,
    Device,
    DeviceDetail,
    DeviceKeyRequest,
    DiskKeysView,
    EnrollmentToken,
    EnrollmentTokenInfo,
    EnrollmentTokenRequest,
    Incident,
    IncidentDetail,
    IncidentSummary,
    IncidentTimeline,
    NewUser,
    RegisteredKey,
    RegisterKeyRequest,
    Remediation,
    RemediationRequest,
    Rollout,
    RolloutPlan,
    Rule,
    RuleRequest,
    Suggestion,
    UserRequest,
    Whoami,
)

from .api import Route, answer, person, read_body, service
from .errors import BadRequest


async def whoami(request: web.Request) -> web.Response:
    user = person(request)
    return answer(Whoami(name=user.name, role=user.role))


def _page(request: web.Request, default: int, most: int) -> int:
    """The ``limit`` a list was asked for, a whole number; taken as 1 to ``most``."""
    text = request.query.get("limit", str(default))
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest(f"limit must be a whole number (at most {most} are given at once)")
    return min(max(int(text), 1), most)


def _after_id(request: web.Request) -> str:
    """The ``after`` of a list ordered by an id: where its page starts."""
    after = request.query.get("after", "")
    if len(after) > 256:
        raise BadRequest("after must be an id from the last page (at most 256 characters)")
    return after


async def list_devices(request: web.Request) -> web.Response:
    user, limit, after = person(request), _page(request, LIST_PAGE, LIST_PAGE_MAX), _after_id(request)
    return answer(service(request).devices(user, limit, after))


async def get_device(request: web.Request) -> web.Response:
    return answer(service(request).device(person(request), request.match_info["device_id"]))


async def list_incidents(request: web.Request) -> web.Response:
    return answer(service(request).incidents(person(request)))


async def get_incident(request: web.Request) -> web.Response:
    # A page of reports with their diagnostics: parsed in a thread, the devices' requests go on.
    user, incident_id = person(request), request.match_info["incident_id"]
    limit = _page(request, INCIDENT_REPORTS_PAGE, INCIDENT_REPORTS_PAGE_MAX)
    after = _after_id(request) or None
    return answer(await asyncio.to_thread(service(request).incident, user, incident_id, limit, after))


async def incident_summary(request: web.Request) -> web.Response:
    # Its device list reads every report's device id: a tenth of a second at 100,000 reports.
    user, incident_id = person(request), request.match_info["incident_id"]
    return answer(await asyncio.to_thread(service(request).incident_summary, user, incident_id))


async def incident_timeline(request: web.Request) -> web.Response:
    # Counted by the database per bucket, still a pass over the incident's reports: off the loop.
    user, incident_id = person(request), request.match_info["incident_id"]
    return answer(await asyncio.to_thread(service(request).incident_timeline, user, incident_id))


async def suggest(request: web.Request) -> web.Response:
    # It reads every report of the incident (seconds at 100,000 devices): off the event loop.
    user, incident_id = person(request), request.match_info["incident_id"]
    return answer(await asyncio.to_thread(service(request).suggest_actions, user, incident_id))


async def correlation(request: web.Request) -> web.Response:
    # It reads every report of the incident: seconds at 100,000 devices, off the event loop.
    user, incident_id = person(request), request.match_info["incident_id"]
    return answer(await asyncio.to_thread(service(request).correlation, user, incident_id))


async def list_remediations(request: web.Request) -> web.Response:
    return answer(service(request).remediations(person(request)))


async def create_remediation(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, RemediationRequest)
    rem = service(request).create_remediation(
        user,
        title=body.title,
        actions=body.actions,
        incident_id=body.incident_id,
        required_approvals=body.required_approvals,
    )
    return answer(rem, status=201)


async def approve(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, ApproveRequest)
    signed = body.signed.model_dump() if body.signed else None
    return answer(service(request).approve(user, request.match_info["remediation_id"], signed))


async def create_rule(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, RuleRequest)
    return answer(service(request).create_rule(user, body), status=201)


async def list_rules(request: web.Request) -> web.Response:
    return answer(service(request).rules(person(request)))


async def approve_rule(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, ApproveRequest)
    signed = body.signed.model_dump() if body.signed else None
    return answer(service(request).approve_rule(user, request.match_info["rule_id"], signed))


async def revoke_rule(request: web.Request) -> web.Response:
    return answer(service(request).revoke_rule(person(request), request.match_info["rule_id"]))


async def register_key(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, RegisterKeyRequest)
    return answer(service(request).register_key(user, body.public_key))


async def revoke(request: web.Request) -> web.Response:
    return answer(service(request).revoke(person(request), request.match_info["remediation_id"]))


async def create_user(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, UserRequest)
    return answer(service(request).create_user(user, body.name, body.role), status=201)


async def create_enrollment_token(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, EnrollmentTokenRequest)
    token = service(request).create_enrollment_token(
        user, body.label, timedelta(seconds=body.expires_in_s), body.max_uses
    )
    return answer(token, status=201)


async def list_enrollment_tokens(request: web.Request) -> web.Response:
    return answer(service(request).enrollment_tokens(person(request)))


async def revoke_enrollment_token(request: web.Request) -> web.Response:
    return answer(service(request).revoke_enrollment_token(person(request), request.match_info["token_id"]))


async def revoke_device(request: web.Request) -> web.Response:
    return answer(service(request).revoke_device(person(request), request.match_info["device_id"]))


async def request_recovery_test(request: web.Request) -> web.Response:
    cancel = request.query.get("cancel", "") in ("1", "true")
    return answer(
        service(request).request_recovery_test(
            person(request), request.match_info["device_id"], cancel=cancel
        )
    )


async def disk_keys(request: web.Request) -> web.Response:
    return answer(service(request).disk_keys(person(request), request.match_info["device_id"]))


async def revoke_disk_keys(request: web.Request) -> web.Response:
    return answer(service(request).revoke_disk_keys(person(request), request.match_info["device_id"]))


async def approve_key_release(request: web.Request) -> web.Response:
    return answer(
        service(request).decide_key_release(person(request), request.match_info["release_id"], True)
    )


async def refuse_key_release(request: web.Request) -> web.Response:
    return answer(
        service(request).decide_key_release(person(request), request.match_info["release_id"], False)
    )


async def replace_device_key(request: web.Request) -> web.Response:
    user = person(request)
    body = await read_body(request, DeviceKeyRequest)
    return answer(service(request).replace_device_key(user, request.match_info["device_id"], body.public_key))


async def list_events(request: web.Request) -> web.Response:
    user = person(request)
    text = request.query.get("after", "0")
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise BadRequest("after must be an event number (a whole number)")
    limit = _page(request, LIST_PAGE, LIST_PAGE_MAX)
    return answer(service(request).events(user, request.query.get("device"), int(text), limit))


async def audit_verify(request: web.Request) -> web.Response:
    return answer(service(request).verify_audit(person(request), request.query.get("expect_head")))


async def create_rollout(request: web.Request) -> web.Response:
    user = person(request)
    plan = await read_body(request, RolloutPlan)
    return answer(
        service(request).create_rollout(user, request.match_info["remediation_id"], plan), status=201
    )


async def list_rollouts(request: web.Request) -> web.Response:
    return answer(service(request).rollouts(person(request)))


async def get_rollout(request: web.Request) -> web.Response:
    return answer(service(request).rollout(person(request), request.match_info["rollout_id"]))


async def rollout_action(request: web.Request) -> web.Response:
    action = request.path.rsplit("/", 1)[1]  # the route names it: pause, resume or revoke
    return answer(
        service(request).set_rollout_state(person(request), request.match_info["rollout_id"], action)
    )


_ADMIN = (401, 403)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/admin/whoami", whoami, "The caller", auth="admin", response=Whoami, errors=(401,)),
    Route(
        "GET",
        "/v1/admin/devices",
        list_devices,
        "Devices, by id, a page at a time",
        auth="admin",
        response=Device,
        many=True,
        errors=(400, *_ADMIN),
        query=(
            ("limit", "integer", f"devices per page (default {LIST_PAGE}, at most {LIST_PAGE_MAX})"),
            ("after", "string", "the last device id of the previous page"),
        ),
    ),
    Route(
        "GET",
        "/v1/admin/devices/{device_id}",
        get_device,
        "One device with its latest reports, directives and results (200 of each at most)",
        auth="admin",
        response=DeviceDetail,
        errors=(*_ADMIN, 404),
    ),
    Route(
        "POST",
        "/v1/admin/devices/{device_id}/revoke",
        revoke_device,
        "Revoke a device: its messages are refused, its outcomes no longer count (admin)",
        auth="admin",
        response=Device,
        errors=(*_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/devices/{device_id}/recovery-test",
        request_recovery_test,
        "Ask a device to test its recovery path at its next boot (test mode; operator)",
        auth="admin",
        response=Device,
        errors=(*_ADMIN, 404, 409),
        query=(("cancel", "string", "1: take the request back"),),
    ),
    Route(
        "GET",
        "/v1/admin/devices/{device_id}/disk-keys",
        disk_keys,
        "A device's escrowed disk keys (never the keys) and every release",
        auth="admin",
        response=DiskKeysView,
        errors=(*_ADMIN, 404),
    ),
    Route(
        "POST",
        "/v1/admin/devices/{device_id}/disk-keys/revoke",
        revoke_disk_keys,
        "End a device's escrowed disk keys: none is released again (approver)",
        auth="admin",
        response=DiskKeysView,
        errors=(*_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/key-releases/{release_id}/approve",
        approve_key_release,
        "Release a disk key the device asked for in recovery (approver)",
        auth="admin",
        response=DiskKeysView,
        errors=(*_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/key-releases/{release_id}/refuse",
        refuse_key_release,
        "Refuse to release a disk key the device asked for (approver)",
        auth="admin",
        response=DiskKeysView,
        errors=(*_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/devices/{device_id}/key",
        replace_device_key,
        "Give a known device a new key: a reinstalled machine, or an id another took first (admin)",
        auth="admin",
        body=DeviceKeyRequest,
        response=Device,
        errors=(400, *_ADMIN, 404, 409, 413),
    ),
    Route(
        "GET",
        "/v1/admin/incidents",
        list_incidents,
        "Incidents",
        auth="admin",
        response=Incident,
        many=True,
        errors=_ADMIN,
    ),
    Route(
        "GET",
        "/v1/admin/incidents/{incident_id}",
        get_incident,
        "One incident with a page of its reports, oldest first",
        auth="admin",
        response=IncidentDetail,
        errors=(400, *_ADMIN, 404),
        query=(
            (
                "limit",
                "integer",
                f"reports per page (default {INCIDENT_REPORTS_PAGE}, at most {INCIDENT_REPORTS_PAGE_MAX})",
            ),
            ("after", "string", "the report id the previous page gave as next_after"),
        ),
    ),
    Route(
        "GET",
        "/v1/admin/incidents/{incident_id}/summary",
        incident_summary,
        "One incident with the crash of its first report, not every report",
        auth="admin",
        response=IncidentSummary,
        errors=(*_ADMIN, 404),
    ),
    Route(
        "GET",
        "/v1/admin/incidents/{incident_id}/timeline",
        incident_timeline,
        "Its reports, directives and outcomes over time (at most 120 buckets), approvals and rollouts",
        auth="admin",
        response=IncidentTimeline,
        errors=(*_ADMIN, 404),
    ),
    Route(
        "GET",
        "/v1/admin/incidents/{incident_id}/suggestion",
        suggest,
        "A proposed fix",
        auth="admin",
        response=Suggestion,
        errors=(*_ADMIN, 404),
    ),
    Route(
        "GET",
        "/v1/admin/incidents/{incident_id}/correlation",
        correlation,
        "The files over-represented among the incident's devices against healthy ones",
        auth="admin",
        response=Correlation,
        errors=(*_ADMIN, 404),
    ),
    Route(
        "GET",
        "/v1/admin/remediations",
        list_remediations,
        "Remediations",
        auth="admin",
        response=Remediation,
        many=True,
        errors=_ADMIN,
    ),
    Route(
        "POST",
        "/v1/admin/remediations",
        create_remediation,
        "Write a remediation (operator)",
        auth="admin",
        body=RemediationRequest,
        response=Remediation,
        status=201,
        errors=(400, *_ADMIN, 404, 413),
    ),
    Route(
        "POST",
        "/v1/admin/remediations/{remediation_id}/approve",
        approve,
        "Approve (not the author)",
        auth="admin",
        body=ApproveRequest,
        body_required=False,
        response=Remediation,
        errors=(400, *_ADMIN, 404, 409, 413),
    ),
    Route(
        "POST",
        "/v1/admin/me/key",
        register_key,
        "Register your own approval key",
        auth="admin",
        body=RegisterKeyRequest,
        response=RegisteredKey,
        errors=(400, 401, 409, 413),
    ),
    Route(
        "POST",
        "/v1/admin/remediations/{remediation_id}/revoke",
        revoke,
        "Revoke",
        auth="admin",
        response=Remediation,
        errors=(*_ADMIN, 404),
    ),
    Route(
        "GET",
        "/v1/admin/rules",
        list_rules,
        "Known-bad rules: content judged bad once, fixed everywhere after with no new approval",
        auth="admin",
        response=Rule,
        many=True,
        errors=_ADMIN,
    ),
    Route(
        "POST",
        "/v1/admin/rules",
        create_rule,
        "Publish a known-bad rule (operator); active once approved like a remediation",
        auth="admin",
        body=RuleRequest,
        response=Rule,
        status=201,
        errors=(400, *_ADMIN, 413),
    ),
    Route(
        "POST",
        "/v1/admin/rules/{rule_id}/approve",
        approve_rule,
        "Approve a known-bad rule (not its author; signed RuleApproval once you registered a key)",
        auth="admin",
        body=ApproveRequest,
        body_required=False,
        response=Rule,
        errors=(400, *_ADMIN, 404, 409, 413),
    ),
    Route(
        "POST",
        "/v1/admin/rules/{rule_id}/revoke",
        revoke_rule,
        "Revoke a known-bad rule and every remediation made from it (approver)",
        auth="admin",
        response=Rule,
        errors=(*_ADMIN, 404, 409),
    ),
    Route(
        "POST",
        "/v1/admin/remediations/{remediation_id}/rollout",
        create_rollout,
        "Set a staged rollout (operator)",
        auth="admin",
        body=RolloutPlan,
        response=Rollout,
        status=201,
        errors=(400, *_ADMIN, 404, 409, 413),
    ),
    Route(
        "GET",
        "/v1/admin/rollouts",
        list_rollouts,
        "Rollouts with per-wave progress",
        auth="admin",
        response=Rollout,
        many=True,
        errors=_ADMIN,
    ),
    Route(
        "GET",
        "/v1/admin/rollouts/{rollout_id}",
        get_rollout,
        "One rollout",
        auth="admin",
        response=Rollout,
        errors=(*_ADMIN, 404),
    ),
    *(
        Route(
            "POST",
            f"/v1/admin/rollouts/{{rollout_id}}/{action}",
            rollout_action,
            summary,
            auth="admin",
            response=Rollout,
            errors=(400, *_ADMIN, 404, 409),
        )
        for action, summary in (
            ("pause", "Pause (operator)"),
            ("resume", "Resume (approver)"),
            ("revoke", "Revoke (approver)"),
        )
    ),
    Route(
        "POST",
        "/v1/admin/users",
        create_user,
        "Add a person (admin)",
        auth="admin",
        body=UserRequest,
        response=NewUser,
        status=201,
        errors=(400, *_ADMIN, 409, 413),
    ),
    Route(
        "POST",
        "/v1/admin/enrollment-tokens",
        create_enrollment_token,
        "A fleet enrollment token (admin)",
        auth="admin",
        body=EnrollmentTokenRequest,
        body_required=False,
        response=EnrollmentToken,
        status=201,
        errors=(400, *_ADMIN, 413),
    ),
    Route(
        "GET",
        "/v1/admin/enrollment-tokens",
        list_enrollment_tokens,
        "Enrollment tokens: expiry, uses, state (admin)",
        auth="admin",
        response=EnrollmentTokenInfo,
        many=True,
        errors=_ADMIN,
    ),
    Route(
        "POST",
        "/v1/admin/enrollment-tokens/{token_id}/revoke",
        revoke_enrollment_token,
        "Revoke an enrollment token (admin)",
        auth="admin",
        response=EnrollmentTokenInfo,
        errors=(*_ADMIN, 404, 409),
    ),
    Route(
        "GET",
        "/v1/admin/events",
        list_events,
        "The audit log",
        auth="admin",
        response=AuditEntry,
        many=True,
        errors=(400, *_ADMIN),
        query=(
            ("device", "string", "only this device"),
            ("after", "integer", "entries after this sequence number"),
            ("limit", "integer", f"entries per page (default {LIST_PAGE}, at most {LIST_PAGE_MAX})"),
        ),
    ),
    Route(
        "GET",
        "/v1/admin/audit/verify",
        audit_verify,
        "Check the audit log's hash chain",
        auth="admin",
        response=AuditReport,
        errors=(400, *_ADMIN),
        query=(("expect_head", "string", "a head SEQ:HASH recorded elsewhere"),),
    ),
)
