"""The key custody interface and the encrypted soft-key implementation.

A soft key is its PKCS#8 DER encrypted with AES-256-GCM under the master key; the CA's name is
bound in as associated data so that one CA's blob cannot be swapped in for another's.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from estca.errors import ConfigurationError, KeyCustodyError

MASTER_KEY_BYTES = 32
_SOFT_PREFIX = "soft-aes256gcm:"


class KeyCustody(Protocol):
    """Keeps CA private keys; returns an opaque reference the store may hold."""

    def store_key(self, key: CertificateIssuerPrivateKeyTypes, owner: str) -> str: ...

    def load_key(self, reference: str, owner: str) -> CertificateIssuerPrivateKeyTypes: ...


class SoftKeyCustody:
    """Keys encrypted at rest under a 256-bit master key."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise ConfigurationError("the master key must be 32 bytes")
        self._aead = AESGCM(master_key)

    def store_key(self, key: CertificateIssuerPrivateKeyTypes, owner: str) -> str:
        plain = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, plain, _associated_data(owner))
        return _SOFT_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def load_key(self, reference: str, owner: str) -> CertificateIssuerPrivateKeyTypes:
        """Decrypt a key stored by `store_key`.

        Raises:
            KeyCustodyError: wrong master key, tampered blob, or not a soft key reference.
        """
        if not reference.startswith(_SOFT_PREFIX):
            raise KeyCustodyError(f"key of {owner!r} is not held by the soft key custody")
        try:
            blob = base64.b64decode(reference[len(_SOFT_PREFIX) :], validate=True)
            plain = self._aead.decrypt(blob[:12], blob[12:], _associated_data(owner))
        except (InvalidTag, binascii.Error, ValueError):
            raise KeyCustodyError(
                f"cannot decrypt the key of {owner!r}: wrong master key or damaged record"
            ) from None
        key = serialization.load_der_private_key(plain, password=None)
        return key  # type: ignore[return-value]


def _associated_data(owner: str) -> bytes:
    return b"estca-ca-key:" + owner.encode("utf-8")


def load_or_create_master_key(path: Path, environment_value: str | None, create: bool) -> bytes:
    """The master key from ``ESTCA_MASTER_KEY`` (base64) or a 0600 file, made if asked.

    Raises:
        ConfigurationError: the key is missing, unreadable or of the wrong size.
    """
    if environment_value:
        try:
            key = base64.b64decode(environment_value, validate=True)
        except binascii.Error:
            raise ConfigurationError("ESTCA_MASTER_KEY is not base64") from None
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigurationError("ESTCA_MASTER_KEY must be the base64 of 32 bytes")
        return key
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigurationError(
                f"{path} is readable by others (mode {mode:o}); run chmod 600 {path}"
            )
        key = base64.b64decode(path.read_bytes().strip())
        if len(key) != MASTER_KEY_BYTES:
            raise ConfigurationError(f"{path} does not hold a 32-byte master key")
        return key
    if not create:
        raise ConfigurationError(f"no master key at {path}; run 'estca init' first")
    key = os.urandom(MASTER_KEY_BYTES)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(base64.b64encode(key) + b"\n")
    return key
