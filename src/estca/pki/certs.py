"""Building CA, server and end-entity certificates from already-decided contents."""

from __future__ import annotations

import datetime
import secrets

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

from estca.pki.keys import signature_hash

#: Serial numbers carry 159 random bits: positive, at most 20 octets (RFC 5280 4.1.2.2).
SERIAL_BITS = 159

#: Certificates start this long before their issuance, for devices whose clocks run late.
BACKDATE = datetime.timedelta(minutes=1)

KEY_USAGE_NAMES = (
    "digitalSignature",
    "contentCommitment",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
)
_KEY_USAGE_ARGUMENTS = {
    "digitalSignature": "digital_signature",
    "contentCommitment": "content_commitment",
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
    "keyCertSign": "key_cert_sign",
    "cRLSign": "crl_sign",
    "encipherOnly": "encipher_only",
    "decipherOnly": "decipher_only",
}
EXTENDED_KEY_USAGES: dict[str, x509.ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
}


def new_serial_number() -> int:
    """A random positive serial of ``SERIAL_BITS`` bits whose top bit is set, so never zero."""
    return secrets.randbits(SERIAL_BITS - 1) | (1 << (SERIAL_BITS - 1))


def key_usage(names: list[str]) -> x509.KeyUsage:
    flags = {argument: name in names for name, argument in _KEY_USAGE_ARGUMENTS.items()}
    return x509.KeyUsage(**flags)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def build_ca_certificate(
    *,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    days: int,
    path_length: int | None,
) -> x509.Certificate:
    """A root (no issuer) or intermediate CA certificate (RFC 5280 4.2.1.9, 4.2.1.3)."""
    not_before = utc_now() - BACKDATE
    not_after = not_before + datetime.timedelta(days=days)
    if issuer is not None:
        not_after = min(not_after, issuer.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(new_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(["keyCertSign", "cRLSign"]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer_key, signature_hash(issuer_key))


def build_end_entity_certificate(
    *,
    subject: x509.Name,
    subject_alt_names: list[x509.GeneralName],
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    key_usages: list[str],
    extended_key_usages: list[str],
    serial_number: int,
) -> x509.Certificate:
    """An end-entity certificate whose every extension was decided by the caller."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(serial_number)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if key_usages:
        builder = builder.add_extension(key_usage(key_usages), critical=True)
    if extended_key_usages:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([EXTENDED_KEY_USAGES[name] for name in extended_key_usages]),
            critical=False,
        )
    if subject_alt_names:
        # RFC 5280 4.2.1.6: the extension is critical when the subject is empty.
        builder = builder.add_extension(
            x509.SubjectAlternativeName(subject_alt_names), critical=not subject.rdns
        )
    return builder.sign(issuer_key, signature_hash(issuer_key))
