"""The admin API's client, for ``recovery-admin``, the lab and the tests: a person's token on
the same transport (and retry rules) as the device client."""

from __future__ import annotations

from typing import Any

from .client import HttpClient


class AdminClient(HttpClient):
    def __init__(self, base_url: str, token: str | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self.token = token

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        """``method`` on ``/v1/admin`` + ``path`` with this person's token (or ``token``, for a
        caller acting for several people); the answer's JSON."""
        return await self._request(
            method, "/v1/admin" + path, json_body=body, token=token or self.token or ""
        )
