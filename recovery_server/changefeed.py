"""Long polls that wait for their incident, not for a clock.

A device in its recovery environment waits for a directive with a long poll. What can end its
wait is a change to the fix for its incident: an approval or a revocation of a remediation, or
a rollout that moves (started, promoted to the next wave, paused, resumed, halted, completed).
Each of those is written to the audit log (audit.py) in the transaction that makes it, so the
audit log is the change feed: this process's :class:`ChangeFeed` reads the log's new entries
of those kinds, maps each to its incident, and wakes only the polls that wait on that incident.
A waiting poll costs nothing while nothing changes: no per-device query, no per-device timer.
A poll whose fix has a rollout also names its device's wave, and a rollout promoted to the next
wave wakes only the polls of the waves now open: with 100,000 devices waiting, each promotion
would otherwise wake all of them to tell most that their wave has not come.

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
PROMOTED = "rollout.promoted"
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
        # (incident, wave or None) -> the event its polls wait on; None: woken by any change
        self._events: dict[tuple[str, int | None], asyncio.Event] = {}
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

    async def wait(self, incident_id: str, timeout: float, wave: int | None = None) -> bool:
        """Wait until a change to ``incident_id``'s fix, or ``timeout`` seconds; True if woken.
        ``wave``: the device's wave in the fix's rollout, if it has one; then a promotion to an
        earlier wave does not wake this poll."""
        key = (incident_id, wave)
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):  # a timer, not a task per waiting poll
                await event.wait()
        except TimeoutError:
            return False
        return True

    def read(self) -> set[str]:
        """Read the log's new entries; wake the polls of the incidents they change (of a
        promotion: those whose wave is open now); return those incidents."""
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
        # incident -> the last wave open (wake the polls of it and before), or None: wake all
        changed: dict[str, int | None] = {}
        for row in rows:
            incident, open_wave = self._incident_of(row["kind"], row["subject"])
            if row["kind"] != PROMOTED or open_wave is None:
                changed[incident] = None
            elif incident not in changed:
                changed[incident] = open_wave
            elif (before := changed[incident]) is not None:
                changed[incident] = max(before, open_wave)
        everyone = EVERYONE in changed
        for key in list(self._events):
            incident, wave = key
            if not everyone and incident not in changed:
                continue
            open_wave = None if everyone else changed[incident]
            if open_wave is None or wave is None or wave <= open_wave:
                self._events.pop(key).set()
        return set(changed)

    def _incident_of(self, kind: str, subject: str | None) -> tuple[str, int | None]:
        """The incident an entry changes the fix of, and, for a rollout's, its current wave."""
        if kind.startswith(ROLLOUT_PREFIX):
            row = self._store.one(
                "SELECT r.incident_id, ro.current_wave FROM rollouts ro JOIN remediations r "
                "ON r.remediation_id = ro.remediation_id WHERE ro.rollout_id = ?",
                subject,
            )
            if row is None or not row["incident_id"]:
                return EVERYONE, None
            return str(row["incident_id"]), int(row["current_wave"])
        sql = "SELECT incident_id FROM remediations WHERE remediation_id = ?"
        incident = self._store.scalar(sql, subject)
        return (str(incident) if incident else EVERYONE), None

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
