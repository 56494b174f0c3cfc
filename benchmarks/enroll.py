#!/usr/bin/env python3
"""Enrollment benchmark for estca: throughput, latency and server CPU against a measured ceiling.

This is a benchmark, not a test. It starts `estca serve` on loopback with a fresh data
directory (and, with ``--store postgresql``, a fresh PostgreSQL database it creates and drops),
sets up a CA, a template and EST enrollment through the real command line, makes every device
certificate and CSR up front, and drives requests from separate load processes. Each request is
a fresh TCP connection and a full TLS handshake (Python ``ssl``, no session reuse).

In the same run it measures the ceiling on this machine: full TLS handshakes against
``openssl s_server`` with the same server key and certificate and the same client certificates,
and the in-process CPU cost of one CSR verification plus one certificate signature.

Figures come from measurement only: server CPU is the utime+stime of the server process and its
worker children read from /proc before and after each scenario (psutil), and every ratio compares
figures from the same run. Results are printed and written to benchmarks/results/*.json.

    python benchmarks/enroll.py --quick
    python benchmarks/enroll.py --scenarios p256 --store sqlite,postgresql
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime
import ipaddress
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS = REPOSITORY / "benchmarks" / "results"
ESTCA = [sys.executable, "-m", "estca.cli.main"]
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
PASSPHRASE = "a long benchmark passphrase"
LABEL = "bench"
ENROLL_SCENARIOS = {"p256": "p256", "rsa2048": "rsa2048"}
ALL_SCENARIOS = ("p256", "rsa2048", "cacerts", "reenroll")
#: CLI key-type names for the two key kinds.
KEY_TYPES = {"p256": "ec-p256", "rsa2048": "rsa-2048"}
#: RSA key generation costs tens of milliseconds; RSA devices draw keys from a pool this size.
RSA_KEY_POOL = 48
MB = 1024 * 1024

Key = CertificateIssuerPrivateKeyTypes


# PKI material ----------------------------------------------------------------------------------


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_key(kind: str) -> Key:
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa2048":
        return rsa.generate_private_key(65537, 2048)
    raise ValueError(kind)


def cn(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "estca benchmark"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def certificate(
    subject: x509.Name,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None,
    *,
    ca: bool,
    server_names: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = utc_now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(server_names), False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Material:
    """One key kind's server identity, manufacturer chain, devices and CSRs, as files."""

    kind: str
    directory: Path
    server_ca: Path
    server_leaf: Path
    server_chain: Path
    server_key: Path
    bootstrap_chain: Path
    device_files: list[Path]
    csr_ders: list[bytes]
    subjects: list[str]
    csr_key_pems: list[bytes]


def make_material(kind: str, directory: Path, count: int) -> Material:
    directory.mkdir(parents=True)
    (directory / "devices").mkdir()
    server_ca_key = new_key(kind)
    server_ca = certificate(cn(f"Bench TLS CA {kind}"), server_ca_key, None, ca=True)
    server_key = new_key(kind)
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    leaf = certificate(
        cn("localhost"), server_key, (server_ca, server_ca_key), ca=False, server_names=names
    )
    paths = {
        "server-ca.pem": pem(server_ca),
        "server-leaf.pem": pem(leaf),
        "server-chain.pem": pem(leaf) + pem(server_ca),
        "server.key": key_pem(server_key),
    }
    root_key, maker_key = new_key(kind), new_key(kind)
    root = certificate(cn(f"Bench Maker Root {kind}"), root_key, None, ca=True)
    maker = certificate(cn(f"Bench Maker Devices {kind}"), maker_key, (root, root_key), ca=True)
    paths["bootstrap-chain.pem"] = pem(maker) + pem(root)
    for file_name, content in paths.items():
        (directory / file_name).write_bytes(content)

    pool = [new_key(kind) for _ in range(min(count, RSA_KEY_POOL) * 2)] if kind != "p256" else []
    device_files: list[Path] = []
    csr_ders: list[bytes] = []
    subjects: list[str] = []
    csr_key_pems: list[bytes] = []
    for index in range(count):
        device_key = pool[(2 * index) % len(pool)] if pool else new_key(kind)
        csr_key = pool[(2 * index + 1) % len(pool)] if pool else new_key(kind)
        subject = f"device-{kind}-{index:06d}"
        device = certificate(cn(subject), device_key, (maker, maker_key), ca=False)
        path = directory / "devices" / f"{index}.pem"
        path.write_bytes(pem(device) + key_pem(device_key))
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(cn(subject))
            .sign(csr_key, hashes.SHA256())
        )
        device_files.append(path)
        csr_ders.append(csr.public_bytes(serialization.Encoding.DER))
        subjects.append(subject)
        csr_key_pems.append(key_pem(csr_key))
    return Material(
        kind=kind,
        directory=directory,
        server_ca=directory / "server-ca.pem",
        server_leaf=directory / "server-leaf.pem",
        server_chain=directory / "server-chain.pem",
        server_key=directory / "server.key",
        bootstrap_chain=directory / "bootstrap-chain.pem",
        device_files=device_files,
        csr_ders=csr_ders,
        subjects=subjects,
        csr_key_pems=csr_key_pems,
    )


