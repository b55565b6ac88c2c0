"""Property-based fuzz (hypothesis), bounded and reproducible: every OAuth endpoint over
HTTP against one real gateway process signing in at the real OIDC provider, and the
JSON-RPC / SSE parsers of services/proxy/protocol/ called directly.

Over HTTP: never a 5xx; every 4xx body is spec-shaped for its endpoint (RFC 6749 / 7591 /
7009 JSON `error` + `error_description`, an HTML page for the browser pages); redirects
stay on the gateway, go to the identity provider, or to a redirect URI the named client
registered; and no traceback reaches the gateway's log (checked after every example).
The parsers: no exception but the documented ones, and SSE framing independent of where
the stream was split.

Settings are fixed (derandomized, no example database, a set number of examples, no
deadline), so a run is the same run everywhere.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.proxy.protocol import eras, jsonrpc
from services.proxy.protocol.jsonrpc import ProtocolError
from services.proxy.protocol.sse import SseParser
from tests.support.faults import XSRF, idp_sign_in, with_xsrf
from tests.support.gateway import GatewayProcess
from tests.support.tokens import REDIRECT, pkce

FUZZ = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "print_blob": False,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
HTTP_EXAMPLES = 120  # per HTTP property; about 10 ms each against a warm gateway
PARSER_EXAMPLES = 400

USER = {"sub": "fuzz-user", "email": "fuzz.user@example.com", "email_verified": True, "name": "Fuzz"}
SERVER_ID = "srv_fuzz"

# ---------------------------------------------------------------------- strategies

# Text as an attacker writes it: any code point, lone surrogates and controls included.
ODD_CHARS = st.sampled_from(["\ud800", "\udfff", "\udbff", "\udc00", "\x00", "\x1f", "\x7f", "\t", "\r", "\n",
                             "\u2028", "\ufeff", "\u202e", "%", "&", "=", "+", "#", "/", "\\", "\"", "'",
                             "<", ">", ":", "\U0010ffff", "\x85"])
ANY_CHAR = st.one_of(st.characters(codec=None, exclude_categories=()), ODD_CHARS)
# Lists joined, not st.text: text() merges its alphabet into one character set, and that
# merge drops the surrogates again.
# A fuzzing dictionary: values that broke parsers somewhere before, drawn as often as random text.
ODD_STRINGS = st.sampled_from(["\ud800", "x\ud800y", "\udfff\ud800", "\x00", "a\r\nb", "\r\n\r\n", "\t",
                               "%00", "%0d%0a", "%ud800", "\\u0000", "../../", "${jndi:x}", "<script>", "\u202e",
                               "\ufeff", "\U0001f600" * 3, "9" * 400, "-1", "1e400", "NaN", "null", "[]", "{}",
                               "=?base64?AA==?=", "x" * 3000])
TEXT = st.one_of(st.lists(ANY_CHAR, max_size=40).map("".join), ODD_STRINGS)
SHORT = st.one_of(st.lists(ANY_CHAR, max_size=8).map("".join), ODD_STRINGS)

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False), TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)),
    max_leaves=12,
)

LOOPBACK_URIS = st.sampled_from([REDIRECT, "http://127.0.0.1/cb", "http://localhost:3000/callback",
                                 "http://[::1]:8080/cb", "https://app.example.com/cb", "com.example.app:/cb",
                                 "javascript:alert(1)", "http://127.0.0.1:9/callback#frag", "data:text/html,x",
                                 "https://user:pw@example.com/cb", "http://127.0.0.1:99999/cb", ""])


def deep(depth: int, opener: str = "[", closer: str = "]", core: str = "1") -> str:
    return opener * depth + core + closer * depth


class Big(str):
    """A generated body too large to print: failing examples show how it was made."""

    def __new__(cls, recipe: str, text: str) -> Big:
        made = super().__new__(cls, text)
        made.recipe = recipe
        return made

    def __repr__(self) -> str:
        return self.recipe


def nested(depth: int, objects: bool = False, prefix: str = "", suffix: str = "") -> Big:
    core = '{"a":' * depth + "1" + "}" * depth if objects else deep(depth)
    return Big(f"nested({depth}, objects={objects}, prefix={prefix!r}, suffix={suffix!r})", prefix + core + suffix)


DEEP_JSON = st.builds(nested, st.integers(1, 30000), st.booleans())


def _field(valid, odd=JSON_VALUES):
    return st.one_of(valid, odd)


REGISTER_FIELDS = {
    "redirect_uris": _field(st.lists(st.one_of(LOOPBACK_URIS, TEXT), min_size=1, max_size=4)),
    "client_name": _field(TEXT),
    "token_endpoint_auth_method": _field(st.sampled_from(["none", "client_secret_basic",
                                                          "client_secret_post", "private_key_jwt"])),
    "grant_types": _field(st.lists(st.sampled_from(["authorization_code", "refresh_token", "implicit",
                                                    "client_credentials"]), max_size=3)),
    "response_types": _field(st.just(["code"])),
    "application_type": _field(st.sampled_from(["web", "native"])),
    "contacts": _field(st.lists(TEXT, max_size=3)),
    "scope": _field(TEXT),
    "client_uri": _field(LOOPBACK_URIS), "logo_uri": _field(LOOPBACK_URIS),
    "tos_uri": _field(LOOPBACK_URIS), "policy_uri": _field(LOOPBACK_URIS),
    "software_id": _field(TEXT), "software_version": _field(TEXT),
    "client_secret": _field(TEXT), "client_id": _field(TEXT), "jwks_uri": _field(LOOPBACK_URIS),
}
VALID_REGISTRATION = {"redirect_uris": [REDIRECT], "client_name": "fuzz", "token_endpoint_auth_method": "none"}

STRING_FIELDS = ["client_name", "scope", "software_id", "software_version", "client_uri", "logo_uri",
                 "tos_uri", "policy_uri", "token_endpoint_auth_method", "application_type"]


def _one_string_changed(name: str, text: str, where: str) -> str:
    body = {**VALID_REGISTRATION, "contacts": ["ops@example.com"]}
    if where == "field":
        body[name] = text
    elif where == "redirect":
        body["redirect_uris"] = [REDIRECT, text]
    else:
        body["contacts"] = [text]
    return json.dumps(body)


REGISTER_BODIES = st.one_of(
    # Half: a valid registration with one string changed to any text (surrogates, controls …).
    st.builds(_one_string_changed, st.sampled_from(STRING_FIELDS), TEXT,
              st.sampled_from(["field", "field", "field", "redirect", "contact"])),
    st.one_of(
        # A valid registration with one to three fields changed (to a valid or odd value of
        # that field, any text, or any JSON), so that most bodies get past the first check.
        st.builds(lambda changes: {**VALID_REGISTRATION, **changes}, st.dictionaries(
            st.one_of(st.sampled_from(sorted(REGISTER_FIELDS)), TEXT),
            st.one_of(TEXT, st.lists(TEXT, max_size=3), st.sampled_from(sorted(REGISTER_FIELDS)).flatmap(
                REGISTER_FIELDS.__getitem__), JSON_VALUES),
            min_size=1, max_size=3)).map(json.dumps),
        # Every field drawn, none assumed.
        st.fixed_dictionaries({}, optional=REGISTER_FIELDS).map(json.dumps),
        JSON_VALUES.map(json.dumps),
        DEEP_JSON,
        st.builds(lambda d: nested(d, prefix='{"redirect_uris":["' + REDIRECT + '"],"client_name":', suffix="}"),
                  st.integers(1, 30000)),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    ),
)

FORM_NAMES = st.sampled_from(["grant_type", "code", "code_verifier", "redirect_uri", "client_id",
                              "client_secret", "refresh_token", "scope", "resource", "token",
                              "token_type_hint", "state"])


def form_encode(pairs: list[tuple[str, str]]) -> bytes:
    """urlencoded as a client would, surrogates passed through as (invalid) UTF-8."""
    def enc(text: str) -> str:
        return quote(text.encode("utf-8", "surrogatepass"), safe="")
    return "&".join(f"{enc(k)}={enc(v)}" for k, v in pairs).encode("ascii")


HEADER_TEXT = st.text(st.characters(codec="latin-1", exclude_categories=("Cc",)), max_size=60).map(
    lambda s: s.strip(" \t"))


def basic(raw: bytes) -> bytes:
    return b"Basic " + base64.b64encode(raw)


# ----------------------------------------------------------------------- the gateway


class Target:
    """The fuzzed gateway and what the examples draw on (live clients and tokens)."""

    def __init__(self, gw: GatewayProcess, idp_issuer: str, public_client: str, confidential_client: str,
                 confidential_secret: str, refresh_token: str, access_token: str, signed_in: httpx.Cookies,
                 http: httpx.Client) -> None:
        self.gw, self.idp_issuer, self.http = gw, idp_issuer, http
        self.public_client, self.confidential_client = public_client, confidential_client
        self.confidential_secret = confidential_secret
        self.refresh_token, self.access_token = refresh_token, access_token
        self.signed_in = signed_in
        self.log_offset = 0
        self.addresses = 0

    def __repr__(self) -> str:  # hypothesis prints the fixture with every failing example
        return f"Target({self.gw.url})"

    @property
    def log_path(self) -> Path:
        return self.gw.state_dir / f"gateway-{self.gw.port}.log"

    def forwarded(self) -> dict[str, str]:
        """A fresh client address per request (MCPGW_TRUST_FORWARDED): the fuzz measures
        the endpoints, not the rate limits in front of them."""
        self.addresses += 1
        n = self.addresses
        return {"X-Forwarded-For": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"}

    def new_log(self) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(self.log_offset)
            text = log.read().decode("utf-8", "replace")
        self.log_offset += len(text.encode("utf-8", "replace"))
        return text

    def assert_log_clean(self) -> None:
        text = self.new_log()
        assert "Traceback" not in text, text[max(0, text.index("Traceback") - 500):][:4000]

    @contextmanager
    def checked(self):
        """One example: its own log lines, always consumed, must hold no traceback (when
        the example already failed, that failure is the report)."""
        try:
            yield
        except BaseException:
            self.new_log()
            raise
        self.assert_log_clean()


def _authorize_query(client_id: str, challenge: str, **extra: str) -> dict[str, str]:
    return {"response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT, "state": "s",
            "code_challenge": challenge, "code_challenge_method": "S256", **extra}


@pytest.fixture(scope="module")
def target(idp, tmp_path_factory):
    gw = GatewayProcess(tmp_path_factory.mktemp("fuzz"), idp=idp, extra_env={"MCPGW_TRUST_FORWARDED": "1"})
    gw.use_idp_client(idp)
    gw.start()
    try:
        gw.add_server("http://127.0.0.1:9/mcp", USER["email"], "Fuzz", "--id", SERVER_ID)
        idp.set_user(USER["sub"], email=USER["email"], email_verified=True, name=USER["name"])
        with httpx.Client(base_url=gw.url, trust_env=False, timeout=30) as http:
            public = http.post("/register", json={"client_name": "fuzz public", "redirect_uris": [REDIRECT],
                                                  "token_endpoint_auth_method": "none"})
            confidential = http.post("/register", json={"client_name": "fuzz confidential",
                                                        "redirect_uris": [REDIRECT],
                                                        "token_endpoint_auth_method": "client_secret_basic"})
            assert public.status_code == 201 and confidential.status_code == 201, (public.text, confidential.text)
            # One real sign-in (its cookie is reused by half the browser-page examples) and
            # one real authorization, for a live refresh token and access token.
            browser = with_xsrf(httpx.Client(trust_env=False, timeout=30))
            signed = idp_sign_in(browser, gw.url, USER["sub"])
            assert signed.status_code == 302, signed.text
            verifier, challenge = pkce()
            query = _authorize_query(public.json()["client_id"], challenge,
                                     resource=f"{gw.url}/mcp/{SERVER_ID}")
            to_consent = browser.get(gw.url + "/authorize", params=query)
            assert to_consent.status_code == 302, to_consent.text
            consent_url = urljoin(gw.url, to_consent.headers["location"])
            req = parse_qs(urlsplit(consent_url).query)["req"][0]
            assert browser.get(consent_url).status_code == 200
            approved = browser.post(gw.url + "/authorize/consent",
                                    data={"req": req, "decision": "approve", "_xsrf": XSRF})
            code = parse_qs(urlsplit(approved.headers["location"]).query)["code"][0]
            tokens = http.post("/token", data={"grant_type": "authorization_code", "code": code,
                                               "code_verifier": verifier, "redirect_uri": REDIRECT,
                                               "client_id": public.json()["client_id"]})
            assert tokens.status_code == 200, tokens.text
            target = Target(gw, idp.issuer, public.json()["client_id"], confidential.json()["client_id"],
                            confidential.json()["client_secret"], tokens.json()["refresh_token"],
                            tokens.json()["access_token"], httpx.Cookies(browser.cookies), http)
            browser.close()
            target.assert_log_clean()
            yield target
    finally:
        gw.stop()


RAW = httpx.HTTPTransport()


def send(client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
    """One request with `client`'s cookies, its Set-Cookie kept, and no redirect handling
    at all: httpx refuses a Location with control characters even when not following
    it, and that Location is exactly what the browser-page properties inspect."""
    request = client.build_request(method, url, **kwargs)
    response = RAW.handle_request(request)
    response.request = request
    response.read()
    client.cookies.extract_cookies(response)
    return response


def logged(test):
    """Run an HTTP example inside `Target.checked` (below @given, so per example)."""
    @functools.wraps(test)
    def run(target, **drawn):
        with target.checked():
            test(target, **drawn)
    return run


# ------------------------------------------------------------------ response shapes

ERROR_CODE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §5.2 error charset
REGISTER_ERRORS = {"invalid_redirect_uri", "invalid_client_metadata", "invalid_software_statement",
                   "unapproved_software_statement", "invalid_request", "slow_down"}
TOKEN_ERRORS = {"invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
                "unsupported_grant_type", "invalid_scope", "invalid_target", "slow_down"}
REVOKE_ERRORS = TOKEN_ERRORS | {"unsupported_token_type"}


def oauth_json(response: httpx.Response, allowed: set[str]) -> dict | None:
    """Not a 5xx; a 4xx is an RFC 6749-shaped JSON error with a code from `allowed`."""
    assert response.status_code < 500, (response.status_code, response.text[:1000])
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", "").startswith("application/json"), (
        response.status_code, response.headers, response.text[:500])
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and ERROR_CODE.match(body["error"]), body
    assert body["error"] in allowed, body
    assert isinstance(body.get("error_description"), str), body
    return body


def html_page(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:1000])
    if response.status_code in (301, 302, 303, 307, 308):
        assert response.headers.get("location"), response.headers
        return
    assert response.headers.get("content-type", "").startswith("text/html"), (
        response.status_code, response.headers, response.text[:300])
    assert "<html" in response.text.lower(), response.text[:300]


def browser_destination(location: str, base: str) -> str:
    """Where a browser goes for this Location: tab, CR and LF are dropped from URLs and
    leading/trailing controls and spaces trimmed (WHATWG URL), and a backslash counts as
    a slash for http(s)."""
    cleaned = re.sub(r"[\t\n\r]", "", location).strip("\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0b\x0c\x0e\x0f"
                                                      "\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b"
                                                      "\x1c\x1d\x1e\x1f ")
    return urljoin(base + "/", cleaned.replace("\\", "/"))


def same_origin(url: str, base: str) -> bool:
    left, right = urlsplit(url), urlsplit(base)
    return (left.scheme, left.netloc) == (right.scheme, right.netloc)


def to_registered_redirect(url: str) -> bool:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" == REDIRECT


# ------------------------------------------------------------------ OAuth endpoints


@settings(max_examples=2 * HTTP_EXAMPLES, **FUZZ)
@given(body=REGISTER_BODIES, content_type=st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                            "text/plain", "application/x-www-form-urlencoded"]))
@example(body='{"redirect_uris":["' + REDIRECT + '"],"client_name":"x\\ud800y"}', content_type="application/json")
@example(body=nested(100000), content_type="application/json")
@example(body=Big("a 70,000-character client_name", '{"redirect_uris":["' + REDIRECT + '"],"client_name":"'
                  + "x" * 70000 + '"}'), content_type="application/json")
@logged
def test_register_fuzz(target, body, content_type):
    response = target.http.post("/register", content=body.encode("utf-8", "surrogatepass"),
                                headers={"Content-Type": content_type, **target.forwarded()})
    answer = oauth_json(response, REGISTER_ERRORS)
    if response.status_code < 400:
        assert response.status_code == 201, response.text
        registered = response.json()
        assert isinstance(registered["client_id"], str) and registered["redirect_uris"], registered
        assert "no-store" in response.headers.get("cache-control", "")  # it may carry a client secret
    if answer is not None and response.status_code == 401:
        raise AssertionError(f"/register never needs client authentication: {answer}")


def _authorization(target: Target, kind: str, raw: bytes, text: str) -> bytes | None:
    """An Authorization header of the drawn kind (HTTP allows no whitespace at either end)."""
    value = {
        "none": None,
        "basic-raw": basic(raw),
        "basic-public": basic(f"{target.public_client}:{text}".encode("utf-8", "surrogatepass")),
        "basic-confidential": basic(f"{target.confidential_client}:{target.confidential_secret}".encode()),
        "basic-text": b"Basic " + text.encode("latin-1", "replace"),
        "bearer": b"Bearer " + target.access_token.encode(),
        "other": text.encode("latin-1", "replace"),
    }[kind]
    return value.strip(b" \t") or None if value is not None else None


TOKEN_FORMS = st.lists(st.tuples(st.one_of(FORM_NAMES, SHORT), st.one_of(
    TEXT, st.sampled_from(["authorization_code", "refresh_token", "client_credentials", "S256", REDIRECT,
                           "mcp:connect mcp:invoke", "openid", "access_token", "refresh_token"]),
    st.sampled_from(["@public", "@confidential", "@secret", "@refresh", "@access", "@resource"]))), max_size=8)


def _fill(target: Target, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    known = {"@public": target.public_client, "@confidential": target.confidential_client,
             "@secret": target.confidential_secret, "@refresh": target.refresh_token,
             "@access": target.access_token, "@resource": f"{target.gw.url}/mcp/{SERVER_ID}"}
    return [(k, known.get(v, v)) for k, v in pairs]


@settings(max_examples=HTTP_EXAMPLES, **FUZZ)
@given(pairs=TOKEN_FORMS, raw_body=st.one_of(st.none(), st.binary(max_size=120)),
       content_type=st.sampled_from(["application/x-www-form-urlencoded",
                                     "application/x-www-form-urlencoded; charset=utf-8",
                                     "application/json", "multipart/form-data", ""]),
       auth_kind=st.sampled_from(["none", "basic-raw", "basic-public", "basic-confidential", "basic-text",
                                  "bearer", "other"]),
       auth_raw=st.binary(max_size=40), auth_text=HEADER_TEXT)
@logged
def test_token_fuzz(target, pairs, raw_body, content_type, auth_kind, auth_raw, auth_text):
    body = raw_body if raw_body is not None else form_encode(_fill(target, pairs))
    headers = {"Content-Type": content_type, **target.forwarded()}
    authorization = _authorization(target, auth_kind, auth_raw, auth_text)
    if authorization is not None:
        headers["Authorization"] = authorization
    response = target.http.post("/token", content=body, headers=headers)
    answer = oauth_json(response, TOKEN_ERRORS)
    if answer is None:
        assert response.status_code == 200 and response.json()["token_type"].lower() == "bearer", response.text
        assert "no-store" in response.headers.get("cache-control", "")  # RFC 6749 §5.1
    elif response.status_code == 401 and authorization is not None:
        assert "www-authenticate" in response.headers  # RFC 6749 §5.2


@settings(max_examples=HTTP_EXAMPLES, **FUZZ)
@given(pairs=TOKEN_FORMS, raw_body=st.one_of(st.none(), st.binary(max_size=120)),
       content_type=st.sampled_from(["application/x-www-form-urlencoded", "application/json", ""]),
       auth_kind=st.sampled_from(["none", "basic-raw", "basic-public", "basic-confidential", "basic-text",
                                  "bearer", "other"]),
       auth_raw=st.binary(max_size=40), auth_text=HEADER_TEXT)
@logged
def test_revoke_fuzz(target, pairs, raw_body, content_type, auth_kind, auth_raw, auth_text):
    # Never revoke the live refresh token: the /token fuzz keeps using it.
    pairs = [(k, v) for k, v in pairs if v != "@refresh"]
    body = raw_body if raw_body is not None else form_encode(_fill(target, pairs))
    headers = {"Content-Type": content_type, **target.forwarded()}
    authorization = _authorization(target, auth_kind, auth_raw, auth_text)
    if authorization is not None:
        headers["Authorization"] = authorization
    response = target.http.post("/revoke", content=body, headers=headers)
    answer = oauth_json(response, REVOKE_ERRORS)
    if answer is None:
        assert response.status_code == 200, response.text
    elif response.status_code == 401 and authorization is not None:
        assert "www-authenticate" in response.headers


@settings(max_examples=60, **FUZZ)
@given(endpoint=st.sampled_from(["/token", "/revoke", "/register"]), name=SHORT, value=TEXT)
@example(endpoint="/revoke", name="\x1f", value="")
@logged
def test_error_descriptions_stay_in_the_rfc_6749_charset(target, endpoint, name, value):
    """RFC 6749 section 5.2: error_description is %x20-21 / %x23-5B / %x5D-7E only, so no
    request input (control characters, non-ASCII, quotes) may be echoed into it as is."""
    if endpoint == "/register":
        response = target.http.post("/register", content=json.dumps({"redirect_uris": [value + name]}),
                                    headers={"Content-Type": "application/json", **target.forwarded()})
        allowed = REGISTER_ERRORS
    else:
        response = target.http.post(endpoint, content=form_encode([(name, value), (name, value)]),
                                    headers={"Content-Type": "application/x-www-form-urlencoded",
                                             **target.forwarded()})
        allowed = REVOKE_ERRORS
    body = oauth_json(response, allowed)
    if body is not None:
        assert ERROR_CODE.match(body["error_description"]), body


AUTHORIZE_NAMES = st.sampled_from(["response_type", "client_id", "redirect_uri", "state", "code_challenge",
                                   "code_challenge_method", "scope", "resource", "prompt", "nonce",
                                   "login_hint", "request", "request_uri", "response_mode"])
AUTHORIZE_VALUES = st.one_of(TEXT, st.sampled_from(
    ["code", "token", "S256", "plain", "none", "login", "consent", "select_account", "none login",
     "mcp:connect", "mcp:invoke openid", "@public", "@confidential", "@challenge", "@resource", REDIRECT,
     "http://127.0.0.1:9/callback/../x", "http://127.0.0.1:9/callback?x=1", "x" * 2001]))


def _query(pairs: list[tuple[str, str]]) -> str:
    return form_encode(pairs).decode("ascii")


@settings(max_examples=HTTP_EXAMPLES, **FUZZ)
@given(pairs=st.lists(st.tuples(st.one_of(AUTHORIZE_NAMES, SHORT), AUTHORIZE_VALUES), max_size=10),
       base=st.booleans(), signed_in=st.booleans(), follow=st.booleans())
@logged
def test_authorize_fuzz(target, pairs, base, signed_in, follow):
    _, challenge = pkce()
    known = {"@public": target.public_client, "@confidential": target.confidential_client,
             "@challenge": challenge, "@resource": f"{target.gw.url}/mcp/{SERVER_ID}"}
    pairs = [(k, known.get(v, v)) for k, v in pairs]
    if base:  # start from a valid request and let the drawn pairs add to it or repeat it
        pairs = list(_authorize_query(target.public_client, challenge).items()) + pairs
    with httpx.Client(base_url=target.gw.url, trust_env=False, timeout=30,
                      cookies=target.signed_in if signed_in else None) as browser:
        response = send(browser, "GET", "/authorize?" + _query(pairs))
        html_page(response)
        if response.is_redirect:
            destination = browser_destination(response.headers["location"], target.gw.url)
            if same_origin(destination, target.gw.url):
                assert urlsplit(destination).path in ("/login", "/authorize/consent"), destination
                if follow:
                    html_page(send(browser, "GET", destination))
            else:
                # Only to the redirect URI the named client registered, with iss (RFC 9207).
                assert to_registered_redirect(destination), destination
                assert parse_qs(urlsplit(destination).query).get("iss") == [target.gw.url], destination


@settings(max_examples=HTTP_EXAMPLES, **FUZZ)
@given(req=st.one_of(TEXT, st.just("@real")), decision=st.one_of(TEXT, st.sampled_from(["approve", "deny"])),
       method=st.sampled_from(["GET", "POST"]), signed_in=st.booleans(), xsrf=st.booleans(),
       extra=st.lists(st.tuples(SHORT, TEXT), max_size=3))
@logged
def test_consent_fuzz(target, req, decision, method, signed_in, xsrf, extra):
    with httpx.Client(base_url=target.gw.url, trust_env=False, timeout=30,
                      cookies=target.signed_in if signed_in else None) as browser:
        if req == "@real":
            _, challenge = pkce()
            started = send(browser, "GET", "/authorize", params=_authorize_query(target.public_client, challenge))
            assert started.status_code == 302, started.text
            found = parse_qs(urlsplit(started.headers["location"]).query)
            req = found["req"][0] if "req" in found else parse_qs(urlsplit(found["next"][0]).query)["req"][0]
        pairs = [("req", req), ("decision", decision), *extra]
        if method == "GET":
            response = send(browser, "GET", "/authorize/consent?" + _query(pairs))
        else:
            if xsrf:
                with_xsrf(browser)
                pairs.append(("_xsrf", XSRF))
            response = send(browser, "POST", "/authorize/consent", content=form_encode(pairs),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        html_page(response)
        if response.is_redirect:
            destination = browser_destination(response.headers["location"], target.gw.url)
            assert same_origin(destination, target.gw.url) or to_registered_redirect(destination), destination


@settings(max_examples=40, **FUZZ)
@given(next_path=st.one_of(TEXT, st.builds(lambda a, b: a + b, st.sampled_from(
    ["/", "//", "/\t/", "/\\", "\\\\", "/%09/", "https://evil.example", "/\r\n", "/dashboard", " /", "\x00/",
     "/.//", "http:/", "/\u3002"]), TEXT)))
@example(next_path="/\t/evil.example/")
@example(next_path="/x\r\nSet-Cookie: a=b")
@logged
def test_login_next_fuzz(target, next_path):
    """The whole sign-in: /login?next=… → the IdP's form → /oauth/callback → only ever a
    same-origin destination."""
    with httpx.Client(trust_env=False, timeout=30) as browser:
        started = send(browser, "GET", target.gw.url + "/login?" + _query([("next", next_path)]))
        html_page(started)
        if started.is_redirect:
            at_idp = started.headers["location"]
            assert at_idp.startswith(target.idp_issuer + "/"), at_idp
            decided = send(browser, "POST", at_idp, data={"sub": USER["sub"]})
            assert decided.status_code == 302, decided.text[:500]
            finished = send(browser, "GET", decided.headers["location"])
            html_page(finished)
            if finished.is_redirect:
                destination = browser_destination(finished.headers["location"], target.gw.url)
                assert same_origin(destination, target.gw.url), (next_path, finished.headers["location"])


@settings(max_examples=HTTP_EXAMPLES, **FUZZ)
@given(state=st.one_of(TEXT, st.just("@real")), code=TEXT, error=st.one_of(st.none(), TEXT),
       extra=st.lists(st.tuples(SHORT, TEXT), max_size=3))
@logged
def test_callback_fuzz(target, state, code, error, extra):
    """/oauth/callback with any state, code and error. With a live state and a made-up
    code the IdP refuses the exchange: the one 5xx this page may answer is then 502
    (the gateway's upstream refused), as a page."""
    with httpx.Client(trust_env=False, timeout=30) as browser:
        live = state == "@real"
        if live:
            started = send(browser, "GET", target.gw.url + "/login", params={"next": "/dashboard"})
            state = parse_qs(urlsplit(started.headers["location"]).query)["state"][0]
        pairs = [("state", state), ("code", code), *extra]
        if error is not None:
            pairs.append(("error", error))
        response = send(browser, "GET", target.gw.url + "/oauth/callback?" + _query(pairs))
        # What the handler sees: Tornado drops C0 controls from arguments and strips them.
        seen_error, seen_code = (re.sub(r"[\x00-\x08\x0e-\x1f]", "", v or "").strip() for v in (error, code))
        if live and not seen_error and seen_code and response.status_code == 502:
            assert response.headers["content-type"].startswith("text/html") and "<html" in response.text.lower()
        else:
            html_page(response)
        if response.is_redirect:
            destination = browser_destination(response.headers["location"], target.gw.url)
            assert same_origin(destination, target.gw.url), destination


WELL_KNOWN = ["/.well-known/oauth-authorization-server", "/.well-known/openid-configuration",
              "/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp",
              f"/.well-known/oauth-protected-resource/mcp/{SERVER_ID}", "/jwks.json"]


@settings(max_examples=HTTP_EXAMPLES, **FUZZ)
@given(path=st.one_of(st.sampled_from(WELL_KNOWN), st.builds(
           lambda prefix, tail: prefix + quote(tail.encode("utf-8", "surrogatepass"), safe="/"),
           st.sampled_from(["/.well-known/", "/.well-known/oauth-protected-resource/mcp/",
                            "/.well-known/oauth-authorization-server/", "/.well-known/oauth-protected-resource/"]),
           TEXT)),
       query=st.lists(st.tuples(SHORT, TEXT), max_size=3), method=st.sampled_from(["GET", "HEAD", "OPTIONS", "POST"]))
@logged
def test_well_known_fuzz(target, path, query, method):
    url = path + ("?" + _query(query) if query else "")
    response = target.http.request(method, url, headers={"Origin": "https://evil.example"})
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if method == "GET" and path in WELL_KNOWN:
        assert response.status_code == 200, response.text
        document = response.json()
        if "issuer" in document:
            assert document["issuer"] == target.gw.url
        elif "resource" in document:
            assert document["resource"].startswith(target.gw.url + "/mcp/")
        else:
            assert isinstance(document["keys"], list) and document["keys"]
    elif method == "GET" and path.startswith("/.well-known/oauth-protected-resource/mcp/") and \
            response.status_code == 404:
        oauth_json(response, {"not_found", "invalid_request"})


def test_the_gateway_log_has_no_traceback_after_the_fuzz(target):
    """Anything logged after the last example (background work such as usage flushes)."""
    import time

    time.sleep(1.5)
    target.assert_log_clean()
    assert target.gw._process.poll() is None, "the gateway died during the fuzz"


# ---------------------------------------------------------------- protocol parsers

RPC_METHODS = st.one_of(st.sampled_from(["initialize", "tools/call", "tools/list", "prompts/get", "resources/read",
                                         "resources/subscribe", "tasks/get", "completion/complete", "ping",
                                         "notifications/initialized", "server/discover", "logging/setLevel",
                                         "", "x/list"]), TEXT)
RPC_IDS = st.one_of(st.integers(-(2**70), 2**70), TEXT, st.none(), st.booleans(), st.floats(), st.lists(st.integers(),
                                                                                                        max_size=2))
RPC_PARAMS = st.one_of(JSON_VALUES, st.fixed_dictionaries({}, optional={
    "name": JSON_VALUES, "uri": JSON_VALUES, "taskId": JSON_VALUES, "protocolVersion": JSON_VALUES,
    "ref": st.one_of(JSON_VALUES, st.fixed_dictionaries({"type": st.sampled_from(["ref/prompt", "ref/resource"]),
                                                         "name": JSON_VALUES, "uri": JSON_VALUES})),
    "_meta": st.one_of(JSON_VALUES, st.fixed_dictionaries(
        {}, optional={"io.modelcontextprotocol/protocolVersion": st.one_of(
            st.sampled_from(["2026-07-28", "2025-11-25", "2025-03-26"]), JSON_VALUES)})),
}))
RPC_MESSAGES = st.fixed_dictionaries({}, optional={
    "jsonrpc": st.one_of(st.just("2.0"), JSON_VALUES), "method": RPC_METHODS, "id": RPC_IDS,
    "params": RPC_PARAMS, "result": JSON_VALUES, "error": st.one_of(JSON_VALUES, st.fixed_dictionaries(
        {"code": st.one_of(st.integers(), JSON_VALUES), "message": TEXT})),
})
RPC_BODIES = st.one_of(
    RPC_MESSAGES.map(json.dumps),
    st.lists(RPC_MESSAGES, max_size=4).map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.binary(max_size=200),
    DEEP_JSON,
    st.builds(lambda d: nested(d, prefix='{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t",'
                                        '"arguments":', suffix="}}"), st.integers(1, 100000)),
)
HEADER_NAMES = st.sampled_from(["MCP-Protocol-Version", "Mcp-Method", "Mcp-Name", "mcp-protocol-version",
                                "Mcp-Session-Id"])
HEADER_VALUES = st.one_of(TEXT, st.sampled_from(["2026-07-28", "2025-11-25", "tools/call", "=?base64?dA==?=",
                                                 "=?base64?!!?=", "=?base64?//8=?="]))


def _as_input(body: str | bytes) -> bytes | str:
    return body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body


@settings(max_examples=PARSER_EXAMPLES, **FUZZ)
@given(body=RPC_BODIES, headers=st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3),
       as_text=st.booleans())
