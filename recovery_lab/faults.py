"""Faults the lab injects into a run of the recovery loop: ``recovery-lab run SCENARIO --fault NAME``.

A fault is something that goes wrong around the machine while it recovers. With one, a run
has to end the way the fault predicts (most still in a recovery), and the run's report lists
every way it did not (:meth:`Fault.problems`). Faults that disturb different moments can be
combined in one run (``--fault cable-pull --fault server-restart``): a run costs minutes.

Each fault may change the run's disk before the first boot (:meth:`Fault.prepare_disk`, on a
copy: the cached image is never written), add agent settings for the seed disk
(:meth:`Fault.agent_settings`) and act while the machine runs (:meth:`Fault.drive`, through
:class:`FaultControl`: the VM's QMP, its console, the lab's server). A fault that disturbs the
wait for a directive holds back the lab's approval until it is done (``holds_approval``). The
faults:

``tamper-directive``
    A man in the middle (:class:`DirectiveTamperer`, an HTTP proxy on 127.0.0.1 that the VM's
    only network path leads to) changes the last character of the first action's path inside
    every directive's signed payload. The agent must refuse it, change nothing and report no
    result; the machine does not recover and, once its attempts are used up, waits for a
    person (``--time-to-reboot 30 --max-attempts 1`` makes that quick).
``server-restart``
    Once the agent waits for a directive, the server is stopped at once (open connections
    closed, handlers cancelled, as when its process is killed); when the agent has noticed,
    a new server is started on the same data directory and port, and only then is the fix
    approved. The directive must still arrive: every guest connection gets its own host
    connection (:mod:`recovery_lab.qemu.forwarder`).
``cable-pull``
    The VM's cable is pulled (QMP ``set_link``) when the agent starts, before its report,
    and put back :data:`CABLE_OUT_S` later; pulled again while the agent waits for the
    directive and put back as long later; then the fix is approved. The agent's retries must
    finish the job: the report arrives after the cable is back, the machine recovers.
``power-loss``
    The power goes (QMP ``system_reset``) at named steps of the apply, one per recovery
    visit: by default ``journal``, ``moved``, ``manifest``, ``grubenv``
    (``RunOptions.power_loss_at``). The agent holds at the step (the lab-only setting
    ``lab_hold_at``, ``recovery_agent.holds``) until the reset; before it, the lab moves the
    hold to the next step on the seed disk. The loop must converge: the fix applied once, the
    file in quarantine, the journal "applied", one directive on the server, at most one
    result, the healthy boot naming the directive.
``disk-full``
    The OS partition has no free block left (a file of unwritten extents fills it before the
    first boot). The fix must be refused before anything changes on the disk and the refusal
    reported ("failed"); the machine does not recover and waits for a person once its
    attempts are used up (``--max-attempts 1`` makes that quick).
``corrupt-grubenv``
    The ESP's ``grubenv`` is 1024 bytes of garbage before the first boot. GRUB cannot count
    (``QMR-GRUB save_env failed``) and boots the recovery environment; the agent writes a
    fresh block in place and, with no crash to report, reboots once its time is up; GRUB
    counts again, the OS fails twice, and the loop recovers the machine
    (docs/boot-counting.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from aiohttp import ClientSession, web

from recovery_agent.holds import HOLD_STEPS
from recovery_agent.layout import JOURNAL_DIR, QUARANTINE_DIR

from . import tools
from .boot import BootReport
from .disk import SECTOR, parse_mbr
from .qemu import QemuVM

TAMPER_DIRECTIVE = "tamper-directive"
SERVER_RESTART = "server-restart"
CABLE_PULL = "cable-pull"
POWER_LOSS = "power-loss"
DISK_FULL = "disk-full"
CORRUPT_GRUBENV = "corrupt-grubenv"

# How long the cable stays out each time (host seconds; the agent sees the same in guest time).
CABLE_OUT_S = 30.0
# The apply's steps the power goes at, one per recovery visit (recovery_agent.holds).
DEFAULT_POWER_LOSS_AT = ("journal", "moved", "manifest", "grubenv")

# The first action's path in a directive's canonical JSON (its keys are sorted, so "actions"
# comes first and the path is its first action's).
_FIRST_PATH = re.compile(rb'"path":"(?P<path>[^"\\]+)"')
# What the agent's timeline prints (recovery_agent.agent, holds, protocol.client).
DIRECTIVE_REJECTED = "directive REJECTED"
APPLY_REFUSED = "refused, nothing changed"
GRUBENV_REWRITTEN = "wrote a fresh block in its place"
HOLD_MARKER = "QMR-HOLD"
# The HTTP client's warning on each retry, and the agent's own line when it gives up a request.
_SERVER_TROUBLE = r"server not answering|not reachable"
# Headers the device protocol uses; nothing else is passed on.
_FORWARDED_HEADERS = ("authorization", "content-type")


# --------------------------------------------------------------------------- what a fault sees


class FaultControl(Protocol):
    """What a fault may do while the machine runs (the lab's side: ``recovery_lab.loop``)."""

    vm: QemuVM

    async def console(self, pattern: str, *, fresh: bool = False) -> re.Match[str]:
        """The next console match of ``pattern`` after this fault's previous one (each fault
        starts at the beginning), or with ``fresh`` in what the console prints from now on;
        within the run's time."""
        ...

    def note(self, kind: str, detail: str = "") -> None:
        """Put a lab event (``lab.<kind>``) on the run's timeline."""
        ...

    async def stop_server(self) -> None:
        """Stop the server at once: open connections closed, handlers cancelled."""
        ...

    async def start_server(self) -> None:
        """Start a new server on the same data directory and port."""
        ...

    def hold_at(self, step: str | None) -> None:
        """From the next boot on, the agent holds at ``step`` (None: nowhere)."""
        ...


@dataclass
class RunFacts:
    """What a finished run showed, for judging it against its faults."""

    recovered: bool
    console_text: str
    boot: BootReport
    results: list[dict[str, Any]]  # the agent's results, as the server recorded them
    directives: list[dict[str, Any]]  # directive_id, outcome
    lab_events: list[str]  # kinds of the lab's own events, in order (lab.cable_pulled, ...)
    event_times: dict[str, float]  # the first time of each server or lab event kind
    device_state: str | None
    disk: dict[str, Any] = field(default_factory=dict)

    def first(self, kind: str) -> float | None:
        return self.event_times.get(kind)


# --------------------------------------------------------------------------- faults


class Fault:
    """One fault: what it changes before the boot, the settings it needs, what it does while
    the machine runs, and what the run must then show."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # The lab approves the fix only once drive() is done (it disturbs the wait for it).
    holds_approval: ClassVar[bool] = False

    def prepare_disk(self, image: Path, work: Path) -> Path:
        """The disk image to boot (a changed copy in ``work``, or ``image`` itself)."""
        return image

    def agent_settings(self) -> dict[str, Any]:
        return {}

    async def drive(self, ctl: FaultControl) -> None:
        """Act on the running machine."""

    def problems(self, facts: RunFacts) -> list[str]:
        """Every way the run missed what this fault predicts."""
        return [] if facts.recovered else ["the machine did not recover"]


class TamperDirective(Fault):
    name = TAMPER_DIRECTIVE
    summary = "a proxy alters every directive in flight; the agent must refuse it and change nothing"

    def problems(self, facts: RunFacts) -> list[str]:
        problems = []
        if "lab.directive_tampered" not in facts.lab_events:
            problems.append("no directive reached the proxy to be altered")
        elif DIRECTIVE_REJECTED not in facts.console_text:
            problems.append("the agent never refused an altered directive")
        if any(r.get("outcome") == "applied" for r in facts.results):
            problems.append("a result 'applied' reached the server: an altered directive was applied")
        if facts.recovered:
            problems.append("the machine recovered from an altered directive")
        return problems


class ServerRestart(Fault):
    name = SERVER_RESTART
    summary = "the server is killed and restarted while the agent waits; the directive must still arrive"
    holds_approval = True

    async def drive(self, ctl: FaultControl) -> None:
        await ctl.console(r"waiting for a directive")
        await ctl.stop_server()
        ctl.note("server_stopped")
        await ctl.console(_SERVER_TROUBLE, fresh=True)
        await ctl.start_server()
        ctl.note("server_started")

    def problems(self, facts: RunFacts) -> list[str]:
        problems = super().problems(facts)
        started = facts.first("lab.server_started")
        if started is None:
            problems.append("the server was not restarted while the agent waited")
        else:
            issued = facts.first("directive.issued")
            if issued is None or issued < started:
                problems.append("no directive was issued by the restarted server")
        return problems


class CablePull(Fault):
    name = CABLE_PULL
    summary = (
        f"the cable is pulled during the report and during the wait, back {CABLE_OUT_S:.0f} s "
        f"later each time; the agent's retries must finish the job"
    )
    holds_approval = True

    async def drive(self, ctl: FaultControl) -> None:
        await ctl.console(r"QMR-RECOVERY-AGENT start")
        await self._out(ctl, "report")
        await ctl.console(r"waiting for a directive")
        await self._out(ctl, "wait")

    async def _out(self, ctl: FaultControl, phase: str) -> None:
        await ctl.vm.set_link(False)
        ctl.note("cable_pulled", phase)
        await asyncio.sleep(CABLE_OUT_S)
        await ctl.vm.set_link(True)
        ctl.note("cable_back", phase)

    def problems(self, facts: RunFacts) -> list[str]:
        problems = super().problems(facts)
        if facts.lab_events.count("lab.cable_back") != 2:
            problems.append("the cable was not pulled and put back twice")
            return problems
        back = facts.first("lab.cable_back")
        received = facts.first("diagnostics.received")
        if received is None or back is None or received < back:
            problems.append("the report did not wait for the cable: it was not pulled during the report")
        return problems


class PowerLoss(Fault):
    name = POWER_LOSS
    summary = (
        "the power goes at each step of the apply in turn (journal, moved, manifest, grubenv), "
        "one per recovery visit; the loop must converge with nothing lost"
    )

    def __init__(self, steps: Sequence[str] = DEFAULT_POWER_LOSS_AT) -> None:
        unknown = [s for s in steps if s not in HOLD_STEPS]
        if not steps or unknown:
            raise ValueError(f"power-loss steps {list(steps)}: use one or more of {', '.join(HOLD_STEPS)}")
        self.steps = list(steps)

    def agent_settings(self) -> dict[str, Any]:
        return {"lab_hold_at": self.steps[0]}

    async def drive(self, ctl: FaultControl) -> None:
        for i, step in enumerate(self.steps):
            await ctl.console(rf"{HOLD_MARKER} {step}:")
            ctl.hold_at(self.steps[i + 1] if i + 1 < len(self.steps) else None)
            await ctl.vm.system_reset()
            ctl.note("power_cut", step)

    def problems(self, facts: RunFacts) -> list[str]:
        problems = super().problems(facts)
        cuts = facts.lab_events.count("lab.power_cut")
        if cuts != len(self.steps):
            problems.append(f"the power was cut {cuts} times, not at each of {', '.join(self.steps)}")
        if len(facts.directives) != 1:
            problems.append(f"{len(facts.directives)} directives were issued, not one")
        elif facts.directives[0]["outcome"] != "succeeded":
            problems.append(f"the directive's outcome is {facts.directives[0]['outcome']}, not succeeded")
        outcomes = [r.get("outcome") for r in facts.results]
        if outcomes not in ([], ["applied"]):
            problems.append(f"the server recorded results {outcomes}, not one 'applied' at most")
        disk = facts.disk
        if len(disk.get("quarantine", {})) != 1:
            problems.append(f"quarantine folders {disk.get('quarantine')}: expected one")
        if disk.get("journal_states") != ["applied"]:
            problems.append(f"journal states {disk.get('journal_states')}: expected one 'applied'")
        if disk.get("quarantine_lost"):
            problems.append(f"manifest entries without their file: {disk['quarantine_lost']}")
        return problems


class DiskFull(Fault):
    name = DISK_FULL
    summary = "the OS partition is full; the fix must be refused cleanly and the refusal reported"

    def prepare_disk(self, image: Path, work: Path) -> Path:
        copy = sparse_copy(image, work / "disk-full.img")
        fill_ext4(copy, partition_offset(copy, 2))
        return copy

    def problems(self, facts: RunFacts) -> list[str]:
        problems = []
        if facts.recovered:
            problems.append("the machine recovered, yet its OS partition had no room for the fix")
        if APPLY_REFUSED not in facts.console_text:
            problems.append("the agent never refused the fix")
        if not any(r.get("outcome") == "failed" for r in facts.results):
            problems.append("no refusal (result 'failed') reached the server")
        if any(r.get("outcome") == "applied" for r in facts.results):
            problems.append("a result 'applied' reached the server")
        if facts.disk.get("journal_states") or facts.disk.get("quarantine"):
            problems.append(
                f"the refused fix left journals {facts.disk.get('journal_states')} or quarantine "
                f"{facts.disk.get('quarantine')} behind"
            )
        return problems


class CorruptGrubenv(Fault):
    name = CORRUPT_GRUBENV
    summary = "grubenv is garbage; GRUB boots recovery, the agent rewrites it, the loop goes on"

    def prepare_disk(self, image: Path, work: Path) -> Path:
        copy = sparse_copy(image, work / "corrupt-grubenv.img")
        garbage = bytes((i * 7 + 3) % 256 for i in range(1024)).replace(b"#", b"?")
        write_fat_file(copy, "grub/grubenv", garbage, work, partition_offset(copy, 1))
        return copy

    def problems(self, facts: RunFacts) -> list[str]:
        problems = super().problems(facts)
        entries = facts.boot.entries_chosen
        if not entries or entries[0] != "recovery":
            problems.append(f"GRUB chose {entries[:1]} first, not recovery, with a damaged grubenv")
        if "QMR-GRUB save_env failed" not in facts.console_text:
            problems.append("GRUB did not say it could not save the count")
        if GRUBENV_REWRITTEN not in facts.console_text:
            problems.append("the agent did not rewrite the damaged grubenv")
        return problems


FAULT_TYPES: dict[str, type[Fault]] = {
    f.name: f for f in (TamperDirective, ServerRestart, CablePull, PowerLoss, DiskFull, CorruptGrubenv)
}
# Name -> one line for ``recovery-lab run --help``.
FAULTS: dict[str, str] = {name: f.summary for name, f in FAULT_TYPES.items()}
# Faults that change the apply or the disk: each runs alone.
_ALONE = {TAMPER_DIRECTIVE, POWER_LOSS, DISK_FULL, CORRUPT_GRUBENV}


def make_faults(names: Sequence[str], power_loss_at: Sequence[str] = DEFAULT_POWER_LOSS_AT) -> list[Fault]:
    """The faults of a run, checked: known names, each once, and only combinations that do not
    disturb the same moment. Raises ``ValueError`` naming the problem."""
    unknown = [n for n in names if n not in FAULT_TYPES]
    if unknown:
        raise ValueError(f"unknown fault {unknown[0]!r}: use one of {', '.join(FAULT_TYPES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"faults {list(names)}: name each fault once")
    alone = [n for n in names if n in _ALONE]
    if alone and len(names) > 1:
        raise ValueError(
            f"fault {alone[0]} changes the apply or the disk: run it alone, not with {list(names)}"
        )
    return [PowerLoss(power_loss_at) if n == POWER_LOSS else FAULT_TYPES[n]() for n in names]


def judge(faults: Sequence[Fault], facts: RunFacts) -> list[str]:
    """Every way the run missed what it should show: a recovery without faults, else what each
    fault predicts."""
    if not faults:
        return [] if facts.recovered else ["the machine did not recover"]
    problems: list[str] = []
    for fault in faults:
        problems += [p for p in fault.problems(facts) if p not in problems]
    return problems


# --------------------------------------------------------------------------- changing a disk


def sparse_copy(src: Path, dst: Path, chunk: int = 1 << 20) -> Path:
    """Copy ``src`` to ``dst`` leaving runs of zeros as holes (the lab's disks are sparse)."""
    zero = bytes(chunk)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while data := fin.read(chunk):
            if data == zero[: len(data)]:
                fout.seek(len(data), os.SEEK_CUR)
            else:
                fout.write(data)
        fout.truncate()
    return dst


def partition_offset(image: Path, number: int) -> int:
    """Where partition ``number`` of the lab disk ``image`` starts, in bytes."""
    with open(image, "rb") as f:
        parts = {p.number: p for p in parse_mbr(f.read(SECTOR))}
    return parts[number].offset


def fill_ext4(image: Path, offset: int = 0) -> None:
    """Leave no free block on the ext4 at ``offset`` in ``image``: files of unwritten extents
    (debugfs ``fallocate``: the blocks count as used, the image stays sparse). The last
    blocks go one file at a time, as the extent trees need room of their own."""
    tools.require("debugfs")
    fs = f"{image}?offset={offset}"
    for n in range(8):
        stats = tools.run(["debugfs", "-R", "stats", fs])
        m = re.search(r"^Free blocks:\s+(\d+)", stats, re.MULTILINE)
        free = int(m.group(1)) if m else 0
        if free == 0:
            return
        blocks = free - 100 if free > 200 else max(free - 1, 1)
        script = f"write /dev/null /lab-fill-{n}\nfallocate /lab-fill-{n} 0 {blocks - 1}\n"
        tools.run(["debugfs", "-w", "-f", "-", fs], input=script.encode())
    raise tools.ToolError(f"debugfs could not fill the ext4 at {fs}: free blocks remain")


def write_fat_file(image: Path, path: str, data: bytes, work: Path, offset: int = 0) -> None:
    """Overwrite ``path`` on the FAT filesystem at ``offset`` in ``image`` with ``data``."""
    tools.require("mcopy")
    src = work / "fat-file"
    src.write_bytes(data)
    tools.run(
        ["mcopy", "-o", "-i", f"{image}@@{offset}", str(src), f"::{path}"], env={"MTOOLS_SKIP_CHECK": "1"}
    )
    src.unlink()


# --------------------------------------------------------------------------- the tampering proxy


def tamper_payload(payload: bytes) -> bytes:
    """``payload`` with the last character of its first ``"path"`` value changed (``0``, or
    ``1`` if it was ``0``): still valid JSON and a valid path, but not the bytes the server
    signed."""
    m = _FIRST_PATH.search(payload)
    if m is None:
        raise ValueError("the directive's payload names no path to alter")
    end = m.end("path") - 1
    replacement = b"1" if payload[end : end + 1] == b"0" else b"0"
    return payload[:end] + replacement + payload[end + 1 :]


def _listening_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


class DirectiveTamperer:
    """An HTTP proxy on 127.0.0.1 in front of the server at ``upstream``: passes every
    request through and alters every directive the server hands out
    (:func:`tamper_payload`), calling ``on_tamper()`` each time."""

    def __init__(self, upstream: str, on_tamper: Callable[[], None]) -> None:
        self.upstream = upstream
        self.on_tamper = on_tamper
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None

    async def start(self) -> int:
        """Listen on a free port of 127.0.0.1 and return it."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = ClientSession()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = _listening_port(self._runner)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=await request.read()
        ) as r:
            body = await r.read()
            status = r.status
        if request.path.endswith("/directive") and status == 200:
            answer = json.loads(body)
            if answer.get("status") == "directive":
                envelope = answer["envelope"]
                payload = tamper_payload(base64.b64decode(envelope["payload"]))
                envelope["payload"] = base64.b64encode(payload).decode()
                body = json.dumps(answer).encode()
                self.on_tamper()
        return web.Response(body=body, status=status, content_type="application/json")


def disk_facts(
    read_file: Callable[[str], bytes | None], listdir: Callable[[str], list[str]]
) -> dict[str, Any]:
    """What a run left in the agent's state on the OS partition, for judging faults: journal
    states, quarantine folders and any manifest entry whose file is gone."""
    states = []
    for name in sorted(listdir(JOURNAL_DIR)):
        if name.endswith(".json"):
            raw = read_file(f"{JOURNAL_DIR}/{name}")
            states.append(json.loads(raw)["state"] if raw else "unreadable")
    lost = []
    for folder in listdir(QUARANTINE_DIR):
        held = set(listdir(f"{QUARANTINE_DIR}/{folder}"))
        raw = read_file(f"{QUARANTINE_DIR}/{folder}/manifest.json")
        for entry in json.loads(raw)["entries"] if raw else []:
            if entry["restored_at"] is None and entry["stored_name"] not in held:
                lost.append(f"{folder}/{entry['stored_name']}")
    return {"journal_states": states, "quarantine_lost": lost}
