"""What the recovery server does, without HTTP: the rules of the device and admin APIs, one
module per concept, behind one facade (``RecoveryService``) that the HTTP layer, the command
line, the lab and the tests call.

Device side (``devices.py``, ``challenges.py``, ``incidents.py``, ``directives.py``): a device
enrolls its key with a fleet enrollment token (it expires, may be limited in uses, can be
revoked; only an admin replaces a known device's key or revokes a device); asks for a challenge
(answered alike for any device id, nothing stored); sends diagnostics signed by its key and
carrying that challenge (each nonce works once); the report joins the incident of its crash
signature; the device then polls for a directive. A directive is made only from a remediation
that people other than its author approved, for the incident of that very report, only if the
files it names are on that device with the reported content, and only once the device's rollout
wave is open (``rollout.py``, whose gates count only devices enrolled before the rollout
started, once each). It is signed by the server key and bound to the device, the agent's nonce,
the hash of the diagnostics and an expiry. The device reports the result, and the OS reports
its next healthy boot.

Admin side (``users.py``, ``remediations.py``, ``rollout.py``): people with roles and
per-person tokens; operators write remediations (declarative actions only) and set rollouts;
approvers approve; the author never counts as an approver. Every admin method takes the
person acting and asks ``access.py`` whether they may, first.

Every change is one store transaction and leaves an entry in the audit log (``audit.py``);
reports that arrive together share one (``groupcommit.py``), each in a savepoint of its own.
Old reports, healthy boots and spent challenges are pruned by ``retention.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from recovery_agent.protocol.admin import (
    DEFAULT_TOKEN_LIFETIME_S,
    INCIDENT_REPORTS_PAGE,
    AuditEntry,
    AuditReport,
    Correlation,
    Device,
    DeviceDetail,
    DiskKeysView,
    EnrollmentToken,
    EnrollmentTokenInfo,
    Incident,
    IncidentDetail,
    IncidentSummary,
    IncidentTimeline,
    NewUser,
    RegisteredKey,
    Remediation,
    Rollout,
    RolloutPlan,
    Rule,
    RuleRequest,
    Suggestion,
)
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import Challenge, DiagnosticsReceipt, DirectivePoll, KeyAnswer

from . import retention
from .access import Operation, User, require
from .audit import AuditLog
from .challenges import Challenges, challenge_key
from .correlation import correlate
from .devices import Devices
from .directives import DeviceResult, Directives, Due
from .diskkeys import DiskKeys, EscrowKeyFile, ReleasePolicy
from .errors import BadRequest
from .groupcommit import GroupCommit
from .incidents import Incidents
from .limits import DeviceRateLimits, RateLimit
from .recoverytests import RecoveryTests
from .remediations import Remediations
from .retention import Pruned
from .rollout import Rollouts
from .rules import Rules
from .store import Store
from .users import Users


@dataclass
class ServiceSettings:
    """How long a challenge nonce and a signed directive stay valid, how long superseded
    reports are kept (``retention.py``; None keeps them for good), how often a device may
    write (``limits.py``)."""

    nonce_ttl: timedelta = timedelta(minutes=10)
    directive_ttl: timedelta = timedelta(hours=1)
    report_retention: timedelta | None = timedelta(days=90)
    # Per device and kind of signed message (limits.py): at once, then per minute.
    device_rate: RateLimit = field(default_factory=RateLimit)
    # Encrypted disks (diskkeys.py): whether and how escrowed keys are released.
    key_release: ReleasePolicy = field(default_factory=ReleasePolicy)


@dataclass
class RecoveryService:
    """The server's rules, one method per thing the device and admin APIs do; each delegates to
    its concept module. Admin methods take the person acting first."""

    store: Store
    server_key: SigningKey
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # Called after a committed change that may let a waiting long poll be answered (app.py
    # sets it to the change feed's poke).
    on_change: Callable[[], None] = lambda: None
    # The escrow key (encrypted disks): none, and the server keeps no disk keys.
    escrow: EscrowKeyFile | None = None

    def __post_init__(self) -> None:
        def changed() -> None:
            self.on_change()

        self._users = Users(self.store, self.now)
        self._devices = Devices(
            self.store, self.now, DeviceRateLimits(self.settings.device_rate, lambda: self.clock())
        )
        self._challenges = Challenges(challenge_key(self.server_key), self.now, self.settings.nonce_ttl)
        self._rollouts = Rollouts(self.store, self.now, changed)
        self._remediations = Remediations(self.store, self.now, changed)
        self._tests = RecoveryTests(
            self.store, self.now, self.server_key, self.settings.directive_ttl, self._devices
        )
        self._directives = Directives(
            self.store,
            self.now,
            self.server_key,
            self.settings.directive_ttl,
            self._devices,
            self._rollouts,
            self._tests,
        )
        self._rules = Rules(self.store, self.now, changed)
        self._disk_keys = DiskKeys(
            self.store,
            self.now,
            self.server_key,
            self.escrow,
            self._devices,
            self._challenges,
            self.settings.key_release,
        )
        self._incidents = Incidents(
            self.store, self.now, self._devices, self._challenges, self._directives, self._tests, self._rules
        )
        self._audit = AuditLog(self.store)
        self.commits = GroupCommit(self.store, on_commit=changed)

    def now(self) -> datetime:
        return self.clock().replace(microsecond=0)

    # ---------------------------------------------------------------- people

    def create_user(self, actor: User, name: str, role: str) -> NewUser:
        return self._users.create(actor, name, role)

    def has_admin(self) -> bool:
        return self._users.has_admin()

    def authenticate(self, token: str | None) -> User:
        return self._users.authenticate(token)

    def register_key(self, user: User, public_key: str) -> RegisteredKey:
        return self._users.register_key(user, public_key)

    def check_metrics_reader(self, user: User) -> None:
        """Raise Forbidden unless ``user`` may read /metrics (when it takes a token)."""
        require(user, Operation.READ_METRICS)

    # ---------------------------------------------------------------- devices

    def create_enrollment_token(
        self,
        user: User,
        label: str = "fleet",
        valid_for: timedelta = timedelta(seconds=DEFAULT_TOKEN_LIFETIME_S),
        max_uses: int | None = None,
    ) -> EnrollmentToken:
        return self._devices.create_enrollment_token(user, label, valid_for, max_uses)

    def enrollment_tokens(self, user: User) -> list[EnrollmentTokenInfo]:
        return self._devices.enrollment_tokens(user)

    def revoke_enrollment_token(self, user: User, token_id: str) -> EnrollmentTokenInfo:
        return self._devices.revoke_enrollment_token(user, token_id)

    def revoke_device(self, user: User, device_id: str) -> Device:
        return self._devices.revoke(user, device_id)

    def replace_device_key(self, user: User, device_id: str, public_key: str) -> Device:
        return self._devices.replace_key(user, device_id, public_key)

    def request_recovery_test(self, user: User, device_id: str, *, cancel: bool = False) -> Device:
        """Ask a device to test its recovery path at its next boot (recoverytests.py)."""
        return self._tests.request(user, device_id, cancel=cancel)

    # ---------------------------------------------------------------- encrypted disks

    def escrow_key(self) -> dict[str, Any]:
        return self._disk_keys.escrow_key()

    def escrow_disk_key(self, raw: bytes) -> dict[str, Any]:
        return self._disk_keys.escrow(raw)

    def request_disk_key(self, raw: bytes) -> KeyAnswer:
        return self._disk_keys.request(raw)

    def disk_keys(self, user: User, device_id: str) -> DiskKeysView:
        return self._disk_keys.view(user, device_id)

    def decide_key_release(self, user: User, release_id: str, approve: bool) -> DiskKeysView:
        return self._disk_keys.decide(user, release_id, approve)

    def revoke_disk_keys(self, user: User, device_id: str) -> DiskKeysView:
        return self._disk_keys.revoke(user, device_id)

    def enroll(self, raw: bytes) -> dict[str, Any]:
        return self._devices.enroll(raw)

    def challenge(self, device_id: str) -> Challenge:
        return self._challenges.issue(device_id)

    def accept_diagnostics(self, raw: bytes) -> DiagnosticsReceipt:
        return self._incidents.accept_diagnostics(raw)

    async def submit_diagnostics(self, raw: bytes) -> DiagnosticsReceipt:
        """``accept_diagnostics`` for the event loop: the checks here, the write in a
        transaction shared with the other reports arriving meanwhile (groupcommit.py)."""
        report = self._incidents.check(raw)
        receipt = await self.commits.run(lambda tx: self._incidents.write(tx, report))
        self._incidents.written(report)
        return receipt

    def poll(self, report_id: str, poll_token: str) -> DirectivePoll:
        return self._directives.poll(report_id, poll_token)

    def look(self, report_id: str, poll_token: str) -> DirectivePoll | Due:
        """A poll's read-only look: its answer, or the report whose directive is due (then
        ``issue_directive``)."""
        return self._directives.look(report_id, poll_token)

    async def issue_directive(self, due: Due) -> DirectivePoll:
        """Issue a due directive in a transaction shared with the others issued meanwhile (the
        polls an approval wakes at once: groupcommit.py)."""
        return await self.commits.run(lambda tx: self._directives.issue(tx, due))

    def waiting_on(self, report_id: str) -> tuple[str, int | None]:
        """What a pending poll of ``report_id`` waits on: its incident, and its device's wave if
        the incident's fix has a rollout."""
        return self._directives.waiting_on(report_id)

    def accept_result(self, raw: bytes) -> dict[str, Any]:
        return self._directives.accept_result(raw)

    async def submit_result(self, raw: bytes) -> dict[str, Any]:
        """``accept_result`` for the event loop: checked here, written by the group commit."""
        r = self._directives.check_result(raw)
        answer = await self.commits.run(lambda tx: self._directives.write_result(tx, r))
        self._directives.written(r.device_id, "Result", answer)
        return answer

    def accept_health(self, raw: bytes) -> dict[str, Any]:
        return self._directives.accept_health(raw)

    async def submit_health(self, raw: bytes) -> dict[str, Any]:
        """``accept_health`` for the event loop: checked here, written by the group commit."""
        h = self._directives.check_health(raw)
        answer = await self.commits.run(lambda tx: self._directives.write_health(tx, h))
        self._directives.written(h.device_id, "Health", answer)
        return answer

    def devices(self, user: User, limit: int | None = None, after: str = "") -> list[Device]:
        """The devices by id after ``after``: up to ``limit`` of them (the admin API always
        gives one), or all."""
        return self._devices.devices(user, limit, after)

    def device(self, user: User, device_id: str) -> DeviceDetail:
        """A device with its latest reports, directives and results."""
        return self._devices.detail(user, device_id)

    def device_results(self, user: User, device_id: str) -> list[DeviceResult]:
        return self._directives.results(user, device_id)

    # ---------------------------------------------------------------- incidents

    def incidents(self, user: User) -> list[Incident]:
        return self._incidents.incidents(user)

    def incident(
        self, user: User, incident_id: str, limit: int = INCIDENT_REPORTS_PAGE, after: str | None = None
    ) -> IncidentDetail:
        """The incident with up to ``limit`` of its reports, oldest first, after report ``after``."""
        return self._incidents.incident(user, incident_id, limit, after)

    def incident_summary(self, user: User, incident_id: str) -> IncidentSummary:
        """The incident and the crash of its first stored report, without the others."""
        return self._incidents.summary(user, incident_id)

    def incident_timeline(self, user: User, incident_id: str) -> IncidentTimeline:
        """Its reports, directives and outcomes over time, in at most 120 buckets."""
        return self._incidents.timeline(user, incident_id)

    def suggest_actions(self, user: User, incident_id: str) -> Suggestion:
        return self._incidents.suggest(user, incident_id)

    def correlation(self, user: User, incident_id: str) -> Correlation:
        """The files over-represented among the incident's devices against healthy ones."""
        require(user, Operation.READ_FLEET)
        with self.store.reading_apart() as db:
            return correlate(db, incident_id)

    # ---------------------------------------------------------------- remediations

    def create_remediation(
        self,
        user: User,
        *,
        title: str,
        actions: list[Any],
        incident_id: str | None,
        required_approvals: int = 1,
    ) -> Remediation:
        return self._remediations.create(
            user, title=title, actions=actions, incident_id=incident_id, required_approvals=required_approvals
        )

    def approve(
        self, user: User, remediation_id: str, signed: Mapping[str, Any] | None = None
    ) -> Remediation:
        return self._remediations.approve(user, remediation_id, signed)

    def revoke(self, user: User, remediation_id: str) -> Remediation:
        return self._remediations.revoke(user, remediation_id)

    def remediation(self, user: User, remediation_id: str) -> Remediation:
        return self._remediations.remediation(user, remediation_id)

    def remediations(self, user: User) -> list[Remediation]:
        return self._remediations.remediations(user)

    # ---------------------------------------------------------------- rollouts

    # ---------------------------------------------------------------- known-bad rules

    def create_rule(self, user: User, request: RuleRequest | Mapping[str, Any]) -> Rule:
        return self._rules.create(user, request)

    def rules(self, user: User) -> list[Rule]:
        return self._rules.rules(user)

    def approve_rule(self, user: User, rule_id: str, signed: Mapping[str, Any] | None = None) -> Rule:
        return self._rules.approve(user, rule_id, signed)

    def revoke_rule(self, user: User, rule_id: str) -> Rule:
        return self._rules.revoke(user, rule_id)

    def create_rollout(
        self, user: User, remediation_id: str, plan: RolloutPlan | Mapping[str, Any]
    ) -> Rollout:
        return self._rollouts.create(user, remediation_id, plan)

    def set_rollout_state(self, user: User, rollout_id: str, action: str) -> Rollout:
        return self._rollouts.set_state(user, rollout_id, action)

    def tick(self) -> None:
        self._rollouts.tick()

    def rollout(self, user: User, rollout_id: str) -> Rollout:
        return self._rollouts.rollout(user, rollout_id)

    def rollouts(self, user: User) -> list[Rollout]:
        return self._rollouts.rollouts(user)

    # ---------------------------------------------------------------- retention

    def prune(self, user: User, keep: timedelta | None = None, *, dry_run: bool = False) -> Pruned:
        """Delete what is older than ``keep`` (the retention setting by default) and may go
        (``retention.py``); with ``dry_run``, only count it."""
        require(user, Operation.PRUNE_OLD_DATA)
        keep = keep if keep is not None else self.settings.report_retention
        if keep is None:
            raise BadRequest("no retention period: give one (days), or set report_retention")
        return retention.prune(self.store, self.now(), keep, user.name, dry_run=dry_run)

    # ---------------------------------------------------------------- audit log

    def events(
        self, user: User, device_id: str | None = None, after: int = 0, limit: int | None = None
    ) -> list[AuditEntry]:
        """The audit log's entries after ``after``: up to ``limit`` of them (the admin API
        always gives one), or all."""
        return self._audit.entries(user, device_id, after, limit)

    def verify_audit(self, user: User, expect_head: str | None = None) -> AuditReport:
        return self._audit.verify(user, expect_head)
