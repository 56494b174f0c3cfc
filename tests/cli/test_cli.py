"""The operator's command line, run as a real process against both stores."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.support import ESTCA, EstcaInstallation


@pytest.fixture(scope="module")
def hierarchy(installation: EstcaInstallation) -> EstcaInstallation:
    installation.run("ca", "create-root", "cli-root", "--subject", "CN=CLI Root,O=Ex,C=NL")
    installation.run(
        "ca",
        "create-intermediate",
        "cli-issuing",
        "--parent",
        "cli-root",
        "--subject",
        "CN=CLI Issuing,O=Ex",
        "--key-type",
        "ec-p384",
        "--path-length",
        "0",
        "--days",
        "36000",
    )
    return installation


def test_init_makes_private_data_directory_and_master_key(installation: EstcaInstallation) -> None:
    key_file = installation.home / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(installation.home.stat().st_mode) == 0o700
    again = installation.run("init")
    assert "already initialised" in again.stdout


def test_chain_is_named_ca_first_root_last_with_ca_extensions(
    hierarchy: EstcaInstallation,
) -> None:
    pem = hierarchy.run("ca", "chain", "cli-issuing").stdout.encode()
    issuing, root = x509.load_pem_x509_certificates(pem)
    assert issuing.subject.rfc4514_string() == "CN=CLI Issuing,O=Ex"
    assert root.subject == root.issuer
    for certificate in (issuing, root):
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical and constraints.value.ca
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
        certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    # Asked for 36000 days, the intermediate still ends with its root.
    assert issuing.not_valid_after_utc <= root.not_valid_after_utc
    issuing.verify_directly_issued_by(root)


@pytest.mark.parametrize(
    ("key_type", "key_class", "size"),
    [
        ("ec-p256", ec.EllipticCurvePublicKey, 256),
        ("ec-p384", ec.EllipticCurvePublicKey, 384),
        ("rsa-2048", rsa.RSAPublicKey, 2048),
        ("rsa-3072", rsa.RSAPublicKey, 3072),
        ("ed25519", ed25519.Ed25519PublicKey, 0),
    ],
    ids=["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519"],
)
def test_root_of_each_key_type(
    hierarchy: EstcaInstallation, key_type: str, key_class: type, size: int
) -> None:
    hierarchy.run(
        "ca", "create-root", f"kt-{key_type}", "--subject", f"CN={key_type}", "--key-type", key_type
    )
    shown = hierarchy.json("ca", "show", f"kt-{key_type}")
    assert shown["key_type"] == key_type
    pem = hierarchy.run("ca", "chain", f"kt-{key_type}").stdout.encode()
    public_key = x509.load_pem_x509_certificate(pem).public_key()
    assert isinstance(public_key, key_class)
    if isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        assert public_key.key_size == size


def test_ca_keys_are_stored_only_encrypted(hierarchy: EstcaInstallation) -> None:
    references = hierarchy.query("SELECT name, key_reference FROM certificate_authorities")
    assert len(references) >= 3
    for name, reference in references:
        assert reference.startswith("soft-aes256gcm:"), name
        assert "PRIVATE KEY" not in reference


def test_list_shows_cas_but_not_the_server_ca(hierarchy: EstcaInstallation) -> None:
    names = [item["name"] for item in hierarchy.json("ca", "list")]
    assert "cli-root" in names and "cli-issuing" in names
    assert "estca-server-ca" not in names


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ca", "create-root", "x", "--subject", "nonsense"], "not a distinguished name"),
        (["ca", "create-root", "x", "--subject", "CN=x", "--key-type", "dsa"], "unknown key type"),
        (["ca", "create-root", "cli-root", "--subject", "CN=x"], "already exists"),
        (["ca", "create-intermediate", "y", "--parent", "nope", "--subject", "CN=y"], "no CA"),
        (
            ["ca", "create-intermediate", "y", "--parent", "cli-issuing", "--subject", "CN=y"],
            "path length 0",
        ),
        (
            ["template", "create", "t", "--ca", "cli-issuing", "--allow-san", "x400=*"],
            "unknown SAN type",
        ),
        (["template", "create", "t", "--ca", "nope"], "no CA named"),
        (["cert", "revoke", "zz-not-hex"], "not a hexadecimal serial"),
        (["cert", "show", "01:02"], "no issued certificate"),
    ],
    ids=["dn", "key-type", "dup", "parent", "path-len", "san", "tmpl-ca", "serial", "missing"],
)
def test_bad_operator_input_fails_with_one_clear_line(
    hierarchy: EstcaInstallation, args: list[str], message: str
) -> None:
    result = hierarchy.run(*args, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_template_lists_accumulate_and_update_adds(hierarchy: EstcaInstallation) -> None:
    hierarchy.run(
        "template",
        "create",
        "lists",
        "--ca",
        "cli-issuing",
        "--key-types",
        "ec-p256,rsa-2048",
        "--key-types",
        "ec-p384",
        "--allow-subject",
        "CN=a*",
    )
    shown = hierarchy.json("template", "show", "lists")
    assert shown["policy"]["key_types"] == ["ec-p256", "rsa-2048", "ec-p384"]
    hierarchy.run("template", "update", "lists", "--allow-subject", "CN=b*", "--max-days", "7")
    policy = hierarchy.json("template", "show", "lists")["policy"]
    assert policy["allow_subject"] == ["CN=a*", "CN=b*"] and policy["max_days"] == 7
    hierarchy.run("template", "update", "lists", "--replace", "--allow-subject", "CN=c*")
    assert hierarchy.json("template", "show", "lists")["policy"]["allow_subject"] == ["CN=c*"]
    hierarchy.run("template", "delete", "lists")
    assert "lists" not in [t["name"] for t in hierarchy.json("template", "list")]


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("simpleenroll", "name of an EST operation"),
        ("CACERTS", "name of an EST operation"),
        ("has space", "must be 1 to 64"),
        ("x" * 65, "must be 1 to 64"),
        ("dot.ted", "must be 1 to 64"),
    ],
    ids=["operation", "operation-case", "space", "too-long", "dot"],
)
def test_est_labels_are_checked(
    hierarchy: EstcaInstallation, tmp_path: Path, label: str, message: str
) -> None:
    hierarchy.run("template", "create", "labelled", "--ca", "cli-issuing", check=False)
    chain = tmp_path / "chain.pem"
    chain.write_text(hierarchy.run("ca", "chain", "cli-root").stdout)
    passphrase = tmp_path / "pass"
    passphrase.write_text("long enough passphrase\n")
    result = hierarchy.run(
        "est",
        "enable",
        "labelled",
        "--bootstrap-chain",
        str(chain),
        "--passphrase-file",
        str(passphrase),
        "--label",
        label,
        check=False,
    )
    assert result.returncode == 1
    assert message in result.stderr


def test_est_enable_prints_label_and_urls_and_never_stores_passphrase(
    hierarchy: EstcaInstallation, tmp_path: Path
) -> None:
    hierarchy.run("template", "create", "urls", "--ca", "cli-issuing")
    chain = tmp_path / "chain.pem"
    chain.write_text(hierarchy.run("ca", "chain", "cli-root").stdout)
    passphrase = tmp_path / "pass"
    passphrase.write_text("a secret that must not be stored\n")
    result = hierarchy.run(
        "est",
        "enable",
        "urls",
        "--bootstrap-chain",
        str(chain),
        "--passphrase-file",
        str(passphrase),
    )
    lines = result.stdout.splitlines()
    label = lines[0].removeprefix("label: ")
    assert label.startswith("est-")
    for operation in ("cacerts", "simpleenroll", "simplereenroll"):
        assert f"/.well-known/est/{label}/{operation}" in result.stdout
    shown = json.loads(hierarchy.run("est", "show", "urls", "--json").stdout)
    assert shown["label"] == label and shown["bootstrap_validation"] is True
    rows = dict(hierarchy.query("SELECT label, passphrase_hash FROM est_enrollments"))
    stored = rows[label]
    assert stored.startswith("scrypt-sha256$") and "a secret" not in stored


def test_bootstrap_chain_must_hold_ca_certificates(
    hierarchy: EstcaInstallation, tmp_path: Path
) -> None:
    hierarchy.run("template", "create", "leafchain", "--ca", "cli-issuing")
    not_pem = tmp_path / "nope.pem"
    not_pem.write_text("hello")
    passphrase = tmp_path / "pass"
    passphrase.write_text("long enough passphrase\n")
    result = hierarchy.run(
        "est",
        "enable",
        "leafchain",
        "--bootstrap-chain",
        str(not_pem),
        "--passphrase-file",
        str(passphrase),
        check=False,
    )
    assert result.returncode == 1 and "not a PEM certificate bundle" in result.stderr


def run_with(
    installation: EstcaInstallation, changes: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    """Run estca with some of the installation's environment changed."""
    return subprocess.run(
        [*ESTCA, *args],
        env={**installation.env, **changes},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unknown_log_level_fails_naming_the_variable_and_the_levels(
    installation: EstcaInstallation,
) -> None:
    result = run_with(installation, {"ESTCA_LOG_LEVEL": "bogus"}, "ca", "list")
    assert result.returncode == 1
    assert result.stderr == (
        "estca: error: ESTCA_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, "
        "not 'bogus'\n"
    )


def test_unreachable_database_fails_with_one_line_without_the_password(
    installation: EstcaInstallation,
) -> None:
    # Nothing listens on port 1 of loopback: the connection is refused at once.
    url = "postgresql+psycopg://nouser:s3cret-pw@127.0.0.1:1/x"
    result = run_with(installation, {"ESTCA_DATABASE_URL": url}, "ca", "list")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "estca: error: the database at postgresql+psycopg://nouser:***@127.0.0.1:1/x "
        "cannot be reached: connection failed: "
    )
    assert "Connection refused" in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "s3cret-pw" not in result.stderr


