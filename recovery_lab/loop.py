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
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from recovery_agent.layout import BOOT_PROGRESS_LOG, CHANNEL_DIR, QUARANTINE_DIR
from recovery_agent.protocol.client import DeviceClient
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import Enrollment, utcnow
from recovery_server.access import User, console
from recovery_server.app import make_app
from recovery_server.service import RecoveryService
from recovery_server.store import Store

from .boot import BootReport, follow_boot
from .build import BuildError, build_image
from .build.debian import DebianImage
from .faults import FAULTS, TAMPER_DIRECTIVE, DirectiveTamperer, expectation_problems
from .inspect import OS, DiskImage
from .qemu import Drive, MachineConfig
from .seed import make_seed_disk
from .timeline import EntryKind

# Where the images mount the machine's disks before they run the agent (images/os/lib.sh,
# images/recovery/init): the OS root and the ESP's grubenv.
GUEST_OS_ROOT = "/mnt/os"
GUEST_GRUBENV = "/mnt/esp/grub/grubenv"
# The Debian base (recovery_lab.build.debian): the port its settings name, its memory, where
# its grubenv is (partition 1 is /boot, ext4), and the console line that ends a run there.
DEBIAN_GUEST_PORT = 8080
DEBIAN_MEMORY_MB = 1024
DEBIAN_GRUBENV = (1, "grub/grubenv")
DEBIAN_STOP = r"QMR-HEALTH-REPORT(ED|-FAILED)"
# The lab's own entry in a run's event list when the tampering proxy altered a directive.
TAMPERED_EVENT = "lab.directive_tampered"
# Console lines worth showing while the run goes on: GRUB's choice, the crash, the recovery
# environment and the agent, the health check.
_PROGRESS = re.compile(
    r"QMR-(GRUB|HEALTH|RECOVERY-AGENT|AGENT|NEEDS|UNHEALTHY)|^\[agent \+|"
    r"^\[[ \d.]+\] (Kernel panic - not syncing|RIP: 0010|watchdog: BUG)"
)


@dataclass
class RunOptions:
    """What to run (``recovery-lab run``'s options) and where its progress lines go."""

    scenario: str
    auto_approve: bool = False
    timeout_s: float = 900.0
    workdir: Path | None = None
    keep: bool = False
    accel: str = "tcg"
    # QMR settings for the agent, in lab minutes (seconds_per_minute seconds each).
    seconds_per_minute: float = 1.0
    retry_interval_min: int = 5
    time_to_reboot_min: int = 90
    max_recovery_attempts: int = 3
    # A fault to inject (recovery_lab.faults.FAULTS), or None for a plain recovery.
    fault: str | None = None
    # The machine: "lab" (the busybox OS) or "debian" (stock Debian 12 with QMR installed by
    # recovery-agent install: recovery_lab.build.debian, which bakes its QMR timing in).
    base: str = "lab"
    log: Callable[[str], None] = print


@dataclass
class Phase:
    """One phase of the loop (failed boots, diagnostics, approval, ...) in run seconds."""

    name: str
    start: float
    end: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "start": round(self.start, 2), "duration": round(self.end - self.start, 2)}


@dataclass
class RunReport:
    """What a run of the loop showed, and every way it missed what it should show
    (``problems``: empty when the machine recovered, or, with a fault, when it ended the way
    the fault predicts)."""

    scenario: str
    recovered: bool
    boots: int
    phases: list[Phase]
    time_to_recovery_s: float | None
    server_incident: dict[str, Any] | None
    outcome: str
    device: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    disk: dict[str, Any] = field(default_factory=dict)
    boot: BootReport | None = None
    workdir: str = ""
    fault: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def met_expectations(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "recovered": self.recovered,
            "boots": self.boots,
            "phases": [p.to_json() for p in self.phases],
            "time_to_recovery_s": None
            if self.time_to_recovery_s is None
            else round(self.time_to_recovery_s, 2),
            "server_incident": self.server_incident,
            "outcome": self.outcome,
            "device": self.device,
            "disk": self.disk,
            "server_events": self.events,
            "vm": self.boot.to_json() if self.boot else None,
            "workdir": self.workdir,
            "fault": self.fault,
            "problems": self.problems,
        }


