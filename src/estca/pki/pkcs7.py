"""The EST wire form of certificates: a degenerate PKCS#7 SignedData, base64 at 64 columns."""

from __future__ import annotations

import base64

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

#: RFC 7030 4.1.3 / 4.2.3 response media type.
CERTS_ONLY_MEDIA_TYPE = "application/pkcs7-mime; smime-type=certs-only"

#: Width of a base64 line: the PEM width, which `openssl base64 -d` needs.
BASE64_LINE = 64


def certs_only_der(certificates: list[x509.Certificate]) -> bytes:
    """A certs-only SignedData holding these certificates (DER, definite lengths).

    The order given is not kept: DER sorts the certificates SET OF by encoding (X.690 11.6),
    which in practice puts the shorter certificate first.
    """
    return pkcs7.serialize_certificates(certificates, Encoding.DER)


def base64_lines(data: bytes) -> bytes:
    """Base64 in lines of 64 characters, each ending in LF, the last one included."""
    text = base64.b64encode(data)
    lines = [text[i : i + BASE64_LINE] for i in range(0, len(text), BASE64_LINE)]
    return b"".join(line + b"\n" for line in lines)
