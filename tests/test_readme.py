"""The README's quickstart and first enrollment run as written."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509

from tests.support import free_port, make_certificate, name

README = Path(__file__).resolve().parent.parent / "README.md"
#: The estca command of this interpreter, for scripts run by bash.
ESTCA_COMMAND = f"{sys.executable} -m estca.cli.main"


def _block_after(heading: str) -> str:
    text = README.read_text("utf-8")
    section = text.split(f"## {heading}", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.DOTALL)
    assert match is not None, f"no sh block under {heading!r}"
    return match.group(1)


def test_readme_opens_with_the_two_commands() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text("utf-8"), re.DOTALL)
    assert blocks[0].strip() == "pip install . && estca quickstart"
    assert blocks[1].strip() == "pip install -e '.[test]' && pytest"
    ci = (README.parent / ".ci" / "run").read_text("utf-8")
    assert "\npip install -e '.[test]' && pytest\n" in ci


def test_quickstart_then_first_enrollment_as_written(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "quickstart.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "estca.cli.main",
            "quickstart",
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while b"serving EST" not in (tmp_path / "quickstart.log").read_bytes():
            assert server.poll() is None and time.monotonic() < deadline, (
                tmp_path / "quickstart.log"
            ).read_text()
            time.sleep(0.1)
        printed = (tmp_path / "quickstart.log").read_text()
        assert "openssl req -new" in printed and "simpleenroll" in printed

        script = _block_after("A first enrollment").replace("8443", str(port))
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "device.pem: OK" in result.stdout
        demo = tmp_path / "estca-data" / "demo"
        first = x509.load_pem_x509_certificate((demo / "device.pem").read_bytes())
        renewed = x509.load_pem_x509_certificate((demo / "device-renewed.pem").read_bytes())
        assert first.subject == renewed.subject
        assert first.serial_number != renewed.serial_number
    finally:
        server.terminate()
        server.wait(timeout=15)
        log.close()


def test_own_ca_and_template_commands_run_as_written(tmp_path: Path) -> None:
    script = _block_after("Setting up your own CA and template")
    lines = script.strip().splitlines()
    assert lines[-1].startswith("estca serve ")
    # Everything but the last line, which serves until stopped; the home goes to a tmp dir.
    setup = "\n".join(lines[:-1]).replace("/var/lib/estca", str(tmp_path / "home"))
    maker = make_certificate(name("Maker CA"), None, ca=True)
    (tmp_path / "manufacturer-ca.pem").write_bytes(maker.pem())
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", setup.replace("estca ", f"{ESTCA_COMMAND} ")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "label: sensors" in result.stdout
    assert "/.well-known/est/sensors/simpleenroll" in result.stdout
