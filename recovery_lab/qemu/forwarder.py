"""The host side of one guest TCP connection: QEMU starts this per connection.

The lab's machine reaches the recovery server through user-mode networking's ``guestfwd``.
With ``guestfwd=tcp:IP:PORT-tcp:127.0.0.1:PORT`` QEMU opens *one* connection to the server
when it starts and never reopens it, so every guest connection rides that one host
connection, and a server restart, an idle keep-alive the server closed, or a request cut in
half leaves the machine with no path to the server at all. With
``guestfwd=tcp:IP:PORT-cmd:COMMAND`` (:func:`recovery_lab.qemu.machine.forward_command`)
libslirp instead starts COMMAND for every connection the guest opens, with that connection
on its standard input, output and error. This is COMMAND:

1. it sends its own standard error to ``/dev/null`` first: anything written there would go
   to the guest as if the server had said it;
2. it connects to ``HOST:PORT`` (trying again for a few seconds, so a server that is
   restarting is waited for; after that it exits and the guest sees the connection closed,
   which its retries handle);
3. it copies bytes both ways until both sides are done, passing each side's end of stream
   on as a half close, and exits.

Only the standard library, no site packages (QEMU runs it as ``python3 -I -S``): it starts
in tens of milliseconds, once per connection.

Usage: ``python3 -I -S forwarder.py HOST PORT [CONNECT_ATTEMPTS]``
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import time

# How long a connection waits for a server that is not listening (a restart).
CONNECT_ATTEMPTS = 20
CONNECT_PAUSE_S = 0.25
CHUNK = 65536


def connect(host: str, port: int, attempts: int = CONNECT_ATTEMPTS) -> socket.socket | None:
    """A connection to ``host:port``, or None once the attempts are used up."""
    for attempt in range(attempts):
        try:
            return socket.create_connection((host, port))
        except OSError:
            if attempt + 1 < attempts:
                time.sleep(CONNECT_PAUSE_S)
    return None


def pump(guest: socket.socket, server: socket.socket) -> None:
    """Copy both ways until both directions reached their end of stream (or one side failed)."""
    sel = selectors.DefaultSelector()
    peer = {guest: server, server: guest}
    for s in peer:
        sel.register(s, selectors.EVENT_READ)
    open_directions = 2
    while open_directions:
        for key, _ in sel.select():
            src: socket.socket = key.fileobj  # type: ignore[assignment]
            dst = peer[src]
            try:
                data = src.recv(CHUNK)
            except OSError:
                return
            if not data:
                sel.unregister(src)
                open_directions -= 1
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    return
                continue
            try:
                dst.sendall(data)
            except OSError:
                return


def main(argv: list[str]) -> int:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    if len(argv) not in (3, 4):
        return 2
    guest = socket.socket(fileno=os.dup(0))
    server = connect(argv[1], int(argv[2]), int(argv[3]) if len(argv) == 4 else CONNECT_ATTEMPTS)
    if server is None:
        guest.close()
        return 1
    try:
        pump(guest, server)
    finally:
        server.close()
        guest.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except Exception:  # nothing may reach the guest's connection; the guest sees it close
        sys.exit(1)
