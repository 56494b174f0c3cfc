"""Distinguished names and subject alternative names: parsing, printing and comparing."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from estca.errors import BadRequestError, ConfigurationError

#: Subject attributes a template may speak of, by the short names operators write.
SUBJECT_ATTRIBUTES: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "emailAddress": NameOID.EMAIL_ADDRESS,
}
_ATTRIBUTE_NAMES = {oid: name for name, oid in SUBJECT_ATTRIBUTES.items()}

#: SAN types a template may speak of.
SAN_TYPES = ("dns", "ip", "email", "uri")


def parse_distinguished_name(text: str) -> x509.Name:
    """Parse ``CN=Example Root,O=Example,C=NL`` (RFC 4514, most specific first).

    Raises:
        ConfigurationError: the text is not a distinguished name.
    """
    try:
        name = x509.Name.from_rfc4514_string(
            text,
            {"serialNumber": NameOID.SERIAL_NUMBER, "emailAddress": NameOID.EMAIL_ADDRESS},
        )
    except ValueError as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise ConfigurationError(f"not a distinguished name: {text!r}{detail}") from exc
    if not name.rdns:
        raise ConfigurationError(f"empty distinguished name: {text!r}")
    return name


def attribute_name(oid: x509.ObjectIdentifier) -> str:
    """The short name of a subject attribute, or its dotted OID when it has none here."""
    return _ATTRIBUTE_NAMES.get(oid, oid.dotted_string)


def format_name(name: x509.Name) -> str:
    """Print a name the way operators write it (RFC 4514, with estca's short names)."""
    return name.rfc4514_string(
        {NameOID.SERIAL_NUMBER: "serialNumber", NameOID.EMAIL_ADDRESS: "emailAddress"}
    )


def _normalise_string(value: str | bytes) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join(value.split()).casefold()


def comparable_name(name: x509.Name) -> tuple[frozenset[tuple[str, str]], ...]:
    """A key under which two names are equal exactly when RFC 5280 7.1 says they match.

    Attribute values are compared case-insensitively with white space collapsed, and the
    attributes of one multi-valued RDN in any order.
    """
    return tuple(
        frozenset((attr.oid.dotted_string, _normalise_string(attr.value)) for attr in rdn)
        for rdn in name.rdns
    )


@dataclass(frozen=True, order=True)
class SubjectAltName:
    """One SAN entry of a type a template can speak of: ``dns``, ``ip``, ``email``, ``uri``."""

    kind: str
    value: str

    def comparable(self) -> tuple[str, str]:
        """The form under which RFC 5280 says two entries are the same name."""
        if self.kind == "ip":
            return (self.kind, str(ipaddress.ip_network(self.value, strict=False)))
        if self.kind == "uri":
            scheme, sep, rest = self.value.partition("://")
            host, slash, path = rest.partition("/")
            return (self.kind, scheme.lower() + sep + host.lower() + slash + path)
        if self.kind == "email":
            local, at, domain = self.value.rpartition("@")
            return (self.kind, local + at + domain.lower())
        return (self.kind, self.value.rstrip(".").lower())

    def to_general_name(self) -> x509.GeneralName:
        if self.kind == "dns":
            return x509.DNSName(self.value)
        if self.kind == "ip":
            return x509.IPAddress(ipaddress.ip_address(self.value))
        if self.kind == "email":
            return x509.RFC822Name(self.value)
        return x509.UniformResourceIdentifier(self.value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


def read_subject_alt_names(
    extensions: x509.Extensions,
) -> tuple[list[SubjectAltName], list[str]]:
    """The SAN entries of a certificate or CSR, and a description of each unsupported entry.

    Raises:
        BadRequestError: the SAN extension cannot be parsed.
    """
    try:
        extension = extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [], []
    except ValueError as exc:
        raise BadRequestError(f"unparseable subjectAltName: {exc}") from exc
    names: list[SubjectAltName] = []
    unsupported: list[str] = []
    for general_name in extension.value:
        if isinstance(general_name, x509.DNSName):
            names.append(SubjectAltName("dns", general_name.value))
        elif isinstance(general_name, x509.IPAddress):
            # A network (8 or 32 octets) is kept as written; well_formed_problems refuses it.
            names.append(SubjectAltName("ip", str(general_name.value)))
        elif isinstance(general_name, x509.RFC822Name):
            names.append(SubjectAltName("email", general_name.value))
        elif isinstance(general_name, x509.UniformResourceIdentifier):
            names.append(SubjectAltName("uri", general_name.value))
        else:
            unsupported.append(type(general_name).__name__)
    return names, unsupported


def comparable_sans(names: list[SubjectAltName]) -> frozenset[tuple[str, str]]:
    return frozenset(name.comparable() for name in names)


#: Upper bounds of RFC 5280 appendix A.1 (ub-common-name and friends), in characters.
_ATTRIBUTE_LIMITS = {
    "CN": 64,
    "O": 64,
    "OU": 64,
    "L": 128,
    "ST": 128,
    "serialNumber": 64,
    "emailAddress": 255,
    "C": 2,
}
#: Attributes whose ASN.1 type restricts their characters (RFC 5280 appendix A.1).
_ATTRIBUTE_SYNTAX = {
    "C": (re.compile(r"[A-Z]{2}"), "two capital letters (ISO 3166)"),
    "serialNumber": (re.compile(r"[A-Za-z0-9 '()+,\-./:=?]+"), "a PrintableString"),
    "emailAddress": (re.compile(r"[\x20-\x7e]+"), "ASCII (an IA5String)"),
}
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")


def is_host_name(value: str) -> bool:
    """A DNS name in the preferred syntax (RFC 1034 3.5, RFC 5280 4.2.1.6): no wildcard, no
    all-numeric top label (which would be an IP address written as a name), valid A-labels."""
    labels = value.split(".")
    return (
        len(value) <= 253
        and all(_DNS_LABEL.fullmatch(label) and _valid_a_label(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _valid_a_label(label: str) -> bool:
    if not label.lower().startswith("xn--"):
        return True
    try:
        label.encode("ascii").decode("idna")
    except UnicodeError:
        return False
    return True


def escaped(value: str) -> str:
    """A value with every non-printable character as a backslash escape, for messages."""
    return value.encode("unicode_escape").decode("ascii")


def well_formed_problems(subject: x509.Name, sans: list[SubjectAltName]) -> list[str]:
    """Reasons a requested name is malformed, whatever the template allows.

    Control characters, and format characters such as U+202E (right-to-left override) or
    U+200B (zero-width space), make a name display as something it is not: str.isprintable
    is false for both.
    """
    problems: list[str] = []
    counts: dict[str, int] = {}
    for rdn in subject.rdns:
        for attribute in rdn:
            name = attribute_name(attribute.oid)
            counts[name] = counts.get(name, 0) + 1
            value = attribute.value
            if not isinstance(value, str):
                problems.append(f"subject attribute {name} is not a string")
                continue
            if not value.isprintable():
                problems.append(
                    f"subject {name}={escaped(value)} holds control or format characters"
                )
            limit = _ATTRIBUTE_LIMITS.get(name)
            if limit is not None and not 1 <= len(value) <= limit:
                problems.append(f"subject {name} must be 1 to {limit} characters")
            syntax = _ATTRIBUTE_SYNTAX.get(name)
            if syntax is not None and not syntax[0].fullmatch(value):
                problems.append(f"subject {name}={escaped(value)} must be {syntax[1]}")
    if not subject.rdns and not sans:
        # RFC 5280 4.1.2.6: with an empty subject, the SAN extension must name the subject.
        problems.append("the request names no subject and no SAN")
    for name, count in counts.items():
        if count > 1:
            problems.append(f"subject attribute {name} appears {count} times")
    for san in sans:
        problem = _san_problem(san)
        if problem:
            problems.append(f"SAN {san.kind}:{escaped(san.value)} {problem}")
    return problems


def _san_problem(san: SubjectAltName) -> str | None:
    value = san.value
    if san.kind == "ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return "is an address range, not an address"
        return None
    if not value.isascii() or not value.isprintable() or " " in value:
        return "holds characters a name of its kind cannot hold"
    if san.kind == "dns":
        return None if is_host_name(value) else "is not a host name"
    if san.kind == "email":
        local, at, domain = value.rpartition("@")
        # RFC 5321 4.1.2 dot-atom: no leading, trailing or doubled dot in the local part.
        dots_ok = not (local.startswith(".") or local.endswith(".") or ".." in local)
        if not at or not _EMAIL_LOCAL.fullmatch(local) or not dots_ok:
            return "is not a mailbox address"
        return None if is_host_name(domain) else "is not a mailbox address"
    return _uri_problem(value)


def _uri_problem(value: str) -> str | None:
    """RFC 5280 4.2.1.6: a URI with a scheme and, when it has an authority, a host name or IP."""
    if not _URI_SCHEME.match(value) or len(value) > 2048:
        return "is not a URI"
    try:
        parts = urllib.parse.urlsplit(value)
        host = parts.hostname or ""
    except ValueError:
        return "is not a URI"
    if not (parts.netloc or parts.path):
        return "is not a URI"
    if "//" in value[: len(parts.scheme) + 3]:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not is_host_name(host):
                return "does not name a host"
    return None


def reencoded_name(name: x509.Name) -> x509.Name:
    """The same attribute values under the ASN.1 string type each attribute should have.

    A CSR may encode a value under any tag (an OCTET STRING, a NumericString); copying the tag
    would sign a certificate that parsers refuse. cryptography's default for each attribute is
    the RFC 5280 type: UTF8String, PrintableString for C and serialNumber, IA5String for email.
    """
    return x509.Name(
        [
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(attribute.oid, attribute.value) for attribute in rdn]
            )
            for rdn in name.rdns
        ]
    )
