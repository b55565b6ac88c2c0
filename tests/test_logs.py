"""Logs: the JSON and text formats (fuzzed with hypothesis), the request id (accepted, made,
echoed, replaced when hostile) and a real gateway's JSON log under real traffic."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
from urllib.parse import parse_qsl, urlsplit

import httpx
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from services.common.logs import (
    MAX_REQUEST_ID,
    JsonFormatter,
    TextFormatter,
    accept_request_id,
    request_id,
)
from tests.support.browser import ScriptedBrowser
from tests.support.gateway import ROOT
from tests.support.mcp_oauth import connect, make_oauth_rig, obtain_tokens

ALICE = {"sub": "alice-sub-logs", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ORIGIN = "https://app.example"
GENERATED_ID = re.compile(r"[0-9a-f]{16}")
SANE_ID = re.compile(r"[A-Za-z0-9._:+=/@-]{1,128}")


def record(message: object = "hello", args: tuple = (), level: int = logging.INFO, exc_info=None,
           **extra: object) -> logging.LogRecord:
    made = logging.getLogger("test.logs").makeRecord("test.logs", level, __file__, 1, message, args, exc_info)
    for key, value in extra.items():
        setattr(made, key, value)
    return made


def parse_line(line: str) -> dict:
    """One JSON log line, as a strict consumer reads it: one line, ASCII, valid UTF-8 text
    once decoded (no lone surrogate), a JSON object with the fixed fields."""
    assert "\n" not in line and "\r" not in line
    assert line.isascii()
    entry = json.loads(line)
    assert isinstance(entry, dict)
    json.dumps(entry, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    assert TIME.fullmatch(entry["time"]) and entry["level"] and entry["logger"] and isinstance(entry["pid"], int)
    assert isinstance(entry["message"], str)
    return entry


# ------------------------------------------------------------------------- formatter

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    any_text, st.binary(max_size=20), st.lists(st.integers(), max_size=3))
field_names = st.from_regex(r"[a-z][a-z_]{0,15}", fullmatch=True).filter(
    lambda n: n not in vars(logging.LogRecord("", 0, "", 0, "", None, None)) and n not in ("message", "asctime"))


@settings(max_examples=400, deadline=None)
@given(message=any_text, fields=st.dictionaries(field_names, scalars, max_size=6), rid=st.one_of(st.none(), any_text))
@example(message="a\udcff\n\x00\u2028\U0001f600b", rid="x\r\ny",
         fields={"user_sub": "\ud800", "n": float("nan"), "big": 10**5000, "items": ("\udfff", 1), "no": ""})
def test_json_line_survives_any_message_and_fields(message, fields, rid):
    """Control characters, lone surrogates, NaN, huge ints, bytes: always one valid line."""
    extra = dict(fields)
    if rid is not None:
        extra["request_id"] = rid
    entry = parse_line(JsonFormatter().format(record(message, **extra)))
    if not re.search("[\ud800-\udfff]", message) and len(message) <= 8192:
        assert entry["message"] == message
    for name, value in fields.items():
        if value is None or value == "":
            assert name not in entry  # unknown: absent, never null
        else:
            assert name in entry


@settings(max_examples=200, deadline=None)
@given(text=any_text)
def test_json_line_with_args_and_traceback_is_one_line(text):
    try:
        raise ValueError(text)
    except ValueError:
        made = record("failed on %s and %r", (text, text), level=logging.ERROR, exc_info=sys.exc_info())
    entry = parse_line(JsonFormatter().format(made))
    assert entry["level"] == "ERROR"
    assert "Traceback" in entry["exc_info"] and "ValueError" in entry["exc_info"]


@settings(max_examples=300, deadline=None)
@given(message=any_text, fields=st.dictionaries(field_names, scalars, max_size=4))
def test_text_line_cannot_be_split_by_a_value(message, fields):
    """Text format: a client-chosen value with CR/LF cannot start a forged line."""
    line = TextFormatter().format(record(message, **fields))
    assert "\n" not in line and "\r" not in line and "\u2028" not in line and "\u2029" not in line


def test_json_fields_and_request_id_from_the_context():
    token = request_id.set("req-ctx-1")
    try:
        line = JsonFormatter().format(record("call %s", ("x",), user_sub="u1", client_id="c1", server_id="srv_1",
                                             status=200, duration_ms=1.25, event="refresh_reuse", nothing=None))
    finally:
        request_id.reset(token)
    entry = parse_line(line)
    assert entry["message"] == "call x" and entry["request_id"] == "req-ctx-1"
    assert (entry["user_sub"], entry["client_id"], entry["server_id"]) == ("u1", "c1", "srv_1")
    assert entry["status"] == 200 and entry["duration_ms"] == 1.25 and entry["event"] == "refresh_reuse"
    assert "nothing" not in entry
    # Outside a request: no request_id field at all.
    assert "request_id" not in parse_line(JsonFormatter().format(record("idle")))
    # A field given on the record wins over the context (the access log runs after finish()).
    token = request_id.set("other")
    try:
        assert parse_line(JsonFormatter().format(record("x", request_id="own")))["request_id"] == "own"
    finally:
        request_id.reset(token)


def test_text_line_shows_the_request_id_and_fields():
    token = request_id.set("req-text-1")
    try:
        line = TextFormatter().format(record("refused", event="access_denied", user_sub="a b"))
    finally:
        request_id.reset(token)
    assert " INFO test.logs [req-text-1]: refused" in line
    assert 'event=access_denied' in line and 'user_sub="a b"' in line
    assert "[" not in TextFormatter().format(record("idle"))


# ------------------------------------------------------------------------ request id


def test_request_id_sane_values_are_kept_others_replaced():
    for sane in ("abc", "0af7651916cd43dd8448eb211c80319c", "9b2c6f8e-1c0a-4d5e-8f3b-2a1c0e9d7b6f",
                 "Root=1-5759e988:bd862e3fe1be46a994272793", "x" * MAX_REQUEST_ID):
        assert accept_request_id(sane) == sane
    for hostile in (None, "", "a\r\nb", "a b", 'a"b', "x" * (MAX_REQUEST_ID + 1), "x" * 10_000, "é", "a\x00",
                    "a,b", "{}", "a\u2028b"):
        assert GENERATED_ID.fullmatch(accept_request_id(hostile))
    assert accept_request_id(None) != accept_request_id(None)


@given(st.text(max_size=300))
def test_request_id_is_always_a_sane_token(value):
    assert SANE_ID.fullmatch(accept_request_id(value))


# ----------------------------------------------------------------- a real gateway


def raw_get(port: int, path: str, header_lines: bytes) -> tuple[int, dict[str, str]]:
    """One HTTP/1.1 GET with header bytes exactly as given (what httpx would refuse to send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     + header_lines + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


def access_lines(entries: list[dict], rid: str) -> list[dict]:
    return [e for e in entries if e["logger"] == "tornado.access" and e.get("request_id") == rid]


def test_json_log_of_a_real_gateway(gateway_factory, upstream):
    gateway = gateway_factory(extra_env={"MCPGW_LOG_FORMAT": "json", "MCPGW_ALLOWED_ORIGINS": ORIGIN})
    server_id = gateway.add_server(upstream.url, ALICE["email"])
    secrets: set[str] = set()
    seen: dict[str, tuple[str, int]] = {}  # request id the client got -> (path, status)

    def keep(response: httpx.Response, path: str) -> str:
        rid = response.headers["x-request-id"]
        seen[rid] = (path, response.status_code)
        return rid

    async def traffic():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE,
                                 token_endpoint_auth_method="none")  # a public client: /token below
            tokens = await obtain_tokens(rig)  # DCR, /authorize, IdP sign-in, consent, /token
            async with connect(rig) as client:  # MCP calls through the proxy
                await client.list_tools()
                await client.call_tool("echo", {"text": "hello"})
            for _, url, _ in browser.history:  # codes and states of both legs (client and IdP)
                secrets.update(v for k, v in parse_qsl(urlsplit(url).query) if k in ("code", "state"))
            for result in rig.authorizer.results:
                secrets.update(v for k, v in result.items() if k in ("code", "state"))
        secrets.update(t for t in (tokens.access_token, tokens.refresh_token, rig.client_info.client_secret) if t)
        client_id = rig.client_info.client_id
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            # A client's own id is echoed and logged; one made by the gateway otherwise.
            bearer = {"Authorization": f"Bearer {tokens.access_token}"}
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            accept = {"Accept": "application/json, text/event-stream"}
            initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
            mine = await http.post(f"/mcp/{server_id}", json=initialize,
                                   headers={**bearer, **accept, "X-Request-Id": "client-chosen.id-41"})
            assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-chosen.id-41"
            anonymous = await http.post(f"/mcp/{server_id}", json=ping,
                                        headers={**accept, "X-Request-Id": "client-chosen.id-42"})
            assert anonymous.status_code == 401 and keep(anonymous, f"/mcp/{server_id}") == "client-chosen.id-42"
            made = await http.post(f"/mcp/{server_id}", json=ping, headers=accept)
            assert made.status_code == 401 and GENERATED_ID.fullmatch(keep(made, f"/mcp/{server_id}"))
            # A bad request: a 400 with its id, logged at WARNING.
            bad = await http.post("/token", content=b"grant_type=refresh_token&grant_type=x",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert bad.status_code == 400
            keep(bad, "/token")
            # A refused grant: refresh-token reuse after rotation revokes the family (a security
            # event, logged with the id of the request that caused it).
            form = {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": tokens.refresh_token}
            first = await http.post("/token", data=form)
            assert first.status_code == 200, first.text
            second = await http.post("/token", data={**form, "refresh_token": first.json()["refresh_token"]})
            assert second.status_code == 200, second.text
            secrets.update((first.json()["refresh_token"], first.json()["access_token"],
                            second.json()["refresh_token"], second.json()["access_token"]))
            reuse = await http.post("/token", data=form)
            assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
            reuse_id = keep(reuse, "/token")
            # Registrations at once: each one's event carries its own request's id.
            names = [f'client {n} "}} {{"level":"CRITICAL"}}' for n in range(8)]  # a forged record in a name
            answers = await asyncio.gather(*(
                http.post("/register", json={"client_name": name, "redirect_uris": ["http://127.0.0.1:9/cb"]},
                          headers={"X-Request-Id": f"reg-{n}"})
                for n, name in enumerate(names)))
            registered = {a.headers["x-request-id"]: a.json()["client_id"] for a in answers}
            assert set(registered) == {f"reg-{n}" for n in range(8)}
        return client_id, reuse_id, registered

    client_id, reuse_id, registered = asyncio.run(traffic())

    # Hostile ids reaching the gateway (10 kB, non-ASCII, U+2028, quotes, a tab) are replaced;
    # CR, LF and other controls never get that far: the HTTP/1.1 layer answers 400 itself.
    for value in (b"INJECTED-1" + b"x" * 10_000, "INJECTED-2-\u00e9\u2028".encode(), b"\xff\xfeINJECTED-3",
                  b'INJECTED-4 "quoted"', b"INJECTED-5\t{}"):
        status, headers = raw_get(gateway.port, "/.well-known/oauth-authorization-server",
                                  b"X-Request-Id: " + value + b"\r\n")
        assert status == 200 and GENERATED_ID.fullmatch(headers["x-request-id"])
        seen[headers["x-request-id"]] = ("/.well-known/oauth-authorization-server", 200)
    for value in (b'INJECTED-6\r\n {"level":"CRITICAL"}', b"INJECTED-7\rX", b"INJECTED-8\x1b[31m"):
        status, _ = raw_get(gateway.port, "/.well-known/oauth-authorization-server", b"X-Request-Id: " + value + b"\r\n")
        assert status == 400
    # The HTTP/1.1 layer's line about a refused header never quotes it: it may be a credential.
    status, _ = raw_get(gateway.port, f"/mcp/{server_id}", b"Authorization: Bearer INJECTED-9-token\x01\r\n")
    assert status == 400
    # Browsers may send it and read it where CORS is on (the proxy, the OAuth endpoints).
    for path in (f"/mcp/{server_id}", "/token"):
        preflight = httpx.options(gateway.url + path, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-request-id"})
        assert GENERATED_ID.fullmatch(preflight.headers["x-request-id"])
        for header in ("access-control-allow-headers", "access-control-expose-headers"):
            assert "x-request-id" in {h.strip().lower() for h in preflight.headers[header].split(",")}
    # Errors answered before prepare() (405) carry one too.
    status, headers = raw_get(gateway.port, "/register", b"")
    assert status == 405 and GENERATED_ID.fullmatch(headers["x-request-id"])
    seen[headers["x-request-id"]] = ("/register", 405)

    # The same function counts every request by route group and status, and times it.
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(httpx.get(gateway.url + "/metrics").text)
               for s in family.samples}
    assert samples[("mcpgw_http_requests_total", (("route", "oauth"), ("status", "201")))] >= 9  # registrations
    assert samples[("mcpgw_http_requests_total", (("route", "mcp"), ("status", "401")))] >= 3
    assert samples[("mcpgw_http_requests_total", (("route", "discovery"), ("status", "200")))] >= 5
    assert samples[("mcpgw_http_request_duration_seconds_count", (("route", "mcp"),))] >= 5

    gateway.stop()  # the log is complete
    text = gateway.log_text()
    entries = [parse_line(line) for line in text.splitlines() if line]
    assert entries

    for rid, (path, status) in seen.items():
        lines = access_lines(entries, rid)
        assert len(lines) == 1, (rid, path)
        line = lines[0]
        route = {"/mcp": "mcp", "/.well-known": "discovery"}.get(path[:path.index("/", 1)] if "/" in path[1:]
                                                                 else path, "oauth")
        assert (line["path"], line["status"], line["route"]) == (path, status, route)
        assert isinstance(line["duration_ms"], float | int) and line["remote_ip"] == "127.0.0.1"
        assert line["level"] == ("INFO" if status in (200, 401) else "WARNING")
    assert access_lines(entries, "client-chosen.id-41") == []  # a 200 on /mcp/ is DEBUG
    # The handlers' fields: who signed in, which client asked for tokens.
    callback = [e for e in entries if e.get("path") == "/oauth/callback" and e["status"] == 302]
    assert callback and callback[0]["user_sub"] == ALICE["sub"]
    token_lines = [e for e in entries if e.get("path") == "/token" and e.get("client_id") == client_id]
    assert len(token_lines) >= 3
    # Security events: one WARNING line each, with the id of the request behind them.
    events = [e for e in entries if e["logger"] == "mcpgw.security"]
    assert all(e["level"] == "WARNING" and e.get("event") for e in events)
    assert [e for e in events if e.get("request_id") == reuse_id and e.get("client_id") == client_id]
    for rid, registered_id in registered.items():
        assert [e for e in events if e.get("request_id") == rid and e.get("client_id") == registered_id]
    # Nothing forged, nothing secret: no hostile value anywhere, even in the HTTP layer's lines
    # about the requests its parser refused.
    assert "INJECTED" not in text
    assert [e for e in entries if e["logger"] == "gateway.http" and "refused a malformed request" in e["message"]
            and "Invalid header value" in e["message"]]
    assert not [e for e in entries if e["level"] == "CRITICAL"]
    assert gateway.url + "/oauth/callback?" not in text and "?code=" not in text
    for secret in secrets:
        assert secret not in text, "a token, code or state value is in the log"
    assert "Bearer" not in text


def run_python(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env},
                          capture_output=True, text=True, timeout=60)


def test_log_format_is_checked(tmp_path):
    """A MCPGW_LOG_FORMAT other than text or json stops the CLI with one line naming it."""
    result = run_python("gateway.py", "servers", "list", env={
        "MCPGW_LOG_FORMAT": "yaml", "MCPGW_STATE_DIR": str(tmp_path), "MCPGW_STORAGE": f"sqlite:///{tmp_path}/g.db"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: MCPGW_LOG_FORMAT: 'yaml' is not text or json"]


def test_json_mode_turns_the_banner_warnings_and_uncaught_exceptions_into_lines():
    """Output that would bypass the log format (the start-up banner, warnings.warn, an
    uncaught exception's traceback) is a JSON line too, and stdout stays empty."""
    code = ("import warnings; from services.common.logs import announce, configure_logging; "
            "configure_logging('JSON'); announce(['Gateway listening on x', '  dashboard:      y']); "
            "warnings.warn('careful\\nnow'); raise RuntimeError('boom\\nline')")
    result = run_python("-c", code, env={})
    assert result.stdout == ""
    entries = [parse_line(line) for line in result.stderr.splitlines()]
    assert [e["level"] for e in entries] == ["INFO", "WARNING", "CRITICAL"]
    assert entries[0]["message"] == "Gateway listening on x; dashboard: y"
    assert "careful\nnow" in entries[1]["message"]
    assert "RuntimeError: boom\nline" in entries[2]["exc_info"]


def test_text_mode_prints_the_banner():
    code = "from services.common.logs import announce, configure_logging; configure_logging(''); announce(['a', '  b'])"
    assert run_python("-c", code, env={}).stdout == "a\n  b\n"
