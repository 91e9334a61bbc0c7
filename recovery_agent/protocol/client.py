"""HTTP clients for the recovery server: the one transport with its retry rules, and the
device API on it (``DeviceClient``); the admin API's client (``admin.AdminClient``) uses the
same transport.

Transient trouble (connection refused or reset, timeouts, 5xx, 429) is retried with tenacity:
exponential backoff with full jitter, bounded in attempts and total time, because a recovery
environment often comes up before the network or the server is reachable. A ``Retry-After``
on a 429 or 503 answer is honoured: the next attempt waits at least that long, and if that is
beyond what is left of the retry budget the client gives up at once (``ServerBusy``) instead of
knocking again early. Any other 4xx answer is the server refusing this request: retrying cannot
help, so it is raised at once with the server's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from .envelope import strict_json_loads
from .errors import ProtocolError
from .wire import Challenge, DiagnosticsReceipt, DirectivePoll, KeyAnswer

log = logging.getLogger("recovery_agent.protocol.client")


class ServerUnreachable(ProtocolError):
    """Raised when the server could not be reached within the retry budget."""


class ServerBusy(ServerUnreachable):
    """Raised when the server asked to wait (429 or 503 with ``Retry-After``) longer than is left
    of the retry budget; ``retry_after_s`` says how long it asked for."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServerRefused(ProtocolError):
    """Raised when the server answered 4xx: this request will not succeed as it is."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server refused ({status}): {message}")
        self.status = status
        self.message = message


class UnexpectedAnswer(ProtocolError):
    """Raised when the server's answer is not the JSON object its API promises: the URL may
    not point at a recovery server."""


class _Transient(Exception):
    def __init__(self, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# A Retry-After longer than this is not believed (it would park a device for a day).
MAX_RETRY_AFTER_S = 3600.0


def retry_after(value: str | None) -> float:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date); 0 when
    absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    if value.isascii() and value.isdigit():  # (isdigit alone takes "¹", which float refuses)
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        return 0.0
    return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), MAX_RETRY_AFTER_S)


@dataclass
class RetryPolicy:
    attempts: int = 8
    max_delay_s: float = 120.0
    backoff_max_s: float = 16.0
    backoff_multiplier_s: float = 0.5


class _AskedBeyondBudget(stop_base):
    """Stop retrying when the server's Retry-After reaches past the retry budget's end."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.fired = False

    def __call__(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        asked = exc.retry_after_s if isinstance(exc, _Transient) else 0.0
        self.fired = asked > self.budget_s - (state.seconds_since_start or 0.0)
        return self.fired


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("server not answering (attempt %d): %s; retrying", state.attempt_number, exc)


class HttpClient:
    """One session to one server, every request under the same retry policy. Use as
    ``async with``; subclasses name the API's calls."""

    def __init__(
        self,
        base_url: str,
        *,
        retry: RetryPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._session = session
        self._own_session = session is None
        self._timeout_s = timeout_s
        self._sleep = sleep  # how the client waits between attempts (a test records it)

    async def __aenter__(self) -> Self:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        json_body: Any = None,
        token: str | None = None,
        params: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        assert self._session is not None, f"use `async with {type(self).__name__}(...)`"
        session = self._session
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._timeout_s)
        url = self.base_url + path

        async def once() -> Any:
            try:
                async with session.request(
                    method, url, data=data, json=json_body, headers=headers, params=params, timeout=timeout
                ) as resp:
                    body = await resp.read()
                    if resp.status >= 500 or resp.status == 429:
                        raise _Transient(
                            f"{resp.status} from {url}", retry_after(resp.headers.get("Retry-After"))
                        )
                    if resp.status >= 400:
                        try:
                            message = strict_json_loads(body).get("error", body.decode()[:500])
                        except Exception:
                            message = body.decode(errors="replace")[:500]
                        raise ServerRefused(resp.status, message)
                    return strict_json_loads(body) if body else None
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise _Transient(f"{type(exc).__name__}: {exc}") from exc

        p = self.retry
        backoff = wait_random_exponential(multiplier=p.backoff_multiplier_s, max=p.backoff_max_s)

        def asked_to_wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return exc.retry_after_s if isinstance(exc, _Transient) else 0.0

        def wait(state: RetryCallState) -> float:
            return max(backoff(state), asked_to_wait(state))

        too_long_to_wait = _AskedBeyondBudget(p.max_delay_s)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(lambda e: isinstance(e, _Transient)),
                wait=wait,
                stop=stop_any(
                    stop_after_attempt(p.attempts), stop_after_delay(p.max_delay_s), too_long_to_wait
                ),
                before_sleep=_log_retry,
                sleep=self._sleep,
                reraise=True,
            ):
                with attempt:
                    return await once()
        except _Transient as exc:
            if too_long_to_wait.fired:
                raise ServerBusy(
                    f"{self.base_url} asks to wait {exc.retry_after_s:.0f} s ({exc}), longer than this "
                    "client's retry budget: try again later",
                    exc.retry_after_s,
                ) from None
            raise ServerUnreachable(
                f"{self.base_url} not reachable after {p.attempts} attempts ({exc}): check the "
                "network, and the server URL (recovery-admin --server, or server_url in the "
                "agent settings)"
            ) from None


def _object(answer: Any, what: str) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise UnexpectedAnswer(
            f"the answer to {what} is not a JSON object: check that the server URL points at a "
            "recovery server"
        )
    return answer


class DeviceClient(HttpClient):
    """The device API: what a recovery agent (and the OS's health report) calls."""

    async def server_key(self) -> dict[str, str]:
        return _object(await self._request("GET", "/v1/server-key"), "GET /v1/server-key")

    async def enroll(self, envelope: bytes) -> dict[str, Any]:
        return _object(await self._request("POST", "/v1/enroll", data=envelope), "POST /v1/enroll")

    async def challenge(self, device_id: str) -> Challenge:
        return Challenge.model_validate(
            await self._request("POST", "/v1/challenge", json_body={"device_id": device_id})
        )

    async def send_diagnostics(self, envelope: bytes) -> DiagnosticsReceipt:
        return DiagnosticsReceipt.model_validate(
            await self._request("POST", "/v1/diagnostics", data=envelope)
        )

    async def poll_directive(self, receipt: DiagnosticsReceipt, wait_s: float) -> DirectivePoll:
        return DirectivePoll.model_validate(
            await self._request(
                "GET",
                f"/v1/reports/{receipt.report_id}/directive",
                token=receipt.poll_token,
                params={"wait": f"{wait_s:.1f}"},
                timeout_s=wait_s + 30,
            )
        )

    async def send_result(self, envelope: bytes) -> dict[str, Any]:
        return _object(await self._request("POST", "/v1/results", data=envelope), "POST /v1/results")

    async def send_health(self, envelope: bytes) -> dict[str, Any]:
        return _object(await self._request("POST", "/v1/health", data=envelope), "POST /v1/health")

    async def escrow_key(self) -> dict[str, Any]:
        """The server's escrow public key, as a signed EscrowKey envelope (verify it)."""
        return _object(await self._request("GET", "/v1/escrow-key"), "GET /v1/escrow-key")

    async def send_escrow(self, envelope: bytes) -> dict[str, Any]:
        return _object(await self._request("POST", "/v1/escrow", data=envelope), "POST /v1/escrow")

    async def request_disk_key(self, envelope: bytes) -> KeyAnswer:
        return KeyAnswer.model_validate(await self._request("POST", "/v1/disk-key", data=envelope))
