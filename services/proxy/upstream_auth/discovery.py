"""Where an upstream's tokens come from: its protected resource metadata (RFC 9728, from the
`WWW-Authenticate` `resource_metadata` or the well-known path), then its authorization server's
metadata (RFC 8414, then OpenID discovery). Only hosts the upstream URL or that metadata names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from services.proxy.upstream.errors import UpstreamError

from .errors import DiscoveryError
from .http import AuthHttp

# auth-param = token BWS "=" BWS ( token / quoted-string ), RFC 9110 §11.2
_PARAM = re.compile(r'([A-Za-z0-9_!#$%&\'*+.^`|~-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')
MAX_LIST = 50  # endpoints, scopes, servers: more than this in metadata is not metadata


@dataclass(frozen=True)
class AuthServer:
    """The parts of an authorization server's metadata the gateway uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str = ""
    revocation_endpoint: str = ""
    scopes_supported: tuple[str, ...] = ()
    token_auth_methods: tuple[str, ...] = ("client_secret_basic",)  # RFC 8414's default
    cimd_supported: bool = False  # client_id_metadata_document_supported
    iss_parameter: bool = False  # authorization_response_iss_parameter_supported
    userinfo_endpoint: str = ""  # OpenID userinfo: who the account is ("connected as")


@dataclass(frozen=True)
class Discovery:
    """What an upstream needs: the resource to ask tokens for, its AS, the scopes it names."""

    resource: str
    server: AuthServer
    scopes: tuple[str, ...] = field(default=())


def foreign_authorization_server(discovery: Discovery, upstream_url: str) -> str:
    """The AS's host when it is not the upstream's (the server form shows it to the owner), else ""."""
    host = urlsplit(discovery.server.issuer).hostname or ""
    return host if host != (urlsplit(upstream_url).hostname or "") else ""


def parse_www_authenticate(header: str) -> dict[str, str]:
    """The auth-params of a Bearer challenge (`resource_metadata`, `scope`, `error`…); {} when
    there is no Bearer challenge."""
    match = re.search(r"(?:^|,)\s*Bearer(?:\s+|$)", header or "", re.IGNORECASE)
    if match is None:
        return {}
    params: dict[str, str] = {}
    for found in _PARAM.finditer(header[match.end():]):
        name = found.group(1).lower()
        value = found.group(2) if found.group(2) is not None else found.group(3)
        params.setdefault(name, re.sub(r"\\(.)", r"\1", value))
    return params


def same_issuer(a: str, b: str) -> bool:
    # An empty path is written "https://as" or "https://as/" by different libraries.
    return a.rstrip("/") == b.rstrip("/")


