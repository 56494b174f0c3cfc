"""The authority: one object every front end (CLI, EST) goes through."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from sqlalchemy import select
from sqlalchemy.orm import Session

from estca.authority.hierarchy import Hierarchy
from estca.authority.issuance import Issuer, normalise_serial
from estca.authority.passphrase import hash_passphrase
from estca.authority.policy import TemplatePolicy
from estca.authority.profiles import EnrollmentProfile
from estca.errors import ConfigurationError, ConflictError, NotFoundError
from estca.keys.custody import KeyCustody
from estca.pki.certs import utc_now
from estca.pki.chain import ChainValidator
from estca.store.database import Database, bump_generation
from estca.store.models import (
    CertificateAuthorityRow,
    EstEnrollmentRow,
    IssuedCertificateRow,
    TemplateRow,
)

#: RFC 7030 3.2.2 operation names; a label may never be one of them.
EST_OPERATIONS = frozenset(
    {"cacerts", "simpleenroll", "simplereenroll", "fullcmc", "serverkeygen", "csrattrs"}
)
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class EstSettings:
    template: str
    label: str
    bootstrap_validation: bool
    bootstrap_subjects: list[str]

    def summary(self, base_url: str | None = None) -> dict[str, object]:
        data: dict[str, object] = {
            "template": self.template,
            "label": self.label,
            "bootstrap_validation": self.bootstrap_validation,
            "bootstrap_chain": self.bootstrap_subjects,
        }
        if base_url:
            data["urls"] = est_urls(base_url, self.label)
        return data


def est_urls(base_url: str, label: str) -> dict[str, str]:
    prefix = f"{base_url.rstrip('/')}/.well-known/est/{label}"
    return {op: f"{prefix}/{op}" for op in ("cacerts", "simpleenroll", "simplereenroll")}


def load_pem_bundle(pem: bytes, what: str) -> list[x509.Certificate]:
    """Raises: ConfigurationError: not a PEM bundle of at least one certificate."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ConfigurationError(f"{what} is not a PEM certificate bundle: {exc}") from None
    return certificates


