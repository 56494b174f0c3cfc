"""CA hierarchy: creating roots and intermediates, the server's TLS CA, chains, and CA keys."""

from __future__ import annotations

import datetime
import ipaddress
import re
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from estca.errors import ConfigurationError, ConflictError, NotFoundError
from estca.keys.custody import KeyCustody
from estca.pki.certs import BACKDATE, build_ca_certificate, new_serial_number, utc_now
from estca.pki.keys import generate_private_key, signature_hash
from estca.pki.names import format_name
from estca.store.database import Database, bump_generation
from estca.store.models import CertificateAuthorityRow

SERVER_CA_NAME = "estca-server-ca"
#: Deeper hierarchies than this are a mistake, not a design (and overflow the encoding).
MAX_PATH_LENGTH = 16
SERVER_CA_DAYS = 3650
SERVER_CERTIFICATE_DAYS = 90
_CA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class CertificateAuthority:
    id: int
    name: str
    kind: str
    parent: str | None
    key_type: str
    certificate: x509.Certificate
    key_reference: str

    def summary(self) -> dict[str, object]:
        cert = self.certificate
        return {
            "name": self.name,
            "kind": self.kind,
            "parent": self.parent,
            "subject": format_name(cert.subject),
            "key_type": self.key_type,
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
        }


def _from_row(row: CertificateAuthorityRow, parent: str | None) -> CertificateAuthority:
    return CertificateAuthority(
        id=row.id,
        name=row.name,
        kind=row.kind,
        parent=parent,
        key_type=row.key_type,
        certificate=x509.load_pem_x509_certificate(row.certificate_pem.encode("ascii")),
        key_reference=row.key_reference,
    )


