"""The agent's settings: one JSON file on the recovery partition (or the lab's seed disk).

Quick Machine Recovery's own settings keep their meaning: cloud remediation on/off, auto
remediation on/off, the retry interval (minutes, 1 to 4320, default 30) and the time to reboot
(minutes, default 180). A lab may set ``seconds_per_minute`` below 60 to run the same schedule
faster; nothing else changes.

Relative paths are taken relative to the settings file's folder, so a settings file and the
keys beside it can be moved together.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import AgentError
from .holds import HoldStep
from .protocol.keys import public_from_b64
from .protocol.wire import DeviceId


class SettingsError(AgentError):
    """Raised when the settings file is missing or does not validate."""


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: DeviceId
    server_url: str = Field(pattern=r"^https?://")
    server_public_key: str = Field(description="the server's Ed25519 key, base64 (server.key.pub)")
    device_key: Path = Path("device.key")

    os_root: Path = Path("/mnt/os")
    grubenv: Path = Path("/mnt/esp/grub/grubenv")
    pstore_dir: Path | None = Path("/sys/fs/pstore")
    boot_log: Path | None = None
    # The OS's boot step log (images/os/lib.sh qmr_progress): where a boot without a crash
    # record stopped.
    boot_progress: Path | None = None

    # People whose own signatures a fix needs (M of N), besides the server's: their public
    # keys (base64, as `recovery-admin key create` prints them) and how many must have signed.
    approver_keys: list[str] = Field(default=[], max_length=64)
    approver_threshold: int = Field(default=0, ge=0, le=64)

    cloud_remediation: bool = True
    auto_remediation: bool = True
    retry_interval_min: int = Field(default=30, ge=1, le=4320)
    time_to_reboot_min: int = Field(default=180, ge=1, le=4320)
    seconds_per_minute: float = Field(default=60.0, gt=0, le=60)
    max_recovery_attempts: int = Field(default=3, ge=1, le=100)
    # A waiting poll costs the server nothing until its wait ends, so wait long: renewals are
    # what a fleet of waiting devices costs (a server older than 300 s clamps to its own limit).
    long_poll_s: float = Field(default=300.0, gt=0, le=300)
    boot_limit: int = Field(default=2, ge=1, le=9)
    # Lab only: stop at this step of an apply until the lab cuts the power (holds.py).
    lab_hold_at: HoldStep | None = None

    @property
    def retry_interval_s(self) -> float:
        return self.retry_interval_min * self.seconds_per_minute

    @property
    def time_to_reboot_s(self) -> float:
        return self.time_to_reboot_min * self.seconds_per_minute

    @classmethod
    def load(cls, path: Path | str) -> AgentSettings:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise SettingsError(
                f"no agent settings at {path}: write one (see docs/recovery-loop.md) or pass --config"
            ) from None
        try:
            settings = cls.model_validate_json(text)
        except ValidationError as exc:
            raise SettingsError(f"agent settings {path} are not valid: {exc}") from None
        try:
            public_from_b64(settings.server_public_key)
            for k in settings.approver_keys:
                public_from_b64(k)
        except ValueError as exc:
            raise SettingsError(f"a public key in {path}: {exc}") from None
        if settings.approver_threshold > len(settings.approver_keys):
            raise SettingsError(
                f"{path}: approver_threshold {settings.approver_threshold} is more than "
                f"the {len(settings.approver_keys)} approver_keys given"
            )
        base = path.resolve().parent

        def rel(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else base / p)

        return settings.model_copy(
            update={
                "device_key": rel(settings.device_key),
                "os_root": rel(settings.os_root),
                "grubenv": rel(settings.grubenv),
                "pstore_dir": rel(settings.pstore_dir),
                "boot_log": rel(settings.boot_log),
                "boot_progress": rel(settings.boot_progress),
            }
        )
