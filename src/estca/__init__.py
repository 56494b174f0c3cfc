"""estca: a certificate authority with an EST (RFC 7030) enrollment server in front of it."""

__version__ = "0.1.0"