class Hierarchy:
    """The CAs in the store, and their keys unlocked once per process."""

    def __init__(self, database: Database, custody: KeyCustody) -> None:
        self._database = database
        self._custody = custody
        self._keys: dict[tuple[int, str], CertificateIssuerPrivateKeyTypes] = {}
        self._lock = threading.Lock()

    def create_root(
        self, name: str, subject: x509.Name, key_type: str, days: int
    ) -> CertificateAuthority:
        """Make a self-signed root CA.

        Raises:
            ConfigurationError: bad name, key type or lifetime.
            ConflictError: the name is taken.
        """
        _check_ca_name(name)
        _check_days(days)
        key = generate_private_key(key_type)
        cert = build_ca_certificate(
            subject=subject,
            public_key=key.public_key(),
            issuer=None,
            issuer_key=key,
            days=days,
            path_length=None,
        )
        return self._save(name, "root", None, key_type, cert, key)

    def create_intermediate(
        self,
        name: str,
        parent_name: str,
        subject: x509.Name,
        key_type: str,
        days: int,
        path_length: int | None,
    ) -> CertificateAuthority:
        """Make a CA signed by one of estca's CAs; its life never outlasts its parent's.

        Raises:
            NotFoundError: no such parent.
            ConfigurationError: bad name, key type, lifetime or path length.
            ConflictError: the name is taken.
        """
        _check_ca_name(name)
        _check_days(days)
        if path_length is not None and not 0 <= path_length <= MAX_PATH_LENGTH:
            raise ConfigurationError(f"--path-length must be from 0 to {MAX_PATH_LENGTH}")
        parent = self.get(parent_name)
        if parent.kind == "server":
            raise ConfigurationError("the server TLS CA cannot have intermediates")
        parent_constraints = parent.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
        if parent_constraints.path_length == 0:
            raise ConfigurationError(f"CA {parent_name!r} has path length 0: it cannot sign CAs")
        if parent.certificate.not_valid_after_utc <= utc_now():
            raise ConfigurationError(f"CA {parent_name!r} has expired")
        key = generate_private_key(key_type)
        cert = build_ca_certificate(
            subject=subject,
            public_key=key.public_key(),
            issuer=parent.certificate,
            issuer_key=self.private_key(parent),
            days=days,
            path_length=path_length,
        )
        return self._save(name, "intermediate", parent, key_type, cert, key)

    def _save(
        self,
        name: str,
        kind: str,
        parent: CertificateAuthority | None,
        key_type: str,
        cert: x509.Certificate,
        key: CertificateIssuerPrivateKeyTypes,
    ) -> CertificateAuthority:
        with self._database.session() as session:
            if session.scalar(
                select(CertificateAuthorityRow).where(CertificateAuthorityRow.name == name)
            ):
                raise ConflictError(f"a CA named {name!r} already exists")
            row = CertificateAuthorityRow(
                name=name,
                kind=kind,
                parent_id=parent.id if parent else None,
                certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
                key_reference=self._custody.store_key(key, name),
                key_type=key_type,
                created_at=utc_now(),
            )
            session.add(row)
            bump_generation(session)
            session.flush()
            return _from_row(row, parent.name if parent else None)

    def list_all(self, include_server: bool = False) -> list[CertificateAuthority]:
        with self._database.session() as session:
            return self.list_in(session, include_server)

    def list_in(self, session: Session, include_server: bool) -> list[CertificateAuthority]:
        rows = session.scalars(
            select(CertificateAuthorityRow).order_by(CertificateAuthorityRow.id)
        ).all()
        names = {row.id: row.name for row in rows}
        return [
            _from_row(row, names.get(row.parent_id) if row.parent_id else None)
            for row in rows
            if include_server or row.kind != "server"
        ]

    def get(self, name: str) -> CertificateAuthority:
        """Raises: NotFoundError: no CA of that name."""
        with self._database.session() as session:
            return self.get_in(session, name)

    def get_in(self, session: Session, name: str) -> CertificateAuthority:
        row = session.scalar(
            select(CertificateAuthorityRow).where(CertificateAuthorityRow.name == name)
        )
        if row is None:
            raise NotFoundError(f"no CA named {name!r}")
        parent = session.get(CertificateAuthorityRow, row.parent_id) if row.parent_id else None
        return _from_row(row, parent.name if parent else None)

    def get_by_id(self, session: Session, ca_id: int) -> CertificateAuthority:
        row = session.get(CertificateAuthorityRow, ca_id)
        if row is None:
            raise NotFoundError(f"no CA with id {ca_id}")
        parent = session.get(CertificateAuthorityRow, row.parent_id) if row.parent_id else None
        return _from_row(row, parent.name if parent else None)

    def chain(self, name: str) -> list[x509.Certificate]:
        """The CA's certificate first, then each issuer up to and including the root."""
        with self._database.session() as session:
            return self.chain_in(session, self.get_in(session, name))

    def chain_in(self, session: Session, ca: CertificateAuthority) -> list[x509.Certificate]:
        chain = [ca.certificate]
        current = ca
        while current.parent is not None:
            current = self.get_in(session, current.parent)
            chain.append(current.certificate)
        return chain

    def private_key(self, ca: CertificateAuthority) -> CertificateIssuerPrivateKeyTypes:
        """The CA's private key, unlocked once and then kept in this process's memory."""
        cache_key = (ca.id, ca.key_reference)
        with self._lock:
            key = self._keys.get(cache_key)
            if key is None:
                key = self._custody.load_key(ca.key_reference, ca.name)
                self._keys[cache_key] = key
            return key

    def ensure_server_ca(self) -> CertificateAuthority:
        """The CA that issues the server's own TLS certificates, made on first use."""
        try:
            return self.get(SERVER_CA_NAME)
        except NotFoundError:
            key = generate_private_key("ec-p256")
            subject = x509.Name.from_rfc4514_string("CN=estca server CA")
            cert = build_ca_certificate(
                subject=subject,
                public_key=key.public_key(),
                issuer=None,
                issuer_key=key,
                days=SERVER_CA_DAYS,
                path_length=0,
            )
            return self._save(SERVER_CA_NAME, "server", None, "ec-p256", cert, key)

    def issue_server_certificate(
        self, hostnames: list[str], addresses: list[str]
    ) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes, x509.Certificate]:
        """A fresh TLS certificate for this server process, its key, and the server CA."""
        server_ca = self.get(SERVER_CA_NAME)
        ca_key = self.private_key(server_ca)
        key = generate_private_key("ec-p256")
        names: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys(hostnames)]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(addresses)]
        not_before = utc_now() - BACKDATE
        not_after = min(
            not_before + datetime.timedelta(days=SERVER_CERTIFICATE_DAYS),
            server_ca.certificate.not_valid_after_utc,
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(server_ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(new_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, signature_hash(ca_key))
        )
        return cert, key, server_ca.certificate


def _check_ca_name(name: str) -> None:
    if not _CA_NAME.fullmatch(name):
        raise ConfigurationError(
            f"CA name {name!r} must be 1 to 128 characters of letters, digits, '_', '.', '-'"
        )
    if name == SERVER_CA_NAME:
        raise ConfigurationError(f"{SERVER_CA_NAME!r} is reserved for the server's TLS CA")


def _check_days(days: int) -> None:
    if days < 1 or days > 36500:
        raise ConfigurationError("--days must be between 1 and 36500")
