"""Reading a PKCS#10 request whatever state it arrives in, and checking its proof of possession."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from estca.errors import BadRequestError, ProofOfPossessionError
from estca.pki.keys import describe_public_key
from estca.pki.names import SubjectAltName, read_subject_alt_names


@dataclass(frozen=True)
class CertificateRequest:
    """What estca takes from a CSR: its key, the names it asks for, nothing else."""

    csr: x509.CertificateSigningRequest
    public_key: CertificatePublicKeyTypes
    key_type: str
    subject: x509.Name
    subject_alt_names: list[SubjectAltName]
    unsupported_san_types: list[str]


def load_certificate_request(der: bytes) -> CertificateRequest:
    """Parse a DER CSR and verify its signature (RFC 2986; RFC 7030 3.4 proof of possession).

    Raises:
        BadRequestError: the bytes are not a CSR estca can read.
        ProofOfPossessionError: the CSR is not signed by the key it carries.
    """
    # cryptography raises ValueError for bad DER, but also UnsupportedAlgorithm, InvalidVersion
    # and, from its Rust core, a PanicException derived from BaseException: all are the
    # client's fault.
    try:
        csr = x509.load_der_x509_csr(der)
        public_key = csr.public_key()
        subject = csr.subject
        extensions = csr.extensions
        signature_valid = csr.is_signature_valid
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 - see the comment above
        raise BadRequestError(f"unreadable CSR: {type(exc).__name__}: {exc}") from None
    if not signature_valid:
        raise ProofOfPossessionError("CSR signature does not verify with its public key")
    names, unsupported = read_subject_alt_names(extensions)
    return CertificateRequest(
        csr=csr,
        public_key=public_key,
        key_type=describe_public_key(public_key),
        subject=subject,
        subject_alt_names=names,
        unsupported_san_types=unsupported,
    )
