"""The first schema: CAs, templates, EST enrollments, issued certificates.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "certificate_authorities",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("parent_id", sa.Integer, sa.ForeignKey("certificate_authorities.id")),
        sa.Column("certificate_pem", sa.Text, nullable=False),
        sa.Column("key_reference", sa.Text, nullable=False),
        sa.Column("key_type", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "certificate_templates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("ca_id", sa.Integer, sa.ForeignKey("certificate_authorities.id"), nullable=False),
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "est_enrollments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "template_id",
            sa.Integer,
            sa.ForeignKey("certificate_templates.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("label", sa.String(64), nullable=False, unique=True),
        sa.Column("bootstrap_chain_pem", sa.Text, nullable=False),
        sa.Column("passphrase_hash", sa.Text, nullable=False),
        sa.Column("bootstrap_validation", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "issued_certificates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ca_id", sa.Integer, sa.ForeignKey("certificate_authorities.id"), nullable=False),
        sa.Column(
            "template_id",
            sa.Integer,
            sa.ForeignKey("certificate_templates.id", ondelete="SET NULL"),
        ),
        sa.Column("template_name", sa.String(128), nullable=False),
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("subject_alt_names", sa.JSON, nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_fingerprint", sa.String(64)),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("certificate_der", sa.LargeBinary, nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("revocation_reason", sa.String(64)),
        sa.UniqueConstraint("ca_id", "serial", name="uq_issued_serial_per_ca"),
    )
    op.create_table(
        "store_generation",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("generation", sa.Integer, nullable=False),
    )
    op.execute("INSERT INTO store_generation (id, generation) VALUES (1, 1)")


def downgrade() -> None:
    for table in (
        "store_generation",
        "issued_certificates",
        "est_enrollments",
        "certificate_templates",
        "certificate_authorities",
    ):
        op.drop_table(table)
