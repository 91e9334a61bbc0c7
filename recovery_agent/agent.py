"""The recovery loop, as the recovery environment runs it after repeated failed boots.

1. **settle**: finish or roll back a remediation that a power loss interrupted (``remediate``);
   a fix finished here had been on its way: record it, reset ``boot_count``, report its result
   and reboot, as step 6 would have (no new report of a crash the fix removed).
2. **detect**: GRUB's boot count, pstore crash records and the OS boot log give a crash
   signature (what crashed, in which module, on which channel file) (``detect``).
3. **collect**: OS and kernel versions, drivers and channel files with size, mtime, sha256
   (``inventory``); with the signature, the ``Findings`` the diagnostics are made of.
4. **report**: a challenge from the server, then diagnostics signed by the device key.
5. **wait**: long-poll for a directive; with auto remediation, keep asking at the retry
   interval until the time to reboot has passed.
6. **apply**: only a directive signed by the pinned server key, for this device, this nonce,
   these diagnostics and not expired (``protocol.envelope``); then reset ``boot_count``,
   record the directive for the next healthy boot to confirm (``state``), report the result,
   reboot.

Without a fix the agent resets ``boot_count`` so the OS gets another try; after
``max_recovery_attempts`` visits it stops and says the machine needs a person (exit 12)
instead of looping. A grubenv it cannot read, or cannot save ``recovery_attempts`` to, means it
cannot count its visits: it reports as usual, treats this visit as the last, and says why.
The exit code (``Outcome``) tells the recovery environment's init what to do next.

The agent is the last line of defence: whatever its evidence holds, the report is bounded and
fitted to the wire (``detect``, ``inventory``, ``report``); and one handler around the loop
turns any unexpected exception into an "agent error" report to the server (kind
``agent_error``, the title naming the exception and where) and ``Outcome.ERROR``, so a bug
never leaves a machine looping with nobody told.

Back in the OS, once its health check passed, ``report_health`` resets the counters, reports
the good boot naming the directive, confirms it and archives the crash records (``state``).

The loop is one module on purpose: its steps are read top to bottom in the order a recovery
runs them, each step's own work is in the modules named above (the count in ``counting``), and
what is left here is their order, their outcomes and the exit codes init relies on.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import secrets
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import __version__, counting, diskkey, holds, inventory, luks, osdisk, state, testmode
from .bootenv import BOOT_COUNT, RECOVERY_ATTEMPTS, BootEnv, BootEnvError
from .clock import Clock, SystemClock
from .counting import BootCount, boot_history
from .detect import examine
from .errors import AgentError, RemediationError
from .layout import LAST_DIRECTIVE
from .protocol.client import DeviceClient, ServerRefused, ServerUnreachable
from .protocol.envelope import (
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    Verified,
    open_directive,
    payload_sha256,
    seal_bytes,
)
from .protocol.keys import SigningKey, key_id, public_from_b64
from .protocol.wire import (
    EXCERPT_MAX,
    ActionResult,
    BootRecord,
    BootState,
    CrashKind,
    CrashSignature,
    DiagnosticsReceipt,
    Directive,
    FileRecord,
    Health,
    InventoryUpdate,
    Result,
    SystemInfo,
    inventory_digest,
    utcnow,
)
from .remediate import apply_directive, settle_journals
from .report import Findings, fit_signature, seal_within, wire_text
from .settings import AgentSettings

log = logging.getLogger("recovery_agent")


class Outcome(enum.IntEnum):
    """The agent's exit code: what the recovery environment does next. Its init
    (images/recovery/init) keeps the machine in recovery on 12 and reboots on any other code,
    so a failure of any kind is ``ERROR`` (1)."""

    REMEDIATED = 0
    ERROR = 1
    NO_REMEDIATION = 10
    CLOUD_DISABLED = 11
    NEEDS_MANUAL = 12
    REMEDIATION_FAILED = 13

    @property
    def meaning(self) -> str:
        return _OUTCOME_MEANINGS[self]


_OUTCOME_MEANINGS = {
    Outcome.REMEDIATED: "fix applied: reboot into the OS",
    Outcome.ERROR: "the agent itself failed (settings, key, disk, a bug; reported if it could be): reboot",
    Outcome.NO_REMEDIATION: "no fix arrived in time: reboot and let the OS try again",
    Outcome.CLOUD_DISABLED: "cloud remediation is off: reboot",
    Outcome.NEEDS_MANUAL: "out of attempts, or grubenv cannot keep the count: stay here, a person must look",
    Outcome.REMEDIATION_FAILED: "a fix arrived but could not be applied (nothing changed): reboot",
}


def agent_error_signature(exc: BaseException) -> CrashSignature:
    """The crash signature of the agent's own failure: ``agent error: <type> in <file>:<function>``
    (the innermost frame of the agent's code, no line number, so that one bug on many machines
    is one incident), the traceback as the excerpt."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "recovery_agent" in Path(f.filename).parts]
    where = (ours or frames)[-1] if frames else None
    at = f" in {Path(where.filename).name}:{where.name}" if where is not None else ""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    signature, _ = fit_signature(
        SimpleNamespace(
            kind=CrashKind.AGENT_ERROR,
            title=f"agent error: {type(exc).__name__}{at}",
            source=f"recovery-agent {__version__}",
            excerpt=text[-EXCERPT_MAX:],
        )
    )
    return signature


