"""``recovery-lab build``: the lab machine's disk images, reproducible and cached.

An image is made in stages; each stage's output is a directory in the cache named by a sha256
over everything that goes into it (package versions, recipe files, the scenario file, the
stage's own code), so a second build with the same inputs reuses it and says "cached"
(:mod:`~recovery_lab.build.cache`)::

    kernel       apt-get download of Debian's kernel image, headers and kbuild packages,
                 unpacked into one root (headers Makefile fixed, depmod run)      kernel.py
    sensor       images/sensor/sensor.c built against those headers: 1.0 (good)
                 and 2.0 (bad)                                                     kernel.py
    pyruntime    Debian's python3.11 + the agent's wheels + recovery_agent, one tree
                 (recovery_lab.pyruntime; its own cache directory, keyed the same way)
    initramfs    the OS's initramfs (busybox, virtio and ext4 modules; mounts p2,
                 switch_root) and the recovery environment's (busybox, modules, the
                 Python runtime and the agent: the whole recovery environment)  initramfs.py
    recovery     partition 3: kernel + the recovery initramfs                   initramfs.py
    esp          partition 1 (FAT): grub/grub.cfg and grub/grubenv             bootloader.py
    grub         GRUB's boot.img and core.img (i386-pc, BIOS)                  bootloader.py
    os           partition 2 (ext4) for one scenario: the OS root (with the same Python
                 runtime and agent, for `recovery-agent health`) plus the
                 scenario's changes                                                osroot.py
    disk         the raw disk image for one scenario, with a manifest.json         image.py

Only ``os`` and ``disk`` differ between scenarios. Every file is written with a fixed mtime
and every filesystem with a fixed UUID and hash seed (:mod:`~recovery_lab.build.files`), so
the same inputs give the same bytes.

Public API: :func:`build_image` (one scenario -> :class:`Artifact`), :func:`build_images`,
:func:`default_cache_dir`; :class:`BuildError` when an image cannot be built.
"""

from __future__ import annotations

from .cache import BuildError, default_cache_dir
from .image import Artifact, build_image, build_images

__all__ = ["Artifact", "BuildError", "build_image", "build_images", "default_cache_dir"]
