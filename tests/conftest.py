"""Fixtures: a fresh database per backend, and a deployed estca with its server running."""

from __future__ import annotations

import datetime
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support import (
    POSTGRES_ADMIN_URL,
    EstcaInstallation,
    EstServer,
    Issued,
    make_certificate,
    name,
)

BACKENDS = ["sqlite", "postgresql"]
PASSPHRASE = "correct horse battery staple"


def create_database_url(backend: str, home: Path) -> Iterator[str]:
    """A new empty database of the backend, dropped afterwards (PostgreSQL) with its data."""
    if backend == "sqlite":
        yield f"sqlite:///{home / 'estca.db'}"
        return
    database = f"estca_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def installation(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstcaInstallation]:
    """An initialised estca (data directory, master key, database) on the given backend."""
    home = tmp_path_factory.mktemp(f"estca-{backend}")
    for url in create_database_url(backend, home):
        installation = EstcaInstallation(home / "data", url)
        installation.run("init")
        yield installation


@dataclass
class Manufacturer:
    """A stand-in device maker: root, intermediate, and a way to make device certificates."""

    root: Issued
    intermediate: Issued
    directory: Path

    def device(
        self,
        stem: str,
        common_name: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[Path, Path]:
        issued = make_certificate(
            name(common_name),
            self.intermediate,
            ca=False,
            not_before=not_before,
            not_after=not_after,
        )
        return issued.write(self.directory, stem)

    def chain_file(self, stem: str, leaf: tuple[Path, Path]) -> Path:
        """The leaf followed by the intermediate, as a device that sends its chain has it."""
        path = self.directory / f"{stem}-with-chain.pem"
        path.write_bytes(leaf[0].read_bytes() + self.intermediate.pem())
        return path


def make_manufacturer(directory: Path, label: str) -> Manufacturer:
    directory.mkdir(parents=True, exist_ok=True)
    root = make_certificate(name(f"{label} Manufacturer Root", O=label), None, ca=True)
    intermediate = make_certificate(name(f"{label} Manufacturer Devices", O=label), root, ca=True)
    return Manufacturer(root, intermediate, directory)


@dataclass
class Deployment:
    """estca set up as an operator would, with its server running."""

    installation: EstcaInstallation
    server: EstServer
    manufacturer: Manufacturer
    other_manufacturer: Manufacturer
    bootstrap: tuple[Path, Path]
    work: Path

    @property
    def passphrase(self) -> str:
        return PASSPHRASE


@pytest.fixture(scope="module")
def deployment(
    installation: EstcaInstallation, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("work")
    run = installation.run
    run("ca", "create-root", "root", "--subject", "CN=Test Root,O=estca tests,C=NL")
    run(
        "ca",
        "create-intermediate",
        "issuing",
        "--parent",
        "root",
        "--subject",
        "CN=Test Issuing CA,O=estca tests",
        "--path-length",
        "0",
    )
    run(
        "template",
        "create",
        "devices",
        "--ca",
        "issuing",
        "--allow-subject",
        "CN=device-*",
        "--allow-subject",
        "O=*",
        "--require-subject",
        "CN",
        "--deny-subject",
        "CN=device-forbidden*",
        "--allow-san",
        "dns=*.devices.test",
        "--allow-san",
        "ip=10.*",
        "--key-types",
        "ec-p256,ec-p384",
        "--key-types",
        "rsa-2048",
        "--key-usage",
        "digitalSignature,keyEncipherment",
        "--extended-key-usage",
        "clientAuth",
        "--max-days",
        "30",
    )
    run("template", "create", "others", "--ca", "issuing", "--allow-subject", "CN=*")
    manufacturer = make_manufacturer(work / "maker", "Acme")
    other = make_manufacturer(work / "other-maker", "Other")
    passphrase_file = work / "passphrase.txt"
    passphrase_file.write_text(PASSPHRASE + "\n")
    # The bootstrap chain of "devices" is the manufacturer's intermediate and root.
    chain = work / "maker-chain.pem"
    chain.write_bytes(manufacturer.intermediate.pem() + manufacturer.root.pem())
    run(
        "est",
        "enable",
        "devices",
        "--bootstrap-chain",
        str(chain),
        "--passphrase-file",
        str(passphrase_file),
        "--label",
        "devices",
    )
    other_chain = work / "other-chain.pem"
    other_chain.write_bytes(other.intermediate.pem() + other.root.pem())
    run(
        "est",
        "enable",
        "others",
        "--bootstrap-chain",
        str(other_chain),
        "--passphrase-file",
        str(passphrase_file),
        "--label",
        "others",
    )
    bootstrap = manufacturer.device("bootstrap", "device-bootstrap")
    server = EstServer(installation)
    try:
        yield Deployment(installation, server, manufacturer, other, bootstrap, work)
    finally:
        server.stop()
