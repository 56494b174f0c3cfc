"""Pure X.509 helpers: names, keys, CSR checks, chain validation, PKCS#7. No I/O here."""
