"""``recovery-lab``'s exit codes (recovery_lab.cli): 0 done, 1 a run missed its expectations,
2 the run could not be made; listed in --help. No QEMU, no image build."""

from __future__ import annotations

import pytest

from recovery_lab import cli
from recovery_lab.dirdemo import DemoError
from recovery_lab.tools import ToolMissing


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes:" in out and "\n  1  " in out and "\n  2  " in out
    cli_help = cli.EXIT_CODES
    assert "missed its expectations" in cli_help and "could not be made" in cli_help


@pytest.mark.parametrize("argv", [["build", "nope"], ["boot", "nope"], ["run", "nope"]])
def test_an_unknown_scenario_is_bad_input(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "no scenario 'nope': use one of" in capsys.readouterr().err


def test_a_missing_image_is_bad_input(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["boot", "healthy", "--image", str(tmp_path / "none.img")]) == 2
    assert "build it with recovery-lab build" in capsys.readouterr().err


def test_a_missing_tool_is_bad_input(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise ToolMissing("mkfs.fat not found: install dosfstools (apt-get install dosfstools)")

    monkeypatch.setattr(cli, "build_images", missing)
    assert cli.main(["build"]) == 2
    assert "apt-get install dosfstools" in capsys.readouterr().err


def test_a_failed_demo_missed_its_expectations(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def failed(*args: object, **kwargs: object) -> None:
        raise DemoError("the demo ended in the wrong state: boot_count reset to 0")

    monkeypatch.setattr(cli, "run_demo", failed)
    assert cli.main(["demo"]) == 1
    assert "wrong state" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["build", "run"])
@pytest.mark.parametrize("option", [["--firmware", "uefi"], ["--no-panic-on-oops"]])
def test_debian_options_on_the_lab_base_are_refused(command: str, option: list[str], capsys) -> None:
    assert cli.main([command, "channel-file", *option]) == 2
    assert f"use --base debian for {' '.join(option)}" in capsys.readouterr().err


def test_a_uefi_machine_boots_ovmf_with_its_own_variable_store(tmp_path) -> None:
    from recovery_lab.qemu.machine import (
        EFI_VARS,
        OVMF_CODE,
        OVMF_VARS,
        MachineConfig,
        machine_args,
        prepare_disks,
    )

    if not OVMF_VARS.is_file():
        pytest.skip("no OVMF here: scripts/setup.sh --lab installs ovmf")
    cfg = MachineConfig(kernel=OVMF_CODE, firmware="uefi")
    cfg.validate()
    disks = prepare_disks(cfg, tmp_path)
    assert disks.efi_vars == tmp_path / EFI_VARS
    assert disks.efi_vars.read_bytes() == OVMF_VARS.read_bytes()
    disks.efi_vars.write_bytes(b"variables the guest wrote")
    assert prepare_disks(cfg, tmp_path).efi_vars.read_bytes() == b"variables the guest wrote"  # kept
    args = machine_args(cfg, None, [], disks.efi_vars)
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}" in args
    assert f"if=pflash,format=raw,unit=1,file={disks.efi_vars}" in args
    assert not any("pflash" in a for a in machine_args(MachineConfig(kernel=OVMF_CODE), None, []))


def test_an_unknown_firmware_is_refused() -> None:
    from recovery_lab.qemu.machine import FORWARDER, MachineConfig, MachineConfigError

    with pytest.raises(MachineConfigError, match="use one of bios, uefi"):
        MachineConfig(kernel=FORWARDER, firmware="coreboot").validate()
