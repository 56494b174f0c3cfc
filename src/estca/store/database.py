"""Opening the database, bringing its schema up to date, and the change counter."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from estca.store.models import StoreGenerationRow

logger = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).parent / "migrations"

#: How long a SQLite writer waits for another process's write to finish.
SQLITE_BUSY_TIMEOUT_MS = 30_000


class Database:
    """One engine and its sessions; the only object that knows which backend is in use."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                url, connect_args={"check_same_thread": False}, pool_size=8, max_overflow=8
            )
            event.listen(self.engine, "connect", _configure_sqlite)
        else:
            self.engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Apply every Alembic migration not yet applied (run on each start)."""
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits when the block ends without an exception."""
        with self._sessions.begin() as session:
            yield session

    def generation(self) -> int:
        with self._sessions() as session:
            value = session.scalar(
                select(StoreGenerationRow.generation).where(StoreGenerationRow.id == 1)
            )
            return int(value or 0)

    def dispose(self) -> None:
        self.engine.dispose()


def bump_generation(session: Session) -> None:
    """Tell running servers that enrollment settings changed (read by their refresh loop)."""
    session.execute(
        update(StoreGenerationRow)
        .where(StoreGenerationRow.id == 1)
        .values(generation=StoreGenerationRow.generation + 1)
    )


def _configure_sqlite(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # FULL: a committed issuance record survives a power cut, not only a crash.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()
