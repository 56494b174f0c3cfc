"""The interoperability cases of CONFORMANCE.md, each against the real server over TLS.

Every test name carries its case id (W1 ... H3). Requests go through curl where a device would
use a stock client, and through raw TLS sockets where the exact bytes on the wire are the point.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import re
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import SignatureAlgorithmOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc2315

from estca.est.server import BODY_TIMEOUT_SECONDS
from estca.est.wire import MAX_BODY_BYTES
from tests.conftest import Deployment
from tests.support import (
    EstServer,
    Response,
    basic,
    make_csr,
    name,
    new_key,
    openssl,
    utc_now,
)

PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"
TEXT_PLAIN = "text/plain; charset=utf-8"
STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
HeaderList = list[tuple[str, str]]


# Requests -----------------------------------------------------------------------------------


def enroll(
    deployment: Deployment,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    cert: tuple[Path, Path] | None = None,
    operation: str = "simpleenroll",
    label: str = "devices",
    server: EstServer | None = None,
) -> Response:
    """One enrollment with curl, with both factors unless told otherwise."""
    return (server or deployment.server).curl(
        label,
        operation,
        body=body,
        cert=cert or deployment.bootstrap,
        password=deployment.passphrase,
        headers=headers,
    )


def http_request(
    deployment: Deployment,
    method: str,
    operation: str,
    headers: HeaderList,
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
    label: str = "devices",
    path: str | None = None,
) -> bytes:
    """The exact bytes of one request: the request line, Host, the given headers, the body."""
    target = path or f"/.well-known/est/{label}/{operation}"
    lines = [f"{method} {target} {version}", f"Host: localhost:{deployment.server.port}"]
    lines += [f"{key}: {value}" for key, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def enroll_headers(deployment: Deployment, body: bytes) -> HeaderList:
    return [
        ("Content-Type", "application/pkcs10"),
        ("Authorization", basic(deployment.passphrase)),
        ("Content-Length", str(len(body))),
    ]


def chunked(body: bytes, size: int) -> bytes:
    """The body in chunked transfer coding (RFC 9112 7.1), chunks of ``size`` bytes."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


