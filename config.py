"""Config: the gateway's settings, one frozen dataclass read from MCPGW_* environment variables;
a secret may come from a file named by the variable with a `_FILE` suffix (systemd credentials)."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable."""


SECRET_VARIABLES = ("MCPGW_OIDC_CLIENT_SECRET", "MCPGW_SECRET_KEY")


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Config:
    public_url: str = "http://127.0.0.1:8080"
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    storage_url: str = "sqlite:///var/gateway.db"
    state_dir: str = "var"
    oidc_issuer: str = "https://accounts.google.com"
    oidc_client_id: str = ""
    oidc_client_secret: str = field(default="", repr=False)
    dev_login: bool = False
    secret_key: bytes = field(default=b"", repr=False)
    upstream_allow: tuple[str, ...] = ()
    admin_emails: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call /mcp/*
    access_token_ttl: int = 3600
    refresh_idle_ttl: int = 30 * 86400
    refresh_absolute_ttl: int = 180 * 86400
    signin_ttl: int = 12 * 3600
    trust_forwarded: bool = False  # honour X-Forwarded-For from a reverse proxy for rate limits
    metrics_token: str = field(default="", repr=False)  # bearer secret for /metrics beyond loopback
    sse_keepalive: int = 15  # idle SSE streams get a comment so intermediaries keep them open
    slow_reader_timeout: int = 30  # a client that cannot drain one write in this long is cut off
    upstream_timeout: int = 60  # seconds an upstream may take to send its response headers
    usage_retention_days: int = 90  # per-call usage history kept; daily aggregates stay
    max_connections: int = 0  # client connections at once; 0: derived from the descriptor limit
    drain_timeout: int = 30  # seconds in-flight requests get to finish after SIGTERM
    workers: int = 1  # serving processes on the one port (workers.py); 1: no supervisor
    log_format: str = "text"  # MCPGW_LOG_FORMAT: text, or json (one object a line)

    def check_can_serve(self) -> None:
        """What serving needs beyond what the admin commands need."""
        if not self.dev_login and not self.oidc_client_id:
            raise ConfigError(
                "MCPGW_OIDC_CLIENT_ID: required (or set MCPGW_DEV_LOGIN=1 for a loopback-only trial)"
            )

    @property
    def issuer(self) -> str:
        return self.public_url

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def base_resource(self) -> str:
        return f"{self.public_url}/mcp/"

    def server_resource(self, server_id: str) -> str:
        return f"{self.public_url}/mcp/{server_id}"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Config:
        env = dict(os.environ if env is None else env)
        values: dict = {}

        public_url = _get(env, "MCPGW_PUBLIC_URL", cls.public_url).rstrip("/")
        parts = _url(public_url, "MCPGW_PUBLIC_URL")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"MCPGW_PUBLIC_URL: {public_url!r} is not an http(s) URL")
        if parts.path or parts.query or parts.fragment or parts.username:
            raise ConfigError("MCPGW_PUBLIC_URL: give the origin only (scheme, host, port), no path")
        if parts.scheme != "https" and not is_loopback_host(parts.hostname):
            raise ConfigError("MCPGW_PUBLIC_URL: https is required unless the host is loopback")
        # The issuer is compared byte for byte by clients: keep one canonical spelling.
        values["public_url"] = f"{parts.scheme}://{parts.netloc.lower()}"

        listen = _get(env, "MCPGW_LISTEN", "127.0.0.1:8080")
        host, sep, port = listen.rpartition(":")
        if not sep or not _is_number(port) or not 0 < int(port) < 65536:
            raise ConfigError(f"MCPGW_LISTEN: {listen!r} is not HOST:PORT")
        values["listen_host"], values["listen_port"] = host.strip("[]") or "0.0.0.0", int(port)

        values["storage_url"] = _get(env, "MCPGW_STORAGE", cls.storage_url)
        values["state_dir"] = _get(env, "MCPGW_STATE_DIR", cls.state_dir)

        issuer = _get(env, "MCPGW_OIDC_ISSUER", cls.oidc_issuer).rstrip("/")
        iparts = _url(issuer, "MCPGW_OIDC_ISSUER")
        if iparts.scheme not in ("http", "https") or not iparts.hostname:
            raise ConfigError(f"MCPGW_OIDC_ISSUER: {issuer!r} is not an http(s) URL")
        if iparts.scheme != "https" and not is_loopback_host(iparts.hostname):
            raise ConfigError("MCPGW_OIDC_ISSUER: https is required unless the host is loopback")
        values["oidc_issuer"] = issuer
        values["oidc_client_id"] = _get(env, "MCPGW_OIDC_CLIENT_ID", "")
        values["oidc_client_secret"] = _secret(env, "MCPGW_OIDC_CLIENT_SECRET")

        values["dev_login"] = _bool(env, "MCPGW_DEV_LOGIN", False)
        if values["dev_login"]:
            if not is_loopback_host(values["listen_host"]) or not is_loopback_host(parts.hostname):
                raise ConfigError(
                    "MCPGW_DEV_LOGIN: the local sign-in is refused unless MCPGW_LISTEN and "
                    "MCPGW_PUBLIC_URL are both loopback"
                )

        values["upstream_allow"] = _list(env, "MCPGW_UPSTREAM_ALLOW")
        for entry in values["upstream_allow"]:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ConfigError(f"MCPGW_UPSTREAM_ALLOW: {entry!r} is not a CIDR") from None
        values["admin_emails"] = tuple(e.lower() for e in _list(env, "MCPGW_ADMIN_EMAILS"))
        origins = _list(env, "MCPGW_ALLOWED_ORIGINS")
        for origin in origins:
            if not urlsplit(origin).scheme or urlsplit(origin).path not in ("", "/"):
                raise ConfigError(f"MCPGW_ALLOWED_ORIGINS: {origin!r} is not an origin")
        values["allowed_origins"] = tuple(o.rstrip("/").lower() for o in origins)
        values["access_token_ttl"] = _int(env, "MCPGW_ACCESS_TOKEN_TTL", cls.access_token_ttl, 60, 86400)
        values["refresh_idle_ttl"] = _int(env, "MCPGW_REFRESH_IDLE_TTL", cls.refresh_idle_ttl, 300, 10**9)
        values["refresh_absolute_ttl"] = _int(
            env, "MCPGW_REFRESH_ABSOLUTE_TTL", cls.refresh_absolute_ttl, 300, 10**9
        )
        values["signin_ttl"] = _int(env, "MCPGW_SIGNIN_TTL", cls.signin_ttl, 60, 30 * 86400)
        values["trust_forwarded"] = _bool(env, "MCPGW_TRUST_FORWARDED", False)
        values["metrics_token"] = _secret(env, "MCPGW_METRICS_TOKEN")
        values["sse_keepalive"] = _int(env, "MCPGW_SSE_KEEPALIVE", cls.sse_keepalive, 1, 3600)
        values["slow_reader_timeout"] = _int(env, "MCPGW_SLOW_READER_TIMEOUT", cls.slow_reader_timeout, 1, 3600)
        values["upstream_timeout"] = _int(env, "MCPGW_UPSTREAM_TIMEOUT", cls.upstream_timeout, 1, 3600)
        values["usage_retention_days"] = _int(
            env, "MCPGW_USAGE_RETENTION_DAYS", cls.usage_retention_days, 1, 3650
        )
        values["max_connections"] = _int(env, "MCPGW_MAX_CONNECTIONS", cls.max_connections, 0, 10**7)
        values["drain_timeout"] = _int(env, "MCPGW_DRAIN_TIMEOUT", cls.drain_timeout, 0, 3600)
        values["workers"] = _workers(env)
        values["log_format"] = _get(env, "MCPGW_LOG_FORMAT", cls.log_format).lower()
        if values["log_format"] not in ("text", "json"):
            raise ConfigError(f"MCPGW_LOG_FORMAT: {values['log_format']!r} is not text or json")

        values.update(overrides)
        if not values.get("secret_key"):
            values["secret_key"] = _master_secret(env, values["state_dir"])
        return cls(**values)


def _is_number(raw: str) -> bool:
    # str.isdigit() also accepts characters such as "\u00b2" that int() refuses.
    return raw.isascii() and raw.isdigit()


def _url(value: str, name: str):
    """urlsplit, with a malformed host or port reported against the variable."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise ConfigError(f"{name}: {value!r} is not a valid URL ({exc})") from None
    return parts


def _get(env: dict[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _secret(env: dict[str, str], name: str) -> str:
    path = env.get(name + "_FILE", "").strip()
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{name}_FILE: {path} is not UTF-8 text") from None
    return env.get(name, "").strip()


def _bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: {raw!r} is not a boolean (use 1/0, true/false, on/off)")


def _int(env: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not _is_number(raw) or not low <= int(raw) <= high:
        raise ConfigError(f"{name}: {raw!r} is not a whole number between {low} and {high}")
    return int(raw)


MAX_WORKERS = 64


def _workers(env: dict[str, str]) -> int:
    """MCPGW_WORKERS: a count, or `auto` for the CPUs this process may run on."""
    raw = env.get("MCPGW_WORKERS", "").strip().lower()
    if raw == "auto":
        try:  # the CPUs this process may use (a cpuset or CPUAffinity= may allow fewer)
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count()
        return max(1, min(cpus or 1, MAX_WORKERS))
    if raw and (not _is_number(raw) or not 1 <= int(raw) <= MAX_WORKERS):
        raise ConfigError(f"MCPGW_WORKERS: {raw!r} is not a number of worker processes "
                          f"(1 to {MAX_WORKERS}) or auto")
    return int(raw) if raw else 1


def _list(env: dict[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _master_secret(env: dict[str, str], state_dir: str) -> bytes:
    """MCPGW_SECRET_KEY(_FILE), else a key generated once into the state dir (mode 0600)."""
    given = _secret(env, "MCPGW_SECRET_KEY")
    if given:
        if len(given) < 32:
            raise ConfigError("MCPGW_SECRET_KEY: use at least 32 characters of random text")
        return given.encode()
    path = Path(state_dir) / "secret.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Write a temp file, then link it into place: two processes starting at once
            # both end up reading the one key that won, never a half-written file.
            tmp = path.with_name(f".secret.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text().strip().encode()
    except OSError as exc:
        raise ConfigError(f"MCPGW_SECRET_KEY: cannot create {path}: {exc.strerror}") from None
