"""Properties of the agent over any evidence (hypothesis): whatever bytes pstore, the boot log,
grubenv and the OS tree hold (odd names, sizes, counts, symlinks, FIFOs),

- collect + seal gives diagnostics that validate and fit the server's body limit;
- `run` against a real in-process server exits with one of its documented codes.

Example counts are kept small so that the suite stays fast; the examples are built to reach
the limits (long lines, long names, many files) rather than to be many."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recovery_agent.agent import Outcome, RecoveryAgent
from recovery_agent.bootenv import BootEnv, BootEnvError
from recovery_agent.layout import CHANNEL_DIR, DRIVER_STORE
from recovery_agent.protocol.envelope import MAX_ENVELOPE_BYTES
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import (
    SIZE_MAX,
    BootState,
    CrashKind,
    CrashSignature,
    Diagnostics,
    FileRecord,
    SystemInfo,
    utcnow,
)
from recovery_agent.report import Findings, seal_within
from recovery_agent.settings import AgentSettings

from .clock import ManualClock
from .conftest import Fleet, enrolled_settings

PANIC = (Path(__file__).parent / "data/panic/channel-file-pstore.txt").read_text()
DOCUMENTED = {int(o) for o in Outcome}

# --------------------------------------------------------------------------- strategies

# A file name as a filesystem takes it: any bytes but "/" and NUL, not "." or "..", at most
# 255 bytes; decoded as Python does (bytes that are not UTF-8 become lone surrogates).
names = (
    st.one_of(
        st.binary(min_size=1, max_size=60),
        st.text(min_size=1, max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
    .map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_")[:200])
    .filter(lambda b: b not in (b".", b".."))
    .map(os.fsdecode)
)


def _mutated_panic(symbol: str, module: str, channel: str, filler: str) -> str:
    return (
        PANIC.replace("sensor_parse_channel", symbol or "f")
        .replace("[sensor]", f"[{module}]")
        .replace("C-00000291-00000000-00000032.sys", channel)
        .replace("general protection fault", "general protection fault" + filler)
    )


crash_texts = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        _mutated_panic,
        st.text(alphabet="abc_.", min_size=1, max_size=700),
        st.text(alphabet="mod_-", min_size=1, max_size=120),
        st.text(min_size=1, max_size=1500).map(lambda t: t.replace("\n", "")),
        st.sampled_from(["", " " * 5000, ".cold" * 500, "\t\x00\udcff"]),
    ).map(lambda t: t.encode("utf-8", "surrogatepass")),
)

record_names = st.one_of(
    st.builds(
        "{}-ramoops-{}{}".format,
        st.sampled_from(["dmesg", "console", "pmsg"]),
        st.integers(0, 10**30),
        st.sampled_from(["", ".enc.z"]),
    ),
    names,
)

pstores = st.dictionaries(record_names, crash_texts | st.just(b"fifo") | st.just(b"link"), max_size=6)

grubenvs = st.one_of(
    st.binary(min_size=0, max_size=1100),
    st.builds(
        lambda count, attempts, extra: (count, attempts, extra),
        st.one_of(st.integers(0, 10**25).map(str), st.text(max_size=12)),
        st.one_of(st.integers(0, 10**25).map(str), st.text(max_size=12)),
        st.integers(0, 1000),
    ),
)


@st.composite
def os_trees(draw: st.DrawFn) -> list[tuple[str, str, bytes]]:
    """(kind, relative path, content) of files, FIFOs, symlinks and folders to make."""
    entries: list[tuple[str, str, bytes]] = []
    kver = draw(st.one_of(st.just("6.1.0-test"), names))
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["file", "file", "fifo", "link", "dir"]))
        name = draw(names)
        where = draw(
            st.sampled_from(
                [
                    f"{CHANNEL_DIR}/C-{name}.sys",
                    f"lib/modules/{kver}/extra/{name}.ko",
                    f"lib/modules/{kver}/extra/{name}/{name}/x.ko",
                    f"{DRIVER_STORE}/sensor/{name}/sensor.ko",
                    f"etc/{name}",
                ]
            )
        )
        entries.append((kind, where, draw(st.binary(max_size=200))))
    many = draw(st.sampled_from([0, 0, 0, 1050]))  # beyond the per-kind limit now and then
    entries += [("file", f"{CHANNEL_DIR}/C-{i:05d}-{'n' * 180}.sys", b"%d" % i) for i in range(many)]
    return entries


# --------------------------------------------------------------------------- building a machine


def _write(path: Path, kind: str, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            return
        if kind == "fifo" or data == b"fifo":
            os.mkfifo(path)
        elif kind == "link" or data == b"link":
            os.symlink("/etc/passwd" if len(data) % 2 else path.name, path)
        elif kind == "dir":
            path.mkdir()
        else:
            path.write_bytes(data)
    except OSError:
        pass  # a name this filesystem will not take (too long once encoded): skip it


def make_machine(root: Path, pstore: dict[str, bytes], boot_log: bytes, grubenv: object, tree: list) -> Path:
    (root / "esp/grub").mkdir(parents=True)
    (root / "os").mkdir()
    (root / "pstore").mkdir()
    if isinstance(grubenv, bytes):
        (root / "esp/grub/grubenv").write_bytes(grubenv)
    else:
        count, attempts, extra = grubenv
        env = BootEnv.new({"boot_limit": 2})
        for name, value in (("boot_count", count), ("recovery_attempts", attempts), ("x", "y" * extra)):
            env.set(name, value)
            try:
                env.to_bytes()
            except BootEnvError:  # does not fit: leave it out
                env.unset(name)
        env.create(root / "esp/grub/grubenv")
    for name, data in pstore.items():
        _write(root / "pstore" / name, "file", data)
    (root / "boot.log").write_bytes(boot_log)
    for kind, rel, data in tree:
        _write(root / "os" / rel, kind, data)
    return root


# --------------------------------------------------------------------------- properties


@settings(max_examples=20, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pstore=pstores, boot_log=crash_texts, grubenv=grubenvs, tree=os_trees())
def test_collect_and_seal_always_give_diagnostics_that_validate_and_fit(
    pstore, boot_log, grubenv, tree
) -> None:
    key = SigningKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        m = make_machine(Path(tmp), pstore, boot_log, grubenv, tree)
        key.save(m / "device.key")
        agent_settings = AgentSettings(
            device_id="dev-1",
            server_url="http://127.0.0.1:9",
            server_public_key=public_b64(key.public),
            device_key=m / "device.key",
            os_root=m / "os",
            grubenv=m / "esp/grub/grubenv",
            pstore_dir=m / "pstore",
            boot_log=m / "boot.log",
            boot_progress=m / "boot.log",
        )
        agent = RecoveryAgent(agent_settings)
        findings = agent.collect(agent.read_boot_count(count_visit=True))
        diagnostics = findings.diagnostics(server_nonce="n" * 32, agent_nonce="a" * 32, created_at=utcnow())
        sealed = seal_within(diagnostics, key)
    assert len(sealed.body) <= MAX_ENVELOPE_BYTES
    payload = base64.b64decode(json.loads(sealed.body)["payload"])
    assert Diagnostics.model_validate_json(payload) == sealed.diagnostics


async def _run_against_a_server(m: Path) -> int:
    fleet = Fleet(store_url=str(m / "server/recovery.db"), key=SigningKey.generate())
    await fleet.start()
    try:
        settings = await enrolled_settings(
            fleet,
            m,
            auto_remediation=False,
            long_poll_s=0.1,
            boot_log="../boot.log",
            boot_progress="../boot.log",
        )
        clock = ManualClock()
        await clock.release()
        outcome = await asyncio.wait_for(RecoveryAgent(settings, clock=clock).run(), 60)
    finally:
        await fleet.stop()
    return int(outcome)


@settings(max_examples=8, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(pstore=pstores, boot_log=crash_texts, grubenv=grubenvs, tree=os_trees())
def test_run_against_a_real_server_always_exits_with_a_documented_code(
    pstore, boot_log, grubenv, tree
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        m = make_machine(Path(tmp), pstore, boot_log, grubenv, tree)
        assert asyncio.run(_run_against_a_server(m)) in DOCUMENTED


paths = st.text(alphabet="abcXYZ-_.", min_size=1, max_size=250).filter(lambda p: p not in (".", ".."))
records = st.builds(
    FileRecord,
    path=st.lists(paths, min_size=1, max_size=4).map("/".join),
    size=st.integers(0, SIZE_MAX),
    mtime=st.floats(-1e12, 1e12),
    sha256=st.just("b" * 64),
    version=st.none() | st.text(max_size=64),
)


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    counts=st.tuples(*[st.integers(0, 1000)] * 3),
    record=records,
    notes=st.lists(st.text(max_size=600), max_size=80),
)
def test_any_findings_are_sealed_within_the_body_limit(counts, record, notes) -> None:
    """Lists at the wire's per-kind limits, with paths up to 1024 characters: over the body
    limit many times, trimmed to it."""
    key = SigningKey.generate()

    def many(n: int, tag: str) -> list[FileRecord]:
        return [
            record.model_copy(update={"path": f"{tag}{i}/{record.path}"[:1024], "mtime": float(i)})
            for i in range(n)
        ]

    findings = Findings(
        device_id="dev-1",
        agent_version="t",
        boot=BootState(boot_count=2, boot_limit=2),
        crash=CrashSignature(kind=CrashKind.UNKNOWN, title="t" * 512, excerpt="e" * 16384),
        system=SystemInfo(),
        drivers=many(counts[0], "d"),
        channel_files=many(counts[1], "c"),
        driver_store=many(counts[2], "s"),
        recent_changes=many(10, "r"),
        notes=notes,
    )
    diagnostics = findings.diagnostics(server_nonce="n" * 32, agent_nonce="a" * 32, created_at=utcnow())
    sealed = seal_within(diagnostics, key)
    assert len(sealed.body) <= MAX_ENVELOPE_BYTES
    assert Diagnostics.model_validate_json(base64.b64decode(json.loads(sealed.body)["payload"])).notes == (
        sealed.diagnostics.notes
    )
