"""Recovery tests (test mode): a device's recovery path run on purpose, and its last pass.

1. An operator asks for a test (``request``); the device learns of it in the answer to its
   next health report (``health_answer``: ``"recovery_test": "requested"``) and arms it
   (``recovery_agent.testmode``). A person at the device may arm one too
   (``recovery-agent test-mode``); the server takes both the same way.
2. On the test visit the agent sends diagnostics with ``test_mode`` set. They open no incident
   and count in no rollout: ``visit`` stores them as a test, clears the request, and issues
   the test directive at once: signed by the server key and bound to the device, the agent's
   nonce and those diagnostics like any directive, with one ``recovery_test`` action that
   changes nothing on the OS but the agent's own state. It needs no approval: agents take it
   only on a visit they armed themselves, and nothing else on one. A test's report, directive
   and result share one id (``rt-…``), so the device API serves it like any report's.
3. The agent applies it (journaled), reports the result (``result``), and boots back; the OS's
   health report naming the test directive is the pass (``passed``): the device's
   ``recovery_test_passed_at``, which the fleet view shows (never passed: none).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from recovery_agent.protocol import envelope
from recovery_agent.protocol.admin import Device
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import DiagnosticsReceipt, Directive, DirectivePoll, RecoveryTest, Result

from . import audit
from .access import Operation, User, require
from .devices import Devices
from .errors import Conflict, NotFound, Unauthorized
from .store import Store, Tx, iso, new_id, token_sha256

PREFIX = "rt-"
# The receipt's incident for a test visit: tests open no incident.
TEST_INCIDENT = "recovery-test"


def is_test(identifier: str | None) -> bool:
    """Whether a report or directive id is a recovery test's."""
    return bool(identifier) and str(identifier).startswith(PREFIX)


# Who armed a test nobody asked for from the server (recovery-agent test-mode on the device).
LOCAL_TEST = "the device"


