"""Reports and incidents: a device's signed diagnostics, and the crash they share with others.

1. A report is a device's diagnostics, signed by its enrolled key (``devices.py``) and
   carrying a challenge nonce it spends (``challenges.py``).
2. It joins the incident of its crash signature (``INC-`` and the signature id): the same bug
   on many machines is one incident, with a report count, first and last seen, and devices.
   A signature made by another version of the crash rules (an older or newer agent) is first
   re-made from its excerpt by the server's rules (``crashreport.rederive``), so upgrading
   agents does not split an incident.
3. It records the device's state: recovering, or needs_manual on its agent's last attempt.
4. A device that was served a directive and reports again did not recover: that directive
   failed (``directives.py``), which its rollout counts.
5. The receipt carries a poll token, kept only as its sha256, for the device's long poll.

``suggest`` drafts a fix for an incident from its reports (``catalog.py``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from recovery_agent.protocol.admin import (
    INCIDENT_DEVICES_SHOWN,
    INCIDENT_REPORTS_PAGE,
    Incident,
    IncidentDetail,
    IncidentReport,
    IncidentSummary,
    IncidentTimeline,
    Suggestion,
)
from recovery_agent.protocol.crashreport import rederive
from recovery_agent.protocol.envelope import Verified
from recovery_agent.protocol.wire import CrashSignature, Diagnostics, DiagnosticsReceipt

from . import audit, catalog
from .access import Operation, User, require
from .challenges import Challenges
from .correlation import correlate, likely_culprit
from .devices import Devices
from .directives import Directives
from .errors import BadRequest, NotFound, Unauthorized
from .fleetfiles import READ_PAGE, record_contents
from .recoverytests import RecoveryTests
from .rules import Rules
from .store import Row, Store, Tx, iso, new_id, token_sha256
from .timeline import timeline


@dataclass(frozen=True)
class CheckedReport:
    """A report that passed every check that needs no write (``Incidents.check``)."""

    verified: Verified[Diagnostics]
    signature: CrashSignature
    now: str  # when it was received, as the store spells times


class Incidents:
    def __init__(
        self,
        store: Store,
        now: Callable[[], datetime],
        devices: Devices,
        challenges: Challenges,
        directives: Directives,
        tests: RecoveryTests,
        rules: Rules,
    ) -> None:
        self._store = store
        self._now = now
        self._devices = devices
        self._challenges = challenges
        self._directives = directives
        self._tests = tests
        self._rules = rules

    def accept_diagnostics(self, raw: bytes) -> DiagnosticsReceipt:
        """Check, store and acknowledge one report, in a transaction of its own."""
        report = self.check(raw)
        with self._store.tx() as tx:
            receipt = self.write(tx, report)
        self.written(report)
        return receipt

    def check(self, raw: bytes) -> CheckedReport:
        """Everything about a report that needs no write: its envelope, signature and signer,
        the device's budget, and its crash signature as these rules make it."""
        verified = self._devices.open_message(raw, Diagnostics)
        return CheckedReport(verified, rederive(verified.message.crash), iso(self._now()))

    def written(self, report: CheckedReport) -> None:
        """After the report's transaction committed: spend the device's budget."""
        self._devices.limits.spend(report.verified.message.device_id, "Diagnostics")

    def write(self, tx: Tx, report: CheckedReport) -> DiagnosticsReceipt:
        """Store a checked report inside ``tx`` (the caller's, maybe shared: groupcommit.py)."""
        verified, sig, now = report.verified, report.signature, report.now
        d = verified.message
        self._challenges.spend(tx, d.device_id, d.server_nonce)
        if d.test_mode:  # a recovery test visit: no incident, its directive at once
            return self._tests.visit(tx, verified, now)
        poll_token = secrets.token_urlsafe(24)
        incident_id = "INC-" + sig.id[:12]
        seen = tx.execute(
            "UPDATE incidents SET last_seen = ?, report_count = report_count + 1 WHERE incident_id = ?",
            now,
            incident_id,
        )
        if seen.rowcount == 0:  # the first report of this crash
            tx.execute(
                "INSERT INTO incidents VALUES (?,?,?,?,?,?,?,?,?,1)",
                incident_id,
                sig.id,
                sig.kind.value,
                sig.title,
                sig.guilty_module,
                sig.guilty_frame,
                sig.channel_file,
                now,
                now,
            )
            audit.record(
                tx, now, "incident.opened", d.device_id, d.device_id, incident_id, {"title": sig.title}
            )
        report_id = new_id("rpt")
        # The payload once, and the signature that verified it: together an envelope again.
        tx.execute(
            "INSERT INTO reports(report_id, device_id, incident_id, diagnostics_sha256, agent_nonce, "
            "poll_token_sha256, received_at, payload, signatures) VALUES (?,?,?,?,?,?,?,?,?)",
            report_id,
            d.device_id,
            incident_id,
            verified.payload_sha256,
            d.agent_nonce,
            token_sha256(poll_token),
            now,
            verified.payload.decode(),
            json.dumps(verified.signatures),
        )
        # The fleet's first sighting of each file it lists (correlation.py: a file's onset).
        record_contents(tx, (*d.drivers, *d.channel_files, *d.driver_store), now, d.device_id)
        # Content a known-bad rule names: the incident's fix, with no new approval (rules.py).
        self._rules.apply(tx, incident_id, d, now)
        # The agent's last attempt: unless a fix lands now, a person must recover it.
        state = "needs_manual" if d.boot.recovery_attempts >= d.boot.max_recovery_attempts else "recovering"
        # A device revoked since its report was checked is refused here, in the transaction.
        updated = tx.execute(
            "UPDATE devices SET last_seen = ?, state = ?, recovery_attempts = ? "
            "WHERE device_id = ? AND revoked_at IS NULL",
            now,
            state,
            d.boot.recovery_attempts,
            d.device_id,
        )
        if updated.rowcount != 1:
            raise Unauthorized(f"device {d.device_id} was revoked: its report was not stored")
        audit.record(
            tx,
            now,
            "diagnostics.received",
            d.device_id,
            d.device_id,
            report_id,
            {
                "incident": incident_id,
                "title": sig.title,
                "boot_count": d.boot.boot_count,
                "recovery_attempts": d.boot.recovery_attempts,
            },
        )
        if state == "needs_manual":
            audit.record(
                tx,
                now,
                "device.needs_manual",
                d.device_id,
                d.device_id,
                report_id,
                {"recovery_attempts": d.boot.recovery_attempts},
            )
        # A device that was served a fix and is back in recovery: the fix did not work.
        self._directives.fail_pending(
            tx, d.device_id, report_id, f"the device failed to boot again ({sig.title})"
        )
        return DiagnosticsReceipt(
            report_id=report_id,
            incident_id=incident_id,
            diagnostics_sha256=verified.payload_sha256,
            poll_token=poll_token,
        )

    def suggest(self, user: User, incident_id: str) -> Suggestion:
        """A draft fix from the catalog of known fixes (catalog.py); a person still turns it
        into a remediation and others approve it."""
        require(user, Operation.READ_FLEET)
        inc = self._store.one("SELECT * FROM incidents WHERE incident_id = ?", incident_id)
        if inc is None:
            raise NotFound(f"no incident {incident_id}: list them with recovery-admin incidents")
        reports = (catalog.ReportFiles.of_payload(r["payload"]) for r in self._every_report(incident_id))
        proposal = catalog.propose(dict(inc), reports)
        if not proposal.actions:  # nothing known: what the fleet's files say, if it is clear
            with self._store.reading_apart() as db:
                corr = correlate(db, incident_id)
            culprit = likely_culprit(corr)
            if culprit is not None:
                proposal = catalog.from_correlation(culprit, corr.crashing_devices, corr.healthy_devices)
        return Suggestion.model_validate(
            {
                "incident_id": incident_id,
                "title": proposal.title,
                "actions": proposal.actions,
                "why": proposal.why,
            }
        )

    # ---------------------------------------------------------------- views

    def incidents(self, user: User) -> list[Incident]:
        require(user, Operation.READ_FLEET)
        return [self._view(r) for r in self._store.all("SELECT * FROM incidents ORDER BY last_seen DESC")]

    def incident(
        self, user: User, incident_id: str, limit: int = INCIDENT_REPORTS_PAGE, after: str | None = None
    ) -> IncidentDetail:
        """The incident with a page of its reports (oldest first): ``limit`` of them, the first
        after report ``after``; ``next_after`` names where the next page starts."""
        require(user, Operation.READ_FLEET)
        row = self._store.one("SELECT * FROM incidents WHERE incident_id = ?", incident_id)
        if row is None:
            raise NotFound(f"no incident {incident_id}")
        start = ("", "")  # before every report: ids and times are never empty
        if after:
            mark = self._store.one(
                "SELECT received_at, report_id FROM reports WHERE report_id = ? AND incident_id = ?",
                after,
                incident_id,
            )
            if mark is None:
                raise BadRequest(
                    f"after: no report {after[:64]!r} in {incident_id} (retention may have deleted "
                    "it): start again without after="
                )
            start = (mark["received_at"], mark["report_id"])
        rows = self._page(incident_id, start, limit + 1)
        reports = [
            IncidentReport(
                report_id=r["report_id"],
                device_id=r["device_id"],
                received_at=r["received_at"],
                diagnostics=Diagnostics.model_validate_json(r["payload"]),
            )
            for r in rows[:limit]
        ]
        total = self._store.scalar("SELECT count(*) FROM reports WHERE incident_id = ?", incident_id)
        return IncidentDetail.model_validate(
            {
                **self._view(row).model_dump(),
                "reports": reports,
                "reports_total": total,
                "next_after": reports[-1].report_id if len(rows) > limit else None,
            }
        )

    def _row(self, incident_id: str) -> Row:
        row = self._store.one("SELECT * FROM incidents WHERE incident_id = ?", incident_id)
        if row is None:
            raise NotFound(f"no incident {incident_id}: list them with recovery-admin incidents")
        return row

    def summary(self, user: User, incident_id: str) -> IncidentSummary:
        """The incident and the crash of its first stored report (one report read, not all)."""
        require(user, Operation.READ_FLEET)
        row = self._row(incident_id)
        first = self._store.one(
            "SELECT report_id, payload FROM reports WHERE incident_id = ? "
            "ORDER BY received_at, report_id LIMIT 1",
            incident_id,
        )
        crash = Diagnostics.model_validate_json(first["payload"]).crash if first else None
        return IncidentSummary.model_validate(
            {
                **self._view(row).model_dump(),
                "first_report_id": first["report_id"] if first else None,
                "crash": crash,
            }
        )

    def timeline(self, user: User, incident_id: str) -> IncidentTimeline:
        """Its reports, directives and outcomes per stretch of time (timeline.py)."""
        require(user, Operation.READ_FLEET)
        return timeline(self._store, self._row(incident_id))

    def _page(self, incident_id: str, start: tuple[str, str], limit: int) -> list[Row]:
        """Up to ``limit`` of the incident's reports, oldest first, after (received_at,
        report_id) ``start``."""
        return self._store.all(
            "SELECT report_id, device_id, received_at, payload FROM reports WHERE incident_id = ? "
            "AND (received_at, report_id) > (?, ?) ORDER BY received_at, report_id LIMIT ?",
            incident_id,
            *start,
            limit,
        )

    def _every_report(self, incident_id: str) -> Iterator[Row]:
        """The incident's reports, oldest first, read a page at a time: a fleet's incident
        never sits in memory whole."""
        start = ("", "")
        while rows := self._page(incident_id, start, READ_PAGE):
            yield from rows
            start = (rows[-1]["received_at"], rows[-1]["report_id"])

    def _view(self, row: Row) -> Incident:
        """The incident, naming the first of its devices and counting them all (both read
        from the index of its reports by device, not from the reports)."""
        incident_id = row["incident_id"]
        devices = [
            d["device_id"]
            for d in self._store.all(
                "SELECT DISTINCT device_id FROM reports WHERE incident_id = ? ORDER BY device_id LIMIT ?",
                incident_id,
                INCIDENT_DEVICES_SHOWN,
            )
        ]
        total = len(devices)
        if total == INCIDENT_DEVICES_SHOWN:
            total = int(
                self._store.scalar(
                    "SELECT count(DISTINCT device_id) FROM reports WHERE incident_id = ?", incident_id
                )
            )
        return Incident.model_validate({**dict(row), "devices": devices, "devices_total": total})