class _Lab:
    """The server side of a run, in this process, on this event loop."""

    def __init__(self, work: Path, opts: RunOptions) -> None:
        self.work = work
        self.opts = opts
        self.started = time.monotonic()
        self.seen: list[tuple[float, dict[str, Any]]] = []  # (seconds since start, event)
        self._last_seq = 0
        self.tamperer: DirectiveTamperer | None = None

    def now(self) -> float:
        return time.monotonic() - self.started

    async def start(self, server_key: SigningKey | None = None) -> None:
        data = self.work / "server"
        data.mkdir(parents=True, exist_ok=True)
        self.key = server_key or SigningKey.generate()
        self.key.save(data / "server.key")
        self.service = RecoveryService(store=Store(data / "recovery.db"), server_key=self.key)
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
        self.runner = web.AppRunner(make_app(self.service), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.guest_port = self.port
        if self.opts.fault == TAMPER_DIRECTIVE:
            self.tamperer = DirectiveTamperer(self.url, on_tamper=self._tampered)
            self.guest_port = await self.tamperer.start()

    def _tampered(self) -> None:
        event = {"kind": TAMPERED_EVENT, "subject": "", "actor": "proxy", "detail": ""}
        self.seen.append((self.now(), event))

    async def stop(self) -> None:
        if self.tamperer is not None:
            await self.tamperer.stop()
        await self.runner.cleanup()
        self.service.store.close()

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
        new = [e.model_dump(mode="json") for e in self.service.events(console("lab"), after=self._last_seq)]
        for e in new:
            self._last_seq = e["seq"]
            self.seen.append((self.now(), e))
        return new

    def first(self, kind: str) -> float | None:
        return next((t for t, e in self.seen if e["kind"] == kind), None)


async def _watch(lab: _Lab, opts: RunOptions, done: asyncio.Event) -> None:
    """Follow the server: announce what happens, and approve known fixes with --auto-approve."""
    say = opts.log
    handled: set[str] = set()
    while not done.is_set():
        for e in lab.poll_events():
            kind, subject = e["kind"], e["subject"] or ""
            if kind in ("device.enrolled", "user.created", "enrollment_token.created"):
                continue
            say(f"[lab +{lab.now():6.1f}s] server: {kind} {subject} {_short(e['detail'])}")
            if kind == "diagnostics.received":
                incident = json.loads(e["detail"])["incident"]
                if incident in handled:
                    continue
                handled.add(incident)
                proposal = lab.service.suggest_actions(User("lab-operator", "operator"), incident)
                if not proposal.actions:
                    say(f"[lab +{lab.now():6.1f}s] catalog: {'; '.join(proposal.why)}")
                    continue
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
                rem = lab.service.create_remediation(
                    User("lab-operator", "operator"),
                    title=proposal.title,
                    actions=proposal.actions,
                    incident_id=incident,
                )
                lab.service.approve(User("lab-approver", "approver"), rem.remediation_id)
        await asyncio.sleep(0.2)


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
    return build_debian_image(opts.scenario, log=opts.log)


def _short(detail: str) -> str:
    return detail if len(detail) < 140 else detail[:137] + "..."


async def run_async(opts: RunOptions) -> RunReport:
    say = opts.log
    if opts.fault is not None and opts.fault not in FAULTS:
        raise ValueError(f"unknown fault {opts.fault!r}: use one of {', '.join(FAULTS)}")
    # (the Debian build may boot a provisioning VM with its own event loop: off this one)
    debian = await asyncio.to_thread(_debian_image, opts) if opts.base == "debian" else None
    image = debian.image if debian else build_image(opts.scenario, log=say).image
    work = opts.workdir or Path(tempfile.mkdtemp(prefix=f"qmr-run-{opts.scenario}-"))
    work.mkdir(parents=True, exist_ok=True)
    lab = _Lab(work, opts)
    await lab.start(SigningKey.load(debian.server_key) if debian else None)
    device_id = debian.device_id if debian else f"lab-{opts.scenario}"[:64]
    try:
        key = await lab.enroll(device_id, SigningKey.load(debian.device_key) if debian else None)
        say(
            f"[lab +{lab.now():6.1f}s] server on {lab.url} (admin token in {work / 'admin.token'}); "
            f"device {device_id} enrolled"
        )
        settings = {
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
        key_pem = key.private_pem()
        seed = make_seed_disk(
            work / "seed.img", {"agent.json": json.dumps(settings, indent=1).encode(), "device.key": key_pem}
        )
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
            )
        done = asyncio.Event()
        watcher = asyncio.create_task(_watch(lab, opts, done))
        say(f"[lab +{lab.now():6.1f}s] booting {image.name} ({opts.base} base) under {opts.accel}")
        vm_started = lab.now()

        def progress(_: float, line: str) -> None:
            line = line.strip()
            if _PROGRESS.search(line):
                say(f"[vm  +{lab.now():6.1f}s] {line[:160]}")

        try:
            boot = await follow_boot(
                config,
                timeout=opts.timeout_s,
                keep_logs=True,
                run_dir=work / "vm",
                name=opts.scenario,
                on_line=progress,
                # A Debian machine stays up after its good boot: stop once it was reported.
                stop_on=DEBIAN_STOP if debian else None,
            )
        finally:
            done.set()
            await watcher
        lab.poll_events()
        report = _judge(lab, opts, boot, vm_started, device_id, work)
    finally:
        await lab.stop()
    (work / "report.json").write_text(json.dumps(report.to_json(), indent=1))
    if not opts.keep:
        for p in (work / "vm").glob("*.qcow2"):
            p.unlink()
    return report


def _judge(
    lab: _Lab, opts: RunOptions, boot: BootReport, vm_started: float, device_id: str, work: Path
) -> RunReport:
    svc = lab.service

    def t(seconds: float) -> float:  # VM time -> run time
        return vm_started + seconds

    grub = boot.timeline.of_kind(EntryKind.GRUB_ENTRY)
    first_recovery = next((e for e in grub if e.data.get("entry") == "recovery"), None)
    phases: list[Phase] = []
    if first_recovery:
        phases.append(Phase("failed boots", t(0), t(first_recovery.seconds)))
    diag = lab.first("diagnostics.received")
    if first_recovery and diag:
        phases.append(Phase("recovery environment and diagnostics", t(first_recovery.seconds), diag))
    approved = lab.first("remediation.approved")
    issued = lab.first("directive.issued")
    if diag and approved:
        phases.append(Phase("approval", diag, approved))
    result = lab.first("result.received")
    if issued and result:
        phases.append(Phase("directive verified and applied", issued, result))
    health = lab.first("health.reported")
    if result and health:
        phases.append(Phase("reboot to a healthy boot", result, health))

    results = [r.model_dump(mode="json") for r in svc.device_results(console("lab"), device_id)]
    devices = {d.device_id: d.model_dump(mode="json") for d in svc.devices(console("lab"))}
    recovered = bool(health and result and any(r["outcome"] == "applied" for r in results))
    incidents = [i.model_dump(mode="json") for i in svc.incidents(console("lab"))]
    incident = None
    if incidents:
        inc = incidents[0]
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
            )
        }
        incident["results"] = results
    disk: dict[str, Any] = {}
    overlays = list((work / "vm").glob("*.qcow2"))
    if overlays:
        with DiskImage(overlays[0], grubenv_at=DEBIAN_GRUBENV if opts.base == "debian" else None) as d:
            env = d.grubenv()
            disk["grubenv"] = dict(env)
            disk["channel_files"] = sorted(d.ext4_listdir(OS, CHANNEL_DIR))
            disk["quarantine"] = {
                folder: sorted(d.ext4_listdir(OS, f"{QUARANTINE_DIR}/{folder}"))
                for folder in d.ext4_listdir(OS, QUARANTINE_DIR)
            }
            manifests = {
                folder: d.ext4_file(OS, f"{QUARANTINE_DIR}/{folder}/manifest.json")
                for folder in disk["quarantine"]
            }
            disk["manifests"] = {k: json.loads(v) for k, v in manifests.items() if v}
    report = RunReport(
        scenario=opts.scenario,
        recovered=recovered,
        boots=boot.boots,
        phases=phases,
        time_to_recovery_s=(health if recovered else None),
        server_incident=incident,
        outcome=boot.outcome,
        device=devices.get(device_id, {}),
        events=[
            {"at_s": round(s, 2), "kind": e["kind"], "subject": e.get("subject"), "detail": e.get("detail")}
            for s, e in lab.seen
        ],
        disk=disk,
        boot=boot,
        workdir=str(work),
        fault=opts.fault,
        problems=expectation_problems(
            opts.fault,
            recovered=recovered,
            console_text=boot.console_text,
            results=results,
            tampered=sum(1 for _, e in lab.seen if e["kind"] == TAMPERED_EVENT),
        ),
    )
    return report


