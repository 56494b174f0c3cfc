"""The issuance pipeline: the one place where estca signs an end-entity certificate.

Each step fails closed with one error type. The caller has already authenticated the client
(step 1) before handing over the request body. Steps 2 to 7 are `Issuer._prepare`; steps 8 to
10 are `Issuer._issue`.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import bindparam, select
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
    reencoded_name,
)
from estca.store.database import Database
from estca.store.models import IssuedCertificateRow
from estca.store.writer import IssuanceRecorder

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
class IssuedRecord:
    """What the authentication of a presented certificate needs from its issuance record."""

    serial: str
    template_id: int | None
    template_name: str
    certificate_der: bytes
    revoked_at: datetime.datetime | None


@dataclass(frozen=True)
class ClientIdentity:
    """Who the front end authenticated: the TLS client certificate, if any, and the peer."""

    certificate: x509.Certificate | None
    peer: str


class Issuer:
    """Runs the pipeline for simpleenroll and simplereenroll.

    Parsing, policy and signing run on the caller's event loop when the CA key is an EC or
    EdDSA key (well under a millisecond); RSA CA keys sign in a worker thread. The record is
    committed by the group-commit recorder; the event loop never waits on the database.
    """

    def __init__(self, database: Database) -> None:
        self._database = database
        self.recorder = IssuanceRecorder(database)
        table = IssuedCertificateRow.__table__
        self._record_query = select(
            table.c.serial,
            table.c.template_id,
            table.c.template_name,
            table.c.certificate_der,
            table.c.revoked_at,
        ).where(table.c.ca_id == bindparam("ca_id"), table.c.serial == bindparam("serial"))

    async def enroll(
        self, profile: EnrollmentProfile, csr_der: bytes, client: ClientIdentity
    ) -> x509.Certificate:
        """RFC 7030 4.2.1 simpleenroll.

        Raises:
            BadRequestError: the CSR is unreadable (400).
            ProofOfPossessionError: the CSR's signature fails (400).
            PolicyViolationError: the template forbids the request (403).
        """
        return await self._issue(profile, csr_der, client, "simpleenroll", renewing=None)

    async def reenroll(
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
        # It must also have been issued under this label's template: a certificate of another
        # template must not switch to this one's rules on the strength of a passphrase alone.
        await self.check_issued_and_not_revoked(
            profile.ca.id, profile.ca.name, presented, template_id=profile.template_id
        )
        return await self._issue(profile, csr_der, client, "simplereenroll", renewing=presented)

    async def check_issued_and_not_revoked(
        self,
        ca_id: int,
        ca_name: str,
        presented: x509.Certificate,
        template_id: int | None = None,
    ) -> None:
        """Refuse a client certificate that CA ``ca_id`` did not issue, or that is revoked;
        with ``template_id``, also one issued under another template.

        Raises:
            ClientCertificateError: unknown to the store, or revoked (403).
        """
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(None, self._find_record, ca_id, presented)
        if record is None or record.certificate_der != presented.public_bytes(
            serialization.Encoding.DER
        ):
            raise ClientCertificateError(
                f"client certificate serial {serial_hex(presented.serial_number)} is not one "
                f"that CA {ca_name!r} issued"
            )
        if record.revoked_at is not None:
            raise ClientCertificateError(
                f"client certificate serial {record.serial} was revoked at "
                f"{record.revoked_at.isoformat()}",
                "The client certificate has been revoked.",
            )
        if template_id is not None and record.template_id != template_id:
            raise ClientCertificateError(
                f"client certificate serial {record.serial} was issued under template "
                f"{record.template_name!r}, not this label's"
            )

    def _find_record(self, ca_id: int, presented: x509.Certificate) -> IssuedRecord | None:
        # A plain SELECT of the columns needed: no ORM session on the hot path.
        with self._database.engine.connect() as connection:
            row = connection.execute(
                self._record_query,
                {"ca_id": ca_id, "serial": serial_hex(presented.serial_number)},
            ).first()
        return IssuedRecord(*row) if row is not None else None

    async def _issue(
        self,
        profile: EnrollmentProfile,
        csr_der: bytes,
        client: ClientIdentity,
        operation: str,
        renewing: x509.Certificate | None,
    ) -> x509.Certificate:
        loop = asyncio.get_running_loop()
        signs_fast = not isinstance(profile.ca_key, rsa.RSAPrivateKey)
        for attempt in range(SERIAL_ATTEMPTS):
            if signs_fast:
                certificate, row = self._prepare(profile, csr_der, client, operation, renewing)
            else:
                certificate, row = await loop.run_in_executor(
                    None, self._prepare, profile, csr_der, client, operation, renewing
                )

            # Step 8: record, and commit before anything is returned.
            try:
                await asyncio.wrap_future(self.recorder.record(row))
            except IntegrityError:
                logger.warning("serial %s already taken (attempt %d)", row["serial"], attempt + 1)
                continue

            # Step 9: audit.
            audit_issued(
                label=profile.label,
                operation=operation,
                serial=row["serial"],
                subject=row["subject"],
                sans=row["subject_alt_names"],
                client=row["client_fingerprint"],
            )

            # Step 10: return.
            return certificate
        raise IssuanceInvariantError("no free serial number after several attempts")

    def _prepare(
        self,
        profile: EnrollmentProfile,
        csr_der: bytes,
        client: ClientIdentity,
        operation: str,
        renewing: x509.Certificate | None,
    ) -> tuple[x509.Certificate, dict[str, Any]]:
        # Steps 2 and 3: parse the CSR and verify its signature (proof of possession).
        request = load_certificate_request(csr_der)

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
        serial = new_serial_number()

        # Step 6: check the result against what estca guarantees.
        _check_invariants(not_before, not_after, ca_certificate)
        if serial.bit_length() != SERIAL_BITS:
            raise IssuanceInvariantError(f"serial of {serial.bit_length()} bits")

        # A name asked for twice is written once.
        unique_sans = list({san.comparable(): san for san in request.subject_alt_names}.values())

        # Step 7: sign.
        certificate = build_end_entity_certificate(
            subject=reencoded_name(request.subject),
            subject_alt_names=[san.to_general_name() for san in unique_sans],
            public_key=request.public_key,
            issuer=ca_certificate,
            issuer_key=profile.ca_key,
            not_before=not_before,
            not_after=not_after,
            key_usages=profile.policy.usages_for(request.key_type),
            extended_key_usages=profile.policy.extended_key_usage,
            serial_number=serial,
        )
        row: dict[str, Any] = {
            "ca_id": profile.ca.id,
            "template_id": profile.template_id,
            "template_name": profile.template_name,
            "serial": serial_hex(serial),
            "subject": format_name(request.subject),
            "subject_alt_names": [str(san) for san in unique_sans],
            "not_before": not_before,
            "not_after": not_after,
            "client_fingerprint": fingerprint(client.certificate) if client.certificate else None,
            "operation": operation,
            "certificate_der": certificate.public_bytes(serialization.Encoding.DER),
            "issued_at": utc_now(),
        }
        return certificate, row


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
