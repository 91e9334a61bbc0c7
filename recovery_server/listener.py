"""The listening socket and what it lets in: limits on connections that hold whatever a client
does.

aiohttp parses requests for the server, but (3.14) keeps an idle connection for an hour, puts
no time limit on a request's head or body arriving, and accepts connections until the process
runs out of file descriptors: 300 idle sockets against a 256-descriptor limit made ``/healthz``
time out. ``GuardedRunner`` serves the app under ``ConnectionLimits``:

- ``header_timeout_s``: a request's head (request line and headers) must arrive within this,
  counted from the connection's start, or from the first byte of a following request on a
  kept-alive connection; else the connection is closed.
- ``body_timeout_s``: the body must arrive within this once the head is in; the app reads every
  body under this deadline (``app.py``) and answers 408, then closes the connection.
- ``keepalive_timeout_s``: an idle kept-alive connection is closed after this (aiohttp's own
  timer, set from here).
- ``max_connections``: with this many open, a new connection is answered 503 with Retry-After
  and closed at once, so the process never runs out of descriptors for the connections it has,
  its database and its logs. Set it far above the number of devices that may hold a long poll
  at the same time (each holds one connection for up to a minute); ``fit_open_files`` raises
  the process's descriptor limit to fit it, or lowers it to what the system allows.

What the server does not enforce itself (TLS, limits per client address, request rates from
unauthenticated clients, total bandwidth) belongs to a reverse proxy in front of it:
docs/reverse-proxy.md has an nginx configuration.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .metrics import HttpMetrics

log = logging.getLogger("recovery_server")

# Connections the kernel queues for the server to accept, and (asyncio) the most it accepts in
# one turn of the event loop. A socket refused over the cap holds its descriptor for about
# three turns (accepted, answered 503, closed), so up to three rounds of it may be open above
# ``max_connections`` at once: a backlog of 1024 let 300 queued connections take every
# descriptor in one round. Clients beyond the queue retry their SYN and are let in a moment later.
ACCEPT_BACKLOG = 32

# The kernel's queue of connections waiting to be accepted (``listen``), apart from the burst
# above: a fleet that crashed at once connects at once, and a SYN the queue drops is retried
# only after 1 s, then 3 s, 7 s, 15 s... (10,000 long polls opened in batches of 500 took
# 111 s to all be waiting behind a queue of 32). Queued connections hold no descriptor of
# this process until accepted, ``ACCEPT_BACKLOG`` per turn. Linux caps it at
# net.core.somaxconn (4096 since 5.4).
LISTEN_QUEUE = 4096

# Descriptors kept for what is not a client connection: the database, logs, the listening
# sockets, outgoing connections (about 30), and the accepted sockets not yet closed (three
# rounds of ``ACCEPT_BACKLOG``).
RESERVED_FILES = 128


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 16_000
    header_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    keepalive_timeout_s: float = 75.0
    # How long the rest of a refused or timed-out body is still read, so its client gets the
    # answer before the connection closes (aiohttp's lingering close).
    linger_s: float = 5.0


def fit_open_files(limits: ConnectionLimits) -> ConnectionLimits:
    """Raise this process's open-files limit to fit ``limits.max_connections`` (up to the hard
    limit); if it cannot, lower ``max_connections`` to fit, and say so."""
    want = limits.max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new_soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(1, soft - RESERVED_FILES)
        log.warning(
            "max connections lowered from %d to %d: this process may open %d files (raise "
            "`ulimit -n`, or LimitNOFILE= in the systemd unit)",
            limits.max_connections,
            fitted,
            soft,
        )
        return replace(limits, max_connections=fitted)
    return limits


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: 85\r\n\r\n"
    b'{"error": "the server has as many connections as it takes: try again", "code": "busy"}'
)


class _GuardedHandler(RequestHandler):
    """aiohttp's connection handler, refusing connections over the cap and closing a connection
    whose request head does not arrive in time."""

    __slots__ = ("_limits", "_metrics", "_refused", "_head_timer", "_heads_when_armed")

    def __init__(self, manager: Server, *, limits: ConnectionLimits, metrics: HttpMetrics, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._metrics = metrics
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_when_armed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(self._manager, _GuardedServer)
        if self._manager.open_connections >= self._limits.max_connections:
            self._refused = True
            self._metrics.connections_refused += 1
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)
        self._metrics.connections_open = self._manager.open_connections
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._disarm_head_timer()
        manager = self._manager
        super().connection_lost(exc)
        if isinstance(manager, _GuardedServer):
            self._metrics.connections_open = manager.open_connections

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:  # a whole head arrived
            self._disarm_head_timer()
        elif data and self._waiter is not None and not self._waiter.done():
            self._arm_head_timer()  # the first bytes of the next request's head

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._heads_when_armed = self._request_count
            self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._request_count == self._heads_when_armed and self.transport is not None:
            self._metrics.timeouts["header"] += 1
            self.force_close()


class _GuardedServer(Server):
    """aiohttp's low-level server for the app, making guarded connection handlers."""

    def __init__(self, plain: Server, limits: ConnectionLimits, metrics: HttpMetrics) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self.limits = limits
        self.metrics = metrics

    @property
    def open_connections(self) -> int:
        """How many connections are open: ``len(self.connections)``, which copies them all
        into a list (aiohttp), so that every connection made or lost cost time in proportion
        to the connections open (100,000 waiting long polls: a quadratic cost)."""
        return len(self._connections)

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(
            self, loop=self._loop, limits=self.limits, metrics=self.metrics, **self._kwargs
        )


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are held to ``limits`` (``app.runner`` makes one for
    the recovery server's app)."""

    def __init__(
        self, app: web.Application, limits: ConnectionLimits, metrics: HttpMetrics, **kwargs: Any
    ) -> None:
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout_s)
        kwargs.setdefault("lingering_time", limits.linger_s)
        super().__init__(app, **kwargs)
        self.limits = limits
        self.metrics = metrics

    async def _make_server(self) -> Server:
        return _GuardedServer(await super()._make_server(), self.limits, self.metrics)
