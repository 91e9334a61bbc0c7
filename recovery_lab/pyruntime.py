"""The Python runtime of the recovery environment: Debian's python3.11, the agent's wheels and
the agent, as one directory tree to merge into the recovery environment's root filesystem.

The workflow of :func:`build_python_runtime`:

1. **inputs**: the candidate versions of Debian's python3.11 packages and of the libraries it
   may need (``apt-cache policy``), the exact versions of the agent's dependencies installed in
   this project's environment (``importlib.metadata``), the agent's source files and this
   module's own source. Their sha256 is the cache key; a tree built from the same inputs is
   reused ("cached").
2. **wheels**: ``pip download --only-binary=:all:`` for CPython 3.11 on manylinux up to the
   glibc of the Debian ``libc6`` that goes into the tree, pinned to the installed versions.
3. **debs**: ``apt-get download`` of python3.11-minimal, libpython3.11-minimal and
   libpython3.11-stdlib, unpacked with ``dpkg-deb -x``; the interpreter and the stdlib are
   copied into the tree and the stdlib is pruned (:data:`PRUNE_STDLIB`).
4. **site**: the wheels are unpacked into ``usr/lib/python3/dist-packages`` (Debian's site.py
   puts it on ``sys.path``), with the agent package (``recovery_agent`` only).
5. **libraries**: ``ldd`` on every ELF file in the tree names the shared libraries it needs;
   ``dpkg -S`` names the Debian package of each; that package (which must be one of
   :data:`DEBIAN_LIBRARIES`, so the cache key covers its version) is downloaded and only the
   needed ``.so`` files are copied, at the paths Debian puts them.
6. **check**: under ``chroot`` (no host file is visible) the tree's own ``ld.so --list`` must
   resolve every ELF file.
7. **compile**: ``compileall --invalidation-mode unchecked-hash`` by the tree's own interpreter
   under chroot; the stdlib and the wheels keep only their ``.pyc`` (sourceless, about half the
   bytes), the agent keeps its ``.py`` too, for tracebacks with source lines. Then, under
   chroot, isolated (``-I``), the tree's interpreter must import ``recovery_agent.cli`` and
   ``recovery_agent.agent`` with ``sys.prefix`` ``/usr``.
8. Every file gets the fixed mtime :data:`EPOCH`; a ``manifest.json`` beside the tree records
   what went in.

The build needs root (``chroot``) and network access to apt and PyPI, the first time only.
Public API: :func:`build_python_runtime` -> :class:`RuntimeArtifact`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from recovery_agent.digest import sha256_bytes, sha256_file

from . import tools

REPO = Path(__file__).resolve().parents[1]
AGENT_PACKAGE = REPO / "recovery_agent"

# The same fixed mtime as recovery_lab.build (2024-07-19 04:09 UTC), for reproducible trees.
EPOCH = 1721362140

PYTHON_VERSION = "3.11"
PYTHON = f"usr/bin/python{PYTHON_VERSION}"
STDLIB = f"usr/lib/python{PYTHON_VERSION}"
SITE = "usr/lib/python3/dist-packages"  # on sys.path through Debian's site.py
ARCH = "amd64"
MULTIARCH = "x86_64-linux-gnu"

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
# Wheel files that are never imported.
PRUNE_WHEEL_SUFFIXES = (".pyi", ".c", ".h", ".pyx", ".pxd", ".cpp")
PRUNE_WHEEL_NAMES = ("py.typed", "RECORD", "INSTALLER", "REQUESTED", "distutils-precedence.pth")
# Optional C accelerators whose package falls back to pure Python on ImportError, left out
# because they would drag a library in: frozenlist's is C++ and needs libstdc++ (2.4 MB).
PRUNE_WHEEL_EXTENSIONS = ("frozenlist/_frozenlist.",)
# Whole wheel directories never imported at run time: cryptography needs cffi's C backend
# (_cffi_backend, kept), not the cffi package or its C parser; multidict ships a test module.
PRUNE_WHEEL_PREFIXES = ("cffi/", "pycparser/", "multidict/_testcapi.")

# Stdlib parts the agent and its dependencies never import (relative to usr/lib/python3.11).
# Verified by the import check after pruning; see tests/test_pyruntime.py for the modules that
# must stay. ctypes and multiprocessing stay (stdlib code reaches them lazily; small).
PRUNE_STDLIB = (
    # tests, IDE, GUI, docs, packaging tools
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "turtle.py",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc.py",
    "pydoc_data",
    "doctest.py",
    "distutils",
    "_distutils_system_mod.py",
    "__phello__",
    "__hello__.py",
    "antigravity.py",
    "this.py",
    "EXTERNALLY-MANAGED",
    "sitecustomize.py",  # a symlink to /etc/python3.11, for apport
    "_pydecimal.py",
    "_aix_support.py",
    "_osx_support.py",
    "_bootsubprocess.py",
    # databases, terminals, audio, old network protocols, servers
    "sqlite3",
    "dbm",
    "curses",
    "wsgiref",
    "xmlrpc",
    "msilib",
    "unittest",
    "imaplib.py",
    "nntplib.py",
    "poplib.py",
    "smtplib.py",
    "smtpd.py",
    "telnetlib.py",
    "ftplib.py",
    "mailbox.py",
    "mailcap.py",
    "cgi.py",
    "cgitb.py",
    "asyncore.py",
    "asynchat.py",
    "aifc.py",
    "sunau.py",
    "wave.py",
    "chunk.py",
    "sndhdr.py",
    "imghdr.py",
    "audioop.py",
    "pdb.py",
    "profile.py",
    "cProfile.py",
    "pstats.py",
    "trace.py",
    "tabnanny.py",
    "pyclbr.py",
    "xdrlib.py",
    "nis.py",
    "crypt.py",
    "pipes.py",
    "uu.py",
    # CJK codecs (their C halves are pruned below)
    *(
        f"encodings/{name}.py"
        for name in (
            "big5",
            "big5hkscs",
            "cp932",
            "cp949",
            "cp950",
            "euc_jis_2004",
            "euc_jisx0213",
            "euc_jp",
            "euc_kr",
            "gb18030",
            "gb2312",
            "gbk",
            "hz",
            "iso2022_jp",
            "iso2022_jp_1",
            "iso2022_jp_2",
            "iso2022_jp_2004",
            "iso2022_jp_3",
            "iso2022_jp_ext",
            "iso2022_kr",
            "johab",
            "shift_jis",
            "shift_jis_2004",
            "shift_jisx0213",
        )
    ),
    # C extensions: tests, databases, terminals, audio, CJK codecs
    *(
        f"lib-dynload/{name}.cpython-311-{MULTIARCH}.so"
        for name in (
            "_testbuffer",
            "_testcapi",
            "_testclinic",
            "_testimportmultiple",
            "_testinternalcapi",
            "_testmultiphase",
            "_xxsubinterpreters",
            "_xxtestfuzz",
            "xxlimited",
            "xxlimited_35",
            "_ctypes_test",
            "_sqlite3",
            "_dbm",
            "_gdbm",
            "_curses",
            "_curses_panel",
            "readline",
            "nis",
            "ossaudiodev",
            "audioop",
            "_crypt",
            "_lsprof",
            "_codecs_cn",
            "_codecs_hk",
            "_codecs_iso2022",
            "_codecs_jp",
            "_codecs_kr",
            "_codecs_tw",
            "_multibytecodec",
        )
    ),
)

# What the runtime must be able to import (the check, under chroot).
IMPORT_CHECK = "import recovery_agent.cli, recovery_agent.agent"

Progress = Callable[[str], None]


class RuntimeBuildError(Exception):
    """Raised when the runtime cannot be built: a package or wheel cannot be had, a library's
    package is not in :data:`DEBIAN_LIBRARIES`, or the built tree fails its checks under
    chroot. The message names the step and the fix."""


@dataclass(frozen=True)
class RuntimeArtifact:
    """A built runtime. ``root`` is merged into the recovery environment's root; ``python`` is
    the interpreter's path inside it; ``manifest`` (beside ``root``) records the inputs."""

    root: Path
    size_bytes: int
    files: int
    key: str
    python: str = PYTHON
    cached: bool = False

    @property
    def manifest(self) -> Path:
        return self.root.parent / "manifest.json"


