"""Group commit: the writes of many requests in one transaction, off the event loop.

A report is acknowledged only once it is durable, and on SQLite with ``synchronous=FULL``
that is an fsync of the write-ahead log at each commit: about a millisecond of the disk's
time, and the CPU of beginning, committing and syncing, per transaction. One transaction per
report makes that the bound of ingestion, and run on the event loop it also stops every other
request for as long. Here:

1. A request does its own checks first, on the event loop (the envelope, its signature, the
   crash signature: nothing is written), then hands its write, a function of the
   transaction, to :meth:`GroupCommit.run` and awaits it.
2. One writer at a time takes every write waiting (up to ``max_batch``) and runs them in one
   transaction in a worker thread. A write that fails (a replayed nonce, a device revoked a
   moment ago) is rolled back alone and its request gets its error; the others go on. Writes
   rarely fail, so a batch first runs without savepoints (on PostgreSQL each is two round
   trips, held under the write lock); if one of its writes fails, the whole transaction is
   rolled back and the batch runs again, each write inside its own savepoint.
3. After the commit returns, each request gets its own result. Nothing is acknowledged before
   its batch is durable, and a commit that fails fails every write of its batch, none of which
   is then in the database. While one batch commits, the event loop takes the next requests
   and their writes queue up for the next batch: the busier the server, the larger the batch
   and the cheaper each report (no timer waits for a batch to fill).

The audit log stays a hash chain (audit.py): each write appends its entries in order inside
the one transaction, reading the head its predecessor left, and a write rolled back to its
savepoint takes its entries with it, so the chain a batch commits is unbroken and each entry
still commits with the change it describes. Tamper-evidence is unchanged: it never depended
on how many entries a transaction holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .store import Store, Tx

T = TypeVar("T")

MAX_BATCH = 256


@dataclass
class CommitStats:
    """What the writer did, for /metrics and tests."""

    batches: int = 0
    writes: int = 0
    largest: int = 0
    reruns: int = 0  # batches run again, each write in a savepoint, after one of them failed


class _WriteFailed(Exception):
    """A write of a batch run without savepoints failed: the transaction is rolled back."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class GroupCommit:
    """One per server process (and event loop); see the module docstring."""

    def __init__(
        self, store: Store, *, max_batch: int = MAX_BATCH, on_commit: Callable[[], None] = lambda: None
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._on_commit = on_commit
        self._waiting: list[tuple[Callable[[Tx], Any], asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.stats = CommitStats()

    async def run(self, write: Callable[[Tx], T]) -> T:
        """Run ``write`` in a transaction shared with other waiting writes; its result once
        the transaction committed, or its own exception (nothing of it was kept)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((write, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return await future

    async def drain(self) -> None:
        """Wait until every write handed in so far has committed (or failed)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write_all(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            try:
                outcomes = await asyncio.to_thread(self._commit, [write for write, _ in batch])
            except BaseException as exc:  # the commit itself failed: nothing of the batch is kept
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            self.stats.batches += 1
            self.stats.writes += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            self._on_commit()
            for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                if future.done():  # its request went away (the client hung up): the write stands
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _commit(self, writes: list[Callable[[Tx], Any]]) -> list[tuple[bool, Any]]:
        try:
            return self._commit_at_once(writes)
        except _WriteFailed as failed:
            if len(writes) == 1:  # its transaction was its savepoint
                return [(False, failed.error)]
        self.stats.reruns += 1
        return self._commit_each_alone(writes)

    def _commit_at_once(self, writes: list[Callable[[Tx], Any]]) -> list[tuple[bool, Any]]:
        """Every write in one transaction, no savepoints; _WriteFailed (nothing kept) if one
        of them fails."""
        values = []
        with self._store.tx() as tx:
            for write in writes:
                try:
                    values.append(write(tx))
                except Exception as exc:
                    raise _WriteFailed(exc) from exc
        return [(True, value) for value in values]

    def _commit_each_alone(self, writes: list[Callable[[Tx], Any]]) -> list[tuple[bool, Any]]:
        """Every write in one transaction, each in a savepoint of its own."""
        outcomes: list[tuple[bool, Any]] = []
        with self._store.tx() as tx:
            for write in writes:
                try:
                    with tx.savepoint():
                        value = write(tx)
                except Exception as exc:
                    outcomes.append((False, exc))
                else:
                    outcomes.append((True, value))
        return outcomes
