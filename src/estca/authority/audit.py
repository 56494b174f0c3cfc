"""The audit trail: one line per issuance and per refusal, on its own logger, never a secret."""

from __future__ import annotations

import logging

from estca.logvalues import quote, token

audit_logger = logging.getLogger("estca.audit")


def audit_issued(
    *, label: str, operation: str, serial: str, subject: str, sans: list[str], client: str | None
) -> None:
    audit_logger.info(
        "issued label=%s operation=%s serial=%s subject=%s sans=%s client_fingerprint=%s",
        token(label),
        token(operation),
        serial,
        quote(subject),
        quote(",".join(sans)),
        client or "-",
    )


def audit_refused(*, label: str, operation: str, peer: str, status: int, reason: str) -> None:
    audit_logger.warning(
        "refused label=%s operation=%s peer=%s status=%d reason=%s",
        token(label),
        token(operation),
        token(peer),
        status,
        quote(reason),
    )