# --------------------------------------------------------------------------- public API


def build_python_runtime(cache_dir: Path, *, progress: Progress = print) -> RuntimeArtifact:
    """Build (or reuse from ``cache_dir``) the runtime tree; see the module docstring."""
    cache = Path(cache_dir) / "pyruntime"
    cache.mkdir(parents=True, exist_ok=True)
    step = _Steps(progress)
    tools.require("apt-cache", "apt-get", "dpkg-deb", "dpkg", "ldd", "chroot", "strip")

    with step("inputs"):
        versions = _candidate_versions(DEBIAN_PYTHON + DEBIAN_LIBRARIES)
        pins = _installed_pins()
    with step("wheels"):
        wheels = _download_wheels(cache / "wheels", pins, _glibc(versions["libc6"]), progress)
    inputs = {
        "debian": versions,
        "wheels": {w.name: sha256_file(w) for w in wheels},
        "agent": {str(p.relative_to(REPO)): sha256_file(p) for p in _agent_sources()},
        "code": sha256_file(Path(__file__)),
        "epoch": EPOCH,
    }
    key = sha256_bytes(json.dumps(inputs, sort_keys=True).encode())[:16]
    out = cache / f"tree-{key}"
    if (out / "manifest.json").is_file():
        artifact = _artifact(out / "root", key, cached=True)
        progress(
            f"[pyruntime] cached ({out.name}: {artifact.size_bytes / 1e6:.1f} MB, {artifact.files} files)"
        )
        return artifact

    tmp = cache / f"tree-{key}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    root = tmp / "root"
    root.mkdir(parents=True)
    debs = cache / "debs"
    with step("python packages (apt-get download, dpkg-deb -x)"):
        unpacked = {p: _unpack_deb(debs, p, versions[p]) for p in DEBIAN_PYTHON}
        _copy_python(unpacked, root)
    with step("prune stdlib"):
        pruned = _prune_stdlib(root / STDLIB)
    with step("wheels and agent into dist-packages"):
        _unpack_wheels(wheels, root / SITE)
        _copy_agent(root / SITE / "recovery_agent")
    with step("strip the wheels' extension modules"):
        stripped = _strip_wheel_extensions(root / SITE)
    with step("shared libraries (ldd, dpkg -S)"):
        libraries = _add_libraries(root, debs, versions)
    with step("check: ld.so --list under chroot"):
        _check_linking(root)
    with step("compile .pyc under chroot"):
        source_bytes = _compile(root)
    with step("check: import the agent under chroot"):
        import_s, modules = _check_import(root)
    _set_mtimes(root)
    size, files = _measure(root)
    manifest = {
        "key": key,
        "inputs": inputs,
        "python": PYTHON,
        "libraries": libraries,
        "pruned": pruned,
        "stripped_bytes": stripped,
        "size_bytes": size,
        "files": files,
        "dropped_source_bytes": source_bytes,
        "import_check_s_host": import_s,
        "modules_at_import": modules,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    progress(
        f"[pyruntime] built {out.name} in {step.total():.1f}s: {size / 1e6:.1f} MB, "
        f"{files} files, {len(modules)} modules imported by the agent "
        f"in {import_s:.2f}s (host)"
    )
    return _artifact(out / "root", key, cached=False)


# --------------------------------------------------------------------------- steps


class _Steps:
    """``with step("name"):`` prints the step and its duration; errors name the step."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.started = time.monotonic()
        self._name = ""

    def __call__(self, name: str) -> _Steps:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.monotonic()

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.progress(f"[pyruntime] {self._name}: {time.monotonic() - self._t0:.1f}s")
            return False
        if isinstance(exc, RuntimeBuildError):
            return False
        if isinstance(exc, (tools.ToolError, OSError, ValueError, zipfile.BadZipFile)):
            raise RuntimeBuildError(f"python runtime, step {self._name!r}: {exc}") from exc
        return False

    def total(self) -> float:
        return time.monotonic() - self.started


def _candidate_versions(packages: tuple[str, ...]) -> dict[str, str]:
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


def _installed_pins() -> dict[str, str]:
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


def _glibc(libc6_version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", libc6_version)
    if not match:
        raise RuntimeBuildError(f"cannot read a glibc version from libc6 {libc6_version}")
    return int(match[1]), int(match[2])


def _download_wheels(
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


def _agent_sources() -> list[Path]:
    return sorted(p for p in AGENT_PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _deb_path(debs: Path, package: str, version: str) -> Path | None:
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{package}_{quoted}_*.deb"))
    return found[0] if found else None


def _unpack_deb(debs: Path, package: str, version: str) -> Path:
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


def _copy_python(unpacked: dict[str, Path], root: Path) -> None:
    """The interpreter and the stdlib; no docs, no /etc (sitecustomize is pruned)."""
    for tree in unpacked.values():
        for rel in (PYTHON, STDLIB):
            src = tree / rel
            if src.is_file():
                _copy_file(src, root / rel)
            elif src.is_dir():
                shutil.copytree(src, root / rel, symlinks=True, dirs_exist_ok=True)
    if not (root / PYTHON).is_file():
        raise RuntimeBuildError(f"{PYTHON} is not in {', '.join(unpacked)}: has Debian renamed its packages?")


def _prune_stdlib(stdlib: Path) -> list[str]:
    pruned = []
    for rel in PRUNE_STDLIB:
        path = stdlib / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        pruned.append(rel)
    for cache in list(stdlib.rglob("__pycache__")):
        shutil.rmtree(cache)
    return sorted(set(pruned))


def _unpack_wheels(wheels: list[Path], site: Path) -> None:
    """Unpack each wheel (a zip): purelib/platlib data go to the site too; scripts, headers
    and data are dropped, and so is what is never imported (PRUNE_WHEEL_*)."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                parts = name.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                        parts = parts[2:]
                    else:
                        continue
                if info.is_dir() or not parts[-1]:
                    continue
                if parts[-1] in PRUNE_WHEEL_NAMES or parts[-1].endswith(PRUNE_WHEEL_SUFFIXES):
                    continue
                if name.endswith(".so") and name.startswith(PRUNE_WHEEL_EXTENSIONS):
                    continue
                if name.startswith(PRUNE_WHEEL_PREFIXES):
                    continue
                if any(p in ("", ".", "..") for p in parts) or name.startswith("/"):
                    raise RuntimeBuildError(f"{wheel.name}: unsafe path {name!r}")
                dest = site.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(info))
                dest.chmod(0o644)


