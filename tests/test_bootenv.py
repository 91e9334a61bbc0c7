"""BootEnv: GRUB's 1024-byte environment block, rewritten in place."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from recovery_agent.bootenv import ENVBLK_SIGNATURE, ENVBLK_SIZE, BootEnv, BootEnvError


@pytest.fixture
def grubenv(tmp_path: Path) -> Path:
    path = tmp_path / "grubenv"
    BootEnv.new({"boot_count": 0, "boot_limit": 2}).create(path)
    return path


def test_round_trip(grubenv: Path) -> None:
    env = BootEnv.read(grubenv)
    assert dict(env) == {"boot_count": "0", "boot_limit": "2"}
    env.set("boot_count", 1)
    env.set("recovery_attempts", "3")
    env.unset("boot_limit")
    env.write(grubenv)

    again = BootEnv.read(grubenv)
    assert dict(again) == {"boot_count": "1", "recovery_attempts": "3"}
    assert list(again) == ["boot_count", "recovery_attempts"]
    assert again.boot_count == 1
    assert again.boot_limit == 2  # default when unset
    assert again.recovery_attempts == 3


def test_layout_is_grubs(grubenv: Path) -> None:
    data = grubenv.read_bytes()
    assert len(data) == ENVBLK_SIZE
    assert data.startswith(ENVBLK_SIGNATURE + b"boot_count=0\nboot_limit=2\n###")
    assert data.endswith(b"#")


def test_escaping(grubenv: Path) -> None:
    env = BootEnv.read(grubenv)
    env.set("a", "back\\slash")
    env.set("b", "line1\nline2")
    env.set("c", "ends with\\")
    env.write(grubenv)
    data = grubenv.read_bytes()
    assert b"a=back\\\\slash\n" in data
    assert b"b=line1\\\nline2\n" in data
    assert b"c=ends with\\\\\n" in data
    again = BootEnv.read(grubenv)
    assert again["a"] == "back\\slash"
    assert again["b"] == "line1\nline2"
    assert again["c"] == "ends with\\"


def test_size_and_inode_stay_after_every_write(grubenv: Path) -> None:
    inode = grubenv.stat().st_ino
    env = BootEnv.read(grubenv)
    for i in range(5):
        env.set("boot_count", i)
        env.set("filler", "x" * (i * 50))
        env.write(grubenv)
        st = grubenv.stat()
        assert st.st_size == ENVBLK_SIZE
        assert st.st_ino == inode
    env.unset("filler")
    env.reset_boot_count(grubenv)
    assert grubenv.stat().st_size == ENVBLK_SIZE
    assert grubenv.stat().st_ino == inode
    assert BootEnv.read(grubenv).boot_count == 0


def test_too_long_rejected_file_unchanged(grubenv: Path) -> None:
    before = grubenv.read_bytes()
    env = BootEnv.read(grubenv)
    env.set("big", "y" * 1000)
    with pytest.raises(BootEnvError, match=r"bytes over"):
        env.write(grubenv)
    assert grubenv.read_bytes() == before


def test_content_filling_the_block_exactly_fits(tmp_path: Path) -> None:
    env = BootEnv.new()
    room = ENVBLK_SIZE - len(ENVBLK_SIGNATURE) - len("k=\n")
    env.set("k", "z" * room)
    assert env.to_bytes().endswith(b"z\n")
    env.set("k", "z" * (room + 1))
    with pytest.raises(BootEnvError, match=r"1 bytes over"):
        env.to_bytes()


def test_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(ENVBLK_SIGNATURE + b"#" * (1000 - len(ENVBLK_SIGNATURE)))
    with pytest.raises(BootEnvError) as err:
        BootEnv.read(path)
    assert str(err.value) == (
        f"grubenv at {path} is 1000 bytes, expected 1024: rebuild the image with recovery-lab build"
    )


def test_write_refuses_wrong_size_and_does_not_touch_it(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(b"#" * 2048)
    with pytest.raises(BootEnvError, match="2048 bytes, expected 1024"):
        BootEnv.new({"boot_count": 0}).write(path)
    assert path.read_bytes() == b"#" * 2048


def test_write_never_creates(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    with pytest.raises(BootEnvError, match="does not exist"):
        BootEnv.new().write(path)
    assert not path.exists()


def test_create_refuses_existing(grubenv: Path) -> None:
    with pytest.raises(BootEnvError, match="already exists"):
        BootEnv.new().create(grubenv)


def test_missing_header(tmp_path: Path) -> None:
    path = tmp_path / "grubenv"
    path.write_bytes(b"boot_count=1\n" + b"#" * (ENVBLK_SIZE - 13))
    with pytest.raises(BootEnvError, match="does not start with"):
        BootEnv.read(path)


def test_malformed_line(tmp_path: Path) -> None:
    body = ENVBLK_SIGNATURE + b"boot_count=1\nnot a variable\n"
    path = tmp_path / "grubenv"
    path.write_bytes(body + b"#" * (ENVBLK_SIZE - len(body)))
    with pytest.raises(BootEnvError, match="malformed line b'not a variable'"):
        BootEnv.read(path)


def test_damaged_padding(tmp_path: Path) -> None:
    body = ENVBLK_SIGNATURE + b"boot_count=1\ngarbage"
    path = tmp_path / "grubenv"
    path.write_bytes(body + b"#" * (ENVBLK_SIZE - len(body)))
    with pytest.raises(BootEnvError, match="no newline before"):
        BootEnv.read(path)


def test_boot_count_not_a_number() -> None:
    assert BootEnv.new().boot_count == 0
    assert BootEnv.new({"boot_count": "x1"}).boot_count == 0
    assert BootEnv.new({"boot_count": "-1"}).boot_count == 0
    assert BootEnv.new({"boot_count": "2"}).boot_count == 2
    assert BootEnv.new({"boot_limit": "0"}).boot_limit == 2
    assert BootEnv.new({"boot_limit": "3"}).boot_limit == 3


def test_bad_name_rejected() -> None:
    with pytest.raises(BootEnvError, match="not usable from grub.cfg"):
        BootEnv.new().set("a=b", "1")


def test_comments_are_kept(tmp_path: Path) -> None:
    body = ENVBLK_SIGNATURE + b"# WARNING: keep me\nboot_count=1\n"
    path = tmp_path / "grubenv"
    path.write_bytes(body + b"#" * (ENVBLK_SIZE - len(body)))
    env = BootEnv.read(path)
    assert dict(env) == {"boot_count": "1"}
    env.set("boot_count", 2)
    env.write(path)
    assert path.read_bytes().startswith(ENVBLK_SIGNATURE + b"# WARNING: keep me\nboot_count=2\n")


GRUB_EDITENV = shutil.which("grub-editenv")


@pytest.mark.skipif(GRUB_EDITENV is None, reason="grub-editenv not installed (apt-get install grub-common)")
def test_compatible_with_grub_editenv(tmp_path: Path) -> None:
    assert GRUB_EDITENV is not None
    path = tmp_path / "grubenv"

    def editenv(*args: str) -> str:
        return subprocess.run(
            [GRUB_EDITENV, str(path), *args], check=True, capture_output=True, text=True
        ).stdout

    editenv("create")
    editenv("set", "boot_count=1", "a=x y", "b=back\\slash", "c=two\nlines")
    env = BootEnv.read(path)
    assert dict(env) == {"boot_count": "1", "a": "x y", "b": "back\\slash", "c": "two\nlines"}

    inode = path.stat().st_ino
    env.set("boot_count", 2)
    env.set("recovery_attempts", 1)
    env.set("d", "more\\\nstuff")
    env.unset("a")
    env.write(path)
    assert path.stat().st_ino == inode
    assert path.stat().st_size == ENVBLK_SIZE

    listed = editenv("list")
    assert listed == ("boot_count=2\nb=back\\slash\nc=two\nlines\nrecovery_attempts=1\nd=more\\\nstuff\n")
    # And GRUB's writer still accepts our block.
    editenv("set", "boot_ok=1")
    assert BootEnv.read(path)["boot_ok"] == "1"
    assert os.path.getsize(path) == ENVBLK_SIZE
