"""Tables of estca. Changes to them go through a migration in ``migrations/versions``."""

from __future__ import annotations

import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime.datetime]):
    """Timestamps in UTC on every backend (SQLite keeps no zone, so it is put back on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        if value is not None:
            value = value.astimezone(datetime.UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value


class Base(DeclarativeBase):
    pass


class CertificateAuthorityRow(Base):
    __tablename__ = "certificate_authorities"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # root, intermediate, server
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("certificate_authorities.id"))
    certificate_pem: Mapped[str] = mapped_column(Text)
    key_reference: Mapped[str] = mapped_column(Text)
    key_type: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())


class TemplateRow(Base):
    __tablename__ = "certificate_templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    ca_id: Mapped[int] = mapped_column(ForeignKey("certificate_authorities.id"))
    policy: Mapped[dict[str, object]] = mapped_column(JSON)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())


class EstEnrollmentRow(Base):
    __tablename__ = "est_enrollments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    template_id: Mapped[int] = mapped_column(
        ForeignKey("certificate_templates.id", ondelete="CASCADE"), unique=True
    )
    label: Mapped[str] = mapped_column(String(64), unique=True)
    bootstrap_chain_pem: Mapped[str] = mapped_column(Text)
    passphrase_hash: Mapped[str] = mapped_column(Text)
    bootstrap_validation: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())


class IssuedCertificateRow(Base):
    __tablename__ = "issued_certificates"
    __table_args__ = (UniqueConstraint("ca_id", "serial", name="uq_issued_serial_per_ca"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ca_id: Mapped[int] = mapped_column(ForeignKey("certificate_authorities.id"))
    template_id: Mapped[int | None] = mapped_column(
        ForeignKey("certificate_templates.id", ondelete="SET NULL")
    )
    template_name: Mapped[str] = mapped_column(String(128))
    serial: Mapped[str] = mapped_column(String(64))  # lower-case hex, no colons
    subject: Mapped[str] = mapped_column(Text)
    subject_alt_names: Mapped[list[str]] = mapped_column(JSON)
    not_before: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    not_after: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    client_fingerprint: Mapped[str | None] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(32))
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    issued_at: Mapped[datetime.datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime.datetime | None] = mapped_column(UtcDateTime())
    revocation_reason: Mapped[str | None] = mapped_column(String(64))


class StoreGenerationRow(Base):
    """One row whose number grows with every change that running servers must pick up."""

    __tablename__ = "store_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
