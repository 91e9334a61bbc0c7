"""What goes into the runtime, fetched: Debian's packages and the agent's wheels.

- :func:`candidate_versions`: the version ``apt-get download`` would fetch of each Debian
  package (``apt-cache policy``);
- :func:`installed_pins`: the exact versions of the agent's dependencies installed in this
  project's environment, so the runtime runs what the tests ran;
- :func:`download_wheels`: ``pip download --only-binary=:all:`` for CPython 3.11 on every
  manylinux the tree's glibc runs, pinned to those versions (cached by pins and platforms);
- :func:`unpack_deb`: ``apt-get download package=version`` and ``dpkg-deb -x``, each once.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

from recovery_agent.digest import sha256_bytes

from .. import tools
from .tree import ARCH, PYTHON_VERSION, Progress, RuntimeBuildError

DEBIAN_PYTHON = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib")

# Every package a needed shared library may come from. The build fails, naming the package, if
# ldd finds one outside this list: the list is part of the cache key, so a library's security
# update rebuilds the runtime.
DEBIAN_LIBRARIES = (
    "libc6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
)

# The agent's runtime dependencies (pyproject.toml); their own dependencies come along.
WHEEL_REQUIREMENTS = ("aiohttp", "cryptography", "pydantic", "tenacity")


def candidate_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The version ``apt-get download`` would fetch for each package (``apt-cache policy``)."""
    text = tools.run(["apt-cache", "policy", *packages])
    found: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1].split(":")[0] if line.count(":") > 1 else line[:-1]
        elif line.strip().startswith("Candidate:") and current:
            version = line.split(":", 1)[1].strip()
            if version != "(none)":
                found[current] = version
    missing = [p for p in packages if p not in found]
    if missing:
        raise RuntimeBuildError(
            f"no candidate version for {', '.join(missing)}: run "
            "apt-get update (Debian 12 bookworm sources are needed)"
        )
    return found


def installed_pins() -> dict[str, str]:
    """Every distribution installed in this interpreter's environment, name -> version."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    missing = [r for r in WHEEL_REQUIREMENTS if r not in pins]
    if missing:
        raise RuntimeBuildError(
            f"{', '.join(missing)} not installed in {sys.prefix}: "
            "install the project (pip install -e .) first"
        )
    return pins


def glibc_version(libc6_version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", libc6_version)
    if not match:
        raise RuntimeBuildError(f"cannot read a glibc version from libc6 {libc6_version}")
    return int(match[1]), int(match[2])


def download_wheels(
    cache: Path, pins: dict[str, str], glibc: tuple[int, int], progress: Progress
) -> list[Path]:
    """The wheels of WHEEL_REQUIREMENTS and their dependencies, each at the version installed
    here (a constraints file pins them all). Platforms: every manylinux tag the tree's glibc
    runs, newest first, so pip picks what pip on that Debian would."""
    major, minor = glibc
    platforms = [f"manylinux_{major}_{m}_{ARCH.replace('amd64', 'x86_64')}" for m in range(minor, 16, -1)] + [
        "manylinux2014_x86_64"
    ]
    wanted = [f"{r}=={pins[r]}" for r in WHEEL_REQUIREMENTS]
    tag = sha256_bytes(json.dumps([pins, platforms]).encode())[:16]
    dest = cache / tag
    done = dest / "complete.json"
    if done.is_file():
        return [dest / name for name in json.loads(done.read_text())]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    constraints = dest / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    cmd: list[str] = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--only-binary=:all:",
        "--implementation",
        "cp",
        "--python-version",
        PYTHON_VERSION,
        "--abi",
        "cp311",
        "-c",
        str(constraints),
        "-d",
        str(dest),
    ]
    for platform in platforms:
        cmd += ["--platform", platform]
    progress(f"[pyruntime] pip download {' '.join(wanted)} (+ dependencies)")
    tools.run(cmd + wanted)
    constraints.unlink()
    names = sorted(p.name for p in dest.glob("*.whl"))
    done.write_text(json.dumps(names) + "\n")
    return [dest / n for n in names]


def _deb_path(debs: Path, package: str, version: str) -> Path | None:
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{package}_{quoted}_*.deb"))
    return found[0] if found else None


def unpack_deb(debs: Path, package: str, version: str) -> Path:
    """``apt-get download package=version`` (once) and ``dpkg-deb -x`` it (once)."""
    debs.mkdir(parents=True, exist_ok=True)
    deb = _deb_path(debs, package, version)
    if deb is None:
        tools.run(["apt-get", "download", f"{package}={version}"], cwd=debs)
        deb = _deb_path(debs, package, version)
        if deb is None:
            raise RuntimeBuildError(f"apt-get download {package}={version} left no .deb in {debs}")
    unpacked = debs / (deb.name[:-4] + ".d")
    if not unpacked.is_dir():
        tmp = unpacked.with_suffix(".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tools.run(["dpkg-deb", "-x", deb, tmp])
        tmp.rename(unpacked)
    return unpacked
