"""The agent's settings on an installed machine: one fleet's settings, two views of the disk.

A fleet admin gives the install the fleet's settings (``--settings FILE``, the fields of
``recovery_agent.settings.AgentSettings`` that say which server, which keys and which QMR
timing: ``device_id``, ``server_url``, ``server_public_key``, ``cloud_remediation``, ...).
Where the disks are differs by where the agent runs, so the install writes two files from them:

- ``/etc/recovery/agent.json``, the running OS's view: the OS root is ``/``, grubenv is
  ``/boot/grub/grubenv``, the device key ``/etc/recovery/device.key``; ``recovery-agent
  health``, ``enroll``, ``inspect`` and ``quarantine`` use it (their default ``--config``);
- ``/etc/recovery/recovery.json``, the recovery environment's view, built into its initramfs:
  the OS root mounted at ``/mnt/os`` (its /boot at ``/mnt/os/boot``), the device key read from
  the OS disk (it never leaves it: the initramfs on /boot is world-readable), and the kernel
  log a failed health check saved (``boot_log``).

The path fields of the given file are ignored (and named): the install decides them. The
settings are checked by the agent itself once its runtime is in place (``AgentSettings``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .paths import DEVICE_KEY, FAILED_BOOT_LOG, GRUBENV, RECOVERY_OS_ROOT
from .target import InstallRefused

# Fields of AgentSettings that name places on a disk: the install sets them per view.
PATH_FIELDS = ("os_root", "grubenv", "pstore_dir", "boot_log", "boot_progress", "device_key")
REQUIRED_FIELDS = ("device_id", "server_url", "server_public_key")


def load_fleet_settings(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The fleet settings in ``path`` without their path fields, and the names of the path
    fields that were dropped."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InstallRefused(
            f"no settings file {path}: give the fleet's agent settings with --settings"
        ) from None
    except (OSError, ValueError) as exc:
        raise InstallRefused(f"settings file {path} is not JSON ({exc}): fix it and install again") from None
    if not isinstance(data, dict):
        raise InstallRefused(f"settings file {path} must hold a JSON object")
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise InstallRefused(
            f"settings file {path} lacks {', '.join(missing)}: the server's URL and public key and this "
            f"device's id are needed (docs/recovery-loop.md)"
        )
    dropped = [f for f in PATH_FIELDS if f in data]
    return {k: v for k, v in data.items() if k not in PATH_FIELDS}, dropped


def os_view(fleet: dict[str, Any], boot_limit: int) -> dict[str, Any]:
    """The running OS's settings (``/etc/recovery/agent.json``)."""
    return {
        **fleet,
        "boot_limit": boot_limit,
        "os_root": "/",
        "grubenv": f"/{GRUBENV}",
        "pstore_dir": "/sys/fs/pstore",
        "device_key": f"/{DEVICE_KEY}",
    }


def recovery_view(fleet: dict[str, Any], boot_limit: int, device_key: str = DEVICE_KEY) -> dict[str, Any]:
    """The recovery environment's settings (its ``/etc/recovery/agent.json``); ``device_key``
    relative to the OS root (elsewhere than in /etc when the root is encrypted)."""
    root = RECOVERY_OS_ROOT
    return {
        **fleet,
        "boot_limit": boot_limit,
        "os_root": root,
        "grubenv": f"{root}/{GRUBENV}",
        "pstore_dir": "/sys/fs/pstore",
        "boot_log": f"{root}/{FAILED_BOOT_LOG}",
        "device_key": f"{root}/{device_key}",
    }


def dump(settings: dict[str, Any]) -> str:
    return json.dumps(settings, indent=1, sort_keys=True) + "\n"