# Load generation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    index: int
    client_file: str | None
    body: bytes | None


@dataclass(frozen=True)
class LoadSpec:
    port: int
    #: "http": one HTTP/1.1 request per connection; "echo": a line to `openssl s_server -rev`.
    mode: str
    path: str = "/"
    method: str = "GET"
    authorization: str | None = None
    server_ca_pem: str = ""


@dataclass(frozen=True)
class Outcome:
    index: int
    status: int
    error: str
    latency: float
    end: float
    body: bytes


@dataclass
class LoadResult:
    start: float
    end: float
    outcomes: list[Outcome]
    client_cpu: float


def _client_context(spec: LoadSpec, client_file: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=spec.server_ca_pem)
    if client_file is not None:
        context.load_cert_chain(client_file)
    return context


def _request_bytes(spec: LoadSpec, body: bytes | None) -> bytes:
    lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: localhost:{spec.port}"]
    if spec.authorization:
        lines.append(f"Authorization: {spec.authorization}")
    if body is not None:
        lines += ["Content-Type: application/pkcs10", f"Content-Length: {len(body)}"]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")


def _one(spec: LoadSpec, job: Job, shared: ssl.SSLContext) -> Outcome:
    """One connection: handshake, request, full response. Context set-up is not timed."""
    context = shared if job.client_file is None else _client_context(spec, job.client_file)
    request = _request_bytes(spec, job.body) if spec.mode == "http" else b"x\n"
    started = time.monotonic()
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", spec.port), timeout=60) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(request)
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    if spec.mode == "echo" and data.endswith(b"\n"):
                        break
    except OSError as exc:
        ended = time.monotonic()
        return Outcome(
            job.index, 0, f"{type(exc).__name__}: {exc}"[:120], ended - started, ended, b""
        )
    ended = time.monotonic()
    if spec.mode == "echo":
        ok = data == b"x\n"
        return Outcome(
            job.index, 200 if ok else 0, "" if ok else "bad echo", ended - started, ended, b""
        )
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return Outcome(job.index, 0, "unreadable response", ended - started, ended, b"")
    error = "" if status == 200 else f"HTTP {status}: {body[:80]!r}"
    return Outcome(job.index, status, error, ended - started, ended, body)


def _load_process(
    spec: LoadSpec,
    jobs: list[Job],
    threads: int,
    barrier: Barrier,
    results: Any,
) -> None:
    pending = collections.deque(jobs)
    outcomes: list[Outcome] = []
    shared = _client_context(spec, None)

    def client() -> None:
        while True:
            try:
                job = pending.popleft()
            except IndexError:
                return
            outcomes.append(_one(spec, job, shared))

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    barrier.wait()
    before = os.times()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after = os.times()
    cpu = (after.user - before.user) + (after.system - before.system)
    results.put((outcomes, cpu))


def run_load(
    spec: LoadSpec,
    jobs: list[Job],
    concurrency: int,
    processes: int,
    before_start: Any = None,
) -> LoadResult:
    """Drive ``jobs`` from ``processes`` load processes with ``concurrency`` clients in all."""
    context = multiprocessing.get_context("fork")
    processes = max(1, min(processes, concurrency, len(jobs)))
    barrier = context.Barrier(processes + 1)
    results = context.Queue()
    children = []
    for number in range(processes):
        threads = concurrency // processes + (1 if number < concurrency % processes else 0)
        share = jobs[number::processes]
        child = context.Process(
            target=_load_process, args=(spec, share, threads, barrier, results), daemon=True
        )
        child.start()
        children.append(child)
    if before_start is not None:
        before_start()
    barrier.wait()
    start = time.monotonic()
    outcomes: list[Outcome] = []
    client_cpu = 0.0
    for _ in children:
        part, cpu = results.get()
        outcomes += part
        client_cpu += cpu
    for child in children:
        child.join()
    end = max((o.end for o in outcomes), default=start)
    return LoadResult(start, end, outcomes, client_cpu)


# Server processes and their accounting -----------------------------------------------------------


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> dict[int, float]:
    """utime+stime (all threads) of a process and its descendants, from /proc/PID/stat."""
    seen: dict[int, float] = {}
    for process in process_tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        seen[process.pid] = times.user + times.system
    return seen


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def worker_rss(pid: int) -> dict[int, float]:
    """RSS in MB of each worker (the children; the process itself when it has none)."""
    tree = process_tree(pid)
    workers = tree[1:] or tree
    return {p.pid: p.memory_info().rss / MB for p in workers}


