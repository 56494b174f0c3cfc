"""End to end: a device enrolls and re-enrolls against the real server with curl and openssl."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.conftest import Deployment, make_manufacturer
from tests.support import make_csr, name, new_key, openssl, utc_now


def write_pem_chain(path: Path, certificates: list[x509.Certificate]) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates))
    return path


def enroll_with_openssl_key(deployment: Deployment, stem: str, subject: str) -> tuple[Path, Path]:
    """Make a key and CSR with openssl, enroll with curl, return (certificate, key) files."""
    work = deployment.work
    key, csr = work / f"{stem}.key", work / f"{stem}.csr"
    made = openssl(
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        str(key),
        "-subj",
        subject,
        "-out",
        str(csr),
    )
    assert made.returncode == 0, made.stderr
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=csr.read_bytes(),
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    assert response.status == 200, response.body
    (issued,) = response.certificates()
    certificate = write_pem_chain(work / f"{stem}.pem", [issued])
    return certificate, key


def test_cacerts_returns_issuing_chain_up_to_root_without_authentication(
    deployment: Deployment,
) -> None:
    response = deployment.server.curl("devices", "cacerts")

    assert response.status == 200
    assert response.header("content-type") == "application/pkcs7-mime; smime-type=certs-only"
    subjects = [c.subject.rfc4514_string() for c in response.certificates()]
    assert subjects == ["CN=Test Issuing CA,O=estca tests", "CN=Test Root,O=estca tests,C=NL"]
    chain = deployment.installation.run("ca", "chain", "issuing").stdout.encode()
    assert [c for c in x509.load_pem_x509_certificates(chain)] == response.certificates()


def test_enroll_with_both_factors_issues_certificate_that_verifies_against_cacerts(
    deployment: Deployment,
) -> None:
    cacerts = deployment.server.curl("devices", "cacerts").certificates()
    cafile = write_pem_chain(deployment.work / "cacerts.pem", cacerts)

    certificate_file, _ = enroll_with_openssl_key(deployment, "first", "/CN=device-0001")

    verified = openssl("verify", "-CAfile", str(cafile), str(certificate_file))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.strip().endswith(b"OK")
    certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    # An EC key cannot encipher keys: the template's keyEncipherment is left out for it.
    assert not usage.value.key_encipherment
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=30)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca


def test_enroll_rsa_key_gets_key_encipherment(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-rsa"), new_key("rsa-2048"))
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    assert response.status == 200, response.body
    (certificate,) = response.certificates()
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment


def test_enroll_is_recorded_with_client_fingerprint_before_response(
    deployment: Deployment,
) -> None:
    certificate_file, _ = enroll_with_openssl_key(deployment, "recorded", "/CN=device-rec")
    certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
    serial = format(certificate.serial_number, "X")
    colon_serial = ":".join(serial[i : i + 2] for i in range(0, len(serial), 2))

    shown = json.loads(deployment.installation.run("cert", "show", colon_serial, "--json").stdout)

    (record,) = shown
    assert record["subject"] == "CN=device-rec"
    assert record["template"] == "devices"
    bootstrap = x509.load_pem_x509_certificate(deployment.bootstrap[0].read_bytes())
    expected = hashlib.sha256(bootstrap.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert record["client_fingerprint"] == expected
    assert certificate.serial_number.bit_length() == 159


def test_reenroll_with_same_key_and_with_new_key(deployment: Deployment) -> None:
    certificate_file, key_file = enroll_with_openssl_key(deployment, "renew", "/CN=device-renew")
    current = (certificate_file, key_file)

    # Renew: the same key.
    same_key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    der, _ = make_csr(name("device-renew"), same_key)  # type: ignore[arg-type]
    renewed = deployment.server.curl(
        "devices", "simplereenroll", body=der, cert=current, password=deployment.passphrase
    )
    assert renewed.status == 200, renewed.body
    (renewed_certificate,) = renewed.certificates()
    assert renewed_certificate.public_key() == same_key.public_key()

    # Rekey: a new key, authenticated by the certificate just renewed.
    renewed_file = write_pem_chain(deployment.work / "renewed.pem", [renewed_certificate])
    der, new = make_csr(name("device-renew"))
    rekeyed = deployment.server.curl(
        "devices",
        "simplereenroll",
        body=der,
        cert=(renewed_file, key_file),
        password=deployment.passphrase,
    )
    assert rekeyed.status == 200, rekeyed.body
    (rekeyed_certificate,) = rekeyed.certificates()
    assert rekeyed_certificate.public_key() == new.public_key()
    assert rekeyed_certificate.subject == renewed_certificate.subject


def assert_refused(
    deployment: Deployment,
    mark: int,
    response_status: int,
    response_body: bytes,
    status: int,
    message: str,
    log_reason: str,
) -> None:
    assert response_status == status, response_body
    assert message in response_body.decode(), response_body
    deployment.server.wait_for_log(mark, f"refused .*status={status} reason=.*{log_reason}")


def test_enroll_refuses_request_without_client_certificate(deployment: Deployment) -> None:
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-nocert"))
    response = deployment.server.curl(
        "devices", "simpleenroll", body=der, password=deployment.passphrase
    )
    assert_refused(
        deployment,
        mark,
        response.status,
        response.body,
        403,
        "A trusted client certificate is required.",
        "without a client certificate",
    )


def test_enroll_refuses_certificate_of_another_labels_chain(deployment: Deployment) -> None:
    stranger = deployment.other_manufacturer.device("stranger", "device-stranger")
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-stranger"))
    response = deployment.server.curl(
        "devices", "simpleenroll", body=der, cert=stranger, password=deployment.passphrase
    )
    assert_refused(
        deployment,
        mark,
        response.status,
        response.body,
        403,
        "A trusted client certificate is required.",
        "does not chain to this label",
    )


def test_enroll_refuses_certificate_of_an_unknown_ca_at_the_handshake(
    deployment: Deployment,
) -> None:
    unknown = make_manufacturer(deployment.work / "unknown", "Unknown").device("u", "device-u")
    der, _ = make_csr(name("device-u"))
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(deployment.server.server_ca),
            "--cert",
            str(unknown[0]),
            "--key",
            str(unknown[1]),
            "-u",
            f"d:{deployment.passphrase}",
            "--data-binary",
            "@-",
            deployment.server.url("devices", "simpleenroll"),
        ],
        input=der,
        capture_output=True,
        timeout=60,
    )
    # The TLS layer trusts only configured chains: the handshake fails with an alert, before any
    # HTTP (curl 35: handshake error; 52/56: TLS 1.3 reports the alert on the first read).
    assert result.returncode in (35, 52, 56), result.stderr
    assert result.stdout == b""


def test_enroll_refuses_expired_bootstrap_certificate_and_logs_expiry(
    deployment: Deployment,
) -> None:
    expired = deployment.manufacturer.device(
        "expired",
        "device-expired",
        not_before=utc_now() - datetime.timedelta(days=30),
        not_after=utc_now() - datetime.timedelta(minutes=1),
    )
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-expired"))
    response = deployment.server.curl(
        "devices", "simpleenroll", body=der, cert=expired, password=deployment.passphrase
    )
    assert_refused(
        deployment,
        mark,
        response.status,
        response.body,
        403,
        "A trusted client certificate is required.",
        "expired at",
    )


def test_enroll_challenges_missing_passphrase_with_empty_401(deployment: Deployment) -> None:
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-nopass"))
    response = deployment.server.curl(
        "devices", "simpleenroll", body=der, cert=deployment.bootstrap
    )
    assert response.status == 401
    assert response.body == b""
    assert response.header("content-length") == "0"
    assert response.header("www-authenticate") == 'Basic realm="estca"'
    deployment.server.wait_for_log(mark, "refused .*status=401 reason=.*no Authorization header")


def test_enroll_refuses_wrong_passphrase_and_never_logs_it(deployment: Deployment) -> None:
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-wrongpass"))
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        password="not-the-passphrase-42",
    )
    assert_refused(
        deployment,
        mark,
        response.status,
        response.body,
        401,
        "The passphrase is wrong.",
        "wrong passphrase",
    )
    assert response.header("www-authenticate") == 'Basic realm="estca"'
    log = deployment.server.log_since(mark)
    assert "peer=127.0.0.1" in log and "label=devices" in log
    assert "not-the-passphrase-42" not in deployment.server.log()
    assert deployment.passphrase not in deployment.server.log()


def test_unknown_label_is_404(deployment: Deployment) -> None:
    response = deployment.server.curl("no-such-label", "cacerts")
    assert response.status == 404
    assert response.body == b"Unknown EST label.\n"
    assert response.header("content-type") == "text/plain; charset=utf-8"


def test_enroll_refuses_csr_that_breaks_template_naming_every_rule(
    deployment: Deployment,
) -> None:
    mark = deployment.server.log_mark()
    der, _ = make_csr(
        name("printer-7", OU="Lab"),
        new_key("ec-p521"),
        [x509.DNSName("printer.example.com")],
    )
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    assert response.status == 403
    text = response.body.decode()
    for rule in (
        "key type ec-p521 is not allowed",
        "subject OU=Lab is not allowed",
        "subject CN=printer-7 is not allowed",
        "SAN dns:printer.example.com is not allowed",
    ):
        assert rule in text
    deployment.server.wait_for_log(mark, "refused .*status=403 .*key type ec-p521")


def test_enroll_refuses_denied_subject_even_in_other_case(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-forbidden-1"))
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    assert response.status == 403
    assert "is denied by CN=device-forbidden*" in response.body.decode()
    der, _ = make_csr(name("device-FORBIDDEN-2"))
    response = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    assert response.status == 403
    assert "is denied by" in response.body.decode()


def test_reenroll_refuses_revoked_certificate(deployment: Deployment) -> None:
    certificate_file, key_file = enroll_with_openssl_key(deployment, "revoked", "/CN=device-rv")
    certificate = x509.load_pem_x509_certificate(certificate_file.read_bytes())
    deployment.installation.run("cert", "revoke", format(certificate.serial_number, "x"))
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-rv"))

    response = deployment.server.curl(
        "devices",
        "simplereenroll",
        body=der,
        cert=(certificate_file, key_file),
        password=deployment.passphrase,
    )

    assert_refused(
        deployment,
        mark,
        response.status,
        response.body,
        403,
        "The client certificate has been revoked.",
        "was revoked at",
    )


def test_reenroll_refuses_csr_with_another_subject_naming_it(deployment: Deployment) -> None:
    current = enroll_with_openssl_key(deployment, "rename", "/CN=device-original")
    mark = deployment.server.log_mark()
    der, _ = make_csr(name("device-renamed"))

    response = deployment.server.curl(
        "devices", "simplereenroll", body=der, cert=current, password=deployment.passphrase
    )

    assert_refused(
        deployment,
        mark,
        response.status,
        response.body,
        403,
        "subject 'CN=device-renamed' differs from the certificate's subject 'CN=device-original'",
        "differs",
    )


def test_reenroll_compares_names_as_rfc5280_does(deployment: Deployment) -> None:
    current = enroll_with_openssl_key(deployment, "casing", "/CN=device-Case  Name")
    der, _ = make_csr(name("DEVICE-case name"))
    response = deployment.server.curl(
        "devices", "simplereenroll", body=der, cert=current, password=deployment.passphrase
    )
    # The template still applies to the new request: "DEVICE-..." is not allowed by CN=device-*.
    assert response.status == 403
    assert "differs" not in response.body.decode()
    assert "subject CN=DEVICE-case name is not allowed" in response.body.decode()
    der, _ = make_csr(name("device-case   name"))
    response = deployment.server.curl(
        "devices", "simplereenroll", body=der, cert=current, password=deployment.passphrase
    )
    assert response.status == 200, response.body


def test_reenroll_refuses_bootstrap_certificate(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-bootstrap"))
    response = deployment.server.curl(
        "devices",
        "simplereenroll",
        body=der,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    assert response.status == 403
    assert response.body == b"A trusted client certificate is required.\n"


def test_disabled_label_disappears_without_restart(deployment: Deployment) -> None:
    run = deployment.installation.run
    run("template", "create", "ephemeral", "--ca", "issuing", "--allow-subject", "CN=*")
    chain = deployment.work / "maker-chain.pem"
    passphrase_file = deployment.work / "passphrase.txt"
    mark = deployment.server.log_mark()
    run(
        "est",
        "enable",
        "ephemeral",
        "--bootstrap-chain",
        str(chain),
        "--passphrase-file",
        str(passphrase_file),
        "--label",
        "ephemeral",
    )
    deployment.server.wait_for_log(mark, "labels: .*ephemeral")
    assert deployment.server.curl("ephemeral", "cacerts").status == 200

    mark = deployment.server.log_mark()
    run("est", "disable", "ephemeral")
    deployment.server.wait_for_log(mark, "reloaded")
    assert deployment.server.curl("ephemeral", "cacerts").status == 404


def test_no_bootstrap_validation_enrolls_on_passphrase_alone_but_not_without_it(
    deployment: Deployment,
) -> None:
    run = deployment.installation.run
    run("template", "create", "passonly", "--ca", "issuing", "--allow-subject", "CN=*")
    mark = deployment.server.log_mark()
    run(
        "est",
        "enable",
        "passonly",
        "--no-bootstrap-validation",
        "--bootstrap-chain",
        str(deployment.work / "maker-chain.pem"),
        "--passphrase-file",
        str(deployment.work / "passphrase.txt"),
        "--label",
        "passonly",
    )
    deployment.server.wait_for_log(mark, "labels: .*passonly")
    der, _ = make_csr(name("kiosk-1"))

    enrolled = deployment.server.curl(
        "passonly", "simpleenroll", body=der, password=deployment.passphrase
    )
    refused = deployment.server.curl("passonly", "simpleenroll", body=der, password="wrong-one")

    assert enrolled.status == 200, enrolled.body
    assert enrolled.certificates()[0].subject == name("kiosk-1")
    assert refused.status == 401


def test_enroll_refuses_revoked_estca_certificate_when_bootstrap_chain_is_an_estca_ca(
    deployment: Deployment,
) -> None:
    run = deployment.installation.run
    run("template", "create", "second-life", "--ca", "issuing", "--allow-subject", "CN=*")
    issuing_chain = deployment.work / "issuing-chain.pem"
    issuing_chain.write_text(run("ca", "chain", "issuing").stdout)
    mark = deployment.server.log_mark()
    run(
        "est",
        "enable",
        "second-life",
        "--bootstrap-chain",
        str(issuing_chain),
        "--passphrase-file",
        str(deployment.work / "passphrase.txt"),
        "--label",
        "second-life",
    )
    deployment.server.wait_for_log(mark, "labels: .*second-life")
    current = enroll_with_openssl_key(deployment, "second", "/CN=device-second")
    der, _ = make_csr(name("device-second"))

    before = deployment.server.curl(
        "second-life", "simpleenroll", body=der, cert=current, password=deployment.passphrase
    )
    certificate = x509.load_pem_x509_certificate(current[0].read_bytes())
    run("cert", "revoke", format(certificate.serial_number, "x"))
    after = deployment.server.curl(
        "second-life", "simpleenroll", body=der, cert=current, password=deployment.passphrase
    )

    assert before.status == 200, before.body
    assert after.status == 403
    assert after.body == b"The client certificate has been revoked.\n"


def test_passphrase_guessing_is_slowed_after_a_few_failures(deployment: Deployment) -> None:
    der, _ = make_csr(name("device-guess"))
    durations = []
    for attempt in range(7):
        started = time.monotonic()
        response = deployment.server.curl(
            "devices",
            "simpleenroll",
            body=der,
            cert=deployment.bootstrap,
            password=f"guess-number-{attempt}",
        )
        durations.append(time.monotonic() - started)
        assert response.status == 401

    # The last attempts each waited out the throttle's pause; the right passphrase still works.
    assert min(durations[-2:]) >= 1.0, durations
    good = deployment.server.curl(
        "devices",
        "simpleenroll",
        body=der,
        cert=deployment.bootstrap,
        password=deployment.passphrase,
    )
    assert good.status == 200
