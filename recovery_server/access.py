"""Who may do what on the recovery server: the one place that decides.

- Roles are ordered, viewer < operator < approver < admin; a role may do everything the
  roles below it may.
- A ``User`` is a person acting: on the admin API, known by their token
  (``users.authenticate``), or at the server's console (``console``): whoever can read the
  data directory holds the database and the signing key, so acts as an admin.
- ``NEEDS`` is the table of which admin operation needs which role. Every admin method of
  the service calls ``require(user, operation)`` first; the HTTP layer only says who is asking.
- Whatever their role, the author of a remediation never counts as one of its approvers
  (``require_not_author``): a fix needs a second pair of eyes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import get_args

from recovery_agent.protocol.admin import Role

from .errors import Forbidden

ROLES: tuple[Role, ...] = get_args(Role)  # in order: each may do what those before it may


@dataclass(frozen=True)
class User:
    """A person acting on the admin API (or at the server's console)."""

    name: str
    role: Role


class Operation(Enum):
    """What a person does through the admin API; the value says it in words."""

    READ_FLEET = "see devices, incidents, suggested fixes, remediations and rollouts"
    READ_AUDIT_LOG = "read and verify the audit log"
    READ_METRICS = "read the server's metrics (/metrics)"
    REGISTER_OWN_KEY = "register your own approval key"
    WRITE_REMEDIATION = "write a remediation"
    SET_ROLLOUT = "set a rollout"
    PAUSE_ROLLOUT = "pause a rollout"
    APPROVE_REMEDIATION = "approve a remediation"
    REVOKE_REMEDIATION = "revoke a remediation"
    RESUME_ROLLOUT = "resume a rollout"
    REVOKE_ROLLOUT = "revoke a rollout"
    ADD_USER = "add a person"
    MAKE_ENROLLMENT_TOKEN = "make a fleet enrollment token"
    READ_ENROLLMENT_TOKENS = "see the enrollment tokens"
    REVOKE_ENROLLMENT_TOKEN = "revoke an enrollment token"
    REVOKE_DEVICE = "revoke a device"
    REPLACE_DEVICE_KEY = "replace a device's key"
    REQUEST_RECOVERY_TEST = "ask a device to test its recovery path"
    RELEASE_DISK_KEY = "approve, refuse or revoke the release of a device's disk key"
    PRUNE_OLD_DATA = "delete old reports and spent challenges (retention)"


NEEDS: dict[Operation, Role] = {
    Operation.READ_FLEET: "viewer",
    Operation.READ_AUDIT_LOG: "viewer",
    Operation.READ_METRICS: "viewer",
    Operation.REGISTER_OWN_KEY: "viewer",
    Operation.WRITE_REMEDIATION: "operator",
    Operation.SET_ROLLOUT: "operator",
    Operation.PAUSE_ROLLOUT: "operator",  # stopping is always safe
    # A test changes nothing on the OS; it costs the device one trip to recovery at its next boot.
    Operation.REQUEST_RECOVERY_TEST: "operator",
    Operation.APPROVE_REMEDIATION: "approver",
    Operation.REVOKE_REMEDIATION: "approver",
    Operation.RESUME_ROLLOUT: "approver",  # resuming a halted wave overrides the automatic halt
    Operation.REVOKE_ROLLOUT: "approver",
    # Opening a machine's disk is an approver's word, like a fix.
    Operation.RELEASE_DISK_KEY: "approver",
    Operation.ADD_USER: "admin",
    Operation.MAKE_ENROLLMENT_TOKEN: "admin",
    Operation.READ_ENROLLMENT_TOKENS: "admin",
    Operation.REVOKE_ENROLLMENT_TOKEN: "admin",
    # Who may speak for a device is the admin's: a device's key decides whose reports count.
    Operation.REVOKE_DEVICE: "admin",
    Operation.REPLACE_DEVICE_KEY: "admin",
    Operation.PRUNE_OLD_DATA: "admin",
}


def console(name: str) -> User:
    """The person at the server's console (``recovery-server init``, ``user-add``, a lab or
    test that runs the service in process), named ``name`` in the audit log."""
    return User(name, "admin")


def may(user: User, operation: Operation) -> bool:
    return ROLES.index(user.role) >= ROLES.index(NEEDS[operation])


def require(user: User, operation: Operation) -> None:
    """Raise Forbidden unless ``user``'s role may do ``operation``."""
    if not may(user, operation):
        raise Forbidden(
            f"{user.name} is {user.role}; this needs the {NEEDS[operation]} role or higher "
            f"(to {operation.value})"
        )


def require_not_author(user: User, author: str, remediation_id: str) -> None:
    """Raise Forbidden if ``user`` wrote the remediation they are about to approve."""
    if user.name == author:
        raise Forbidden(f"{user.name} wrote {remediation_id} and cannot approve it: another approver must")
