"""The quickstart demo: a CA hierarchy, a template, EST enabled, and a device ready to enroll.

The demo manufacturer CA stands for the vendor whose certificates ship inside devices; it is
made here only so that a newcomer has a bootstrap certificate to try.
"""

from __future__ import annotations

import datetime
import os
import secrets
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from estca.authority.policy import TemplatePolicy
from estca.authority.service import Authority
from estca.pki.certs import build_ca_certificate, new_serial_number, utc_now
from estca.pki.keys import generate_private_key, signature_hash
from estca.pki.names import parse_distinguished_name

DEMO_LABEL = "demo"
DEMO_TEMPLATE = "demo-devices"


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def seed_demo(authority: Authority, home: Path, port: int) -> None:
    """On a store with no CA, make the demo and print the enrollment commands."""
    demo = home / "demo"
    if authority.hierarchy.list_all():
        if (demo / "passphrase.txt").exists():
            click.echo(_instructions(demo, port), err=True)
        return
    demo.mkdir(mode=0o700, exist_ok=True)

    root = authority.hierarchy.create_root(
        "demo-root", parse_distinguished_name("CN=estca Demo Root,O=estca demo"), "ec-p256", 3650
    )
    issuing = authority.hierarchy.create_intermediate(
        "demo-issuing",
        root.name,
        parse_distinguished_name("CN=estca Demo Issuing CA,O=estca demo"),
        "ec-p256",
        1825,
        0,
    )
    authority.create_template(
        DEMO_TEMPLATE,
        issuing.name,
        TemplatePolicy(
            allow_subject=["CN=*", "O=*", "OU=*", "serialNumber=*"],
            require_subject=["CN"],
            allow_san=["dns=*", "ip=*"],
            key_types=["ec-p256", "ec-p384", "rsa-2048"],
            key_usage=["digitalSignature", "keyEncipherment"],
            extended_key_usage=["clientAuth"],
            max_days=90,
        ),
    )

    # The stand-in manufacturer: its CA and one device certificate with its key.
    maker_key = generate_private_key("ec-p256")
    maker = build_ca_certificate(
        subject=parse_distinguished_name("CN=Demo Manufacturer CA,O=Demo Devices Inc"),
        public_key=maker_key.public_key(),
        issuer=None,
        issuer_key=maker_key,
        days=3650,
        path_length=0,
    )
    device_key = generate_private_key("ec-p256")
    device = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "device-001"),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0001"),
                ]
            )
        )
        .issuer_name(maker.subject)
        .public_key(device_key.public_key())
        .serial_number(new_serial_number())
        .not_valid_before(utc_now() - datetime.timedelta(minutes=1))
        .not_valid_after(utc_now() + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(maker_key, signature_hash(maker_key))
    )
    passphrase = secrets.token_urlsafe(18)
    (demo / "manufacturer-ca.pem").write_bytes(_pem(maker))
    (demo / "bootstrap.pem").write_bytes(_pem(device))
    _write_private(
        demo / "bootstrap.key",
        device_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(demo / "passphrase.txt", passphrase.encode() + b"\n")
    (demo / "server-ca.pem").write_bytes(_pem(authority.hierarchy.ensure_server_ca().certificate))
    authority.enable_est(DEMO_TEMPLATE, _pem(maker), passphrase, DEMO_LABEL, True)
    click.echo(_instructions(demo, port), err=True)


def _instructions(demo: Path, port: int) -> str:
    base = f"https://localhost:{port}/.well-known/est/{DEMO_LABEL}"
    return f"""
estca demo is ready: CAs demo-root > demo-issuing, template {DEMO_TEMPLATE}, EST label \
{DEMO_LABEL}.
In another terminal, enroll a device with curl and openssl:

  cd {demo}
  curl -sS --cacert server-ca.pem {base}/cacerts \\
    | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out cacerts.pem
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \\
    -keyout device.key -subj "/CN=device-001" -out device.csr
  curl -sS --fail-with-body --cacert server-ca.pem --cert bootstrap.pem --key bootstrap.key \\
    -u "device:$(cat passphrase.txt)" -H "Content-Type: application/pkcs10" \\
    --data-binary @device.csr {base}/simpleenroll \\
    | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device.pem
  openssl verify -partial_chain -CAfile cacerts.pem device.pem

Re-enroll (renew) with the certificate just issued:

  curl -sS --fail-with-body --cacert server-ca.pem --cert device.pem --key device.key \\
    -u "device:$(cat passphrase.txt)" -H "Content-Type: application/pkcs10" \\
    --data-binary @device.csr {base}/simplereenroll \\
    | openssl base64 -d | openssl pkcs7 -inform DER -print_certs -out device-renewed.pem
"""
