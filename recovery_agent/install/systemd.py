"""systemd's part of an install: the health verdict, by systemd's boot assessment convention.

systemd's automatic boot assessment (https://systemd.io/AUTOMATIC_BOOT_ASSESSMENT/): units
that check a boot are ordered before ``boot-complete.target`` and required by it; the unit that
marks the boot good is ordered after it and requires it, so it runs only if every check passed.
greenboot (Fedora IoT's health checks) works the same way. The install adds three units to
``/etc/systemd/system`` and links them as ``systemctl enable`` would:

1. ``qmr-health-check.service`` (before ``boot-complete.target``, after ``multi-user.target``,
   so the services the checks look at had their start): ``recovery-agent health-check`` runs
   the check scripts (``required.d``, ``wanted.d``: ours and greenboot's, see
   :mod:`~.checks`). A failed required check fails the unit; ``FailureAction=reboot`` then
   reboots the machine without resetting the count: the boot counts as failed, as in
   greenboot. Before that, the check saved the boot's kernel log as text on the OS disk (the
   evidence of a boot that failed without a crash record).
2. ``qmr-mark-good.service`` (after ``boot-complete.target``, requires it):
   ``recovery-agent mark-good`` sets ``boot_count`` and ``recovery_attempts`` to 0 in grubenv.
   This is the "boot is good" moment.
3. ``qmr-health-report.service`` (after the mark and the network, only with the agent's
   settings): ``recovery-agent health`` tells the recovery server the boot was good, which is
   how the server learns that a fix worked.

All three have ``DefaultDependencies=no`` (with the shutdown ordering added back): a target
orders itself after every unit it wants unless that unit says so, and ``multi-user.target``
after a unit that runs after ``multi-user.target`` is an ordering cycle, which systemd breaks by
dropping the unit (measured on Debian 12: the mark and the report never ran).

Their output goes to the journal and the console (the lab reads the console markers
``QMR-HEALTHY``, ``QMR-UNHEALTHY``, ``QMR-HEALTH-REPORTED``).
"""

from __future__ import annotations

from .paths import LAUNCHER, SETTINGS, UNIT_DIR, UNIT_HEALTH_CHECK, UNIT_HEALTH_REPORT, UNIT_MARK_GOOD

AGENT = "/" + LAUNCHER

HEALTH_CHECK = f"""\
# Quick Machine Recovery (written by `recovery-agent install`, removed by uninstall).
[Unit]
Description=Quick Machine Recovery: boot health checks (required.d, wanted.d)
Documentation=https://systemd.io/AUTOMATIC_BOOT_ASSESSMENT/
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
After=basic.target multi-user.target
Before=boot-complete.target
# A failed required check: reboot without marking the boot good, so GRUB counts it.
FailureAction=reboot

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={AGENT} health-check
TimeoutStartSec=15min
StandardOutput=journal+console
StandardError=journal+console

[Install]
RequiredBy=boot-complete.target
WantedBy=multi-user.target
"""

MARK_GOOD = f"""\
# Quick Machine Recovery (written by `recovery-agent install`, removed by uninstall).
[Unit]
Description=Quick Machine Recovery: the boot is good, reset GRUB's boot count
Documentation=https://systemd.io/AUTOMATIC_BOOT_ASSESSMENT/
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
Requires=boot-complete.target
After=basic.target boot-complete.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={AGENT} mark-good
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

HEALTH_REPORT = f"""\
# Quick Machine Recovery (written by `recovery-agent install`, removed by uninstall).
[Unit]
Description=Quick Machine Recovery: report the good boot to the recovery server
Requires={UNIT_MARK_GOOD}
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
After=basic.target {UNIT_MARK_GOOD} network-online.target
Wants=network-online.target
ConditionPathExists=/{SETTINGS}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={AGENT} health --kernel %v
ExecStartPost=/bin/echo QMR-HEALTH-REPORTED
ExecStopPost=/bin/sh -c 'test "$SERVICE_RESULT" = success || echo "QMR-HEALTH-REPORT-FAILED $EXIT_STATUS"'
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

# unit name -> (text, the targets whose .wants/.requires link it)
UNITS: dict[str, tuple[str, tuple[str, ...]]] = {
    UNIT_HEALTH_CHECK: (HEALTH_CHECK, ("boot-complete.target.requires", "multi-user.target.wants")),
    UNIT_MARK_GOOD: (MARK_GOOD, ("multi-user.target.wants",)),
    UNIT_HEALTH_REPORT: (HEALTH_REPORT, ("multi-user.target.wants",)),
}


def unit_path(name: str) -> str:
    return f"{UNIT_DIR}/{name}"


def enable_links(name: str) -> list[tuple[str, str]]:
    """(link path, target) pairs ``systemctl enable NAME`` would make for our unit."""
    return [(f"{UNIT_DIR}/{where}/{name}", f"/{unit_path(name)}") for where in UNITS[name][1]]
