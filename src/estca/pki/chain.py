"""Validating a client certificate against a set of configured anchors.

Every certificate an operator configures is an anchor (partial-chain validation): a bootstrap
chain need not reach a self-signed root. Device certificates made by manufacturers rarely follow
the Web PKI profile, so end-entity extensions are not constrained; issuers must still be CAs.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509 import verification

from estca.errors import ClientCertificateError
from estca.pki.names import format_name


def _require_ca(
    policy: verification.Policy, certificate: x509.Certificate, value: x509.BasicConstraints | None
) -> None:
    if value is None or not value.ca:
        raise ValueError("issuer is not a CA")


_CA_POLICY = verification.ExtensionPolicy.permit_all().require_present(
    x509.BasicConstraints, verification.Criticality.AGNOSTIC, _require_ca
)


def _refuse_ca(
    policy: verification.Policy, certificate: x509.Certificate, value: x509.BasicConstraints | None
) -> None:
    if value is not None and value.ca:
        raise ValueError("a CA certificate cannot authenticate a device")


_END_ENTITY_POLICY = verification.ExtensionPolicy.permit_all().may_be_present(
    x509.BasicConstraints, verification.Criticality.AGNOSTIC, _refuse_ca
)


class ChainValidator:
    """Validates leaves against a fixed set of anchors; built once, used for many requests."""

    def __init__(self, anchors: Sequence[x509.Certificate]) -> None:
        self._anchors = list(anchors)
        self._store = verification.Store(self._anchors)
        self._verifier: tuple[datetime.datetime, verification.ClientVerifier] | None = None

    def validate(self, leaf: x509.Certificate, now: datetime.datetime) -> list[x509.Certificate]:
        """Return the validated chain, leaf first.

        Raises:
            ClientCertificateError: the leaf is not currently valid or does not chain to an anchor.
        """
        # Validity is checked first so that the refusal says which date was missed (RFC 5280
        # 6.1.3 (a)(2)); the verifier below would only say "not valid at validation time".
        if now > leaf.not_valid_after_utc:
            raise ClientCertificateError(
                f"client certificate {format_name(leaf.subject)!r} expired at "
                f"{leaf.not_valid_after_utc.isoformat()}"
            )
        if now < leaf.not_valid_before_utc:
            raise ClientCertificateError(
                f"client certificate {format_name(leaf.subject)!r} is not valid before "
                f"{leaf.not_valid_before_utc.isoformat()}"
            )
        try:
            verified = self._verifier_at(now).verify(leaf, self._anchors)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        # VerificationError for a chain that does not hold; ValueError (or a panic of the Rust
        # core) for a certificate whose extensions cannot be parsed: both are the client's.
        except BaseException as exc:  # noqa: BLE001
            raise ClientCertificateError(
                f"client certificate {format_name(leaf.subject)!r} issued by "
                f"{format_name(leaf.issuer)!r} does not chain to this label's trusted "
                f"certificates: {exc}"
            ) from None
        return list(verified.chain)

    def _verifier_at(self, now: datetime.datetime) -> verification.ClientVerifier:
        """A verifier for this second; built once a second at most, not once a request."""
        second = now.replace(microsecond=0)
        cached = self._verifier
        if cached is None or cached[0] != second:
            verifier = (
                verification.PolicyBuilder()
                .store(self._store)
                .time(second)
                .extension_policies(ca_policy=_CA_POLICY, ee_policy=_END_ENTITY_POLICY)
                .build_client_verifier()
            )
            cached = (second, verifier)
            self._verifier = cached
        return cached[1]
