"""The one error tree of estca.

Every leaf carries the HTTP status a front end answers with and a short public sentence; the
detail (which is logged, never sent) is the exception's ``detail``.
"""

from __future__ import annotations


class EstcaError(Exception):
    """Root of every error estca raises on purpose."""

    status = 500
    public_message = "Internal error."

    def __init__(self, detail: str, public_message: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if public_message is not None:
            self.public_message = public_message


class ConfigurationError(EstcaError):
    """The operator's settings or command-line input are wrong."""

    status = 400
    public_message = "Invalid configuration."


class NotFoundError(EstcaError):
    """A named object (CA, template, label, certificate) does not exist."""

    status = 404
    public_message = "Not found."


class ConflictError(EstcaError):
    """A named object already exists, or the change would break another object."""

    status = 409
    public_message = "Conflict."


class BadRequestError(EstcaError):
    """The client sent something malformed."""

    status = 400
    public_message = "Malformed request."


class ProofOfPossessionError(BadRequestError):
    """The CSR's signature does not verify with its own public key."""

    public_message = "The CSR signature does not verify (proof of possession failed)."


class AuthenticationRequiredError(EstcaError):
    """No credentials were sent; the answer is a bare challenge."""

    status = 401
    public_message = ""


class AuthenticationFailedError(EstcaError):
    """Credentials were sent and are wrong."""

    status = 401
    public_message = "The passphrase is wrong."


class ClientCertificateError(EstcaError):
    """The TLS client certificate is missing or not trusted for this label."""

    status = 403
    public_message = "A trusted client certificate is required."


class PolicyViolationError(EstcaError):
    """A well-formed request that the template forbids."""

    status = 403
    public_message = "The request breaks the certificate template."

    def __init__(self, violations: list[str]) -> None:
        sentence = "The request breaks the certificate template: " + "; ".join(violations) + "."
        super().__init__("; ".join(violations), sentence)
        self.violations = violations


class MethodNotAllowedError(EstcaError):
    status = 405
    public_message = "Method not allowed."


class UnsupportedMediaTypeError(EstcaError):
    status = 415
    public_message = "Content-Type must be application/pkcs10."


class PayloadTooLargeError(EstcaError):
    status = 413
    public_message = "The request body is too large."


class RequestTimeoutError(EstcaError):
    status = 408
    public_message = "The request body did not arrive in time."


class HttpVersionNotSupportedError(EstcaError):
    status = 505
    public_message = "Only HTTP/1.0 and HTTP/1.1 are supported."


class NotImplementedOperationError(EstcaError):
    status = 501
    public_message = "This EST operation is not supported."


class KeyCustodyError(EstcaError):
    """A CA key cannot be stored, found or used."""
