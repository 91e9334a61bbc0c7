"""The admin API (``/v1/admin``): its messages and its client, shared by the server (which
answers with these models and describes them in its OpenAPI document), ``recovery-admin``,
the lab and the tests.

- Requests (``*Request``, ``RolloutPlan``) forbid unknown fields: a typo is refused, not
  ignored.
- Answers (``Incident``, ``Remediation``, ``Rollout``, ``AuditEntry``...) are the server's read
  views. They ignore fields they do not know, so an older client still reads a newer server.
- ``AdminClient`` has one typed method per route and returns these models; a person's token
  rides on the same transport (and retry rules) as the device client's.

Times are UTC; identifiers are the server's (``INC-``, ``rem-``, ``ro-``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .client import HttpClient
from .errors import ProtocolError
from .wire import (
    REMEDIATION_ACTIONS,
    Action,
    CrashKind,
    CrashSignature,
    DeviceId,
    Diagnostics,
    Identifier,
    check_path_pattern,
)

Role = Literal["viewer", "operator", "approver", "admin"]
DeviceState = Literal["healthy", "recovering", "needs_manual", "remediated", "remediation_failed"]
RemediationStatus = Literal["pending", "approved", "revoked"]
RolloutState = Literal["active", "paused", "halted", "completed", "revoked"]
RolloutAction = Literal["pause", "resume", "revoke"]
EnrollmentTokenState = Literal["active", "expired", "used_up", "revoked"]

# An enrollment token lives a day unless its admin says otherwise: long enough to enroll a
# batch of machines, short enough that a token left in a script or an image stops working.
DEFAULT_TOKEN_LIFETIME_S = 24 * 3600
MAX_TOKEN_LIFETIME_S = 365 * 24 * 3600

# The dashboard's pages stay bounded whatever the fleet's size: an incident's timeline has at
# most this many buckets, a device page at most this many of each kind of row.
MAX_TIMELINE_BUCKETS = 120
MAX_DEVICE_ROWS = 200

# Fleet-sized answers come in bounded parts: a person's read must not stall the devices.
# An incident names at most this many of its devices (the first by id); the total counts all.
INCIDENT_DEVICES_SHOWN = 100
# An incident's reports, with their diagnostics, per page: by default and at most.
INCIDENT_REPORTS_PAGE = 50
INCIDENT_REPORTS_PAGE_MAX = 500
# Devices and audit entries per page of their lists: by default and at most.
LIST_PAGE = 1000
LIST_PAGE_MAX = 10_000


# --------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class RemediationRequest(_Request):
    title: str = Field(min_length=1, max_length=256)
    incident_id: Identifier | None = None
    actions: list[Action] = Field(min_length=1, max_length=64)
    required_approvals: int = Field(default=1, ge=1, le=16)

    @field_validator("actions")
    @classmethod
    def _no_test_action(cls, actions: list[Action]) -> list[Action]:
        if any(a.type not in REMEDIATION_ACTIONS for a in actions):
            raise ValueError(
                "a remediation cannot hold a recovery_test action: the server makes those for a "
                "device's recovery test (recovery-admin device test DEVICE)"
            )
        return actions


class UserRequest(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    role: Role


class EnrollmentTokenRequest(_Request):
    label: str = Field(default="fleet", min_length=1, max_length=64)
    # Strict: a whole number, not true or "600".
    expires_in_s: int = Field(
        default=DEFAULT_TOKEN_LIFETIME_S,
        strict=True,
        ge=60,
        le=MAX_TOKEN_LIFETIME_S,
        description="seconds until the token stops enrolling devices (default a day, at most a year)",
    )
    max_uses: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=1_000_000,
        description="devices it may enroll; none: any number until it expires",
    )


class DeviceKeyRequest(_Request):
    """An admin gives a device a new key (a reinstalled machine, or an id another took first)."""

    public_key: str = Field(pattern=r"^[A-Za-z0-9+/]{43}=$", description="raw Ed25519 key, base64")


class RegisterKeyRequest(_Request):
    public_key: str = Field(pattern=r"^[A-Za-z0-9+/]{43}=$", description="raw Ed25519 key, base64")


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    keyid: str
    sig: str


class Envelope(BaseModel):
    """A DSSE envelope: base64 payload, its type, and Ed25519 signatures over PAE(type, payload)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    payload: str
    payloadType: str
    signatures: list[Signature] = Field(min_length=1, max_length=8)


