"""EST wire formats: reading request bodies liberally (RFC 8951) and writing responses strictly."""

from __future__ import annotations

import base64
import binascii
import re

from estca.errors import BadRequestError, UnsupportedMediaTypeError

#: Request bodies larger than this are refused (a CSR with hundreds of SANs is about 20 KB).
MAX_BODY_BYTES = 64 * 1024

PKCS10_MEDIA_TYPE = "application/pkcs10"

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


def check_pkcs10_media_type(content_type: str | None) -> None:
    """Accept ``application/pkcs10`` in any case, with parameters, or no Content-Type at all.

    Raises:
        UnsupportedMediaTypeError: any other media type (415).
    """
    if content_type is None or not content_type.strip():
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != PKCS10_MEDIA_TYPE:
        raise UnsupportedMediaTypeError(f"Content-Type {content_type!r} is not {PKCS10_MEDIA_TYPE}")


def decode_csr_body(body: bytes) -> bytes:
    """The DER of a CSR sent as base64 (any line breaks and blanks), PEM, or raw DER.

    RFC 8951 section 3: the Content-Transfer-Encoding header is ignored; base64 is what EST
    sends, but clients also send PEM files and raw DER, and all are recognised.

    Raises:
        BadRequestError: empty, or not one of the three forms.
    """
    if not body.strip():
        raise BadRequestError("empty request body")
    # A DER SEQUENCE starts with 0x30, which in base64 text would be the digit '0'; base64 of
    # a DER CSR always starts with 'M', so a leading 0x30 byte means raw DER.
    if body[0] == 0x30:
        return body
    match = _PEM_BLOCK.search(body)
    if match is not None:
        if match.group(1) not in (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"):
            raise BadRequestError(f"PEM block {match.group(1).decode()!r} is not a CSR")
        body = match.group(2)
    text = b"".join(body.split())
    if not text or _BASE64_TEXT.fullmatch(text) is None:
        raise BadRequestError("the body is not base64, PEM or DER")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise BadRequestError(f"bad base64: {exc}") from None
