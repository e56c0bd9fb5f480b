"""Hostile and malformed broker URLs: each parses to the right parts or is a clear error, and no
part of a credential ever shows (errors, reprs, logs, CLI output, the management API's errors).

tests/rabbitmq/test_faults.py checks connection failures with a well-formed URL; these are URLs that
do not parse the way a naive split would (commas, '@', '#', '/', '%' in passwords, bad ports).
"""

from __future__ import annotations

import asyncio
import base64
import re
import sys
import traceback
from pathlib import Path

import pytest
import yarl

from nobs_amqp import ConfigurationError, NobsAmqpError, Project, Worker
from nobs_amqp.management import MANAGEMENT_ENV, Management
from nobs_amqp.urls import broker_urls, parse, redact, split, vhost_of

from ..support import ROOT, exception_chain, free_port, http_server, run_cli

# Distinctive secrets: a test fails if any piece of one (4+ characters) shows up.
SECRETS = ("Quokka4711", "ZebraQ", "Wombat", "Kiwi9000")


def pieces(text: str) -> set[str]:
    """Every run of 4+ letters/digits in a secret: what must not leak even if the secret is cut."""
    return {p for p in re.split(r"[^A-Za-z0-9]+", text) if len(p) >= 4}


SECRET_PIECES = set().union(*(pieces(s) for s in SECRETS)) | {"kaPass", "word4711"}


def assert_no_secret(text: str) -> None:
    leaked = sorted(p for p in SECRET_PIECES if p in text)
    assert not leaked, f"{leaked} leaked in: {text}"


def exception_text(exc: BaseException) -> str:
    """Everything an exception shows: str and repr of it and of its whole chain, and its traceback."""
    seen = exception_chain(exc)
    return "\n".join([*(f"{e}\n{e!r}" for e in seen), "".join(traceback.format_exception(exc))])


# (value of NOBS_AMQP_URL, expected (user, password, host, port, vhost, query) per URL)
PARSES = [
    ("amqp://bob:Quokka,4711@rabbit:5672/vh", [("bob", "Quokka,4711", "rabbit", 5672, "vh", "")]),
    (
        "amqp://bob:Quok,ka4711@r1/,amqp://bob:Quok,ka4711@r2:5673/",
        [("bob", "Quok,ka4711", "r1", 5672, "/", ""), ("bob", "Quok,ka4711", "r2", 5673, "/", "")],
    ),
    ("amqp://a@b:Quok@ka4711@rabbit/", [("a@b", "Quok@ka4711", "rabbit", 5672, "/", "")]),  # '@' before the last
    ("amqp://bob:Quok:ka4711@rabbit/", [("bob", "Quok:ka4711", "rabbit", 5672, "/", "")]),
    ("amqp://bob:Quokka%2F4711%25@rabbit/%2F", [("bob", "Quokka/4711%", "rabbit", 5672, "/", "")]),
    ("amqp://bob:Quokka4711@[::1]:5673/vh", [("bob", "Quokka4711", "::1", 5673, "vh", "")]),
    (
        "amqps://bob:Quokka4711@rabbit/vh?cafile=/etc/ssl/ca.pem&no_verify_ssl=0",
        [("bob", "Quokka4711", "rabbit", 5671, "vh", "cafile=/etc/ssl/ca.pem&no_verify_ssl=0")],
    ),
    ("  amqp://rabbit  ", [(None, None, "rabbit", 5672, "/", "")]),
    ("amqp://bob:Quokka4711@rabbit/a%2Fb, ", [("bob", "Quokka4711", "rabbit", 5672, "a/b", "")]),
]