@example(body=nested(100000), headers={}, as_text=False)
@example(body='{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x\\ud800y"}}', headers={},
         as_text=False)
def test_jsonrpc_request_parsing_raises_only_protocol_errors(body, headers, as_text):
    raw = _as_input(body)
    data = raw.decode("utf-8", "surrogatepass") if as_text and isinstance(body, str) else raw
    try:
        parsed = jsonrpc.parse_body(data)
    except ProtocolError as exc:
        assert exc.code in (jsonrpc.PARSE_ERROR, jsonrpc.INVALID_REQUEST, jsonrpc.INVALID_PARAMS)
        assert 400 <= exc.http_status < 500
        assert json.loads(exc.body())["error"]["code"] == exc.code
        parsed = None
    try:
        message = jsonrpc.parse_message(data)
    except ProtocolError:
        assert parsed is None, "parse_message refused what parse_body accepted"
        message = None
    if parsed is None:
        return
    assert message is not None
    assert parsed.scope in (jsonrpc.SCOPE_CONNECT, jsonrpc.SCOPE_INVOKE)
    assert eras.era_of(message, headers) in ("2025", "2026")
    for candidate in (parsed, message):
        try:
            eras.detect_era("POST", headers, candidate)
        except ProtocolError as exc:
            assert exc.code == jsonrpc.HEADER_MISMATCH
    try:
        eras.check_routing_headers(message, headers)
    except ProtocolError as exc:
        assert exc.code == jsonrpc.HEADER_MISMATCH and exc.http_status == 400


