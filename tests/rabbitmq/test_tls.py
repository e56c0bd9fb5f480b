"""amqps:// with certificate verification on, against a throwaway node with a TLS listener.

The test makes its own CA and server certificate (openssl), so nothing on the machine is trusted
or changed; the broker's certificate names localhost and 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nobs_amqp import BrokerConnectionError, Project, Worker

from ..apps import tasks
from ..nodes import Node, TlsFiles, node_or_skip
from ..support import eventually

pytestmark = pytest.mark.rabbitmq  # a throwaway node of the installed RabbitMQ
SECRET = "s3cret-tls-pw"  # the handshake fails before login, so any password will do: it must not show


@dataclass(frozen=True)
class Certificates:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the broker's certificate


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"openssl {' '.join(args)} failed: {done.stderr}"


def _make_ca(folder: Path, stem: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{stem}.key", "-out", f"{stem}.pem", "-days", "2", "-subj", f"/CN=nobs-amqp test {stem}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=folder,
    )  # fmt: skip


def make_certificates(folder: Path) -> Certificates:
    """A CA, a server certificate it signs for localhost/127.0.0.1, and an unrelated CA."""
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=folder,
    )  # fmt: skip
    (folder / "server.ext").write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=folder,
    )  # fmt: skip
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other-ca.pem")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
async def tls_node(certificates: Certificates) -> AsyncIterator[Node]:
    node_or_skip()
    async with Node(tls=TlsFiles(certificates.ca, certificates.cert, certificates.key)) as node:
        yield node


def make(url: str) -> tuple[Project, Worker]:
    worker = Worker(f"tls-{uuid.uuid4().hex[:8]}")
    return Project(name="nobs-test", workers=[worker], url=url, packages=["tests"]), worker


@pytest.mark.timeout(60)
async def test_a_task_goes_through_a_verified_tls_connection(tls_node: Node, certificates: Certificates) -> None:
    url = tls_node.tls_url(cafile=str(certificates.ca))
    project, worker = make(url)
    key = f"tls-{uuid.uuid4().hex}"
    async with project:
        message_id = await worker.queue(tasks.record, tasks.Job(key=key))
        assert message_id
        async with project.consuming(worker):
            await eventually(lambda: tasks.calls(key), timeout=20)
    assert len(tasks.calls(key)) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_a_certificate_from_another_ca_is_refused_clearly(
    tls_node: Node, certificates: Certificates, host: str
) -> None:
    url = tls_node.tls_url(host, cafile=str(certificates.other_ca)).replace(":guest@", f":{SECRET}@")
    project, worker = make(url)
    with pytest.raises(BrokerConnectionError) as caught:
        async with project:
            await worker.queue(tasks.record, tasks.Job(key="never"))
    message = str(caught.value)
    assert "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message, message
    assert f"{host}:{tls_node.tls_port}" in message, message
    assert "give its CA with ?cafile=" in message, message
    assert SECRET not in message, message
    assert SECRET not in repr(caught.value.__cause__), "the chained error shows the password"
