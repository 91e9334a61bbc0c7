"""``recovery-agent install`` and ``uninstall``: Quick Machine Recovery on a Debian machine.

The install sets a machine up the way Debian expects, each part in its module:

1. **check** the machine (:mod:`~.target`): Debian, ``python3`` with asyncio, ``busybox``,
   ``initramfs-tools``, GRUB with ``update-grub``, a kernel; BIOS or UEFI. Nothing changes
   before this passes.
2. **runtime** (:mod:`~.runtime`): the agent's virtual environment on Debian's python3 from the
   wheels the install carries, and the launcher ``/usr/local/sbin/recovery-agent``.
3. **settings** (:mod:`~.settings`): ``/etc/recovery/agent.json`` and ``recovery.json`` from the
   fleet's settings; the install's own choices in ``install.json``; the device key made on
   the device (``recovery-agent keygen``, 0600) unless there is one.
4. **crash records**: the pstore backend loaded early (``/etc/modules-load.d``: ``efi_pstore``
   on UEFI, ``ramoops`` on BIOS, whose memory region the kernel arguments reserve).
   ``systemd-pstore`` keeps moving records to ``/var/lib/systemd/pstore``, as on any Debian.
5. **health verdict** (:mod:`~.systemd`, :mod:`~.checks`): the check directories and three
   units around ``boot-complete.target``.
6. **kernel hooks**: ``/etc/kernel/postinst.d`` and ``postrm.d`` rebuild the recovery
   environment when a kernel comes or goes.
7. **GRUB** (:mod:`~.grub`): the ``/etc/grub.d`` drop-in (boot counting, the recovery entry),
   the kernel arguments in ``/etc/default/grub.d``, ``boot_count``/``boot_limit`` in grubenv.
8. **recovery environment** (:mod:`~.recoveryenv`): built from the newest kernel with
   ``mkinitramfs`` into ``/boot/qmr``.
9. ``update-grub`` on a running system (under ``--root`` it needs the machine's block devices,
   which a directory tree does not have: the install says so and leaves it to the first boot
   of the machine, or to ``--update-grub`` when the tree is a mounted disk with its devices).

Every change goes through :class:`~.manifest.Recorder` first, so ``uninstall``
(:func:`uninstall`) puts back each file as it was, removes what the install added, runs
``update-grub`` again, and says what it keeps: the device key (unless asked) and the agent's
state in ``/var/lib/recovery`` (quarantined files, journals).

This package uses the standard library only (and ``recovery_agent.bootenv``): it runs from an
install bundle with Debian's python3 before the agent's own runtime exists
(``python3 -m recovery_agent.install``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..protocol.version import __version__
from . import grub, recoveryenv, runtime, settings, systemd
from .manifest import Manifest, Recorder, UndoReport, undo, write_atomic
from .paths import (
    CHECK_DIR,
    CHECK_KINDS,
    DEVICE_KEY,
    DEVICE_KEY_PUB,
    GRUB_CFG,
    GRUB_DEFAULTS,
    GRUB_DROPIN,
    GRUBENV,
    INSTALL_CONFIG,
    KERNEL_POSTINST,
    KERNEL_POSTRM,
    LAUNCHER,
    MODULES_LOAD,
    RECOVERY_DEVICE_KEY,
    RECOVERY_DIR,
    RECOVERY_SETTINGS,
    SETTINGS,
    VENV,
)
from .target import InstallError, InstallRefused, LuksRoot, Runner, Target

__all__ = [
    "InstallError",
    "InstallOptions",
    "InstallRefused",
    "install",
    "rebuild_recovery_env",
    "uninstall",
]

Say = Callable[[str], None]
UPDATE_GRUB = "update-grub"


@dataclass
class InstallOptions:
    """What ``recovery-agent install`` was asked (its command-line options)."""

    root: Path = Path("/")
    wheels: Path | None = None
    settings: Path | None = None  # the fleet's agent settings (JSON)
    firmware: str = "auto"
    boot_limit: int | None = None  # default: the settings', else 2
    panic_s: int = 10
    panic_on_oops: bool = False
    recovery_modules: str = "most"
    extra_modules: tuple[str, ...] = ()
    update_grub: bool | None = None  # default: on a running system only
    # A root on LUKS2: a key that opens it now, and the server's signed escrow key.
    luks_unlock_key_file: Path | None = None
    escrow_key: Path | None = None
    tpm_sealed: bool = False
    runner: Runner | None = None  # tests: run the machine's tools differently


@dataclass
class InstallConfig:
    """The install's own choices, in /etc/recovery/install.json: what a rebuild of the
    recovery environment (a kernel hook) needs to know."""

    version: str
    firmware: str
    boot_limit: int
    panic_s: int
    panic_on_oops: bool
    kernel_args: str
    python: str
    root_uuid: str
    boot_uuid: str | None
    recovery_modules: str
    extra_modules: list[str] = field(default_factory=list)
    root_luks_uuid: str | None = None  # the root filesystem is on this LUKS2 volume

    def recovery_env(self) -> recoveryenv.RecoveryEnvConfig:
        return recoveryenv.RecoveryEnvConfig(
            firmware=self.firmware,
            root_uuid=self.root_uuid,
            root_luks_uuid=self.root_luks_uuid,
            boot_uuid=self.boot_uuid,
            python=self.python,
            modules=self.recovery_modules,
            extra_modules=tuple(self.extra_modules),
        )

    @classmethod
    def load(cls, target: Target) -> InstallConfig:
        path = target.path(INSTALL_CONFIG)
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise InstallRefused(f"nothing installed here: no {path} (run recovery-agent install)") from None
        except (OSError, ValueError, TypeError) as exc:
            raise InstallError(f"{path} cannot be read ({exc}): run recovery-agent install again") from None


def _fleet_settings(target: Target, opts: InstallOptions, say: Say) -> dict[str, object]:
    source = opts.settings
    if source is None:
        existing = target.path(SETTINGS)
        if not existing.exists():
            raise InstallRefused(
                "no agent settings: pass --settings FILE (the fleet's server_url, server_public_key "
                f"and this device's device_id), or put them in /{SETTINGS} first"
            )
        source = existing
    fleet, dropped = settings.load_fleet_settings(source)
    if dropped and source != target.path(SETTINGS):
        say(f"settings: ignored {', '.join(dropped)} from {source} (the install sets the paths)")
    return fleet


def _boot_limit(opts: InstallOptions, fleet: dict[str, object]) -> int:
    value = opts.boot_limit if opts.boot_limit is not None else fleet.get("boot_limit", 2)
    if not isinstance(value, int) or not 1 <= value <= grub.MAX_BOOT_LIMIT:
        raise InstallRefused(f"boot limit {value!r}: use a number from 1 to {grub.MAX_BOOT_LIMIT}")
    return value


def install(opts: InstallOptions, say: Say = print) -> Manifest:
    """Install on ``opts.root`` (see the module docstring); return the manifest."""
    target = Target(opts.root, opts.runner)
    firmware = target.firmware(opts.firmware)
    target.check(firmware)
    if opts.wheels is None:
        raise InstallRefused(
            "pass --wheels DIR: the agent's wheels for this machine's Python (no network needed)"
        )
    fleet = _fleet_settings(target, opts, say)
    boot_limit = _boot_limit(opts, fleet)
    root_uuid = target.filesystem_uuid("/")
    if root_uuid is None:
        raise InstallRefused(
            "cannot tell the UUID of the root filesystem (findmnt, or /etc/fstab under --root): the recovery "
            "environment finds the OS disk by it; mount / by UUID in /etc/fstab"
        )
    boot_uuid = target.filesystem_uuid("/boot")
    luks_root = target.luks_root()
    if luks_root is not None:
        _check_luks_options(opts, luks_root)
    update = opts.update_grub if opts.update_grub is not None else target.live
    say(
        f"installing Quick Machine Recovery {__version__} on {target.root} ({firmware}, "
        f"boot limit {boot_limit}, /boot on {'its own filesystem' if boot_uuid else 'the root filesystem'})"
    )

    manifest = Manifest.load(target.root) or Manifest(target.root)
    rec = Recorder(manifest)

    python = runtime.install_runtime(target, rec, opts.wheels, say)

    args = grub.kernel_args(firmware, opts.panic_s, opts.panic_on_oops)
    config = InstallConfig(
        version=__version__,
        firmware=firmware,
        boot_limit=boot_limit,
        panic_s=opts.panic_s,
        panic_on_oops=opts.panic_on_oops,
        kernel_args=args,
        python=python,
        root_uuid=root_uuid,
        boot_uuid=boot_uuid,
        recovery_modules=opts.recovery_modules,
        extra_modules=list(opts.extra_modules),
        root_luks_uuid=luks_root.uuid if luks_root else None,
    )
    rec.write(SETTINGS, settings.dump(settings.os_view(fleet, boot_limit)), 0o644)
    recovery_key = RECOVERY_DEVICE_KEY if luks_root is not None else DEVICE_KEY
    rec.write(
        RECOVERY_SETTINGS, settings.dump(settings.recovery_view(fleet, boot_limit, recovery_key)), 0o644
    )
    rec.write(INSTALL_CONFIG, json.dumps(asdict(config), indent=1, sort_keys=True) + "\n", 0o644)
    target.run(
        [
            f"/{VENV}/bin/python3",
            "-I",
            "-c",
            "import sys; from recovery_agent.settings import AgentSettings; AgentSettings.load(sys.argv[1])",
            f"/{SETTINGS}",
        ]
    )
    if target.path(DEVICE_KEY).exists():
        say(f"device key: /{DEVICE_KEY} exists, kept")
    else:
        rec.around(
            [DEVICE_KEY, DEVICE_KEY_PUB], lambda: target.run([f"/{LAUNCHER}", "keygen", f"/{DEVICE_KEY}"])
        )
        say(
            f"device key: made /{DEVICE_KEY} (0600) on this machine; "
            "enroll it: recovery-agent enroll --token T"
        )

    # An encrypted root: QMR's own recovery key in its own keyslot, sealed to the server's
    # escrow key at once (recovery-agent escrow, offline); the key is never written.
    if luks_root is not None:
        _escrow_luks_root(target, opts, luks_root, say)

    # Crash records: the pstore backend before any driver (modules-load.d runs files in name order).
    rec.write(
        MODULES_LOAD,
        "# Quick Machine Recovery: keep crash logs across a reboot (pstore), loaded before other modules.\n"
        + "\n".join(recoveryenv.PSTORE_MODULES[firmware])
        + "\n",
    )

    # The health verdict.
    for kind in CHECK_KINDS:
        rec.mkdir(f"{CHECK_DIR}/{kind}")
    for name, (text, _) in systemd.UNITS.items():
        rec.write(systemd.unit_path(name), text)
        for link, to in systemd.enable_links(name):
            rec.mkdir(str(Path(link).parent))
            rec.symlink(link, to)

    # Kernel hooks.
    hook = recoveryenv.data_file("kernel-hook.sh")
    rec.write(KERNEL_POSTINST, hook, 0o755)
    rec.write(KERNEL_POSTRM, hook, 0o755)

    # GRUB.
    rec.write(GRUB_DEFAULTS, grub.defaults_snippet(args))
    rec.write(GRUB_DROPIN, grub.dropin_script(), 0o755)
    rec.grubenv(GRUBENV, grub.grubenv_values(boot_limit))

    # The recovery environment.
    rec.tree(RECOVERY_DIR)
    if luks_root is not None:
        # (in the install's own tree: uninstall removes it with the recovery environment)
        write_atomic(target.path(RECOVERY_DEVICE_KEY), target.path(DEVICE_KEY).read_bytes(), 0o600)
        say(f"device key: a copy on /{RECOVERY_DEVICE_KEY} (0600) for the recovery environment")
    release = recoveryenv.build(target, config.recovery_env(), say)

    if update:
        rec.around([GRUB_CFG], lambda: target.run([f"/usr/sbin/{UPDATE_GRUB}"]), regenerate=UPDATE_GRUB)
        say(f"grub: /{GRUB_CFG} regenerated (boot counting, recovery entry)")
    else:
        say(
            f"grub: /{GRUB_CFG} NOT regenerated: {UPDATE_GRUB} needs the machine's block devices; run it on "
            f"the machine (or install with --update-grub on a mounted disk)"
        )
    if target.live:
        target.run(["systemctl", "daemon-reload"])
    manifest.installed = {"version": __version__, "firmware": firmware, "recovery_kernel": release}
    manifest.save()
    say(f"installed: {len(manifest.changes)} changes recorded in /{manifest.path.relative_to(target.root)}")
    return manifest


LUKS_SLOT = 7  # QMR's keyslot in a LUKS2 root


def _check_luks_options(opts: InstallOptions, luks_root: LuksRoot) -> None:
    missing = [
        flag
        for flag, value in (
            ("--luks-unlock-key-file FILE (a key that opens it now)", opts.luks_unlock_key_file),
            ("--escrow-key FILE (the server's signed escrow key: GET /v1/escrow-key)", opts.escrow_key),
        )
        if value is None
    ]
    if missing:
        raise InstallRefused(
            f"the root filesystem is on LUKS2 ({luks_root.device}, /dev/mapper/{luks_root.mapper}): the "
            f"recovery environment can open it only with a recovery key QMR adds and escrows; pass "
            + " and ".join(missing)
        )
    given = (("--luks-unlock-key-file", opts.luks_unlock_key_file), ("--escrow-key", opts.escrow_key))
    for flag, path in given:
        if path is not None and not path.exists():
            raise InstallRefused(f"{flag} {path}: no such file")


def _escrow_luks_root(target: Target, opts: InstallOptions, luks_root: LuksRoot, say: Say) -> None:
    assert opts.luks_unlock_key_file is not None and opts.escrow_key is not None
    out = target.run(
        [
            f"/{LAUNCHER}",
            "--config",
            f"/{SETTINGS}",
            "escrow",
            "--device",
            luks_root.device,
            "--unlock-key-file",
            str(opts.luks_unlock_key_file),
            "--slot",
            str(LUKS_SLOT),
            "--escrow-key",
            str(opts.escrow_key),
            *(["--tpm-sealed"] if opts.tpm_sealed else []),
        ]
    )
    say(f"disk key: {out.strip()}")


def rebuild_recovery_env(
    root: Path = Path("/"),
    changed_kernel: str | None = None,
    say: Say = print,
    runner: Runner | None = None,
) -> str | None:
    """``recovery-agent recovery-env``: rebuild the recovery environment (a kernel hook)."""
    target = Target(root, runner)
    config = InstallConfig.load(target)
    if changed_kernel is None:
        return recoveryenv.build(target, config.recovery_env(), say)
    return recoveryenv.rebuild_for_kernel_change(target, config.recovery_env(), changed_kernel, say)


def uninstall(
    root: Path = Path("/"),
    remove_key: bool = False,
    update_grub: bool | None = None,
    say: Say = print,
    runner: Runner | None = None,
) -> UndoReport | None:
    """Put back what the install changed (its manifest); say what is kept. None if nothing
    is installed on ``root``."""
    target = Target(root, runner)
    manifest = Manifest.load(target.root)
    if manifest is None:
        say(f"nothing installed on {target.root} (no install manifest)")
        return None
    keep = set() if remove_key else {DEVICE_KEY, DEVICE_KEY_PUB}
    update = update_grub if update_grub is not None else target.live
    try:
        luks_uuid = InstallConfig.load(target).root_luks_uuid
    except (InstallError, InstallRefused):
        luks_uuid = None
    report = undo(manifest, keep=keep, can_regenerate={UPDATE_GRUB} if update else set())
    if UPDATE_GRUB in report.regenerate:
        target.run([f"/usr/sbin/{UPDATE_GRUB}"])
        report.restored.append(f"{GRUB_CFG} (by {UPDATE_GRUB})")
    if target.live:
        target.run(["systemctl", "daemon-reload"])
    for line in report.lines():
        say(line)
    if not remove_key and target.path(DEVICE_KEY).exists():
        say(
            f"kept the device key /{DEVICE_KEY} "
            "(the server knows this machine by it; --remove-key removes it)"
        )
    if luks_uuid:
        say(
            f"kept QMR's recovery key in a keyslot of the encrypted root (LUKS UUID {luks_uuid}; slot "
            f"{LUKS_SLOT} unless rotated), which the server holds escrowed: once it need not open this "
            f"disk, remove the slot (cryptsetup luksKillSlot DEVICE SLOT) and revoke the key "
            f"(recovery-admin devices DEVICE --keys; device keys DEVICE --revoke)"
        )
    if target.path("var/lib/recovery").is_dir():
        say(
            "kept /var/lib/recovery: the agent's state (quarantined files, journals); "
            "remove it by hand when done"
        )
    say("uninstalled")
    return report
