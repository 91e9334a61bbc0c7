"""recovery-lab build, the pure-Python parts: scenario files, the MBR writer, the stage cache,
tool errors, module ordering, applying a scenario, and the guest's grubenv writer. No QEMU,
no downloads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recovery_agent.bootenv import BootEnv
from recovery_lab import disk
from recovery_lab.build import cache
from recovery_lab.build.cache import BuildError, Cache, cache_key
from recovery_lab.build.kernel import module_closure
from recovery_lab.build.osroot import apply_scenario
from recovery_lab.locks import build_lock
from recovery_lab.scenario import ScenarioError, all_scenarios, load_scenario
from recovery_lab.tools import ToolFailed, ToolMissing, require, run

IMAGES = Path(__file__).resolve().parents[1] / "images"

GOOD = """\
name = "{name}"
description = "test"

[[files]]
path = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
action = "add"
source = "channel:bad-291"

[expect]
ends_in = "recovery"
panics = 2
"""


def write(tmp_path: Path, text: str, name: str = "mine") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace("{name}", name))
    return path


# ------------------------------------------------------------------ scenarios


def test_shipped_scenarios_are_valid() -> None:
    names = {load_scenario(p).name for p in all_scenarios(IMAGES)}
    assert names == {
        "healthy",
        "channel-file",
        "silent-channel-file",
        "bad-driver",
        "boot-hang",
        "init-crash",
        "unknown",
    }


def test_the_example_scenarios_load_with_their_own_files() -> None:
    examples = sorted((IMAGES / "scenarios" / "examples").glob("*.toml"))
    assert [p.stem for p in examples] == ["vendor-content"]
    [source] = load_scenario(examples[0]).local_files.values()
    assert Path(source[0]).read_bytes()[:4] == b"CHNL"


def test_valid_scenario(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, GOOD))
    assert s.files[0].source == "channel:bad-291"
    assert s.expect.ends_in == "recovery" and s.expect.panics == 2
    assert len(s.source_sha256) == 64


@pytest.mark.parametrize(
    "old,new,field,fix",
    [
        ('action = "add"', 'action = "delete"', "files[0].action", "add, replace, corrupt, remove"),
        ('source = "channel:bad-291"', 'source = "channel:nope"', "files[0].source", "channel:good-291"),
        ('path = "var/', 'path = "/var/', "files[0].path", "without a leading '/'"),
        ('path = "var/', 'path = "../var/', "files[0].path", "without a leading '/'"),
        ('ends_in = "recovery"', 'ends_in = "reboot"', "expect.ends_in", '"healthy" or "recovery"'),
        ("panics = 2", "panics = 2\npanicz = 1", "expect.panicz", "remove it"),
        ('description = "test"', 'description = "test"\nkernel_args = ["a=$x"]', "kernel_args", "no quotes"),
        ('source = "channel:bad-291"', "", "files[0]", "needs exactly one of source or content"),
    ],
)
def test_invalid_scenario_names_file_field_and_fix(
    tmp_path: Path, old: str, new: str, field: str, fix: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"field {field}" in msg
    assert fix in msg


def test_missing_expect(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.split("[expect]")[0])
    with pytest.raises(ScenarioError, match=r"field expect: Field required: add it"):
        load_scenario(path)


def test_name_must_match_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("{name}", "other"), name="mine")
    with pytest.raises(ScenarioError, match="rename the file to other.toml"):
        load_scenario(path)


def test_bad_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "name = ")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(path)


def _root(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "early.conf").write_text("a=b\n")
    (root / "etc" / "gone").write_text("x")
    sensor = tmp_path / "sensor"
    for v in ("1.0", "2.0"):
        (sensor / v).mkdir(parents=True)
        (sensor / v / "sensor.ko").write_bytes(f"ko {v}".encode())
    (root / "lib/modules/6.1.0-1-amd64/extra").mkdir(parents=True)
    (root / "lib/modules/6.1.0-1-amd64/extra/sensor.ko").write_bytes(b"ko 1.0")
    (root / "boot").mkdir()
    return root, sensor


def test_apply_scenario(tmp_path: Path) -> None:
    root, sensor = _root(tmp_path)
    path = write(
        tmp_path,
        """\
