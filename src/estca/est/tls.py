"""The server's TLS context: its own certificate, and which client certificates it accepts.

The context trusts the union of every enabled bootstrap chain and issuing chain; which chain a
certificate must belong to is decided per label after the handshake. Each configured
certificate is an anchor (partial-chain mode). Validity dates are not checked here but after the
handshake, so that an expired certificate gets a 403 whose log line says it expired.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME, which Python's ssl module has no name for.
_VERIFY_NO_CHECK_TIME = 0x200000


class ServerIdentity:
    """The server's certificate chain and key, held as PEM files for ``load_cert_chain``."""

    def __init__(self, directory: Path, certificate_pem: bytes, key_pem: bytes) -> None:
        self.directory = directory
        self.certificate_file = directory / "server-chain.pem"
        self.key_file = directory / "server-key.pem"
        self.certificate_file.write_bytes(certificate_pem)
        self.key_file.touch(mode=0o600)
        self.key_file.write_bytes(key_pem)

    @classmethod
    def from_issued(
        cls,
        certificate: x509.Certificate,
        key: CertificateIssuerPrivateKeyTypes,
        chain: Iterable[x509.Certificate],
    ) -> ServerIdentity:
        directory = Path(tempfile.mkdtemp(prefix="estca-tls-"))
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [certificate, *chain])
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(directory, pem, key_pem)

    @classmethod
    def from_files(cls, certificate_file: Path, key_file: Path) -> ServerIdentity:
        directory = Path(tempfile.mkdtemp(prefix="estca-tls-"))
        return cls(directory, certificate_file.read_bytes(), key_file.read_bytes())

    def remove(self) -> None:
        for path in (self.certificate_file, self.key_file):
            path.unlink(missing_ok=True)
        self.directory.rmdir()


def build_server_context(
    identity: ServerIdentity, trusted: Iterable[x509.Certificate]
) -> ssl.SSLContext:
    """A TLS 1.2/1.3 server context that asks every client for a certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(identity.certificate_file, identity.key_file)
    # RFC 7030 3.3.2: the certificate is requested in the initial handshake, never required
    # (cacerts needs none).
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | _VERIFY_NO_CHECK_TIME
    # No resumption: each enrollment proves possession of its client key afresh.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in trusted)
    if pem:
        context.load_verify_locations(cadata=pem)
    return context