@dataclass
class Timeline:
    """What the agent did, with times: one line per step to the log and to ``sink`` (the
    console, from which the lab's report is made)."""

    started: float = field(default_factory=time.monotonic)
    sink: Callable[[str], None] | None = None

    def add(self, phase: str, text: str) -> None:
        t = time.monotonic() - self.started
        line = f"[agent +{t:7.2f}s] {phase:<9} {text}"
        log.info(line)
        if self.sink:
            try:
                self.sink(line)
            except (OSError, ValueError):
                pass  # a console gone away, or one that cannot show a character, must not stop the loop


class RecoveryAgent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        timeline: Timeline | None = None,
        clock: Clock | None = None,
        hold: holds.Hold | None = None,
        encrypted_os: osdisk.EncryptedOs | None = None,
    ) -> None:
        self.s = settings
        # An encrypted OS root, opened with the key the server releases (osdisk.py).
        self.encrypted_os = encrypted_os
        self.timeline = timeline or Timeline()
        # Lab only: where an apply stops for the lab to cut the power (holds.py).
        if hold is None and settings.lab_hold_at is not None:
            hold = holds.hold_at(settings.lab_hold_at, lambda text: self.timeline.add("hold", text))
        self.hold = hold
        # Every wait of the loop goes through this clock (tests drive it; see clock.py).
        self.clock: Clock = clock or SystemClock()
        self.key = SigningKey.load(settings.device_key)
        pinned = public_from_b64(settings.server_public_key)
        self.server_keyring = {key_id(pinned): pinned}
        approvers = [public_from_b64(k) for k in settings.approver_keys]
        self.approver_keyring = {key_id(k): k for k in approvers}
        self._test: str | None = None  # who armed this visit as a recovery test (testmode.py)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> Outcome:
        """The recovery loop; any unexpected exception in it is reported as an agent error
        (``report_agent_error``) and ends in ``Outcome.ERROR``."""
        self._count: BootCount | None = None
        self._deadline: float | None = None
        self._test = None
        self._test_sent: tuple[DiagnosticsReceipt, str] | None = None
        self._started = self.clock.monotonic()
        try:
            return await self._loop()
        except Exception as exc:  # the last line of defence: see the module docstring
            return await self.report_agent_error(exc)

    async def _loop(self) -> Outcome:
        enc = self.encrypted_os
        if enc is None:
            return await self._recover()
        opened = await self._unlock(enc)
        if opened is not None:
            return opened
        try:
            return await self._recover()
        finally:
            problems = osdisk.close_os(enc, self.s.os_root)
            for problem in problems:
                self.timeline.add("lock", problem)
            if not problems:
                self.timeline.add("lock", f"the OS disk is unmounted and {enc.volume} closed again")

    async def _unlock(self, enc: osdisk.EncryptedOs) -> Outcome | None:
        """An encrypted OS root: count this visit, report the crash (all that can be known
        before the disk is open), ask for the disk key for that report, then open and mount the
        disk (``osdisk``). None once it is open (the loop goes on as on any machine); otherwise
        the visit's outcome: a refused key means a person must look (``NEEDS_MANUAL``, nothing
        changed); no key before the time to reboot ends the visit as no fix would. A recovery
        test's visit asks for the key with its test report (the server releases it for a test
        it asked for) and, whatever happens, goes back to the OS."""
        s, tl = self.s, self.timeline
        try:
            self._test = testmode.armed(s.grubenv)
        except (BootEnvError, OSError):
            self._test = None
        test = self._test is not None
        count = self._count = self.read_boot_count(count_visit=not test)
        what = (
            "the recovery test"
            if test
            else (
                f"the crash (boot_count={count.boot_count}, recovery attempt {count.attempts} of "
                f"{s.max_recovery_attempts})"
            )
        )
        tl.add("unlock", f"the OS disk {enc.volume} is encrypted: reporting {what} to ask for its key")
        if not s.cloud_remediation:
            tl.add("done", "cloud remediation is off: the encrypted OS disk cannot be opened; rebooting")
            return Outcome.CLOUD_DISABLED if self._reset_boot_count() else Outcome.NEEDS_MANUAL
        locked = "the OS disk is encrypted and still locked: this report asks for its key"
        if test:
            findings = self._test_findings(count, [locked], inventory_too=False)
        else:
            findings = self.collect(
                count, notes=[f"{locked}; the full report follows once it is open"], inventory_too=False
            )
        deadline = self._deadline = self.clock.monotonic() + s.time_to_reboot_s
        key = None
        refused: str | None = None
        async with DeviceClient(s.server_url) as client:
            sent = await self.report(client, findings, deadline)
            if sent is not None:
                try:
                    key = await diskkey.fetch_key(
                        client,
                        self.key,
                        s.server_public_key,
                        s.device_id,
                        sent[0].report_id,
                        clock=self.clock,
                        deadline=deadline,
                        retry_interval_s=s.retry_interval_s,
                        say=lambda text: tl.add("unlock", text),
                    )
                except diskkey.KeyRefused as exc:
                    refused = str(exc)
        if key is not None:
            tl.add("unlock", "the server released the disk key for this visit")
            try:
                device = osdisk.open_os(enc, key, s.os_root)  # (wipes the key)
            except (luks.LuksError, osdisk.OsDiskError) as exc:
                refused = str(exc)
            else:
                tl.add(
                    "unlock",
                    f"{enc.volume} open as {device} (the key wiped from memory), mounted at {s.os_root}",
                )
                if test:
                    self._test_sent = sent
                return None
        if test:
            why = refused or "no disk key before the time to reboot"
            tl.add("done", f"recovery test FAILED: {why}")
            return Outcome.NO_REMEDIATION if self._reset_boot_count() else Outcome.NEEDS_MANUAL
        if refused is not None:
            tl.add("done", f"{refused}: this machine needs a person (nothing on it was changed)")
            return Outcome.NEEDS_MANUAL
        return self._no_fix(count, "no disk key")

    async def _recover(self) -> Outcome:
        s, tl = self.s, self.timeline
        holds.install(self.hold)
        settled: list[str] = []
        try:
            journals = settle_journals(s.os_root)
        except (AgentError, OSError) as exc:
            # Reported, not fatal: the crash is still worth reporting, and no fix will be
            # applied on top of an unsettled journal (apply_directive refuses).
            tl.add("settle", f"could not settle interrupted remediations: {exc}")
            settled.append(f"could not settle interrupted remediations: {exc}")
            journals = []
        for journal in journals:
            tl.add("settle", journal.line)
        finished = [j for j in journals if j.rolled_forward]
        if finished:
            # The power went after an earlier run's fix was on the disk: finish that run's work
            # rather than report a crash the fix has already removed.
            reset = True
            async with DeviceClient(s.server_url) as client:
                for journal in finished:
                    reset &= await self._complete(client, journal.directive_id, list(journal.results or ()))
            return Outcome.REMEDIATED if reset else Outcome.NEEDS_MANUAL

        if self._count is None:  # (an encrypted disk's visit was counted before it was opened)
            try:
                self._test = testmode.armed(s.grubenv)
            except (BootEnvError, OSError):
                self._test = None  # the count step below says what is wrong with grubenv
        if self._test is not None:
            return await self._test_visit(settled)
        count = self._count = self._count or self.read_boot_count(count_visit=True)
        tl.add(
            "detect",
            f"boot_count={count.boot_count} (limit {s.boot_limit}), recovery attempt "
            f"{count.attempts} of {s.max_recovery_attempts}"
            + ("" if count.kept else " (this visit could not be counted: the last one)"),
        )
        for note in count.notes:
            tl.add("detect", note)

        findings = self.collect(count, notes=settled)
        crash = findings.crash
        tl.add(
            "detect",
            f"{crash.kind.value}: {crash.title}"
            + (f" [module {crash.guilty_module}]" if crash.guilty_module else "")
            + (f" channel file {crash.channel_file}" if crash.channel_file else ""),
        )

        if not s.cloud_remediation:
            tl.add("done", "cloud remediation is off: rebooting to try the OS again")
            if not self._reset_boot_count():
                return Outcome.NEEDS_MANUAL
            return Outcome.CLOUD_DISABLED

        deadline = self._deadline = self._deadline or self.clock.monotonic() + s.time_to_reboot_s
        async with DeviceClient(s.server_url) as client:
            sent = await self.report(client, findings, deadline)
            if sent is not None:
                receipt, payload_sha = sent
                outcome = await self.wait_and_apply(client, receipt, payload_sha, deadline)
                if outcome is Outcome.REMEDIATION_FAILED and count.attempts >= s.max_recovery_attempts:
                    # Rebooting goes straight back to recovery (boot_count is at the limit).
                    tl.add(
                        "done",
                        f"the fix could not be applied on recovery attempt {count.attempts} of "
                        f"{s.max_recovery_attempts}: this machine needs manual recovery",
                    )
                    return Outcome.NEEDS_MANUAL
                if outcome is not None:
                    return outcome
        return self._no_fix(count, "no remediation")

    def _no_fix(self, count: BootCount, what: str) -> Outcome:
        """The visit ends with nothing applied: back to the OS for another try, unless that was
        the last attempt (a person must look)."""
        s, tl = self.s, self.timeline
        if count.attempts >= s.max_recovery_attempts:
            why = "" if count.kept else " (grubenv cannot keep the count of attempts: rebuild it)"
            tl.add(
                "done",
                f"{what} after {count.attempts} recovery attempts{why}: this machine "
                "needs manual recovery; not rebooting into the failing OS again",
            )
            return Outcome.NEEDS_MANUAL
        tl.add("done", f"{what} before the time to reboot: rebooting to try the OS again")
        if not self._reset_boot_count():
            return Outcome.NEEDS_MANUAL
        return Outcome.NO_REMEDIATION

    async def _test_visit(self, notes: list[str]) -> Outcome:
        """A recovery test (testmode.py): the loop, on purpose, with a test directive that
        changes nothing on the OS; then back to the OS, whatever happened."""
        s, tl = self.s, self.timeline
        tl.add(
            "test", f"recovery test visit (armed by {self._test}): the whole loop, nothing on the OS changes"
        )
        count = self._count = self._count or self.read_boot_count(count_visit=False)
        outcome: Outcome | None = None
        if not s.cloud_remediation:
            tl.add("test", "cloud remediation is off: nothing to test against")
            outcome = Outcome.CLOUD_DISABLED
        else:
            deadline = self._deadline = self._deadline or self.clock.monotonic() + s.time_to_reboot_s
            async with DeviceClient(s.server_url) as client:
                # (an encrypted disk's test was reported already, to ask for its key)
                sent = self._test_sent or await self.report(
                    client, self._test_findings(count, notes), deadline
                )
                if sent is not None:
                    outcome = await self.wait_and_apply(client, *sent, deadline)
        if outcome is Outcome.REMEDIATED:
            tl.add(
                "done", "recovery test passed here: rebooting into the OS, whose health report completes it"
            )
            return outcome
        if outcome is None:
            tl.add("done", "recovery test FAILED: no test directive before the time to reboot")
        else:
            tl.add("done", f"recovery test FAILED: {outcome.meaning}")
        if not self._reset_boot_count():
            return Outcome.NEEDS_MANUAL
        return outcome if outcome is not None else Outcome.NO_REMEDIATION

    def _test_findings(self, count: BootCount, notes: list[str], *, inventory_too: bool = True) -> Findings:
        """A test visit's diagnostics: what the agent sees, and no crash (it was asked for)."""
        return dataclasses.replace(
            self.collect(count, notes=notes, inventory_too=inventory_too),
            crash=CrashSignature(
                kind=CrashKind.NONE, title="recovery test", source=f"recovery-agent {__version__}"
            ),
            test_mode=True,
            boot=self._boot_state(count, []),  # no failed boots: the visit was asked for
        )

    def read_boot_count(self, *, count_visit: bool) -> BootCount:
        """The count step (``counting.count_visit``): grubenv's ``boot_count`` and, with
        ``count_visit``, this visit added to ``recovery_attempts``. Never raises."""
        s = self.s
        return counting.count_visit(
            s.grubenv,
            boot_limit=s.boot_limit,
            max_attempts=s.max_recovery_attempts,
            count=count_visit,
            say=lambda text: self.timeline.add("detect", text),
        )

    def collect(
        self, count: BootCount, *, notes: list[str] | None = None, inventory_too: bool = True
    ) -> Findings:
        """The detect and collect steps: what the diagnostics will say. Every cut and every
        part that could not be read is a note. ``inventory_too=False``: the OS disk is not
        open yet, only the crash is known."""
        s = self.s
        detection = examine(
            s.pstore_dir,
            s.boot_log,
            boot_count=count.boot_count,
            boot_limit=s.boot_limit,
            boot_progress=s.boot_progress,
        )
        crash = detection.crash
        history, history_notes = boot_history(count.boot_count, crash)
        try:
            if not inventory_too:
                raise inventory.InventoryError("the OS disk is not open")
            inv = inventory.collect(s.os_root, channel_file=crash.channel_file, module=crash.guilty_module)
        except inventory.InventoryError as exc:
            # Report the crash anyway: the server can still cluster it and a person can look.
            self.timeline.add("collect", f"no inventory: {exc}")
            inv = inventory.Inventory(SystemInfo(), [], [], [], [f"no inventory: {exc}"])
        return Findings(
            device_id=s.device_id,
            agent_version=__version__,
            boot=self._boot_state(count, history),
            crash=crash,
            system=inv.system,
            drivers=inv.drivers,
            channel_files=inv.channel_files,
            driver_store=inv.driver_store,
            recent_changes=inventory.recent_changes([*inv.drivers, *inv.channel_files]),
            notes=[*(notes or []), *count.notes, *detection.notes, *history_notes, *inv.notes],
        )

    def _boot_state(self, count: BootCount, history: list[BootRecord]) -> BootState:
        s = self.s
        return BootState(
            boot_count=count.boot_count,
            boot_limit=s.boot_limit,
            recovery_attempts=count.attempts,
            max_recovery_attempts=s.max_recovery_attempts,
            history=history,
        )

    async def report_agent_error(self, exc: Exception) -> Outcome:
        """The agent itself failed: say so on the console and, cloud remediation allowed, to the
        server (diagnostics whose crash is the agent error, with what is known of the boots),
        then ``Outcome.ERROR``. Nothing raised here escapes."""
        s, tl = self.s, self.timeline
        try:
            crash = agent_error_signature(exc)
            tl.add("error", f"{crash.title}: {wire_text(exc, 300)}")
            log.error("the recovery agent failed", exc_info=exc)
            if not s.cloud_remediation:
                return Outcome.ERROR
            count = self._count or self.read_boot_count(count_visit=False)
            findings = Findings(
                device_id=s.device_id,
                agent_version=__version__,
                boot=self._boot_state(count, []),
                crash=crash,
                system=SystemInfo(),
                drivers=[],
                channel_files=[],
                driver_store=[],
                recent_changes=[],
                notes=[
                    *count.notes,
                    f"the recovery agent failed ({type(exc).__name__}: {wire_text(exc, 300)}); "
                    "the crash evidence was not reported",
                ],
            )
            deadline = self._deadline or self._started + s.time_to_reboot_s
            deadline = max(deadline, self.clock.monotonic() + 1)  # at least one try
            async with DeviceClient(s.server_url) as client:
                await self.report(client, findings, deadline)
        except Exception as again:
            tl.add(
                "error",
                f"the agent error could not be reported: {type(again).__name__}: {wire_text(again, 300)}",
            )
        return Outcome.ERROR

    async def report(
        self, client: DeviceClient, findings: Findings, deadline: float
    ) -> tuple[DiagnosticsReceipt, str] | None:
        """Send signed diagnostics; on network trouble keep trying until the deadline."""
        tl = self.timeline
        while self.clock.monotonic() < deadline:
            try:
                challenge = await client.challenge(self.s.device_id)
                self.agent_nonce = secrets.token_urlsafe(24)
                diagnostics = findings.diagnostics(
                    server_nonce=challenge.nonce, agent_nonce=self.agent_nonce, created_at=utcnow()
                )
                sealed = seal_within(diagnostics, self.key)
                receipt = await client.send_diagnostics(sealed.body)
            except ServerUnreachable as exc:
                tl.add("report", f"{exc}; trying again in {self.s.retry_interval_s:.0f}s")
                await self.clock.sleep(
                    max(0.0, min(self.s.retry_interval_s, deadline - self.clock.monotonic()))
                )
                continue
            except ServerRefused as exc:
                tl.add("report", f"the server refused the diagnostics: {exc.message}")
                return None
            # Bind directives to what this agent sent, not to what the server says it got.
            payload_sha = payload_sha256(sealed.envelope)
            if receipt.diagnostics_sha256 != payload_sha:
                tl.add(
                    "report",
                    "the server's receipt names other diagnostics than the ones sent; "
                    "a directive for them would be refused",
                )
            tl.add(
                "report", f"diagnostics accepted: report {receipt.report_id}, incident {receipt.incident_id}"
            )
            return receipt, payload_sha
        tl.add("report", "could not reach the server before the time to reboot")
        return None

    async def wait_and_apply(
        self, client: DeviceClient, receipt: DiagnosticsReceipt, payload_sha: str, deadline: float
    ) -> Outcome | None:
        s, tl = self.s, self.timeline
        tl.add(
            "wait",
            f"waiting for a directive (retry every {s.retry_interval_s:.0f}s, "
            f"reboot after {s.time_to_reboot_s:.0f}s)",
        )
        while True:
            started = self.clock.monotonic()
            remaining = deadline - started
            if remaining <= 0:
                return None
            try:
                poll = await client.poll_directive(receipt, wait_s=min(s.long_poll_s, remaining))
            except ServerUnreachable as exc:
                tl.add("wait", str(exc))
                poll = None
            except ServerRefused as exc:
                tl.add("wait", f"the server refused the poll: {exc.message}")
                return None
            if poll is not None and poll.status == "directive":
                try:
                    verified = open_directive(
                        poll.envelope if poll.envelope is not None else {},  # refused as malformed
                        self.server_keyring,
                        device_id=s.device_id,
                        agent_nonce=self.agent_nonce,
                        diagnostics_sha256=payload_sha,
                        now=self.clock.now(),
                        approver_keyring=self.approver_keyring,
                        approver_threshold=s.approver_threshold,
                        test_visit=self._test is not None,
                    )
                except EnvelopeError as exc:
                    tl.add("verify", f"directive REJECTED: {exc}")
                else:
                    return await self.apply(client, verified)
            elif poll is not None and poll.status == "none":
                tl.add("wait", "the server has no remediation for this device")
                return None
            if not s.auto_remediation:
                tl.add("wait", "auto remediation is off: not asking again")
                return None
            next_check = started + s.retry_interval_s
            left = deadline - self.clock.monotonic()
            pause = min(next_check, deadline) - self.clock.monotonic()
            if left > 0:
                when = f"in {pause:.0f}s" if pause >= 1 else "now"
                tl.add("wait", f"no directive yet; asking again {when} ({left:.0f}s before the reboot)")
            if pause > 0:
                await self.clock.sleep(pause)

    async def apply(self, client: DeviceClient, verified: Verified[Directive]) -> Outcome:
        d, tl = verified.message, self.timeline
        tl.add(
            "verify",
            f"directive {d.directive_id} verified: remediation {d.remediation_id} "
            f"({d.remediation_title}), {len(d.actions)} action(s)",
        )
        try:
            results = apply_directive(self.s.os_root, d)
        except RemediationError as exc:
            tl.add("apply", f"refused, nothing changed: {exc}")
            await self._send_result(
                client,
                Result(
                    device_id=self.s.device_id,
                    directive_id=d.directive_id,
                    outcome="failed",
                    error=str(exc)[:4096],
                    created_at=utcnow(),
                ),
            )
            return Outcome.REMEDIATION_FAILED
        for r in results:
            tl.add("apply", f"action {r.index} {r.type}: {r.status} {r.detail}")
        if not await self._complete(client, d.directive_id, results):
            return Outcome.NEEDS_MANUAL
        return Outcome.REMEDIATED

    async def _complete(self, client: DeviceClient, directive_id: str, results: list[ActionResult]) -> bool:
        """The directive is on the disk: record it for the next healthy boot to confirm, reset
        ``boot_count`` so GRUB boots the OS, report the result. Recorded before the reset: from
        the reset on the next boot is the OS's, and its health report must name the directive.
        False if ``boot_count`` could not be reset (a person must repair grubenv)."""
        tl = self.timeline
        try:
            state.record_applied(self.s.os_root, directive_id)
        except (AgentError, OSError) as exc:
            # The fix is on the disk; only the next healthy boot's confirmation of it is lost.
            tl.add("apply", f"could not record {LAST_DIRECTIVE}: {exc}")
        reset = self._reset_boot_count()
        if reset:
            tl.add("apply", "boot_count reset to 0")
        holds.reached("grubenv")
        holds.reached("result")
        await self._send_result(
            client,
            Result(
                device_id=self.s.device_id,
                directive_id=directive_id,
                outcome="applied",
                actions=results,
                boot_count_reset=reset,
                created_at=utcnow(),
            ),
        )
        if not reset:
            # GRUB would start recovery again at once: the fix stays, a person repairs grubenv.
            tl.add(
                "done", "remediation applied, but boot_count could not be reset: a person must repair grubenv"
            )
            return False
        tl.add("done", "remediation applied: rebooting into the OS")
        return True

    async def _send_result(self, client: DeviceClient, result: Result) -> None:
        try:
            await client.send_result(seal_bytes(result, self.key))
            self.timeline.add("result", f"result '{result.outcome}' reported")
        except (ServerUnreachable, ServerRefused) as exc:
            # The OS reports health after the reboot; the server learns of the fix from that.
            self.timeline.add("result", f"could not report the result: {exc}")

    # ------------------------------------------------------------------ state

    def _reset_boot_count(self) -> bool:
        """``boot_count`` to 0, so the next boot is the OS's; on a test visit the test is
        disarmed in the same write."""

        def say(text: str) -> None:
            self.timeline.add("done", text)

        if self._test is None:
            return counting.reset_boot_count(self.s.grubenv, say)
        try:
            testmode.disarm(self.s.grubenv)
        except (BootEnvError, OSError) as exc:
            say(f"could not disarm the recovery test and reset boot_count: {exc}")
            return False
        return True