@settings(max_examples=PARSER_EXAMPLES, **FUZZ)
@given(data=st.one_of(RPC_BODIES.filter(lambda b: not (isinstance(b, str) and b.count("[") + b.count("{") > 900)),
                      st.lists(RPC_MESSAGES, max_size=3).map(json.dumps)),
       request_id=st.one_of(st.integers(), TEXT), as_text=st.booleans())
def test_response_outcome_never_raises(data, request_id, as_text):
    raw = _as_input(data)
    value = raw.decode("utf-8", "replace") if as_text else raw
    outcome = jsonrpc.response_outcome(value, request_id)
    assert outcome is None or isinstance(outcome, jsonrpc.Outcome)
    label = jsonrpc.outcome_of(value, request_id)
    assert label is None or isinstance(label, str)


@settings(max_examples=60, **FUZZ)
@given(depth=st.integers(1, 100000), wrapper=st.sampled_from(['{"jsonrpc":"2.0","id":1,"result":%s}',
                                                              '[{"jsonrpc":"2.0","id":1,"error":%s}]',
                                                              '{"id":1,"result":{"content":%s}}']),
       as_text=st.booleans())
@example(depth=100000, wrapper='{"jsonrpc":"2.0","id":1,"result":%s}', as_text=False)
def test_response_outcome_of_deeply_nested_answers_never_raises(depth, wrapper, as_text):
    """Issue 7 finding 15: 100,000 levels used to raise RecursionError here."""
    data = wrapper % deep(depth)
    value = data if as_text else data.encode()
    outcome = jsonrpc.response_outcome(value, 1)
    assert outcome is None or isinstance(outcome, jsonrpc.Outcome)