name = "mine"
description = "x"
kernel_args = ["sensor.hang=1", "softlockup_panic=1"]
[[files]]
path = "var/lib/sensor/channels/C-00000291-00000000-00000032.sys"
action = "add"
source = "channel:bad-291"
[[files]]
path = "lib/modules/{kernel_release}/extra/sensor.ko"
action = "replace"
source = "sensor:2.0"
[[files]]
path = "etc/early.conf"
action = "corrupt"
[[files]]
path = "etc/gone"
action = "remove"
[[files]]
path = "etc/init.d/S20-x"
action = "add"
content = "exit 1\\n"
mode = "0755"
[expect]
ends_in = "recovery"
""",
    )
    apply_scenario(root, load_scenario(path), sensor, "6.1.0-1-amd64")
    bad = (root / "var/lib/sensor/channels/C-00000291-00000000-00000032.sys").read_bytes()
    assert len(bad) == 172 and bad[6] == 21 and bad[8] == 20
    assert (root / "lib/modules/6.1.0-1-amd64/extra/sensor.ko").read_bytes() == b"ko 2.0"
    assert (root / "etc/early.conf").read_bytes() == bytes(c ^ 0xFF for c in b"a=b\n")
    assert not (root / "etc/gone").exists()
    assert (root / "etc/init.d/S20-x").stat().st_mode & 0o777 == 0o755
    assert 'set qmr_os_args="sensor.hang=1 softlockup_panic=1"' in (root / "boot/cmdline.cfg").read_text()


@pytest.mark.parametrize(
    "action,path,fix",
    [
        ("add", "etc/early.conf", 'use action = "replace"'),
        ("remove", "etc/nothing", 'use action = "add", or fix the path'),
    ],
)
def test_apply_scenario_checks_existence(tmp_path: Path, action: str, path: str, fix: str) -> None:
    root, sensor = _root(tmp_path)
    data = '\ncontent = "x"' if action == "add" else ""
    f = write(
        tmp_path,
        f'name = "mine"\ndescription = "x"\n[[files]]\npath = "{path}"\n'
        f'action = "{action}"{data}\n[expect]\nends_in = "healthy"\n',
    )
    with pytest.raises(ScenarioError, match="field files\\[0\\]") as info:
        apply_scenario(root, load_scenario(f), sensor, "6.1.0-1-amd64")
    assert fix in str(info.value)


FILE_SOURCE = """\
name = "mine"
description = "a vendor's own driver and content"
[[files]]
path = "lib/modules/{kernel_release}/extra/sensor.ko"
action = "replace"
source = "file:build/sensor.ko"
[[files]]
path = "var/lib/sensor/channels/C-00000291-00000000-00000099.sys"
action = "add"
source = "file:SOURCE2"
[expect]
ends_in = "recovery"
"""


def test_file_sources_come_from_the_users_files_relative_to_the_scenario(tmp_path: Path) -> None:
    root, sensor = _root(tmp_path)
    (tmp_path / "build").mkdir()
    (tmp_path / "build/sensor.ko").write_bytes(b"vendor ko 3.1")
    elsewhere = tmp_path / "elsewhere" / "C-99.sys"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"CHNL vendor content")
    path = write(tmp_path, FILE_SOURCE.replace("SOURCE2", "elsewhere/C-99.sys"))
    s = load_scenario(path)
    assert s.build_sha256 != s.source_sha256  # the files' content is part of what is built
    apply_scenario(root, s, sensor, "6.1.0-1-amd64")
    assert (root / "lib/modules/6.1.0-1-amd64/extra/sensor.ko").read_bytes() == b"vendor ko 3.1"
    assert (root / "var/lib/sensor/channels/C-00000291-00000000-00000099.sys").read_bytes() == (
        b"CHNL vendor content"
    )
    # A new build of the driver is a new image, not a stale cached one.
    (tmp_path / "build/sensor.ko").write_bytes(b"vendor ko 3.2")
    assert load_scenario(path).build_sha256 != s.build_sha256
    # ...and a file that changes between reading the scenario and building is refused.
    with pytest.raises(ScenarioError, match="changed while the image was built: build again"):
        apply_scenario(_root(tmp_path / "again")[0], s, sensor, "6.1.0-1-amd64")


@pytest.mark.parametrize(
    "source,problem",
    [
        ("missing.sys", "cannot read"),
        ("elsewhere", "is not a regular file"),
        ("", "names no file"),
    ],
)
def test_a_file_source_that_cannot_be_used_names_the_field_and_the_fix(
    tmp_path: Path, source: str, problem: str
) -> None:
    (tmp_path / "build").mkdir()
    (tmp_path / "build/sensor.ko").write_bytes(b"ko")
    (tmp_path / "elsewhere").mkdir()
    path = write(tmp_path, FILE_SOURCE.replace("SOURCE2", source))
    with pytest.raises(ScenarioError, match=r"field files\[1\]\.source") as info:
        load_scenario(path)
    assert problem in str(info.value)


def test_a_scenario_without_file_sources_keeps_its_cache_key(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, GOOD))
    assert s.build_sha256 == s.source_sha256 and s.local_files == {}


# ------------------------------------------------------------------ MBR


def test_mbr_table_round_trip() -> None:
    parts = disk.layout(disk.PARTITIONS)
    assert [p.start for p in parts] == [2048, 2048 + 32 * 2048, 2048 + 224 * 2048]
    table = disk.mbr_table(parts)
    assert len(table) == 72 and table[-2:] == b"\x55\xaa"
    sector0 = bytes(440) + table
    back = disk.parse_mbr(sector0)
    assert [(p.number, p.type_id, p.start, p.sectors, p.bootable) for p in back] == [
        (p.number, p.type_id, p.start, p.sectors, p.bootable) for p in parts
    ]
    assert int.from_bytes(sector0[440:444], "little") == disk.DISK_SIGNATURE


def test_mbr_rejects_overlap() -> None:
    a = disk.Partition(1, "a", disk.TYPE_LINUX, 2048, 4096)
    b = disk.Partition(2, "b", disk.TYPE_LINUX, 4000, 100)
    with pytest.raises(disk.DiskError, match="overlaps"):
        disk.mbr_table([a, b])


def test_assemble_places_everything(tmp_path: Path) -> None:
    parts = disk.layout([("esp", disk.TYPE_FAT16_LBA, 1), ("os", disk.TYPE_LINUX, 2)])
    images = {1: tmp_path / "p1", 2: tmp_path / "p2"}
    images[1].write_bytes(b"FAT!" + bytes(1000))
    images[2].write_bytes(b"\0" * (1 << 20) + b"EXT4")
    boot = tmp_path / "boot.img"
    boot.write_bytes(bytes(range(256)) * 2)
    core = tmp_path / "core.img"
    core.write_bytes(b"CORE" * 300)
    out = tmp_path / "disk.img"
    disk.assemble(out, parts, images, boot, core)
    data = out.read_bytes()
    assert len(data) == (2048 + 3 * 2048) * 512
    assert data[:440] == (bytes(range(256)) * 2)[:440]
    assert data[512:516] == b"CORE"
    assert data[parts[0].offset : parts[0].offset + 4] == b"FAT!"
    assert data[parts[1].offset + (1 << 20) : parts[1].offset + (1 << 20) + 4] == b"EXT4"
    if shutil.which("sfdisk") or Path("/usr/sbin/sfdisk").exists():
        dump = run(["sfdisk", "--dump", out])
        assert "start=        2048, size=        2048, type=e, bootable" in dump


def test_gpt_round_trip_and_sfdisk_agrees(tmp_path: Path) -> None:
    """A GPT the lab writes reads back the same here and in sfdisk (util-linux), with the
    backup table where sfdisk looks for it."""
    parts = disk.layout(
        [("bios", disk.GPT_BIOS_BOOT, 1), ("root", disk.GPT_LINUX, 3), ("esp", disk.GPT_EFI, 2)]
    )
    images = {2: tmp_path / "p2"}
    images[2].write_bytes(b"ROOT" + bytes(100))
    out = tmp_path / "disk.img"
    guid = uuid.UUID("51a2c0de-0000-4000-8000-000000000001")
    disk.assemble(out, parts, images, None, None, table="gpt", disk_guid=guid)
    data = out.read_bytes()
    assert len(data) % disk.MIB == 0 and len(data) >= disk.disk_size(parts) + 33 * 512
    assert data[parts[1].offset : parts[1].offset + 4] == b"ROOT"
    table, back = disk.read_partitions(out)
    assert table == "gpt"
    assert [(p.number, p.name, p.type_guid, p.start, p.sectors) for p in back] == [
        (p.number, p.name, p.type_guid, p.start, p.sectors) for p in parts
    ]
    sfdisk = shutil.which("sfdisk") or ("/usr/sbin/sfdisk" if Path("/usr/sbin/sfdisk").exists() else None)
    if sfdisk:
        info = json.loads(run([sfdisk, "--json", out]))["partitiontable"]
        assert info["label"] == "gpt" and info["id"].lower() == str(guid)
        assert [(q["start"], q["size"], q["type"].lower(), q["name"]) for q in info["partitions"]] == [
            (p.start, p.sectors, p.type_guid, p.name) for p in parts
        ]
        verify = subprocess.run([sfdisk, "--verify", out], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_gpt_damage_is_named(tmp_path: Path) -> None:
    parts = disk.layout([("root", disk.GPT_LINUX, 1)])
    out = tmp_path / "disk.img"
    disk.assemble(out, parts, {}, None, None, table="gpt")
    raw = bytearray(out.read_bytes())
    raw[2 * 512 + 40] ^= 0xFF  # in the first entry's first LBA
    out.write_bytes(bytes(raw))
    with pytest.raises(disk.DiskError, match="entries' CRC32"):
        disk.read_partitions(out)
    raw[512 + 24] ^= 0xFF  # in the header
    out.write_bytes(bytes(raw))
    with pytest.raises(disk.DiskError, match="header's CRC32"):
        disk.read_partitions(out)
    out.write_bytes(bytes(raw[:600]))
    with pytest.raises(disk.DiskError, match="whole disk"):
        disk.read_partitions(out)


def test_mbr_disk_reads_as_mbr(tmp_path: Path) -> None:
    parts = disk.layout([("boot", disk.TYPE_LINUX, 1), ("root", disk.TYPE_LINUX, 1)])
    out = tmp_path / "disk.img"
    disk.assemble(out, parts, {}, None, None)
    table, back = disk.read_partitions(out)
    assert table == "mbr" and [p.start for p in back] == [p.start for p in parts]


def test_core_img_must_fit(tmp_path: Path) -> None:
    parts = disk.layout([("esp", disk.TYPE_FAT16_LBA, 1)])
    (tmp_path / "p1").write_bytes(b"x")
    (tmp_path / "boot.img").write_bytes(bytes(512))
    (tmp_path / "core.img").write_bytes(bytes(2048 * 512))
    with pytest.raises(disk.DiskError, match="does not fit"):
        disk.assemble(
            tmp_path / "d", parts, {1: tmp_path / "p1"}, tmp_path / "boot.img", tmp_path / "core.img"
        )


# ------------------------------------------------------------------ cache


def test_cache_key_changes_with_any_input(tmp_path: Path) -> None:
    lines: list[str] = []
    cache = Cache(tmp_path, lines.append)
    calls: list[Path] = []

    def make(out: Path) -> None:
        calls.append(out)
        (out / "product").write_text("x")

    first = cache.stage("thing", {"version": "1", "file": "aa"}, make)
    again = cache.stage("thing", {"file": "aa", "version": "1"}, make)  # same inputs, any order
    assert first == again and len(calls) == 1
    assert lines[-1].startswith("[thing] cached")
    other = cache.stage("thing", {"version": "2", "file": "aa"}, make)
    assert other != first and len(calls) == 2
    assert (other / "product").exists() and (other / "inputs.json").exists()

    def make_differently(out: Path) -> None:  # a changed stage builds anew
        (out / "product").write_text("y")

    changed = cache.stage("thing", {"version": "1", "file": "aa"}, make_differently)
    assert changed not in (first, other)


def test_failed_stage_leaves_no_entry(tmp_path: Path) -> None:
    cache = Cache(tmp_path, lambda _: None)

    def fail(out: Path) -> None:
        run(["false"])

    with pytest.raises(BuildError, match="stage broken: false failed"):
        cache.stage("broken", {}, fail)
    assert not list(tmp_path.glob("broken-*/inputs.json"))


def test_two_builds_of_one_stage_at_once_take_turns_and_the_second_reuses_the_first(tmp_path: Path) -> None:
    """Two test workers asking for the same image: the second waits on the stage's lock
    (it says so) instead of removing the first's temporary directory, then reuses its output."""
    inside, release, second_waits = threading.Event(), threading.Event(), threading.Event()
    calls: list[Path] = []

    def make(out: Path) -> None:
        calls.append(out)
        inside.set()
        assert release.wait(60)
        (out / "product").write_text("x")

    second_lines: list[str] = []

    def second_log(line: str) -> None:
        second_lines.append(line)
        if line.startswith("waiting for another build"):
            second_waits.set()

    results: dict[str, Path] = {}
    first = threading.Thread(
        target=lambda: results.update(a=Cache(tmp_path, lambda _: None).stage("s", {}, make))
    )
    second = threading.Thread(
        target=lambda: results.update(b=Cache(tmp_path, second_log).stage("s", {}, make))
    )
    first.start()
    assert inside.wait(60)
    second.start()
    assert second_waits.wait(60), second_lines
    release.set()
    first.join(60)
    second.join(60)
    assert len(calls) == 1 and results["a"] == results["b"]
    assert (results["a"] / "product").read_text() == "x"
    assert second_lines[-1].startswith("[s] cached")


