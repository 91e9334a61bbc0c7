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

Every number a device sends is bounded (``COUNTER_MAX``, the largest a server's 32-bit
counter column holds): a grubenv counter of twenty digits is clamped by the agent and refused
here, never stored. A directive lives at most ``MAX_DIRECTIVE_LIFETIME`` from its issue.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from .limits import COUNTER_MAX as COUNTER_MAX

_PREFIX = "application/vnd.recovery."

# COUNTER_MAX (limits.py): the largest counter a device may report; re-exported here.
# A file size: the largest whole number JSON carries exactly (2**53 - 1, 8 PiB), which is also
# the most the server's strict JSON reader accepts (protocol/envelope.py).
SIZE_MAX = 2**53 - 1
# From issued_at to expires_at. The server issues directives for an hour (its setting); a
# directive that claims to live longer than this is refused wherever it is read.
MAX_DIRECTIVE_LIFETIME = timedelta(hours=24)
# Where the known-good driver versions live on the OS root (<driver>/<version>/<driver>.ko):
# the only place a restore_file action may copy from.
DRIVER_STORE = "var/lib/driver-store"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PathRuleError(ValueError):
    """Raised when a path named in a message could escape the OS root it is meant for."""


# A plain relative path: components of no NUL or slash, none of them "." or "..".
_PLAIN_PATH = re.compile(r"(?!\.\.?(?:/|\Z))[^/\x00]+(?:/(?!\.\.?(?:/|\Z))[^/\x00]+)*\Z")


def check_relative_path(path: str) -> str:
    """Accept only a plain relative path: no absolute start, no ``..`` or ``.`` part, no NUL.

    The agent checks again while it walks the path (symlinks, mount points); this check makes
    a bad path fail where it is written, at the admin's desk, rather than on a device.
    """
    if _PLAIN_PATH.match(path):
        return path
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


# The same rule as a pattern pydantic checks in its own regex engine, for the paths a report
# lists (thousands of them): no Python call per path. A component is anything of no slash or
# NUL but "." and "..". protocol/errors.py turns a mismatch into check_relative_path's words.
_PATH_PART = r"(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)"
REPORTED_PATH_PATTERN = rf"^{_PATH_PART}(?:/{_PATH_PART})*$"

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
DeviceId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Nonce = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{22,128}$")]
PATH_MAX = 1024  # characters in a path relative to the OS root
RelPath = Annotated[str, StringConstraints(max_length=PATH_MAX), AfterValidator(check_relative_path)]
ReportedPath = Annotated[str, StringConstraints(max_length=PATH_MAX, pattern=REPORTED_PATH_PATTERN)]
ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Counter = Annotated[int, Field(ge=0, le=COUNTER_MAX)]


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
    AGENT_ERROR = "agent_error"  # the recovery agent itself failed; the title says where


# The longest each field of a crash signature may be, in characters (the agent fits what its
# parser found to these before it builds one).
TITLE_MAX = 512
FRAME_MAX = 256
MODULE_MAX = 64
SOURCE_MAX = 256
EXCERPT_MAX = 16384


class CrashSignature(WireModel):
    """What crashed, normalised so that the same bug on many machines gives the same ``id``."""

    kind: CrashKind
    title: Annotated[str, StringConstraints(max_length=TITLE_MAX)]
    guilty_frame: Annotated[str, StringConstraints(max_length=FRAME_MAX)] | None = None
    guilty_module: Annotated[str, StringConstraints(max_length=MODULE_MAX)] | None = None
    channel_file: Annotated[str, StringConstraints(max_length=PATH_MAX)] | None = None
    source: Annotated[str, StringConstraints(max_length=SOURCE_MAX)] = ""
    excerpt: Annotated[str, StringConstraints(max_length=EXCERPT_MAX)] = ""
    # The report was cut short or garbled (no call trace, a frame missing): the title is the
    # best the rules could make of it, and says so here rather than in the title.
    corrupted: bool = False
    # The version of the rules that made this signature (``crashreport.RULES_VERSION``); 0 for
    # agents from before signatures carried it. The server re-derives a signature made by
    # other rules from its excerpt, so agents of every version group into the same incidents.
    rules_version: int = Field(default=0, ge=0, le=1_000_000)

    @property
    def id(self) -> str:
        """Stable across machines: the normalised title alone, nothing per-machine (an oops
        record and the panic record of the same crash share it)."""
        return sha256_hex(self.title.encode())[:16]


class FileRecord(WireModel):
    path: ReportedPath
    size: int = Field(ge=0, le=SIZE_MAX)
    mtime: float
    sha256: Sha256Hex
    version: Annotated[str, StringConstraints(max_length=64)] | None = None


class BootRecord(WireModel):
    """One boot the agent knows of, from GRUB's environment and the pstore records."""

    index: Counter
    outcome: Literal["crashed", "hung", "healthy", "unknown"]
    detail: Annotated[str, StringConstraints(max_length=512)] = ""