@settings(max_examples=PARSER_EXAMPLES, **FUZZ)
@given(value=st.one_of(TEXT, st.builds(lambda b: "=?base64?" + b + "?=", st.one_of(
    TEXT, st.binary(max_size=20).map(lambda b: base64.b64encode(b).decode())))))
def test_header_value_decoding_raises_only_value_error(value):
    try:
        decoded = eras.decode_header_value(value)
    except ValueError:
        return
    assert isinstance(decoded, str)


@settings(max_examples=PARSER_EXAMPLES, **FUZZ)
@given(code=st.integers(-(2**40), 2**40), message=TEXT, request_id=st.one_of(st.none(), st.integers(), TEXT),
       data=st.one_of(st.none(), JSON_VALUES))
def test_jsonrpc_error_bodies_are_json(code, message, request_id, data):
    body = json.loads(jsonrpc.jsonrpc_error(code, message, request_id, data=data))
    # (A surrogate pair written as two code units comes back as the one character it encodes.)
    assert body["jsonrpc"] == "2.0" and body["error"]["code"] == code
    assert body["id"] == json.loads(json.dumps(request_id))


SSE_PIECES = st.one_of(
    st.sampled_from([b"data:", b"data: ", b"id: ", b"id:\x00", b"event: ", b"retry: ", b"retry: 10", b":",
                     b": keepalive", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\r", b"\r\n\r\n", b" ", b"\xef\xbb\xbf",
                     b"\xff", b"\xc3", b"\x00", b'{"jsonrpc":"2.0","id":1,"result":{}}', b"data", b"x:y"]),
    st.binary(max_size=12),
)
SSE_STREAMS = st.lists(SSE_PIECES, max_size=40).map(b"".join)