def test_cache_key_is_order_independent() -> None:
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1}) != cache_key({"a": 2})


# ------------------------------------------------------------------ tools


def test_missing_tool_names_package() -> None:
    with pytest.raises(ToolMissing) as info:
        run(["mkfs.fat-not-here"])
    assert "mkfs.fat-not-here not found" in str(info.value)


def test_missing_known_tool_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("recovery_lab.tools.which", lambda tool: None)
    with pytest.raises(
        ToolMissing,
        match=r"mkfs.fat not found: install dosfstools "
        r"\(apt-get install dosfstools\)",
    ):
        run(["mkfs.fat", "-C", "x", "100"])
    with pytest.raises(ToolMissing, match="all at once: apt-get install dosfstools mtools"):
        require("mkfs.fat", "mcopy")


def test_failing_tool_shows_stderr_tail() -> None:
    with pytest.raises(ToolFailed) as info:
        run(["sh", "-c", "for i in $(seq 1 50); do echo line$i >&2; done; exit 3"])
    msg = str(info.value)
    assert "exit 3" in msg and "line50" in msg and "line1\n" not in msg
    assert info.value.returncode == 3


# ------------------------------------------------------------------ modules


def test_module_closure_orders_dependencies(tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules/6.1.0-1-amd64"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/lib/crc16.ko:\nkernel/fs/mbcache.ko:\nkernel/fs/jbd2/jbd2.ko:\n"
        "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko: kernel/drivers/misc/pvpanic/pvpanic.ko\n"
        "kernel/drivers/misc/pvpanic/pvpanic.ko:\n"
    )
    order = module_closure(tmp_path, "6.1.0-1-amd64", ["ext4", "pvpanic-mmio", "jbd2"])
    assert order.index("kernel/fs/ext4/ext4.ko") > order.index("kernel/fs/jbd2/jbd2.ko")
    assert order.index("kernel/fs/ext4/ext4.ko") > order.index("kernel/lib/crc16.ko")
    assert order[-1] == "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko"
    assert len(order) == len(set(order)) == 6
    with pytest.raises(BuildError, match="no module nope"):
        module_closure(tmp_path, "6.1.0-1-amd64", ["nope"])


