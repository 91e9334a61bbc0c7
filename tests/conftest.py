"""Shared fixtures: a real recovery server (aiohttp on 127.0.0.1, SQLite in tmp), people with
their tokens, and machine directories laid out like a broken machine's disks."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import BaseRunner, TestServer
from hypothesis import HealthCheck, settings

from recovery_agent.protocol.client import DeviceClient, RetryPolicy
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.protocol.wire import Enrollment, utcnow
from recovery_agent.settings import AgentSettings
from recovery_lab.dirdemo import make_machine_dir
from recovery_server.access import User, console
from recovery_server.app import make_app, runner
from recovery_server.device_api import MAX_POLL_S
from recovery_server.diskkeys import EscrowKeyFile, ReleasePolicy
from recovery_server.listener import ConnectionLimits
from recovery_server.service import RecoveryService, ServiceSettings
from recovery_server.store import Store

from .clock import ManualClock

# Hypothesis judges each example against a wall-clock deadline by default: a slow or busy
# machine would fail tests for it. No profile here has one; "ci" also prints the seed to rerun.
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """QEMU tests after the others, longest first (a test's timeout bounds how long it takes):
    two xdist workers fed one test at a time (scripts/test.sh) then finish close together.

    Tests marked ``slow`` (the stock-Debian base: tens of minutes) run only when asked for, by
    a marker expression that names them (``-m slow``) or ``QMR_SLOW=1`` (scripts/test.sh
    --slow); CI's default run leaves them out."""

    def bound(item: pytest.Item) -> float:
        marker = item.get_closest_marker("timeout")
        return float(marker.args[0]) if marker and marker.args else 0.0

    def order(item: pytest.Item) -> tuple[bool, float]:
        qemu = item.get_closest_marker("qemu") is not None
        return (qemu, -bound(item) if qemu else 0.0)

    items.sort(key=order)  # stable: the other tests keep their order
    if "slow" in (config.getoption("markexpr") or "") or os.environ.get("QMR_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or QMR_SLOW=1 (docs/testing.md)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


FAST_RETRY = RetryPolicy(attempts=2, max_delay_s=2, backoff_max_s=0.1, backoff_multiplier_s=0.01)


def tree_snapshot(root: Path, exclude: str | None = None) -> dict[str, tuple]:
    """path -> (type, sha256 or link target, mode); symlinks are not followed; paths under
    ``exclude`` (relative to root) left out."""
    tree: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if exclude and (rel + "/").startswith(exclude.rstrip("/") + "/"):
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = ("symlink", os.readlink(path), None)
            elif stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir", None, stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                tree[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
            else:  # a FIFO must not be read: it would block
                tree[rel] = ("special", stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    return tree


@contextmanager
def postgres_schema():
    """A fresh schema in the PostgreSQL that scripts/test.sh starts (its URL in
    QMR_TEST_POSTGRES), dropped afterwards; yields a URL that uses it."""
    base = os.environ.get("QMR_TEST_POSTGRES")
    if not base:
        if os.environ.get("CI"):
            pytest.fail(
                "QMR_TEST_POSTGRES is not set: run the tests with scripts/test.sh, which starts PostgreSQL"
            )
        pytest.skip("no PostgreSQL: scripts/test.sh starts one and sets QMR_TEST_POSTGRES")
    import psycopg

    schema = "t_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path: Path):
    """Every store test runs on both backends: SQLite in tmp, and a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield str(tmp_path / "server/recovery.db")
        return
    with postgres_schema() as url:
        yield url


class RecoveryTestServer(TestServer):
    """aiohttp's test server, serving the app as `recovery-server serve` does: through
    ``app.runner``, with the connection limits enforced."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return runner(self.app, **kwargs)


@dataclass
class Fleet:
    """A running recovery server and the people who administer it."""

    store_url: str
    key: SigningKey
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    # The escrow key (encrypted disks: recovery_server/diskkeys.py), as `recovery-server init` makes one.
    escrow: EscrowKeyFile = field(default_factory=EscrowKeyFile.generate)
    port: int = 0
    poll_tick_s: float = 1.0
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    max_poll_s: float = MAX_POLL_S

    async def start(self) -> None:
        self.store = Store(self.store_url)
        self.service = RecoveryService(
            store=self.store, server_key=self.key, settings=self.settings, escrow=self.escrow
        )
        app = make_app(
            self.service, poll_tick_s=self.poll_tick_s, limits=self.limits, max_poll_s=self.max_poll_s
        )
        self.server = RecoveryTestServer(
            app,
            host="127.0.0.1",
            port=self.port or None,
        )
        await self.server.start_server()
        self.port = self.server.port
        if not self.store.one("SELECT 1 FROM users"):
            for name, role in (
                ("admin", "admin"),
                ("alice", "approver"),
                ("bob", "approver"),
                ("victor", "viewer"),
                ("oscar", "operator"),
            ):
                self.service.create_user(console("setup"), name, role)
            self.enrollment_token = self.service.create_enrollment_token(self.user("admin")).token

    async def stop(self) -> None:
        await self.server.close()
        self.store.close()

    async def restart(self) -> None:
        """Stop the process's state entirely and start again on the same files and port."""
        await self.stop()
        await self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def user(self, name: str) -> User:
        row = self.store.one("SELECT name, role FROM users WHERE name = ?", name)
        return User(row["name"], row["role"])

    @property
    def admin(self) -> User:
        return self.user("admin")

    @property
    def viewer(self) -> User:
        """Who reads the fleet's state in a test: victor, a viewer."""
        return self.user("victor")

    def count(self, table: str) -> int:
        return self.store.one(f"SELECT count(*) FROM {table}")[0]

    async def enroll(self, device_id: str, key: SigningKey) -> dict:
        msg = Enrollment(
            device_id=device_id,
            public_key=public_b64(key.public),
            enrollment_token=self.enrollment_token,
            created_at=utcnow(),
        )
        async with DeviceClient(self.url, retry=FAST_RETRY) as c:
            return await c.enroll(seal_bytes(msg, key))

    def approve_suggested(self, incident_id: str, author: str = "alice", approver: str = "bob") -> str:
        s = self.service.suggest_actions(self.user(author), incident_id)
        rem = self.service.create_remediation(
            self.user(author), title=s.title, actions=s.actions, incident_id=incident_id
        )
        self.service.approve(self.user(approver), rem.remediation_id)
        return rem.remediation_id


def fleet_releasing_keys(store_url: str, policy: ReleasePolicy) -> Fleet:
    """A new fleet (start it with ``running``) whose server releases disk keys by ``policy``."""
    return Fleet(store_url=store_url, key=SigningKey.generate(), settings=ServiceSettings(key_release=policy))


@asynccontextmanager
async def running(fleet: Fleet) -> AsyncIterator[Fleet]:
    """``fleet`` started, and stopped again whatever happens (a fleet with its own settings)."""
    await fleet.start()
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture
async def fleet(store_url: str):
    f = Fleet(store_url=store_url, key=SigningKey.generate())
    await f.start()
    yield f
    await f.stop()


@pytest.fixture
def keys(fleet: Fleet) -> dict[str, SigningKey]:
    """Approval keys alice and bob made and registered (recovery-admin key)."""
    out = {}
    for name in ("alice", "bob"):
        out[name] = SigningKey.generate()
        fleet.service.register_key(fleet.user(name), public_b64(out[name].public))
    return out


@pytest.fixture
def clock() -> ManualClock:
    """The agent's clock, standing still until the test moves it (tests/clock.py)."""
    return ManualClock()


@pytest.fixture
def machine(tmp_path: Path) -> Path:
    return make_machine_dir(tmp_path / "machine")


async def enrolled_settings(
    fleet: Fleet, machine: Path, device_id: str = "dev-0001", **overrides
) -> AgentSettings:
    """Write agent.json for ``machine`` (fast lab timing), make and enroll its device key."""
    key = SigningKey.generate()
    (machine / "recovery").mkdir(exist_ok=True)
    key.save(machine / "recovery/device.key")
    await fleet.enroll(device_id, key)
    settings = {
        "device_id": device_id,
        "server_url": fleet.url,
        "server_public_key": public_b64(fleet.key.public),
        "device_key": "device.key",
        "os_root": "../os",
        "grubenv": "../esp/grub/grubenv",
        "pstore_dir": "../pstore",
        "seconds_per_minute": 0.05,
        "retry_interval_min": 2,
        "time_to_reboot_min": 60,
        "long_poll_s": 1,
    }
    settings.update(overrides)
    path = machine / "recovery/agent.json"
    path.write_text(json.dumps(settings))
    return AgentSettings.load(path)


@pytest.fixture
def volume(tmp_path) -> tuple[Path, Path]:
    """A LUKS2 volume in a file, and the key the machine's normal boot opens it with (in the
    lab a file stands in for the TPM that would hold it)."""
    import shutil
    import subprocess

    if shutil.which("cryptsetup") is None and not Path("/usr/sbin/cryptsetup").exists():
        pytest.fail("cryptsetup is missing: scripts/setup.sh --test installs Debian's cryptsetup-bin")
    image, boot_key = tmp_path / "root.luks", tmp_path / "tpm-emulation.key"
    image.write_bytes(b"\0" * (32 << 20))
    boot_key.write_bytes(secrets.token_bytes(32))
    subprocess.run(
        [
            shutil.which("cryptsetup") or "/usr/sbin/cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            str(boot_key),
            str(image),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return image, boot_key


def escrow_argv(machine: Path, image: Path, boot_key: Path, *extra: str) -> list[str]:
    """`recovery-agent escrow` of the LUKS2 volume ``image`` (unlocked by ``boot_key``) with
    ``machine``'s settings, and ``extra`` options."""
    config = str(machine / "recovery/agent.json")
    return ["--config", config, "escrow", "--device", str(image), "--unlock-key-file", str(boot_key), *extra]
