"""Key types by the names operators write, key generation, and signature hash choice."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)

from estca.errors import ConfigurationError

CA_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
CSR_KEY_TYPES = (
    "ec-p256",
    "ec-p384",
    "ec-p521",
    "rsa-2048",
    "rsa-3072",
    "rsa-4096",
    "ed25519",
)
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ec-p256": ec.SECP256R1,
    "ec-p384": ec.SECP384R1,
    "ec-p521": ec.SECP521R1,
}
_CURVE_NAMES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}


def generate_private_key(key_type: str) -> CertificateIssuerPrivateKeyTypes:
    """Make a new private key of a named type.

    Raises:
        ConfigurationError: the key type is not one estca makes.
    """
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type]())
    if key_type.startswith("rsa-") and key_type in CA_KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigurationError(
        f"unknown key type {key_type!r}; choose one of {', '.join(CA_KEY_TYPES)}"
    )


def describe_public_key(key: CertificatePublicKeyTypes) -> str:
    """Name a public key as estca names key types: ``ec-p256``, ``rsa-3072``, ``ed25519``."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _CURVE_NAMES.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"dsa-{key.key_size}"
    return type(key).__name__


def key_type_allows(allowed: str, actual: str) -> bool:
    """Whether a template's key type entry admits a key: ``rsa-2048`` means at least 2048 bits."""
    if allowed.startswith("rsa-") and actual.startswith("rsa-"):
        return int(actual[4:]) >= int(allowed[4:])
    return allowed == actual


def signature_hash(
    key: CertificateIssuerPrivateKeyTypes,
) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash a CA key signs with: SHA-384 for P-384 and up, none for EdDSA, else SHA-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()