class RssSampler:
    """Samples worker RSS once a second while a scenario runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                rss = worker_rss(self.pid)
            except psutil.Error:
                continue
            self.samples.append(
                {
                    "t": round(time.monotonic() - self._started, 1),
                    "rss_mb": {str(k): round(v, 1) for k, v in rss.items()},
                }
            )

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deployment:
    """estca set up through its command line, with `estca serve` running on loopback."""

    def __init__(self, work: Path, store: str, kind: str, workers: int) -> None:
        self.home = work / f"estca-{store}-{kind}"
        self.home.mkdir(parents=True)
        self.store = store
        self.kind = kind
        self.workers = workers
        self.database: str | None = None
        if store == "postgresql":
            self.database = f"estca_bench_{secrets.token_hex(6)}"
            _postgres(f'CREATE DATABASE "{self.database}"')
            url = POSTGRES_URL.format(database=self.database)
        else:
            url = f"sqlite:///{self.home / 'estca.db'}"
        self.env = {**os.environ, "ESTCA_HOME": str(self.home), "ESTCA_DATABASE_URL": url}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = self.home / "serve.log"

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [*ESTCA, *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError(f"estca {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def configure(self, material: Material) -> None:
        key_type = KEY_TYPES[self.kind]
        self.cli("init")
        self.cli(
            "ca",
            "create-root",
            "root",
            "--subject",
            "CN=Bench Root,O=estca benchmark",
            "--key-type",
            key_type,
        )
        self.cli(
            "ca",
            "create-intermediate",
            "issuing",
            "--parent",
            "root",
            "--subject",
            "CN=Bench Issuing CA,O=estca benchmark",
            "--path-length",
            "0",
            "--key-type",
            key_type,
        )
        self.cli(
            "template",
            "create",
            "devices",
            "--ca",
            "issuing",
            "--allow-subject",
            "CN=device-*",
            "--allow-subject",
            "O=*",
            "--require-subject",
            "CN",
            "--key-types",
            key_type,
            "--key-usage",
            "digitalSignature",
            "--extended-key-usage",
            "clientAuth",
            "--max-days",
            "30",
        )
        passphrase = self.home / "passphrase.txt"
        passphrase.write_text(PASSPHRASE + "\n")
        self.cli(
            "est",
            "enable",
            "devices",
            "--bootstrap-chain",
            str(material.bootstrap_chain),
            "--passphrase-file",
            str(passphrase),
            "--label",
            LABEL,
        )

    def start(self, material: Material) -> None:
        self.port = free_port()
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                *ESTCA,
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.workers),
                "--tls-cert",
                str(material.server_chain),
                "--tls-key",
                str(material.server_key),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 60
        while self.log_path.read_text("utf-8", "replace").count("serving EST") < self.workers:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"estca serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def drop(self) -> None:
        if self.database is not None:
            _postgres(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
            self.database = None

    def stored_serials(self) -> list[str]:
        return [item["serial"] for item in json.loads(self.cli("cert", "list", "--json"))]


def _postgres(statement: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(statement)


# Scenarios ---------------------------------------------------------------------------------------


@dataclass
class Options:
    enrollments: int
    concurrency: int
    workers: int
    scenarios: list[str]
    stores: list[str]
    load_processes: int
    warmup: int
    handshakes: int
    sign_iterations: int
    profile: Path | None
    quick: bool


@dataclass
class Issued:
    """What clients got back: the serial and certificate of each successful enrollment."""

    serials: list[str] = field(default_factory=list)
    certificates: dict[int, bytes] = field(default_factory=dict)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(fraction * 1000) - 1]


def summarise(
    scenario: str,
    store: str,
    options: Options,
    result: LoadResult,
    cpu: float,
    rss_before: dict[int, float],
    rss_after: dict[int, float],
) -> dict[str, Any]:
    ok = [o for o in result.outcomes if o.status == 200]
    errors = collections.Counter(o.error for o in result.outcomes if o.status != 200)
    latencies = sorted(o.latency * 1000 for o in result.outcomes)
    wall = max(result.end - result.start, 1e-9)
    count = len(result.outcomes)
    return {
        "scenario": scenario,
        "store": store,
        "workers": options.workers,
        "concurrency": options.concurrency,
        "requests": count,
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "wall_s": round(wall, 3),
        "per_second": round(len(ok) / wall, 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50), 2),
            "p95": round(percentile(latencies, 0.95), 2),
            "p99": round(percentile(latencies, 0.99), 2),
            "max": round(latencies[-1], 2) if latencies else None,
        },
        "server_cpu_s": round(cpu, 3),
        "server_cpu_ms_per_request": round(cpu / max(count, 1) * 1000, 3),
        "client_cpu_ms_per_request": round(result.client_cpu / max(count, 1) * 1000, 3),
        "rss_mb_before": {str(k): round(v, 1) for k, v in rss_before.items()},
        "rss_mb_after": {str(k): round(v, 1) for k, v in rss_after.items()},
    }


def enroll_jobs(material: Material, indices: range) -> list[Job]:
    return [
        Job(i, str(material.device_files[i]), base64.encodebytes(material.csr_ders[i]))
        for i in indices
    ]


def reenroll_jobs(material: Material, issued: Issued, indices: range, work: Path) -> list[Job]:
    """Each device re-enrolls with the certificate estca issued it and the CSR's key."""
    directory = work / f"reenroll-{material.kind}"
    directory.mkdir(exist_ok=True)
    jobs = []
    for i in indices:
        if i not in issued.certificates:
            continue
        path = directory / f"{i}.pem"
        path.write_bytes(issued.certificates[i] + material.csr_key_pems[i])
        jobs.append(Job(i, str(path), base64.encodebytes(material.csr_ders[i])))
    return jobs


