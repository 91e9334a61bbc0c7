"""Test mode: send a healthy machine to its recovery environment on purpose, and prove that
the whole loop works there before it is needed (after Windows' ``reagentc
/SetRecoveryTestmode`` and ``/BootToRe``).

Arming writes two things into grubenv: ``recovery_test`` (who armed it: ``local`` for
``recovery-agent test-mode``, ``server`` when an admin asked for it and the device learned so
in the answer to its health report) and ``boot_count`` at ``boot_limit``, so GRUB's next
choice is the recovery environment, with no change to GRUB's configuration.

There the agent sees ``recovery_test`` and runs a test visit (``agent.RecoveryAgent``): it
does not count the visit as a recovery attempt, reports diagnostics with ``test_mode`` set
(crash kind ``none``), and takes only a recovery test directive (the server's, bound to those
diagnostics like any directive): its one action writes a record of the test into the agent's
own state folder and changes nothing else on the OS (``actions``), so it needs no approver.
Journaled and reported like a fix, then the visit disarms the test, resets ``boot_count`` and
reboots into the OS; the OS's next health report names the test directive, and that is what
the server records as the recovery path's last pass.
"""

from __future__ import annotations

from pathlib import Path

from .bootenv import BOOT_COUNT, RECOVERY_TEST, BootEnv

LOCAL = "local"
SERVER = "server"


def armed(grubenv: Path) -> str | None:
    """Who armed a test visit (``local`` or ``server``), or None. Raises what reading grubenv
    raises (``BootEnvError``, ``OSError``)."""
    env = BootEnv.read(grubenv)
    return env[RECOVERY_TEST] if RECOVERY_TEST in env else None


def arm(grubenv: Path, by: str) -> None:
    """Make the next boot a recovery test visit."""
    env = BootEnv.read(grubenv)
    env.set(RECOVERY_TEST, by)
    env.set(BOOT_COUNT, str(env.boot_limit))
    env.write(grubenv)


def disarm(grubenv: Path) -> bool:
    """Cancel an armed test (the next boot is the OS's again). False if none was armed."""
    env = BootEnv.read(grubenv)
    if RECOVERY_TEST not in env:
        return False
    env.unset(RECOVERY_TEST)
    env.set(BOOT_COUNT, "0")
    env.write(grubenv)
    return True