class Discoverer:
    """Discovery through `AuthHttp` (the SSRF guard); `public_only` is the server's."""

    def __init__(self, http: AuthHttp) -> None:
        self.http = http

    async def discover(self, upstream_url: str, *, www_authenticate: str = "", public_only: bool = True,
                       issuer: str = "") -> Discovery:
        """`issuer`: the owner named the authorization server (no protected resource metadata
        is read then)."""
        upstream = urlsplit(upstream_url)
        scopes: tuple[str, ...] = ()
        resource = upstream_url
        if not issuer:
            prm = await self._resource_metadata(upstream_url, www_authenticate, public_only)
            resource = prm["resource"]
            issuer = prm["authorization_servers"][0]
            scopes = _strings(prm, "scopes_supported")
        challenge_scope = parse_www_authenticate(www_authenticate).get("scope", "")
        if challenge_scope:
            scopes = tuple(challenge_scope.split())[:MAX_LIST]
        _check_url(issuer, "authorization server", upstream.scheme)
        server = await self._server_metadata(issuer, upstream.scheme, public_only)
        return Discovery(resource, server, scopes or server.scopes_supported)

    async def _resource_metadata(self, upstream_url: str, www_authenticate: str, public_only: bool) -> dict:
        upstream = urlsplit(upstream_url)
        path = upstream.path.rstrip("/")
        candidates = []
        named = parse_www_authenticate(www_authenticate).get("resource_metadata", "")
        if named:
            where = urlsplit(named)
            # Only the upstream's own host may be named: a challenge cannot send us elsewhere.
            if (where.scheme, where.hostname, where.port) != (upstream.scheme, upstream.hostname, upstream.port):
                raise DiscoveryError(
                    f"the upstream's resource_metadata {named!r} is on another origin than the upstream")
            candidates.append(named)
        for suffix in ([path, ""] if path else [""]):
            candidates.append(urlunsplit((upstream.scheme, upstream.netloc,
                                          "/.well-known/oauth-protected-resource" + suffix, "", "")))
        for url in dict.fromkeys(candidates):
            document = await self._document(url, public_only, "protected resource metadata")
            if document is None:
                continue
            resource = document.get("resource")
            servers = document.get("authorization_servers")
            if not isinstance(resource, str) or not isinstance(servers, list) or not servers \
                    or not all(isinstance(s, str) for s in servers[:MAX_LIST]):
                raise DiscoveryError(f"the protected resource metadata at {url} lacks resource or "
                                     "authorization_servers")
            named_resource = urlsplit(resource)
            if (named_resource.scheme, named_resource.netloc) != (upstream.scheme, upstream.netloc):
                raise DiscoveryError(f"the protected resource metadata at {url} names the resource {resource!r}, "
                                     f"not this upstream")
            return document
        raise DiscoveryError(
            f"the upstream {upstream_url} publishes no protected resource metadata (RFC 9728); "
            "name its authorization server or use a static client")

    async def _server_metadata(self, issuer: str, scheme: str, public_only: bool) -> AuthServer:
        parts = urlsplit(issuer)
        path = parts.path.rstrip("/")

        def at(prefix: str, suffix: str = "") -> str:
            return urlunsplit((parts.scheme, parts.netloc, prefix + suffix, "", ""))

        candidates = [at("/.well-known/oauth-authorization-server", path),
                      at("/.well-known/openid-configuration", path)]
        if path:
            candidates.append(at(path + "/.well-known/openid-configuration"))
        for url in candidates:
            document = await self._document(url, public_only, "authorization server metadata")
            if document is None:
                continue
            return _auth_server(document, issuer, url, scheme)
        raise DiscoveryError(f"the authorization server {issuer} publishes no metadata (RFC 8414 or OpenID)")

    async def _document(self, url: str, public_only: bool, what: str) -> dict | None:
        """The JSON object at `url`; None for 404/410 (try the next place)."""
        try:
            answer = await self.http.get(url, public_only=public_only)
        except UpstreamError as exc:
            raise DiscoveryError(f"cannot read the {what} at {url}: {exc}") from None
        if answer.status in (404, 410):
            return None
        if answer.status != 200:
            raise DiscoveryError(f"the {what} at {url} answered HTTP {answer.status}")
        document = answer.json()
        if not isinstance(document, dict):
            raise DiscoveryError(f"the {what} at {url} is not a JSON object")
        return document


def _auth_server(document: dict, issuer: str, url: str, scheme: str) -> AuthServer:
    found = document.get("issuer")
    if not isinstance(found, str) or not same_issuer(found, issuer):
        raise DiscoveryError(f"the metadata at {url} is for issuer {found!r}, not {issuer!r}")

    def endpoint(name: str, required: bool) -> str:
        value = document.get(name, "")
        if not value and not required:
            return ""
        if not isinstance(value, str) or not value:
            raise DiscoveryError(f"the metadata at {url} lacks {name}")
        _check_url(value, name, scheme)
        return value

    methods = _strings(document, "code_challenge_methods_supported")
    if "code_challenge_methods_supported" in document and "S256" not in methods:
        raise DiscoveryError(f"the authorization server {issuer} does not support PKCE S256")
    return AuthServer(
        issuer=issuer,
        authorization_endpoint=endpoint("authorization_endpoint", True),
        token_endpoint=endpoint("token_endpoint", True),
        registration_endpoint=endpoint("registration_endpoint", False),
        revocation_endpoint=endpoint("revocation_endpoint", False),
        scopes_supported=_strings(document, "scopes_supported"),
        token_auth_methods=_strings(document, "token_endpoint_auth_methods_supported") or ("client_secret_basic",),
        cimd_supported=document.get("client_id_metadata_document_supported") is True,
        iss_parameter=document.get("authorization_response_iss_parameter_supported") is True,
        userinfo_endpoint=endpoint("userinfo_endpoint", False),
    )


def _strings(document: dict, name: str) -> tuple[str, ...]:
    value = document.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_LIST or not all(isinstance(v, str) for v in value):
        raise DiscoveryError(f"metadata field {name} is not a list of at most {MAX_LIST} strings")
    return tuple(value)


def _check_url(url: str, what: str, upstream_scheme: str) -> None:
    """https (http only for an http upstream: a local test or a lab), no credentials, no fragment."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise DiscoveryError(f"{what} {url!r} is not a URL") from None
    allowed = ("https", "http") if upstream_scheme == "http" else ("https",)
    if parts.scheme not in allowed or not parts.hostname or parts.username or parts.password or parts.fragment:
        raise DiscoveryError(f"{what} {url!r} is not an acceptable {'/'.join(allowed)} URL")
