"""The EST server: routes of RFC 7030 section 3.2.2 over aiohttp, and their authentication.

Errors are rendered in one place (`_render_error`); every request gets one access-log line and
every refusal one audit line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import itertools
import logging
import os
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.web_protocol import RequestHandler
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
    HttpVersionNotSupportedError,
    MethodNotAllowedError,
    NotFoundError,
    NotImplementedOperationError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from estca.est.tls import ServerIdentity, build_server_context
from estca.est.wire import MAX_BODY_BYTES, check_pkcs10_media_type, decode_csr_body
from estca.logvalues import quote, token
from estca.pki.certs import utc_now
from estca.pki.names import format_name
from estca.pki.pkcs7 import CERTS_ONLY_MEDIA_TYPE, base64_lines, certs_only_der

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("estca.access")

EST_PREFIX = "/.well-known/est/"
SERVER_HEADER = "estca"

#: Failed passphrases a peer may make in the window before its attempts are slowed.
THROTTLE_FREE_FAILURES = 5
THROTTLE_WINDOW_SECONDS = 60.0
THROTTLE_DELAY_SECONDS = 1.0
THROTTLE_MAX_PEERS = 100_000

#: Seconds a connection may take to deliver a whole request head, from its start or from the
#: end of the previous answer.
REQUEST_HEAD_TIMEOUT_SECONDS = 30.0

#: Seconds spent discarding a body left unread by a refusal, before the connection closes.
LINGER_SECONDS = 2.0

#: Seconds a client has to deliver a request body once its headers are in.
BODY_TIMEOUT_SECONDS = 30.0
REALM = "estca"
_ENROLL_OPERATIONS = ("simpleenroll", "simplereenroll")
_UNSUPPORTED_OPERATIONS = ("fullcmc", "serverkeygen")
_GET_OPERATIONS = ("cacerts", "csrattrs")
_HTTP_VERSIONS = (HttpVersion10, HttpVersion11)

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


class FailureThrottle:
    """Slows passphrase guessing from one peer once it has failed a few times recently.

    Below the threshold nothing waits. Past it, that peer's attempts run one at a time, each
    after a pause, so parallel connections do not multiply its guessing rate.
    """

    def __init__(self) -> None:
        self._failures: dict[str, list[float]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Attempts still running count as failures-to-be, so a burst of parallel guesses is
        # held to the same limit as guesses made one after another.
        self._in_flight: dict[str, int] = {}

    def _recent(self, peer: str) -> int:
        now = time.monotonic()
        times = [t for t in self._failures.get(peer, []) if now - t < THROTTLE_WINDOW_SECONDS]
        if times:
            self._failures[peer] = times
        else:
            self._failures.pop(peer, None)
            if peer not in self._in_flight:
                self._locks.pop(peer, None)
        return len(times)

    @contextlib.asynccontextmanager
    async def attempt(self, peer: str, known_good: Callable[[], bool]) -> AsyncIterator[None]:
        """Hold a passphrase check from ``peer`` until the throttle lets it run.

        ``known_good`` says whether the passphrase has meanwhile been found correct (by an
        earlier attempt of the same burst): such an attempt waits its turn but not the pause.
        """
        running = self._in_flight.get(peer, 0)
        self._in_flight[peer] = running + 1
        try:
            if self._recent(peer) + running < THROTTLE_FREE_FAILURES:
                yield
                return
            lock = self._locks.setdefault(peer, asyncio.Lock())
            async with lock:
                if not known_good():
                    await asyncio.sleep(THROTTLE_DELAY_SECONDS)
                yield
        finally:
            left = self._in_flight[peer] - 1
            if left:
                self._in_flight[peer] = left
            else:
                del self._in_flight[peer]

    def failed(self, peer: str) -> None:
        if len(self._failures) > THROTTLE_MAX_PEERS:
            # Bounded memory; a lock some attempt still holds is kept.
            self._failures.clear()
            self._locks = {p: lock for p, lock in self._locks.items() if p in self._in_flight}
        self._failures.setdefault(peer, []).append(time.monotonic())


class EstServer:
    """One server process: its TLS identity, current state, and the refresh loop."""

    def __init__(
        self, authority: Authority, identity: ServerIdentity, refresh_seconds: float
    ) -> None:
        self.authority = authority
        self.identity = identity
        self.refresh_seconds = refresh_seconds
        self.passphrases = PassphraseChecker()
        self.throttle = FailureThrottle()
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

    def http_server(self) -> EstHttpServer:
        """The aiohttp low-level server: one handler, no router, estca's own error answers."""
        return EstHttpServer(
            self._handle,
            # estca.access writes the one access line; aiohttp's own would be a second.
            access_log=None,
            # After an answer sent before the body was read, wait this long at most for the
            # client to stop sending, then close.
            lingering_time=LINGER_SECONDS,
            # EST bodies are never content-coded; a gzip body is malformed, not inflated.
            auto_decompress=False,
        )

    # Requests ------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Every request: route, answer or render the error, one access-log line."""
        started = time.perf_counter()
        protocol = request.protocol
        if isinstance(protocol, EstRequestHandler):
            protocol.request_arrived()
        request_id = f"{self._request_prefix}-{next(self._request_ids)}"
        label, operation = _route(request.raw_path)
        try:
            response = await self._dispatch(request, label, operation)
        except EstcaError as error:
            response = self._render_error(request, error, label, operation)
        except Exception:
            logger.exception("request %s failed", request_id)
            response = _text_response(500, f"Internal error (request {request_id}).")
        response.headers["Server"] = SERVER_HEADER
        if isinstance(protocol, EstRequestHandler):
            protocol.expect_request()
        access_logger.info(
            "request_id=%s peer=%s client=%s method=%s path=%s label=%s operation=%s "
            "status=%d duration_ms=%.1f",
            request_id,
            _peer(request),
            quote(request.get("client_subject", "-")),
            request.method,
            quote(request.raw_path),
            token(label),
            token(operation),
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    def _render_error(
        self, request: web.BaseRequest, error: EstcaError, label: str, operation: str
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
            logger.info("refused request to %s: %s", quote(request.raw_path), quote(error.detail))
        if isinstance(error, AuthenticationRequiredError):
            # RFC 9110 11.6.1 challenge; BouncyCastle and libest fail if it carries a body.
            response = web.Response(status=401, body=b"")
        else:
            response = _text_response(error.status, error.public_message)
        if error.status == 401:
            response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
        if isinstance(error, MethodNotAllowedError):
            response.headers["Allow"] = "GET" if operation in _GET_OPERATIONS else "POST"
        if request.body_exists and not request.content.at_eof():
            # The body was never read; reading it now only to throw it away would let a client
            # hold the connection with a Content-Length it never sends.
            response.force_close()
        return response

    async def _dispatch(
        self, request: web.BaseRequest, label: str, operation: str
    ) -> web.StreamResponse:
        if request.version not in _HTTP_VERSIONS:
            raise HttpVersionNotSupportedError(f"HTTP version {request.version} is not 1.0 or 1.1")
        if not operation:
            raise NotFoundError(f"no EST route for {request.raw_path[:200]!r}", "Not found.")
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
        self, request: web.BaseRequest, profile: EnrollmentProfile, operation: str
    ) -> web.Response:
        # Step 1: authenticate the client before anything in the body is read.
        passphrase = _basic_password(request)
        certificate = await self._authenticate_certificate(request, profile, operation)
        await self._check_passphrase(request, profile, passphrase)

        # Steps 2 to 10 run in the authority.
        check_pkcs10_media_type(request.headers.get("Content-Type"))
        csr_der = decode_csr_body(await _read_body(request))
        client = ClientIdentity(certificate=certificate, peer=_peer(request))
        issuer = self.authority.issuer
        if operation == "simpleenroll":
            issued = await issuer.enroll(profile, csr_der, client)
        else:
            issued = await issuer.reenroll(profile, csr_der, client)
        return _pkcs7_response(base64_lines(certs_only_der([issued])))

    async def _authenticate_certificate(
        self, request: web.BaseRequest, profile: EnrollmentProfile, operation: str
    ) -> x509.Certificate | None:
        certificate = _client_certificate(request)
        if certificate is not None:
            request["client_subject"] = format_name(certificate.subject)
        now = utc_now()
        if operation == "simplereenroll":
            # RFC 7030 4.2.2: the client authenticates with the certificate being renewed; the
            # authority checks it is on record and not revoked.
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
        chain = profile.bootstrap_validator.validate(certificate, now)
        # A bootstrap chain may name one of estca's own CAs; what it issued may be revoked.
        issuer = chain[1] if len(chain) > 1 else chain[0]
        issuer_id = profile.estca_bootstrap_cas.get(issuer.fingerprint(hashes.SHA256()))
        if issuer_id is not None:
            await self.authority.issuer.check_issued_and_not_revoked(
                issuer_id, format_name(issuer.subject), certificate
            )
        return certificate

    async def _check_passphrase(
        self, request: web.BaseRequest, profile: EnrollmentProfile, passphrase: bytes
    ) -> None:
        checker = self.passphrases
        if checker.is_remembered(passphrase, profile.passphrase_hash):
            return
        # Guesses are throttled per peer: past a few failures, one attempt at a time, slowly.
        peer = _peer(request)

        def known_good() -> bool:
            return checker.is_remembered(passphrase, profile.passphrase_hash)

        async with self.throttle.attempt(peer, known_good):
            if known_good() or await _off_loop(checker.check, passphrase, profile.passphrase_hash):
                return
            self.throttle.failed(peer)
        raise AuthenticationFailedError(f"wrong passphrase for label {profile.label!r}")


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """Run blocking work (database, hashing, signing) in a thread, never on the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(function, *args))


def _require_method(request: web.BaseRequest, method: str) -> None:
    if request.method != method:
        raise MethodNotAllowedError(f"{request.method} is not allowed here")


def _basic_password(request: web.BaseRequest) -> bytes:
    """The HTTP Basic password: everything after the first colon (RFC 7617 2).

    Raises:
        AuthenticationRequiredError: no Authorization header (a bare challenge follows).
        AuthenticationFailedError: the header is not readable HTTP Basic.
    """
    header = request.headers.get("Authorization")
    if header is None:
        raise AuthenticationRequiredError("no Authorization header; challenged")
    # Any white space separates scheme and credentials; nothing of the header is logged but
    # the scheme, and only when it is a plain word, since a malformed header may hold a secret.
    scheme, _, credentials = header.strip().replace("\t", " ").partition(" ")
    if scheme.lower() != "basic":
        shown = scheme if scheme.isalpha() and len(scheme) <= 20 else "(unreadable)"
        raise AuthenticationFailedError(
            f"Authorization scheme {shown} is not Basic",
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


def _client_certificate(request: web.BaseRequest) -> x509.Certificate | None:
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


async def _read_body(request: web.BaseRequest) -> bytes:
    """The body, refused past MAX_BODY_BYTES without reading the rest (chunked or not).

    Raises:
        PayloadTooLargeError, RequestTimeoutError, BadRequestError.
    """
    transfer_encoding = request.headers.get("Transfer-Encoding")
    if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
        raise NotImplementedOperationError(
            f"Transfer-Encoding {transfer_encoding[:40]!r} is not supported",
            "Transfer-Encoding other than chunked is not supported.",
        )
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


def _route(raw_path: str) -> tuple[str, str]:
    """``/.well-known/est/LABEL/OPERATION`` split into its two names; ("-", "") otherwise.

    The path is split before percent-decoding, so an encoded slash (%2F) stays inside its
    segment instead of making a new one.
    """
    path = raw_path.partition("?")[0]
    if not path.startswith(EST_PREFIX):
        return "-", ""
    label, slash, operation = path[len(EST_PREFIX) :].partition("/")
    if not label or not slash or not operation or "/" in operation:
        return "-", ""
    return urllib.parse.unquote(label), urllib.parse.unquote(operation)


class EstRequestHandler(RequestHandler):
    """aiohttp's connection handler, with estca's answer to HTTP it cannot parse.

    aiohttp answers a malformed request line, header or length itself, before any handler
    runs; its answer echoes the request and its log holds a traceback. Here the answer is one
    plain sentence and the log one line.
    """

    _request_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.expect_request()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.request_arrived()
        super().connection_lost(exc)

    def expect_request(self) -> None:
        """A whole request head must arrive within REQUEST_HEAD_TIMEOUT_SECONDS (slow-loris)."""
        self.request_arrived()
        self._request_deadline = asyncio.get_running_loop().call_later(
            REQUEST_HEAD_TIMEOUT_SECONDS, self._request_too_slow
        )

    def request_arrived(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None

    def _request_too_slow(self) -> None:
        self._request_deadline = None
        transport = self.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        logger.warning(
            "closed connection from %s: no complete request within %.0f s",
            quote(peer[0] if peer else "-"),
            REQUEST_HEAD_TIMEOUT_SECONDS,
        )
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # Not a parsing failure: a bug, reported with its traceback.
            logger.error("unhandled error from %s", _peer(request), exc_info=exc)
            sentence = "Internal error."
        else:
            reason = type(exc).__name__ if exc is not None else "malformed request"
            logger.warning(
                "refused malformed HTTP from %s: status=%d reason=%s",
                _peer(request),
                status,
                reason,
            )
            sentence = "Malformed HTTP request."
        response = _text_response(status, sentence)
        response.headers["Server"] = SERVER_HEADER
        response.force_close()
        return response


class EstHttpServer(web.Server):
    """The low-level aiohttp server, making `EstRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return EstRequestHandler(self, loop=self._loop, **self._kwargs)


def _peer(request: web.BaseRequest) -> str:
    return str(request.remote or "-")
