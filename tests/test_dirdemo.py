"""The no-VM demo's machine directory (recovery_lab.dirdemo): laid out like a broken machine's
disks, with a real crash record from the product's own evidence, not from the tests' data."""

from __future__ import annotations

from pathlib import Path

from recovery_agent.bootenv import BootEnv
from recovery_agent.layout import CHANNEL_DIR
from recovery_lab.dirdemo import BAD, GOOD, REAL_PANIC_LOG, make_machine_dir

CAPTURE = Path(__file__).parent / "data/panic/channel-file-pstore.txt"


def test_evidence_is_the_real_capture() -> None:
    assert REAL_PANIC_LOG.read_bytes() == CAPTURE.read_bytes(), (
        "images/evidence/channel-file-pstore.txt differs from the capture in tests/data/panic: "
        "copy the capture again (images/evidence/README.md)"
    )
    assert "tests" not in REAL_PANIC_LOG.parts, "the demo must not read the tests' data"


def test_machine_dir_is_laid_out_like_the_broken_machine(tmp_path: Path) -> None:
    m = make_machine_dir(tmp_path / "machine")
    assert BootEnv.read(m / "esp/grub/grubenv").get("boot_count") == "2"
    assert sorted(p.name for p in (m / "os" / CHANNEL_DIR).iterdir()) == sorted([*GOOD, BAD])
    assert (m / "pstore/dmesg-ramoops-0").read_bytes() == REAL_PANIC_LOG.read_bytes()