class BootState(WireModel):
    boot_count: Counter
    boot_limit: int = Field(ge=1, le=COUNTER_MAX)
    recovery_attempts: Counter = 0
    # The agent's limit: at this attempt without a fix the machine needs a person.
    max_recovery_attempts: int = Field(ge=1, le=COUNTER_MAX, default=3)
    # The last boots only: a boot_count of millions is one number, not millions of records.
    history: list[BootRecord] = Field(default=[], max_length=64)


class SystemInfo(WireModel):
    os_release: Annotated[str, StringConstraints(max_length=256)] = ""
    kernel_version: Annotated[str, StringConstraints(max_length=128)] = ""
    hostname: Annotated[str, StringConstraints(max_length=255)] = ""


NOTE_MAX = 512  # characters in one note of a report
NOTES_MAX = 64  # notes in one report


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
    # What the agent cut or left out to stay within these limits, or could not do, one line
    # each (e.g. "channel_files: 5000 found, 1000 listed (most recently changed first)").
    notes: list[Annotated[str, StringConstraints(max_length=NOTE_MAX)]] = Field(
        default=[], max_length=NOTES_MAX
    )


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


def check_driver_store_path(path: str) -> str:
    """Accept only a path inside the driver store: a restore puts back a kept driver version,
    never an arbitrary file of the OS (``etc/shadow`` copied over a module)."""
    if not path.startswith(DRIVER_STORE + "/"):
        raise PathRuleError(
            f"restore_file source {path!r} is not in the driver store: name a kept version, "
            f"{DRIVER_STORE}/<driver>/<version>/<driver>.ko"
        )
    return path


class RestoreFile(WireModel):
    """Put the driver store's copy ``source`` (hashing to ``sha256``) at ``path``; the file that
    was at ``path`` goes to quarantine first. ``source`` must be in the driver store."""

    type: Literal["restore_file"] = "restore_file"
    path: RelPath
    source: Annotated[RelPath, AfterValidator(check_driver_store_path)]
    sha256: Sha256Hex


class DisableDriver(WireModel):
    """Stop a kernel module from loading at boot (a modprobe.d ``blacklist`` entry)."""

    type: Literal["disable_driver"] = "disable_driver"
    name: ModuleName


class RecoveryTest(WireModel):
    """Test mode's only action (``recovery-agent test-mode``): the agent writes a record of
    the test into its own state folder on the OS disk, and changes nothing else. The server
    makes it for a device's test visit only (a remediation cannot hold it), and an agent
    applies it only on a test visit it armed itself, and nothing else on one."""

    type: Literal["recovery_test"] = "recovery_test"
    test_id: Identifier


Action = Annotated[QuarantineFile | RestoreFile | DisableDriver | RecoveryTest, Field(discriminator="type")]
# What a remediation may do to a machine (a recovery test's action is the server's alone).
REMEDIATION_ACTIONS = ("quarantine_file", "restore_file", "disable_driver")


def check_path_pattern(pattern: str) -> str:
    """A known-bad rule's path pattern: a relative path in which ``*``, ``?`` and ``[...]``
    match as in ``fnmatch`` (``*`` also across ``/``); the same rules as a path otherwise."""
    check_relative_path(pattern)
    return pattern


class KnownBadRule(WireModel):
    """Content known to be bad (CrowdStrike's "known-bad" list; QMR's auto remediation): a
    file whose path relative to the OS root matches ``path_pattern`` and whose content hashes
    to ``sha256``. The fix is to quarantine that file. Approved M of N like a remediation,
    each approver signing a ``RuleApproval`` of exactly this rule; a directive made from it
    carries the rule and those signatures, and its actions must follow from the rule."""

    rule_id: Identifier
    title: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    path_pattern: Annotated[str, StringConstraints(max_length=PATH_MAX), AfterValidator(check_path_pattern)]
    sha256: Sha256Hex

    def matches(self, path: str, sha256: str) -> bool:
        return sha256 == self.sha256 and fnmatch.fnmatchcase(path, self.path_pattern)

    def allows(self, action: Any) -> bool:
        """Whether ``action`` follows from this rule: a quarantine of matching content."""
        return isinstance(action, QuarantineFile) and self.matches(action.path, action.sha256)


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
    # Made from a known-bad rule, with no approval of its own: ``approvals`` are then the
    # rule's (RuleApproval envelopes), and every action must follow from the rule.
    rule: KnownBadRule | None = None

    @model_validator(mode="after")
    def _bounded_lifetime(self) -> Self:
        if self.expires_at < self.issued_at:
            raise ValueError(
                f"directive {self.directive_id} expires ({self.expires_at.isoformat()}) before it "
                f"was issued ({self.issued_at.isoformat()})"
            )
        if self.expires_at - self.issued_at > MAX_DIRECTIVE_LIFETIME:
            raise ValueError(
                f"directive {self.directive_id} lives from {self.issued_at.isoformat()} to "
                f"{self.expires_at.isoformat()}, longer than the {MAX_DIRECTIVE_LIFETIME} a "
                f"directive may: the server's directive lifetime must be at most that"
            )
        return self


