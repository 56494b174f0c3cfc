"""Names: parsing operators' DNs and comparing names the way RFC 5280 does."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from estca.errors import ConfigurationError
from estca.pki.names import (
    SubjectAltName,
    comparable_name,
    comparable_sans,
    format_name,
    parse_distinguished_name,
)


def test_parse_distinguished_name_keeps_most_specific_first() -> None:
    parsed = parse_distinguished_name("CN=Example Root,O=Example,C=NL")
    assert parsed.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Example Root"
    # RFC 4514 writes the last RDN first: the country is the first RDN of the encoding.
    assert parsed.rdns[0].get_attributes_for_oid(NameOID.COUNTRY_NAME)[0].value == "NL"
    assert format_name(parsed) == "CN=Example Root,O=Example,C=NL"


def test_parse_distinguished_name_knows_serial_number_and_email() -> None:
    parsed = parse_distinguished_name("CN=x,serialNumber=42,emailAddress=a@b.test")
    assert parsed.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "42"
    assert format_name(parsed) == "CN=x,serialNumber=42,emailAddress=a@b.test"


@pytest.mark.parametrize("text", ["", "CN", "XX=1", "=foo"], ids=["empty", "no-value", "bad", "eq"])
def test_parse_distinguished_name_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ConfigurationError, match="distinguished name"):
        parse_distinguished_name(text)


def _name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


def test_names_equal_ignoring_case_and_inner_white_space() -> None:
    a = _name((NameOID.ORGANIZATION_NAME, "Example  Corp"), (NameOID.COMMON_NAME, "Dev 1"))
    b = _name((NameOID.ORGANIZATION_NAME, "example corp"), (NameOID.COMMON_NAME, " dev 1 "))
    assert comparable_name(a) == comparable_name(b)


def test_names_differ_when_order_of_rdns_differs() -> None:
    a = _name((NameOID.ORGANIZATION_NAME, "O"), (NameOID.COMMON_NAME, "C"))
    b = _name((NameOID.COMMON_NAME, "C"), (NameOID.ORGANIZATION_NAME, "O"))
    assert comparable_name(a) != comparable_name(b)


def test_sans_compare_dns_case_insensitively_and_ip_by_value() -> None:
    a = [SubjectAltName("dns", "Host.Example.COM"), SubjectAltName("ip", "2001:db8::1")]
    b = [SubjectAltName("ip", "2001:0db8:0:0::1"), SubjectAltName("dns", "host.example.com")]
    assert comparable_sans(a) == comparable_sans(b)
    assert comparable_sans(a) != comparable_sans([SubjectAltName("dns", "host.example.com")])


def test_email_local_part_stays_case_sensitive() -> None:
    assert SubjectAltName("email", "Bob@EXAMPLE.com").comparable() == ("email", "Bob@example.com")
    assert SubjectAltName("email", "Bob@x.test").comparable() != (
        SubjectAltName("email", "bob@x.test").comparable()
    )
