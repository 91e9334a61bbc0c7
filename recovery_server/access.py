"""Who may do what on the recovery server: the roles and the person acting.

Roles are ordered, viewer < operator < approver < admin; a role may do everything the roles
below it may.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Forbidden

ROLES = ("viewer", "operator", "approver", "admin")


@dataclass(frozen=True)
class User:
    """A person acting on the admin API (or at the server's console)."""

    name: str
    role: str

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def require(user: User, role: str) -> None:
    if not user.can(role):
        raise Forbidden(f"{user.name} is {user.role}; this needs the {role} role or higher")
