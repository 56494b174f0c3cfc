"""Starting the EST server: TLS identity, listening socket(s), worker processes, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import logging.handlers
import os
import queue
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from aiohttp import web

from estca.config import Settings
from estca.errors import ConfigurationError
from estca.est.server import EstServer
from estca.est.tls import ServerIdentity
from estca.logvalues import quote
from estca.runtime import open_authority

logger = logging.getLogger(__name__)

#: Log lines are buffered up to this size between writes.
LOG_BUFFER_BYTES = 64 * 1024

#: A worker that exits is replaced, but no sooner than this after it was started.
WORKER_RESTART_SECONDS = 1.0


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    hostnames: tuple[str, ...]
    tls_certificate: Path | None
    tls_key: Path | None
    workers: int


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``.

    Raises:
        ConfigurationError: not of that form.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"--listen {listen!r} must be HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104


def server_names(options: ServeOptions) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses for the server's own TLS certificate."""
    dns = ["localhost", socket.gethostname(), *options.hostnames]
    addresses = ["127.0.0.1", "::1"]
    for name in list(dns):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            continue
        dns.remove(name)
        addresses.append(name)
    with contextlib.suppress(ValueError):
        if not ipaddress.ip_address(options.host).is_unspecified:
            addresses.append(options.host)
    return dns, addresses


def serve(settings: Settings, options: ServeOptions) -> None:
    """Run the server until SIGINT or SIGTERM, in ``options.workers`` processes.

    Raises:
        ConfigurationError: the TLS files cannot be used, or the address cannot be listened on.
    """
    if options.tls_certificate and options.tls_key:
        check_tls_files(options.tls_certificate, options.tls_key)
    authority = open_authority(settings)
    authority.hierarchy.ensure_server_ca()
    if options.tls_certificate and options.tls_key:
        identity = ServerIdentity.from_files(options.tls_certificate, options.tls_key)
    else:
        dns, addresses = server_names(options)
        certificate, key, server_ca = authority.hierarchy.issue_server_certificate(dns, addresses)
        identity = ServerIdentity.from_issued(certificate, key, [server_ca])
    authority.database.dispose()
    workers = max(1, options.workers)
    try:
        check_address_free(options.host, options.port)
        if workers == 1:
            _run_worker(settings, options, identity, reuse_port=False)
        else:
            WorkerSupervisor(settings, options, identity, workers).run()
    finally:
        identity.remove()


def check_tls_files(certificate: Path, key: Path) -> None:
    """Load the operator's certificate and key as the workers will, before any worker starts.

    Raises:
        ConfigurationError: they are not PEM, the key is encrypted, or it is not the
            certificate's key.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An empty password: OpenSSL would otherwise ask for one on the terminal.
        context.load_cert_chain(certificate, key, password=lambda: b"")
    except ssl.SSLError as error:  # before OSError, of which it is one
        if error.reason == "KEY_VALUES_MISMATCH":
            reason = "the key is not the certificate's key"
        else:
            reason = f"not a PEM certificate and an unencrypted PEM private key ({error})"
    except OSError as error:
        reason = error.strerror or str(error)
    else:
        return
    raise ConfigurationError(
        f"--tls-cert {certificate} with --tls-key {key} cannot be used: {reason}"
    )


def check_address_free(host: str, port: int) -> None:
    """Bind every address of ``host:port`` once, without SO_REUSEPORT, and let it go again.

    Workers share their port with SO_REUSEPORT, which would as gladly share it with another
    estca already there and split its devices between two CAs; a plain bind refuses that. The
    address stays free only until the workers bind it: a process that binds it in between with
    SO_REUSEPORT of its own still shares it.

    Raises:
        ConfigurationError: the host does not resolve, or an address cannot be bound.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {error.strerror or error}"
        ) from None
    except UnicodeError:
        # Python's IDNA encoding refuses the name before the resolver sees it.
        raise ConfigurationError(f"cannot listen on {host}:{port}: not a valid host name") from None
    for family, kind, protocol, _, address in addresses:
        with socket.socket(family, kind, protocol) as probe:
            # As asyncio binds: connections of an earlier server in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    reason = "the address is already in use (by another estca or another program)"
                else:
                    reason = error.strerror or str(error)
                raise ConfigurationError(f"cannot listen on {host}:{port}: {reason}") from None


