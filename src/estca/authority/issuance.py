"""The issuance pipeline: the one place where estca signs an end-entity certificate.

Each step fails closed with one error type. The caller has already authenticated the client
(step 1) before handing over the request body.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from estca.authority.audit import audit_issued
from estca.authority.profiles import EnrollmentProfile
from estca.errors import ClientCertificateError, EstcaError, PolicyViolationError
from estca.pki.certs import (
    BACKDATE,
    SERIAL_BITS,
    build_end_entity_certificate,
    new_serial_number,
    utc_now,
)
from estca.pki.csr import CertificateRequest, load_certificate_request
from estca.pki.names import (
    comparable_name,
    comparable_sans,
    format_name,
    read_subject_alt_names,
)
from estca.store.database import Database
from estca.store.models import IssuedCertificateRow

logger = logging.getLogger(__name__)

#: Attempts at a fresh serial if the database says one is taken (159 random bits: never, in
#: practice, but the constraint is the authority, not the odds).
SERIAL_ATTEMPTS = 3


class IssuanceInvariantError(EstcaError):
    """A certificate about to be signed breaks a rule estca itself guarantees (a bug)."""


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def normalise_serial(text: str) -> str:
    """A serial as operators type it (``openssl x509 -serial``: case and colons ignored)."""
    cleaned = text.strip().replace(":", "").lower()
    if cleaned.startswith("serial="):
        cleaned = cleaned[len("serial=") :]
    return cleaned.lstrip("0") or "0"


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class ClientIdentity:
    """Who the front end authenticated: the TLS client certificate, if any, and the peer."""

    certificate: x509.Certificate | None
    peer: str


class Issuer:
    """Runs the pipeline for simpleenroll and simplereenroll."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def enroll(
        self, profile: EnrollmentProfile, csr_der: bytes, client: ClientIdentity
    ) -> x509.Certificate:
        """RFC 7030 4.2.1 simpleenroll.

        Raises:
            BadRequestError: the CSR is unreadable (400).
            ProofOfPossessionError: the CSR's signature fails (400).
            PolicyViolationError: the template forbids the request (403).
        """
        request = load_certificate_request(csr_der)
        return self._issue(profile, request, client, "simpleenroll", renewing=None)

    def reenroll(
        self, profile: EnrollmentProfile, csr_der: bytes, client: ClientIdentity
    ) -> x509.Certificate:
        """RFC 7030 4.2.2 simplereenroll: the same names, a new certificate.

        Raises:
            ClientCertificateError: the presented certificate is unknown or revoked (403).
            BadRequestError, ProofOfPossessionError, PolicyViolationError: as for `enroll`.
        """
        assert client.certificate is not None
        presented = client.certificate

        # Step 1b (authentication, continued): the certificate must be one this CA issued and
        # that is not revoked, whichever node issued it; the store is the authority on that.
        with self._database.session() as session:
            record = session.scalar(
                select(IssuedCertificateRow).where(
                    IssuedCertificateRow.ca_id == profile.ca.id,
                    IssuedCertificateRow.serial == serial_hex(presented.serial_number),
                )
            )
        if record is None or record.certificate_der != presented.public_bytes(
            serialization.Encoding.DER
        ):
            raise ClientCertificateError(
                f"client certificate serial {serial_hex(presented.serial_number)} is not one "
                f"that CA {profile.ca.name!r} issued"
            )
        if record.revoked_at is not None:
            raise ClientCertificateError(
                f"client certificate serial {record.serial} was revoked at "
                f"{record.revoked_at.isoformat()}",
                "The client certificate has been revoked.",
            )

        request = load_certificate_request(csr_der)
        return self._issue(profile, request, client, "simplereenroll", renewing=presented)

    def _issue(
        self,
        profile: EnrollmentProfile,
        request: CertificateRequest,
        client: ClientIdentity,
        operation: str,
        renewing: x509.Certificate | None,
    ) -> x509.Certificate:
        # Steps 2 and 3 (parse the CSR, verify its signature) ran in load_certificate_request.

        # Step 4: apply the template; every broken rule is named.
        violations = profile.policy.violations(request)
        if renewing is not None:
            violations += _renewal_name_differences(request, renewing)
        if violations:
            raise PolicyViolationError(violations)

        # Step 5: decide the contents from the template, never from the CSR's extensions.
        ca_certificate = profile.ca.certificate
        not_before = utc_now() - BACKDATE
        not_after = min(
            not_before + datetime.timedelta(days=profile.policy.max_days),
            ca_certificate.not_valid_after_utc,
        )
        key_usages = profile.policy.usages_for(request.key_type)
        names = [san.to_general_name() for san in request.subject_alt_names]

        # Step 6: check the result against what estca guarantees.
        _check_invariants(not_before, not_after, ca_certificate)

        client_fingerprint = fingerprint(client.certificate) if client.certificate else None
        for attempt in range(SERIAL_ATTEMPTS):
            serial = new_serial_number()
            if serial.bit_length() != SERIAL_BITS:
                raise IssuanceInvariantError(f"serial of {serial.bit_length()} bits")

            # Step 7: sign.
            certificate = build_end_entity_certificate(
                subject=request.subject,
                subject_alt_names=names,
                public_key=request.public_key,
                issuer=ca_certificate,
                issuer_key=profile.ca_key,
                not_before=not_before,
                not_after=not_after,
                key_usages=key_usages,
                extended_key_usages=profile.policy.extended_key_usage,
                serial_number=serial,
            )

            # Step 8: record, and commit before anything is returned.
            row = IssuedCertificateRow(
                ca_id=profile.ca.id,
                template_id=profile.template_id,
                template_name=profile.template_name,
                serial=serial_hex(serial),
                subject=format_name(request.subject),
                subject_alt_names=[str(san) for san in request.subject_alt_names],
                not_before=not_before,
                not_after=not_after,
                client_fingerprint=client_fingerprint,
                operation=operation,
                certificate_der=certificate.public_bytes(serialization.Encoding.DER),
                issued_at=utc_now(),
            )
            try:
                with self._database.session() as session:
                    session.add(row)
            except IntegrityError:
                logger.warning("serial %s already taken (attempt %d)", row.serial, attempt + 1)
                continue

            # Step 9: audit.
            audit_issued(
                label=profile.label,
                operation=operation,
                serial=row.serial,
                subject=row.subject,
                sans=row.subject_alt_names,
                client=client_fingerprint,
            )

            # Step 10: return.
            return certificate
        raise IssuanceInvariantError("no free serial number after several attempts")


def _check_invariants(
    not_before: datetime.datetime, not_after: datetime.datetime, ca: x509.Certificate
) -> None:
    if not_after <= not_before:
        raise PolicyViolationError(["the issuing CA expires too soon to issue a certificate"])
    if not_after > ca.not_valid_after_utc:
        raise IssuanceInvariantError("validity would end after the issuing CA's")


def _renewal_name_differences(request: CertificateRequest, renewing: x509.Certificate) -> list[str]:
    """RFC 7030 4.2.2: the subject and SAN set must be those of the certificate renewed."""
    differences: list[str] = []
    if comparable_name(request.subject) != comparable_name(renewing.subject):
        differences.append(
            f"the subject {format_name(request.subject)!r} differs from the certificate's "
            f"subject {format_name(renewing.subject)!r}"
        )
    current, _ = read_subject_alt_names(renewing.extensions)
    if comparable_sans(request.subject_alt_names) != comparable_sans(current):
        asked = ", ".join(sorted(str(s) for s in request.subject_alt_names)) or "none"
        held = ", ".join(sorted(str(s) for s in current)) or "none"
        differences.append(f"the SANs ({asked}) differ from the certificate's SANs ({held})")
    return differences
