"""Group commit of issuance records: one writer thread, one transaction for all that wait.

Each caller gets a future that completes only when its own row is committed, so "no certificate
is returned before its record is committed" holds, while concurrent enrollments share one commit
(one fsync on SQLite, one round trip on PostgreSQL) instead of paying one each.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from estca.store.database import Database
from estca.store.models import IssuedCertificateRow

logger = logging.getLogger(__name__)

#: Most rows committed in one transaction.
MAX_BATCH = 128

_Item = tuple[dict[str, Any], "Future[None]"]


class IssuanceRecorder:
    """Commits issued-certificate rows in groups from a single background thread."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._statement = insert(IssuedCertificateRow)

    def record(self, values: dict[str, Any]) -> Future[None]:
        """Queue one row; the future completes when it is committed, or fails with the reason.

        The future fails with IntegrityError if the (CA, serial) pair is already taken.
        """
        self._start()
        future: Future[None] = Future()
        self._queue.put((values, future))
        return future

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="estca-recorder", daemon=True)
                thread.start()
                self._thread = thread

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Item]) -> None:
        try:
            with self._database.engine.begin() as connection:
                connection.execute(self._statement, [values for values, _ in batch])
        except IntegrityError:
            # One row of the group collides: commit the others one by one, fail only that one.
            if len(batch) > 1:
                for item in batch:
                    self._commit([item])
            else:
                batch[0][1].set_exception(_integrity_error())
            return
        except Exception as error:  # noqa: BLE001 - every waiter must hear why it failed
            logger.exception("committing %d issuance records failed", len(batch))
            for _, future in batch:
                future.set_exception(error)
            return
        for _, future in batch:
            future.set_result(None)


def _integrity_error() -> IntegrityError:
    return IntegrityError("INSERT INTO issued_certificates", None, Exception("serial taken"))
