"""The RFC 7030 front end: routes, wire formats, client authentication, TLS."""
