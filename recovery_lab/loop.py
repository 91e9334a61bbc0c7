"""``recovery-lab run SCENARIO``: the whole recovery loop, end to end, in QEMU.

1. Build (or take from the cache) the scenario's disk image.
2. Start a recovery server on 127.0.0.1 (SQLite in the run's folder) with an admin, and for
   ``--auto-approve`` two lab people: one writes the fix, the other approves it.
3. Enroll the machine's device key, as it would have been enrolled while healthy, and put
   the per-run settings (server URL, pinned server key, device key, QMR timing) on a small
   seed disk. The cached base image holds no secrets.
4. Boot the image (a qcow2 overlay; the base is never written) with user-mode networking
   restricted to the server's port, and follow it: the failed boots, GRUB's switch to the
   recovery environment, the agent's diagnostics, the approval (by the lab with
   ``--auto-approve``, else by a person with ``recovery-admin`` while it waits), the
   directive, the reboot, the healthy boot reported back.
5. Read the disk the run left (quarantine, channel files, grubenv) and the server's records,
   print the timeline with the time of each phase, and write a JSON report that lists every
   way the run missed its expectation (a recovery, or with ``--fault`` what the fault
   predicts: ``recovery_lab.faults``).

The fix comes from the server's catalog of known fixes (``recovery_server.catalog``); a
scenario with no known fix (``unknown``) shows the agent retrying, rebooting when its time is
up, and finally asking for a person.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from recovery_agent.layout import (
    BOOT_PROGRESS_LOG,
    CHANNEL_DIR,
    QUARANTINE_DIR,
    RECOVERY_TESTS_DIR,
    STATE_DIR,
)
from recovery_agent.protocol.admin import Device, DeviceDetail
from recovery_agent.protocol.client import DeviceClient
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import Diagnostics, Enrollment, utcnow
from recovery_server.access import User, console
from recovery_server.app import make_app
from recovery_server.diskkeys import ESCROW_KEY, EscrowKeyFile
from recovery_server.errors import NotFound
from recovery_server.service import RecoveryService
from recovery_server.store import Store

from .boot import BootReport, follow_boot
from .build import BuildError, build_image
from .build.debian import DebianImage
from .checkout import IMAGES
from .faults import (
    DEFAULT_POWER_LOSS_AT,
    TAMPER_DIRECTIVE,
    DirectiveTamperer,
    Fault,
    RunFacts,
    disk_facts,
    judge,
    make_faults,
)
from .fleet import FleetSummary, surround
from .inspect import OS, DiskImage
from .qemu import Drive, MachineConfig, QemuVM
from .runreport import Phase, RunReport
from .scenario import find_scenario, load_scenario
from .seed import make_seed_disk, rewrite_seed_disk
from .timeline import EntryKind

# Where the images mount the machine's disks before they run the agent (images/os/lib.sh,
# images/recovery/init): the OS root and the ESP's grubenv.
GUEST_OS_ROOT = "/mnt/os"
GUEST_GRUBENV = "/mnt/esp/grub/grubenv"
# The lab's own entries in a run's event list start with this (lab.directive_tampered, ...).
LAB_EVENT = "lab."
# The Debian base (recovery_lab.build.debian): the port its settings name, its memory, and the
# console line that ends a run there (the image says where its root and grubenv are).
DEBIAN_GUEST_PORT = 8080
DEBIAN_MEMORY_MB = 1024
DEBIAN_STOP = r"QMR-HEALTH-REPORT(ED|-FAILED)"
TAMPERED_EVENT = "lab.directive_tampered"
# The lab's two people: one writes fixes (and asks for recovery tests), the other approves.
LAB_OPERATOR = User("lab-operator", "operator")
LAB_APPROVER = User("lab-approver", "approver")
# Console lines worth showing while the run goes on: GRUB's choice, the crash, the recovery
# environment and the agent, the health check.
_PROGRESS = re.compile(
    r"QMR-(GRUB|HEALTH|RECOVERY-AGENT|AGENT|NEEDS|UNHEALTHY|HOLD)|^\[agent \+|"
    r"^\[[ \d.]+\] (Kernel panic - not syncing|RIP: 0010|watchdog: BUG)"
)


@dataclass
class RunOptions:
    """What to run (``recovery-lab run``'s options) and where its progress lines go."""

    scenario: str
    auto_approve: bool = False
    # Simulated devices around the machine (recovery_lab/fleet.py; 0: none).
    fleet: int = 0
    # Test mode: an operator asks the (healthy) machine for a recovery test before it boots;
    # the run then judges the test (it visits recovery, changes nothing, boots back, passes).
    recovery_test: bool = False
    timeout_s: float = 900.0
    workdir: Path | None = None
    keep: bool = False
    accel: str = "tcg"
    # QMR settings for the agent, in lab minutes (seconds_per_minute seconds each).
    seconds_per_minute: float = 1.0
    retry_interval_min: int = 5
    time_to_reboot_min: int = 90
    max_recovery_attempts: int = 3
    # Faults to inject (recovery_lab.faults.FAULTS); none for a plain recovery.
    faults: list[str] = field(default_factory=list)
    # The apply's steps the power-loss fault cuts the power at, one per recovery visit.
    power_loss_at: tuple[str, ...] = DEFAULT_POWER_LOSS_AT
    # The machine: "lab" (the busybox OS) or "debian" (stock Debian 12 with QMR installed by
    # recovery-agent install: recovery_lab.build.debian, which bakes its QMR timing in).
    base: str = "lab"
    # The Debian base's firmware: "bios" or "uefi" (OVMF); the lab's base boots BIOS only.
    # None: a user's image says (its GRUB package).
    firmware: str | None = "bios"
    # The Debian base: installed with --panic-on-oops (a driver's oops panics) or without (the
    # boot goes on and the health check's verdict reboots). The lab's base always panics.
    panic_on_oops: bool = True
    # The Debian base made from a user's own disk image (raw or qcow2) instead of the lab's.
    image: Path | None = None
    # The Debian base with its root on LUKS2 (recovery_lab.build.debian): the recovery
    # environment asks the server for the disk key; with --auto-approve the lab's approver
    # approves its release (the lab's machine has no TPM to seal its device key in).
    encrypted: bool = False
    log: Callable[[str], None] = print


class _Lab:
    """The server side of a run, in this process, on this event loop."""

    def __init__(self, work: Path, opts: RunOptions, faults: list[Fault]) -> None:
        self.work = work
        self.opts = opts
        self.faults = faults
        self.started = time.monotonic()
        self.seen: list[tuple[float, dict[str, Any]]] = []  # (seconds since start, event)
        self._last_seq = 0
        self.tamperer: DirectiveTamperer | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0
        # The lab approves (with --auto-approve) once no fault holds the approval back.
        self.approvals_open = asyncio.Event()
        if not any(f.holds_approval for f in faults):
            self.approvals_open.set()
        # With --fleet: the machine, the paths its scenario added or replaced, what the fleet did.
        self.device_id = ""
        self.updated_paths: set[str] = set()
        self.fleet: FleetSummary | None = None

    def now(self) -> float:
        return time.monotonic() - self.started

    async def start(self, server_key: SigningKey | None = None, escrow: EscrowKeyFile | None = None) -> None:
        self.data = self.work / "server"
        self.data.mkdir(parents=True, exist_ok=True)
        self.key = server_key or SigningKey.generate()
        self.key.save(self.data / "server.key")
        self.escrow = escrow
        if escrow is not None:
            escrow.save(self.data / ESCROW_KEY)
        await self.start_server()
        admin_token = self.service.create_user(console("setup"), "admin", "admin").token
        (self.work / "admin.token").write_text(admin_token + "\n")
        (self.work / "admin.token").chmod(0o600)
        # Two lab people: one writes a fix, the other approves it (the author never counts).
        # Their tokens are on disk too, so a person can act for them with recovery-admin.
        for name, role in (("lab-operator", "operator"), ("lab-approver", "approver")):
            path = self.work / f"{name}.token"
            path.write_text(self.service.create_user(console("setup"), name, role).token + "\n")
            path.chmod(0o600)
        self.enroll_token = self.service.create_enrollment_token(User("admin", "admin"), "lab").token
        self.url = f"http://127.0.0.1:{self.port}"
        self.guest_port = self.port
        if TAMPER_DIRECTIVE in self.opts.faults:
            self.tamperer = DirectiveTamperer(self.url, on_tamper=lambda: self.note("directive_tampered"))
            self.guest_port = await self.tamperer.start()

    async def start_server(self) -> None:
        """The server on the run's data directory: on a free port the first time, then on the
        same one (a restart)."""
        self.service = RecoveryService(
            store=Store(self.data / "recovery.db"), server_key=self.key, escrow=self.escrow
        )
        # shutdown_timeout=0: stopping cuts open requests, as a killed process would.
        self.runner = web.AppRunner(make_app(self.service), access_log=None, shutdown_timeout=0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = int(self.runner.addresses[0][1])

    async def stop_server(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
            self.service.store.close()

    def note(self, kind: str, detail: str = "") -> None:
        """A lab event on the run's timeline (``lab.<kind>``)."""
        self.seen.append(
            (self.now(), {"kind": LAB_EVENT + kind, "subject": "", "actor": "lab", "detail": detail})
        )
        self.opts.log(f"[lab +{self.now():6.1f}s] lab: {kind} {detail}")

    async def stop(self) -> None:
        if self.tamperer is not None:
            await self.tamperer.stop()
        await self.stop_server()

    async def enroll(self, device_id: str, key: SigningKey | None = None) -> SigningKey:
        """Enroll ``key`` (a new one if None) as ``device_id``, as the device would while healthy."""
        key = key or SigningKey.generate()
        msg = Enrollment(
            device_id=device_id,
            public_key=public_b64(key.public),
            enrollment_token=self.enroll_token,
            hostname=device_id,
            created_at=utcnow(),
        )
        async with DeviceClient(self.url) as c:
            await c.enroll(seal_bytes(msg, key))
        return key

    def poll_events(self) -> list[dict[str, Any]]:
        if self.runner is None:  # the server is stopped (a fault)
            return []
        new = [e.model_dump(mode="json") for e in self.service.events(console("lab"), after=self._last_seq)]
        for e in new:
            self._last_seq = e["seq"]
            self.seen.append((self.now(), e))
        return new

    def first(self, kind: str, device_id: str | None = None) -> float | None:
        """When the first ``kind`` event was seen (of ``device_id`` only, if given)."""
        return next(
            (t for t, e in self.seen if e["kind"] == kind and device_id in (None, e.get("device_id"))), None
        )


class _FaultControl:
    """What the run's faults may do to it (recovery_lab.faults.FaultControl)."""

    def __init__(self, lab: _Lab, vm: QemuVM, seed: Path, settings: dict[str, Any], deadline: float) -> None:
        self.lab = lab
        self.vm = vm
        self.seed = seed
        self.settings = settings
        self.deadline = deadline
        self._pos = 0

    async def console(self, pattern: str, *, fresh: bool = False) -> re.Match[str]:
        if fresh:
            self._pos = len(self.vm.console.text())
        m = await self.vm.console.wait_for(
            pattern, max(1.0, self.deadline - time.monotonic()), since=self._pos
        )
        self._pos = m.end()
        return m

    def note(self, kind: str, detail: str = "") -> None:
        self.lab.note(kind, detail)

    async def stop_server(self) -> None:
        await self.lab.stop_server()

    async def start_server(self) -> None:
        await self.lab.start_server()

    def hold_at(self, step: str | None) -> None:
        settings = dict(self.settings)
        settings.pop("lab_hold_at", None)
        if step is not None:
            settings["lab_hold_at"] = step
        rewrite_seed_disk(self.seed, {"agent.json": json.dumps(settings, indent=1).encode()})

    async def drive(self, faults: list[Fault], problems: list[str]) -> None:
        """Each fault in turn, then open the approvals; what goes wrong becomes a problem."""
        try:
            for fault in faults:
                self._pos = 0  # each fault reads the console from the start
                try:
                    await fault.drive(self)
                except Exception as exc:  # a fault that could not act: the run says so
                    problems.append(f"fault {fault.name} could not act: {type(exc).__name__}: {exc}")
                    self.lab.note("fault_failed", fault.name)
        finally:
            self.lab.approvals_open.set()


async def _watch(lab: _Lab, opts: RunOptions, done: asyncio.Event) -> None:
    """Follow the server: announce what happens, and approve known fixes with --auto-approve."""
    say = opts.log
    handled: set[str] = set()
    approving: list[asyncio.Task[None]] = []
    while not done.is_set():
        for e in lab.poll_events():
            kind, subject = e["kind"], e["subject"] or ""
            if kind in ("device.enrolled", "user.created", "enrollment_token.created"):
                continue
            say(f"[lab +{lab.now():6.1f}s] server: {kind} {subject} {_short(e['detail'])}")
            if kind == "disk_key.requested" and not json.loads(e["detail"]).get("automatic"):
                if opts.auto_approve:
                    lab.service.decide_key_release(LAB_APPROVER, subject, True)
                else:
                    say(
                        f"[lab +{lab.now():6.1f}s] the disk key's release waits for a person:\n"
                        f"    recovery-admin --server {lab.url} --token-file "
                        f"{lab.work / 'lab-approver.token'} device keys {e.get('device_id')} "
                        f"--approve {subject}"
                    )
                continue
            if kind == "diagnostics.received":
                incident = json.loads(e["detail"])["incident"]
                if incident in handled:
                    continue
                if opts.fleet and lab.fleet is None and e.get("device_id") == lab.device_id:
                    await _surround(lab, opts)
                proposal = lab.service.suggest_actions(LAB_OPERATOR, incident)
                if not proposal.actions:
                    # (a later report may say more: an encrypted machine's first one, sent
                    # before its disk is open, lists no files)
                    say(f"[lab +{lab.now():6.1f}s] catalog: {'; '.join(proposal.why)}")
                    continue
                handled.add(incident)
                if not opts.auto_approve:
                    admin = f"recovery-admin --server {lab.url} --token-file"
                    say(
                        f"[lab +{lab.now():6.1f}s] the catalog proposes: {proposal.title}. Waiting for "
                        f"people (or rerun with --auto-approve):\n"
                        f"    {admin} {lab.work / 'lab-operator.token'} remediation create "
                        f"--incident {incident} --suggested\n"
                        f"    {admin} {lab.work / 'lab-approver.token'} remediation approve REMEDIATION_ID"
                    )
                    continue
                approving.append(
                    asyncio.create_task(_approve(lab, incident, proposal.title, proposal.actions))
                )
        await asyncio.sleep(0.2)
    for task in approving:
        task.cancel()
    await asyncio.gather(*approving, return_exceptions=True)


async def _surround(lab: _Lab, opts: RunOptions) -> None:
    """The simulated fleet (recovery_lab/fleet.py), made from the machine's first report."""
    row = lab.service.store.one(
        "SELECT payload FROM reports WHERE device_id = ? ORDER BY received_at LIMIT 1", lab.device_id
    )
    assert row is not None, "its diagnostics.received was seen"
    machine = Diagnostics.model_validate_json(row["payload"])
    lab.fleet = await surround(lab.url, lab.enroll_token, machine, lab.updated_paths, opts.fleet)
    opts.log(
        f"[lab +{lab.now():6.1f}s] fleet: {lab.fleet.devices} simulated devices "
        f"({lab.fleet.crashing} crashing like the machine, {lab.fleet.healthy} healthy with their "
        "inventories)"
    )


async def _approve(lab: _Lab, incident: str, title: str, actions: list[Any]) -> None:
    """The two lab people write and approve the catalog's fix, once no fault holds it back."""
    await lab.approvals_open.wait()
    rem = lab.service.create_remediation(LAB_OPERATOR, title=title, actions=actions, incident_id=incident)
    lab.service.approve(LAB_APPROVER, rem.remediation_id)


def _debian_image(opts: RunOptions) -> DebianImage:
    """The scenario's image on the Debian base; its QMR timing was baked in by the installer,
    so a run cannot ask for other timing."""
    from .build.debian import LAB_TIMING, build_debian_image

    asked = {
        "seconds_per_minute": opts.seconds_per_minute,
        "retry_interval_min": opts.retry_interval_min,
        "time_to_reboot_min": opts.time_to_reboot_min,
        "max_recovery_attempts": opts.max_recovery_attempts,
    }
    differ = {k: v for k, v in asked.items() if LAB_TIMING[k] != v}
    if differ:
        raise BuildError(
            f"the Debian base's QMR timing is set at install ({LAB_TIMING}); a run cannot change "
            f"{', '.join(differ)}: leave them at their defaults"
        )
    return build_debian_image(
        opts.scenario,
        log=opts.log,
        firmware=opts.firmware,
        panic_on_oops=opts.panic_on_oops,
        image=opts.image,
        encrypted=opts.encrypted,
    )


def _short(detail: str) -> str:
    return detail if len(detail) < 140 else detail[:137] + "..."


async def run_async(opts: RunOptions) -> RunReport:
    say = opts.log
    faults = make_faults(opts.faults, opts.power_loss_at)
    # (the Debian build may boot a provisioning VM with its own event loop: off this one)
    debian = await asyncio.to_thread(_debian_image, opts) if opts.base == "debian" else None
    built = debian or build_image(opts.scenario, log=say)
    base_image, name = built.image, built.scenario  # (opts.scenario may be a .toml path)
    work = opts.workdir or Path(tempfile.mkdtemp(prefix=f"qmr-run-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    image = base_image
    for fault in faults:
        image = fault.prepare_disk(image, work)
    lab = _Lab(work, opts, faults)
    escrow = EscrowKeyFile.load(debian.escrow_key) if debian and debian.escrow_key else None
    await lab.start(SigningKey.load(debian.server_key) if debian else None, escrow)
    device_id = debian.device_id if debian else f"lab-{name}"[:64]
    lab.device_id = device_id
    if opts.fleet:
        scenario = load_scenario(find_scenario(opts.scenario, IMAGES))
        lab.updated_paths = {f.path for f in scenario.files if f.action in ("add", "replace")}
    problems: list[str] = []
    try:
        key = await lab.enroll(device_id, SigningKey.load(debian.device_key) if debian else None)
        say(
            f"[lab +{lab.now():6.1f}s] server on {lab.url} (admin token in {work / 'admin.token'}); "
            f"device {device_id} enrolled"
        )
        if debian and debian.escrow_message:
            # The disk key's escrow the install sealed for the server: sent as the machine's
            # first health report would have sent it (its scenario broke it before that boot).
            async with DeviceClient(lab.url) as client:
                escrowed = await client.send_escrow(debian.escrow_message.read_bytes())
            say(
                f"[lab +{lab.now():6.1f}s] the disk key's escrow from the install delivered "
                f"({escrowed['key_id']}), as the machine's first health report would have"
            )
        if opts.recovery_test:
            lab.service.request_recovery_test(LAB_OPERATOR, device_id)
            say(
                f"[lab +{lab.now():6.1f}s] {LAB_OPERATOR.name} asked {device_id} for a recovery test: it "
                "learns so in the answer to its next health report"
            )
        settings: dict[str, Any] = {
            "device_id": device_id,
            "server_url": f"http://10.0.2.100:{lab.guest_port}",
            "server_public_key": public_b64(lab.key.public),
            "device_key": "device.key",
            "os_root": GUEST_OS_ROOT,
            "grubenv": GUEST_GRUBENV,
            "pstore_dir": "/sys/fs/pstore",
            "boot_progress": f"{GUEST_OS_ROOT}/{BOOT_PROGRESS_LOG}",
            "seconds_per_minute": opts.seconds_per_minute,
            "retry_interval_min": opts.retry_interval_min,
            "time_to_reboot_min": opts.time_to_reboot_min,
            "max_recovery_attempts": opts.max_recovery_attempts,
            "long_poll_s": 10,
        }
        for fault in faults:
            settings.update(fault.agent_settings())
        key_pem = key.private_pem()
        seed = make_seed_disk(
            work / "seed.img", {"agent.json": json.dumps(settings, indent=1).encode(), "device.key": key_pem}
        )
        base_settings = {k: v for k, v in settings.items() if k != "lab_hold_at"}
        config = MachineConfig(
            disk=image,
            accel=opts.accel,
            forward_port=lab.guest_port,
            extra_drives=[Drive(seed, "raw", "virtio", readonly=True)],
        )
        if debian:
            # The image carries its own settings and key (the installer's); no seed disk.
            config = MachineConfig(
                disk=image,
                accel=opts.accel,
                forward_port=lab.guest_port,
                forward_guest_port=DEBIAN_GUEST_PORT,
                memory_mb=DEBIAN_MEMORY_MB,
                firmware=debian.firmware,
                extra_args=debian.qemu_args(),
            )
        done = asyncio.Event()
        watcher = asyncio.create_task(_watch(lab, opts, done))
        say(f"[lab +{lab.now():6.1f}s] booting {image.name} ({opts.base} base) under {opts.accel}")
        vm_started = lab.now()
        deadline = time.monotonic() + opts.timeout_s

        def progress(_: float, line: str) -> None:
            line = line.strip()
            if _PROGRESS.search(line):
                say(f"[vm  +{lab.now():6.1f}s] {line[:160]}")

        async def drive(vm: QemuVM) -> None:
            control = _FaultControl(lab, vm, seed, base_settings, deadline)
            await control.drive(faults, problems)

        try:
            boot = await follow_boot(
                config,
                timeout=opts.timeout_s,
                keep_logs=True,
                run_dir=work / "vm",
                name=name,
                on_line=progress,
                drive=drive if faults else None,
                # A Debian machine stays up after its good boot: stop once it was reported,
                # shut down cleanly so that its disk can be read.
                stop_on=DEBIAN_STOP if debian else None,
                power_down=debian is not None,
            )
        finally:
            done.set()
            await watcher
        lab.poll_events()
        report = _judge(lab, opts, name, faults, boot, vm_started, device_id, work, problems, debian)
        if opts.recovery_test:
            report.recovery_test, test_problems = _judge_recovery_test(
                lab, device_id, boot, base_image, work, debian
            )
            report.problems += test_problems
    finally:
        await lab.stop()
    (work / "report.json").write_text(json.dumps(report.to_json(), indent=1))
    if not opts.keep:
        for p in (work / "vm").glob("*.qcow2"):
            p.unlink()
        if image != base_image:
            image.unlink(missing_ok=True)
    return report


def _machine(svc: RecoveryService, device_id: str) -> DeviceDetail | None:
    """The lab machine's device page (None if it never enrolled): not the fleet's list, which
    comes a page at a time and may not start with it."""
    try:
        return svc.device(console("lab"), device_id)
    except NotFound:
        return None


def _device_json(machine: DeviceDetail | None) -> dict[str, Any]:
    """The machine as the admin API lists devices ({} if it never enrolled)."""
    if machine is None:
        return {}
    return machine.model_dump(mode="json", include=set(Device.model_fields))


def _judge(
    lab: _Lab,
    opts: RunOptions,
    name: str,
    faults: list[Fault],
    boot: BootReport,
    vm_started: float,
    device_id: str,
    work: Path,
    drive_problems: list[str],
    debian: DebianImage | None = None,
) -> RunReport:
    svc = lab.service

    def t(seconds: float) -> float:  # VM time -> run time
        return vm_started + seconds

    grub = boot.timeline.of_kind(EntryKind.GRUB_ENTRY)
    first_recovery = next((e for e in grub if e.data.get("entry") == "recovery"), None)
    phases: list[Phase] = []
    if first_recovery:
        phases.append(Phase("failed boots", t(0), t(first_recovery.seconds)))
    diag = lab.first("diagnostics.received", device_id)
    if first_recovery and diag:
        phases.append(Phase("recovery environment and diagnostics", t(first_recovery.seconds), diag))
    approved = lab.first("remediation.approved")
    issued = lab.first("directive.issued", device_id)
    if diag and approved:
        phases.append(Phase("approval", diag, approved))
    result = lab.first("result.received", device_id)
    if issued and result:
        phases.append(Phase("directive verified and applied", issued, result))
    health = lab.first("health.reported", device_id)
    if result and health:
        phases.append(Phase("reboot to a healthy boot", result, health))

    results = [r.model_dump(mode="json") for r in svc.device_results(console("lab"), device_id)]
    machine = _machine(svc, device_id)
    directives = [
        {"directive_id": r["directive_id"], "outcome": r["outcome"]}
        for r in svc.store.all(
            "SELECT directive_id, outcome FROM directives WHERE device_id = ? ORDER BY issued_at", device_id
        )
    ]
    # Recovered: the OS reported a healthy boot after a fix was applied (the result may be
    # lost to a power cut; the healthy boot names the directive then).
    recovered = bool(
        health
        and (
            any(r["outcome"] == "applied" for r in results)
            or any(d["outcome"] == "succeeded" for d in directives)
        )
    )
    incidents = [i.model_dump(mode="json") for i in svc.incidents(console("lab"))]
    incident = None
    if incidents:
        mine = {r.incident_id for r in machine.reports} if machine else set()
        inc = next((i for i in incidents if i["incident_id"] in mine), incidents[0])
        incident = {
            k: inc[k]
            for k in (
                "incident_id",
                "kind",
                "title",
                "guilty_module",
                "guilty_frame",
                "channel_file",
                "report_count",
                "devices",
                "devices_total",
            )
        }
        incident["results"] = results
        incident["directives"] = directives
        if lab.fleet is not None:
            corr = svc.correlation(console("lab"), inc["incident_id"])
            incident["fleet"] = lab.fleet.to_json()
            incident["correlation"] = corr.model_dump(mode="json") | {
                "candidates": [c.model_dump(mode="json") for c in corr.candidates[:5]]
            }
    disk: dict[str, Any] = {}
    overlays = list((work / "vm").glob("*.qcow2"))
    if overlays:
        root = debian.root_part if debian else OS
        volumes = debian.volumes() if debian else None
        with DiskImage(overlays[0], grubenv_at=debian.grubenv if debian else None, volumes=volumes) as d:
            env = d.grubenv()
            disk["grubenv"] = dict(env)
            disk["channel_files"] = sorted(d.ext4_listdir(root, CHANNEL_DIR))
            disk["quarantine"] = {
                folder: sorted(d.ext4_listdir(root, f"{QUARANTINE_DIR}/{folder}"))
                for folder in d.ext4_listdir(root, QUARANTINE_DIR)
            }
            manifests = {
                folder: d.ext4_file(root, f"{QUARANTINE_DIR}/{folder}/manifest.json")
                for folder in disk["quarantine"]
            }
            disk["manifests"] = {k: json.loads(v) for k, v in manifests.items() if v}
            disk.update(
                disk_facts(lambda path: d.ext4_file(root, path), lambda path: d.ext4_listdir(root, path))
            )
    facts = RunFacts(
        recovered=recovered,
        console_text=boot.console_text,
        boot=boot,
        results=results,
        directives=directives,
        lab_events=[e["kind"] for _, e in lab.seen if e["kind"].startswith(LAB_EVENT)],
        event_times={e["kind"]: at for at, e in reversed(lab.seen)},
        device_state=machine.state if machine else None,
        disk=disk,
    )
    report = RunReport(
        scenario=name,
        recovered=recovered,
        boots=boot.boots,
        phases=phases,
        time_to_recovery_s=(health if recovered else None),
        server_incident=incident,
        outcome=boot.outcome,
        device=_device_json(machine),
        events=[
            {"at_s": round(s, 2), "kind": e["kind"], "subject": e.get("subject"), "detail": e.get("detail")}
            for s, e in lab.seen
        ],
        disk=disk,
        boot=boot,
        workdir=str(work),
        faults=list(opts.faults),
        # (a recovery test's run has nothing to recover: _judge_recovery_test judges it)
        problems=drive_problems
        + [
            p
            for p in (judge(faults, facts) if faults or not opts.recovery_test else [])
            if p not in drive_problems
        ],
    )
    return report


def _judge_recovery_test(
    lab: _Lab, device_id: str, boot: BootReport, base_image: Path, work: Path, debian: DebianImage | None
) -> tuple[dict[str, Any], list[str]]:
    """What a run with ``--recovery-test`` showed, and every way the test missed: the machine
    visits recovery once and boots back to a healthy OS, the server issued the test directive,
    got its result and recorded the pass, and nothing on the OS partition changed outside the
    agent's own state (the run's disk against the image it started from, file by file)."""
    problems: list[str] = []
    tests = [
        dict(r)
        for r in lab.service.store.all(
            "SELECT test_id, requested_by, outcome, visited_at, applied_at, passed_at FROM recovery_tests "
            "WHERE device_id = ? ORDER BY visited_at",
            device_id,
        )
    ]
    device = lab.service.device(console("lab"), device_id)
    facts: dict[str, Any] = {
        "tests": tests,
        "passed_at": device.recovery_test_passed_at.isoformat() if device.recovery_test_passed_at else None,
        "grub_entries": boot.entries_chosen,
        # run seconds: the server saw the visit, got the result, recorded the pass
        "visit_s": lab.first("recovery_test.visit", device_id),
        "result_s": lab.first("recovery_test.result", device_id),
        "passed_s": lab.first("recovery_test.passed", device_id),
    }
    if len(tests) != 1:
        problems.append(f"{len(tests)} recovery test visits reached the server, expected 1")
    elif tests[0]["outcome"] != "passed":
        problems.append(f"recovery test {tests[0]['test_id']} ended {tests[0]['outcome']!r}, not passed")
    if facts["passed_at"] is None:
        problems.append("the server records no passed recovery test for the device")
    if boot.entries_chosen != ["os", "recovery", "os"]:
        problems.append(f"GRUB chose {boot.entries_chosen}, expected the OS, recovery once, the OS")
    if not boot.healthy:
        problems.append("the OS never reported QMR-HEALTHY after the test")
    overlays = list((work / "vm").glob("*.qcow2"))
    if overlays:
        root = debian.root_part if debian else OS
        volumes = debian.volumes() if debian else None
        with (
            DiskImage(base_image, volumes=volumes) as before,
            DiskImage(overlays[0], volumes=volumes) as after,
        ):
            old = tree_files(before.ext4_rdump(root, work / "os-before"))
            new = tree_files(after.ext4_rdump(root, work / "os-after"))
        shutil.rmtree(work / "os-before", ignore_errors=True)
        shutil.rmtree(work / "os-after", ignore_errors=True)
        changed = sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p) and not _own(p))
        facts["os_changed"] = changed
        records = sorted(p for p in new if p.startswith(RECOVERY_TESTS_DIR + "/"))
        facts["test_records"] = records
        if changed:
            problems.append(f"the test changed the OS outside the agent's state: {changed[:10]}")
        if tests and f"{RECOVERY_TESTS_DIR}/{tests[0]['test_id']}.json" not in records:
            problems.append(f"no record of the test in {RECOVERY_TESTS_DIR} on the disk")
    return facts, problems


# What the OS itself writes on every boot, and the agent's own state: left out of the test's
# comparison of the OS partition before and after.
_PER_BOOT = (STATE_DIR, "var/log", "etc/resolv.conf", "var/run", "run", "tmp")


def _own(path: str) -> bool:
    return any(path == d or path.startswith(d + "/") for d in _PER_BOOT)


def tree_files(root: Path) -> dict[str, tuple[str, str]]:
    """Every file, symlink and folder under ``root`` by relative path: (kind, sha256 or target)."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("symlink", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def run(opts: RunOptions) -> RunReport:
    return asyncio.run(run_async(opts))
