"""The recovery server's exceptions: one root, ``ServerError``, for everything this package
raises on purpose, so a caller can tell "the server said no" from a bug.

- ``ServiceError`` and its subclasses: a request the server refuses (one per HTTP status the
  API answers with); the HTTP layer turns them into ``{"error", "code"}`` answers.
- ``StoreError`` (``store.py``): the database cannot be used as it is.
- the command lines' own (``cli.DataDirError``, ``admin_cli.CommandError``): bad local input.

Every message names the thing and the fix.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of every error the recovery server package raises on purpose."""


class ServiceError(ServerError):
    """Raised when the service refuses a request. ``status`` is the HTTP status and ``code`` the
    short name the API answers with."""

    status = 400
    code = "bad_request"


class BadRequest(ServiceError):
    """Raised when a request is malformed or its content breaks a rule (an action the protocol
    cannot express, a badly signed approval)."""

    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    """Raised when the caller is not who it must be: no or an unknown token, an envelope not
    signed by an enrolled key, an unknown or expired challenge."""

    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    """Raised when a known person may not do this (``access.py`` decides)."""

    status, code = 403, "forbidden"


class NotFound(ServiceError):
    """Raised when the device, incident, remediation, rollout or report named does not exist."""

    status, code = 404, "not_found"


class Conflict(ServiceError):
    """Raised when the request does not fit the current state: a replayed nonce, a second
    approval by the same person, a rollout set after the first directive."""

    status, code = 409, "conflict"


class TooManyRequests(ServiceError):
    """Raised when a device sends more messages than its rate limit allows (``limits.py``);
    ``retry_after_s`` says when the next one will be taken (HTTP ``Retry-After``)."""

    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
