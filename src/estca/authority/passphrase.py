"""Passphrases: stored as a slow salted hash, checked in constant time, successes remembered.

A correct passphrase is remembered in memory as an HMAC under a per-process secret, so that the
slow hash is paid once per process; a wrong one always pays the full hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading

from estca.errors import ConfigurationError

# scrypt cost: about 50 ms and 16 MiB on a small server (RFC 7914 parameters).
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
#: The stored form's name: scrypt over the SHA-256 of the passphrase.
SCHEME = "scrypt-sha256"
MIN_PASSPHRASE_LENGTH = 8


def hash_passphrase(passphrase: str) -> str:
    """Hash a new passphrase for storage.

    Raises:
        ConfigurationError: the passphrase is too short to be worth a hash.
    """
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise ConfigurationError(
            f"the passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters"
        )
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(passphrase.encode("utf-8"), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    encode = base64.b64encode
    return (
        f"{SCHEME}${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
        f"{encode(salt).decode('ascii')}${encode(digest).decode('ascii')}"
    )


def _scrypt(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    # scrypt keys HMAC with the secret, and HMAC pads short keys with zeros and hashes long
    # ones: "pass" and "pass\0", or a long passphrase and its SHA-256, would be equal. Hashing
    # first gives every passphrase a key of the same length.
    key = hashlib.sha256(secret).digest()
    return hashlib.scrypt(key, salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32)


def verify_passphrase_hash(passphrase: bytes, stored: str) -> bool:
    """Check a passphrase against a stored hash (slow on purpose)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = _scrypt(passphrase, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return scheme == SCHEME and hmac.compare_digest(actual, expected)


class PassphraseChecker:
    """Checks passphrases, remembering successes for this process only."""

    def __init__(self) -> None:
        self._secret = os.urandom(32)
        self._remembered: set[bytes] = set()
        self._lock = threading.Lock()

    def _token(self, passphrase: bytes, stored: str) -> bytes:
        return hmac.new(self._secret, stored.encode() + b"\0" + passphrase, "sha256").digest()

    def is_remembered(self, passphrase: bytes, stored: str) -> bool:
        """Whether this exact passphrase was already found correct for this exact hash."""
        return self._token(passphrase, stored) in self._remembered

    def check(self, passphrase: bytes, stored: str) -> bool:
        """Check a passphrase; slow unless it was already found correct in this process."""
        token = self._token(passphrase, stored)
        if token in self._remembered:
            return True
        if not verify_passphrase_hash(passphrase, stored):
            return False
        with self._lock:
            if len(self._remembered) > 10_000:
                self._remembered.clear()
            self._remembered.add(token)
        return True


def read_passphrase_file(content: bytes) -> str:
    """The passphrase in a file: its first line, without the line ending.

    Raises:
        ConfigurationError: the file is empty or not UTF-8.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError("the passphrase file is not UTF-8") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigurationError("the passphrase file is empty")
    return lines[0]
