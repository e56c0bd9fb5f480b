"""Broker URLs: parsed strictly, split safely, and never shown with their credentials.

`amqp://user:password@host:5672/vhost?query` (`amqps://` defaults to port 5671),
`memory://name`, or a comma-separated list of AMQP URLs for a cluster. A comma splits
the list only where the next URL starts (`,amqp://`), so a raw comma in a password is
still read as part of it. Anything ambiguous is an error that names the URL by its
position and says what to fix; no error, log line or repr here carries any part of a
user name or password: a malformed URL may have a password where a host or port
should be, so only a host that parsed cleanly is ever shown.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import quote, unquote

from .errors import ConfigurationError

MEMORY_SCHEME = "memory://"
BROKER_SCHEMES: Mapping[str, int] = {"amqp": 5672, "amqps": 5671}
HTTP_SCHEMES: Mapping[str, int] = {"http": 80, "https": 443}
# Schemes people paste by mistake, named in the error; any other "scheme" may be part of a secret.
_KNOWN_SCHEMES = frozenset({"http", "https", "redis", "rediss", "tcp", "ws", "wss", "mqtt", "stomp", "kafka", "nats"})

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_NEXT_URL = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]*[A-Za-z0-9_])?")
_ENCODE_HINT = "percent-encode special characters in the user name and password (e.g. ',' as %2C, '@' as %40)"


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """One parsed URL. Its repr and str hide the credentials; `url` is the full URL to connect with."""

    scheme: str
    host: str
    port: int
    vhost: str
    query: str = ""
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    url: str = field(default="", repr=False)

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"BrokerURL({self.redacted!r})"

    @property
    def address(self) -> str:
        """`scheme://host:port`, nothing secret."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def redacted(self) -> str:
        """The URL with the password as `***`, for logs and errors."""
        return self.url if self.scheme == "memory" else _build(self, hide=True)


def _build(parts: BrokerURL, *, hide: bool) -> str:
    """The URL of `parts`, credentials percent-encoded (the password as `***` if `hide`)."""
    userinfo = "" if parts.user is None else quote(parts.user, safe="")
    if parts.password is not None:
        userinfo += ":" + ("***" if hide else quote(parts.password, safe=""))
    path = "/" + quote(parts.vhost, safe="") if parts.vhost != "/" else "/"
    return f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{parts.address.split('://', 1)[1]}{path}" + (
        f"?{parts.query}" if parts.query else ""
    )


def _ordinal(position: int) -> str:
    return f"{position}{'th' if 10 <= position % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(position % 10, 'th')}"


def describe(position: int | None, count: int, source: str) -> str:
    """How an error names a URL: `the broker URL in NOBS_AMQP_URL`, `the 2nd of 3 broker URLs in ...`."""
    if position is None or count <= 1:
        return f"the broker URL in {source}"
    return f"the {_ordinal(position)} of {count} broker URLs in {source}"


