"""The store on both backends: migrations, the per-CA serial constraint, timestamps in UTC."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from sqlalchemy.exc import IntegrityError

from estca.store.database import Database, bump_generation
from estca.store.models import CertificateAuthorityRow, IssuedCertificateRow
from tests.conftest import create_database_url


@pytest.fixture
def database(backend: str, tmp_path: Path) -> Iterator[Database]:
    for url in create_database_url(backend, tmp_path):
        database = Database(url)
        database.migrate()
        try:
            yield database
        finally:
            database.dispose()


def _ca(database: Database) -> int:
    with database.session() as session:
        row = CertificateAuthorityRow(
            name="store-ca",
            kind="root",
            parent_id=None,
            certificate_pem="-",
            key_reference="-",
            key_type="ec-p256",
            created_at=datetime.datetime.now(datetime.UTC),
        )
        session.add(row)
        session.flush()
        return row.id


def _issued(ca_id: int, serial: str) -> IssuedCertificateRow:
    now = datetime.datetime.now(datetime.UTC)
    return IssuedCertificateRow(
        ca_id=ca_id,
        template_id=None,
        template_name="t",
        serial=serial,
        subject="CN=x",
        subject_alt_names=["dns:x.test"],
        not_before=now,
        not_after=now,
        client_fingerprint=None,
        operation="simpleenroll",
        certificate_der=b"\x30\x00",
        issued_at=now,
    )


def test_migrations_create_every_table_and_run_twice_harmlessly(database: Database) -> None:
    database.migrate()
    tables = set(sqlalchemy.inspect(database.engine).get_table_names())
    assert {
        "alembic_version",
        "certificate_authorities",
        "certificate_templates",
        "est_enrollments",
        "issued_certificates",
        "store_generation",
    } <= tables
    assert database.generation() == 1


def test_serial_is_unique_per_ca(database: Database) -> None:
    ca_id = _ca(database)
    with database.session() as session:
        session.add(_issued(ca_id, "abc"))
    with pytest.raises(IntegrityError), database.session() as session:
        session.add(_issued(ca_id, "abc"))
    with database.session() as session:
        rows = session.scalars(sqlalchemy.select(IssuedCertificateRow)).all()
        assert [row.serial for row in rows] == ["abc"]


def test_timestamps_come_back_in_utc(database: Database) -> None:
    ca_id = _ca(database)
    moment = datetime.datetime(
        2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
    )
    row = _issued(ca_id, "def")
    row.not_after = moment
    with database.session() as session:
        session.add(row)
    with database.session() as session:
        stored = session.scalars(sqlalchemy.select(IssuedCertificateRow)).one()
        assert stored.not_after == moment
        assert stored.not_after.utcoffset() == datetime.timedelta(0)


def test_generation_grows_with_each_change(database: Database) -> None:
    before = database.generation()
    with database.session() as session:
        bump_generation(session)
    assert database.generation() == before + 1
