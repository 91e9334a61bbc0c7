"""The per-connection forwarder QEMU runs for the lab's ``guestfwd`` (recovery_lab.qemu.forwarder),
run as QEMU runs it: a process whose standard input, output and error are the guest's
connection."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import threading

from recovery_lab.qemu.machine import FORWARDER, MachineConfig, forward_command, machine_args


def start_forwarder(port: int, *extra: str) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """The guest's end of a connection and the forwarder serving the other end."""
    guest, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(FORWARDER), "127.0.0.1", str(port), *extra],
        stdin=theirs,
        stdout=theirs,
        stderr=theirs,
    )
    theirs.close()
    return guest, proc


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_bytes_go_both_ways_and_each_end_of_stream_is_passed_on() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        got: list[bytes] = []

        def server() -> None:
            conn, _ = listener.accept()
            with conn:
                got.append(recv_all(conn))  # returns once the guest half-closed
                conn.sendall(b"answer:" + got[0][::-1])

        t = threading.Thread(target=server)
        t.start()
        guest, proc = start_forwarder(port)
        with guest:
            request = bytes(range(256)) * 1024
            guest.sendall(request)
            guest.shutdown(socket.SHUT_WR)
            answer = recv_all(guest)
        t.join(timeout=30)
        assert proc.wait(timeout=30) == 0
    assert got == [request]
    assert answer == b"answer:" + request[::-1], "nothing else (no error text) reached the guest"


def test_each_connection_gets_its_own_server_connection() -> None:
    """What guestfwd=...-tcp: could not do: a second guest connection after the first one
    ended reaches the server again."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        for n in range(2):
            guest, proc = start_forwarder(port)
            conn, _ = listener.accept()
            with guest, conn:
                guest.sendall(f"hello {n}".encode())
                assert conn.recv(100) == f"hello {n}".encode()
                conn.sendall(b"ok")
                assert guest.recv(100) == b"ok"
            assert proc.wait(timeout=30) == 0


def test_no_server_closes_the_guest_connection_with_nothing_said() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        guest, proc = start_forwarder(port, "2")
        with guest:
            assert recv_all(guest) == b""
        assert proc.wait(timeout=30) == 1


def test_the_guestfwd_runs_the_forwarder_per_connection() -> None:
    args = machine_args(MachineConfig(kernel=FORWARDER, forward_port=8080), None, [])
    netdev = args[args.index("-netdev") + 1]
    assert "restrict=on" in netdev
    prefix = "guestfwd=tcp:10.0.2.100:8080-cmd:"
    assert prefix in netdev
    command = netdev.split(prefix, 1)[1]
    assert shlex.split(command) == [sys.executable, "-I", "-S", str(FORWARDER), "127.0.0.1", "8080"]
    assert command == forward_command(8080)
