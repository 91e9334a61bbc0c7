"""The machine being installed: its root, how its own tools run, what it is.

``recovery-agent install`` works on the running system (root ``/``) or on a mounted image
(``--root DIR``). Either way the tools it runs are the machine's own (its ``python3``, its
``mkinitramfs``, its ``update-grub``): on ``/`` directly, under ``--root`` through ``chroot``.
Tests hand a :class:`Target` their own runner instead.

:meth:`Target.check` refuses, before anything changes, a machine the install cannot serve:
not Debian-like, no ``python3`` with ``asyncio`` (Debian's ``python3-minimal`` has none), no
``busybox`` or ``initramfs-tools`` for the recovery environment, no GRUB with ``update-grub``.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AgentError

# The machine's own tools, run with this environment only: nothing of the caller leaks in.
TOOL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
FIRMWARES = ("bios", "uefi")

# (argv, extra environment) -> standard output; raises InstallError when the tool fails.
Runner = Callable[[Sequence[str], Mapping[str, str]], str]


@dataclass(frozen=True)
class LuksRoot:
    """The root filesystem's LUKS volume: its device, LUKS UUID, and mapper name."""

    device: str
    uuid: str
    mapper: str


class InstallError(AgentError):
    """Raised when a step of the install or uninstall fails (a tool of the machine failed, a
    file cannot be written). The message names the step and the fix; what was changed so far
    is in the manifest, so ``recovery-agent uninstall`` can put it back."""


class InstallRefused(InstallError):
    """Raised before anything is changed: the machine lacks what the install needs (a package,
    a writable /boot), or the options contradict each other. The message names the fix."""


def _release_key(release: str) -> tuple[tuple[int, str], ...]:
    """Sort key of kernel releases: numbers as numbers (6.1.0-57 after 6.1.0-9)."""
    return tuple((int(p), "") if p.isdecimal() else (-1, p) for p in re.split(r"(\d+)", release) if p)


