"""Template policy: what is allowed, required and denied, and how each breach is named."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509

from estca.authority.policy import TemplatePolicy
from estca.errors import BadRequestError, ConfigurationError, ProofOfPossessionError
from estca.pki.csr import CertificateRequest, load_certificate_request
from tests.support import make_csr, name, new_key


def request(
    subject: x509.Name, sans: list[x509.GeneralName] | None = None, key: str = "ec-p256"
) -> CertificateRequest:
    der, _ = make_csr(subject, new_key(key), sans)
    return load_certificate_request(der)


SENSORS = TemplatePolicy(
    allow_subject=["CN=sensor-*", "O=Example"],
    require_subject=["CN"],
    deny_subject=["CN=sensor-admin*"],
    allow_san=["dns=*.sensors.test", "ip=re:10\\.0\\.\\d+\\.\\d+"],
    require_san=["dns"],
    key_types=["ec-p256", "rsa-3072"],
)


def test_request_within_the_template_breaks_no_rule() -> None:
    ok = request(name("sensor-1", O="Example"), [x509.DNSName("a.sensors.test")])
    assert SENSORS.violations(ok) == []


def test_every_broken_rule_is_named() -> None:
    bad = request(
        name("printer", OU="x"),
        [x509.RFC822Name("a@b.test"), x509.IPAddress(ipaddress.ip_address("10.1.0.1"))],
        key="ec-p384",
    )
    assert SENSORS.violations(bad) == [
        "key type ec-p384 is not allowed (allowed: ec-p256, rsa-3072)",
        "subject OU=x is not allowed",
        "subject CN=printer is not allowed",
        "SAN email:a@b.test is not allowed",
        "SAN ip:10.1.0.1 is not allowed",
        "a dns SAN is required",
    ]


def test_required_subject_attribute_missing_is_named() -> None:
    bad = request(x509.Name([]), [x509.DNSName("a.sensors.test")])
    assert SENSORS.violations(bad) == ["subject attribute CN is required"]


@pytest.mark.parametrize("cn", ["sensor-admin", "SENSOR-ADMIN-2", "sensor-Admin"], ids=str)
def test_deny_rules_cannot_be_dodged_by_case(cn: str) -> None:
    bad = request(name(cn), [x509.DNSName("a.sensors.test")])
    assert SENSORS.violations(bad)[0].startswith(f"subject CN={cn} is")


def test_glob_star_is_the_only_special_character() -> None:
    policy = TemplatePolicy(allow_subject=["CN=a.b?[c]"])
    assert policy.violations(request(name("a.b?[c]"))) == []
    assert policy.violations(request(name("aXb?[c]"))) == ["subject CN=aXb?[c] is not allowed"]


def test_regex_pattern_must_match_whole_value() -> None:
    policy = TemplatePolicy(allow_subject=["CN=re:dev-[0-9]+"])
    assert policy.violations(request(name("dev-42"))) == []
    assert policy.violations(request(name("dev-42x"))) != []


def test_rsa_key_type_means_at_least_that_many_bits() -> None:
    policy = TemplatePolicy(allow_subject=["CN=*"], key_types=["rsa-3072"])
    assert policy.violations(request(name("r"), key="rsa-4096")) == []
    assert policy.violations(request(name("r"), key="rsa-2048")) == [
        "key type rsa-2048 is not allowed (allowed: rsa-3072)"
    ]


def test_unsupported_san_types_are_refused() -> None:
    policy = TemplatePolicy(allow_subject=["CN=*"], allow_san=["dns=*"])
    directory = x509.DirectoryName(name("inner"))
    assert policy.violations(request(name("d"), [directory])) == [
        "SAN type DirectoryName is not allowed"
    ]


def test_key_usages_a_key_cannot_perform_are_left_out() -> None:
    policy = TemplatePolicy(key_usage=["digitalSignature", "keyEncipherment"])
    assert policy.usages_for("ec-p256") == ["digitalSignature"]
    assert policy.usages_for("rsa-2048") == ["digitalSignature", "keyEncipherment"]


def test_template_whose_only_usage_does_not_fit_the_key_refuses_it() -> None:
    policy = TemplatePolicy(allow_subject=["CN=*"], key_usage=["keyEncipherment"])
    assert policy.violations(request(name("e"))) == [
        "no key usage of the template fits a ec-p256 key"
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"allow_subject": ["XX=1"]}, "unknown subject attribute 'XX'"),
        ({"allow_subject": ["CN"]}, "must be written NAME=PATTERN"),
        ({"allow_san": ["rid=*"]}, "unknown SAN type 'rid'"),
        ({"key_types": ["dsa-1024"]}, "unknown key type 'dsa-1024'"),
        ({"key_usage": ["keyCertSign"]}, "for CA certificates"),
        ({"extended_key_usage": ["anything"]}, "unknown extended key usage"),
        ({"max_days": 0}, "--max-days"),
        ({"max_days": 3_000_000}, "--max-days must be a whole number from 1 to 36500"),
        ({"key_usage": [""]}, "at least one key usage"),
        ({"extended_key_usage": []}, "at least one extended key usage"),
        ({"allow_subject": ["CN=re:("]}, "bad regular expression"),
    ],
    ids=[
        "attr",
        "no-pattern",
        "san-type",
        "key-type",
        "ca-usage",
        "eku",
        "days",
        "huge-days",
        "no-usage",
        "no-eku",
        "regex",
    ],
)
def test_incoherent_templates_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        TemplatePolicy(**options)  # type: ignore[arg-type]


def test_policy_round_trips_through_json() -> None:
    assert TemplatePolicy.from_json(SENSORS.to_json()).to_json() == SENSORS.to_json()


def test_csr_with_bad_signature_fails_proof_of_possession() -> None:
    der, _ = make_csr(name("sensor-1"))
    tampered = der[:-1] + bytes([der[-1] ^ 0x01])
    with pytest.raises(ProofOfPossessionError, match="does not verify"):
        load_certificate_request(tampered)


@pytest.mark.parametrize(
    "body", [b"", b"\x30", b"\x30\x82\xff\xff", b"not der at all"], ids=["empty", "1", "len", "t"]
)
def test_unreadable_csr_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequestError, match="unreadable CSR"):
        load_certificate_request(body)


ANYTHING = TemplatePolicy(
    allow_subject=["CN=*"],
    deny_subject=["CN=admin*"],
    allow_san=["dns=*", "email=*", "uri=*", "ip=*"],
)


@pytest.mark.parametrize(
    ("san", "reason"),
    [
        (x509.UniformResourceIdentifier("https://*.example.com/"), "does not name a host"),
        (x509.UniformResourceIdentifier("https:///x"), "does not name a host"),
        (x509.UniformResourceIdentifier("a:"), "is not a URI"),
        (x509.UniformResourceIdentifier("http://[::1/"), "is not a URI"),
        (x509.DNSName("127.0.0.1"), "is not a host name"),
        (x509.DNSName("xn--zz.example"), "is not a host name"),
        (x509.RFC822Name(".a..b@example.com"), "is not a mailbox address"),
    ],
    ids=[
        "uri-wildcard",
        "uri-empty-host",
        "uri-bare-scheme",
        "uri-bad-ipv6",
        "dns-numeric",
        "dns-bad-punycode",
        "email-dots",
    ],
)
def test_malformed_sans_are_named(san: x509.GeneralName, reason: str) -> None:
    problems = ANYTHING.violations(request(name("d"), [san]))
    assert len(problems) == 1 and reason in problems[0]


def test_well_formed_sans_pass() -> None:
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier("https://device.example.com/path"),
        x509.UniformResourceIdentifier("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"),
        x509.DNSName("xn--bcher-kva.example"),
        x509.RFC822Name("first.last@example.com"),
    ]
    assert ANYTHING.violations(request(name("d"), sans)) == []


def test_request_naming_nothing_is_refused() -> None:
    assert ANYTHING.violations(request(x509.Name([]))) == [
        "the request names no subject and no SAN"
    ]


@pytest.mark.parametrize(
    "cn", ["ａｄｍｉｎ", "ADMIN-1", "admin  x"], ids=["fullwidth", "upper", "ws"]
)
def test_deny_rules_see_compatibility_forms(cn: str) -> None:
    problems = ANYTHING.violations(request(name(cn)))
    assert problems and "is denied by CN=admin*" in problems[0]


def test_refusal_messages_escape_control_characters() -> None:
    policy = TemplatePolicy(allow_subject=["CN=x"], allow_san=["dns=x.test"])
    (problem,) = [p for p in policy.violations(request(name("y"))) if "not allowed" in p]
    assert problem == "subject CN=y is not allowed"
    problems = ANYTHING.violations(request(name("a\nb")))
    assert all("\n" not in problem for problem in problems)
    assert "subject CN=a\\nb holds control or format characters" in problems


def test_encipher_only_needs_key_agreement() -> None:
    with pytest.raises(ConfigurationError, match="encipherOnly needs keyAgreement"):
        TemplatePolicy(key_usage=["digitalSignature", "encipherOnly"])
    policy = TemplatePolicy(key_usage=["keyAgreement", "encipherOnly", "digitalSignature"])
    assert policy.usages_for("ec-p256") == ["keyAgreement", "encipherOnly", "digitalSignature"]
    assert policy.usages_for("rsa-2048") == ["digitalSignature"]


def test_country_must_be_two_capital_letters() -> None:
    policy = TemplatePolicy(allow_subject=["CN=*", "C=*"])
    (problem,) = policy.violations(request(name("d", C="nl")))
    assert problem == "subject C=nl must be two capital letters (ISO 3166)"
