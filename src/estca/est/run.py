"""Starting the EST server: TLS identity, listening socket(s), worker processes, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import logging.handlers
import os
import queue
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from estca.config import Settings
from estca.errors import ConfigurationError
from estca.est.server import EstServer
from estca.est.tls import ServerIdentity
from estca.runtime import open_authority

logger = logging.getLogger(__name__)

#: Log lines are buffered up to this size between writes.
LOG_BUFFER_BYTES = 64 * 1024


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
    """Run the server until SIGINT or SIGTERM, in ``options.workers`` processes."""
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
        if workers == 1:
            _run_worker(settings, options, identity, reuse_port=False)
        else:
            _run_workers(settings, options, identity, workers)
    finally:
        identity.remove()


def _run_workers(
    settings: Settings, options: ServeOptions, identity: ServerIdentity, workers: int
) -> None:
    children: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _run_worker(settings, options, identity, reuse_port=True)
            # A worker must never return into the parent's code, whatever it raised.
            except BaseException:  # noqa: BLE001
                logger.exception("worker failed")
                code = 1
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        while True:
            try:
                os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


def _run_worker(
    settings: Settings, options: ServeOptions, identity: ServerIdentity, reuse_port: bool
) -> None:
    listener = _log_off_the_event_loop()
    coroutine = _serve_async(settings, options, identity, reuse_port)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(coroutine)
        else:
            uvloop.run(coroutine)
    finally:
        if listener is not None:
            listener.stop()


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


def _log_off_the_event_loop() -> LogWriter | None:
    """Send the root logger's records to a `LogWriter` thread."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    if not handlers:
        return None
    # Process and thread names are not in estca's log format; not looking them up per record
    # saves a system call each.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    writer = LogWriter(handlers[0].formatter)
    for handler in handlers:
        root.removeHandler(handler)
    root.addHandler(writer.start())
    return writer


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
    print(
        f"estca: serving EST on https://{options.host}:{options.port} "
        f"(pid {os.getpid()}, labels: {labels})",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    refresher.cancel()
    await runner.cleanup()
    authority.issuer.recorder.close()
    authority.database.dispose()