class ApproveRequest(_Request):
    signed: Envelope | None = Field(
        default=None,
        description="the approver's own signed RemediationApproval (RuleApproval for a known-bad "
        "rule); required once they registered a key",
    )


class Wave(BaseModel):
    """One wave of a rollout: a canary list of devices, or a percentage of the fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64)
    devices: list[DeviceId] = Field(default=[], max_length=1000)
    percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _one_rule(self) -> Wave:
        if bool(self.devices) == (self.percent is not None):
            raise ValueError(f"wave {self.name!r}: give either devices (a canary list) or percent")
        return self


class RolloutPlan(BaseModel):
    """The waves of a staged rollout and the gate between them (the server's rollout.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    waves: list[Wave] = Field(min_length=1, max_length=16)
    min_devices: int = Field(default=1, ge=1)
    min_success_rate: float = Field(default=0.95, ge=0, le=1)
    soak_s: float = Field(default=0, ge=0)
    halt_failure_rate: float = Field(default=0.2, ge=0, le=1)
    halt_min_devices: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _growing(self) -> RolloutPlan:
        last = 0.0
        for w in self.waves:
            if w.percent is not None:
                if w.percent <= last:
                    raise ValueError(f"wave {w.name!r}: percentages must grow ({w.percent} after {last})")
                last = w.percent
        if self.waves[-1].percent != 100:
            raise ValueError("the last wave must be percent 100, or some devices are never reached")
        return self


# --------------------------------------------------------------------------- answers


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)


class Whoami(_Answer):
    name: str
    role: Role


class NewUser(_Answer):
    """A person just added; ``token`` is shown this once and kept only as its hash."""

    name: str
    role: Role
    token: str


class RegisteredKey(_Answer):
    name: str
    key_id: str


class EnrollmentToken(_Answer):
    """A fleet enrollment token, shown this once and kept only as its hash; ``token_id`` names
    it from then on (list, revoke)."""

    token: str
    token_id: str
    label: str
    expires_at: AwareDatetime
    max_uses: int | None


class EnrollmentTokenInfo(_Answer):
    """An enrollment token as the admin sees it later: never the token itself."""

    token_id: str
    label: str
    created_by: str
    created_at: AwareDatetime
    expires_at: AwareDatetime
    max_uses: int | None
    used: int
    state: EnrollmentTokenState
    revoked_at: AwareDatetime | None
    revoked_by: str | None


class Device(_Answer):
    device_id: str
    hostname: str
    key_id: str
    enrolled_at: AwareDatetime
    enrolled_with: str | None = Field(
        default=None, description="the enrollment token's id; none when an admin set the key"
    )
    last_seen: AwareDatetime | None
    state: DeviceState
    recovery_attempts: int
    revoked_at: AwareDatetime | None = Field(
        default=None, description="when an admin revoked it: its messages are refused"
    )
    recovery_test_requested_at: AwareDatetime | None = Field(
        default=None, description="an admin asked for a recovery test that has not run yet"
    )
    recovery_test_passed_at: AwareDatetime | None = Field(
        default=None,
        description="when its recovery path last passed a test (test mode); none: never",
    )


class Incident(_Answer):
    """Reports clustered by crash signature."""

    incident_id: str
    signature_id: str
    kind: CrashKind
    title: str
    guilty_module: str | None
    guilty_frame: str | None
    channel_file: str | None
    first_seen: AwareDatetime
    last_seen: AwareDatetime
    report_count: int
    devices: list[str] = Field(
        description=f"the first {INCIDENT_DEVICES_SHOWN} of the devices that reported it, by id"
    )
    devices_total: int = Field(description="how many devices reported it (devices names the first)")


class IncidentReport(_Answer):
    report_id: str
    device_id: str
    received_at: AwareDatetime
    diagnostics: Diagnostics


class IncidentDetail(Incident):
    """An incident with one page of its stored reports, oldest first."""

    reports: list[IncidentReport]
    reports_total: int = Field(description="its reports stored now (retention deletes old ones)")
    next_after: str | None = Field(
        description="the next page: ask again with after= this report id; none on the last page"
    )


