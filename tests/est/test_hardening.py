"""Refusals found by trying to break estca: names, templates, logs, HTTP framing, certificates."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import socket
import ssl
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from tests.conftest import Deployment
from tests.est.test_conformance import read_until_closed, split_response, tls_connection
from tests.est.test_enrollment import enroll_with_openssl_key
from tests.support import Issued, basic, make_csr, name, new_key, openssl, utc_now


def long_common_name() -> x509.Name:
    """A CN over RFC 5280's 64 characters, which cryptography builds only if told not to check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        attribute = x509.NameAttribute(NameOID.COMMON_NAME, "device-" + "x" * 60, _validate=False)
    return x509.Name([attribute])


def post(deployment: Deployment, csr: bytes, label: str = "devices") -> tuple[int, str]:
    response = deployment.server.curl(
        label,
        "simpleenroll",
        body=csr,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    return response.status, response.body.decode("utf-8", "replace")


@pytest.mark.parametrize(
    ("san", "reason"),
    [
        (x509.DNSName("*.devices.test"), "is not a host name"),
        (x509.DNSName("evil.com\x00.devices.test"), "holds characters"),
        (x509.DNSName("evil.com/.devices.test"), "is not a host name"),
        (x509.DNSName(".devices.test"), "is not a host name"),
        (x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")), "is an address range"),
    ],
    ids=["wildcard", "nul", "slash", "leading-dot", "ip-range"],
)
def test_malformed_san_is_refused_even_when_the_pattern_matches(
    deployment: Deployment, san: x509.GeneralName, reason: str
) -> None:
    der, _ = make_csr(name("device-san"), sans=[san])
    status, body = post(deployment, der)
    assert status == 403
    assert reason in body


@pytest.mark.parametrize(
    ("subject", "reason"),
    [
        (name("device-a\x00.evil.com"), "holds control or format characters"),
        (name("device-\u202egnp.exe"), "holds control or format characters"),
        (long_common_name(), "CN must be 1 to 64 characters"),
        (
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "device-1"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "device-2"),
                ]
            ),
            "subject attribute CN appears 2 times",
        ),
    ],
    ids=["nul", "right-to-left-override", "too-long", "duplicate"],
)
def test_malformed_subject_is_refused(
    deployment: Deployment, subject: x509.Name, reason: str
) -> None:
    der, _ = make_csr(subject)
    status, body = post(deployment, der)
    assert status == 403
    assert reason in body


def test_rsa_key_with_small_exponent_is_refused(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-e3"), rsa.generate_private_key(3, 2048))
    status, body = post(deployment, der)
    assert status == 403
    assert "RSA public exponent 3 is below 65537" in body


def test_reenroll_refuses_certificate_of_another_template_on_the_same_ca(
    deployment: Deployment,
) -> None:
    # "devices" and "others" share the issuing CA; a "devices" certificate must not renew
    # under "others" rules.
    current = enroll_with_openssl_key(deployment, "cross", "/CN=device-cross")
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-cross"))
    response = deployment.server.curl(
        "others", "simplereenroll", body=der, cert=current, password=deployment.passphrase
    )
    assert response.status == 403
    deployment.server.wait_for_log(mark, "issued under template 'devices', not this label's")


def test_ca_certificate_cannot_authenticate_a_device(deployment: Deployment) -> None:
    # A CA certificate without a key usage extension: TLS lets it through as a client
    # certificate, so the refusal must come from estca's own check.
    maker = deployment.manufacturer
    key = new_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name("device-subca"))
        .issuer_name(maker.intermediate.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc_now() - datetime.timedelta(days=1))
        .not_valid_after(utc_now() + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(maker.intermediate.key, hashes.SHA256())
    )
    files = Issued(certificate, key).write(deployment.work, "sub-ca")
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-subca"))
    response = deployment.server.curl(
        "devices", "simpleenroll", body=der, cert=files, password=deployment.passphrase
    )
    assert response.status == 403
    deployment.server.wait_for_log(mark, "does not chain to this label")


def test_reenabling_est_without_label_keeps_the_label(deployment: Deployment) -> None:
    run = deployment.installation.run
    run("template", "create", "keeper", "--ca", "issuing", "--allow-subject", "CN=*")
    arguments = [
        "--bootstrap-chain",
        str(deployment.work / "maker-chain.pem"),
        "--passphrase-file",
        str(deployment.work / "passphrase.txt"),
    ]
    first = run("est", "enable", "keeper", *arguments, "--label", "keeper-label").stdout
    again = run("est", "enable", "keeper", *arguments).stdout
    assert first.splitlines()[0] == again.splitlines()[0] == "label: keeper-label"


def test_newline_in_path_cannot_forge_a_log_line(deployment: Deployment) -> None:
    forged = "2026-01-01 00:00:00,000 INFO estca.audit issued label=devices serial=f00d"
    path = "/.well-known/est/zz/cacerts%0A" + forged.replace(" ", "%20")
    mark = deployment.server.log_mark()
    response = deployment.server.raw(
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    )
    assert response.status == 404
    log = deployment.server.wait_for_log(mark, "status=404")
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())
    assert "\\x0a" in log or "%0A" in log


def test_malformed_authorization_never_reaches_the_log(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-auth"))
    mark = deployment.server.log_mark()
    tab = "Basic\t" + basic(deployment.passphrase).split(" ", 1)[1]
    good = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        headers={"Authorization": tab},
    )
    bearer = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        headers={"Authorization": "Bearer\tsupersecrettoken"},
    )
    assert good.status == 200, good.body
    assert bearer.status == 401
    log = deployment.server.wait_for_log(mark, "is not Basic")
    assert "supersecrettoken" not in log