# ------------------------------------------------------------------ guest grubenv writer


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox-static")
def test_guest_grubenv_reset_keeps_size_and_other_variables(tmp_path: Path) -> None:
    env = tmp_path / "grubenv"
    BootEnv.new({"boot_limit": 2, "boot_count": 12, "other": "x"}).create(env)
    before_inode = env.stat().st_ino
    script = f". {IMAGES / 'os' / 'lib.sh'}; qmr_grubenv_reset {env} && qmr_grubenv_get {env} boot_count"
    out = subprocess.run(
        ["/bin/busybox", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={"PATH": "/bin:/usr/bin"},
    )
    assert out.stdout.strip() == "0"
    assert env.stat().st_size == 1024 and env.stat().st_ino == before_inode
    assert dict(BootEnv.read(env)) == {"boot_limit": "2", "boot_count": "0", "other": "x"}


def test_a_stages_code_key_follows_what_it_does_not_where_it_sits(tmp_path: Path) -> None:
    """The key takes a build function's code as loaded: the same code at other line numbers
    keeps its key (so an edit elsewhere in the file, even during a build, rebuilds nothing);
    other code, other constants or a nested function's change make a new key."""
    from recovery_lab.build.cache import _code_hash

    def load(source: str, first_line: int = 1) -> Callable[[Path], None]:
        namespace: dict[str, Any] = {}
        exec(compile("\n" * (first_line - 1) + source, "stage.py", "exec"), namespace)
        return namespace["build"]  # type: ignore[no-any-return]

    base = "def build(out):\n    def inner():\n        return {'a', 'b'}\n    (out / 'x').write_text('1')\n"
    key = _code_hash(load(base))
    assert _code_hash(load(base, first_line=40)) == key
    assert _code_hash(load(base.replace("'1'", "'2'"))) != key
    assert _code_hash(load(base.replace("{'a', 'b'}", "{'a', 'c'}"))) != key
    assert _code_hash(load(base.replace("write_text", "write_bytes"))) != key


def _stage(root: Path, name: str, days_ago: float, now: float, *, done: bool = True) -> Path:
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "disk.img").write_bytes(b"x" * 1000)
    marker = entry / "inputs.json" if done else entry / "disk.img"
    if done:
        marker.write_text("{}\n")
    os.utime(marker, (now - days_ago * 86400,) * 2)
    os.utime(entry, (now - days_ago * 86400,) * 2)
    return entry


