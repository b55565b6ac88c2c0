"""Client metadata (RFC 7591 §2): what a registration or a client ID metadata document may
say, normalised into the fields of a Client record."""

from __future__ import annotations

from services.authserver.redirect_uris import MAX_URI_LENGTH, _split, _text, check_redirect_uri
from services.common.errors import InvalidClientMetadata, InvalidRedirectUri, OAuthError

AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post")
MAX_REDIRECT_URIS = 20


def _optional_string(metadata: dict, name: str, limit: int = 1000) -> str:
    value = metadata.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidClientMetadata(f"{name} must be a string of at most {limit} characters")
    return _text(value, name, limit)


def _optional_url(metadata: dict, name: str) -> str:
    value = _optional_string(metadata, name, MAX_URI_LENGTH)
    parts = _split(value)
    if value and (parts is None or parts.scheme not in ("http", "https")):
        raise InvalidClientMetadata(f"{name} must be an http(s) URL")
    return value


def validate_metadata(metadata: object, *, for_cimd: bool = False) -> dict:
    """Normalise RFC 7591 client metadata; raise an OAuthError for what cannot be registered."""
    if not isinstance(metadata, dict):
        raise InvalidClientMetadata("the body must be a JSON object")
    uris = metadata.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise InvalidRedirectUri("redirect_uris must be a non-empty array")
    if len(uris) > MAX_REDIRECT_URIS:
        raise InvalidRedirectUri(f"at most {MAX_REDIRECT_URIS} redirect URIs")
    checked = []
    for index, uri in enumerate(uris):
        try:
            checked.append(check_redirect_uri(uri))
        except OAuthError as exc:  # which one, by position: the URI itself is not echoed
            raise type(exc)(f"redirect_uris[{index}]: {exc.description}", exc.status) from None
    redirect_uris = tuple(dict.fromkeys(checked))

    default_method = "none" if for_cimd else "client_secret_basic"  # RFC 7591 §2 default
    method = metadata.get("token_endpoint_auth_method", default_method)
    if for_cimd and method != "none":
        raise InvalidClientMetadata(
            "a client ID metadata document must use token_endpoint_auth_method none",
        )
    if method not in AUTH_METHODS:
        raise InvalidClientMetadata(
            f"token_endpoint_auth_method must be one of {', '.join(AUTH_METHODS)}",
        )
    if for_cimd and ("client_secret" in metadata or "client_secret_expires_at" in metadata):
        raise InvalidClientMetadata("a metadata document must not carry a secret")

    grant_types = metadata.get("grant_types", ["authorization_code"])
    if not isinstance(grant_types, list) or not all(isinstance(g, str) for g in grant_types):
        raise InvalidClientMetadata("grant_types must be an array of strings")
    unsupported = set(grant_types) - {"authorization_code", "refresh_token"}
    if unsupported or "authorization_code" not in grant_types:
        raise InvalidClientMetadata(
            "grant_types must include authorization_code and may add refresh_token only",
        )
    response_types = metadata.get("response_types", ["code"])
    if response_types != ["code"]:
        raise InvalidClientMetadata('response_types must be ["code"]')
    application_type = metadata.get("application_type", "web")
    if application_type not in ("web", "native"):
        raise InvalidClientMetadata("application_type must be web or native")
    contacts = metadata.get("contacts", [])
    if not isinstance(contacts, list) or not all(isinstance(c, str) for c in contacts):
        raise InvalidClientMetadata("contacts must be an array of strings")
    contacts = [_text(c, "contacts", 320) for c in contacts[:10]]

    name = _optional_string(metadata, "client_name", 200).strip()
    if for_cimd and not name:
        raise InvalidClientMetadata("client_name is required")
    extra = {
        key: value
        for key in ("client_uri", "logo_uri", "tos_uri", "policy_uri")
        if (value := _optional_url(metadata, key))
    }
    extra.update(
        {
            key: value
            for key in ("software_id", "software_version")
            if (value := _optional_string(metadata, key, 200))
        }
    )
    if contacts:
        extra["contacts"] = contacts
    return {
        "client_name": name or "Unnamed client",
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": method,
        # A refresh token is always issued (some clients drop one they did not expect to
        # lose); registering the grant says so to the client.
        "grant_types": ("authorization_code", "refresh_token"),
        "response_types": ("code",),
        "application_type": application_type,
        "scope": _optional_string(metadata, "scope", 1000),
        "metadata": extra,
    }