class Authority:
    """CAs, templates, EST settings, issued certificates; the issuance pipeline."""

    def __init__(self, database: Database, custody: KeyCustody) -> None:
        self.database = database
        self.hierarchy = Hierarchy(database, custody)
        self.issuer = Issuer(database)

    # Templates ---------------------------------------------------------------------------

    def create_template(self, name: str, ca_name: str, policy: TemplatePolicy) -> dict[str, Any]:
        """Raises: ConfigurationError, NotFoundError (CA), ConflictError (name taken)."""
        if not _TEMPLATE_NAME.fullmatch(name):
            raise ConfigurationError(
                f"template name {name!r} must be 1 to 128 letters, digits, '_', '.', '-'"
            )
        with self.database.session() as session:
            ca = self.hierarchy.get_in(session, ca_name)
            if ca.kind == "server":
                raise ConfigurationError("the server TLS CA cannot issue under a template")
            if session.scalar(select(TemplateRow).where(TemplateRow.name == name)):
                raise ConflictError(f"a template named {name!r} already exists")
            now = utc_now()
            row = TemplateRow(
                name=name, ca_id=ca.id, policy=policy.to_json(), created_at=now, updated_at=now
            )
            session.add(row)
            bump_generation(session)
            return {"name": name, "ca": ca.name, "policy": policy.to_json()}

    def _template_row(self, session: Session, name: str) -> TemplateRow:
        row = session.scalar(select(TemplateRow).where(TemplateRow.name == name))
        if row is None:
            raise NotFoundError(f"no template named {name!r}")
        return row

    def show_template(self, name: str) -> dict[str, Any]:
        """Raises: NotFoundError."""
        with self.database.session() as session:
            row = self._template_row(session, name)
            return self._template_summary(session, row)

    def _template_summary(self, session: Session, row: TemplateRow) -> dict[str, Any]:
        ca = session.get(CertificateAuthorityRow, row.ca_id)
        enrollment = self._enrollment_of(session, row)
        return {
            "name": row.name,
            "ca": ca.name if ca else None,
            "policy": row.policy,
            "est_label": enrollment.label if enrollment else None,
        }

    def list_templates(self) -> list[dict[str, Any]]:
        with self.database.session() as session:
            rows = session.scalars(select(TemplateRow).order_by(TemplateRow.name)).all()
            return [self._template_summary(session, row) for row in rows]

    def update_template(
        self, name: str, ca_name: str | None, changes: dict[str, Any], replace: bool
    ) -> dict[str, Any]:
        """Change a template's CA or rules; list rules are added to unless ``replace``.

        Raises: NotFoundError, ConfigurationError.
        """
        with self.database.session() as session:
            row = self._template_row(session, name)
            data: dict[str, Any] = dict(row.policy)
            for key, value in changes.items():
                if isinstance(value, list) and not replace and key in data:
                    data[key] = list(data[key]) + value
                else:
                    data[key] = value
            policy = TemplatePolicy.from_json(data)
            if ca_name is not None:
                row.ca_id = self.hierarchy.get_in(session, ca_name).id
            row.policy = policy.to_json()
            row.updated_at = utc_now()
            bump_generation(session)
            session.flush()
            return self._template_summary(session, row)

    def delete_template(self, name: str) -> None:
        """Delete a template and its EST settings; issued certificates keep their records.

        Raises: NotFoundError.
        """
        with self.database.session() as session:
            row = self._template_row(session, name)
            enrollment = self._enrollment_of(session, row)
            if enrollment is not None:
                session.delete(enrollment)
            for issued in session.scalars(
                select(IssuedCertificateRow).where(IssuedCertificateRow.template_id == row.id)
            ):
                issued.template_id = None
            session.delete(row)
            bump_generation(session)

    # EST settings --------------------------------------------------------------------------

    def enable_est(
        self,
        template: str,
        bootstrap_pem: bytes,
        passphrase: str,
        label: str | None,
        bootstrap_validation: bool,
    ) -> EstSettings:
        """Switch EST on for a template (or replace its settings).

        Raises:
            ConfigurationError: bad label, chain or passphrase.
            ConflictError: the label belongs to another template.
            NotFoundError: no such template.
        """
        chain = load_pem_bundle(bootstrap_pem, "the bootstrap chain")
        for certificate in chain:
            constraints = _basic_constraints(certificate)
            if constraints is None or not constraints.ca:
                raise ConfigurationError(
                    "the bootstrap chain must hold only CA certificates; "
                    f"{certificate.subject.rfc4514_string()!r} is not a CA"
                )
        if label is not None:
            _check_label(label)
        password_hash = hash_passphrase(passphrase)
        with self.database.session() as session:
            row = self._template_row(session, template)
            existing = self._enrollment_of(session, row)
            # Re-enabling without --label keeps the label devices already use.
            label = label or (existing.label if existing else "est-" + secrets.token_hex(4))
            taken = session.scalar(select(EstEnrollmentRow).where(EstEnrollmentRow.label == label))
            if taken is not None and taken.template_id != row.id:
                raise ConflictError(f"label {label!r} is already used by another template")
            if existing is None:
                existing = EstEnrollmentRow(template_id=row.id, created_at=utc_now())
                session.add(existing)
            existing.label = label
            existing.bootstrap_chain_pem = b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in chain
            ).decode("ascii")
            existing.passphrase_hash = password_hash
            existing.bootstrap_validation = bootstrap_validation
            bump_generation(session)
        return EstSettings(
            template, label, bootstrap_validation, [c.subject.rfc4514_string() for c in chain]
        )

    def _enabled_row(self, session: Session, template: str) -> EstEnrollmentRow:
        """Raises: NotFoundError: no template, or EST is not enabled for it."""
        enrollment = self._enrollment_of(session, self._template_row(session, template))
        if enrollment is None:
            raise NotFoundError(f"EST is not enabled for template {template!r}")
        return enrollment

    @staticmethod
    def _enrollment_of(session: Session, row: TemplateRow) -> EstEnrollmentRow | None:
        return session.scalar(
            select(EstEnrollmentRow).where(EstEnrollmentRow.template_id == row.id)
        )

    def show_est(self, template: str) -> EstSettings:
        """Raises: NotFoundError: no template, or EST is not enabled for it."""
        with self.database.session() as session:
            enrollment = self._enabled_row(session, template)
            chain = load_pem_bundle(enrollment.bootstrap_chain_pem.encode(), "bootstrap chain")
            return EstSettings(
                template,
                enrollment.label,
                enrollment.bootstrap_validation,
                [c.subject.rfc4514_string() for c in chain],
            )

    def disable_est(self, template: str) -> None:
        """Raises: NotFoundError."""
        with self.database.session() as session:
            session.delete(self._enabled_row(session, template))
            bump_generation(session)

    def load_profiles(self) -> dict[str, EnrollmentProfile]:
        """Every enabled EST label with all it needs, CA keys unlocked (for the server)."""
        profiles: dict[str, EnrollmentProfile] = {}
        with self.database.session() as session:
            own_cas = {
                ca.certificate.fingerprint(hashes.SHA256()): ca.id
                for ca in self.hierarchy.list_in(session, include_server=True)
            }
            rows = session.execute(
                select(EstEnrollmentRow, TemplateRow).join(
                    TemplateRow, TemplateRow.id == EstEnrollmentRow.template_id
                )
            ).all()
            for enrollment, template in rows:
                ca = self.hierarchy.get_by_id(session, template.ca_id)
                ca_chain = self.hierarchy.chain_in(session, ca)
                bootstrap = load_pem_bundle(
                    enrollment.bootstrap_chain_pem.encode("ascii"), "bootstrap chain"
                )
                profiles[enrollment.label] = EnrollmentProfile(
                    label=enrollment.label,
                    template_id=template.id,
                    template_name=template.name,
                    policy=TemplatePolicy.from_json(dict(template.policy)),
                    ca=ca,
                    ca_key=self.hierarchy.private_key(ca),
                    ca_chain=ca_chain,
                    bootstrap_certificates=bootstrap,
                    bootstrap_validator=ChainValidator(bootstrap),
                    issued_validator=ChainValidator(ca_chain),
                    passphrase_hash=enrollment.passphrase_hash,
                    bootstrap_validation=enrollment.bootstrap_validation,
                    estca_bootstrap_cas={
                        fingerprint: own_cas[fingerprint]
                        for fingerprint in (c.fingerprint(hashes.SHA256()) for c in bootstrap)
                        if fingerprint in own_cas
                    },
                )
        return profiles

    # Issued certificates -------------------------------------------------------------------

    def list_certificates(self) -> list[dict[str, Any]]:
        with self.database.session() as session:
            rows = session.scalars(
                select(IssuedCertificateRow).order_by(IssuedCertificateRow.id)
            ).all()
            names = {
                ca_id: name
                for ca_id, name in session.execute(
                    select(CertificateAuthorityRow.id, CertificateAuthorityRow.name)
                ).all()
            }
            return [_certificate_summary(row, names.get(row.ca_id, "?")) for row in rows]

    def _certificate_rows(self, session: Session, serial: str) -> list[IssuedCertificateRow]:
        wanted = normalise_serial(serial)
        if not re.fullmatch(r"[0-9a-f]{1,64}", wanted):
            raise ConfigurationError(f"{serial!r} is not a hexadecimal serial number")
        rows = session.scalars(
            select(IssuedCertificateRow).where(IssuedCertificateRow.serial == wanted)
        ).all()
        if not rows:
            raise NotFoundError(f"no issued certificate with serial {wanted}")
        return list(rows)

    def show_certificate(self, serial: str) -> list[dict[str, Any]]:
        """Raises: NotFoundError, ConfigurationError (not hex)."""
        with self.database.session() as session:
            result = []
            for row in self._certificate_rows(session, serial):
                ca = session.get(CertificateAuthorityRow, row.ca_id)
                summary = _certificate_summary(row, ca.name if ca else "?")
                summary["pem"] = (
                    x509.load_der_x509_certificate(row.certificate_der)
                    .public_bytes(serialization.Encoding.PEM)
                    .decode("ascii")
                )
                result.append(summary)
            return result

    def revoke_certificate(self, serial: str, reason: str = "unspecified") -> dict[str, Any]:
        """Mark a certificate revoked; reenroll with it is refused from then on, on every node.

        Raises: NotFoundError, ConfigurationError, ConflictError (already revoked, ambiguous).
        """
        with self.database.session() as session:
            rows = self._certificate_rows(session, serial)
            if len(rows) > 1:
                raise ConflictError(
                    "several CAs issued a certificate with this serial; this is not expected"
                )
            row = rows[0]
            if row.revoked_at is not None:
                raise ConflictError(f"certificate {row.serial} is already revoked")
            row.revoked_at = utc_now()
            row.revocation_reason = reason
            ca = session.get(CertificateAuthorityRow, row.ca_id)
            return _certificate_summary(row, ca.name if ca else "?")


def _basic_constraints(certificate: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_label(label: str) -> None:
    if not _LABEL.fullmatch(label):
        raise ConfigurationError(
            f"label {label!r} must be 1 to 64 characters of letters, digits, '_' and '-'"
        )
    if label.lower() in EST_OPERATIONS:
        raise ConfigurationError(f"label {label!r} is the name of an EST operation")


def _certificate_summary(row: IssuedCertificateRow, ca_name: str) -> dict[str, Any]:
    return {
        "serial": row.serial,
        "ca": ca_name,
        "template": row.template_name,
        "subject": row.subject,
        "subject_alt_names": row.subject_alt_names,
        "not_before": row.not_before.isoformat(),
        "not_after": row.not_after.isoformat(),
        "issued_at": row.issued_at.isoformat(),
        "operation": row.operation,
        "client_fingerprint": row.client_fingerprint,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "revocation_reason": row.revocation_reason,
    }