def parse(
    url: str, *, which: str = "the broker URL", schemes: Mapping[str, int] = BROKER_SCHEMES, memory: bool = True
) -> BrokerURL:
    """Parse one URL strictly; ConfigurationError (naming it as `which`, never quoting it) if it is malformed."""
    if not isinstance(url, str):
        raise ConfigurationError(f"{which} is a {type(url).__name__}, not a string")
    text = url.strip()
    if memory and text.lower().startswith(MEMORY_SCHEME):
        return BrokerURL("memory", "", 0, "/", url=MEMORY_SCHEME + text[len(MEMORY_SCHEME) :])
    names = [f"{s}://" for s in (*schemes, *(["memory"] if memory else []))]
    wanted = ", ".join(names[:-1]) + f" or {names[-1]}"
    found = _SCHEME.match(text)
    if found is None:
        raise ConfigurationError(f"{which} has no scheme: start it with {wanted}")
    scheme = found.group(1).lower()
    if scheme not in schemes:
        named = f"has scheme {scheme!r}, which is not supported" if scheme in _KNOWN_SCHEMES else "has another scheme"
        raise ConfigurationError(f"{which} {named}: use {wanted}")
    rest = text[found.end() :]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "," in tail:
        raise ConfigurationError(
            f"{which} has a raw ',' after its host: if it separates two URLs, start each with its scheme "
            f"(amqp://...); otherwise percent-encode it as %2C (and any '/', '?' or '#' in the password)"
        )
    if "@" in tail and "@" not in authority:
        # `user:pa/ss@host`: a raw '/', '?' or '#' cut the password short.
        raise ConfigurationError(
            f"{which} has a raw '/', '?' or '#' before its '@': percent-encode them in the user name and "
            f"password ('/' as %2F, '?' as %3F, '#' as %23)"
        )
    userinfo, at, hostport = authority.rpartition("@")
    user, password = _credentials(userinfo, which) if at else (None, None)
    host, port = _host_port(hostport, which, schemes[scheme], has_userinfo=bool(at))
    # After an '@' that is not the last before the host, the "host" may be part of a password.
    shown = which if "@" in tail else f"{which} ({scheme}://{f'[{host}]' if ':' in host else host})"
    vhost, query = _path_query(tail, shown)
    parts = BrokerURL(scheme, host, port, vhost, query, user, password)
    return replace(parts, url=_build(parts, hide=False))


def _credentials(userinfo: str, which: str) -> tuple[str, str | None]:
    if _BAD_ESCAPE.search(userinfo):
        raise ConfigurationError(
            f"{which} has a '%' in its user name or password that does not start a %XX escape: "
            f"write a literal '%' as %25"
        )
    user, colon, password = userinfo.partition(":")
    return unquote(user), unquote(password) if colon else None


def _host_port(hostport: str, which: str, default_port: int, *, has_userinfo: bool) -> tuple[str, int]:
    if hostport.startswith("["):
        inside, bracket, after = hostport[1:].partition("]")
        if not bracket:
            raise ConfigurationError(f"{which} has a '[' without its ']': write an IPv6 host as [::1]")
        host = _ipv6(inside)
        if host is None:
            raise ConfigurationError(f"{which} has a host in brackets that is not an IPv6 address")
        if after and not after.startswith(":"):
            raise ConfigurationError(f"{which} has something other than ':port' after its IPv6 host")
        port_text = after[1:] if after else ""
    else:
        if hostport.count(":") > 1:
            raise ConfigurationError(
                f"{which} has more than one ':' after its '@': write an IPv6 host in brackets "
                f"(amqp://user:password@[::1]:5672/) and {_ENCODE_HINT}"
            )
        host, colon, port_text = hostport.partition(":")
        if colon and not port_text:
            raise ConfigurationError(f"{which} has a ':' but no port after its host: remove it or add the port")
        if not host:
            raise ConfigurationError(f"{which} has no host: write it as amqp://user:password@host:5672/vhost")
        if not _valid_hostname(host):
            raise ConfigurationError(f"{which} has a host that is not a valid name or IP address; {_ENCODE_HINT}")
    return host, _port(port_text, which, default_port, has_userinfo=has_userinfo)


def _ipv6(text: str) -> str | None:
    """The address, or None; the ValueError (which quotes the text) never leaves here."""
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def _valid_hostname(host: str) -> bool:
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _port(text: str, which: str, default: int, *, has_userinfo: bool) -> int:
    if not text:
        return default
    if not text.isascii() or not text.isdigit():
        where = "" if has_userinfo else " (user name and password go before an '@': amqp://user:password@host:5672/)"
        raise ConfigurationError(f"{which} has a port that is not a number{where}; {_ENCODE_HINT}")
    port = int(text)
    if not 0 < port <= 65535:
        raise ConfigurationError(f"{which} has a port out of range: use a number from 1 to 65535")
    return port


