"""The recovery environment's Python runtime (recovery_lab.pyruntime): one real build (cached
under the lab's cache), then checks on the tree, including running it under chroot.

Needs root (chroot) and, for the first build only, apt and PyPI; skipped with the reason when
either is missing."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from recovery_lab import tools
from recovery_lab.pyruntime import (
    PYTHON,
    SITE,
    STDLIB,
    RuntimeArtifact,
    RuntimeBuildError,
    build_python_runtime,
)
from recovery_lab.reproducible import EPOCH

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QMR_CACHE", REPO / ".cache/qmr"))

pytestmark = pytest.mark.timeout(600)


def _network_failure(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, tools.ToolFailed) and (cause.cmd[0] == "apt-get" or "pip" in cause.cmd[:4])


@pytest.fixture(scope="module")
def runtime() -> RuntimeArtifact:
    if os.geteuid() != 0:
        pytest.skip("building the runtime needs root (it checks the tree under chroot)")
    try:
        return build_python_runtime(CACHE, progress=lambda line: None)
    except RuntimeBuildError as exc:
        if _network_failure(exc):
            pytest.skip(f"apt or PyPI unreachable: {exc}")
        raise


def _chroot_python(root: Path, code: str) -> subprocess.CompletedProcess[str]:
    chroot = tools.which("chroot")
    assert chroot
    return subprocess.run(
        ["env", "-i", chroot, str(root), "/" + PYTHON, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tree_holds_interpreter_agent_and_dependencies(runtime: RuntimeArtifact) -> None:
    root = runtime.root
    assert runtime.python == PYTHON and (root / PYTHON).is_file()
    assert (root / "lib64/ld-linux-x86-64.so.2").is_file()
    site = root / SITE
    for package in (
        "aiohttp",
        "cryptography",
        "pydantic",
        "pydantic_core",
        "tenacity",
        "multidict",
        "yarl",
        "_cffi_backend.cpython-311-x86_64-linux-gnu.so",
    ):
        assert (site / package).exists(), package
    assert (site / "recovery_agent/agent.py").is_file()  # the agent keeps its sources
    assert (site / "recovery_agent/__pycache__").is_dir()
    assert not (site / "recovery_server").exists() and not (site / "recovery_lab").exists()
    assert runtime.files > 100 and runtime.size_bytes > 10_000_000
    assert runtime.manifest.is_file()


def test_pruned_and_no_host_configuration(runtime: RuntimeArtifact) -> None:
    root = runtime.root
    stdlib = root / STDLIB
    for gone in (
        "test",
        "tkinter",
        "idlelib",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "distutils",
        "sqlite3",
        "unittest",
        "sitecustomize.py",
    ):
        assert not (stdlib / gone).exists() and not (stdlib / gone).is_symlink(), gone
    assert not list(root.rglob("distutils-precedence.pth"))
    assert not list(root.rglob("pyvenv.cfg"))
    assert not list(root.rglob("*.a")) and not list(stdlib.glob("config-3.11*"))
    assert not [p for p in root.rglob("__pycache__") if "recovery_agent" not in p.parts]
    # Sourceless stdlib: os.pyc is the landmark that tells the interpreter its prefix.
    assert (stdlib / "os.pyc").is_file() and not (stdlib / "os.py").exists()
    for pth in root.rglob("*.pth"):
        for line in pth.read_text().splitlines():
            assert not line.startswith("/") or line.startswith("/usr/lib/python3"), (pth, line)


def test_no_build_machine_path_in_any_file(runtime: RuntimeArtifact) -> None:
    """Not in .pth files, sysconfig data or code objects' file names: no file names this
    checkout, the cache, this venv or the interpreter the venv was made from."""
    needles = {str(REPO), str(CACHE.resolve()), sys.prefix}
    if sys.base_prefix not in ("/usr", "/usr/local"):
        needles.add(sys.base_prefix)
    encoded = [n.encode() for n in needles]
    offenders = []
    for path in runtime.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            offenders += [(str(path.relative_to(runtime.root)), n) for n in encoded if n in data]
    assert not offenders


def test_pycs_are_unchecked_hash_based(runtime: RuntimeArtifact) -> None:
    pycs = [
        runtime.root / STDLIB / "os.pyc",
        next((runtime.root / SITE / "recovery_agent/__pycache__").glob("agent.*.pyc")),
    ]
    for pyc in pycs:
        flags = struct.unpack("<I", pyc.read_bytes()[4:8])[0]
        assert flags == 0b01, (pyc, flags)  # hash-based, check_source off


def test_fixed_mtimes(runtime: RuntimeArtifact) -> None:
    for path in [runtime.root, *runtime.root.rglob("*")]:
        assert path.lstat().st_mtime == EPOCH, path


def test_runs_the_agent_under_chroot(runtime: RuntimeArtifact) -> None:
    """No host file is visible under chroot: this is the runtime on its own."""
    code = """
import sys
from recovery_agent.protocol.envelope import seal_bytes
from recovery_agent.protocol.keys import SigningKey
from recovery_agent.protocol.wire import Enrollment, utcnow
import recovery_agent.agent, recovery_agent.cli, aiohttp, tenacity
key = SigningKey.generate()
msg = Enrollment(device_id="dev-1", public_key="A" * 43 + "=", enrollment_token="enr_" + "x" * 16,
                 hostname="h", created_at=utcnow())
print(sys.prefix, sys.path[-1], key.key_id[:8], len(seal_bytes(msg, key)) > 0)
"""
    proc = _chroot_python(runtime.root, code)
    assert proc.returncode == 0, proc.stderr
    prefix, last_path, _, sealed = proc.stdout.split()
    assert prefix == "/usr" and last_path == "/usr/lib/python3/dist-packages" and sealed == "True"
    cli = _chroot_python(
        runtime.root,
        "import sys; sys.argv = ['recovery-agent', '--help']; from recovery_agent.cli import main; main()",
    )
    assert cli.returncode == 0 and "enroll" in cli.stdout, cli.stderr


def test_second_build_is_cached(runtime: RuntimeArtifact) -> None:
    lines: list[str] = []
    again = build_python_runtime(CACHE, progress=lines.append)
    assert again.cached and again.key == runtime.key and again.root == runtime.root
    assert any("cached" in line for line in lines)