def collect(result: LoadResult, issued: Issued) -> None:
    for outcome in result.outcomes:
        if outcome.status != 200:
            continue
        (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(outcome.body))
        issued.serials.append(format(cert.serial_number, "x"))
        issued.certificates[outcome.index] = pem(cert)


def http_spec(deployment: Deployment, material: Material, operation: str) -> LoadSpec:
    authorization = "Basic " + base64.b64encode(f"device:{PASSPHRASE}".encode()).decode()
    enroll = operation != "cacerts"
    return LoadSpec(
        port=deployment.port,
        mode="http",
        path=f"/.well-known/est/{LABEL}/{operation}",
        method="POST" if enroll else "GET",
        authorization=authorization if enroll else None,
        server_ca_pem=material.server_ca.read_text(),
    )


def measured(
    scenario: str,
    deployment: Deployment,
    spec: LoadSpec,
    jobs: list[Job],
    options: Options,
    profile: Path | None = None,
) -> tuple[dict[str, Any], LoadResult]:
    """Run one scenario with the server's CPU and memory read before and after."""
    pid = deployment.pid
    rss_before = worker_rss(pid)
    snapshot: dict[str, dict[int, float]] = {}
    profiler: subprocess.Popen[bytes] | None = None

    def before_start() -> None:
        nonlocal profiler
        if profile is not None:
            profiler = start_profiler(pid, profile)
        snapshot["cpu"] = cpu_seconds(pid)

    with RssSampler(pid) as sampler:
        result = run_load(spec, jobs, options.concurrency, options.load_processes, before_start)
        cpu = cpu_delta(snapshot["cpu"], cpu_seconds(pid))
    if profiler is not None:
        stop_profiler(profiler)
    summary = summarise(
        scenario, deployment.store, options, result, cpu, rss_before, worker_rss(pid)
    )
    summary["rss_samples"] = sampler.samples
    summary["profiled"] = profile is not None
    return summary, result


def warm_up(
    deployment: Deployment, material: Material, options: Options, issued: Issued, first: int
) -> None:
    """Unmeasured enrollments so that every worker has paid its one-time costs."""
    jobs = enroll_jobs(material, range(first, first + options.warmup))
    result = run_load(
        http_spec(deployment, material, "simpleenroll"),
        jobs,
        options.concurrency,
        options.load_processes,
    )
    collect(result, issued)
    failed = [o.error for o in result.outcomes if o.status != 200]
    if failed:
        raise RuntimeError(f"warm-up enrollments failed: {failed[:3]}")


def run_deployment(
    store: str, kind: str, scenarios: list[str], options: Options, work: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], Material]:
    """One fresh estca for one key kind; the scenarios that use it; the store check."""
    count = options.enrollments + options.warmup
    print(f"[{store}/{kind}] making {count} device certificates and CSRs", flush=True)
    material = make_material(kind, work / f"material-{store}-{kind}", count)
    deployment = Deployment(work, store, kind, options.workers)
    summaries: list[dict[str, Any]] = []
    issued = Issued()
    measured_range = range(options.enrollments)
    warm_range_start = options.enrollments
    try:
        deployment.configure(material)
        deployment.start(material)
        print(
            f"[{store}/{kind}] estca serve pid {deployment.pid}, port {deployment.port}, "
            f"{options.workers} worker(s)",
            flush=True,
        )
        warm_up(deployment, material, options, issued, warm_range_start)
        enroll_name = next((s for s in scenarios if ENROLL_SCENARIOS.get(s) == kind), None)
        needs_enroll = enroll_name is not None or "reenroll" in scenarios
        if needs_enroll:
            name = enroll_name or f"{kind}-setup"
            summary, result = measured(
                name,
                deployment,
                http_spec(deployment, material, "simpleenroll"),
                enroll_jobs(material, measured_range),
                options,
                options.profile,
            )
            collect(result, issued)
            if enroll_name is not None:
                summaries.append(summary)
                report_line(summary)
        if "cacerts" in scenarios:
            jobs = [Job(i, None, None) for i in measured_range]
            summary, _ = measured(
                "cacerts", deployment, http_spec(deployment, material, "cacerts"), jobs, options
            )
            summaries.append(summary)
            report_line(summary)
        if "reenroll" in scenarios:
            spec = http_spec(deployment, material, "simplereenroll")
            warm = reenroll_jobs(material, issued, range(warm_range_start, count), work)
            collect(run_load(spec, warm, options.concurrency, options.load_processes), issued)
            jobs = reenroll_jobs(material, issued, measured_range, work)
            summary, result = measured("reenroll", deployment, spec, jobs, options)
            collect(result, issued)
            summaries.append(summary)
            report_line(summary)
        check = store_check(deployment, issued)
        print(f"[{store}/{kind}] store check: {check['verdict']}", flush=True)
    finally:
        deployment.stop()
        deployment.drop()
    return summaries, check, material