@contextlib.contextmanager
def tls_connection(
    deployment: Deployment,
    cert: tuple[Path, Path] | None = None,
    timeout: float = 15.0,
    port: int | None = None,
) -> Iterator[ssl.SSLSocket]:
    context = ssl.create_default_context(cafile=str(deployment.server.server_ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    address = ("127.0.0.1", port or deployment.server.port)
    with socket.create_connection(address, timeout=timeout) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            yield tls


def read_until_closed(tls: ssl.SSLSocket) -> bytes:
    """Everything the server sends until it closes; a socket timeout means it never did."""
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    return data


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """The status line, headers (lower-case names) and body of one whole response."""
    head, separator, body = data.partition(b"\r\n\r\n")
    assert separator, data
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status_line, headers, body


def read_response(tls: ssl.SSLSocket) -> Response:
    """One response read by its Content-Length, leaving the connection as it is."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    status_line, headers, body = split_response(data)
    while len(body) < int(headers.get("content-length", "0")):
        chunk = tls.recv(65536)
        assert chunk, f"connection closed inside the body: {body!r}"
        body += chunk
    return Response(int(status_line.split(" ")[1]), headers, body, data.partition(b"\r\n\r\n")[0])


# CSRs and devices ---------------------------------------------------------------------------


def device_csr(
    common_name: str,
    kind: str = "ec-p256",
    sans: list[x509.GeneralName] | None = None,
    key: CertificateIssuerPrivateKeyTypes | None = None,
) -> tuple[bytes, CertificateIssuerPrivateKeyTypes]:
    return make_csr(name(common_name, O="Acme"), key or new_key(kind), sans)


def dns_names(count: int, prefix: str = "host") -> list[x509.GeneralName]:
    return [x509.DNSName(f"{prefix}-{index:04d}.devices.test") for index in range(count)]


def public_der(key: CertificateIssuerPrivateKeyTypes | x509.Certificate) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def issued_certificate(
    response: Response, key: CertificateIssuerPrivateKeyTypes
) -> x509.Certificate:
    """The one certificate of a 200 answer, checked to carry the CSR's key."""
    assert response.status == 200, response.body
    (certificate,) = response.certificates()
    assert public_der(certificate) == public_der(key)
    return certificate


def enrolled_device(
    deployment: Deployment,
    stem: str,
    common_name: str,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[tuple[Path, Path], x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    """Enroll a new device; its (certificate, key) files, the certificate, and the key."""
    der, key = device_csr(common_name, sans=sans)
    certificate = issued_certificate(enroll(deployment, der), key)
    cert_path, key_path = deployment.work / f"{stem}.pem", deployment.work / f"{stem}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return (cert_path, key_path), certificate, key


def assert_refused(
    deployment: Deployment, mark: int, response: Response, status: int, text: str
) -> str:
    """The status, a text body holding ``text``, and the audit line of the refusal."""
    assert response.status == status, response.body
    assert text in response.body.decode("utf-8"), response.body
    assert response.header("content-type") == TEXT_PLAIN
    return deployment.server.wait_for_log(mark, f"refused .*status={status} ")


# W: request bodies --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_csr() -> tuple[bytes, CertificateIssuerPrivateKeyTypes]:
    """A CSR whose base64 spans several 1000-column lines (about 2 KB of DER)."""
    return device_csr("device-wire", sans=dns_names(60, "wire"))


def pem_lf(der: bytes) -> bytes:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    "as_pem",
    [
        pem_lf,
        lambda der: pem_lf(der).replace(b"\n", b"\r\n"),
        lambda der: (
            b"Certificate Request:\n    Data: (as openssl req -text prints it)\n" + pem_lf(der)
        ),
    ],
    ids=["pem-lf", "pem-crlf", "pem-after-text"],
)
def test_w1_whole_pem_file_is_recognised_and_enrolled(
    deployment: Deployment, as_pem: Callable[[bytes], bytes]
) -> None:
    der, key = device_csr("device-w1")
    body = as_pem(der)
    assert body.count(b"-----BEGIN CERTIFICATE REQUEST-----") == 1
    assert body.rstrip(b"\r\n").endswith(b"-----END CERTIFICATE REQUEST-----")

    issued_certificate(enroll(deployment, body), key)


def wrapped(text: bytes, width: int, newline: bytes) -> bytes:
    return b"".join(text[i : i + width] + newline for i in range(0, len(text), width))


def grouped(text: bytes, width: int, separator: bytes) -> bytes:
    return separator.join(text[i : i + width] for i in range(0, len(text), width))


BASE64_LAYOUTS: dict[str, Callable[[bytes], bytes]] = {
    "one-line": lambda text: text,
    "lf-every-64": lambda text: wrapped(text, 64, b"\n"),
    "crlf-every-76": lambda text: wrapped(text, 76, b"\r\n"),
    "1000-columns": lambda text: wrapped(text, 1000, b"\n"),
    "trailing-lf": lambda text: text + b"\n",
    "trailing-crlf": lambda text: text + b"\r\n",
    "spaces-between-groups": lambda text: grouped(text, 4, b" "),
    "tabs-between-groups": lambda text: grouped(text, 16, b"\t"),
    "leading-white-space": lambda text: b" \t\r\n  " + wrapped(text, 64, b"\n"),
}


@pytest.mark.parametrize("layout", list(BASE64_LAYOUTS), ids=list(BASE64_LAYOUTS))
def test_w2_base64_variants_decode_to_same_csr(
    deployment: Deployment,
    large_csr: tuple[bytes, CertificateIssuerPrivateKeyTypes],
    layout: str,
) -> None:
    der, key = large_csr
    body = BASE64_LAYOUTS[layout](base64.b64encode(der))
    if layout == "1000-columns":
        assert body.count(b"\n") >= 2

    certificate = issued_certificate(enroll(deployment, body), key)

    requested = x509.load_der_x509_csr(der)
    assert certificate.subject == requested.subject
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == list(requested.extensions.get_extension_for_class(type(sans)).value)


@pytest.mark.parametrize("character", [b"-", b"_", b"%"], ids=["dash", "underscore", "percent"])
def test_w2_characters_outside_standard_base64_alphabet_are_400(
    deployment: Deployment,
    large_csr: tuple[bytes, CertificateIssuerPrivateKeyTypes],
    character: bytes,
) -> None:
    text = base64.b64encode(large_csr[0])
    body = wrapped(text[:128] + character + text[128:], 64, b"\n")
    mark = deployment.server.log_mark()

    response = enroll(deployment, body)

    assert_refused(deployment, mark, response, 400, "Malformed request.")
    deployment.server.wait_for_log(mark, "status=400 reason=.*not base64, PEM or DER")


def test_w3_raw_der_with_pkcs10_content_type_is_enrolled(deployment: Deployment) -> None:
    der, key = device_csr("device-w3")
    assert der[0] == 0x30

    response = enroll(deployment, der, headers={"Content-Type": "application/pkcs10"})

    issued_certificate(response, key)


@pytest.mark.parametrize(
    ("transfer_encoding", "as_der"),
    [
        (None, False),
        ("base64", False),
        ("BASE64", False),
        ("Base64", False),
        ("binary", False),
        ("binary", True),
        ("BASE64", True),
    ],
    ids=[
        "absent",
        "base64",
        "upper-case",
        "mixed-case",
        "binary-on-base64-body",
        "binary-on-der-body",
        "base64-on-der-body",
    ],
)
def test_w4_content_transfer_encoding_is_ignored(
    deployment: Deployment, transfer_encoding: str | None, as_der: bool
) -> None:
    der, key = device_csr("device-w4")
    body = der if as_der else base64.encodebytes(der)
    headers = {"Content-Type": "application/pkcs10"}
    if transfer_encoding is not None:
        headers["Content-Transfer-Encoding"] = transfer_encoding

    issued_certificate(enroll(deployment, body, headers=headers), key)


@pytest.mark.parametrize(
    "content_type",
    [
        "application/pkcs10; charset=us-ascii",
        "Application/PKCS10",
        "application/pkcs10 ",
        "application/pkcs10",
        None,
    ],
    ids=["charset-parameter", "mixed-case", "trailing-space", "plain", "absent"],
)
def test_w5_pkcs10_content_type_in_any_spelling_or_absent_is_accepted(
    deployment: Deployment, content_type: str | None
) -> None:
    der, key = device_csr("device-w5")
    body = base64.encodebytes(der)
    headers = [("Authorization", basic(deployment.passphrase)), ("Content-Length", str(len(body)))]
    if content_type is not None:
        headers.append(("Content-Type", content_type))

    response = deployment.server.raw(
        http_request(deployment, "POST", "simpleenroll", headers, body), cert=deployment.bootstrap
    )

    issued_certificate(response, key)


def test_w5_form_urlencoded_body_is_415_naming_expected_type(deployment: Deployment) -> None:
    der, _ = device_csr("device-w5-form")
    mark = deployment.server.log_mark()

    # What curl -d sends.
    response = enroll(
        deployment,
        base64.encodebytes(der),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert_refused(deployment, mark, response, 415, "application/pkcs10")
    deployment.server.wait_for_log(mark, "status=415 reason=.*x-www-form-urlencoded")


def recase(headers: HeaderList, change: Callable[[str], str]) -> HeaderList:
    return [(change(key), value) for key, value in headers]


HEADER_CASES: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "lower": str.lower,
    "alternating": lambda key: "".join(
        c.upper() if i % 2 else c.lower() for i, c in enumerate(key)
    ),
}


@pytest.mark.parametrize("case", list(HEADER_CASES), ids=list(HEADER_CASES))
def test_w6_header_names_in_any_case_enroll(deployment: Deployment, case: str) -> None:
    der, key = device_csr("device-w6")
    body = base64.encodebytes(der)
    headers = recase(enroll_headers(deployment, body), HEADER_CASES[case])
    assert ("authorization" in dict(headers)) == (case == "lower")

    response = deployment.server.raw(
        http_request(deployment, "POST", "simpleenroll", headers, body), cert=deployment.bootstrap
    )

    issued_certificate(response, key)


@pytest.mark.parametrize("case", list(HEADER_CASES), ids=list(HEADER_CASES))
def test_w6_header_names_in_any_case_keep_their_refusals(deployment: Deployment, case: str) -> None:
    der, _ = device_csr("device-w6-refused")
    body = base64.encodebytes(der)
    form = [("Content-Type", "application/x-www-form-urlencoded")]
    wrong = [("Authorization", basic("not the passphrase"))]
    length = [("Content-Length", str(len(body)))]
    server = deployment.server

    mark = server.log_mark()
    media = server.raw(
        http_request(
            deployment,
            "POST",
            "simpleenroll",
            recase([*form, *enroll_headers(deployment, body)[1:]], HEADER_CASES[case]),
            body,
        ),
        cert=deployment.bootstrap,
    )
    assert_refused(deployment, mark, media, 415, "application/pkcs10")

    mark = server.log_mark()
    password = server.raw(
        http_request(
            deployment, "POST", "simpleenroll", recase([*wrong, *length], HEADER_CASES[case]), body
        ),
        cert=deployment.bootstrap,
    )
    assert_refused(deployment, mark, password, 401, "The passphrase is wrong.")
    assert password.header("www-authenticate") == 'Basic realm="estca"'


@pytest.mark.parametrize(
    "framing", ["content-length", "chunked"], ids=["content-length", "chunked"]
)
def test_w7_ten_megabyte_body_is_refused_413_before_it_has_all_arrived(
    deployment: Deployment, framing: str
) -> None:
    declared = 10 * 1024 * 1024
    headers: HeaderList = [
        ("Content-Type", "application/pkcs10"),
        ("Authorization", basic(deployment.passphrase)),
    ]
    headers.append(
        ("Content-Length", str(declared))
        if framing == "content-length"
        else ("Transfer-Encoding", "chunked")
    )
    # Twice the limit is sent; the rest of the 10 MB never is, so an answer proves that the
    # server did not wait for (or hold) the whole body.
    sent = b"M" * (2 * MAX_BODY_BYTES)
    first = sent if framing == "content-length" else chunked(sent, 16 * 1024)[: -len(b"0\r\n\r\n")]
    mark = deployment.server.log_mark()

    with tls_connection(deployment, deployment.bootstrap) as tls:
        tls.sendall(http_request(deployment, "POST", "simpleenroll", headers) + first)
        response = read_response(tls)

    assert_refused(deployment, mark, response, 413, "The request body is too large.")


@pytest.mark.parametrize(
    "declared", [MAX_BODY_BYTES + 1, 10**12], ids=["just-over-limit", "a-terabyte"]
)
def test_w7_content_length_over_limit_with_short_body_is_413_at_once(
    deployment: Deployment, declared: int
) -> None:
    headers = [*enroll_headers(deployment, b"")[:2], ("Content-Length", str(declared))]
    mark = deployment.server.log_mark()
    started = time.monotonic()

    with tls_connection(deployment, deployment.bootstrap) as tls:
        tls.sendall(http_request(deployment, "POST", "simpleenroll", headers, b"MIIB"))
        response = read_response(tls)

    assert time.monotonic() - started < BODY_TIMEOUT_SECONDS / 2
    assert_refused(deployment, mark, response, 413, "The request body is too large.")


def test_w7_content_length_larger_than_body_sent_times_out_cleanly(
    deployment: Deployment,
) -> None:
    der, _ = device_csr("device-w7-short")
    body = base64.encodebytes(der)
    headers = [*enroll_headers(deployment, body)[:2], ("Content-Length", str(len(body) + 1000))]
    mark = deployment.server.log_mark()

    with tls_connection(deployment, deployment.bootstrap, timeout=BODY_TIMEOUT_SECONDS + 15) as tls:
        tls.sendall(http_request(deployment, "POST", "simpleenroll", headers, body))
        response = read_response(tls)

    assert_refused(deployment, mark, response, 408, "The request body did not arrive in time.")


def test_w7_csr_of_20_kilobytes_with_500_sans_is_enrolled(deployment: Deployment) -> None:
    sans = dns_names(500, "a-rather-long-host-name-for-size")
    der, key = device_csr("device-w7-many-names", sans=sans)
    body = base64.encodebytes(der)
    assert 20_000 <= len(body) <= MAX_BODY_BYTES

    certificate = issued_certificate(enroll(deployment, body), key)

    issued = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(issued) == sans


# R: responses -------------------------------------------------------------------------------


def base64_answer(deployment: Deployment, operation: str) -> Response:
    """A 200 base64 answer of the operation, read from the raw socket with its exact head."""
    if operation == "cacerts":
        request = http_request(deployment, "GET", "cacerts", [])
        return deployment.server.raw(request)
    cert = deployment.bootstrap
    if operation == "simplereenroll":
        cert, _, _ = enrolled_device(deployment, "r-current", "device-r-answer")
    body = base64.encodebytes(device_csr("device-r-answer")[0])
    request = http_request(deployment, "POST", operation, enroll_headers(deployment, body), body)
    return deployment.server.raw(request, cert=cert)


BASE64_OPERATIONS = ["cacerts", "simpleenroll", "simplereenroll"]


@pytest.mark.parametrize("operation", BASE64_OPERATIONS, ids=BASE64_OPERATIONS)
def test_r1_base64_body_is_wrapped_at_64_with_lf_and_sized_never_chunked(
    deployment: Deployment, operation: str
) -> None:
    response = base64_answer(deployment, operation)

    assert response.status == 200, response.body
    assert response.header("content-transfer-encoding") == "base64"
    assert response.header("content-length") == str(len(response.body))
    assert response.header("transfer-encoding") is None
    assert b"\r" not in response.body
    lines = response.body.split(b"\n")[:-1]
    assert lines and all(len(line) == 64 for line in lines[:-1])
    assert 0 < len(lines[-1]) <= 64
    assert base64.b64decode(b"".join(lines), validate=True)


def openssl_print_certs(der: bytes) -> list[str]:
    """The subjects that ``openssl pkcs7 -print_certs`` finds in a DER PKCS#7."""
    printed = openssl("pkcs7", "-inform", "DER", "-print_certs", "-noout", input_bytes=der)
    assert printed.returncode == 0, printed.stderr
    return re.findall(r"^subject=(.*)$", printed.stdout.decode(), flags=re.MULTILINE)


@pytest.mark.parametrize("operation", ["simpleenroll", "simplereenroll"])
def test_r2_enroll_answers_200_certs_only_with_exactly_the_issued_certificate(
    deployment: Deployment, operation: str
) -> None:
    cert = deployment.bootstrap
    if operation == "simplereenroll":
        cert, _, _ = enrolled_device(deployment, "r2-current", "device-r2")
    der, key = device_csr("device-r2")

    response = enroll(deployment, der, cert=cert, operation=operation)

    assert response.status == 200, response.body
    assert response.header("content-type") == PKCS7_CERTS_ONLY
    pkcs7_der = base64.b64decode(response.body)
    (certificate,) = pkcs7.load_der_pkcs7_certificates(pkcs7_der)
    (printed_subject,) = openssl_print_certs(pkcs7_der)
    assert "CN = device-r2" in printed_subject
    assert public_der(certificate) == public_der(key)
    assert certificate.subject == name("device-r2", O="Acme")
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not constraints.ca
    serial = format(certificate.serial_number, "x")
    (record,) = deployment.installation.json("cert", "show", serial)
    assert record["operation"] == operation


def write_pem(path: Path, certificates: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


CHAINS = {
    "devices": ["CN=Test Issuing CA,O=estca tests", "CN=Test Root,O=estca tests,C=NL"],
    "rsa-devices": ["CN=Test RSA Issuing CA,O=estca tests", "CN=Test Root,O=estca tests,C=NL"],
}


def cacerts_of(deployment: Deployment, rsa_label: str, label: str) -> list[x509.Certificate]:
    assert label in (rsa_label, "devices")
    first = deployment.server.curl(label, "cacerts")
    second = deployment.server.curl(label, "cacerts")
    assert first.status == second.status == 200
    # Stable: the same bytes every time.
    assert first.body == second.body
    return first.certificates()


@pytest.mark.parametrize("label", list(CHAINS), ids=["ec-issuing-ca", "rsa-issuing-ca"])
def test_r3_cacerts_holds_whole_chain_to_root_and_issued_certificate_verifies_against_it(
    deployment: Deployment, rsa_label: str, label: str
) -> None:
    chain = cacerts_of(deployment, rsa_label, label)

    assert sorted(c.subject.rfc4514_string() for c in chain) == sorted(CHAINS[label])
    by_subject = {c.subject: c for c in chain}
    for certificate in chain:
        certificate.verify_directly_issued_by(by_subject[certificate.issuer])
    (root,) = [c for c in chain if c.issuer == c.subject]
    der, key = device_csr("device-r3")
    issued = issued_certificate(enroll(deployment, der, label=label), key)
    issuing = by_subject[issued.issuer]
    assert issuing is not root
    cafile = write_pem(deployment.work / f"r3-{label}-cacerts.pem", chain)
    leaf = write_pem(deployment.work / f"r3-{label}-leaf.pem", [issued])
    verified = openssl("verify", "-CAfile", str(cafile), str(leaf))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip().endswith(b": OK")


@pytest.mark.parametrize("label", list(CHAINS), ids=["ec-issuing-ca", "rsa-issuing-ca"])
def test_r3_cacerts_order_is_the_der_set_order(
    deployment: Deployment, rsa_label: str, label: str
) -> None:
    # R3 asks for the issuing CA first; R4 for strict DER, where the certificates SET OF is
    # sorted by encoding (X.690 11.6). estca keeps R4: cryptography warns that an unsorted set
    # "may become an exception". So the order is stable, and issuing-first only when the
    # issuing CA's certificate sorts first (the EC label), not always (the RSA-3072 label).
    chain = cacerts_of(deployment, rsa_label, label)

    encodings = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    assert encodings == sorted(encodings)
    if label == "devices":
        assert [c.subject.rfc4514_string() for c in chain] == CHAINS[label]


@pytest.mark.parametrize("operation", BASE64_OPERATIONS, ids=BASE64_OPERATIONS)
def test_r4_pkcs7_is_strict_der_degenerate_signed_data_every_parser_reads(
    deployment: Deployment, operation: str
) -> None:
    response = base64_answer(deployment, operation)
    assert response.status == 200, response.body
    pkcs7_der = base64.b64decode(response.body)

    # Definite lengths: the outer SEQUENCE's length octet is never 0x80, nor is any inner one.
    assert pkcs7_der[0] == 0x30 and pkcs7_der[1] != 0x80
    parsed = openssl("asn1parse", "-inform", "DER", input_bytes=pkcs7_der)
    assert parsed.returncode == 0, parsed.stderr
    assert b"pkcs7-signedData" in parsed.stdout
    assert b"l=inf" not in parsed.stdout and b"inf" not in parsed.stdout.lower()

    # Three parsers: openssl, cryptography, and pyasn1's DER codec (which must re-encode it to
    # the very same bytes: no indefinite length, no non-minimal encoding, nothing trailing).
    subjects = openssl_print_certs(pkcs7_der)
    with warnings.catch_warnings():
        # cryptography parses strict DER and only warns when it has to fall back to BER (an
        # unsorted SET OF, an indefinite length): here that is a failure.
        warnings.simplefilter("error")
        certificates = pkcs7.load_der_pkcs7_certificates(pkcs7_der)
    assert len(subjects) == len(certificates) == (2 if operation == "cacerts" else 1)
    content_info, rest = der_decoder.decode(pkcs7_der, asn1Spec=rfc2315.ContentInfo())
    assert rest == b""
    assert der_encoder.encode(content_info) == pkcs7_der
    assert content_info["contentType"] == rfc2315.signedData
    signed_data, rest = der_decoder.decode(
        content_info["content"].asOctets(), asn1Spec=rfc2315.SignedData()
    )
    assert rest == b""
    assert len(signed_data["signerInfos"]) == 0
    assert len(signed_data["certificates"]) == len(certificates)


def assert_strong_signature(certificate: x509.Certificate) -> None:
    algorithm = certificate.signature_hash_algorithm
    assert isinstance(algorithm, STRONG_HASHES), (certificate.subject, algorithm)


def test_r5_issued_ca_and_server_tls_certificates_are_signed_with_sha256_or_stronger(
    deployment: Deployment,
) -> None:
    _, issued, _ = enrolled_device(deployment, "r5", "device-r5")
    chain = deployment.server.curl("devices", "cacerts").certificates()
    with tls_connection(deployment) as tls:
        server_der = tls.getpeercert(binary_form=True)
    assert server_der is not None
    server_certificate = x509.load_der_x509_certificate(server_der)
    server_ca = x509.load_pem_x509_certificates(deployment.server.server_ca.read_bytes())

    for certificate in [issued, *chain, server_certificate, *server_ca]:
        assert_strong_signature(certificate)


ACCEPT_HEADERS = [None, "*/*", "application/json", "text/html, application/xhtml+xml"]


@pytest.mark.parametrize("accept", ACCEPT_HEADERS, ids=["absent", "any", "json", "html"])
@pytest.mark.parametrize("operation", ["cacerts", "simpleenroll"])
def test_r6_any_accept_header_gets_the_standard_pkcs7_answer(
    deployment: Deployment, operation: str, accept: str | None
) -> None:
    headers: HeaderList = [] if accept is None else [("Accept", accept)]
    cert = None
    body = b""
    if operation == "simpleenroll":
        body = base64.encodebytes(device_csr("device-r6")[0])
        headers += enroll_headers(deployment, body)
        cert = deployment.bootstrap
    method = "GET" if operation == "cacerts" else "POST"

    response = deployment.server.raw(
        http_request(deployment, method, operation, headers, body), cert=cert
    )

    assert response.status == 200, response.body
    assert response.header("content-type") == PKCS7_CERTS_ONLY
    assert response.header("content-transfer-encoding") == "base64"
    assert response.certificates()


@pytest.mark.parametrize("operation", BASE64_OPERATIONS, ids=BASE64_OPERATIONS)
def test_r7_base64_body_ends_with_one_lf_and_lines_are_multiples_of_4(
    deployment: Deployment, operation: str
) -> None:
    response = base64_answer(deployment, operation)

    assert response.status == 200, response.body
    assert response.body.endswith(b"\n") and not response.body.endswith(b"\n\n")
    assert int(response.header("content-length") or -1) == len(response.body)
    lines = response.body[:-1].split(b"\n")
    assert all(line and len(line) % 4 == 0 and len(line) <= 64 for line in lines), lines


# K: keys and CSRs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_label(deployment: Deployment) -> str:
    """A second label whose issuing CA has an RSA key (the main one is ECDSA P-256)."""
    run = deployment.installation.run
    run(
        "ca",
        "create-intermediate",
        "rsa-issuing",
        "--parent",
        "root",
        "--subject",
        "CN=Test RSA Issuing CA,O=estca tests",
        "--key-type",
        "rsa-3072",
    )
    run(
        "template",
        "create",
        "rsa-devices",
        "--ca",
        "rsa-issuing",
        "--allow-subject",
        "CN=device-*",
        "--allow-subject",
        "O=*",
        "--key-types",
        "ec-p256,ec-p384,rsa-2048",
        "--max-days",
        "30",
    )
    mark = deployment.server.log_mark()
    run(
        "est",
        "enable",
        "rsa-devices",
        "--label",
        "rsa-devices",
        "--bootstrap-chain",
        str(deployment.work / "maker-chain.pem"),
        "--passphrase-file",
        str(deployment.work / "passphrase.txt"),
    )
    deployment.server.wait_for_log(mark, "labels: .*rsa-devices")
    return "rsa-devices"


KEY_KINDS = ["rsa-2048", "rsa-3072", "rsa-4096", "ec-p256", "ec-p384"]


@pytest.mark.parametrize("ca_kind", ["ec-ca", "rsa-ca"])
@pytest.mark.parametrize("kind", KEY_KINDS, ids=KEY_KINDS)
def test_k1_allowed_key_types_enroll_and_are_signed_with_the_cas_algorithm(
    deployment: Deployment, rsa_label: str, kind: str, ca_kind: str
) -> None:
    label = "devices" if ca_kind == "ec-ca" else rsa_label
    der, key = device_csr(f"device-k1-{kind}", kind)

    certificate = issued_certificate(enroll(deployment, der, label=label), key)

    chain = deployment.server.curl(label, "cacerts").certificates()
    (issuing_ca,) = [c for c in chain if c.subject == certificate.issuer]
    certificate.verify_directly_issued_by(issuing_ca)
    if ca_kind == "ec-ca":
        assert isinstance(issuing_ca.public_key(), ec.EllipticCurvePublicKey)
        assert certificate.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    else:
        assert isinstance(issuing_ca.public_key(), rsa.RSAPublicKey)
        assert certificate.signature_algorithm_oid == SignatureAlgorithmOID.RSA_WITH_SHA256


def test_k1_key_type_the_template_does_not_allow_is_403_naming_it(deployment: Deployment) -> None:
    der, _ = device_csr("device-k1-p521", "ec-p521")
    mark = deployment.server.log_mark()

    response = enroll(deployment, der)

    assert_refused(deployment, mark, response, 403, "key type ec-p521 is not allowed")
    deployment.server.wait_for_log(mark, "status=403 reason=.*key type ec-p521 is not allowed")


def flip_last_signature_byte(der: bytes) -> bytes:
    """The CSR with one bit of its signature (the last BIT STRING of the DER) changed."""
    return der[:-1] + bytes([der[-1] ^ 0x01])


def csr_der(kind: str = "ec-p256") -> bytes:
    return device_csr("device-k2", kind)[0]


BAD_BODIES: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad-signature-ec": (
        lambda: flip_last_signature_byte(csr_der()),
        "proof of possession failed",
    ),
    "bad-signature-rsa": (
        lambda: flip_last_signature_byte(csr_der("rsa-2048")),
        "proof of possession failed",
    ),
    "bad-signature-base64": (
        lambda: base64.encodebytes(flip_last_signature_byte(csr_der())),
        "proof of possession failed",
    ),
    "truncated-der": (lambda: csr_der()[:100], "Malformed request."),
    "truncated-base64": (
        lambda: base64.encodebytes(csr_der())[:120],
        "Malformed request.",
    ),
    "empty": (lambda: b"", "Malformed request."),
    "white-space-only": (lambda: b" \r\n\t\n", "Malformed request."),
    "trailing-garbage-der": (lambda: csr_der() + b"\x00garbage", "Malformed request."),
    "trailing-garbage-base64": (
        lambda: base64.encodebytes(csr_der() + b"garbage"),
        "Malformed request.",
    ),
    "trailing-text-after-base64": (
        lambda: base64.encodebytes(csr_der()) + b"this is not base64!\n",
        "Malformed request.",
    ),
    "der-sequence-claiming-4-gigabytes": (
        lambda: b"\x30\x84\xff\xff\xff\xff" + b"\x00" * 64,
        "Malformed request.",
    ),
    "pem-certificate-not-csr": (
        lambda: (
            b"-----BEGIN CERTIFICATE-----\n"
            + base64.encodebytes(csr_der())
            + b"-----END CERTIFICATE-----\n"
        ),
        "Malformed request.",
    ),
    "base64-of-random-bytes": (
        lambda: base64.encodebytes(b"\x30\x03\x02\x01\x07" + bytes(range(256))),
        "Malformed request.",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BODIES), ids=list(BAD_BODIES))
def test_k2_unverifiable_or_malformed_csr_is_400_never_500(
    deployment: Deployment, case: str
) -> None:
    make_body, message = BAD_BODIES[case]
    mark = deployment.server.log_mark()

    response = enroll(deployment, make_body())

    assert_refused(deployment, mark, response, 400, message)
    log = deployment.server.log_since(mark)
    assert "Traceback" not in log and "status=500" not in log


# A: authentication --------------------------------------------------------------------------


def test_a1_missing_authorization_is_bare_401_challenge_then_retry_on_new_connection_enrolls(
    deployment: Deployment,
) -> None:
    der, key = device_csr("device-a1")
    body = base64.encodebytes(der)
    headers = [
        ("Content-Type", "application/pkcs10"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    mark = deployment.server.log_mark()

    with tls_connection(deployment, deployment.bootstrap) as tls:
        tls.sendall(http_request(deployment, "POST", "simpleenroll", headers, body))
        status_line, challenge, challenge_body = split_response(read_until_closed(tls))

    assert status_line.startswith("HTTP/1.1 401 ")
    assert challenge["www-authenticate"] == 'Basic realm="estca"'
    assert challenge["content-length"] == "0"
    assert challenge_body == b""
    assert "transfer-encoding" not in challenge
    deployment.server.wait_for_log(mark, "refused .*status=401 reason=.*no Authorization header")

    retried = enroll(deployment, der)

    issued_certificate(retried, key)


def test_a2_wrong_passphrase_is_401_logged_with_peer_and_label_never_the_passphrase(
    deployment: Deployment,
) -> None:
    wrong = "a-wrong-passphrase-a2"
    der, _ = device_csr("device-a2")
    mark = deployment.server.log_mark()

    response = deployment.server.curl(
        "devices", "simpleenroll", body=der, cert=deployment.bootstrap, password=wrong
    )

    assert_refused(deployment, mark, response, 401, "The passphrase is wrong.")
    assert response.header("www-authenticate") == 'Basic realm="estca"'
    log = deployment.server.wait_for_log(
        mark, "refused label=devices operation=simpleenroll peer=127.0.0.1 status=401"
    )
    full_log = deployment.server.log()
    for secret in (
        wrong,
        deployment.passphrase,
        basic(wrong)[6:],
        basic(deployment.passphrase)[6:],
    ):
        assert secret not in full_log
    assert "wrong passphrase" in log


@pytest.mark.parametrize("sends_chain", [True, False], ids=["leaf-with-intermediate", "leaf-alone"])
def test_a3_bootstrap_leaf_with_or_without_its_intermediate_enrolls(
    deployment: Deployment, sends_chain: bool
) -> None:
    leaf = deployment.manufacturer.device(f"a3-{sends_chain}", "device-a3")
    cert_file = deployment.manufacturer.chain_file("a3", leaf) if sends_chain else leaf[0]
    assert len(x509.load_pem_x509_certificates(cert_file.read_bytes())) == (2 if sends_chain else 1)
    der, key = device_csr("device-a3")

    response = enroll(deployment, der, cert=(cert_file, leaf[1]))

    issued_certificate(response, key)


def test_a4_bootstrap_certificate_expired_a_minute_ago_is_refused_saying_it_expired(
    deployment: Deployment,
) -> None:
    expired = deployment.manufacturer.device(
        "a4-expired",
        "device-a4",
        not_before=utc_now() - datetime.timedelta(days=30),
        not_after=utc_now() - datetime.timedelta(minutes=1),
    )
    der, _ = device_csr("device-a4")
    mark = deployment.server.log_mark()

    response = enroll(deployment, der, cert=expired)

    assert_refused(deployment, mark, response, 403, "A trusted client certificate is required.")
    deployment.server.wait_for_log(mark, "status=403 reason=.*device-a4.* expired at ")


# E: re-enrollment ---------------------------------------------------------------------------


E_SANS: list[x509.GeneralName] = [
    x509.DNSName("e1.devices.test"),
    x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
]


@pytest.mark.parametrize("new_key_pair", [False, True], ids=["renew-same-key", "rekey-new-key"])
def test_e1_reenroll_with_same_names_and_same_or_new_key_is_200(
    deployment: Deployment, new_key_pair: bool
) -> None:
    current, certificate, key = enrolled_device(
        deployment, f"e1-{new_key_pair}", "device-e1", E_SANS
    )
    der, request_key = device_csr("device-e1", sans=E_SANS, key=None if new_key_pair else key)

    response = enroll(deployment, der, cert=current, operation="simplereenroll")

    renewed = issued_certificate(response, request_key)
    assert (public_der(renewed) == public_der(certificate)) is not new_key_pair
    assert renewed.subject == certificate.subject
    assert renewed.serial_number != certificate.serial_number
    san = x509.SubjectAlternativeName
    assert (
        renewed.extensions.get_extension_for_class(san).value
        == certificate.extensions.get_extension_for_class(san).value
    )


@pytest.mark.parametrize(
    ("common_name", "sans", "message"),
    [
        (
            "device-e2-renamed",
            E_SANS,
            "subject 'CN=device-e2-renamed,O=Acme' differs from the certificate's subject "
            "'CN=device-e2,O=Acme'",
        ),
        ("device-e2", E_SANS[:1], "the SANs (dns:e1.devices.test) differ"),
    ],
    ids=["common-name", "san"],
)
def test_e2_reenroll_with_changed_name_is_refused_saying_which_name_differs(
    deployment: Deployment, common_name: str, sans: list[x509.GeneralName], message: str
) -> None:
    current, _, _ = enrolled_device(deployment, f"e2-{len(sans)}", "device-e2", E_SANS)
    der, _ = device_csr(common_name, sans=sans)
    mark = deployment.server.log_mark()

    response = enroll(deployment, der, cert=current, operation="simplereenroll")

    assert_refused(deployment, mark, response, 403, message)
    deployment.server.wait_for_log(mark, "status=403 reason=.*differ")


@pytest.fixture(scope="module")
def second_node(deployment: Deployment) -> Iterator[EstServer]:
    """Another estca node on the same database, as in a scaled-out deployment."""
    node = EstServer(deployment.installation)
    try:
        yield node
    finally:
        node.stop()


def reenroll_on_node(node: EstServer) -> Callable[[Deployment, tuple[Path, Path], bytes], Response]:
    def send(deployment: Deployment, cert: tuple[Path, Path], der: bytes) -> Response:
        return enroll(deployment, der, cert=cert, operation="simplereenroll", server=node)

    return send


def reenroll_raw(
    path: str, framing: str = "content-length", version: str = "HTTP/1.1"
) -> Callable[[Deployment, tuple[Path, Path], bytes], Response]:
    def send(deployment: Deployment, cert: tuple[Path, Path], der: bytes) -> Response:
        headers = enroll_headers(deployment, der)
        body = der
        if framing == "chunked":
            headers = [*headers[:2], ("Transfer-Encoding", "chunked")]
            body = chunked(der, 64)
        request = http_request(deployment, "POST", "", headers, body, path=path, version=version)
        return deployment.server.raw(request, cert=cert)

    return send


@pytest.mark.parametrize(
    "route",
    [
        "curl",
        "percent-encoded-operation",
        "percent-encoded-label",
        "chunked-body",
        "http-1.0",
        "other-label-of-same-ca",
        "second-node",
    ],
)
def test_e3_revoked_certificate_is_refused_on_every_route_to_reenroll(
    deployment: Deployment, second_node: EstServer, route: str
) -> None:
    current, certificate, _ = enrolled_device(deployment, f"e3-{route}", "device-e3")
    der, _ = device_csr("device-e3")
    # Before revocation the route reaches reenroll and succeeds (on the second node too, so
    # that any memory of a good certificate would show afterwards).
    routes: dict[str, Callable[[Deployment, tuple[Path, Path], bytes], Response]] = {
        "curl": lambda d, c, b: enroll(d, b, cert=c, operation="simplereenroll"),
        "percent-encoded-operation": reenroll_raw("/.well-known/est/devices/simple%72eenroll"),
        "percent-encoded-label": reenroll_raw("/.well-known/est/%64evices/simplereenroll"),
        "chunked-body": reenroll_raw("/.well-known/est/devices/simplereenroll", "chunked"),
        "http-1.0": reenroll_raw("/.well-known/est/devices/simplereenroll", version="HTTP/1.0"),
        "other-label-of-same-ca": lambda d, c, b: enroll(
            d, b, cert=c, operation="simplereenroll", label="others"
        ),
        "second-node": reenroll_on_node(second_node),
    }
    send = routes[route]
    if route != "other-label-of-same-ca":
        # "others" (same issuing CA) forbids O=, so there only the refusal is checked.
        assert send(deployment, current, der).status == 200
    deployment.installation.run("cert", "revoke", format(certificate.serial_number, "x"))
    server = second_node if route == "second-node" else deployment.server
    mark = server.log_mark()

    response = send(deployment, current, device_csr("device-e3")[0])

    assert response.status == 403, response.body
    assert response.body == b"The client certificate has been revoked.\n"
    server.wait_for_log(mark, "refused .*operation=simplereenroll .*status=403 .*was revoked at")


# H: HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1 << 16, 100, 7], ids=["one-chunk", "100-bytes", "7-bytes"])
def test_h1_chunked_body_without_content_length_is_enrolled(
    deployment: Deployment, chunk_size: int
) -> None:
    der, key = device_csr("device-h1")
    headers = [*enroll_headers(deployment, b"")[:2], ("Transfer-Encoding", "chunked")]
    request = http_request(
        deployment, "POST", "simpleenroll", headers, chunked(base64.encodebytes(der), chunk_size)
    )
    assert b"content-length" not in request.lower()

    response = deployment.server.raw(request, cert=deployment.bootstrap)

    issued_certificate(response, key)


@pytest.mark.parametrize("operation", ["cacerts", "simpleenroll"])
def test_h2_http_1_0_request_gets_1_0_status_line_content_length_then_close(
    deployment: Deployment, operation: str
) -> None:
    body = b""
    headers: HeaderList = []
    cert = None
    if operation == "simpleenroll":
        body = base64.encodebytes(device_csr("device-h2")[0])
        headers = enroll_headers(deployment, body)
        cert = deployment.bootstrap
    method = "GET" if operation == "cacerts" else "POST"

    with tls_connection(deployment, cert, timeout=10) as tls:
        tls.sendall(http_request(deployment, method, operation, headers, body, version="HTTP/1.0"))
        # read_until_closed raises a timeout if the server keeps the connection open.
        status_line, response_headers, response_body = split_response(read_until_closed(tls))

    assert status_line.startswith("HTTP/1.0 200 "), status_line
    assert response_headers["content-length"] == str(len(response_body))
    assert "transfer-encoding" not in response_headers
    assert pkcs7.load_der_pkcs7_certificates(base64.b64decode(response_body))


def make_error(deployment: Deployment, kind: str) -> Response:
    """One request that the server must refuse, of the given kind."""
    server = deployment.server
    der, _ = device_csr("device-h3")
    if kind == "400-malformed-csr":
        return enroll(deployment, b"not a CSR")
    if kind == "400-proof-of-possession":
        return enroll(deployment, flip_last_signature_byte(der))
    if kind == "401-wrong-passphrase":
        return server.curl(
            "devices", "simpleenroll", body=der, cert=deployment.bootstrap, password="x"
        )
    if kind == "403-no-client-certificate":
        return server.curl("devices", "simpleenroll", body=der, password=deployment.passphrase)
    if kind == "403-template":
        return enroll(deployment, device_csr("printer-h3")[0])
    if kind == "404-label":
        return server.curl("no-such-label", "cacerts")
    if kind == "404-operation":
        return server.curl("devices", "no-such-operation")
    if kind == "404-path":
        return server.raw(http_request(deployment, "GET", "", [], path="/index.html"))
    if kind == "405-method":
        return server.curl("devices", "cacerts", method="DELETE")
    if kind == "413-too-large":
        return enroll(deployment, b"M" * (MAX_BODY_BYTES + 1))
    if kind == "415-media-type":
        return enroll(deployment, der, headers={"Content-Type": "application/json"})
    if kind == "501-fullcmc":
        return enroll(deployment, der, operation="fullcmc")
    raise AssertionError(kind)


ERROR_KINDS = [
    "400-malformed-csr",
    "400-proof-of-possession",
    "401-wrong-passphrase",
    "403-no-client-certificate",
    "403-template",
    "404-label",
    "404-operation",
    "404-path",
    "405-method",
    "413-too-large",
    "415-media-type",
    "501-fullcmc",
]


@pytest.mark.parametrize("kind", ERROR_KINDS, ids=ERROR_KINDS)
def test_h3_error_body_is_one_plain_text_sentence_with_content_length(
    deployment: Deployment, kind: str
) -> None:
    response = make_error(deployment, kind)

    assert response.status == int(kind[:3]), response.body
    assert response.header("content-type") == TEXT_PLAIN
    assert response.header("content-length") == str(len(response.body))
    assert response.header("transfer-encoding") is None
    text = response.body.decode("utf-8")
    assert re.fullmatch(r"[A-Z][^\n<>{}]*[.]\n", text), text
    assert re.search(r"[.!?]\s+[A-Z]", text) is None, text


# Last in the module, so that it sees every bad input sent above on this deployment.
def test_k2_server_log_has_no_traceback_and_no_500_after_all_bad_inputs(
    deployment: Deployment,
) -> None:
    log = deployment.server.log()

    assert "refused label=devices" in log
    assert "Traceback" not in log
    assert "status=500" not in log


MALFORMED_REQUESTS = {
    "not-a-method": b"GARBAGE\r\n\r\n",
    "content-length-not-a-number": b"Content-Length: abc\r\n",
    "content-length-beyond-64-bits": b"Content-Length: 99999999999999999999999999\r\n",
    "content-length-and-chunked": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    "header-line-over-8-kilobytes": b"X-Padding: " + b"a" * 9000 + b"\r\n",
}


@pytest.mark.parametrize("case", list(MALFORMED_REQUESTS), ids=list(MALFORMED_REQUESTS))
def test_h3_malformed_http_gets_one_plain_sentence_and_no_traceback(
    deployment: Deployment, case: str
) -> None:
    if case == "not-a-method":
        request = MALFORMED_REQUESTS[case]
    else:
        request = (
            (
                f"POST /.well-known/est/devices/simpleenroll HTTP/1.1\r\n"
                f"Host: localhost:{deployment.server.port}\r\n"
            ).encode()
            + MALFORMED_REQUESTS[case]
            + b"\r\n0\r\n\r\n"
        )
    mark = deployment.server.log_mark()

    with tls_connection(deployment, deployment.bootstrap, timeout=10) as tls:
        tls.sendall(request)
        status_line, headers, body = split_response(read_until_closed(tls))

    assert status_line.split(" ")[1] in ("400", "413", "431"), status_line
    assert headers["content-type"] == TEXT_PLAIN
    assert headers["content-length"] == str(len(body))
    assert headers.get("server") == "estca"
    assert re.fullmatch(r"[A-Z][^\n<>{}]*[.]\n", body.decode("utf-8")), body
    time.sleep(0.2)
    assert "Traceback" not in deployment.server.log_since(mark)
