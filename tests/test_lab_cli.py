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