class IncidentSummary(Incident):
    """An incident with the crash of its first stored report (its excerpt of the kernel log):
    what the dashboard's incident page shows, without every report's diagnostics."""

    first_report_id: str | None = Field(description="none when its reports were pruned")
    crash: CrashSignature | None


class TimelineBucket(_Answer):
    """One stretch of an incident's timeline, from ``start`` for the timeline's ``bucket_s``:
    the reports received in it, the directives for the incident's remediations issued in it,
    and the outcomes recorded in it (healthy boot after applying, or failed)."""

    start: AwareDatetime
    reports: int
    served: int
    succeeded: int
    failed: int


class TimelineMark(_Answer):
    """A moment on the timeline: a remediation of the incident got its last approval needed,
    or a rollout of one was set."""

    at: AwareDatetime
    kind: Literal["approved", "rollout"]
    subject: str
    label: str


class IncidentTimeline(_Answer):
    """An incident over time, from its first stored report to the last thing that happened to
    it (a report, a directive, an outcome, an approval), in at most ``MAX_TIMELINE_BUCKETS``
    buckets of a round size (seconds, minutes, hours, days), empty ones included."""

    incident_id: str
    start: AwareDatetime
    end: AwareDatetime
    bucket_s: int
    reports: int = Field(description="the reports in the buckets: those not pruned")
    buckets: list[TimelineBucket]
    marks: list[TimelineMark]


class Suggestion(_Answer):
    """A draft fix from the server's catalog of known fixes; ``why`` says how it was found,
    or why there is none (then ``actions`` is empty)."""

    incident_id: str
    title: str
    actions: list[Action]
    why: list[str]


class Candidate(_Answer):
    """One file content (path and sha256) as a possible culprit of an incident: how many of the
    incident's devices have it against how many healthy devices (each group's total is on the
    ``Correlation``), the odds ratio (Haldane's correction: 0.5 added to each cell), the
    one-sided Fisher exact test's p-value (the chance of seeing it on that many of the
    incident's devices or more if it had nothing to do with the crash), and its onset: when the
    fleet first reported it, and how long before the incident's first report that was."""

    path: str
    sha256: str
    version: str | None
    crashing: int
    healthy: int
    crashing_share: float
    healthy_share: float
    odds_ratio: float
    p_value: float
    first_seen_at: AwareDatetime | None
    onset_before_s: float | None


class Correlation(_Answer):
    """The files over-represented among an incident's devices against the healthy ones, most
    telling first (recovery_server/correlation.py)."""

    incident_id: str
    crashing_devices: int
    healthy_devices: int
    candidates: list[Candidate]
    notes: list[str]


class Approval(_Answer):
    approver: str
    approved_at: AwareDatetime
    signed: bool


class Remediation(_Answer):
    remediation_id: str
    incident_id: str | None
    title: str
    actions: list[Action]
    author: str
    required_approvals: int
    status: RemediationStatus
    created_at: AwareDatetime
    approvals: list[Approval]
    rule_id: str | None = Field(
        default=None, description="made from this known-bad rule, approved by its approvers"
    )


class RuleRequest(_Request):
    """A known-bad rule to publish: content (sha256) at paths matching a pattern is bad, the
    fix is to quarantine it. Once approved, incidents whose devices report that content get
    the fix with no new approval, through ``rollout`` if given (else to every device)."""

    title: str = Field(min_length=1, max_length=256)
    path_pattern: str = Field(
        max_length=1024, description="relative to the OS root; * ? [..] as in fnmatch (* also across /)"
    )
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    required_approvals: int = Field(default=1, ge=1, le=16)
    rollout: RolloutPlan | None = None

    @field_validator("path_pattern")
    @classmethod
    def _pattern(cls, pattern: str) -> str:
        return check_path_pattern(pattern)


class Rule(_Answer):
    rule_id: str
    title: str
    path_pattern: str
    sha256: str
    author: str
    required_approvals: int
    status: Literal["pending", "active", "revoked"]
    created_at: AwareDatetime
    approvals: list[Approval]
    rollout: RolloutPlan | None = None
    uses: list[str] = Field(default=[], description="the remediations made from it, one per incident")
    revoked_at: AwareDatetime | None = None
    revoked_by: str | None = None


