"""Scenario files (``images/scenarios/<name>.toml``): what to break in an image, and what a
run of it should show.

A scenario changes only the OS root (partition 2): it adds, replaces, corrupts or removes
files and may add kernel arguments. A file's bytes come from the lab (``channel:bad-291``,
``sensor:2.0``), from the scenario (``content``), or from the user's own file
(``source = "file:PATH"``, relative to the scenario file's folder): a vendor breaks an image
with their own driver or content. Its ``expect`` block is what the lab's tests check a run
against. The format is documented for users in ``images/scenarios/README.md``.

:func:`load_scenario` is the one reader: it validates with pydantic and turns every problem
into a :class:`ScenarioError` that names the file, the field and the fix.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recovery_agent.digest import sha256_bytes
from recovery_agent.layout import CHANNEL_DIR

from .errors import LabError

# Artifacts the builder can place in an image (``source = "..."``); made by build/osroot.py.
SOURCES: dict[str, str] = {
    "channel:good-291": "valid channel file 291 (20-field template, 20 fields)",
    "channel:good-290": "valid channel file 290 (20-field template, 20 fields)",
    "channel:bad-291": "the CrowdStrike-shaped channel file 291 (21-field template, 20 fields)",
    "sensor:1.0": "the sensor driver 1.0 (known good)",
    "sensor:2.0": "the sensor driver 2.0 (crashes at init in sensor_v2_init_tables)",
}

FILE_PREFIX = "file:"
# A file source goes whole into the OS partition (a few hundred MiB): larger is a mistake.
FILE_SOURCE_MAX = 64 * 1024 * 1024

_KERNEL_ARG_RE = re.compile(r"^[A-Za-z0-9_.,:/=+-]+$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")

_HINTS: dict[str, str] = {
    "name": "use lowercase letters, digits and '-', the same as the file name without .toml",
    "action": "use one of add, replace, corrupt, remove",
    "source": "use one of "
    + ", ".join(SOURCES)
    + ", or file:PATH (your own file, relative to the scenario file)",
    "path": "give a path inside the OS root without a leading '/' or '..', "
    f"e.g. {CHANNEL_DIR}/C-00000291-00000000-00000032.sys",
    "kernel_args": "give a list of plain words such as \"sensor.hang=1\" (no quotes, spaces or '$')",
    "ends_in": 'use "healthy" or "recovery"',
    "mode": 'give an octal string such as "0644" or "0755"',
}


class ScenarioError(LabError):
    """Raised when a scenario file cannot be read or is invalid; the message names the file,
    the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileChange(_Strict):
    """One change to the OS root."""

    path: str
    action: Literal["add", "replace", "corrupt", "remove"]
    source: str | None = None
    content: str | None = None
    mode: str | None = None

    @field_validator("path")
    @classmethod
    def _relative_path(cls, value: str) -> str:
        p = PurePosixPath(value)
        if not value or p.is_absolute() or ".." in p.parts or value != str(p):
            raise ValueError(f"{value!r} is not a plain relative path")
        return value

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str | None) -> str | None:
        if value is None or value in SOURCES:
            return value
        if value.startswith(FILE_PREFIX):
            if not value.removeprefix(FILE_PREFIX).strip():
                raise ValueError(f"{value!r} names no file")
            return value
        raise ValueError(f"unknown source {value!r}")

    @field_validator("mode")
    @classmethod
    def _octal_mode(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError(f"{value!r} is not an octal mode")
        return value

    @model_validator(mode="after")
    def _data_matches_action(self) -> FileChange:
        has_data = (self.source is not None) + (self.content is not None)
        if self.action in ("add", "replace") and has_data != 1:
            raise ValueError(f"action {self.action!r} needs exactly one of source or content")
        if self.action in ("corrupt", "remove") and has_data:
            raise ValueError(f"action {self.action!r} takes no source or content")
        return self

    @property
    def file_mode(self) -> int:
        return int(self.mode, 8) if self.mode else 0o644


class Expect(_Strict):
    """What a run of the scenario should show (checked by the lab's tests)."""

    ends_in: Literal["healthy", "recovery"]
    panics: int = Field(0, ge=0, description="kernel panics before the end")
    resets: int = Field(0, ge=0, description="watchdog resets before the end")
    panic_module: str | None = None
    panic_function: str | None = None
    panic_reason: str | None = None
    console: list[str] = Field(default_factory=list, description="lines that must appear")


class Scenario(_Strict):
    """A validated scenario file."""

    name: str
    description: str
    kernel_args: list[str] = Field(default_factory=list)
    files: list[FileChange] = Field(default_factory=list)
    expect: Expect
    # Filled by load_scenario, not read from the file.
    source_path: str = Field("", exclude=True)
    source_sha256: str = Field("", exclude=True)
    # file: sources -> (absolute path, sha256 when the scenario was read)
    local_files: dict[str, tuple[str, str]] = Field(default_factory=dict, exclude=True)

    @property
    def build_sha256(self) -> str:
        """What a built image of this scenario depends on: the scenario file, and the
        content of each ``file:`` source (the scenario file's own hash when it has none)."""
        if not self.local_files:
            return self.source_sha256
        parts = [self.source_sha256] + [f"{src}={sha}" for src, (_, sha) in sorted(self.local_files.items())]
        return sha256_bytes("\n".join(parts).encode())

    def file_source(self, source: str) -> bytes:
        """The bytes of a ``file:`` source, as they were when the scenario was read."""
        path, sha = self.local_files[source]
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ScenarioError(
                f"{self.source_path}: source {source!r}: cannot read {path}: {exc.strerror}"
            ) from None
        if sha256_bytes(data) != sha:
            raise ScenarioError(
                f"{self.source_path}: source {source!r}: {path} changed while the image was built: "
                "build again"
            )
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a valid scenario name")
        return value

    @field_validator("kernel_args")
    @classmethod
    def _kernel_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            if not _KERNEL_ARG_RE.match(arg):
                raise ValueError(f"kernel argument {arg!r} has characters GRUB would interpret")
        return value


def _field_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(file)"


def _hint(loc: tuple[int | str, ...], error_type: str) -> str:
    if error_type == "extra_forbidden":
        return "remove it (see images/scenarios/README.md for the fields)"
    if error_type == "missing":
        return "add it (see images/scenarios/README.md)"
    for part in reversed(loc):
        if isinstance(part, str) and part in _HINTS:
            return _HINTS[part]
    return "see images/scenarios/README.md"


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file; raise :class:`ScenarioError` on any problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    for key in ("source_path", "source_sha256"):
        data.pop(key, None)
    try:
        scenario = Scenario.model_validate(
            {**data, "source_path": str(path), "source_sha256": sha256_bytes(raw)}
        )
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: field {_field_name(loc)}: {msg}: {_hint(loc, err['type'])}")
        raise ScenarioError("\n".join(problems)) from None
    local = _local_files(path, scenario)
    if local:
        scenario = scenario.model_copy(update={"local_files": local})
    if scenario.name != path.stem:
        raise ScenarioError(
            f"{path}: field name: {scenario.name!r} differs from the file name: "
            f"rename the file to {scenario.name}.toml or set name = {path.stem!r}"
        )
    return scenario


def _local_files(path: Path, scenario: Scenario) -> dict[str, tuple[str, str]]:
    """Each ``file:`` source resolved against the scenario file's folder, checked and hashed
    (a file changed later makes a new image, never a stale cached one)."""
    out: dict[str, tuple[str, str]] = {}
    for i, change in enumerate(scenario.files):
        source = change.source or ""
        if not source.startswith(FILE_PREFIX) or source in out:
            continue
        where = f"{path}: field files[{i}].source: {source!r}"
        local = (path.parent / source.removeprefix(FILE_PREFIX)).resolve()
        try:
            size = local.stat().st_size
            if not local.is_file():
                raise ScenarioError(f"{where}: {local} is not a regular file: name a file")
            if size > FILE_SOURCE_MAX:
                raise ScenarioError(
                    f"{where}: {local} is {size} bytes, over the {FILE_SOURCE_MAX >> 20} MiB "
                    "a source may be: name a smaller file"
                )
            out[source] = (str(local), sha256_bytes(local.read_bytes()))
        except OSError as exc:
            raise ScenarioError(
                f"{where}: cannot read {local}: {exc.strerror}: "
                "paths are relative to the scenario file's folder"
            ) from None
    return out


def scenarios_dir(images: Path) -> Path:
    return images / "scenarios"


def find_scenario(name_or_path: str, images: Path) -> Path:
    """A scenario name (``channel-file``) or a path to a ``.toml`` file -> the file's path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return Path(name_or_path)
    path = scenarios_dir(images) / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in scenarios_dir(images).glob("*.toml")))
        raise ScenarioError(
            f"no scenario {name_or_path!r}: use one of {known}, or give the path of a .toml file"
        )
    return path


def all_scenarios(images: Path) -> list[Path]:
    return sorted(scenarios_dir(images).glob("*.toml"))