def _strip_wheel_extensions(site: Path) -> int:
    """``strip --strip-unneeded`` the wheels' ELF files, as Debian's dh_strip does: manylinux
    wheels often ship debug info (aiohttp's HTTP parser: 3.3 MB, 0.6 MB stripped). Debian's
    own files are stripped already. Returns the bytes saved."""
    saved = 0
    for elf in _elf_files(site):
        before = elf.stat().st_size
        tools.run(["strip", "--strip-unneeded", elf])
        saved += before - elf.stat().st_size
    return saved


def _copy_agent(dest: Path) -> None:
    for src in _agent_sources():
        _copy_file(src, dest / src.relative_to(AGENT_PACKAGE))


def _elf_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield path


_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)\s+\(0x")
_LDD_INTERP = re.compile(r"^\s*(/\S+)\s+\(0x")


def _add_libraries(root: Path, debs: Path, versions: dict[str, str]) -> dict[str, list[str]]:
    """Copy the shared libraries the tree's ELF files need from their Debian packages.

    ``ldd`` (the host's loader, which reads the same Debian layout) resolves each ELF file's
    needs; libraries found inside the tree (a wheel's bundled ``.libs``) are skipped. Each
    host path is mapped to its package with ``dpkg -S``; the file is then taken from *that
    package at the candidate version*, not from the host, and copied (symlinks resolved) to
    the same path in the tree. Returns package -> paths copied."""
    needed: dict[str, str] = {}  # host path -> the first tree file that needs it
    for elf in _elf_files(root):
        for line in tools.run(["ldd", elf]).splitlines():
            if "not found" in line:
                # A library the tree bundles next to the ELF resolves under chroot; others
                # are reported by _check_linking with their name.
                continue
            m = _LDD_LINE.match(line)
            path = m[2] if m else (_LDD_INTERP.match(line) or [None, None])[1]
            if path and not Path(path).resolve().is_relative_to(root.resolve()):
                needed.setdefault(path, "/" + str(elf.relative_to(root)))
    by_package: dict[str, list[str]] = {}
    for path in sorted(needed):
        package = _dpkg_owner(path)
        if package not in DEBIAN_LIBRARIES:
            raise RuntimeBuildError(
                f"{path} (needed by {needed[path]}) comes from Debian package {package}, which "
                f"is not in DEBIAN_LIBRARIES: add it there, or prune what needs it "
                f"(recovery_lab/pyruntime.py)"
            )
        by_package.setdefault(package, []).append(path)
    copied: dict[str, list[str]] = {}
    for package, paths in sorted(by_package.items()):
        tree = _unpack_deb(debs, package, versions[package])
        for path in paths:
            src = _find_in_package(tree, path)
            if src is None:
                raise RuntimeBuildError(
                    f"{path} is not in {package} {versions[package]} "
                    "(the host's copy is from another version?)"
                )
            rel = src.relative_to(tree)
            # Keep the path the loader asked for (e.g. lib64/ld-linux-x86-64.so.2 is a
            # symlink in libc6): a regular file there, no symlink chains.
            want = Path(path.lstrip("/"))
            target = root / (want if _same_dir_layout(tree, want) else rel)
            _copy_file(_resolve_in(tree, src), target)
            copied.setdefault(package, []).append(str(target.relative_to(root)))
    return copied


def _resolve_in(tree: Path, path: Path) -> Path:
    """Follow symlinks as if ``tree`` were the root (libc6's lib64/ld-linux-x86-64.so.2 is an
    absolute symlink, which must not lead to the host's file)."""
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = tree / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise RuntimeBuildError(f"symlink loop at {path}")


def _same_dir_layout(tree: Path, want: Path) -> bool:
    return (tree / want).exists() or (tree / want).is_symlink()


def _find_in_package(tree: Path, host_path: str) -> Path | None:
    """The file of an unpacked package that the host path names, allowing for the merged
    /usr (the host may say /lib/x86_64-linux-gnu where the package says /usr/lib/...)."""
    rel = host_path.lstrip("/")
    candidates = [rel, rel.removeprefix("usr/"), "usr/" + rel]
    for cand in candidates:
        path = tree / cand
        if path.exists():
            return path
    return None


def _dpkg_owner(path: str) -> str:
    """The Debian package that owns a host file (``dpkg -S``), trying the path as given,
    resolved, and with or without the ``/usr`` prefix (merged /usr)."""
    real = os.path.realpath(path)
    tries = []
    for p in (path, real):
        tries += [p, "/usr" + p if not p.startswith("/usr/") else p.removeprefix("/usr")]
    for candidate in dict.fromkeys(tries):
        try:
            out = tools.run(["dpkg", "-S", candidate])
        except tools.ToolFailed:
            continue
        package = out.split(":", 1)[0].strip()
        return package.split(",")[0].strip()
    raise RuntimeBuildError(
        f"no Debian package owns {path} (dpkg -S): is it a library installed outside apt (e.g. /usr/local)?"
    )


def _chroot(root: Path, *argv: str) -> str:
    """Run ``argv`` inside the tree with an empty environment: nothing of the host is seen."""
    chroot = tools.which("chroot")
    if chroot is None:
        raise tools.ToolMissing(tools.missing_message("chroot"))
    return tools.run(["env", "-i", chroot, str(root), *argv])


def _check_linking(root: Path) -> None:
    """The tree's own loader resolves every ELF file of the tree, inside the tree."""
    loader = "/lib64/ld-linux-x86-64.so.2"
    problems = []
    for elf in _elf_files(root):
        if elf == root / loader.lstrip("/"):
            continue
        rel = "/" + str(elf.relative_to(root))
        try:
            out = _chroot(root, loader, "--list", rel)
        except tools.ToolFailed as exc:  # the loader exits 127 when a library is missing
            problems.append(f"{rel}: {exc.stderr.strip()}")
            continue
        missing = [ln.strip() for ln in out.splitlines() if "not found" in ln]
        if missing:
            problems.append(f"{rel}: {', '.join(missing)}")
    if problems:
        raise RuntimeBuildError(
            "shared libraries missing from the runtime (add their "
            "packages to DEBIAN_LIBRARIES): " + "; ".join(problems)
        )


def _compile(root: Path) -> int:
    """Compile every module with the tree's own interpreter (its magic number) as
    unchecked-hash pycs (valid without mtimes; reproducible). The stdlib and the wheels keep
    only the pyc, in place of the .py; the agent keeps its .py for tracebacks. Returns the
    number of source bytes dropped."""
    python = "/" + PYTHON
    # -B: the compiling interpreter must not leave caches of the modules it runs itself.
    common = [
        python,
        "-I",
        "-B",
        "-m",
        "compileall",
        "-q",
        "-j",
        "1",
        "--invalidation-mode",
        "unchecked-hash",
    ]
    # -b: legacy locations (foo.pyc beside foo.py), which import uses once foo.py is gone.
    _chroot(root, *common, "-b", "-x", "/recovery_agent/", "/" + STDLIB, "/" + SITE)
    _chroot(root, *common, "/" + SITE + "/recovery_agent")
    dropped = 0
    agent = root / SITE / "recovery_agent"
    for base in (root / STDLIB, root / SITE):
        for source in sorted(base.rglob("*.py")):
            if source.is_relative_to(agent) or source.is_symlink():
                continue
            if source.with_suffix(".pyc").is_file():
                dropped += source.stat().st_size
                source.unlink()
        # Debian's _sysconfigdata__linux_x86_64-linux-gnu.py is a symlink to the other name,
        # whose source is gone now; compileall compiled it through the link already.
        for link in sorted(base.rglob("*.py")):
            if link.is_symlink() and not link.exists():
                link.unlink()
    return dropped


def _check_import(root: Path) -> tuple[float, list[str]]:
    """The tree's interpreter, isolated (-I) under chroot, imports the agent. Returns the
    seconds the import took and the modules it loaded."""
    code = (
        "import sys, time, json; sys.dont_write_bytecode = True; "
        "t = time.perf_counter(); " + IMPORT_CHECK + "; "
        "d = time.perf_counter() - t; "
        "bad = [p for p in sys.path if p and not p.startswith('/usr/lib/python3')]; "
        "print(json.dumps({'s': d, 'modules': sorted(sys.modules), 'path': sys.path, "
        "'prefix': sys.prefix, 'bad': bad}))"
    )
    try:
        out = _chroot(root, "/" + PYTHON, "-I", "-c", code)
    except tools.ToolFailed as exc:
        raise RuntimeBuildError(
            f"the runtime cannot import the agent under chroot (something needed was pruned?):\n{exc}"
        ) from exc
    result = json.loads(out.strip().splitlines()[-1])
    if result["prefix"] != "/usr" or result["bad"]:
        raise RuntimeBuildError(
            f"unexpected sys.prefix {result['prefix']} or sys.path {result['path']} in the runtime"
        )
    return result["s"], result["modules"]


# --------------------------------------------------------------------------- files


def _copy_file(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        dest.unlink()
    shutil.copyfile(src, dest)
    mode = os.stat(src).st_mode
    dest.chmod(0o755 if mode & stat.S_IXUSR else 0o644)


def _set_mtimes(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(root, (EPOCH, EPOCH))


def _measure(root: Path) -> tuple[int, int]:
    size = files = 0
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            size += path.stat().st_size
            files += 1
    return size, files


def _artifact(root: Path, key: str, *, cached: bool) -> RuntimeArtifact:
    size, files = _measure(root)
    return RuntimeArtifact(root=root, size_bytes=size, files=files, key=key, cached=cached)