def render(report: RunReport) -> str:
    lines = [
        "",
        f"Scenario {report.scenario}: {'RECOVERED' if report.recovered else 'not recovered'} "
        f"({report.outcome}, {report.boots} boots)" + (f", fault {report.fault}" if report.fault else ""),
    ]
    for p in report.phases:
        lines.append(f"  {p.name:<40} at {p.start:7.1f}s  took {p.end - p.start:6.1f}s")
    if report.time_to_recovery_s is not None:
        lines.append(f"  time to recovery: {report.time_to_recovery_s:.1f}s")
    if report.server_incident:
        i = report.server_incident
        lines.append(
            f"  incident {i['incident_id']}: {i['title']} (module {i['guilty_module']}, "
            f"file {i['channel_file']}); results: {[r['outcome'] for r in i['results']]}"
        )
    if report.device:
        lines.append(f"  device {report.device.get('device_id')}: {report.device.get('state')}")
    if report.disk:
        lines.append(
            f"  disk: boot_count={report.disk['grubenv'].get('boot_count')}, channel files "
            f"{report.disk['channel_files']}, quarantine {report.disk['quarantine']}"
        )
    for problem in report.problems:
        lines.append(f"  MISSED: {problem}")
    if report.fault and report.met_expectations:
        lines.append(f"  the run showed what fault {report.fault} predicts")
    lines.append(f"  everything is in {report.workdir}")
    return "\n".join(lines)


def run(opts: RunOptions) -> RunReport:
    return asyncio.run(run_async(opts))