def store_check(deployment: Deployment, issued: Issued) -> dict[str, Any]:
    """Every certificate a client received is in the store exactly once."""
    stored = collections.Counter(deployment.stored_serials())
    returned = collections.Counter(issued.serials)
    missing = [s for s in returned if stored[s] == 0]
    repeated_in_store = [s for s in returned if stored[s] > 1]
    returned_twice = [s for s, n in returned.items() if n > 1]
    not_returned = sum(1 for s in stored if s not in returned)
    good = not (missing or repeated_in_store or returned_twice)
    return {
        "returned_to_clients": sum(returned.values()),
        "rows_in_store": sum(stored.values()),
        "missing_from_store": missing[:10],
        "more_than_once_in_store": repeated_in_store[:10],
        "returned_twice": returned_twice[:10],
        "stored_but_not_returned": not_returned,
        "verdict": (
            f"{'OK' if good else 'FAILED'}: {sum(returned.values())} returned, "
            f"{len(missing)} missing, {len(repeated_in_store)} stored more than once, "
            f"{len(returned_twice)} returned twice, {not_returned} stored but not returned"
        ),
        "ok": good,
    }


# Ceiling -----------------------------------------------------------------------------------------


def measure_s_server(
    material: Material, client_certificates: bool, options: Options, work: Path
) -> dict[str, Any]:
    """Full handshakes against `openssl s_server` with the same server key and certificate."""
    port = free_port()
    command = [
        "openssl",
        "s_server",
        "-accept",
        f"127.0.0.1:{port}",
        "-cert",
        str(material.server_leaf),
        "-cert_chain",
        str(material.server_ca),
        "-key",
        str(material.server_key),
        "-rev",
        "-quiet",
        "-no_ticket",
        "-num_tickets",
        "0",
        "-CAfile",
        str(material.bootstrap_chain),
        "-partial_chain",
    ]
    command += ["-Verify", "2", "-verify_return_error"] if client_certificates else ["-verify", "1"]
    server = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=(work / f"s_server-{port}.log").open("wb")
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("openssl s_server did not start") from None
                time.sleep(0.05)
        time.sleep(0.2)
        count = min(options.handshakes, len(material.device_files))
        jobs = [
            Job(i, str(material.device_files[i]) if client_certificates else None, None)
            for i in range(count)
        ]
        spec = LoadSpec(port=port, mode="echo", server_ca_pem=material.server_ca.read_text())
        snapshot: dict[str, dict[int, float]] = {}
        result = run_load(
            spec,
            jobs,
            options.concurrency,
            options.load_processes,
            lambda: snapshot.update(cpu=cpu_seconds(server.pid)),
        )
        cpu = cpu_delta(snapshot["cpu"], cpu_seconds(server.pid))
    finally:
        server.terminate()
        server.wait()
    errors = sum(1 for o in result.outcomes if o.status != 200)
    wall = max(result.end - result.start, 1e-9)
    return {
        "handshakes": len(result.outcomes),
        "errors": errors,
        "per_second": round((len(result.outcomes) - errors) / wall, 1),
        "server_cpu_ms_per_handshake": round(cpu / max(len(result.outcomes), 1) * 1000, 4),
        "client_certificates": client_certificates,
    }


def measure_verify_sign(material: Material, iterations: int) -> dict[str, Any]:
    """In-process CPU of parsing and verifying one CSR and signing one certificate."""
    issuer_key = new_key(material.kind)
    issuer = certificate(cn("Bench Ceiling CA"), issuer_key, None, ca=True)
    ders = material.csr_ders
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    issuer_public = issuer_key.public_key()

    def once(der: bytes) -> None:
        csr = x509.load_der_x509_csr(der)
        if not csr.is_signature_valid:
            raise RuntimeError("CSR signature does not verify")
        now = utc_now()
        public = csr.public_key()
        (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(issuer.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
            )
            .add_extension(usage, critical=True)
            .add_extension(eku, critical=False)
            .sign(issuer_key, hashes.SHA256())
        )

    for der in ders[:20]:
        once(der)
    verify_only = time.process_time()
    for i in range(iterations):
        csr = x509.load_der_x509_csr(ders[i % len(ders)])
        if not csr.is_signature_valid:
            raise RuntimeError("CSR signature does not verify")
    started = time.process_time()
    for i in range(iterations):
        once(ders[i % len(ders)])
    ended = time.process_time()
    return {
        "iterations": iterations,
        "verify_ms": round((started - verify_only) / iterations * 1000, 4),
        "verify_and_sign_ms": round((ended - started) / iterations * 1000, 4),
    }


