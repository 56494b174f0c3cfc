"""Certificate templates: the policy a CSR is checked against and the contents it decides.

Anything a template does not allow is refused. The certificate is built from the template and
the names the CSR asks for; no extension of the CSR is ever copied.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from estca.errors import ConfigurationError
from estca.pki.certs import EXTENDED_KEY_USAGES, KEY_USAGE_NAMES
from estca.pki.csr import CertificateRequest
from estca.pki.keys import CSR_KEY_TYPES, key_type_allows
from estca.pki.names import (
    SAN_TYPES,
    SUBJECT_ATTRIBUTES,
    attribute_name,
    escaped,
    well_formed_problems,
)

DEFAULT_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")
DEFAULT_KEY_USAGE = ("digitalSignature",)
DEFAULT_EXTENDED_KEY_USAGE = ("clientAuth",)
DEFAULT_MAX_DAYS = 365
#: Smaller RSA exponents (3, 17) have known pitfalls; 65537 is what every toolkit makes.
MIN_RSA_EXPONENT = 65537
#: A hundred years: the longest validity a template may ask for (CA lifetimes share it).
MAX_DAYS_LIMIT = 36500

#: Usages an end-entity key of each family can actually perform (RFC 5480 3, RFC 8410 5).
_USAGES_BY_FAMILY = {
    "rsa": {"digitalSignature", "contentCommitment", "keyEncipherment", "dataEncipherment"},
    "ec": {"digitalSignature", "contentCommitment", "keyAgreement", "encipherOnly", "decipherOnly"},
    "ed25519": {"digitalSignature", "contentCommitment"},
}
_CASE_INSENSITIVE_SAN_TYPES = {"dns", "email"}


class Pattern:
    """A glob (``*`` is any run of characters, nothing else is special) or ``re:`` regex."""

    def __init__(self, text: str, case_insensitive: bool) -> None:
        self.text = text
        if text.startswith("re:"):
            source = text[3:]
        else:
            source = ".*".join(re.escape(part) for part in text.split("*"))
        try:
            self._regex = re.compile(source, re.IGNORECASE if case_insensitive else 0)
        except re.error as exc:
            raise ConfigurationError(f"bad regular expression {text!r}: {exc}") from None

    def matches(self, value: str) -> bool:
        return self._regex.fullmatch(value) is not None


def _split_rule(rule: str, known: tuple[str, ...] | dict[str, Any], what: str) -> tuple[str, str]:
    name, sep, pattern = rule.partition("=")
    if not sep or not name:
        raise ConfigurationError(f"{what} rule {rule!r} must be written NAME=PATTERN")
    if name not in known:
        raise ConfigurationError(f"unknown {what} {name!r}; choose from {', '.join(known)}")
    return name, pattern


def _split_list(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


@dataclass
class TemplatePolicy:
    """The rules of one certificate template, as stored (JSON) and as checked."""

    allow_subject: list[str] = field(default_factory=list)
    require_subject: list[str] = field(default_factory=list)
    deny_subject: list[str] = field(default_factory=list)
    allow_san: list[str] = field(default_factory=list)
    require_san: list[str] = field(default_factory=list)
    key_types: list[str] = field(default_factory=lambda: list(DEFAULT_KEY_TYPES))
    key_usage: list[str] = field(default_factory=lambda: list(DEFAULT_KEY_USAGE))
    extended_key_usage: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENDED_KEY_USAGE))
    max_days: int = DEFAULT_MAX_DAYS

    def __post_init__(self) -> None:
        self.key_types = _split_list(self.key_types)
        self.key_usage = _split_list(self.key_usage)
        self.extended_key_usage = _split_list(self.extended_key_usage)
        self.validate()
        self._allow_subject = [self._subject_rule(rule) for rule in self.allow_subject]
        self._deny_subject = [self._subject_rule(rule, deny=True) for rule in self.deny_subject]
        self._allow_san = [self._san_rule(rule) for rule in self.allow_san]

    @staticmethod
    def _subject_rule(rule: str, deny: bool = False) -> tuple[str, Pattern]:
        name, pattern = _split_rule(rule, SUBJECT_ATTRIBUTES, "subject attribute")
        # A deny rule must not be dodged by changing case.
        return name, Pattern(pattern, case_insensitive=deny)

    @staticmethod
    def _san_rule(rule: str) -> tuple[str, Pattern]:
        kind, pattern = _split_rule(rule, SAN_TYPES, "SAN type")
        return kind, Pattern(pattern, case_insensitive=kind in _CASE_INSENSITIVE_SAN_TYPES)

    def validate(self) -> None:
        """Refuse a template that is incoherent.

        Raises:
            ConfigurationError: the message names the bad option.
        """
        for attribute in self.require_subject:
            if attribute not in SUBJECT_ATTRIBUTES:
                raise ConfigurationError(f"unknown subject attribute {attribute!r}")
        for kind in self.require_san:
            if kind not in SAN_TYPES:
                raise ConfigurationError(f"unknown SAN type {kind!r}; choose from dns, ip, ...")
        for key_type in self.key_types:
            if key_type not in CSR_KEY_TYPES:
                raise ConfigurationError(
                    f"unknown key type {key_type!r}; choose from {', '.join(CSR_KEY_TYPES)}"
                )
        if not self.key_types:
            raise ConfigurationError("a template must allow at least one key type")
        for usage in self.key_usage:
            if usage not in KEY_USAGE_NAMES:
                raise ConfigurationError(f"unknown key usage {usage!r}")
            if usage in ("keyCertSign", "cRLSign"):
                raise ConfigurationError(f"{usage} is for CA certificates, not templates")
            if usage in ("encipherOnly", "decipherOnly") and "keyAgreement" not in self.key_usage:
                raise ConfigurationError(f"{usage} needs keyAgreement among the key usages")
        for usage in self.extended_key_usage:
            if usage not in EXTENDED_KEY_USAGES:
                raise ConfigurationError(
                    f"unknown extended key usage {usage!r}; choose from "
                    f"{', '.join(EXTENDED_KEY_USAGES)}"
                )
        if not isinstance(self.max_days, int) or not 1 <= self.max_days <= MAX_DAYS_LIMIT:
            raise ConfigurationError(
                f"--max-days must be a whole number from 1 to {MAX_DAYS_LIMIT}"
            )
        # An empty list would leave the extension out, and the certificate good for any use.
        if not self.key_usage:
            raise ConfigurationError("a template needs at least one key usage (--key-usage)")
        if not self.extended_key_usage:
            raise ConfigurationError(
                "a template needs at least one extended key usage (--extended-key-usage)"
            )

    def to_json(self) -> dict[str, object]:
        return {key: value for key, value in asdict(self).items() if not key.startswith("_")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TemplatePolicy:
        return cls(**data)

    def usages_for(self, key_type: str) -> list[str]:
        """The template's key usages that a key of this type can perform."""
        family = (
            "rsa" if key_type.startswith("rsa") else "ec" if key_type.startswith("ec") else key_type
        )
        possible = _USAGES_BY_FAMILY.get(family, set())
        usages = [usage for usage in self.key_usage if usage in possible]
        if "keyAgreement" not in usages:
            # RFC 5280 4.2.1.3: encipherOnly and decipherOnly qualify keyAgreement alone.
            usages = [u for u in usages if u not in ("encipherOnly", "decipherOnly")]
        return usages

    def violations(self, request: CertificateRequest) -> list[str]:
        """Every rule the request breaks, each in a phrase that names it; empty if none."""
        # Names must be well formed whatever the template allows: a pattern's "*" must never
        # admit a wildcard, a NUL or a right-to-left override.
        found = well_formed_problems(request.subject, request.subject_alt_names)

        # Key type: "rsa-2048" in a template means at least 2048 bits; the exponent is the usual.
        if not any(key_type_allows(allowed, request.key_type) for allowed in self.key_types):
            found.append(
                f"key type {request.key_type} is not allowed (allowed: {', '.join(self.key_types)})"
            )
        elif isinstance(request.public_key, rsa.RSAPublicKey) and (
            request.public_key.public_numbers().e < MIN_RSA_EXPONENT
        ):
            exponent = request.public_key.public_numbers().e
            found.append(f"RSA public exponent {exponent} is below {MIN_RSA_EXPONENT}")
        elif self.key_usage and not self.usages_for(request.key_type):
            found.append(f"no key usage of the template fits a {request.key_type} key")

        # Subject: every attribute must be allowed and not denied; required ones present.
        present: set[str] = set()
        for rdn in request.subject.rdns:
            for attribute in rdn:
                name = attribute_name(attribute.oid)
                value = (
                    attribute.value if isinstance(attribute.value, str) else repr(attribute.value)
                )
                present.add(name)
                found.extend(self._subject_violations(name, value))
        for name in self.require_subject:
            if name not in present:
                found.append(f"subject attribute {name} is required")

        # SANs: only the four supported types, each entry allowed; required types present.
        for kind in request.unsupported_san_types:
            found.append(f"SAN type {kind} is not allowed")
        kinds: set[str] = set()
        for san in request.subject_alt_names:
            kinds.add(san.kind)
            if not any(k == san.kind and p.matches(san.value) for k, p in self._allow_san):
                found.append(f"SAN {san.kind}:{escaped(san.value)} is not allowed")
        for kind in self.require_san:
            if kind not in kinds:
                found.append(f"a {kind} SAN is required")
        return found

    def _subject_violations(self, name: str, value: str) -> list[str]:
        if name not in SUBJECT_ATTRIBUTES:
            return [f"subject attribute {name} is not allowed"]
        # A deny rule also sees the value with white space collapsed and in NFKC form, so that
        # fullwidth or compatibility letters do not slip past it.
        forms = {value, " ".join(value.split()), unicodedata.normalize("NFKC", value)}
        shown = escaped(value)
        for rule_name, pattern in self._deny_subject:
            if rule_name == name and any(pattern.matches(form) for form in forms):
                return [f"subject {name}={shown} is denied by {name}={pattern.text}"]
        if not any(n == name and p.matches(value) for n, p in self._allow_subject):
            return [f"subject {name}={shown} is not allowed"]
        return []