class DiskKey(_Answer):
    key_id: str
    slot: int
    state: Literal["active", "rotated", "revoked"]
    tpm_sealed: bool
    created_at: AwareDatetime
    ended_at: AwareDatetime | None = None
    ended_by: str | None = None


class KeyReleaseInfo(_Answer):
    release_id: str
    key_id: str
    report_id: str
    state: Literal["pending", "approved", "released", "refused"]
    requested_at: AwareDatetime
    decided_at: AwareDatetime | None = None
    decided_by: str | None = None
    released: int = Field(description="how many times the key went to the device for this report")
    last_released_at: AwareDatetime | None = None


class DiskKeysView(_Answer):
    """A device's escrowed disk keys (never the keys themselves) and every release."""

    device_id: str
    policy: Literal["on", "off"]
    keys: list[DiskKey]
    releases: list[KeyReleaseInfo]


class WaveProgress(_Answer):
    """``served`` counts every directive of the wave; ``counted`` the devices whose outcome
    moves its gate (enrolled before the rollout started, once each), and ``succeeded``,
    ``failed`` and ``pending`` are theirs."""

    name: str
    reached: bool
    served: int
    counted: int
    succeeded: int
    failed: int
    pending: int


class Rollout(_Answer):
    rollout_id: str
    remediation_id: str
    state: RolloutState
    current_wave: int
    wave_started_at: AwareDatetime
    reason: str
    created_by: str
    created_at: AwareDatetime
    plan: RolloutPlan
    gate: str = Field(description="what the current wave's gate waits for; empty unless active")
    waves: list[WaveProgress]


class DeviceReport(_Answer):
    """One of a device's reports, without its diagnostics; ``title`` is its incident's."""

    report_id: str
    incident_id: str
    received_at: AwareDatetime
    title: str


class DeviceDirective(_Answer):
    """A directive served to a device, and its outcome (pending until the device reports)."""

    directive_id: str
    remediation_id: str
    report_id: str
    issued_at: AwareDatetime
    wave: int | None
    outcome: str = Field(description="pending, succeeded or failed")
    outcome_at: AwareDatetime | None


class DeviceResultEntry(_Answer):
    """What a device's agent reported for one directive."""

    directive_id: str
    outcome: Literal["applied", "failed", "rejected"]
    received_at: AwareDatetime
    error: str | None


class DeviceDetail(Device):
    """A device with its latest reports, directives and results (newest first, at most
    ``MAX_DEVICE_ROWS`` each; the totals count them all)."""

    reports_total: int
    directives_total: int
    reports: list[DeviceReport]
    directives: list[DeviceDirective]
    results: list[DeviceResultEntry]


class AuditEntry(_Answer):
    """One entry of the hash-chained audit log; ``detail`` is JSON text, or empty."""

    seq: int
    at: AwareDatetime
    kind: str
    actor: str
    device_id: str | None
    subject: str | None
    detail: str
    prev_hash: str
    hash: str


class AuditReport(_Answer):
    """The audit log's hash chain checked: ``head`` is ``SEQ:HASH`` of its last entry."""

    ok: bool
    entries: int
    head: str
    problems: list[str]


# --------------------------------------------------------------------------- the client


class UnexpectedAnswer(ProtocolError):
    """Raised when the server's answer does not fit the admin API's model for it (a server
    of another version, or not a recovery server at all)."""


A = TypeVar("A", bound=BaseModel)


def _parse(model: type[A], answer: object, what: str) -> A:
    try:
        return model.model_validate(answer)
    except ValidationError as exc:
        raise UnexpectedAnswer(f"the answer to {what} does not fit {model.__name__}: {exc}") from None


def _parse_list(model: type[A], answer: object, what: str) -> list[A]:
    try:
        return TypeAdapter(list[model]).validate_python(answer)  # type: ignore[valid-type]
    except ValidationError as exc:
        raise UnexpectedAnswer(
            f"the answer to {what} does not fit a list of {model.__name__}: {exc}"
        ) from None