def test_csrattrs_post_names_get_in_allow(deployment: Deployment) -> None:
    response = deployment.server.curl("devices", "csrattrs", body=b"x", method="POST")
    assert response.status == 405
    assert response.header("allow") == "GET"


def test_encoded_slash_stays_inside_its_segment(deployment: Deployment) -> None:
    response = deployment.server.raw(
        b"GET /.well-known/est/devices%2Fcacerts HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 404


def test_http_versions_other_than_1_0_and_1_1_get_505(deployment: Deployment) -> None:
    response = deployment.server.raw(
        b"GET /.well-known/est/devices/cacerts HTTP/2.0\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 505
    assert response.body == b"Only HTTP/1.0 and HTTP/1.1 are supported.\n"


def test_transfer_coding_other_than_chunked_gets_501(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-te"))
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=base64.encodebytes(der),
        cert=deployment.bootstrap,
        password=deployment.passphrase,
        headers={"Transfer-Encoding": "gzip, chunked"},
    )
    assert response.status == 501
    assert response.body == b"Transfer-Encoding other than chunked is not supported.\n"


def test_refusal_before_the_body_is_read_closes_the_connection(deployment: Deployment) -> None:
    request = (
        b"POST /.well-known/est/devices/simpleenroll HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/pkcs10\r\nContent-Length: 10000000\r\n\r\n"
    )
    with tls_connection(deployment, deployment.bootstrap, timeout=10) as tls:
        tls.sendall(request + b"A" * 1000)
        status_line, headers, _ = split_response(read_until_closed(tls))
    assert status_line.split(" ")[1] == "401"
    assert headers.get("connection", "").lower() == "close"


def test_connection_without_a_whole_request_head_is_closed(deployment: Deployment) -> None:
    context = ssl.create_default_context(cafile=str(deployment.server.server_ca))
    mark = deployment.server.log_mark()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", deployment.server.port), timeout=60) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"GET /.well-known/est/devices/cacerts HTTP/1.1\r\nHost: x\r\n")
            assert tls.recv(1024) == b""
    assert 25 < time.monotonic() - started < 50
    deployment.server.wait_for_log(mark, "no complete request within 30 s")


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def csr_with_retagged_common_name(common_name: str, tag: int) -> bytes:
    """A CSR whose CN is encoded under another ASN.1 tag, correctly signed by its key."""
    der, key = make_csr(name(common_name))
    csr = x509.load_der_x509_csr(der)
    utf8 = _tlv(0x0C, common_name.encode())
    info = csr.tbs_certrequest_bytes.replace(utf8, _tlv(tag, common_name.encode()), 1)
    assert info != csr.tbs_certrequest_bytes
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    algorithm = _tlv(0x30, _tlv(0x06, bytes.fromhex("2a8648ce3d040302")))
    return _tlv(0x30, info + algorithm + _tlv(0x03, b"\x00" + signature))


@pytest.mark.parametrize("tag", [0x04, 0x1A, 0x12], ids=["octet-string", "visible", "numeric"])
def test_subject_is_reencoded_so_openssl_can_read_the_certificate(
    deployment: Deployment, tag: int
) -> None:
    der = csr_with_retagged_common_name("device-123", tag)
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    # The value is honest text under an odd tag: it is issued, as a UTF8String parsers read.
    assert response.status == 200, response.body
    (certificate,) = response.certificates()
    assert certificate.subject.public_bytes()[-12:] == b"\x0c\x0adevice-123"
    printed = openssl(
        "pkcs7", "-inform", "DER", "-print_certs", input_bytes=base64.b64decode(response.body)
    )
    assert printed.returncode == 0, printed.stderr
    assert b"subject=CN = device-123" in printed.stdout


def test_device_certificate_with_unparseable_san_gets_403_not_500(
    deployment: Deployment,
) -> None:
    maker = deployment.manufacturer
    key = new_key()
    broken_san = x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, bytes.fromhex("300787050102030405")
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name("device-brokensan"))
        .issuer_name(maker.intermediate.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc_now() - datetime.timedelta(days=1))
        .not_valid_after(utc_now() + datetime.timedelta(days=30))
        .add_extension(broken_san, critical=False)
        .sign(maker.intermediate.key, hashes.SHA256())
    )
    files = Issued(certificate, key).write(deployment.work, "broken-san")
    der, _ = make_csr(name("device-brokensan"))
    response = deployment.server.curl(
        "devices", "simpleenroll", body=der, cert=files, password=deployment.passphrase
    )
    assert response.status == 403
    assert "Traceback" not in deployment.server.log()


def test_parallel_guesses_are_throttled_too(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-burst"))

    def guess(number: int) -> int:
        return deployment.server.curl(
            "devices",
            "simpleenroll",
            body=der,
            cert=deployment.bootstrap,
            password=f"burst-guess-{number}",
        ).status

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(guess, range(12)))
    elapsed = time.monotonic() - started

    assert statuses == [401] * 12
    # At most 5 run at once unthrottled; the other 7 one at a time, a second apart at least.
    assert elapsed >= 6.0, elapsed


def test_passphrase_with_a_trailing_nul_is_wrong(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-nul"))
    credentials = base64.b64encode(b"d:" + deployment.passphrase.encode() + b"\x00").decode()
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        headers={"Authorization": f"Basic {credentials}"},
    )
    assert response.status == 401
