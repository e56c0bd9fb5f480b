"""The metrics/health endpoint as a server (`nobs_amqp.observe.httpserve`): one thread whatever the
connections, a bound on how many it keeps open, idle and slowloris clients closed after a short
while, heads bounded, GET only; and where `--metrics-host` listens by default."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import orjson
import pytest
from prometheus_client import CollectorRegistry

from nobs_amqp.errors import MetricsPortError
from nobs_amqp.observe.health import ANY_HOST, KUBERNETES_ENV, LOOPBACK_HOST, PATHS, Health, default_host, serve
from nobs_amqp.observe.httpserve import IDLE_SECONDS, MAX_CONNECTIONS, MAX_HEAD_BYTES, answer
from nobs_amqp.observe.metrics import PrometheusMetrics

from ..support import run_cli

IDLE = 300  # idle connections opened at once


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=5)


def exchange(port: int, raw: bytes, host: str = "127.0.0.1") -> bytes:
    """Send `raw` and read the answer to the end (the server closes after it)."""
    with connect(port, host) as client:
        client.sendall(raw)
        return read_to_end(client, time.monotonic() + 5)


def request(port: int, raw: bytes, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """Send `raw`: the answer's status, headers and body."""
    head, _, body = exchange(port, raw, host).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    return request(port, f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode(), host)


def read_to_end(client: socket.socket, deadline: float) -> bytes:
    """What `client` receives until the server closes it; fails past `deadline`."""
    chunks = []
    while True:
        client.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = client.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise AssertionError("the server did not close the connection in time") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def closed_within(client: socket.socket, seconds: float) -> bool:
    """Whether the server closed `client`, which it sent nothing, within `seconds`."""
    readable, _, _ = select.select([client], [], [], seconds)
    try:
        return bool(readable) and client.recv(1) == b""
    except ConnectionResetError:
        return True


@contextlib.contextmanager
def served() -> Iterator[int]:
    with Health().serve(port=0, host=LOOPBACK_HOST) as port:
        yield port


def has_ipv6() -> bool:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            return False
    return True


# -- connections: bounded, in one thread --------------------------------------------------------


def test_idle_connections_take_no_thread_and_a_bounded_number_of_fds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nobs_amqp")
    with served() as port, contextlib.ExitStack() as clients:
        threads, fds = threading.active_count(), open_fds()
        idle = [clients.enter_context(connect(port)) for _ in range(IDLE)]
        # /livez answers at once: the newest connection is served, the oldest idle ones make room.
        started = time.monotonic()
        status, _, body = get(port, "/livez")
        assert status == 200 and orjson.loads(body)["live"] is True
        assert time.monotonic() - started < 2
        server_fds = open_fds() - fds - IDLE  # the clients' own sockets are in this process too
        grown = threading.active_count() - threads
        figures = f"{IDLE} idle connections: threads +{grown}, the server's fds +{server_fds}"
        assert grown < 5, figures
        assert server_fds <= MAX_CONNECTIONS + 8, figures
        # Every idle one is closed by the server: at once past the bound, the rest after IDLE_SECONDS.
        deadline = time.monotonic() + IDLE_SECONDS + 5
        assert all(read_to_end(client, deadline) == b"" for client in idle)
        assert open_fds() - fds - IDLE <= 2
    bursts = [r for r in caplog.records if "connections open" in r.getMessage()]
    assert len(bursts) == 1, [r.getMessage() for r in caplog.records]


def test_past_the_bound_with_none_idle_a_new_connection_is_closed_at_once() -> None:
    """Clients that were answered but do not close are not closed for newer ones; they go after IDLE_SECONDS."""
    with served() as port, contextlib.ExitStack() as clients:
        started = time.monotonic()
        for _ in range(MAX_CONNECTIONS):  # each reads its answer, and does not close
            client = clients.enter_context(connect(port))
            client.sendall(b"GET /livez HTTP/1.1\r\n\r\n")
            assert read_to_end(client, time.monotonic() + 2).startswith(b"HTTP/1.1 200 OK\r\n")
        with connect(port) as refused:
            assert read_to_end(refused, time.monotonic() + 2) == b""  # no answer: closed at once
        assert time.monotonic() - started < IDLE_SECONDS - 1
        deadline = time.monotonic() + IDLE_SECONDS + 5
        while not exchange(port, b"GET /livez HTTP/1.1\r\n\r\n"):  # closed at once until they are let go
            assert time.monotonic() < deadline, "the answered connections were kept past the idle timeout"
            time.sleep(0.05)  # polling, with the deadline above
        assert time.monotonic() - started > IDLE_SECONDS - 0.5


# -- slow, oversized and other requests ---------------------------------------------------------


def test_a_half_sent_or_trickled_head_is_cut_off_after_the_idle_timeout() -> None:
    with served() as port, connect(port) as half, connect(port) as trickle:
        started = time.monotonic()
        half.sendall(b"GET /livez HTTP/1.1\r\nHost: test\r\n")  # and nothing more
        while time.monotonic() < started + IDLE_SECONDS + 5:  # a byte every 0.2 s
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                trickle.sendall(b"X")
            if closed_within(trickle, 0.2):
                break
        assert IDLE_SECONDS - 0.5 < time.monotonic() - started < IDLE_SECONDS + 2
        assert closed_within(half, 1)
        assert get(port, "/livez")[0] == 200  # and it still answers