# (value of NOBS_AMQP_URL, what the error must say)
REFUSED = [
    ("bob:ZebraQ@rabbit:5672/", "has no scheme: start it with amqp://"),
    ("amqp://bob:Quokka4711@r1/,bob:ZebraQ@r2/", "raw ',' after its host"),
    ("amqp://bob:Quok#ka4711@rabbit/", "percent-encode them in the user name and password"),
    ("amqp://bob:Quok/ka4711@rabbit/", "'/' as %2F"),
    ("amqp://bob:Quok?ka4711@rabbit/", "'?' as %3F"),
    ("amqp://bob:Quokka4711%@rabbit/", "write a literal '%' as %25"),
    ("amqp://bob:Quokka%zz4711@rabbit/", "does not start a %XX escape"),
    ("amqp://bob:Quokka4711@rabbit:99999/", "port out of range: use a number from 1 to 65535"),
    ("amqp://bob:Quokka4711@rabbit:abc/", "port that is not a number"),
    ("amqp://bob:Quokka4711/", "user name and password go before an '@'"),
    ("amqp://bob:Quokka4711@/vh", "has no host"),
    ("amqp://bob:Quokka4711@:5672/vh", "has no host"),
    ("amqp://bob:Quokka4711@rabbit:/vh", "no port after its host"),
    ("amqp://bob:Quokka4711@::1:5672/", "IPv6 host in brackets"),
    ("amqp://bob:Quokka4711@[fe80::zz]/", "not an IPv6 address"),
    ("amqp://bob:Quokka4711@[::1/", "'[' without its ']'"),
    ("amqp://bob:Quokka4711@rab bit/", "not a valid name or IP address"),
    ("amqp://bob:Quokka4711@rabbit/vh#frag", "raw '#'"),
    ("amqp://bob:Quok@kaPass/word4711@rabbit/", "raw '@' after its host"),
    ("http://bob:Quokka4711@rabbit/", "scheme 'http', which is not supported"),
    ("Quokka4711://rabbit/", "has another scheme: use amqp://, amqps:// or memory://"),
    ("amqp://bob:Quokka4711@r1/,amqp://bob:Quokka4711@r2:99999/", "the 2nd of 2 broker URLs in NOBS_AMQP_URL"),
    ("amqp://bob:Quokka4711@r1/,memory://", "mixes memory:// with other URLs"),
    (" , ", "no broker URL given"),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("value", "expected"), PARSES)
def test_hostile_urls_that_parse(value: str, expected: list[tuple[object, ...]]) -> None:
    urls = broker_urls(value, "NOBS_AMQP_URL")
    assert len(urls) == len(expected)
    for url, parts in zip(urls, expected, strict=True):
        parsed = parse(url)
        assert (parsed.user, parsed.password, parsed.host, parsed.port, parsed.vhost, parsed.query) == parts
        assert vhost_of(url) == parts[4]
        assert parse(parsed.url) == parsed  # the canonical form reads back the same
        connects = yarl.URL(url)  # as aio-pika reads it
        assert (connects.user, connects.password, connects.host, connects.port) == parts[:4]
        for shown in (repr(parsed), str(parsed), redact(url), redact(value)):
            assert_no_secret(shown)
        if parsed.password is not None:
            assert ":***@" in redact(url)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("value", "message"), REFUSED)
