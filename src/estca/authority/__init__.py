"""The policy core: CAs, templates, EST enrollment settings, issuance and revocation.

It knows nothing of HTTP; every front end calls it.
"""