def test_cache_prune_removes_the_stages_unused_for_days_and_nothing_else(tmp_path: Path) -> None:
    now = time.time()
    root = tmp_path / "cache"
    old = _stage(root, "debian-disk-0123456789abcdef", 10, now)
    recent = _stage(root, "debian-disk-fedcba9876543210", 1, now)
    half_done = _stage(root, "debian-qmr-00112233445566aa.tmp", 10, now, done=False)
    other = _stage(root, "pyruntime", 30, now)
    dry = cache.prune(root, 7, dry_run=True, now=now)
    assert sorted(dry.removed) == sorted([old.name, half_done.name]) and dry.freed_bytes > 2000
    assert old.exists() and half_done.exists(), "a dry run removes nothing"
    # A build of the old stage running now holds its lock: it is left alone.
    with build_lock(root / (old.name + ".lock")):
        assert cache.prune(root, 7, now=now).removed == [half_done.name]
    assert old.exists() and not half_done.exists()
    assert cache.prune(root, 7, now=now).removed == [old.name]
    assert not old.exists() and recent.exists() and other.exists()


def test_a_stage_taken_from_the_cache_counts_as_used(tmp_path: Path) -> None:
    c = cache.Cache(tmp_path / "cache", log=lambda _line: None)
    builds = []

    def build(d: Path) -> None:
        builds.append(d)
        (d / "f").write_text("x")

    out = c.stage("thing", {"v": 1}, build)
    week_ago = time.time() - 8 * 86400
    os.utime(out / "inputs.json", (week_ago, week_ago))
    assert c.stage("thing", {"v": 1}, build) == out and len(builds) == 1  # taken from the cache
    assert cache.prune(tmp_path / "cache", 7).removed == []
    assert (out / "f").read_text() == "x"
