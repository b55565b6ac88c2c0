"""The redirect-URI policy (RFC 3986 URIs; https anywhere, http on loopback with any port,
private-use schemes such as cursor://; javascript:, data:, file: refused; exact match otherwise),
per shared/reference/client-interop.md. Pure, no I/O."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote, urlsplit

from config import is_loopback_host
from services.common.errors import (
    InvalidInput,
    InvalidRedirectUri,
    OAuthError,
)
from services.common.validation import check_text

DANGEROUS_SCHEMES = {"javascript", "data", "file", "vbscript", "about", "blob", "filesystem"}
SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.\-]*$")
# RFC 3986's characters: unreserved, reserved and "%" (of a %XX escape); nothing else.
URI_CHARS_RE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# An http(s) host: an ASCII DNS name (A-labels for IDNs; "_" is seen in practice) or IPv4.
HOST_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_.\-]*[a-z0-9_])?\.?")


MAX_URI_LENGTH = 2000


def _text(value: object, name: str, limit: int, error: str = "invalid_client_metadata") -> str:
    """The shared text check (services.validation) as an RFC 7591 error naming the member."""
    try:
        return check_text(value, name, limit=limit)
    except InvalidInput as exc:
        raise OAuthError.of(error, str(exc)) from None


def check_redirect_uri(uri: object) -> str:
    """Return the URI when the policy allows it; raise InvalidRedirectUri.

    A redirect URI is an RFC 3986 URI: ASCII only (other characters percent-encoded), and
    an http(s) host is an ASCII name (an internationalised one in its IDNA A-label, xn--,
    form) or an IP literal. So the host the consent page names is the host the browser goes
    to: no look-alike Unicode host (Cyrillic "а" for "a"), no bidi override in the path.
    The messages describe the problem without echoing the URI (the caller names which one)."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_LENGTH:
        raise InvalidRedirectUri(f"a redirect URI must be a non-empty string of at most {MAX_URI_LENGTH} characters")
    _text(uri, "a redirect URI", MAX_URI_LENGTH, "invalid_redirect_uri")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
        raise InvalidRedirectUri("a redirect URI must not contain spaces or control characters")
    if not uri.isascii():
        raise InvalidRedirectUri(_non_ascii_problem(uri))
    if not URI_CHARS_RE.fullmatch(uri) or BAD_PERCENT_RE.search(uri):
        raise InvalidRedirectUri(
            "a redirect URI must be an RFC 3986 URI: characters such as < > { } | ^ ` and the backslash "
            "must be percent-encoded, and % must start a %XX escape",
        )
    parts = _split(uri)
    if parts is None:
        raise InvalidRedirectUri("a redirect URI has a malformed host or port")
    scheme = parts.scheme.lower()
    if not scheme or not SCHEME_RE.match(scheme):
        raise InvalidRedirectUri("a redirect URI must be an absolute URI (with a scheme)")
    if parts.fragment or "#" in uri:
        raise InvalidRedirectUri("a redirect URI must not have a fragment")
    if scheme in DANGEROUS_SCHEMES:
        raise InvalidRedirectUri(f"the {scheme}: scheme is not allowed in a redirect URI")
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise InvalidRedirectUri(f"a redirect URI with {scheme}: must name a host")
        if parts.username is not None or parts.password is not None:
            raise InvalidRedirectUri("a redirect URI must not carry user information")
        if not HOST_RE.fullmatch(parts.hostname) and not _is_ipv6_literal(parts):
            raise InvalidRedirectUri(
                "a redirect URI's host must be a DNS name of letters, digits, dots and hyphens (an "
                "internationalised name in its IDNA A-label, xn--, form) or an IP address",
            )
        if scheme == "http" and not is_loopback_host(parts.hostname):
            raise InvalidRedirectUri("http redirect URIs are only allowed for loopback hosts")
    return uri


def _non_ascii_problem(uri: str) -> str:
    """Why a URI holding non-ASCII characters is refused, and how to write it instead."""
    parts = _split(uri)
    host = parts.hostname if parts is not None else None
    if host and not host.isascii():
        a_label = a_label_host(host)
        return (
            "a redirect URI's host must be written in its IDNA A-label (xn--) form"
            + (f", here {a_label}" if a_label else "")
            + ": a non-ASCII host can imitate another one"
        )
    return (
        "a redirect URI must be ASCII (RFC 3986): write any other character as percent-encoded UTF-8 (%XX)"
    )


# Deviation characters: IDNA 2003 (Python's "idna" codec) maps them away (ß to ss), the
# browsers' UTS 46 keeps them (xn--zca): for these the codec's A-label is not the browser's.
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")


def a_label_host(host: str) -> str | None:
    """The ASCII (IDNA A-label) form of a host name, what a browser sends to DNS; None when
    it has none that is certain (not a valid IDN, or a deviation character)."""
    if host.isascii():
        return host.lower()
    if _IDNA_DEVIATIONS.intersection(host):
        return None
    try:
        return host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None


def _display_host(host: str) -> str:
    """A host as the user should read it: its A-label, else percent-encoded (never Unicode
    that could pass for another name)."""
    return a_label_host(host) or quote(host, safe="")


def _is_ipv6_literal(parts) -> bool:
    if not parts.netloc.split("@")[-1].startswith("["):
        return False
    try:
        ipaddress.IPv6Address(parts.hostname.split("%")[0])
    except ValueError:
        return False
    return True


def _split(uri: str):
    """urlsplit, or None when the host or port is malformed (urlsplit and .port raise)."""
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return None
    return parts


def is_loopback_redirect(uri: str) -> bool:
    parts = _split(uri)
    return parts is not None and parts.scheme == "http" and bool(parts.hostname) and is_loopback_host(parts.hostname)


def redirect_uri_matches(registered: tuple[str, ...], requested: str) -> bool:
    """Exact match, except that loopback http URIs match on any port (RFC 8252 §7.3)."""
    if requested in registered:
        return True
    if not is_loopback_redirect(requested):
        return False
    want = urlsplit(requested)
    # Only the port may differ: no fragment (RFC 6749 §3.1.2), no user information.
    if want.fragment or "#" in requested or want.username is not None or want.password is not None:
        return False
    for candidate in registered:
        if not is_loopback_redirect(candidate):
            continue
        have = urlsplit(candidate)
        if (have.hostname, have.path, have.query) == (want.hostname, want.path, want.query):
            return True
    return False


def redirect_host(uri: str) -> str:
    """What the consent page shows the user as the destination of the code: the host in the
    ASCII form the browser will go to (a client registered before non-ASCII URIs were
    refused may still hold a Unicode host: it is shown as its xn-- A-label)."""
    parts = _split(uri)
    if parts is None:
        return quote(uri, safe=":/")
    if parts.scheme in ("http", "https"):
        return _display_host(parts.hostname) if parts.hostname else quote(uri, safe=":/")
    netloc = quote(parts.netloc, safe=":@[]") if not parts.netloc.isascii() else parts.netloc
    return f"{parts.scheme}://{netloc}" if parts.netloc else f"{parts.scheme}:"
