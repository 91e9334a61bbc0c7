"""``recovery-lab demo``: the recovery loop on this machine, with a directory standing in for
the VM's disks.

What runs is real: a ``recovery-server`` process on 127.0.0.1 with its SQLite store, the
``recovery-agent`` process with its own device key, ``recovery-admin`` commands by two people
(one writes the fix, another approves it). What stands in for the VM is a directory laid out
like the broken machine's disks: the ESP with GRUB's 1024-byte ``grubenv`` after two failed
boots, the OS root with the sensor's channel files (one of them the malformed 291 shape), and a
pstore folder holding a kernel panic log captured from Debian's kernel crashing on that file
under QEMU (``images/evidence/``). The lab's ``run`` command replaces the directory with a booted image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recovery_agent.bootenv import BootEnv
from recovery_agent.digest import sha256_file
from recovery_agent.layout import CHANNEL_DIR, QUARANTINE_DIR
from recovery_server.portfile import ServerDidNotStart, wait_for_port_file

from .build.osroot import BASE_CHANNELS, channel_file
from .checkout import EVIDENCE
from .errors import LabError

# A real ramoops record of Debian's kernel crashing on the bad channel file (its provenance:
# images/evidence/README.md).
REAL_PANIC_LOG = EVIDENCE / "channel-file-pstore.txt"
GOOD = ["C-00000291-00000000-00000031.sys", "C-00000290-00000000-00000007.sys"]
BAD = "C-00000291-00000000-00000032.sys"
DEVICE = "demo-host-0001"


class DemoError(LabError):
    """Raised when a step of the demo did not do what it should (a process did not start or
    ended badly, no incident reached the server, a final check failed); names the step and
    where its log is."""


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def make_machine_dir(
    m: Path, *, bad_channel_file: bool = True, panic_log: Path | None = REAL_PANIC_LOG, boot_count: int = 2
) -> Path:
    """Lay out a directory like a broken machine's disks: ``esp/grub/grubenv`` (GRUB counted
    ``boot_count`` failed boots), ``os/`` (the OS root with the sensor's channel files, one of
    them malformed), ``pstore/`` (the panic log the kernel left)."""
    if m.exists():
        shutil.rmtree(m)
    (m / "esp/grub").mkdir(parents=True)
    BootEnv.new({"boot_count": boot_count, "boot_limit": 2}).create(m / "esp/grub/grubenv")
    os_root = m / "os"
    (os_root / CHANNEL_DIR).mkdir(parents=True)
    (os_root / "etc").mkdir(parents=True, exist_ok=True)
    (os_root / "etc/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n')
    for name in GOOD:
        (os_root / CHANNEL_DIR / name).write_bytes(channel_file(BASE_CHANNELS[name]))
    if bad_channel_file:
        (os_root / CHANNEL_DIR / BAD).write_bytes(channel_file("channel:bad-291"))
    (m / "pstore").mkdir()
    if panic_log is not None:
        if not panic_log.exists():
            raise DemoError(f"{panic_log} is missing: run the lab from a full checkout of the repository")
        shutil.copy(panic_log, m / "pstore/dmesg-ramoops-0")
    return m


@dataclass
class Demo:
    """One run of the demo in ``work``: the server's data, the machine directory, the logs."""

    work: Path
    started: float = field(default_factory=time.monotonic)
    verbose: bool = True
    url: str = ""  # the server's, once it listens

    def say(self, who: str, text: str) -> None:
        t = time.monotonic() - self.started
        if self.verbose:
            print(f"[+{t:6.2f}s] {who:<7} {text}", flush=True)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise DemoError(
                f"{' '.join(cmd[:3])}… failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}"
            )
        return p

    def admin(self, token: str, *args: str) -> Any:
        p = self.run(_bin("recovery-admin"), "--server", self.url, "--token", token, "--json", *args)
        return json.loads(p.stdout)

    # ---------------------------------------------------------------- the story

    def main(self) -> dict[str, Any]:
        self.work.mkdir(parents=True, exist_ok=True)
        data = self.work / "server"
        if data.exists():
            shutil.rmtree(data)
        (self.work / "admin.token").unlink(missing_ok=True)  # init writes a token to a new file only
        self.run(
            _bin("recovery-server"),
            "--data",
            str(data),
            "init",
            "--token-file",
            str(self.work / "admin.token"),
        )
        admin_token = (self.work / "admin.token").read_text().strip()
        port_file = self.work / "port"
        port_file.unlink(missing_ok=True)
        server_log = open(self.work / "server.log", "w")
        server = subprocess.Popen(
            [
                _bin("recovery-server"),
                "--data",
                str(data),
                "serve",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--quiet",
            ],
            stdout=subprocess.DEVNULL,
            stderr=server_log,
        )
        agent: subprocess.Popen[str] | None = None
        try:
            try:
                port = wait_for_port_file(port_file, lambda: server.poll() is None, timeout_s=300)
            except ServerDidNotStart as e:
                log = self.work / "server.log"
                raise DemoError(f"recovery-server did not start ({e}): see {log}") from None
            self.url = f"http://127.0.0.1:{port}"
            self.say("server", f"recovery server listening on {self.url} (SQLite in {data.name}/)")

            alice = self.admin(admin_token, "user", "alice", "--role", "approver")["token"]
            bob = self.admin(admin_token, "user", "bob", "--role", "approver")["token"]
            enroll_token = self.admin(admin_token, "enrollment-token", "--label", "demo")["token"]
            self.say("admin", "approvers alice and bob get their own tokens; a fleet enrollment token")

            m = make_machine_dir(self.work / "machine")
            os_root = m / "os"
            good_before = {n: sha256_file(os_root / CHANNEL_DIR / n) for n in GOOD}
            bad_sha = sha256_file(os_root / CHANNEL_DIR / BAD)
            settings = {
                "device_id": DEVICE,
                "server_url": self.url,
                "server_public_key": (data / "server.key.pub").read_text().strip(),
                "device_key": "device.key",
                "os_root": "../os",
                "grubenv": "../esp/grub/grubenv",
                "pstore_dir": "../pstore",
                "seconds_per_minute": 1,
                "retry_interval_min": 2,
                "time_to_reboot_min": 120,
                "long_poll_s": 10,
            }
            (m / "recovery").mkdir()
            config = m / "recovery/agent.json"
            config.write_text(json.dumps(settings, indent=2))
            self.run(_bin("recovery-agent"), "--config", str(config), "enroll", "--token", enroll_token)
            self.say("device", f"{DEVICE} enrolled its Ed25519 key while healthy")
            self.say("device", f"channel file update arrives: {BAD} (template 21 fields, content 20)")
            self.say("device", "boot 1: sensor.ko crashed (general protection fault) -> panic -> reboot")
            self.say("device", "boot 2: same crash; GRUB's boot_count reached 2 -> recovery entry")

            agent = subprocess.Popen(
                [_bin("recovery-agent"), "--config", str(config), "run"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            reader = threading.Thread(target=self._follow_agent, args=(agent,), daemon=True)
            reader.start()
            incident = self._wait_for_incident(admin_token, agent)
            self.say(
                "server",
                f"incident {incident['incident_id']}: {incident['title']} "
                f"(module {incident['guilty_module']}, file {incident['channel_file']})",
            )

            rem = self.admin(
                alice, "remediation", "create", "--incident", incident["incident_id"], "--suggested"
            )
            self.say(
                "admin",
                f"alice proposes {rem['remediation_id']}: {rem['actions'][0]['type']} "
                f"{rem['actions'][0]['path']} sha256 {rem['actions'][0]['sha256'][:12]}…",
            )
            refused = self.run(
                _bin("recovery-admin"),
                "--server",
                self.url,
                "--token",
                alice,
                "remediation",
                "approve",
                rem["remediation_id"],
                check=False,
            )
            self.say("admin", f"alice tries to approve her own fix: refused ({refused.stderr.strip()[:70]}…)")
            self.say("admin", f"bob approves {rem['remediation_id']}")
            self.admin(bob, "remediation", "approve", rem["remediation_id"])

            agent.wait(timeout=90)
            reader.join(timeout=5)
            if agent.returncode != 0:
                raise DemoError(
                    f"the agent ended with exit {agent.returncode}: see {self.work / 'agent.log'}"
                )

            env = BootEnv.read(m / "esp/grub/grubenv")
            self.say("device", f"reboot: grubenv boot_count={env.get('boot_count')}; GRUB boots the OS")
            self.say("device", "boot 3: sensor loads the remaining channel files; health check passes")
            self.run(_bin("recovery-agent"), "--config", str(config), "health", "--boot-id", "demo-boot-3")
            self.say("device", "the OS reported a healthy boot to the server")
            return self._check(admin_token, m, good_before, bad_sha, incident)
        finally:
            if agent is not None and agent.poll() is None:
                agent.kill()
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
            server_log.close()

    def _follow_agent(self, agent: subprocess.Popen[str]) -> None:
        """One reader for the agent's output: every line to agent.log, the timeline lines to
        the screen as they come."""
        with open(self.work / "agent.log", "w") as log:
            assert agent.stdout is not None
            for line in agent.stdout:
                log.write(line)
                log.flush()
                if line.startswith("[agent"):
                    self.say("agent", line.split("] ", 1)[1].rstrip())

    def _wait_for_incident(self, token: str, agent: subprocess.Popen[str]) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            incidents = self.admin(token, "incidents")
            if incidents:
                incident: dict[str, Any] = incidents[0]
                return incident
            if agent.poll() is not None:
                raise DemoError(f"the agent stopped before reporting: see {self.work / 'agent.log'}")
            time.sleep(0.3)
        raise DemoError("no incident reached the server within 60 s: see agent.log")

    def _check(
        self, token: str, m: Path, good_before: dict[str, str], bad_sha: str, incident: dict[str, Any]
    ) -> dict[str, Any]:
        os_root = m / "os"
        quarantined = list((os_root / QUARANTINE_DIR).glob("*/*"))
        manifests = [p for p in quarantined if p.name == "manifest.json"]
        files = [p for p in quarantined if p.name != "manifest.json"]
        checks = {
            "bad channel file gone from the channel folder": not (os_root / CHANNEL_DIR / BAD).exists(),
            "bad channel file in quarantine, same content": any(sha256_file(p) == bad_sha for p in files),
            "quarantine manifest written": bool(manifests) and BAD in manifests[0].read_text(),
            "good channel files untouched": all(
                sha256_file(os_root / CHANNEL_DIR / n) == h for n, h in good_before.items()
            ),
            "boot_count reset to 0": BootEnv.read(m / "esp/grub/grubenv").get("boot_count") == "0",
        }
        devices = self.admin(token, "devices")
        events = self.admin(token, "events")
        checks["server: result 'applied' recorded"] = any(
            e["kind"] == "result.received" and '"applied"' in e["detail"] for e in events
        )
        checks["server: device healthy again"] = devices[0]["state"] == "healthy"
        print("\nServer timeline (recovery-admin events):")
        for e in events:
            print(f"  {e['at']}  {e['kind']:<24} {e['actor']:<16} {e['subject'] or ''}")
        print("\nChecks:")
        for name, ok in checks.items():
            print(f"  [{'ok' if ok else 'FAIL'}] {name}")
        if not all(checks.values()):
            raise DemoError(
                "the demo ended in the wrong state: " + ", ".join(n for n, ok in checks.items() if not ok)
            )
        total = time.monotonic() - self.started
        print(
            f"\nRecovered {DEVICE} from incident {incident['incident_id']} in {total:.1f} s. "
            f"Everything is under {self.work}"
        )
        return {
            "recovered": True,
            "checks": checks,
            "incident": incident["incident_id"],
            "seconds": round(total, 2),
        }


def run_demo(work: Path | None = None, verbose: bool = True) -> dict[str, Any]:
    work = work or Path(tempfile.mkdtemp(prefix="qmr-demo-"))
    return Demo(work=work, verbose=verbose).main()