async def report_health(settings: AgentSettings, boot_id: str, kernel_version: str = "") -> dict[str, Any]:
    """Run by the OS once its health check passed: reset the counters, tell the server (naming
    the directive applied since the last good boot, and with what the device runs: its
    inventory, as changes to the one the server stored last), then confirm that directive and
    archive the crash records (``state``). Trouble with the agent's state files on the OS disk
    or its inventory is logged, not raised: the good boot is reported all the same."""
    env = BootEnv.read(settings.grubenv)
    env.set(BOOT_COUNT, "0")
    if RECOVERY_ATTEMPTS in env:  # unset means 0; adding it could overflow a full block
        env.set(RECOVERY_ATTEMPTS, "0")
    env.write(settings.grubenv)
    try:
        directive_id = state.last_directive(settings.os_root)
    except AgentError as exc:
        log.warning("%s; reporting the good boot without a directive", exc)
        directive_id = None
    key = SigningKey.load(settings.device_key)
    files = _inventory_now(settings.os_root)
    try:
        sent = state.sent_inventory(settings.os_root)
    except AgentError as exc:
        log.warning("%s; sending the whole inventory", exc)
        sent = None

    def health(update: InventoryUpdate | None) -> bytes:
        message = Health(
            device_id=settings.device_id,
            directive_id=directive_id,
            boot_id=boot_id,
            kernel_version=kernel_version,
            created_at=utcnow(),
            inventory=update,
        )
        return seal_bytes(message, key)

    if files is not None and len(health(inventory_update(files, None))) > HEALTH_MAX_BYTES:
        # The whole would not fit in one report: the inventory is the most recently changed
        # files that do (the server then knows those; the next change list is against them).
        files = _fit_inventory(
            files, lambda kept: len(health(inventory_update(kept, None))) <= HEALTH_MAX_BYTES
        )
        log.warning(
            "the inventory is too large for one report: %d most recently changed files sent", len(files)
        )
    async with DeviceClient(settings.server_url) as client:
        update = None if files is None else inventory_update(files, sent)
        answer = await client.send_health(health(update))
        if files is not None and answer.get("inventory") == "send-whole" and sent is not None:
            # The server holds another inventory than ours: the whole, with this boot again
            # (the boot was recorded by the first: the second is a duplicate of it).
            again = await client.send_health(health(inventory_update(files, None)))
            answer = {**answer, "inventory": again.get("inventory")}
        try:  # an encrypted disk's recovery key, escrowed at install (diskkey.py)
            escrowed = await diskkey.deliver_pending(client, settings.os_root)
        except (ServerRefused, ServerUnreachable, OSError) as exc:
            log.warning("the disk key's escrow was not delivered (it stays pending): %s", exc)
        else:
            if escrowed is not None:
                answer = {**answer, "escrow": escrowed.get("key_id")}
    if answer.get("recovery_test") == "requested":
        # An admin asked for a recovery test (testmode.py): the next boot runs it.
        try:
            if testmode.armed(settings.grubenv) is None:
                testmode.arm(settings.grubenv, testmode.SERVER)
            answer = {**answer, "recovery_test": "armed"}
        except (BootEnvError, OSError) as exc:
            log.warning("the server asked for a recovery test, and it could not be armed: %s", exc)
    try:
        if files is not None and answer.get("inventory") == "stored":
            state.record_sent_inventory(settings.os_root, {p: r.sha256 for p, r in files.items()})
        if directive_id:
            state.confirm_last_directive(settings.os_root)
        state.archive_pstore(settings.pstore_dir, settings.os_root)
    except (AgentError, OSError) as exc:
        log.warning("the good boot was reported, but: %s", exc)
    return answer