def test_malformed_urls_are_clear_errors_without_secrets(
    value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        broker_urls(value, "NOBS_AMQP_URL")
    assert message in str(raised.value)
    assert_no_secret(exception_text(raised.value))
    assert_no_secret(redact(value))

    # The same through a Project: an explicit url fails at construction, NOBS_AMQP_URL when it is read.
    with pytest.raises(ConfigurationError) as raised:
        Project(name="nobs-test", workers=[Worker("urls")], url=value)
    assert message.replace("NOBS_AMQP_URL", "Project(url=...)") in str(raised.value)
    assert_no_secret(exception_text(raised.value))
    monkeypatch.setenv("NOBS_AMQP_URL", value)
    project = Project(name="nobs-test", workers=[Worker("urls")])
    with pytest.raises(ConfigurationError) as raised:
        project.urls  # noqa: B018
    assert_no_secret(exception_text(raised.value))


@pytest.mark.timeout(10)
def test_a_url_list_splits_only_where_a_url_starts() -> None:
    assert split("amqp://a:b,c@h1/, amqps://h2,") == ["amqp://a:b,c@h1/", "amqps://h2"]
    assert broker_urls(["amqp://a:b,c@h1/", " "], "Project(url=...)") == ("amqp://a:b%2Cc@h1:5672/",)


@pytest.mark.timeout(30)
async def test_management_url_credentials_are_used_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv(MANAGEMENT_ENV, f"http://admin:Quok,ka@4711@127.0.0.1:{port}/")
    management = Management("amqp://bob:ZebraQ@127.0.0.1:5672/")
    assert management.base == Management("amqp://x@h/").base == f"http://127.0.0.1:{port}"
    assert_no_secret(repr(management))
    with pytest.raises(NobsAmqpError) as raised:
        await management.request("GET", "/api/overview")
    assert f"the management API at http://127.0.0.1:{port}" in str(raised.value)
    assert_no_secret(exception_text(raised.value))

    monkeypatch.setenv(MANAGEMENT_ENV, "http://admin:Quokka4711@127.0.0.1:99999")
    with pytest.raises(ConfigurationError, match="NOBS_AMQP_MANAGEMENT_URL has a port out of range") as refused:
        Management("amqp://127.0.0.1/")
    assert_no_secret(exception_text(refused.value))


@pytest.mark.timeout(30)
async def test_management_authenticates_with_the_management_url_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    with http_server(body=b'{"ok": true}') as (port, seen):
        monkeypatch.setenv(MANAGEMENT_ENV, f"http://ad%40min:Quok%2Cka4711@127.0.0.1:{port}")
        assert await Management("amqp://bob:ZebraQ@127.0.0.1/").request("GET", "/api/overview") == {"ok": True}
        monkeypatch.delenv(MANAGEMENT_ENV)
        monkeypatch.setenv(MANAGEMENT_ENV, f"http://127.0.0.1:{port}")
        await Management("amqp://bob:Ze,braQ@127.0.0.1/").request("GET", "/api/overview")
    assert [base64.b64decode(h.removeprefix("Basic ")).decode() for h in seen] == [
        "ad@min:Quok,ka4711",
        "bob:Ze,braQ",
    ]


CLI_URLS = [
    "bob:ZebraQ@127.0.0.1:5672/",
    "amqp://bob:Quokka4711@127.0.0.1:99999/",
    "amqp://bob:Quok#ka4711@127.0.0.1/",
    "amqp://bob:Quokka4711@r1/,bob:ZebraQ@r2/",
]


async def cli(command: list[str], env: dict[str, str]) -> str:
    """Run the CLI; it must fail, and its output must carry no secret."""
    code, output = await run_cli("--app", "tests.apps.cli_app:project", *command, env=env)
    assert code != 0, output
    assert_no_secret(output)
    return output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", CLI_URLS)
async def test_cli_with_a_malformed_url_says_what_is_wrong_without_secrets(value: str) -> None:
    env = {"NOBS_AMQP_URL": value, "NOBS_TEST_WORKER": "urls"}
    for command in (["consume", "urls", "--burst"], ["dlq", "list", "urls"], ["status"]):
        output = await cli(command, env)
        assert "the broker URL in NOBS_AMQP_URL" in output or "broker URLs in NOBS_AMQP_URL" in output, output


@pytest.mark.timeout(60)
async def test_cli_with_a_malformed_url_prints_no_traceback() -> None:
    env = {"NOBS_AMQP_URL": CLI_URLS[0], "NOBS_TEST_WORKER": "urls"}
    for command in (["consume", "urls", "--burst"], ["dlq", "list", "urls"], ["status"]):
        output = await cli(command, env)
        assert "Traceback" not in output, output
        assert output.startswith("Error: the broker URL in NOBS_AMQP_URL has no scheme"), output


@pytest.mark.timeout(60)
async def test_cli_that_cannot_connect_shows_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    env = {
        "NOBS_AMQP_URL": f"amqp://bob:Quok,ka@4711@127.0.0.1:{port}/",  # parses: the password has ',' and '@'
        "NOBS_TEST_WORKER": "urls",
        MANAGEMENT_ENV: f"http://admin:Kiwi9000@127.0.0.1:{port}",
    }
    # consume waits for an unreachable broker: for 1.5 s here, so that its warning is shown too.
    for command in (["consume", "urls", "--burst", "--start-timeout", "1.5"], ["status"]):
        code, output = await run_cli("--app", "tests.apps.cli_app:project", "--log-level", "debug", *command, env=env)
        assert code != 0, output
        assert "cannot connect to" in output, output
        assert "Traceback" not in output, output
        assert_no_secret(output)


@pytest.mark.timeout(60)
async def test_pytest_plugin_with_a_malformed_url(tmp_path: Path) -> None:
    (tmp_path / "test_it.py").write_text("def test_it(nobs_amqp_vhost):\n    pass\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        str(tmp_path / "test_it.py"),
        cwd=tmp_path,
        env={"NOBS_AMQP_URL": "amqp://bob:Quokka4711@127.0.0.1:99999/", "PATH": "", "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 50)
    text = output.decode()
    assert process.returncode != 0, text
    assert "NOBS_AMQP_URL has a port out of range" in text, text
    assert_no_secret(text)


@pytest.mark.timeout(30)
async def test_an_app_with_a_malformed_url_in_its_source_gets_a_clean_error() -> None:
    """A traceback would print the app's source line, password and all."""
    code, output = await run_cli("--app", "tests.badapps.bad_url:project", "status", env={})
    assert code == 2, output
    assert "Traceback" not in output, output
    assert "Quokka4711" not in output, output
    assert "tests.badapps.bad_url cannot be loaded" in output, output