@pytest.mark.parametrize(
    ("home", "message"),
    [
        ("/proc/nope", "cannot create the data directory /proc/nope: No such file or directory"),
        ("{file}", "ESTCA_HOME {file} exists and is not a directory"),
        ("{file}/data", "cannot create the data directory {file}/data: Not a directory"),
    ],
    ids=["cannot-create", "regular-file", "below-regular-file"],
)
def test_init_where_no_data_directory_can_be_fails_with_one_line(
    installation: EstcaInstallation, tmp_path: Path, home: str, message: str
) -> None:
    file = tmp_path / "a-file"
    file.write_text("")
    result = run_with(installation, {"ESTCA_HOME": home.format(file=file)}, "init")
    assert result.returncode == 1
    assert result.stderr == f"estca: error: {message.format(file=file)}\n"


def test_quickstart_checks_listen_before_making_anything(
    installation: EstcaInstallation, tmp_path: Path
) -> None:
    home = tmp_path / "quickstart"
    result = run_with(
        installation,
        {"ESTCA_HOME": str(home), "ESTCA_DATABASE_URL": ""},
        "quickstart",
        "--listen",
        "nonsense",
    )
    assert result.returncode == 1
    assert result.stderr == "estca: error: --listen 'nonsense' must be HOST:PORT\n"
    assert not home.exists()