class AdminClient(HttpClient):
    """The admin API for one person (``token``). ``call`` reaches any route with any token,
    for callers acting for several people; the typed methods use this person's token."""

    def __init__(self, base_url: str, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.token = token

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        """``method`` on ``/v1/admin`` + ``path`` with this person's token (or ``token``); the
        answer's JSON."""
        return await self._request(
            method, "/v1/admin" + path, json_body=body, token=token or self.token or "", params=params
        )

    async def _get(self, model: type[A], path: str, params: dict[str, str] | None = None) -> A:
        return _parse(model, await self.call("GET", path, params=params), f"GET {path}")

    async def _get_list(self, model: type[A], path: str, params: dict[str, str] | None = None) -> list[A]:
        return _parse_list(model, await self.call("GET", path, params=params), f"GET {path}")

    async def _walk(
        self, model: type[A], path: str, params: dict[str, str], page: int, cursor: Callable[[A], str]
    ) -> list[A]:
        """Every item of a list read a page at a time: each next page asked for ``after`` the
        ``cursor`` of the last item, until a page comes back short."""
        out: list[A] = []
        while True:
            got = await self._get_list(model, path, params | {"limit": str(page)})
            out += got
            if len(got) < page:
                return out
            params = params | {"after": cursor(got[-1])}

    async def _post(self, model: type[A], path: str, body: BaseModel | None = None) -> A:
        json_body = body.model_dump(mode="json") if body is not None else None
        return _parse(model, await self.call("POST", path, json_body), f"POST {path}")

    # ---------------------------------------------------------------- people

    async def whoami(self) -> Whoami:
        return await self._get(Whoami, "/whoami")

    async def create_user(self, name: str, role: Role) -> NewUser:
        return await self._post(NewUser, "/users", UserRequest(name=name, role=role))

    async def register_key(self, public_key: str) -> RegisteredKey:
        return await self._post(RegisteredKey, "/me/key", RegisterKeyRequest(public_key=public_key))

    # ---------------------------------------------------------------- enrollment

    async def create_enrollment_token(
        self, label: str = "fleet", expires_in_s: int | None = None, max_uses: int | None = None
    ) -> EnrollmentToken:
        request = EnrollmentTokenRequest.model_validate(
            {"label": label, "max_uses": max_uses}
            | ({"expires_in_s": expires_in_s} if expires_in_s is not None else {})
        )
        return await self._post(EnrollmentToken, "/enrollment-tokens", request)

    async def enrollment_tokens(self) -> list[EnrollmentTokenInfo]:
        return await self._get_list(EnrollmentTokenInfo, "/enrollment-tokens")

    async def revoke_enrollment_token(self, token_id: str) -> EnrollmentTokenInfo:
        return await self._post(EnrollmentTokenInfo, f"/enrollment-tokens/{quote(token_id, safe='')}/revoke")

    async def revoke_device(self, device_id: str) -> Device:
        return await self._post(Device, f"/devices/{quote(device_id, safe='')}/revoke")

    async def request_recovery_test(self, device_id: str, *, cancel: bool = False) -> Device:
        path = f"/devices/{quote(device_id, safe='')}/recovery-test" + ("?cancel=1" if cancel else "")
        return await self._post(Device, path)

    async def disk_keys(self, device_id: str) -> DiskKeysView:
        return await self._get(DiskKeysView, f"/devices/{quote(device_id, safe='')}/disk-keys")

    async def revoke_disk_keys(self, device_id: str) -> DiskKeysView:
        return await self._post(DiskKeysView, f"/devices/{quote(device_id, safe='')}/disk-keys/revoke")

    async def decide_key_release(self, release_id: str, approve: bool) -> DiskKeysView:
        verb = "approve" if approve else "refuse"
        return await self._post(DiskKeysView, f"/key-releases/{quote(release_id, safe='')}/{verb}")

    async def replace_device_key(self, device_id: str, public_key: str) -> Device:
        return await self._post(
            Device, f"/devices/{quote(device_id, safe='')}/key", DeviceKeyRequest(public_key=public_key)
        )

    # ---------------------------------------------------------------- the fleet

    async def devices(self, page: int = LIST_PAGE) -> list[Device]:
        """Every device, by id, asked for ``page`` at a time."""
        return await self._walk(Device, "/devices", {}, page, lambda d: d.device_id)

    async def incidents(self) -> list[Incident]:
        return await self._get_list(Incident, "/incidents")

    async def incident(
        self, incident_id: str, limit: int = INCIDENT_REPORTS_PAGE, after: str | None = None
    ) -> IncidentDetail:
        """The incident with a page of its reports: ``limit`` of them, after report ``after``."""
        params = {"limit": str(limit)} | ({"after": after} if after else {})
        return await self._get(IncidentDetail, f"/incidents/{incident_id}", params)

    async def device(self, device_id: str) -> DeviceDetail:
        return await self._get(DeviceDetail, f"/devices/{quote(device_id, safe='')}")

    async def incident_summary(self, incident_id: str) -> IncidentSummary:
        return await self._get(IncidentSummary, f"/incidents/{incident_id}/summary")

    async def incident_timeline(self, incident_id: str) -> IncidentTimeline:
        return await self._get(IncidentTimeline, f"/incidents/{incident_id}/timeline")

    async def suggestion(self, incident_id: str) -> Suggestion:
        return await self._get(Suggestion, f"/incidents/{incident_id}/suggestion")

    async def correlation(self, incident_id: str) -> Correlation:
        return await self._get(Correlation, f"/incidents/{incident_id}/correlation")

    # ---------------------------------------------------------------- remediations

    async def remediations(self) -> list[Remediation]:
        return await self._get_list(Remediation, "/remediations")

    async def create_remediation(
        self,
        title: str,
        actions: list[Any],
        incident_id: str | None = None,
        required_approvals: int = 1,
    ) -> Remediation:
        request = RemediationRequest.model_validate(
            {
                "title": title,
                "actions": actions,
                "incident_id": incident_id,
                "required_approvals": required_approvals,
            }
        )
        return await self._post(Remediation, "/remediations", request)

    async def approve(self, remediation_id: str, signed: Mapping[str, Any] | None = None) -> Remediation:
        """Approve; ``signed`` is this person's sealed RemediationApproval (required once they
        registered a key)."""
        body = ApproveRequest.model_validate({"signed": signed}) if signed is not None else None
        return await self._post(Remediation, f"/remediations/{remediation_id}/approve", body)

    async def revoke(self, remediation_id: str) -> Remediation:
        return await self._post(Remediation, f"/remediations/{remediation_id}/revoke")

    # ---------------------------------------------------------------- known-bad rules

    async def create_rule(self, request: RuleRequest) -> Rule:
        return await self._post(Rule, "/rules", request)

    async def rules(self) -> list[Rule]:
        return await self._get_list(Rule, "/rules")

    async def approve_rule(self, rule_id: str, signed: Mapping[str, Any] | None = None) -> Rule:
        body = ApproveRequest.model_validate({"signed": signed}) if signed is not None else None
        return await self._post(Rule, f"/rules/{quote(rule_id, safe='')}/approve", body)

    async def revoke_rule(self, rule_id: str) -> Rule:
        return await self._post(Rule, f"/rules/{quote(rule_id, safe='')}/revoke")

    # ---------------------------------------------------------------- rollouts

    async def create_rollout(self, remediation_id: str, plan: RolloutPlan) -> Rollout:
        return await self._post(Rollout, f"/remediations/{remediation_id}/rollout", plan)

    async def rollouts(self) -> list[Rollout]:
        return await self._get_list(Rollout, "/rollouts")

    async def rollout(self, rollout_id: str) -> Rollout:
        return await self._get(Rollout, f"/rollouts/{rollout_id}")

    async def set_rollout_state(self, rollout_id: str, action: RolloutAction) -> Rollout:
        return await self._post(Rollout, f"/rollouts/{rollout_id}/{action}")

    # ---------------------------------------------------------------- audit log

    async def events(
        self, after: int = 0, device: str | None = None, page: int = LIST_PAGE
    ) -> list[AuditEntry]:
        """The audit log's entries after sequence number ``after``, asked for ``page`` at a time."""
        params = {"after": str(after)} | ({"device": device} if device else {})
        return await self._walk(AuditEntry, "/events", params, page, lambda e: str(e.seq))

    async def verify_audit(self, expect_head: str | None = None) -> AuditReport:
        params = {"expect_head": expect_head} if expect_head else None
        return await self._get(AuditReport, "/audit/verify", params)
