"""Connection limits the server enforces itself (listener.py): idle, slow-header and slow-body
connections are closed, a connection cap answers 503 instead of running out of descriptors.

Each test sets the limit small and waits for the server to close the connection (reading
until EOF); the test timeout bounds the wait. Nothing here asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from recovery_server.app import METRICS
from recovery_server.listener import ACCEPT_BACKLOG, RESERVED_FILES, ConnectionLimits
from recovery_server.portfile import ServerDidNotStart, wait_for_port_file, write_port_file

SQLITE_ONLY = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
BIN = Path(sys.executable).parent


async def limited(fleet, **limits) -> None:
    fleet.limits = ConnectionLimits(**limits)
    await fleet.restart()


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def connect(fleet) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", fleet.port)


@SQLITE_ONLY
async def test_a_connection_that_sends_nothing_is_closed(fleet):
    await limited(fleet, header_timeout_s=0.5)
    reader, writer = await connect(fleet)
    assert await until_closed(reader) == b""
    writer.close()
    assert fleet.server.app[METRICS].timeouts["header"] == 1


@SQLITE_ONLY
async def test_a_request_head_that_never_ends_is_closed_though_bytes_keep_coming(fleet):
    await limited(fleet, header_timeout_s=1.0, keepalive_timeout_s=3600)
    reader, writer = await connect(fleet)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    closed = asyncio.create_task(until_closed(reader))
    while not closed.done():  # a byte at a time, never the blank line that ends the head
        try:
            writer.write(b"a")
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.wait({closed}, timeout=0.1)
    assert await closed == b""
    writer.close()


@SQLITE_ONLY
async def test_an_idle_kept_alive_connection_is_closed(fleet):
    await limited(fleet, header_timeout_s=3600, keepalive_timeout_s=0.5)
    reader, writer = await connect(fleet)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await until_closed(reader)  # the answer, then the close after the idle time
    assert answer.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in answer
    writer.close()


@SQLITE_ONLY
async def test_a_body_that_does_not_arrive_in_time_is_answered_408_and_closed(fleet):
    await limited(fleet, header_timeout_s=3600, body_timeout_s=0.5, linger_s=0.1)
    reader, writer = await connect(fleet)
    writer.write(
        b"POST /v1/challenge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"device_id": '
    )
    answer = await until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not arrive within 0.5 s" in answer
    writer.close()
    assert fleet.server.app[METRICS].timeouts["body"] == 1


@SQLITE_ONLY
async def test_over_the_connection_cap_new_connections_get_503_until_idle_ones_are_closed(fleet):
    await limited(fleet, max_connections=3, header_timeout_s=1.0)
    idle = [await connect(fleet) for _ in range(3)]
    reader, writer = await connect(fleet)
    answer = await until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
    writer.close()
    for reader, writer in idle:  # the idle ones time out
        assert await until_closed(reader) == b""
        writer.close()
    async with aiohttp.ClientSession() as s:
        async with s.get(fleet.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(fleet.url + "/metrics", headers=await admin(fleet)) as r:
            text = await r.text()
    assert "qmr_http_connections_refused_total 1" in text
    assert 'qmr_http_timeouts_total{phase="header"} 3' in text


async def admin(fleet) -> dict[str, str]:
    token = fleet.service.create_user(fleet.admin, "prometheus", "viewer").token
    return {"Authorization": f"Bearer {token}"}


@SQLITE_ONLY
async def test_a_long_poll_outlives_the_idle_and_header_timeouts(fleet):
    from recovery_agent.protocol.keys import SigningKey

    from .test_server import poll, report

    await limited(fleet, header_timeout_s=0.2, keepalive_timeout_s=0.2)
    key = SigningKey.generate()
    await fleet.enroll("dev-1", key)
    _, receipt = await report(fleet, "dev-1", key)
    assert (await poll(fleet, receipt, wait=2)).status == "pending"


@pytest.mark.timeout(240)
def test_serve_under_a_256_file_limit_survives_300_idle_sockets(tmp_path):
    """The audit's case: 300 idle sockets against a server that may open 256 files made
    /healthz time out. The server lowers its cap to fit, answers the excess 503, closes the
    idle ones after the header timeout, and answers /healthz again; it never runs out of
    descriptors, even when the 300 arrive while it is not running and are accepted at once."""
    import subprocess

    data = tmp_path / "data"
    subprocess.run(
        [str(BIN / "recovery-server"), "--data", str(data), "init", "--token-file", str(tmp_path / "t")],
        check=True,
        capture_output=True,
    )
    port_file = tmp_path / "port"
    log = open(tmp_path / "server.log", "w")

    def fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen(
        [
            str(BIN / "recovery-server"),
            "--data",
            str(data),
            "serve",
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--quiet",
            "--header-timeout",
            # Far longer than the clients take to get in: past the backlog the kernel lets them
            # in as their SYNs are retried (1 s, then 3 s, 7 s...), and a connection closed for
            # its head would free a slot for one of them before the cap is reached.
            "20",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        preexec_fn=fd_limit,
    )
    try:
        asyncio.run(_flood(proc, port_file))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert (
        f"max connections lowered from {ConnectionLimits().max_connections} to {256 - RESERVED_FILES}" in text
    )
    assert "Too many open files" not in text


async def _flood(proc, port_file: Path) -> None:
    port = wait_for_port_file(port_file, lambda: proc.poll() is None)
    # The server stopped while the flood arrives, so the kernel queues all it lets wait and the
    # server accepts them in one burst when it goes on: with a backlog of 1024, all 300 at once,
    # more than it may open. Past the backlog, the kernel lets clients in as they retry.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        connecting = [asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port)) for _ in range(300)]
        queued = asyncio.as_completed(connecting)
        for _ in range(ACCEPT_BACKLOG + 1):  # the least the kernel queues
            await next(queued)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    sockets = await asyncio.gather(*connecting)
    for _, writer in sockets:
        writer.write(b"G")  # a head that never ends (and what lets a client past the backlog in)
    answers = await asyncio.gather(*(until_closed(reader) for reader, _ in sockets))
    for _, writer in sockets:
        writer.close()
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
    assert len(busy) >= 300 - (256 - RESERVED_FILES) and all(a in (b"", busy[0]) for a in answers)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
    assert proc.poll() is None


def test_the_port_file_is_read_once_written_and_a_dead_server_is_named(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    write_port_file(port_file, 43123)
    assert wait_for_port_file(port_file, lambda: True) == 43123
    assert [p.name for p in tmp_path.iterdir()] == ["port"]  # no temporary file left
    with pytest.raises(ServerDidNotStart, match="ended before it wrote"):
        wait_for_port_file(tmp_path / "never", lambda: False)