# A health report, inventory included, stays within what the server takes in one request.
HEALTH_MAX_BYTES = MAX_ENVELOPE_BYTES


def _fit_inventory(
    files: dict[str, FileRecord], fits: Callable[[dict[str, FileRecord]], bool]
) -> dict[str, FileRecord]:
    """The most recently changed of ``files`` (ties by path) that ``fits`` takes: a tenth fewer
    each try."""
    ordered = sorted(files.values(), key=lambda r: (-r.mtime, r.path))
    n = len(ordered)
    while n > 0:
        kept = {r.path: r for r in ordered[:n]}
        if fits(kept):
            return kept
        n = min(n - 1, n * 9 // 10)
    return {}


def _inventory_now(os_root: Path) -> dict[str, FileRecord] | None:
    """The device's drivers, channel files and driver store by path, or None if they cannot
    be read (the health report then goes without)."""
    try:
        inv = inventory.collect(os_root)
    except AgentError as exc:
        log.warning("no inventory in this health report: %s", exc)
        return None
    return {r.path: r for r in (*inv.drivers, *inv.channel_files, *inv.driver_store)}


def inventory_update(files: dict[str, FileRecord], sent: dict[str, str] | None) -> InventoryUpdate:
    """``files`` as the change to ``sent`` (the inventory the server stored last), or whole if
    there is none."""
    digest = inventory_digest((p, r.sha256) for p, r in files.items())
    if sent is None:
        return InventoryUpdate(digest=digest, files=list(files.values()))
    return InventoryUpdate(
        base=inventory_digest(sent.items()),
        digest=digest,
        files=[r for p, r in files.items() if sent.get(p) != r.sha256],
        removed=sorted(p for p in sent if p not in files),
    )