def test_an_oversized_head_a_post_and_garbage_get_an_error_status() -> None:
    with served() as port:
        padding = b"X-Pad: " + b"a" * MAX_HEAD_BYTES + b"\r\n"
        status, headers, body = request(port, b"GET /livez HTTP/1.1\r\n" + padding + b"\r\n")
        assert status == 431 and headers["content-type"] == "application/json", body
        status, _, _ = request(port, b"GET /livez HTTP/1.1\r\n" + padding * 4)  # no end in sight
        assert status == 431
        status, headers, body = request(port, b"POST /livez HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
        assert (status, headers["allow"]) == (405, "GET") and b"use GET" in body
        assert request(port, b"HEAD /livez HTTP/1.1\r\n\r\n")[0] == 405
        assert request(port, b"hello there\r\n\r\n")[0] == 400
        assert request(port, b"GET /\x1b[2J HTTP/1.1\r\n\r\n")[0] == 400  # nothing a terminal would obey
        assert request(port, b"GET /livez HTTP/1.1\r\nno colon\r\n\r\n")[0] == 400
        # Bare newlines and HTTP/1.0 are fine.
        assert request(port, b"GET /livez HTTP/1.0\n\n")[0] == 200


def test_the_answers_keep_their_bodies_headers_and_status_codes() -> None:
    metrics = PrometheusMetrics(registry=CollectorRegistry())
    with metrics.serve(port=0, host=LOOPBACK_HOST) as port:
        status, headers, body = get(port, "/readyz")
        report = orjson.loads(body)
        assert status == 503 and (report["ready"], report["state"]) == (False, "starting")
        assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
        assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
        status, headers, body = get(port, "/livez?verbose=1")
        assert status == 200 and orjson.loads(body)["live"] is True
        status, headers, body = get(port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b"nobs_amqp_reconnects_total" in body and headers["cache-control"] == "no-store"
        accept = "application/openmetrics-text; version=1.0.0"
        raw = f"GET /metrics HTTP/1.1\r\nAccept: {accept}\r\n\r\n".encode()
        status, headers, body = request(port, raw)
        assert headers["content-type"].startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")
        status, _, body = get(port, "/nothing")
        assert (status, orjson.loads(body)) == (404, {"error": "nothing at /nothing", "paths": list(PATHS)})
    with Health().serve(port=0, host=LOOPBACK_HOST) as port:  # no render: no /metrics
        status, _, body = get(port, "/metrics")
        assert (status, orjson.loads(body)["paths"]) == (404, ["/livez", "/readyz"])


def test_a_failing_report_is_a_500_and_the_endpoint_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def report() -> dict[str, object]:
        raise KeyError("workers")

    with serve(LOOPBACK_HOST, 0, report, None) as port:
        status, _, body = get(port, "/readyz")
        assert (status, orjson.loads(body)) == (500, {"error": "KeyError: 'workers'"})
        assert get(port, "/readyz")[0] == 500
    assert "metrics endpoint: /readyz failed: KeyError" in caplog.text


def test_answer_builds_whole_responses() -> None:
    def respond(target: str, accept: str) -> tuple[int, bytes, str]:
        return 200, f"{target} {accept}".encode(), "text/plain"

    response = answer(b"GET /x HTTP/1.1\r\nACCEPT:  text/plain \r\nHost: h", respond)
    assert response == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
        b"Cache-Control: no-store\r\nConnection: close\r\n\r\n/x text/plain"
    )
    assert answer(b"", respond).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer(b"DELETE / HTTP/1.1", respond).startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")


# -- listening and stopping ---------------------------------------------------------------------


def test_it_cannot_listen_on_a_port_in_use_or_a_bad_address() -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK_HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortError) as error, Health().serve(port=port, host=LOOPBACK_HOST):
            pass
        assert str(error.value).startswith(f"cannot serve metrics on {LOOPBACK_HOST}:{port}: address already in use")
        assert "--metrics-port" in str(error.value) and isinstance(error.value.__cause__, OSError)
    with pytest.raises(MetricsPortError, match="check the address"), Health().serve(port=0, host="256.1.1.1"):
        pass


@pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback here")
def test_ipv6_and_a_clean_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nobs_amqp")
    threads, fds = threading.active_count(), open_fds()
    with Health().serve(port=0, host="::1") as port:
        idle = connect(port, "::1")
        assert get(port, "/livez", "::1")[0] == 200
        assert f"metrics and health on http://[::1]:{port} (/livez, /readyz)" in caplog.text
        assert [t.name for t in threading.enumerate()].count("nobs-metrics") == 1
    # The block ended: the idle connection was closed, the thread joined, the socket closed.
    with idle:
        assert closed_within(idle, 2)
    assert "nobs-metrics" not in [t.name for t in threading.enumerate()]
    assert (threading.active_count(), open_fds()) == (threads, fds)
    with pytest.raises(ConnectionRefusedError):
        connect(port, "::1").close()


# -- the default host --------------------------------------------------------------------------


def test_the_default_host_is_every_address_in_a_pod_and_loopback_elsewhere() -> None:
    assert default_host({KUBERNETES_ENV: "10.96.0.1"}) == ANY_HOST == "0.0.0.0"
    assert default_host({}) == LOOPBACK_HOST == "127.0.0.1"
    assert default_host({KUBERNETES_ENV: ""}) == LOOPBACK_HOST


async def test_consume_listens_where_the_default_host_says() -> None:
    """Told by the message when the port is taken on loopback: 127.0.0.1 on a laptop, 0.0.0.0 in a pod."""
    env = {"NOBS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/", "NOBS_TEST_WORKER": "w"}
    with socket.socket() as taken:
        taken.bind((LOOPBACK_HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        for k8s, host in (("", LOOPBACK_HOST), ("10.96.0.1", ANY_HOST)):
            code, text = await run_cli(
                *("--app", "tests.apps.cli_app:project", "consume", "w", "--metrics-port", str(port)),
                env={**env, KUBERNETES_ENV: k8s},
            )
            assert code == 1 and f"cannot serve metrics on {host}:{port}: address already in use" in text, text