def _events(stream: bytes, cuts: list[int], max_event_size: int | None = None):
    parser = SseParser(max_event_size=max_event_size)
    events = []
    start = 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        events += parser.feed(stream[start:cut])
        start = cut
    events += parser.flush()
    return events, parser.pending_bytes


@settings(max_examples=PARSER_EXAMPLES, **FUZZ)
@given(stream=SSE_STREAMS, cuts=st.lists(st.integers(0, 500), max_size=8))
@example(stream=b"data: a\r\rdata: b\r\n\r\n", cuts=[8, 9])
def test_sse_framing_does_not_depend_on_chunking(stream, cuts):
    whole, whole_pending = _events(stream, [])
    every_byte, byte_pending = _events(stream, list(range(len(stream))))
    assert every_byte == whole and byte_pending == whole_pending
    split, split_pending = _events(stream, [c for c in cuts if c <= len(stream)])
    assert split == whole and split_pending == whole_pending
    # The raw bytes relayed are the stream, byte for byte, with what is still pending.
    assert b"".join(event.raw for event in whole) + whole_pending == stream
    for event in whole:
        assert isinstance(event.data, str) and (event.retry is None or event.retry >= 0)


@settings(max_examples=PARSER_EXAMPLES, **FUZZ)
@given(stream=SSE_STREAMS, cuts=st.lists(st.integers(0, 500), max_size=8), limit=st.integers(0, 64))
def test_sse_parser_with_a_size_limit_raises_only_value_error(stream, cuts, limit):
    try:
        _events(stream, [c for c in cuts if c <= len(stream)], max_event_size=limit)
    except ValueError as exc:
        assert "larger than" in str(exc)

