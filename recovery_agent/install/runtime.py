"""The agent's own runtime on the machine: a virtual environment on Debian's python3.

Debian 12's ``python3-pydantic`` is 1.10 and its aiohttp and cryptography are older than the
agent's, so the agent never uses the machine's Python packages: it runs from
``/opt/qmr/venv``, made by the machine's own ``python3 -m venv --without-pip`` (no
``python3-venv`` or ``pip`` needed) and filled from the wheels the install carries (no
network on the device). The steps of :func:`install_runtime`:

1. check every wheel fits the machine's Python (``cp311``, ``abi3`` or pure ``py3``);
2. make the venv (it uses ``/usr/bin/python3``, so security updates of Debian's interpreter
   reach the agent) and unpack the wheels into its ``site-packages``;
3. copy the ``recovery_agent`` package (the one running this install) beside them;
4. compile the ``.pyc`` with the machine's interpreter, then import the agent with it: an
   install whose agent cannot start stops here;
5. write the launcher ``/usr/local/sbin/recovery-agent``.

The recovery environment gets the same interpreter and venv (:mod:`~.recoveryenv`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from .manifest import Recorder
from .paths import LAUNCHER, OPT, VENV
from .target import InstallRefused, Target
from .wheel import UnsafeWheel, unpack_wheel

AGENT_PACKAGE = Path(__file__).resolve().parent.parent
IMPORT_CHECK = "import recovery_agent.cli, recovery_agent.agent, recovery_agent.install"

LAUNCHER_SCRIPT = f"""\
#!/bin/sh
# Quick Machine Recovery agent (written by `recovery-agent install`, removed by uninstall):
# Debian's python3 with the agent's own virtual environment in /{VENV}.
exec /{VENV}/bin/python3 -m recovery_agent.cli "$@"
"""

Say = Callable[[str], None]


def _wheel_tags(wheel: Path) -> tuple[str, str]:
    """(python tag, abi tag) of a wheel file name (PEP 427)."""
    parts = wheel.name.removesuffix(".whl").split("-")
    if len(parts) < 5:
        raise InstallRefused(f"{wheel} is not a wheel file name (name-version-python-abi-platform.whl)")
    return parts[-3], parts[-2]


def check_wheels(wheels: list[Path], python_version: str) -> None:
    """Refuse wheels built for another Python than the machine's (``3.11`` -> ``cp311``)."""
    if not wheels:
        raise InstallRefused(
            "no wheels given: pass --wheels DIR with the agent's wheels (aiohttp, cryptography, pydantic, "
            "tenacity and their dependencies) for this machine's Python"
        )
    cp = "cp" + python_version.replace(".", "")
    wrong = []
    for wheel in wheels:
        py, abi = _wheel_tags(wheel)
        tags = py.split(".")
        if not any(
            t == cp or t in ("py3", "py2.py3") or (t.startswith("cp3") and abi == "abi3") for t in tags
        ):
            wrong.append(wheel.name)
    if wrong:
        raise InstallRefused(
            f"wheels not for this machine's Python {python_version}: {', '.join(wrong)}: download them with "
            f"pip download --python-version {python_version} --only-binary=:all:"
        )


def copy_agent(dest: Path, source: Path = AGENT_PACKAGE) -> None:
    """The ``recovery_agent`` package (sources and the install's data files), no caches."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def site_packages(venv: Path, python_version: str) -> Path:
    return venv / "lib" / f"python{python_version}" / "site-packages"


def install_runtime(target: Target, recorder: Recorder, wheels_dir: Path, say: Say) -> str:
    """Make the venv, the agent in it and the launcher (see the module docstring); return
    the machine's Python version."""
    version = target.python_version()
    wheels = sorted(Path(wheels_dir).glob("*.whl"))
    check_wheels(wheels, version)
    recorder.tree(OPT)
    venv = target.path(VENV)
    if venv.exists():
        shutil.rmtree(venv)
    target.run(["/usr/bin/python3", "-m", "venv", "--without-pip", "/" + VENV])
    site = site_packages(venv, version)
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        try:
            unpack_wheel(wheel, site)
        except UnsafeWheel as e:
            raise InstallRefused(str(e)) from None
    copy_agent(site / "recovery_agent")
    python = f"/{VENV}/bin/python3"
    target.run([python, "-m", "compileall", "-q", "-j", "0", str("/" / site.relative_to(target.root))])
    target.run([python, "-I", "-c", IMPORT_CHECK])
    say(f"runtime: /{VENV} on Debian's python{version}, {len(wheels)} wheels and the agent")
    recorder.write(LAUNCHER, LAUNCHER_SCRIPT, 0o755)
    return version


def python_tag(version: str) -> str:
    m = re.fullmatch(r"3\.(\d+)", version)
    return f"cp3{m.group(1)}" if m else version
