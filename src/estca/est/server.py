"""The EST server: routes of RFC 7030 section 3.2.2 over aiohttp, and their authentication.

Errors are rendered in one place (`_render_error`); every request gets one access-log line and
every refusal one audit line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import itertools
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from estca.authority.audit import audit_refused
from estca.authority.issuance import ClientIdentity
from estca.authority.passphrase import PassphraseChecker
from estca.authority.profiles import EnrollmentProfile
from estca.authority.service import Authority
from estca.errors import (
    AuthenticationFailedError,
    AuthenticationRequiredError,
    BadRequestError,
    ClientCertificateError,
    EstcaError,
    MethodNotAllowedError,
    NotFoundError,
    NotImplementedOperationError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from estca.est.tls import ServerIdentity, build_server_context
from estca.est.wire import MAX_BODY_BYTES, check_pkcs10_media_type, decode_csr_body
from estca.pki.certs import utc_now
from estca.pki.names import format_name
from estca.pki.pkcs7 import CERTS_ONLY_MEDIA_TYPE, base64_lines, certs_only_der

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("estca.access")

#: Seconds a client has to deliver a request body once its headers are in.
BODY_TIMEOUT_SECONDS = 30.0
REALM = "estca"
_ENROLL_OPERATIONS = ("simpleenroll", "simplereenroll")
_UNSUPPORTED_OPERATIONS = ("fullcmc", "serverkeygen")

T = TypeVar("T")


class EstState:
    """What the running server serves; replaced as a whole when the store changes."""

    def __init__(self, profiles: dict[str, EnrollmentProfile]) -> None:
        self.profiles = profiles
        self.cacerts_bodies = {
            label: base64_lines(certs_only_der(profile.ca_chain))
            for label, profile in profiles.items()
        }

    def trusted_certificates(self) -> list[x509.Certificate]:
        """Every certificate a client chain may end in, for the TLS layer."""
        seen: dict[bytes, x509.Certificate] = {}
        for profile in self.profiles.values():
            for certificate in [*profile.bootstrap_certificates, *profile.ca_chain]:
                seen[certificate.fingerprint(hashes.SHA256())] = certificate
        return list(seen.values())


class EstServer:
    """One server process: its TLS identity, current state, and the refresh loop."""

    def __init__(
        self, authority: Authority, identity: ServerIdentity, refresh_seconds: float
    ) -> None:
        self.authority = authority
        self.identity = identity
        self.refresh_seconds = refresh_seconds
        self.passphrases = PassphraseChecker()
        self.generation = authority.database.generation()
        self.state = EstState(authority.load_profiles())
        self._context = build_server_context(identity, self.state.trusted_certificates())
        self.ssl_context = build_server_context(identity, [])
        # Every handshake starts on ssl_context and is moved to the current context as soon as
        # the ClientHello arrives, so a changed trust store applies without a restart.
        self.ssl_context.sni_callback = self._select_context
        self._request_ids = itertools.count(1)
        self._request_prefix = os.urandom(3).hex()
        self._refresh_lock = asyncio.Lock()

    def _select_context(
        self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        connection.context = self._context

    async def refresh(self, force: bool = False) -> None:
        """Reload the profiles if the store's generation moved (or always, with ``force``)."""
        async with self._refresh_lock:
            generation = await _off_loop(self.authority.database.generation)
            if generation == self.generation and not force:
                return
            state = EstState(await _off_loop(self.authority.load_profiles))
            self._context = build_server_context(self.identity, state.trusted_certificates())
            self.state = state
            self.generation = generation
            logger.info(
                "enrollment settings reloaded (generation %d, labels: %s)",
                generation,
                ", ".join(sorted(state.profiles)) or "none",
            )

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except Exception:
                logger.exception("refreshing enrollment settings failed; keeping the old ones")

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/.well-known/est/{label}/{operation}", self._dispatch)
        return app

    # Requests ------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = f"{self._request_prefix}-{next(self._request_ids)}"
        request["request_id"] = request_id
        label = request.match_info.get("label", "-")
        operation = request.match_info.get("operation", "-")
        try:
            response = await handler(request)
        except EstcaError as error:
            response = self._render_error(request, error, label, operation)
        except web.HTTPException as http_error:
            response = self._render_error(
                request, _from_http_exception(http_error), label, operation
            )
        except Exception:
            logger.exception("request %s failed", request_id)
            response = _text_response(500, f"Internal error (request {request_id}).")
        response.headers["Server"] = "estca"
        access_logger.info(
            "request_id=%s peer=%s client=%s method=%s path=%s label=%s operation=%s "
            "status=%d duration_ms=%.1f",
            request_id,
            _peer(request),
            _quote(request.get("client_subject", "-")),
            request.method,
            _quote(request.path),
            label,
            operation,
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    def _render_error(
        self, request: web.Request, error: EstcaError, label: str, operation: str
    ) -> web.Response:
        if error.status != 404 or label in self.state.profiles:
            audit_refused(
                label=label,
                operation=operation,
                peer=_peer(request),
                status=error.status,
                reason=error.detail,
            )
        else:
            logger.info("refused request to %s: %s", _quote(request.path), error.detail)
        if isinstance(error, AuthenticationRequiredError):
            # RFC 9110 11.6.1 challenge; BouncyCastle and libest fail if it carries a body.
            response = web.Response(status=401, body=b"")
        else:
            response = _text_response(error.status, error.public_message)
        if error.status == 401:
            response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
        if isinstance(error, MethodNotAllowedError):
            response.headers["Allow"] = "GET" if operation == "cacerts" else "POST"
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        label = request.match_info["label"]
        operation = request.match_info["operation"]
        profile = self.state.profiles.get(label)
        if profile is None:
            raise NotFoundError(f"unknown EST label {label!r}", "Unknown EST label.")
        if operation == "cacerts":
            _require_method(request, "GET")
            return _pkcs7_response(self.state.cacerts_bodies[label])
        if operation == "csrattrs":
            _require_method(request, "GET")
            # RFC 7030 4.5.2: 204 means "no CSR attributes are required".
            return web.Response(status=204)
        if operation in _UNSUPPORTED_OPERATIONS:
            raise NotImplementedOperationError(f"{operation} is not supported")
        if operation not in _ENROLL_OPERATIONS:
            raise NotFoundError(f"unknown EST operation {operation!r}", "Unknown EST operation.")
        _require_method(request, "POST")
        return await self._enroll(request, profile, operation)

    async def _enroll(
        self, request: web.Request, profile: EnrollmentProfile, operation: str
    ) -> web.Response:
        # Step 1: authenticate the client before anything in the body is read.
        passphrase = _basic_password(request)
        certificate = self._authenticate_certificate(request, profile, operation)
        await self._check_passphrase(profile, passphrase)

        # Steps 2 to 10 run in the authority, off the event loop.
        check_pkcs10_media_type(request.headers.get("Content-Type"))
        csr_der = decode_csr_body(await _read_body(request))
        client = ClientIdentity(certificate=certificate, peer=_peer(request))
        issue = (
            self.authority.issuer.enroll
            if operation == "simpleenroll"
            else self.authority.issuer.reenroll
        )
        issued = await _off_loop(issue, profile, csr_der, client)
        return _pkcs7_response(base64_lines(certs_only_der([issued])))

    def _authenticate_certificate(
        self, request: web.Request, profile: EnrollmentProfile, operation: str
    ) -> x509.Certificate | None:
        certificate = _client_certificate(request)
        if certificate is not None:
            request["client_subject"] = format_name(certificate.subject)
        now = utc_now()
        if operation == "simplereenroll":
            # RFC 7030 4.2.2: the client authenticates with the certificate being renewed.
            if certificate is None:
                raise ClientCertificateError(
                    "simplereenroll without a client certificate",
                    "Re-enrollment requires the current certificate as TLS client certificate.",
                )
            profile.issued_validator.validate(certificate, now)
            return certificate
        if not profile.bootstrap_validation:
            return certificate
        if certificate is None:
            raise ClientCertificateError("simpleenroll without a client certificate")
        profile.bootstrap_validator.validate(certificate, now)
        return certificate

    async def _check_passphrase(self, profile: EnrollmentProfile, passphrase: bytes) -> None:
        checker = self.passphrases
        if checker.is_remembered(passphrase, profile.passphrase_hash):
            return
        if not await _off_loop(checker.check, passphrase, profile.passphrase_hash):
            raise AuthenticationFailedError(f"wrong passphrase for label {profile.label!r}")


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """Run blocking work (database, hashing, signing) in a thread, never on the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(function, *args))


def _require_method(request: web.Request, method: str) -> None:
    if request.method != method:
        raise MethodNotAllowedError(f"{request.method} is not allowed here")


def _basic_password(request: web.Request) -> bytes:
    """The HTTP Basic password: everything after the first colon (RFC 7617 2).

    Raises:
        AuthenticationRequiredError: no Authorization header (a bare challenge follows).
        AuthenticationFailedError: the header is not readable HTTP Basic.
    """
    header = request.headers.get("Authorization")
    if header is None:
        raise AuthenticationRequiredError("no Authorization header; challenged")
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise AuthenticationFailedError(
            f"Authorization scheme {scheme[:20]!r} is not Basic",
            "HTTP Basic authentication is required.",
        )
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise AuthenticationFailedError(
            "Authorization credentials are not base64", "HTTP Basic authentication is required."
        ) from None
    _, colon, password = decoded.partition(b":")
    if not colon:
        raise AuthenticationFailedError(
            "Basic credentials without a colon", "HTTP Basic authentication is required."
        )
    return password


def _client_certificate(request: web.Request) -> x509.Certificate | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise ClientCertificateError(f"unreadable client certificate: {exc}") from None


async def _read_body(request: web.Request) -> bytes:
    """The body, refused past MAX_BODY_BYTES without reading the rest (chunked or not).

    Raises:
        PayloadTooLargeError, RequestTimeoutError, BadRequestError.
    """
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"Content-Length {declared} exceeds {MAX_BODY_BYTES}")

    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(16 * 1024)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise PayloadTooLargeError(f"body exceeds {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)

    try:
        return await asyncio.wait_for(read(), BODY_TIMEOUT_SECONDS)
    except TimeoutError:
        raise RequestTimeoutError("request body incomplete after the timeout") from None
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        raise BadRequestError(f"request body cut short: {exc}") from None


def _pkcs7_response(body: bytes) -> web.Response:
    response = web.Response(status=200, body=body)
    response.headers["Content-Type"] = CERTS_ONLY_MEDIA_TYPE
    response.headers["Content-Transfer-Encoding"] = "base64"
    return response


def _text_response(status: int, sentence: str) -> web.Response:
    response = web.Response(status=status, body=(sentence + "\n").encode("utf-8"))
    response.headers["Content-Type"] = "text/plain; charset=utf-8"
    return response


def _from_http_exception(error: web.HTTPException) -> EstcaError:
    mapping: dict[int, EstcaError] = {
        404: NotFoundError(f"no route for the path ({error.reason})", "Not found."),
        405: MethodNotAllowedError(f"method not allowed ({error.reason})"),
        413: PayloadTooLargeError(f"body too large ({error.reason})"),
    }
    if error.status in mapping:
        return mapping[error.status]
    generic = BadRequestError(f"HTTP error {error.status}: {error.reason}")
    generic.status = error.status if 400 <= error.status < 500 else 400
    return generic


def _peer(request: web.Request) -> str:
    return str(request.remote or "-")


def _quote(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
