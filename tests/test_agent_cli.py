"""``recovery-agent``'s command line: exit codes, one-line errors, the quarantine commands."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from recovery_agent.cli import main
from recovery_agent.layout import CONFIRMED_DIRECTIVE, QUARANTINE_DIR
from recovery_agent.protocol.keys import SigningKey, public_b64
from recovery_agent.remediate import apply_directive
from recovery_lab.dirdemo import make_machine_dir

from .test_remediate import BAD_CHANNEL, QUARANTINE_BAD, build_root, directive, journal


def settings_file(tmp_path: Path, **overrides: object) -> Path:
    """agent.json beside a device key, for an OS root at tmp_path/os."""
    config = tmp_path / "recovery/agent.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "device_id": "dev-0001",
        "server_url": "http://127.0.0.1:9",
        "server_public_key": public_b64(SigningKey.generate().public),
        "device_key": "device.key",
        "os_root": "../os",
        "grubenv": "../esp/grub/grubenv",
        "pstore_dir": None,
    }
    settings.update(overrides)
    config.write_text(json.dumps(settings))
    return config


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- exit codes


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for line in ("0  REMEDIATED", "1  ERROR", "10  NO_REMEDIATION", "11  CLOUD_DISABLED"):
        assert line in out
    for line in ("12  NEEDS_MANUAL", "13  REMEDIATION_FAILED", "2  refused or invalid input"):
        assert line in out
    assert "3  the server could not be reached" in out
    assert "quarantine purge DIRECTIVE_ID" in out


@pytest.mark.parametrize("command, code", [(["run"], 1), (["enroll", "--token", "enr_x"], 2)])
def test_a_corrupt_device_key_is_one_line_naming_the_file_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], code: int
) -> None:
    config = settings_file(tmp_path)
    key = tmp_path / "recovery/device.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    assert main(["--config", str(config), *command]) == code
    line = one_line_error(capsys)
    assert str(key) in line and f"recovery-agent keygen {key} --force" in line


@pytest.mark.parametrize(
    "command, code", [(["run"], 1), (["undo", "dir-0001"], 2), (["quarantine", "list"], 2)]
)
def test_missing_settings_are_invalid_input_except_for_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], code: int
) -> None:
    """`run` keeps its outcomes: the recovery environment's init reboots on 1."""
    assert main(["--config", str(tmp_path / "nowhere.json"), *command]) == code
    assert "no agent settings at" in one_line_error(capsys)


async def test_an_enrollment_the_server_refuses_exits_2(
    fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = settings_file(tmp_path, server_url=fleet.url, server_public_key=public_b64(fleet.key.public))
    code = await asyncio.to_thread(main, ["--config", str(config), "enroll", "--token", "enr_" + "x" * 20])
    assert code == 2
    assert "server refused" in one_line_error(capsys)


def test_a_malformed_enrollment_token_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(settings_file(tmp_path)), "enroll", "--token", "short"]) == 2
    assert "--token is not an enrollment token" in one_line_error(capsys)


# --------------------------------------------------------------------------- quarantine


@pytest.fixture
def applied(tmp_path: Path) -> Path:
    """An OS root where dir-0001 quarantined the bad channel file; returns agent.json."""
    root = build_root(tmp_path / "os")
    apply_directive(root, directive(QUARANTINE_BAD, directive_id="dir-0001"))
    return settings_file(tmp_path)


def test_quarantine_list(tmp_path: Path, applied: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(applied), "quarantine", "list"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("dir-0001  applied")
    assert "quarantined" in line and BAD_CHANNEL in line and "held as 0-C-00000291" in line


def test_quarantine_list_when_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_root(tmp_path / "os")
    assert main(["--config", str(settings_file(tmp_path)), "quarantine", "list"]) == 0
    assert "no quarantined files" in capsys.readouterr().out


def test_purge_refuses_an_unconfirmed_directive(
    tmp_path: Path, applied: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(applied), "quarantine", "purge", "dir-0001"]) == 2
    line = one_line_error(capsys)
    assert "not confirmed by a healthy boot" in line and "--force" in line
    assert (tmp_path / "os" / QUARANTINE_DIR / "dir-0001").is_dir()


def test_purge_after_a_healthy_boot_confirmed_the_directive(
    tmp_path: Path, applied: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "os" / CONFIRMED_DIRECTIVE).write_text("dir-0001\n")
    assert main(["--config", str(applied), "quarantine", "list"]) == 0
    assert "confirmed by a healthy boot" in capsys.readouterr().out
    assert main(["--config", str(applied), "quarantine", "purge", "dir-0001"]) == 0
    assert "purged the quarantine of directive dir-0001" in capsys.readouterr().out
    assert not (tmp_path / "os" / QUARANTINE_DIR / "dir-0001").exists()
    assert journal(tmp_path / "os")["state"] == "purged"
    assert main(["--config", str(applied), "quarantine", "list"]) == 0
    assert "no quarantined files" in capsys.readouterr().out


def test_purge_with_force(tmp_path: Path, applied: Path) -> None:
    assert main(["--config", str(applied), "quarantine", "purge", "dir-0001", "--force"]) == 0
    assert not (tmp_path / "os" / QUARANTINE_DIR / "dir-0001").exists()


@pytest.mark.parametrize(
    "directive_id, message", [("dir-9999", "nothing to purge"), ("../etc", "not a valid")]
)
def test_purge_of_an_unknown_directive_is_refused(
    applied: Path, capsys: pytest.CaptureFixture[str], directive_id: str, message: str
) -> None:
    assert main(["--config", str(applied), "quarantine", "purge", directive_id, "--force"]) == 2
    assert message in one_line_error(capsys)


def test_undo_from_the_command_line(
    tmp_path: Path, applied: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(applied), "undo", "dir-0001"]) == 0
    assert "moved" in capsys.readouterr().out
    assert (tmp_path / "os" / BAD_CHANNEL).exists()


def test_inspect_prints_the_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    machine = make_machine_dir(tmp_path)
    config = settings_file(machine, pstore_dir="../pstore")
    SigningKey.generate().save(machine / "recovery/device.key")
    assert main(["--config", str(config), "inspect"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert findings["device_id"] == "dev-0001"
    assert findings["crash"]["title"] == "general protection fault in sensor_parse_channel"
    assert any(f["path"].endswith(".sys") for f in findings["channel_files"])