class RecoveryTests:
    def __init__(
        self,
        store: Store,
        now: Callable[[], datetime],
        server_key: SigningKey,
        ttl: timedelta,
        devices: Devices,
    ) -> None:
        self._store = store
        self._now = now
        self._server_key = server_key
        self._ttl = ttl
        self._devices = devices

    # ---------------------------------------------------------------- an operator's request

    def request(self, user: User, device_id: str, *, cancel: bool = False) -> Device:
        """``user`` asks ``device_id`` to test its recovery path at its next boot; with
        ``cancel``, takes the request back (a device that armed it already runs the test: on
        the device, ``recovery-agent test-mode --cancel`` disarms it)."""
        require(user, Operation.REQUEST_RECOVERY_TEST)
        now = iso(self._now())
        with self._store.tx() as tx:
            dev = tx.one("SELECT * FROM devices WHERE device_id = ?", device_id)
            if dev is None:
                raise NotFound(f"no device {device_id}: list them with recovery-admin devices")
            if dev["revoked_at"]:
                raise Conflict(
                    f"device {device_id} was revoked by {dev['revoked_by']}: it cannot run a recovery test "
                    "until an admin gives it a key again (recovery-admin device rekey)"
                )
            if cancel:
                if not dev["recovery_test_requested_at"]:
                    raise Conflict(f"device {device_id} has no recovery test requested")
                tx.execute(
                    "UPDATE devices SET recovery_test_requested_at = NULL, recovery_test_requested_by = NULL "
                    "WHERE device_id = ?",
                    device_id,
                )
                audit.record(tx, now, "recovery_test.cancelled", user.name, device_id)
            else:
                tx.execute(
                    "UPDATE devices SET recovery_test_requested_at = ?, recovery_test_requested_by = ? "
                    "WHERE device_id = ?",
                    now,
                    user.name,
                    device_id,
                )
                audit.record(tx, now, "recovery_test.requested", user.name, device_id)
        return self._devices.device(device_id)

    def health_answer(self, tx: Tx, device_id: str) -> dict[str, Any]:
        """What a health report's answer says of a test: requested, or nothing."""
        row = tx.one("SELECT recovery_test_requested_at FROM devices WHERE device_id = ?", device_id)
        return {"recovery_test": "requested"} if row is not None and row[0] else {}

    # ---------------------------------------------------------------- the test visit

    def visit(self, tx: Tx, verified: Any, now: str) -> DiagnosticsReceipt:
        """Store a test visit's checked diagnostics inside ``tx`` and issue its directive."""
        d = verified.message
        dev = tx.one("SELECT * FROM devices WHERE device_id = ? AND revoked_at IS NULL", d.device_id)
        if dev is None:
            raise Unauthorized(f"device {d.device_id} was revoked: its report was not stored")
        test_id = new_id(PREFIX.rstrip("-"))
        issued = self._now()
        directive = Directive(
            directive_id=test_id,
            device_id=d.device_id,
            agent_nonce=d.agent_nonce,
            diagnostics_sha256=verified.payload_sha256,
            remediation_id=test_id,
            remediation_title="recovery test",
            issued_at=issued,
            expires_at=issued + self._ttl,
            actions=[RecoveryTest(test_id=test_id)],
        )
        env = envelope.seal(directive, self._server_key)
        poll_token = secrets.token_urlsafe(24)
        requested_by = dev["recovery_test_requested_by"] or LOCAL_TEST
        tx.execute(
            "INSERT INTO recovery_tests(test_id, device_id, requested_by, visited_at, diagnostics_sha256, "
            "poll_token_sha256, payload, envelope, expires_at) VALUES (?,?,?,?,?,?,?,?,?)",
            test_id,
            d.device_id,
            requested_by,
            now,
            verified.payload_sha256,
            token_sha256(poll_token),
            verified.payload.decode(),
            json.dumps(env),
            iso(directive.expires_at),
        )
        tx.execute(
            "UPDATE devices SET last_seen = ?, recovery_test_requested_at = NULL, "
            "recovery_test_requested_by = NULL WHERE device_id = ?",
            now,
            d.device_id,
        )
        audit.record(
            tx,
            now,
            "recovery_test.visit",
            d.device_id,
            d.device_id,
            test_id,
            {"requested_by": requested_by, "agent": d.agent_version},
        )
        return DiagnosticsReceipt(
            report_id=test_id,
            incident_id=TEST_INCIDENT,
            diagnostics_sha256=verified.payload_sha256,
            poll_token=poll_token,
        )

    def poll(self, test_id: str, poll_token: str) -> DirectivePoll:
        """The test directive: issued with the visit, so a poll has it at once."""
        row = self._store.one("SELECT * FROM recovery_tests WHERE test_id = ?", test_id)
        if row is None or not secrets.compare_digest(row["poll_token_sha256"], token_sha256(poll_token)):
            raise NotFound("no such report, or wrong poll token")
        self._devices.refuse_revoked(self._store, row["device_id"])
        return DirectivePoll(status="directive", envelope=json.loads(row["envelope"]))

    def result(self, tx: Tx, r: Result, now: str) -> dict[str, Any]:
        """The agent's result of a test directive."""
        row = tx.one("SELECT * FROM recovery_tests WHERE test_id = ?", r.directive_id)
        if row is None or row["device_id"] != r.device_id:
            raise NotFound(f"no directive {r.directive_id} for device {r.device_id}")
        if row["outcome"] != "issued":
            return {"status": "duplicate"}
        outcome = "applied" if r.outcome == "applied" else "failed"
        tx.execute(
            "UPDATE recovery_tests SET outcome = ?, applied_at = ?, detail = ? WHERE test_id = ?",
            outcome,
            now,
            (r.error or "")[:1024],
            r.directive_id,
        )
        tx.execute("UPDATE devices SET last_seen = ? WHERE device_id = ?", now, r.device_id)
        audit.record(
            tx,
            now,
            "recovery_test.result",
            r.device_id,
            r.device_id,
            r.directive_id,
            {"outcome": r.outcome, "error": r.error, "actions": [a.status for a in r.actions]},
        )
        return {"status": "recorded"}

    def passed(self, tx: Tx, device_id: str, test_id: str, now: str) -> None:
        """The OS reported a healthy boot naming the test directive: the recovery path works."""
        row = tx.one("SELECT * FROM recovery_tests WHERE test_id = ?", test_id)
        if row is None or row["device_id"] != device_id or row["passed_at"]:
            return
        tx.execute(
            "UPDATE recovery_tests SET outcome = 'passed', passed_at = ? WHERE test_id = ?", now, test_id
        )
        tx.execute("UPDATE devices SET recovery_test_passed_at = ? WHERE device_id = ?", now, device_id)
        audit.record(
            tx,
            now,
            "recovery_test.passed",
            device_id,
            device_id,
            test_id,
            {"visited_at": row["visited_at"], "result": row["outcome"]},
        )
