"""The enrollment profiles a front end serves: everything one EST label needs, loaded once.

A profile is immutable; the server swaps in a new set when the store's generation changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from estca.authority.hierarchy import CertificateAuthority
from estca.authority.policy import TemplatePolicy
from estca.pki.chain import ChainValidator


@dataclass(frozen=True)
class EnrollmentProfile:
    """One EST label: its template, issuing CA and key, and the credentials it accepts."""

    label: str
    template_id: int
    template_name: str
    policy: TemplatePolicy
    ca: CertificateAuthority
    ca_key: CertificateIssuerPrivateKeyTypes
    ca_chain: list[x509.Certificate]
    bootstrap_certificates: list[x509.Certificate]
    bootstrap_validator: ChainValidator
    issued_validator: ChainValidator
    passphrase_hash: str
    bootstrap_validation: bool
    #: SHA-256 fingerprints of bootstrap certificates that are estca's own CAs, to their ids:
    #: a device enrolling with a certificate one of them issued must not be revoked.
    estca_bootstrap_cas: dict[bytes, int]
