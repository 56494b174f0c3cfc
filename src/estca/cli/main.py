"""The ``estca`` command: set up, run the CA hierarchy, templates, EST, and the server."""

from __future__ import annotations

import functools
import json
import logging
import os
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy.exc
from cryptography.hazmat.primitives import serialization
from sqlalchemy.engine import make_url

from estca.authority.policy import TemplatePolicy
from estca.authority.service import Authority, est_urls
from estca.config import Settings, load_settings
from estca.errors import EstcaError
from estca.pki.names import parse_distinguished_name
from estca.runtime import open_authority

F = TypeVar("F", bound=Callable[..., Any])


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # Alembic announces every migration context at INFO; it is noise for operators.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def fails_cleanly(function: F) -> F:
    """Turn estca's own errors, and failures of what it stands on (files, network, TLS material,
    the database), into one line on stderr and exit status 1.

    Any other exception is a bug in estca and keeps its traceback.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except EstcaError as error:
            message = error.detail
        except sqlalchemy.exc.OperationalError as error:
            message = database_failure(error, _current_database_url())
        except OSError as error:  # ssl.SSLError and socket.gaierror among them
            message = system_failure(error)
        click.echo(f"estca: error: {_one_line(message)}", err=True)
        sys.exit(1)

    return wrapper  # type: ignore[return-value]


def database_failure(error: sqlalchemy.exc.OperationalError, database_url: str | None) -> str:
    """The driver's first line and where the database is, without the URL's password."""
    driver_lines = str(error.orig if error.orig is not None else error).strip().splitlines()
    reason = driver_lines[0] if driver_lines else type(error).__name__
    where = ""
    if database_url is not None:
        try:
            url = make_url(database_url)
        except sqlalchemy.exc.ArgumentError:
            url = None
        if url is not None:
            where = f" at {url.render_as_string(hide_password=True)}"
            # Drivers may echo the connection string they were given.
            if url.password:
                reason = reason.replace(str(url.password), "***")
    return f"the database{where} cannot be reached: {reason}"


def system_failure(error: OSError) -> str:
    """A file, socket or TLS failure in the words of the operating system or OpenSSL."""
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error}"
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is not None:
        return f"{error.filename}: {reason}"
    return reason


def _one_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else message


def _current_database_url() -> str | None:
    click_context = click.get_current_context(silent=True)
    context = click_context.find_object(Context) if click_context is not None else None
    if context is None or context.loaded_settings is None:
        return None
    return context.loaded_settings.database_url


class Context:
    def __init__(self, home: str | None) -> None:
        self.home = home
        self._settings: Settings | None = None

    @property
    def loaded_settings(self) -> Settings | None:
        """The settings if they have been read, without reading them."""
        return self._settings

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(home=self.home)
        return self._settings

    def authority(self, create: bool = False) -> Authority:
        return open_authority(self.settings, create=create)


pass_context = click.make_pass_decorator(Context)


def emit(data: object, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    elif isinstance(data, list):
        for item in data:
            emit(item, False)
            click.echo("")
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict):
                click.echo(f"{key}:")
                for inner_key, inner_value in value.items():
                    click.echo(f"  {inner_key}: {_plain(inner_value)}")
            else:
                click.echo(f"{key}: {_plain(value)}")
    else:
        click.echo(str(data))


def _plain(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)


@click.group()
@click.option(
    "--home",
    envvar="ESTCA_HOME",
    default=None,
    help="Data directory (default: $ESTCA_HOME or ./estca-data).",
)
@click.pass_context
@fails_cleanly
def cli(click_context: click.Context, home: str | None) -> None:
    """estca: a certificate authority with an EST (RFC 7030) enrollment server."""
    click_context.obj = Context(home)
    configure_logging(click_context.obj.settings.log_level)


@cli.command()
@pass_context
@fails_cleanly
def init(context: Context) -> None:
    """Create the data directory, database, master key and the server's TLS CA."""
    existed = context.settings.master_key_path.exists()
    authority = context.authority(create=True)
    server_ca = authority.hierarchy.ensure_server_ca()
    state = "already initialised" if existed else "initialised"
    click.echo(f"estca {state} in {context.settings.home}")
    click.echo(f"server TLS CA: {server_ca.certificate.subject.rfc4514_string()}")