def _path_query(tail: str, which: str) -> tuple[str, str]:
    path, _, query = tail.partition("?")
    if "#" in tail:
        raise ConfigurationError(f"{which} has a raw '#': percent-encode it as %23")
    if _BAD_ESCAPE.search(tail):
        raise ConfigurationError(f"{which} has a '%' that does not start a %XX escape: write a literal '%' as %25")
    if "@" in path:
        raise ConfigurationError(
            f"{which} has a raw '@' after its host: percent-encode it as %40 in a vhost, and '/', '?', '#' "
            f"and '@' in the user name and password"
        )
    # As the AMQP URI spec and aiormq read it: the path after its first '/', percent-decoded.
    vhost = unquote(path[1:]) if len(path) > 1 else "/"
    return vhost, query


def split(value: str) -> list[str]:
    """Split a comma-separated list of URLs where the next URL starts (`, amqp://`), so a raw comma
    inside a password is kept in it; blank items are dropped."""
    return [item.strip() for item in _NEXT_URL.split(value.strip().rstrip(",")) if item.strip()]


def broker_urls(value: str | Sequence[str], source: str) -> tuple[str, ...]:
    """The URLs `value` gives (a comma-separated string or a list), each checked, with its
    credentials percent-encoded for the connection. `source` names where they came from."""
    items = split(value) if isinstance(value, str) else [u for u in value if not isinstance(u, str) or u.strip()]
    if not items:
        raise ConfigurationError(f"no broker URL given in {source}: set NOBS_AMQP_URL or Project(url=...)")
    parsed = [parse(u, which=describe(i, len(items), source)) for i, u in enumerate(items, 1)]
    if len(parsed) > 1 and any(p.scheme == "memory" for p in parsed):
        raise ConfigurationError(f"{source} mixes memory:// with other URLs: give memory:// alone")
    return tuple(p.url for p in parsed)


def in_process(url: str) -> bool:
    """Whether `url` names a broker that lives inside this process (`memory://`), which another
    process (a worker, the CLI, the management UI) can never reach."""
    return url.strip().lower().startswith(MEMORY_SCHEME)


def memory_url(name: str) -> str:
    """The URL of the in-process broker called `name`."""
    return MEMORY_SCHEME + name


def memory_name(url: str) -> str:
    """The name of the in-process broker `url` names (`memory://` alone: "")."""
    return url.strip()[len(MEMORY_SCHEME) :].strip("/")


def redact(url: str) -> str:
    """`url` with its password replaced by `***`, for logs and errors; a URL that does not parse
    is shown as its scheme only."""
    try:
        return parse(url).redacted
    except ConfigurationError:
        found = _SCHEME.match(url.strip()) if isinstance(url, str) else None
        scheme = found.group(1).lower() if found else ""
        return f"{scheme}://***" if scheme in BROKER_SCHEMES else "***"


def node_address(url: str) -> str:
    """`host:port` of the node `url` names (`memory://name` as it is): for logs, status and
    metrics, never with credentials."""
    parts = parse(url)
    return parts.url if parts.scheme == "memory" else parts.address.split("://", 1)[1]


def vhost_of(url: str) -> str:
    """The vhost a URL names ("/" when it names none)."""
    return parse(url).vhost


def with_vhost(url: str, vhost: str) -> str:
    """`url` pointing at `vhost` instead."""
    return _build(replace(parse(url, memory=False), vhost=vhost), hide=False)


def http_base(url: str, which: str) -> tuple[str, str | None, str | None]:
    """An HTTP(S) base URL without its credentials (safe to show), and the user name and password it carried."""
    parts = parse(url, which=which, schemes=HTTP_SCHEMES, memory=False)
    path = "" if parts.vhost == "/" else "/" + quote(parts.vhost, safe="/")
    return f"{parts.address}{path}", parts.user, parts.password


def describe_error(exc: BaseException) -> str:
    """`exc` as text for a log line or an error, with the password of any URL in it as `***`."""
    text = str(exc) or type(exc).__name__
    return re.sub(r"(amqps?://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
