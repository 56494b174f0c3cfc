"""Request bodies read liberally (RFC 8951), responses written strictly."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.serialization import pkcs7

from estca.errors import BadRequestError, UnsupportedMediaTypeError
from estca.est.wire import check_pkcs10_media_type, decode_csr_body
from estca.pki.pkcs7 import base64_lines, certs_only_der
from tests.support import make_certificate, make_csr, name

DER, _ = make_csr(name("device-wire"))
TEXT = base64.b64encode(DER)


def _every(width: int, separator: bytes) -> bytes:
    return separator.join(TEXT[i : i + width] for i in range(0, len(TEXT), width))


@pytest.mark.parametrize(
    "body",
    [
        TEXT,
        _every(64, b"\n") + b"\n",
        _every(76, b"\r\n") + b"\r\n",
        _every(1000, b"\n"),
        b"  \t\n" + TEXT,
        _every(4, b" "),
        _every(8, b"\t"),
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + _every(64, b"\n")
        + b"\n-----END CERTIFICATE REQUEST-----\n",
        DER,
    ],
    ids=["one-line", "lf-64", "crlf-76", "1000-col", "leading-ws", "spaces", "tabs", "pem", "der"],
)
def test_every_form_decodes_to_the_same_csr(body: bytes) -> None:
    assert decode_csr_body(body) == DER


@pytest.mark.parametrize(
    "body",
    [b"", b"  \r\n", TEXT[:8] + b"-" + TEXT[9:], TEXT[:10] + b"%" + TEXT[10:], TEXT[:-3] + b"_"],
    ids=["empty", "blank", "urlsafe-dash", "percent", "underscore"],
)
def test_bodies_outside_the_base64_alphabet_are_refused(body: bytes) -> None:
    with pytest.raises(BadRequestError):
        decode_csr_body(body)


def test_pem_of_another_kind_is_refused() -> None:
    with pytest.raises(BadRequestError, match="not a CSR"):
        decode_csr_body(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/pkcs10",
        "Application/PKCS10",
        "application/pkcs10 ",
        "application/pkcs10; charset=us-ascii",
    ],
    ids=["absent", "empty", "plain", "mixed-case", "trailing-space", "charset"],
)
def test_pkcs10_media_type_variants_are_accepted(content_type: str | None) -> None:
    check_pkcs10_media_type(content_type)


def test_form_urlencoded_is_refused_naming_the_expected_type() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        check_pkcs10_media_type("application/x-www-form-urlencoded")
    assert "application/pkcs10" in caught.value.public_message


def test_base64_lines_are_64_columns_each_ending_in_lf() -> None:
    root = make_certificate(name("wire root"), None, ca=True)
    body = base64_lines(certs_only_der([root.certificate]))
    lines = body.split(b"\n")
    assert lines[-1] == b"" and lines[-2] != b""
    assert all(len(line) <= 64 and len(line) % 4 == 0 for line in lines[:-1])
    assert all(len(line) == 64 for line in lines[:-2])
    assert pkcs7.load_der_pkcs7_certificates(base64.b64decode(body)) == [root.certificate]
