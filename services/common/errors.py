"""The gateway's expected errors, one hierarchy: services raise them, BaseHandler.write_error
renders them (an HTML page, an OAuth JSON body or the /api JSON shape) and keeps them out of
the traceback log. Nothing here knows Tornado."""

from __future__ import annotations


class GatewayError(Exception):
    """A refusal the caller is told about: `status`, a `message` safe to show, and the
    `title` a page shows above it."""

    status = 400
    title = "That did not work"

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


# ----------------------------------------------------------------- human pages


class PageError(GatewayError):
    """An error shown to the person on a page (status, title, message), never redirected
    to a client: a broken authorization request, a sign-in that cannot go on."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message, status)
        self.title = title


class RequestGone(PageError):
    """The parked request is unknown, used up or expired.

    A class, not a shared instance: raising one exception object again and again chains
    each raise's traceback onto it, and with it every frame (handler, request) it passed
    through, so memory grew with every unauthenticated `/authorize/consent?req=x`."""

    def __init__(self) -> None:
        super().__init__(400, "This sign-in request has expired", "Go back to your application and connect again.")


class IdentityError(GatewayError):
    """The IdP could not sign the user in; the message is safe to show. `status` is the
    HTTP status the page answers with: 504 when the IdP did not answer in time. Sign-in
    turns it into a PageError."""

    status = 502


# ------------------------------------------------------------------ OAuth (RFC 6749)


class OAuthError(GatewayError):
    """An RFC 6749 / 7591 error: the class carries its `error` code, `description` becomes
    error_description (within RFC 6749 §5.2's charset, handlers.base.error_description)
    and `headers` (Retry-After, ...) go onto the response."""

    error = "invalid_request"
    _by_code: dict[str, type[OAuthError]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "error" in cls.__dict__:
            OAuthError._by_code.setdefault(cls.error, cls)

    def __init__(self, description: str, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(description, status)
        self.headers = dict(headers or {})

    @property
    def description(self) -> str:
        return self.message

    @staticmethod
    def of(error: str, description: str, status: int | None = None) -> OAuthError:
        """The error of class `error` (a code chosen at run time)."""
        return OAuthError._by_code[error](description, status)


class InvalidRequest(OAuthError):
    error = "invalid_request"


class InvalidClient(OAuthError):
    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class InvalidTarget(OAuthError):
    error = "invalid_target"  # RFC 8707


class AccessDenied(OAuthError):
    error = "access_denied"


class UnsupportedResponseType(OAuthError):
    error = "unsupported_response_type"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class InvalidClientMetadata(OAuthError):
    error = "invalid_client_metadata"  # RFC 7591


class InvalidRedirectUri(OAuthError):
    error = "invalid_redirect_uri"  # RFC 7591


class SlowDown(OAuthError):
    error = "slow_down"
    status = 429


class ServerError(OAuthError):
    error = "server_error"
    status = 500


class BadRequest(InvalidRequest):
    """Malformed input found while parsing a request (body, query): invalid_request at an
    OAuth endpoint, a "Bad request" page, the /api 400."""


# ----------------------------------------------------- dashboard pages and /api


class ApiError(GatewayError):
    """A dashboard operation refused: a page shows `title` and the message, /api answers
    {"error": code, "error_description": message}."""

    code = "invalid_request"


class NotSignedIn(ApiError):
    status, code, title = 401, "not_signed_in", "Please sign in"


class Forbidden(ApiError):
    status, code, title = 403, "forbidden", "Not allowed"


class NotFound(ApiError):
    status, code, title = 404, "not_found", "Not found"


class FieldErrors(ApiError):
    """Form input that cannot be used: {field: message}."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


class InvalidInput(ValueError):
    """A value from outside that cannot be used; the message says which and why, `field`
    names the input it came from (a form field, a JSON member) when the caller knows it.
    Not rendered itself: each edge turns it into its own family (FieldErrors,
    InvalidClientMetadata, a PageError, the CLI's message)."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field