class WorkerSupervisor:
    """Keeps ``workers`` worker processes running until SIGTERM or SIGINT, then stops them."""

    def __init__(
        self, settings: Settings, options: ServeOptions, identity: ServerIdentity, workers: int
    ) -> None:
        self.settings = settings
        self.options = options
        self.identity = identity
        self.workers = workers
        self.children: dict[int, float] = {}
        self.stopping = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for _ in range(self.workers):
            self._start_worker()
        while self.children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return
            started = self.children.pop(pid, None)
            if started is None or self.stopping:
                continue
            logger.warning(
                "worker %d %s; starting a replacement", pid, describe_wait_status(status)
            )
            # A worker that dies as it starts (the database is down, say) is replaced at most
            # once a second rather than in a busy loop.
            time.sleep(max(0.0, started + WORKER_RESTART_SECONDS - time.monotonic()))
            if not self.stopping:
                self._start_worker()

    def _stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    def _start_worker(self) -> None:
        # Blocked across the fork: the parent's handler must never run in a child, and a
        # signal that arrives as the child is made must still reach it.
        stop_signals = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            if self.stopping:
                return
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                self._be_worker()
            self.children[pid] = time.monotonic()
            # A signal that came before the mask was set may have had its handler run after
            # the check above, without knowing this child.
            if self.stopping:
                os.kill(pid, signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    def _be_worker(self) -> NoReturn:
        code = 0
        try:
            _run_worker(self.settings, self.options, self.identity, reuse_port=True)
        # A worker must never return into the parent's code, whatever it raised.
        except BaseException:  # noqa: BLE001
            logger.exception("worker failed")
            code = 1
        finally:
            os._exit(code)


def describe_wait_status(status: int) -> str:
    """``os.wait``'s status in words: the exit status, or the signal that killed the process."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by signal {-code} ({signal.Signals(-code).name})"
    return f"exited with status {code}"


def _run_worker(
    settings: Settings, options: ServeOptions, identity: ServerIdentity, reuse_port: bool
) -> None:
    coroutine = _serve_async(settings, options, identity, reuse_port)
    with _logging_off_the_event_loop():
        try:
            import uvloop
        except ImportError:
            asyncio.run(coroutine)
        else:
            uvloop.run(coroutine)


class _UnformattedQueueHandler(logging.handlers.QueueHandler):
    """Queues records as they are; the writer's thread formats them (estca's log arguments are
    strings and numbers, never objects that change after the call)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class LogWriter:
    """Formats and writes log lines in a thread of its own; the event loop only queues records.

    Lines that queued up together are written with one system call, not one each.
    """

    def __init__(self, formatter: logging.Formatter | None) -> None:
        self._formatter = formatter or logging.Formatter()
        self._records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self._stream = open(  # closed by stop()
            os.dup(sys.stderr.fileno()),
            "w",
            buffering=LOG_BUFFER_BYTES,
            encoding="utf-8",
            errors="backslashreplace",
        )
        self._thread = threading.Thread(target=self._run, name="estca-log", daemon=True)

    def start(self) -> logging.Handler:
        self._thread.start()
        return _UnformattedQueueHandler(self._records)

    def stop(self) -> None:
        self._records.put(None)
        self._thread.join()
        self._stream.close()

    def _run(self) -> None:
        while True:
            record = self._records.get()
            batch = [record]
            while record is not None and not self._records.empty():
                record = self._records.get_nowait()
                batch.append(record)
            for item in batch:
                if item is not None:
                    self._stream.write(self._formatter.format(item) + "\n")
            self._stream.flush()
            if batch[-1] is None:
                return


class _HandshakeFailureFilter(logging.Filter):
    """One line, not a traceback, for a TLS handshake that fails inside Python's ssl module.

    asyncio reports such a failure (a client certificate whose names Python cannot decode) with
    the exception's traceback; it is the client's fault, so a warning line says it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "handshake" in str(record.msg).lower():
            error = record.exc_info[1]
            record.msg = "TLS handshake failed: %s"
            record.args = (quote(f"{type(error).__name__}: {error}"),)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.WARNING
            record.levelname = "WARNING"
        return True


@contextlib.contextmanager
def _logging_off_the_event_loop() -> Iterator[None]:
    """Send the root logger's records to a `LogWriter` thread, and give them back after.

    Given back so that what goes wrong after the event loop ends (a worker's last traceback)
    is still written.
    """
    root = logging.getLogger()
    handlers = list(root.handlers)
    if not handlers:
        yield
        return
    # Process and thread names are not in estca's log format; not looking them up per record
    # saves a system call each.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.getLogger("asyncio").addFilter(_HandshakeFailureFilter())
    writer = LogWriter(handlers[0].formatter)
    for handler in handlers:
        root.removeHandler(handler)
    queue_handler = writer.start()
    root.addHandler(queue_handler)
    try:
        yield
    finally:
        root.removeHandler(queue_handler)
        writer.stop()
        for handler in handlers:
            root.addHandler(handler)


async def _serve_async(
    settings: Settings, options: ServeOptions, identity: ServerIdentity, reuse_port: bool
) -> None:
    authority = open_authority(settings)
    server = EstServer(authority, identity, settings.refresh_seconds)
    runner = web.ServerRunner(server.http_server(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner,
        options.host,
        options.port,
        ssl_context=server.ssl_context,
        reuse_port=reuse_port,
        backlog=1024,
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    refresher = asyncio.create_task(server.refresh_forever())
    labels = ", ".join(sorted(server.state.profiles)) or "none"
    # One write per line: print() writes the text and its newline apart, and the workers'
    # lines then interleave.
    sys.stderr.write(
        f"estca: serving EST on https://{options.host}:{options.port} "
        f"(pid {os.getpid()}, labels: {labels})\n"
    )
    sys.stderr.flush()
    await stop.wait()
    refresher.cancel()
    await runner.cleanup()
    authority.issuer.recorder.close()
    authority.database.dispose()
