"""Long polls that wait for their incident, not for a clock.

A device in its recovery environment waits for a directive with a long poll. What can end its
wait is a change to the fix for its incident: an approval or a revocation of a remediation, or
a rollout that moves (started, promoted to the next wave, paused, resumed, halted, completed).
Each of those is written to the audit log (audit.py) in the transaction that makes it, so the
audit log is the change feed: this process's :class:`ChangeFeed` reads the log's new entries
of those kinds, maps each to its incident, and wakes only the polls that wait on that incident.
A waiting poll costs nothing while nothing changes: no per-device query, no per-device timer.

The feed reads the log when this process made such a change (``poke``, called by the service
after its transaction), on PostgreSQL when another process made one (the transaction that
writes such an entry also sends ``NOTIFY qmr_changes``, delivered at its commit, and every
process ``LISTEN``s, in a thread of its own), and every ``tick_s`` (one query of the log's
newest entries per process, whether 0 or 100,000 polls wait), so a change made by another
process reaches this process's polls at once on PostgreSQL, and within ``tick_s`` if the
listening connection is lost. It reads only committed entries, so a poll that wakes sees the
change; a poll registers its wait in the same step of the event loop as its last look, so no
change falls between the look and the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from .store import Store, Tx

log = logging.getLogger(__name__)

# The audit kinds that may let a waiting poll be answered; rollout.* are all of the rollout's.
REMEDIATION_KINDS = ("remediation.approved", "remediation.revoked")
ROLLOUT_PREFIX = "rollout."
# A poll whose incident cannot be told (a remediation without one) wakes every poll.
EVERYONE = "*"
# PostgreSQL's channel for "the audit log has a change a poll may wait for".
CHANNEL = "qmr_changes"
# How often the listening thread looks whether to stop, and how long it tries to connect.
LISTEN_CHECK_S = 0.5
CONNECT_TIMEOUT_S = 10


def wakes_polls(kind: str) -> bool:
    """Is an audit entry of ``kind`` a change to a fix that may end a poll's wait?"""
    return kind in REMEDIATION_KINDS or kind.startswith(ROLLOUT_PREFIX)


def notify_on_commit(tx: Tx) -> None:
    """Tell the other server processes on this database, when ``tx`` commits (PostgreSQL)."""
    if tx.dialect == "postgresql":
        tx.before_commit["notify"] = _notify


def _notify(tx: Tx) -> None:
    tx.execute(f"NOTIFY {CHANNEL}")


class ChangeFeed:
    """One per server process; see the module docstring. Run :meth:`run` as a task."""

    def __init__(self, store: Store, tick_s: float) -> None:
        self._store = store
        self.tick_s = tick_s
        self._seen = 0
        self._events: dict[str, asyncio.Event] = {}
        self._poke = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.reads = 0  # how often the log was read (for tests and metrics)
        self.listening = False  # PostgreSQL: the LISTEN connection is up

    def start(self) -> None:
        """From now on: entries already in the log changed nothing for the polls to come."""
        self._loop = asyncio.get_running_loop()
        self._seen = int(self._store.scalar("SELECT COALESCE(MAX(seq), 0) FROM events"))

    def poke(self) -> None:
        """This process changed something a poll may wait for: read the log now. Safe from
        any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._poke.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(self._poke.set)

    async def wait(self, incident_id: str, timeout: float) -> bool:
        """Wait until a change to ``incident_id``'s fix, or ``timeout`` seconds; True if woken."""
        event = self._events.get(incident_id)
        if event is None:
            event = self._events[incident_id] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def read(self) -> set[str]:
        """Read the log's new entries; wake the polls of the incidents they change; return
        those incidents."""
        self.reads += 1
        head = int(self._store.scalar("SELECT COALESCE(MAX(seq), 0) FROM events"))
        if head <= self._seen:
            return set()
        rows = self._store.all(
            "SELECT kind, subject FROM events WHERE seq > ? AND seq <= ? AND (kind IN (?, ?) OR kind LIKE ?)",
            self._seen,
            head,
            *REMEDIATION_KINDS,
            ROLLOUT_PREFIX + "%",
        )
        self._seen = head
        changed: set[str] = set()
        for row in rows:
            changed.add(self._incident_of(row["kind"], row["subject"]))
        if EVERYONE in changed:
            changed = set(self._events)
        for incident_id in changed:
            event = self._events.pop(incident_id, None)
            if event is not None:
                event.set()
        return changed

    def _incident_of(self, kind: str, subject: str | None) -> str:
        if kind.startswith(ROLLOUT_PREFIX):
            incident = self._store.scalar(
                "SELECT r.incident_id FROM rollouts ro JOIN remediations r "
                "ON r.remediation_id = ro.remediation_id WHERE ro.rollout_id = ?",
                subject,
            )
        else:
            incident = self._store.scalar(
                "SELECT incident_id FROM remediations WHERE remediation_id = ?", subject
            )
        return str(incident) if incident else EVERYONE

    async def run(self) -> None:
        """Read the log when poked, and every ``tick_s`` (other processes' changes); on
        PostgreSQL, listen for their ``NOTIFY`` too."""
        stop = threading.Event()
        listener = None
        if self._store.dialect == "postgresql":
            listener = threading.Thread(target=self._listen, args=(stop,), name="qmr-listen", daemon=True)
            listener.start()
        try:
            await self._read_when_poked()
        finally:
            stop.set()
            if listener is not None:  # it checks ``stop`` every LISTEN_CHECK_S
                await asyncio.to_thread(listener.join, LISTEN_CHECK_S + CONNECT_TIMEOUT_S)

    def _listen(self, stop: threading.Event) -> None:
        """On PostgreSQL, in a thread of its own: a poke for each ``NOTIFY`` (of another process,
        or of this one), on a connection of its own. A blocking connection that wakes every
        LISTEN_CHECK_S to look at ``stop``, so shutting down never waits on the network or
        cancels a read half-way. If the connection is lost, the tick reads on until it is back."""
        import psycopg

        while not stop.is_set():
            try:
                url, timeout = self._store.url, CONNECT_TIMEOUT_S
                with psycopg.connect(url, autocommit=True, connect_timeout=timeout) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening = True
                    self.poke()  # what changed while nobody listened
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=LISTEN_CHECK_S):
                            self.poke()
            except Exception:
                if not stop.is_set():
                    log.warning("listening for changes on PostgreSQL failed; reading every %g s", self.tick_s)
            self.listening = False
            stop.wait(self.tick_s)

    async def _read_when_poked(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.tick_s)
            self._poke.clear()
            try:
                self.read()
            except Exception:  # a failed read must not stop the next ones
                log.exception("reading the change feed failed")