# Profiling ---------------------------------------------------------------------------------------


def start_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy on the server and its workers, raw collapsed stacks (one line per stack)."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy (pip install py-spy)")
    output.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--native",
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(output.with_suffix(".log")).open("wb"),
    )
    time.sleep(2.0)
    return process


def stop_profiler(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(2)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


#: Frames that mean a thread is waiting, not using CPU (py-spy --native keeps such samples).
IDLE_FRAMES = (
    "PyThread_acquire_lock_timed",
    "take_gil",
    "epoll_pwait",
    "epoll_wait",
    "clock_nanosleep",
    "pthread_cond_wait",
    "pthread_cond_timedwait",
    "sem_wait",
    "sem_timedwait",
    "poll (libc",
    "select (libc",
)
#: Where server CPU goes, by the first matching frame text (most specific first).
CATEGORIES = (
    ("passphrase check", ("_check_passphrase", "passphrase.py")),
    ("CSR parse + verify", ("load_certificate_request",)),
    ("certificate signing", ("build_end_entity_certificate",)),
    ("DB wait (fsync)", ("fdatasync", "fsync (libc")),
    ("DB (SQLAlchemy, driver)", ("sqlalchemy/", "sqlite3", "psycopg", "store/database.py")),
    ("client cert validation (Python, after handshake)", ("_authenticate_certificate",)),
    ("issuance pipeline, other", ("authority/issuance.py", "authority/policy.py")),
    ("logging (access, audit)", ("logging/__init__.py", "audit.py")),
    ("TLS handshake", ("do_handshake", "SSL_do_handshake")),
    (
        "TLS record I/O + shutdown",
        (
            "SSLObject.read",
            "SSLObject.write",
            "SSLSocket_read",
            "SSLSocket_write",
            "unwrap",
            "SSLSocket_shutdown",
        ),
    ),
    (
        "socket read/write syscalls (loopback TCP)",
        ("UVStream__try_write", "uv__read", "uv__stream_close", "uv__io_uring"),
    ),
    (
        "thread hops (executor, futures)",
        ("concurrent/futures", "run_in_executor", "call_soon_threadsafe", "_queue_SimpleQueue"),
    ),
    ("aiohttp (HTTP parse, routing, response)", ("aiohttp/",)),
    ("estca EST handler, other", ("estca/est/",)),
    ("garbage collector", ("gc_collect",)),
    ("event loop, sockets, other", ("",)),
)


def profile_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """Busy samples of the server by category, and the busiest frames, from py-spy raw output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in path.read_text("utf-8", "replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if any(marker in frame for frame in frames[-4:] for marker in IDLE_FRAMES):
            idle += count
            continue
        busy += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
        text = ";".join(frames)
        for category, markers in CATEGORIES:
            if any(marker in text for marker in markers):
                categories[category] += count
                break

    def share(counter: collections.Counter[str], limit: int | None) -> list[tuple[str, float]]:
        return [(k, round(v / max(busy, 1) * 100, 1)) for k, v in counter.most_common(limit)]

    return {
        "busy_samples": busy,
        "idle_samples": idle,
        "categories_pct": share(categories, None),
        "inclusive_pct": share(inclusive, top),
        "self_pct": share(own, top),
    }


# Report ----------------------------------------------------------------------------------------


def report_line(summary: dict[str, Any]) -> None:
    latency = summary["latency_ms"]
    rss = "/".join(f"{v:.0f}" for v in summary["rss_mb_after"].values())
    print(
        f"  {summary['scenario']:<9} {summary['store']:<10} {summary['requests']:>6} req "
        f"{summary['per_second']:>8.1f}/s  p50 {latency['p50']:>6.1f}  p95 {latency['p95']:>6.1f}"
        f"  p99 {latency['p99']:>6.1f} ms  errors {summary['errors']:>3}  server CPU "
        f"{summary['server_cpu_ms_per_request']:.3f} ms/req  RSS {rss} MB",
        flush=True,
    )


def machine() -> dict[str, Any]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout
    commit = subprocess.run(
        ["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    import cryptography

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_mb": round(psutil.virtual_memory().total / MB),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_ssl": ssl.OPENSSL_VERSION,
        "openssl_cli": openssl.strip(),
        "cryptography": cryptography.__version__,
        "estca_commit": commit,
    }


def targets(
    scenarios: list[dict[str, Any]], ceilings: dict[str, Any], options: Options
) -> list[dict[str, Any]]:
    """The issue's targets, judged from this run's figures only."""
    verdicts: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, figure: str) -> None:
        state = "n/a" if ok is None else ("met" if ok else "NOT MET")
        verdicts.append({"target": name, "state": state, "figure": figure})

    for s in scenarios:
        if s["scenario"] == "p256":
            cpu = s["server_cpu_ms_per_request"]
            add(f"P-256 server CPU <= 1.6 ms ({s['store']})", cpu <= 1.6, f"{cpu:.3f} ms")
            ratio = s.get("ceiling_ratio")
            if ratio is not None:
                add(f"P-256 CPU <= 2x ceiling ({s['store']})", ratio <= 2.0, f"{ratio:.2f}x")
            p99 = s["latency_ms"]["p99"]
            at16 = options.concurrency == 16
            add(
                f"p99 < 30 ms at 16 clients, no errors ({s['store']})",
                (p99 < 30 and s["errors"] == 0) if at16 else None,
                f"p99 {p99:.1f} ms, {s['errors']} errors, {options.concurrency} clients",
            )
        if s["scenario"] == "cacerts" and "handshake_ratio" in s:
            ratio = s["handshake_ratio"]
            add(f"cacerts CPU <= 1.3x bare handshake ({s['store']})", ratio <= 1.3, f"{ratio:.2f}x")
        if s["scenario"] in ENROLL_SCENARIOS or s["scenario"] == "reenroll":
            worst = max(s["rss_mb_after"].values())
            enough = s["requests"] >= 20000
            add(
                f"RSS < 150 MB per worker after 20,000 ({s['scenario']}, {s['store']})",
                worst < 150 if enough else None,
                f"max {worst:.0f} MB after {s['requests']} (+ earlier) requests",
            )
    sqlite = [s for s in scenarios if s["scenario"] == "p256" and s["store"] == "sqlite"]
    postgres = [s for s in scenarios if s["scenario"] == "p256" and s["store"] == "postgresql"]
    if sqlite and postgres:
        a, b = sqlite[0], postgres[0]
        cpu = b["server_cpu_ms_per_request"] / a["server_cpu_ms_per_request"]
        rate = b["per_second"] / a["per_second"]
        add(
            "PostgreSQL within 20% of SQLite (P-256)",
            abs(cpu - 1) <= 0.2 and rate >= 0.8,
            f"CPU {cpu:.2f}x, throughput {rate:.2f}x of SQLite",
        )
    return verdicts


def parse_arguments(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--enrollments", type=int, default=2000, help="requests per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients, total")
    parser.add_argument("--workers", type=int, default=2, help="estca serve --workers")
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated, of {', '.join(ALL_SCENARIOS)}",
    )
    parser.add_argument(
        "--store", default="sqlite", help="sqlite, postgresql, or both comma-separated"
    )
    parser.add_argument("--load-processes", type=int, default=4)
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="unmeasured enrollments first (default 10 per worker)",
    )
    parser.add_argument(
        "--handshakes",
        type=int,
        default=None,
        help="handshakes against openssl s_server (default min(N, 2000))",
    )
    parser.add_argument("--sign-iterations", type=int, default=None)
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy raw profile of the server during the first enrollment "
        "scenario (its figures are then not comparable)",
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run (N=200)")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    stores = [s.strip() for s in args.store.split(",") if s.strip()]
    for s in scenarios:
        if s not in ALL_SCENARIOS:
            parser.error(f"unknown scenario {s!r}")
    for s in stores:
        if s not in ("sqlite", "postgresql"):
            parser.error(f"unknown store {s!r}")
    enrollments = 200 if args.quick else args.enrollments
    return Options(
        enrollments=enrollments,
        concurrency=args.concurrency,
        workers=args.workers,
        scenarios=scenarios,
        stores=stores,
        load_processes=args.load_processes,
        warmup=args.warmup if args.warmup is not None else 10 * max(1, args.workers),
        handshakes=args.handshakes or min(enrollments, 2000),
        sign_iterations=args.sign_iterations or min(enrollments, 1000),
        profile=args.profile,
        quick=args.quick,
    )


def kinds_for(scenarios: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Which deployments (key kinds) the scenarios need, and the scenarios each one runs."""
    p256 = [s for s in scenarios if s in ("p256", "cacerts", "reenroll")]
    if p256:
        yield "p256", p256
    if "rsa2048" in scenarios:
        yield "rsa2048", ["rsa2048"]


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_arguments(argv)
    info = machine()
    print(
        f"machine: {info['nproc']} CPUs, {info['cpu_model']}, Python {info['python']}, "
        f"{info['python_ssl']}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="estca-bench-"))
    scenarios: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    ceilings: dict[str, Any] = {}
    materials: dict[str, Material] = {}
    try:
        for store in options.stores:
            for kind, names in kinds_for(options.scenarios):
                summaries, check, material = run_deployment(store, kind, names, options, work)
                scenarios += summaries
                checks[f"{store}/{kind}"] = check
                materials.setdefault(kind, material)
                options.profile = None  # profile the first enrollment scenario only
        print("ceiling (same machine, same run):", flush=True)
        for kind, material in materials.items():
            with_cert = measure_s_server(material, True, options, work)
            sign = measure_verify_sign(material, options.sign_iterations)
            entry: dict[str, Any] = {"handshake_client_cert": with_cert, "verify_sign": sign}
            if kind == "p256" and "cacerts" in options.scenarios:
                entry["handshake_no_client_cert"] = measure_s_server(material, False, options, work)
            entry["ceiling_ms"] = round(
                with_cert["server_cpu_ms_per_handshake"] + sign["verify_and_sign_ms"], 4
            )
            ceilings[kind] = entry
            bare = entry.get("handshake_no_client_cert", {}).get("server_cpu_ms_per_handshake")
            print(
                f"  {kind}: s_server handshake with client cert "
                f"{with_cert['server_cpu_ms_per_handshake']:.3f} ms "
                f"({with_cert['errors']} errors), CSR verify + sign "
                f"{sign['verify_and_sign_ms']:.3f} ms (verify alone {sign['verify_ms']:.3f}), "
                f"ceiling {entry['ceiling_ms']:.3f} ms"
                + (f"; handshake without client cert {bare:.3f} ms" if bare else ""),
                flush=True,
            )
        for s in scenarios:
            kind = "rsa2048" if s["scenario"] == "rsa2048" else "p256"
            entry = ceilings[kind]
            if s["scenario"] == "cacerts":
                bare = entry["handshake_no_client_cert"]["server_cpu_ms_per_handshake"]
                s["handshake_ratio"] = round(s["server_cpu_ms_per_request"] / bare, 3)
            else:
                s["ceiling_ms"] = entry["ceiling_ms"]
                s["ceiling_ratio"] = round(s["server_cpu_ms_per_request"] / entry["ceiling_ms"], 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nresults:")
    print(
        f"  {'scenario':<9} {'store':<10} {'req/s':>8} {'p50':>6} {'p95':>6} {'p99':>6} "
        f"{'err':>4} {'CPU ms':>7} {'x ceil':>7}  RSS MB before -> after"
    )
    for s in scenarios:
        ratio = s.get("ceiling_ratio", s.get("handshake_ratio"))
        latency = s["latency_ms"]
        before = "/".join(f"{v:.0f}" for v in s["rss_mb_before"].values())
        after = "/".join(f"{v:.0f}" for v in s["rss_mb_after"].values())
        print(
            f"  {s['scenario']:<9} {s['store']:<10} {s['per_second']:>8.1f} "
            f"{latency['p50']:>6.1f} {latency['p95']:>6.1f} {latency['p99']:>6.1f} "
            f"{s['errors']:>4} {s['server_cpu_ms_per_request']:>7.3f} "
            f"{ratio if ratio is not None else float('nan'):>6.2f}x  {before} -> {after}"
        )
    verdicts = targets(scenarios, ceilings, options)
    print("\ntargets:")
    for v in verdicts:
        print(f"  [{v['state']:>7}] {v['target']}: {v['figure']}")
    print("\nstore checks:")
    for key, check in checks.items():
        print(f"  {key}: {check['verdict']}")
    profile_data = None
    if argv_profile := parse_arguments(argv).profile:
        if argv_profile.exists():
            profile_data = profile_summary(argv_profile)
            print(
                f"\nprofile ({profile_data['busy_samples']} busy samples, "
                f"{profile_data['idle_samples']} idle left out, {argv_profile}):"
            )
            print("  busy samples by category, %:")
            for frame, pct in profile_data["categories_pct"]:
                print(f"    {pct:5.1f}  {frame}")
            print("  inclusive %:")
            for frame, pct in profile_data["inclusive_pct"]:
                print(f"    {pct:5.1f}  {frame}")
            print("  self %:")
            for frame, pct in profile_data["self_pct"]:
                print(f"    {pct:5.1f}  {frame}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = RESULTS / f"enroll-{stamp}.json"
    output.write_text(
        json.dumps(
            {
                "command": " ".join(
                    [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
                ),
                "machine": info,
                "options": {
                    k: str(v) if isinstance(v, Path) else v for k, v in vars(options).items()
                },
                "scenarios": scenarios,
                "ceilings": ceilings,
                "store_checks": checks,
                "targets": verdicts,
                "profile": profile_data,
            },
            indent=2,
        )
    )
    print(f"\nwrote {output.relative_to(REPOSITORY)}")
    failed = any(not c["ok"] for c in checks.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
