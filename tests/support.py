"""Test support: throwaway PKI made fresh per run, the real estca CLI and server, real clients.

Nothing here is a mock: the server is the `estca serve` process over TLS on loopback, the
clients are curl, openssl and Python's own TLS stack.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ESTCA = [sys.executable, "-m", "estca.cli.main"]


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def name(common_name: str, **attributes: str) -> x509.Name:
    oids = {
        "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "C": NameOID.COUNTRY_NAME,
        "serialNumber": NameOID.SERIAL_NUMBER,
    }
    parts = [x509.NameAttribute(oids[key], value) for key, value in attributes.items()]
    return x509.Name([*parts, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_key(kind: str = "ec-p256") -> CertificateIssuerPrivateKeyTypes:
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ec-p521":
        return ec.generate_private_key(ec.SECP521R1())
    if kind.startswith("rsa-"):
        return rsa.generate_private_key(65537, int(kind[4:]))
    raise ValueError(kind)


@dataclass
class Issued:
    """A certificate made by the tests' own throwaway CAs, with its key."""

    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(self.pem())
        key_path.write_bytes(self.key_pem())
        return cert_path, key_path


def make_certificate(
    subject: x509.Name,
    issuer: Issued | None,
    *,
    ca: bool,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    key: CertificateIssuerPrivateKeyTypes | None = None,
) -> Issued:
    key = key or new_key()
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or utc_now() - datetime.timedelta(days=1))
        .not_valid_after(not_after or utc_now() + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def make_csr(
    subject: x509.Name,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[bytes, CertificateIssuerPrivateKeyTypes]:
    """A DER CSR and its key."""
    key = key or new_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key


def base64_body(der: bytes) -> bytes:
    return base64.encodebytes(der)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: bytes = b""

    def certificates(self) -> list[x509.Certificate]:
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(self.body))

    def header(self, key: str) -> str | None:
        return self.headers.get(key.lower())


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    return status, headers


@dataclass
class EstcaInstallation:
    """An estca data directory driven through the real command line."""

    home: Path
    database_url: str
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "ESTCA_HOME": str(self.home),
            "ESTCA_DATABASE_URL": self.database_url,
            "ESTCA_REFRESH_SECONDS": "0.2",
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*ESTCA, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if check and result.returncode != 0:
            raise AssertionError(f"estca {' '.join(args)} failed: {result.stderr}")
        return result

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Read the store directly, as an auditor would."""
        engine = sqlalchemy.create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(sqlalchemy.text(sql))]
        finally:
            engine.dispose()

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)


class EstServer:
    """A running `estca serve` process on a loopback port."""

    def __init__(self, installation: EstcaInstallation, workers: int = 1) -> None:
        self.installation = installation
        self.port = free_port()
        self.log_path = installation.home / f"serve-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*ESTCA, "serve", "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers)],
            env=installation.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.server_ca = installation.home / "server-ca.pem"
        self.server_ca.write_text(installation.run("server-ca").stdout)
        deadline = time.monotonic() + 60
        while "serving EST" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"estca serve did not start:\n{self.log()}")
            time.sleep(0.05)

    def url(self, label: str, operation: str) -> str:
        return f"https://localhost:{self.port}/.well-known/est/{label}/{operation}"

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def log_mark(self) -> int:
        return len(self.log_path.read_bytes())

    def log_since(self, mark: int) -> str:
        return self.log_path.read_bytes()[mark:].decode("utf-8", "replace")

    def wait_for_log(self, mark: int, pattern: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_since(mark)
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"log has no {pattern!r} after mark:\n{text}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()

    # Clients ------------------------------------------------------------------------------

    def curl(
        self,
        label: str,
        operation: str,
        *,
        body: bytes | None = None,
        cert: tuple[Path, Path] | None = None,
        password: str | None = None,
        headers: dict[str, str] | None = None,
        method: str | None = None,
    ) -> Response:
        """One request with curl (a fresh connection, as a device makes it)."""
        head_file = self.installation.home / f"curl-head-{secrets.token_hex(4)}"
        command = [
            "curl",
            "-sS",
            "--http1.1",
            "--cacert",
            str(self.server_ca),
            "-D",
            str(head_file),
            "-o",
            "-",
            self.url(label, operation),
        ]
        if cert is not None:
            command += ["--cert", str(cert[0]), "--key", str(cert[1])]
        if password is not None:
            command += ["-u", f"device:{password}"]
        for key, value in (headers or {}).items():
            command += ["-H", f"{key}: {value}"]
        if body is not None:
            command += ["--data-binary", "@-"]
            if not any(k.lower() == "content-type" for k in (headers or {})):
                command += ["-H", "Content-Type: application/pkcs10"]
        if method is not None:
            command += ["-X", method]
        result = subprocess.run(command, input=body or b"", capture_output=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"curl failed ({result.returncode}): {result.stderr!r}")
        head = head_file.read_bytes()
        head_file.unlink()
        status, parsed = _parse_head(head.split(b"\r\n\r\n")[-2] if b"\r\n\r\n" in head else head)
        return Response(status, parsed, result.stdout, head)

    def raw(
        self,
        request: bytes,
        cert: tuple[Path, Path] | None = None,
        chain_file: Path | None = None,
    ) -> Response:
        """Send bytes exactly as given over TLS and read until the server closes or answers."""
        context = ssl.create_default_context(cafile=str(self.server_ca))
        if cert is not None:
            context.load_cert_chain(str(chain_file or cert[0]), str(cert[1]))
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            with context.wrap_socket(sock, server_hostname="localhost") as tls:
                tls.sendall(request)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, rest = data.partition(b"\r\n\r\n")
                status, headers = _parse_head(head)
                length = int(headers.get("content-length", "0"))
                while len(rest) < length:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                return Response(status, headers, rest, head)


def basic(password: str, user: str = "device") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def openssl(*args: str, input_bytes: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=input_bytes, capture_output=True, timeout=60)