@dataclass
class Target:
    """The root of the machine to install on, and the way its tools run."""

    root: Path = Path("/")
    runner: Runner | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        """True when installing on the running system (its devices and units are live)."""
        return self.root.resolve() == Path("/")

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    # ------------------------------------------------------------------ tools

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        """Run one of the machine's tools (``argv[0]`` as the machine sees it)."""
        extra = dict(env or {})
        if self.runner is not None:
            return self.runner(list(argv), extra)
        cmd = list(argv) if self.live else ["chroot", str(self.root), *argv]
        try:
            proc = subprocess.run(
                cmd, env={**TOOL_ENV, **extra}, capture_output=True, check=False, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError as exc:
            raise InstallError(f"cannot run {cmd[0]}: {exc.strerror}") from None
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.decode("utf-8", "replace").strip().splitlines()[-15:])
            raise InstallError(
                f"{' '.join(argv)} failed (exit {proc.returncode})"
                + (" under chroot " + str(self.root) if not self.live else "")
                + (":\n" + tail if tail else "")
            )
        return proc.stdout.decode("utf-8", "replace")

    def has(self, rel: str) -> bool:
        return self.path(rel).exists()

    def installed(self, package: str) -> bool:
        """Whether the Debian package is installed (from dpkg's status file)."""
        status = self.path("var/lib/dpkg/status")
        try:
            text = status.read_text(errors="replace")
        except OSError:
            return False
        for block in text.split("\n\n"):
            if re.search(rf"^Package: {re.escape(package)}$", block, re.M) and re.search(
                r"^Status: install ok installed$", block, re.M
            ):
                return True
        return False

    # ------------------------------------------------------------------ facts

    def firmware(self, requested: str = "auto") -> str:
        """``bios`` or ``uefi``: as asked, or found (a running system booted by UEFI has
        /sys/firmware/efi; an image says by its GRUB package)."""
        if requested in FIRMWARES:
            return requested
        if requested != "auto":
            raise InstallRefused(f"--firmware {requested}: use one of auto, {', '.join(FIRMWARES)}")
        if self.live:
            return "uefi" if Path("/sys/firmware/efi").is_dir() else "bios"
        if self.installed("grub-efi-amd64") or self.installed("grub-efi-amd64-signed"):
            return "uefi"
        if self.installed("grub-pc"):
            return "bios"
        raise InstallRefused(
            f"cannot tell how {self.root} boots (neither grub-pc nor grub-efi-amd64 is installed "
            f"there): pass --firmware bios or --firmware uefi"
        )

    def kernel_releases(self) -> list[str]:
        """Kernels the machine can boot (``boot/vmlinuz-R`` and ``lib/modules/R``), newest first."""
        found = []
        for vmlinuz in self.path("boot").glob("vmlinuz-*"):
            release = vmlinuz.name.removeprefix("vmlinuz-")
            if self.path(f"lib/modules/{release}").is_dir():
                found.append(release)
        return sorted(found, key=_release_key, reverse=True)

    def filesystem_uuid(self, mountpoint: str) -> str | None:
        """The UUID of the filesystem mounted at ``mountpoint`` (``/``, ``/boot``): asked of
        the running system, or read from the image's /etc/fstab; None if /etc/fstab has no
        entry of its own for it."""
        if self.live:
            try:
                out = self.run(["findmnt", "-n", "-o", "UUID", "--mountpoint", mountpoint])
            except InstallError:
                return None
            return out.strip() or None
        try:
            fstab = self.path("etc/fstab").read_text()
        except OSError:
            return None
        for line in fstab.splitlines():
            words = line.split()
            if len(words) >= 2 and not words[0].startswith("#") and words[1] == mountpoint:
                if words[0].startswith("UUID="):
                    return words[0].removeprefix("UUID=")
        return None

    def luks_root(self) -> LuksRoot | None:
        """The LUKS volume the root filesystem is on (asked of the running system), or None.
        Under ``--root`` (a tree, not a running system) None: its volumes are not open here."""
        if not self.live:
            return None
        try:
            source = self.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", "/"]).strip()
            if not source.startswith("/dev/mapper/"):
                return None
            status = self.run(["cryptsetup", "status", source.removeprefix("/dev/mapper/")])
        except InstallError:
            return None
        fields = dict(
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in status.splitlines())
        )
        if not fields.get("type", "").startswith("LUKS") or not fields.get("device"):
            return None
        device = fields["device"]
        uuid = self.run(["cryptsetup", "luksUUID", device]).strip()
        return LuksRoot(device=device, uuid=uuid, mapper=source.removeprefix("/dev/mapper/"))

    def check(self, firmware: str) -> None:
        """Refuse (:class:`InstallRefused`) a machine the install cannot serve, naming every
        missing piece and the command that adds it."""
        problems: list[str] = []
        packages: list[str] = []
        if not self.has("etc/debian_version"):
            problems.append(f"{self.root} is not a Debian system (no /etc/debian_version)")
        python = self.path("usr/bin/python3")
        if not (python.exists() or python.is_symlink()) or not self._has_stdlib("asyncio"):
            problems.append("no python3 with asyncio (python3-minimal has none)")
            packages.append("python3")
        if not self.has("bin/busybox") and not self.has("usr/bin/busybox"):
            problems.append("no busybox (the recovery environment's shell tools)")
            packages.append("busybox")
        if not self.has("usr/sbin/mkinitramfs"):
            problems.append("no mkinitramfs (the recovery environment is an initramfs)")
            packages.append("initramfs-tools")
        if not self.has("usr/share/grub/grub-mkconfig_lib") or not self.has("usr/sbin/update-grub"):
            problems.append("no GRUB with update-grub")
            packages.append("grub-efi-amd64" if firmware == "uefi" else "grub-pc")
        if not self.kernel_releases():
            problems.append("no kernel in /boot with its modules")
            packages.append("linux-image-amd64")
        if problems:
            fix = f" (apt-get install {' '.join(packages)})" if packages else ""
            raise InstallRefused("cannot install here: " + "; ".join(problems) + fix)

    def _has_stdlib(self, module: str) -> bool:
        for lib in sorted(self.path("usr/lib").glob("python3.*")):
            if (lib / module / "__init__.py").exists() or (lib / f"{module}.py").exists():
                return True
        return False

    def python_version(self) -> str:
        """``3.11``: the version of the machine's python3 (its stdlib directory)."""
        libs = sorted(
            (p.name.removeprefix("python") for p in self.path("usr/lib").glob("python3.*") if p.is_dir()),
            key=_release_key,
        )
        versions = [
            v for v in libs if re.fullmatch(r"3\.\d+", v) and self.path(f"usr/bin/python{v}").exists()
        ]
        if not versions:
            raise InstallRefused("no python3.X interpreter in /usr/bin: apt-get install python3")
        return versions[-1]
