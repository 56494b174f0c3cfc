"""`estca serve` as a real process: what it refuses to start on, its workers, and its log."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    ESTCA,
    EstcaInstallation,
    EstServer,
    free_port,
    make_certificate,
    name,
    new_key,
)

LABEL = "serve"


@pytest.fixture(scope="module")
def labelled(
    installation: EstcaInstallation, tmp_path_factory: pytest.TempPathFactory
) -> EstcaInstallation:
    """The installation with EST enabled under `LABEL`, so that cacerts answers 200."""
    work = tmp_path_factory.mktemp("serve")
    installation.run("ca", "create-root", "serve-root", "--subject", "CN=Serve Root,O=Ex")
    installation.run("template", "create", "serve-devices", "--ca", "serve-root")
    maker = make_certificate(name("Serve Manufacturer"), None, ca=True)
    chain = work / "maker.pem"
    chain.write_bytes(maker.pem())
    passphrase = work / "passphrase.txt"
    passphrase.write_text("a long enough passphrase\n")
    installation.run(
        "est",
        "enable",
        "serve-devices",
        "--bootstrap-chain",
        str(chain),
        "--passphrase-file",
        str(passphrase),
        "--label",
        LABEL,
    )
    return installation


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port some other program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def run_to_exit(
    installation: EstcaInstallation, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run estca expecting it to exit by itself; one that serves instead is stopped, and fails."""
    process = subprocess.Popen(
        [*ESTCA, *args],
        env=installation.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate(timeout=15)
        raise AssertionError(f"estca {' '.join(args)} kept running:\n{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def assert_one_error_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"estca: error: {message}\n"


def children_of(pid: int) -> set[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return {int(line) for line in result.stdout.split()}


def serving_lines(server: EstServer) -> list[str]:
    return [line for line in server.log().splitlines() if "serving EST" in line]


def wait_for_workers(server: EstServer, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(serving_lines(server)) < count:
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{count} workers did not start:\n{server.log()}")
        time.sleep(0.05)


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("workers", ["1", "2"], ids=["one-worker", "two-workers"])
def test_serve_on_an_address_in_use_fails_with_one_line(
    installation: EstcaInstallation, listening_port: int, workers: str
) -> None:
    listen = f"127.0.0.1:{listening_port}"
    result = run_to_exit(installation, "serve", "--listen", listen, "--workers", workers)
    assert_one_error_line(
        result,
        f"cannot listen on {listen}: the address is already in use "
        "(by another estca or another program)",
    )


def test_second_estca_with_workers_refuses_the_port_of_a_running_one(
    labelled: EstcaInstallation,
) -> None:
    # SO_REUSEPORT alone would let the second one in, and devices would be split between them.
    first = EstServer(labelled, workers=2)
    try:
        listen = f"127.0.0.1:{first.port}"
        result = run_to_exit(labelled, "serve", "--listen", listen, "--workers", "2")
        assert_one_error_line(
            result,
            f"cannot listen on {listen}: the address is already in use "
            "(by another estca or another program)",
        )
        assert first.curl(LABEL, "cacerts").status == 200
    finally:
        first.stop()


@pytest.mark.parametrize(
    ("host", "message"),
    [
        # Both are refused locally, without asking a DNS server.
        ("bad host", "Name or service not known"),
        ("a" * 64 + ".invalid", "not a valid host name"),
    ],
    ids=["resolver-refuses", "idna-refuses"],
)
def test_serve_on_a_host_that_does_not_resolve_fails_with_one_line(
    installation: EstcaInstallation, host: str, message: str
) -> None:
    result = run_to_exit(installation, "serve", "--listen", f"{host}:8450", "--workers", "1")
    assert_one_error_line(result, f"cannot listen on {host}:8450: {message}")


@pytest.mark.parametrize(
    ("key_kind", "message"),
    [
        ("other-key", "the key is not the certificate's key"),
        ("not-a-key", "not a PEM certificate and an unencrypted PEM private key ([SSL] PEM lib"),
    ],
    ids=["other-key", "not-a-key"],
)
def test_tls_key_that_cannot_be_used_fails_before_any_worker_starts(
    installation: EstcaInstallation, tmp_path: Path, key_kind: str, message: str
) -> None:
    certificate, _ = make_certificate(name("est.example.test"), None, ca=False).write(
        tmp_path, "server"
    )
    key = tmp_path / "key.pem"
    if key_kind == "other-key":
        key.write_bytes(make_certificate(name("other"), None, ca=False, key=new_key()).key_pem())
    else:
        key.write_text("not a key\n")
    result = run_to_exit(
        installation,
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--workers",
        "2",
        "--tls-cert",
        str(certificate),
        "--tls-key",
        str(key),
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        f"estca: error: --tls-cert {certificate} with --tls-key {key} cannot be used: {message}"
    )
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_killed_worker_is_logged_and_replaced_and_sigterm_still_exits_cleanly(
    labelled: EstcaInstallation,
) -> None:
    server = EstServer(labelled, workers=2)
    try:
        wait_for_workers(server, 2)
        workers = children_of(server.process.pid)
        assert len(workers) == 2
        victim = min(workers)
        mark = server.log_mark()

        subprocess.run(["kill", "-9", str(victim)], check=True)

        server.wait_for_log(
            mark,
            rf"WARNING estca\.est\.run worker {victim} was killed by signal 9 \(SIGKILL\); "
            "starting a replacement",
        )
        log = server.wait_for_log(mark, r"serving EST on \S+ \(pid \d+", timeout=30)
        replacement = int(re.findall(r"\(pid (\d+)", log)[-1])
        assert replacement not in workers
        assert children_of(server.process.pid) == (workers - {victim}) | {replacement}
        assert server.curl(LABEL, "cacerts").status == 200

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        deadline = time.monotonic() + 10
        while any(is_running(pid) for pid in workers | {replacement}):
            assert time.monotonic() < deadline, "workers outlived their parent"
            time.sleep(0.05)
        # The workers stopped by SIGTERM are neither warned about nor replaced.
        assert server.log_since(mark).count("starting a replacement") == 1
    finally:
        server.stop()


def test_each_worker_announces_itself_in_one_write(installation: EstcaInstallation) -> None:
    # A sequenced-packet socket as stderr keeps each write apart: a line written in two pieces
    # (the text, then its newline) is what lets the lines of two workers run into each other.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    port = free_port()
    process = subprocess.Popen(
        [*ESTCA, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2"],
        env=installation.env,
        stdout=subprocess.DEVNULL,
        stderr=theirs.fileno(),
    )
    theirs.close()
    ours.settimeout(60)
    writes: list[str] = []
    try:
        while sum("serving EST" in write for write in writes) < 2:
            write = ours.recv(65536).decode()
            assert write, f"estca serve ended:\n{''.join(writes)}"
            writes.append(write)
    finally:
        process.terminate()
        # Read to the end, so that no worker blocks writing its last lines.
        while ours.recv(65536):
            pass
        ours.close()
        process.wait(timeout=15)
    pattern = rf"estca: serving EST on https://127\.0\.0\.1:{port} \(pid \d+, labels: [^)]*\)\n"
    for write in writes:
        if "serving EST" in write:
            assert re.fullmatch(pattern, write), repr(write)


def test_each_request_is_logged_once_by_estca_access(labelled: EstcaInstallation) -> None:
    server = EstServer(labelled, workers=1)
    try:
        mark = server.log_mark()
        assert server.curl(LABEL, "cacerts").status == 200
        server.wait_for_log(mark, rf"estca\.access .*path=\"/\.well-known/est/{LABEL}/cacerts\"")
        # aiohttp writes its line after the response is sent; give it the time to.
        time.sleep(1)
        assert "aiohttp.access" not in server.log_since(mark)
    finally:
        server.stop()