@cli.command("server-ca")
@pass_context
@fails_cleanly
def server_ca(context: Context) -> None:
    """Print the PEM of the CA that signs the server's TLS certificate (for devices to trust)."""
    ca = context.authority().hierarchy.ensure_server_ca()
    click.echo(ca.certificate.public_bytes(serialization.Encoding.PEM).decode(), nl=False)


# CA hierarchy ------------------------------------------------------------------------------


@cli.group()
def ca() -> None:
    """Root and intermediate CAs."""


@ca.command("create-root")
@click.argument("name")
@click.option("--subject", required=True, help="Distinguished name, e.g. 'CN=Root,O=Ex,C=NL'.")
@click.option("--key-type", default="ec-p256", show_default=True)
@click.option("--days", default=3650, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def ca_create_root(
    context: Context, name: str, subject: str, key_type: str, days: int, as_json: bool
) -> None:
    """Create a self-signed root CA."""
    created = context.authority().hierarchy.create_root(
        name, parse_distinguished_name(subject), key_type, days
    )
    emit(created.summary(), as_json)


@ca.command("create-intermediate")
@click.argument("name")
@click.option("--parent", required=True, help="Name of the signing CA.")
@click.option("--subject", required=True)
@click.option("--key-type", default="ec-p256", show_default=True)
@click.option("--days", default=1825, show_default=True, type=int)
@click.option("--path-length", default=None, type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def ca_create_intermediate(
    context: Context,
    name: str,
    parent: str,
    subject: str,
    key_type: str,
    days: int,
    path_length: int | None,
    as_json: bool,
) -> None:
    """Create an intermediate CA signed by PARENT (its validity never outlasts the parent's)."""
    created = context.authority().hierarchy.create_intermediate(
        name, parent, parse_distinguished_name(subject), key_type, days, path_length
    )
    emit(created.summary(), as_json)


@ca.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def ca_list(context: Context, as_json: bool) -> None:
    """List the CAs."""
    cas = [item.summary() for item in context.authority().hierarchy.list_all()]
    if as_json:
        emit(cas, True)
        return
    for item in cas:
        click.echo(f"{item['name']}\t{item['kind']}\t{item['subject']}\t{item['not_after']}")


@ca.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def ca_show(context: Context, name: str, as_json: bool) -> None:
    """Show one CA."""
    emit(context.authority().hierarchy.get(name).summary(), as_json)


@ca.command("chain")
@click.argument("name")
@pass_context
@fails_cleanly
def ca_chain(context: Context, name: str) -> None:
    """Print the CA's chain as PEM: the named CA first, the root last."""
    for certificate in context.authority().hierarchy.chain(name):
        click.echo(certificate.public_bytes(serialization.Encoding.PEM).decode(), nl=False)


# Templates ---------------------------------------------------------------------------------


def policy_options(function: F) -> F:
    options = [
        click.option("--allow-subject", multiple=True, help="ATTR=PATTERN (repeatable)."),
        click.option("--require-subject", multiple=True, help="ATTR (repeatable)."),
        click.option("--deny-subject", multiple=True, help="ATTR=PATTERN (repeatable)."),
        click.option("--allow-san", multiple=True, help="TYPE=PATTERN: dns, ip, email, uri."),
        click.option("--require-san", multiple=True, help="TYPE (repeatable)."),
        click.option("--key-types", multiple=True, help="e.g. ec-p256,rsa-2048 (repeatable)."),
        click.option("--key-usage", multiple=True, help="e.g. digitalSignature,keyEncipherment."),
        click.option("--extended-key-usage", multiple=True, help="e.g. clientAuth,serverAuth."),
        click.option("--max-days", type=int, default=None, help="Longest validity in days."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def policy_changes(values: dict[str, Any]) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for key in (
        "allow_subject",
        "require_subject",
        "deny_subject",
        "allow_san",
        "require_san",
        "key_types",
        "key_usage",
        "extended_key_usage",
    ):
        if values.get(key):
            changes[key] = list(values[key])
    if values.get("max_days") is not None:
        changes["max_days"] = values["max_days"]
    return changes


@cli.group()
def template() -> None:
    """Certificate templates: the policy each kind of device is issued under."""


@template.command("create")
@click.argument("name")
@click.option("--ca", "ca_name", required=True, help="The CA that issues under this template.")
@policy_options
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def template_create(
    context: Context, /, name: str, ca_name: str, as_json: bool, **rules: Any
) -> None:
    """Create a template. Patterns are globs ('*' is any run) or 're:' regular expressions."""
    policy = TemplatePolicy(**policy_changes(rules))
    emit(context.authority().create_template(name, ca_name, policy), as_json)


@template.command("update")
@click.argument("name")
@click.option("--ca", "ca_name", default=None)
@policy_options
@click.option("--replace", is_flag=True, help="Replace list rules instead of adding to them.")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def template_update(
    context: Context, /, name: str, ca_name: str | None, replace: bool, as_json: bool, **rules: Any
) -> None:
    """Change a template; list rules given are added to the existing ones unless --replace."""
    emit(
        context.authority().update_template(name, ca_name, policy_changes(rules), replace),
        as_json,
    )


@template.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def template_list(context: Context, as_json: bool) -> None:
    """List templates."""
    templates = context.authority().list_templates()
    if as_json:
        emit(templates, True)
        return
    for item in templates:
        click.echo(f"{item['name']}\tca={item['ca']}\test_label={item['est_label'] or '-'}")


@template.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def template_show(context: Context, name: str, as_json: bool) -> None:
    """Show a template and its rules."""
    emit(context.authority().show_template(name), as_json)


@template.command("delete")
@click.argument("name")
@pass_context
@fails_cleanly
def template_delete(context: Context, name: str) -> None:
    """Delete a template (and its EST settings); issued certificates keep their records."""
    context.authority().delete_template(name)
    click.echo(f"template {name} deleted")


# EST ---------------------------------------------------------------------------------------


@cli.group()
def est() -> None:
    """EST enrollment for templates."""


def _base_url(context: Context) -> str:
    listen = context.settings.listen
    port = listen.rpartition(":")[2]
    return f"https://localhost:{port}"


@est.command("enable")
@click.argument("template_name", metavar="TEMPLATE")
@click.option(
    "--bootstrap-chain",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="PEM bundle of the manufacturer CA(s) that signed the devices' certificates.",
)
@click.option(
    "--passphrase-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="File whose first line is the passphrase devices send as HTTP Basic password.",
)
@click.option("--label", default=None, help="1-64 of [A-Za-z0-9_-]; generated if absent.")
@click.option(
    "--no-bootstrap-validation",
    is_flag=True,
    help="Enroll on the passphrase alone, without a bootstrap client certificate.",
)
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def est_enable(
    context: Context,
    template_name: str,
    bootstrap_chain: Path,
    passphrase_file: Path,
    label: str | None,
    no_bootstrap_validation: bool,
    as_json: bool,
) -> None:
    """Enable EST for TEMPLATE; prints the label and the three URLs."""
    from estca.authority.passphrase import read_passphrase_file

    settings = context.authority().enable_est(
        template_name,
        bootstrap_chain.read_bytes(),
        read_passphrase_file(passphrase_file.read_bytes()),
        label,
        not no_bootstrap_validation,
    )
    if as_json:
        emit(settings.summary(_base_url(context)), True)
        return
    click.echo(f"label: {settings.label}")
    for operation, url in est_urls(_base_url(context), settings.label).items():
        click.echo(f"{operation}: {url}")


@est.command("show")
@click.argument("template_name", metavar="TEMPLATE")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def est_show(context: Context, template_name: str, as_json: bool) -> None:
    """Show a template's EST settings (never the passphrase)."""
    emit(context.authority().show_est(template_name).summary(_base_url(context)), as_json)


@est.command("disable")
@click.argument("template_name", metavar="TEMPLATE")
@pass_context
@fails_cleanly
def est_disable(context: Context, template_name: str) -> None:
    """Disable EST for a template; running servers stop serving its label within a second."""
    context.authority().disable_est(template_name)
    click.echo(f"EST disabled for template {template_name}")


# Issued certificates -----------------------------------------------------------------------


@cli.group()
def cert() -> None:
    """Issued certificates."""


@cert.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def cert_list(context: Context, as_json: bool) -> None:
    """List issued certificates."""
    certificates = context.authority().list_certificates()
    if as_json:
        emit(certificates, True)
        return
    for item in certificates:
        state = "revoked" if item["revoked_at"] else "valid"
        click.echo(
            f"{item['serial']}\t{item['subject']}\t{item['template']}\t{item['not_after']}\t{state}"
        )


@cert.command("show")
@click.argument("serial")
@click.option("--json", "as_json", is_flag=True)
@pass_context
@fails_cleanly
def cert_show(context: Context, serial: str, as_json: bool) -> None:
    """Show an issued certificate (SERIAL in hex; colons and case ignored)."""
    found = context.authority().show_certificate(serial)
    emit(found if as_json or len(found) > 1 else found[0], as_json)


@cert.command("revoke")
@click.argument("serial")
@click.option("--reason", default="unspecified", show_default=True)
@pass_context
@fails_cleanly
def cert_revoke(context: Context, serial: str, reason: str) -> None:
    """Revoke an issued certificate; re-enrollment with it is refused from then on."""
    revoked = context.authority().revoke_certificate(serial, reason)
    click.echo(f"certificate {revoked['serial']} revoked")


# Server ------------------------------------------------------------------------------------


def serve_options(function: F) -> F:
    options = [
        click.option("--listen", default=None, help="HOST:PORT (default 0.0.0.0:8443)."),
        click.option("--hostname", "hostnames", multiple=True, help="Extra TLS name."),
        click.option("--tls-cert", type=click.Path(exists=True, path_type=Path), default=None),
        click.option("--tls-key", type=click.Path(exists=True, path_type=Path), default=None),
        click.option(
            "--workers", type=int, default=None, help="Processes (default: number of cores)."
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _serve(
    context: Context,
    listen: str | None,
    hostnames: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    workers: int | None,
) -> None:
    from estca.errors import ConfigurationError
    from estca.est.run import ServeOptions, parse_listen, serve

    if (tls_cert is None) != (tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    settings = context.settings
    host, port = parse_listen(listen or settings.listen)
    count = workers if workers is not None else settings.workers or (os.cpu_count() or 1)
    if count < 1:
        raise ConfigurationError(f"--workers must be 1 or more, not {count}")
    serve(
        settings,
        ServeOptions(
            host=host,
            port=port,
            hostnames=tuple(settings.hostnames) + hostnames,
            tls_certificate=tls_cert,
            tls_key=tls_key,
            workers=count,
        ),
    )


@cli.command("serve")
@serve_options
@pass_context
@fails_cleanly
def serve_command(
    context: Context,
    listen: str | None,
    hostnames: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    workers: int | None,
) -> None:
    """Run the EST server."""
    _serve(context, listen, hostnames, tls_cert, tls_key, workers)


@cli.command("quickstart")
@serve_options
@pass_context
@fails_cleanly
def quickstart(
    context: Context,
    listen: str | None,
    hostnames: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
    workers: int | None,
) -> None:
    """Initialise, seed a demo on an empty store, print how to enroll, and serve."""
    from estca.cli.demo import seed_demo
    from estca.est.run import parse_listen

    # Checked before anything is created, so that a typo leaves no half-made data directory.
    _, port = parse_listen(listen or context.settings.listen)
    authority = context.authority(create=True)
    authority.hierarchy.ensure_server_ca()
    seed_demo(authority, context.settings.home, port)
    authority.database.dispose()
    _serve(context, listen, hostnames, tls_cert, tls_key, workers)


def main() -> None:
    cli(prog_name="estca")


if __name__ == "__main__":
    main()