class RemediationApproval(SignedMessage):
    """A person's own signature on a remediation: its id and the sha256 of its actions
    (``envelope.actions_digest``), signed with that person's key, not the server's."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "remediation-approval.v1+json"

    remediation_id: Identifier
    actions_sha256: Sha256Hex
    approver: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    approved_at: AwareDatetime


class RuleApproval(SignedMessage):
    """A person's own signature on a known-bad rule: its id and the sha256 of the rule
    (``envelope.rule_digest``), signed with that person's key."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "rule-approval.v1+json"

    rule_id: Identifier
    rule_sha256: Sha256Hex
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
    index: Counter
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


INVENTORY_MAX = 3 * 4096  # files in one inventory (drivers, channel files, driver store)


class InventoryUpdate(WireModel):
    """What a healthy device runs (its drivers, channel files and driver store), for the fleet's
    view of which content crashing devices have and healthy ones have not (the server's
    correlation). Whole (``base`` is None: ``files`` is every file), or as the change since the
    inventory the server last stored for this device (``base``: that inventory's digest;
    ``files``: the files added or changed, ``removed``: the paths gone). ``digest`` is the
    whole inventory's after the change (:func:`inventory_digest`), so the server can tell when
    it and the device disagree, and asks for the whole again."""

    base: Sha256Hex | None = None
    digest: Sha256Hex
    files: list[FileRecord] = Field(default=[], max_length=INVENTORY_MAX)
    removed: list[RelPath] = Field(default=[], max_length=INVENTORY_MAX)


def inventory_digest(files: Iterable[tuple[str, str]]) -> str:
    """The digest of an inventory: sha256 over its (path, sha256) pairs, sorted, one per line.
    Sizes and times are left out: a file touched but unchanged is the same content."""
    h = hashlib.sha256()
    for path, sha256 in sorted(files):
        h.update(f"{path}\0{sha256}\n".encode())
    return h.hexdigest()


class Health(SignedMessage):
    """Sent by the OS after its health check passed: the proof that a remediation worked, and
    (since the fleet-intelligence work) what the device runs."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "health.v1+json"

    device_id: DeviceId
    directive_id: Identifier | None = None
    boot_id: Annotated[str, StringConstraints(max_length=64)]
    kernel_version: Annotated[str, StringConstraints(max_length=128)] = ""
    created_at: AwareDatetime
    inventory: InventoryUpdate | None = None


# --------------------------------------------------------------------------- encrypted disks

X25519Key = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
SealedText = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]+={0,2}$", max_length=2048)]


class EscrowKey(SignedMessage):
    """The server's escrow public key (X25519), signed by its directive key: a device seals
    its disk's recovery key to it (``sealing.seal``); the private half lives apart from the
    database (``escrow.key`` in the data directory)."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "escrow-key.v1+json"

    public_key: X25519Key
    created_at: AwareDatetime


class KeyEscrow(SignedMessage):
    """A device escrows its disk's recovery key (the LUKS keyslot ``slot`` it added for QMR),
    sealed to the server's escrow key for context ``escrow|<device>|<slot>``. ``tpm_sealed``:
    the device key that signs this is sealed in a TPM, so a stolen disk cannot sign for it
    (only then may the server release the key with no person)."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "key-escrow.v1+json"

    device_id: DeviceId
    slot: int = Field(ge=0, le=31)
    sealed: SealedText
    escrow_key: X25519Key
    tpm_sealed: bool = False
    created_at: AwareDatetime


def escrow_context(device_id: str, slot: int) -> bytes:
    return f"escrow|{device_id}|{slot}".encode()


class KeyRequest(SignedMessage):
    """The recovery environment asks for its disk's key: a fresh challenge (no replay), the
    report of this recovery visit (failed boots, reported), and an ephemeral X25519 key the
    answer is sealed to (nothing on the wire or in a log can open it)."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "key-request.v1+json"

    device_id: DeviceId
    server_nonce: Nonce
    report_id: Identifier
    ephemeral_key: X25519Key
    created_at: AwareDatetime


class KeyRelease(SignedMessage):
    """The server's answer to a ``KeyRequest``: the recovery key sealed to the request's
    ephemeral key for context ``release|<device>|<request sha256>``, signed by the server's
    directive key."""

    PAYLOAD_TYPE: ClassVar[str] = _PREFIX + "key-release.v1+json"

    device_id: DeviceId
    request_sha256: Sha256Hex
    key_id: Identifier
    slot: int = Field(ge=0, le=31)
    sealed: SealedText
    issued_at: AwareDatetime


def release_context(device_id: str, request_sha256: str) -> bytes:
    return f"release|{device_id}|{request_sha256}".encode()


class KeyAnswer(WireModel):
    """``POST /v1/disk-key``: ``released`` (``envelope``: a signed KeyRelease), or ``pending``
    (a person must approve this release: ask again). Refusals are HTTP errors that say why."""

    status: Literal["released", "pending"]
    release_id: str
    envelope: dict[str, Any] | None = None
