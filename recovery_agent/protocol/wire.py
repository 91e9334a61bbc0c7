"""The wire protocol between a device's recovery agent and the recovery server.

Every message a party signs is one of the models below; each carries its own DSSE payload
type (``PAYLOAD_TYPE``), so one kind of message can never be accepted as another. The models
forbid unknown fields and are immutable: what was verified is what the code sees.

The flow, after Quick Machine Recovery:

1. ``Enrollment``: while healthy, the device sends its Ed25519 public key, signed by that key
   (proof of possession) and carrying the fleet's enrollment token.
2. The agent asks for a challenge (a server nonce, plain JSON, unsigned).
3. ``Diagnostics``: the agent reports boot state, crash signature and inventory, carrying the
   server's nonce (no replay) and a fresh nonce of its own.
4. ``Directive``: once a person approved a remediation, the server signs one for this device,
   bound to the agent's nonce, the sha256 of the diagnostics payload it answers and an expiry.
5. ``Result``: the agent reports what it applied; ``Health``: the OS reports its next good boot.

Remediation actions are declarative; there is no way to express a script.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

_PREFIX = "application/vnd.recovery."


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PathRuleError(ValueError):
    """Raised when a path named in a message could escape the OS root it is meant for."""


def check_relative_path(path: str) -> str:
    """Accept only a plain relative path: no absolute start, no ``..`` or ``.`` part, no NUL.

    The agent checks again while it walks the path (symlinks, mount points); this check makes
    a bad path fail where it is written, at the admin's desk, rather than on a device.
    """
    if not path:
        raise PathRuleError("path is empty: name a file relative to the OS root, e.g. var/lib/x")
    if "\x00" in path:
        raise PathRuleError(f"path {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise PathRuleError(
            f"path {path!r} is absolute: write it relative to the OS root (drop the leading /)"
        )
    parts = path.split("/")
    for part in parts:
        if part in ("..", "."):
            raise PathRuleError(f"path {path!r} has a {part!r} component: name the file directly")
        if part == "":
            raise PathRuleError(f"path {path!r} has an empty component (double or trailing /)")
    return path


Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
DeviceId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Nonce = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{22,128}$")]
RelPath = Annotated[str, StringConstraints(max_length=1024), AfterValidator(check_relative_path)]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class WireModel(BaseModel):
    # Every model of the protocol (here and in admin.py) refuses NaN and infinities: a number
    # that JSON cannot carry would be stored, then break every read and answer that includes it.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SignedMessage(WireModel):
    """A message that travels inside a signed envelope."""

    PAYLOAD_TYPE: ClassVar[str]


# --------------------------------------------------------------------------- enrollment


class Enrollment(SignedMessage):
    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "enrollment.v1+json"

    device_id: DeviceId
    public_key: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
    enrollment_token: Annotated[str, StringConstraints(min_length=16, max_length=256)]
    hostname: Annotated[str, StringConstraints(max_length=255)] = ""
    created_at: AwareDatetime


class Challenge(WireModel):
    """The server's nonce, answered to ``POST /v1/challenge``; not signed (it is only a nonce)."""

    nonce: Nonce
    expires_at: AwareDatetime


# --------------------------------------------------------------------------- diagnostics


class CrashKind(str, Enum):
    KERNEL_PANIC = "kernel_panic"  # a panic with an oops behind it, or a bare panic
    OOPS = "oops"  # an oops that did not (or not yet) panic
    HANG = "hang"  # the watchdog reset the machine, or boot never finished
    INIT_DIED = "init_died"  # "Attempted to kill init!"
    UNKNOWN = "unknown"  # boots failed and nothing in the logs says why
    NONE = "none"  # nothing failed (test mode, or a healthy report)


class CrashSignature(WireModel):
    """What crashed, normalised so that the same bug on many machines gives the same ``id``."""

    kind: CrashKind
    title: Annotated[str, StringConstraints(max_length=512)]
    guilty_frame: Annotated[str, StringConstraints(max_length=256)] | None = None
    guilty_module: Annotated[str, StringConstraints(max_length=64)] | None = None
    channel_file: Annotated[str, StringConstraints(max_length=1024)] | None = None
    source: Annotated[str, StringConstraints(max_length=256)] = ""
    excerpt: Annotated[str, StringConstraints(max_length=16384)] = ""

    @property
    def id(self) -> str:
        """Stable across machines: the normalised title alone, nothing per-machine (an oops
        record and the panic record of the same crash share it)."""
        return sha256_hex(self.title.encode())[:16]


class FileRecord(WireModel):
    path: RelPath
    size: int = Field(ge=0)
    mtime: float
    sha256: Sha256Hex
    version: Annotated[str, StringConstraints(max_length=64)] | None = None


class BootRecord(WireModel):
    """One boot the agent knows of, from GRUB's environment and the pstore records."""

    index: int
    outcome: Literal["crashed", "hung", "healthy", "unknown"]
    detail: Annotated[str, StringConstraints(max_length=512)] = ""


class BootState(WireModel):
    boot_count: int = Field(ge=0)
    boot_limit: int = Field(ge=1)
    recovery_attempts: int = Field(ge=0, default=0)
    # The agent's limit: at this attempt without a fix the machine needs a person.
    max_recovery_attempts: int = Field(ge=1, default=3)
    history: list[BootRecord] = []


class SystemInfo(WireModel):
    os_release: Annotated[str, StringConstraints(max_length=256)] = ""
    kernel_version: Annotated[str, StringConstraints(max_length=128)] = ""
    hostname: Annotated[str, StringConstraints(max_length=255)] = ""


class Diagnostics(SignedMessage):
    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "diagnostics.v1+json"

    device_id: DeviceId
    server_nonce: Nonce
    agent_nonce: Nonce
    created_at: AwareDatetime
    agent_version: Annotated[str, StringConstraints(max_length=32)]
    test_mode: bool = False
    boot: BootState
    crash: CrashSignature
    system: SystemInfo
    drivers: list[FileRecord] = Field(default=[], max_length=4096)
    channel_files: list[FileRecord] = Field(default=[], max_length=4096)
    # Known-good driver versions kept on the OS disk, which restore_file can put back.
    driver_store: list[FileRecord] = Field(default=[], max_length=4096)
    recent_changes: list[FileRecord] = Field(default=[], max_length=256)


class DiagnosticsReceipt(WireModel):
    """The server's answer to diagnostics (unsigned): where to wait for a directive."""

    report_id: str
    incident_id: str
    diagnostics_sha256: Sha256Hex
    poll_token: str


# --------------------------------------------------------------------------- directive


class QuarantineFile(WireModel):
    """Move the file at ``path`` to the quarantine folder, if and only if its content hashes to
    ``sha256``. Name patterns alone are never enough: the bad and the fixed channel file 291
    differed only in their timestamp."""

    type: Literal["quarantine_file"] = "quarantine_file"
    path: RelPath
    sha256: Sha256Hex


class RestoreFile(WireModel):
    """Put the driver store's copy ``source`` (hashing to ``sha256``) at ``path``; the file that
    was at ``path`` goes to quarantine first."""

    type: Literal["restore_file"] = "restore_file"
    path: RelPath
    source: RelPath
    sha256: Sha256Hex


class DisableDriver(WireModel):
    """Stop a kernel module from loading at boot (a modprobe.d ``blacklist`` entry)."""

    type: Literal["disable_driver"] = "disable_driver"
    name: ModuleName


Action = Annotated[QuarantineFile | RestoreFile | DisableDriver, Field(discriminator="type")]


class Directive(SignedMessage):
    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "directive.v1+json"

    directive_id: Identifier
    device_id: DeviceId
    agent_nonce: Nonce
    diagnostics_sha256: Sha256Hex
    remediation_id: Identifier
    remediation_title: Annotated[str, StringConstraints(max_length=256)] = ""
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    actions: list[Action] = Field(min_length=1, max_length=64)
    reboot: bool = True
    # The approvers' own signed approvals (RemediationApproval envelopes) of these actions.
    # A device that pins approver keys needs enough of them: the server alone cannot make one.
    approvals: list[dict[str, Any]] = Field(default=[], max_length=16)


class RemediationApproval(SignedMessage):
    """A person's own signature on a remediation: its id and the sha256 of its actions
    (``envelope.actions_digest``), signed with that person's key, not the server's."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "remediation-approval.v1+json"

    remediation_id: Identifier
    actions_sha256: Sha256Hex
    approver: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    approved_at: AwareDatetime


class DirectivePoll(WireModel):
    """The answer to a long poll: ``pending`` (ask again), ``none`` (the server has no fix and
    will not have one for this report), or ``directive`` with the signed envelope."""

    status: Literal["pending", "none", "directive"]
    envelope: dict[str, Any] | None = None
    retry_after_s: float = 0


# --------------------------------------------------------------------------- results


class ActionResult(WireModel):
    index: int
    type: str
    status: Literal["applied", "already_applied", "failed", "skipped", "rolled_back"]
    detail: Annotated[str, StringConstraints(max_length=2048)] = ""


class Result(SignedMessage):
    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "result.v1+json"

    device_id: DeviceId
    directive_id: Identifier
    outcome: Literal["applied", "failed", "rejected"]
    actions: list[ActionResult] = []
    error: Annotated[str, StringConstraints(max_length=4096)] | None = None
    boot_count_reset: bool = False
    created_at: AwareDatetime


class Health(SignedMessage):
    """Sent by the OS after its health check passed: the proof that a remediation worked."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "health.v1+json"

    device_id: DeviceId
    directive_id: Identifier | None = None
    boot_id: Annotated[str, StringConstraints(max_length=64)]
    kernel_version: Annotated[str, StringConstraints(max_length=128)] = ""
    created_at: AwareDatetime
