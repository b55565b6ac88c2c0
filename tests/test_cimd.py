"""Client ID metadata documents end to end: the MCP SDK client presents an https client_id
URL, the real gateway fetches the document from a real HTTPS server on loopback (trusted
through SSL_CERT_FILE), validates it, caches it, and the flow ends in tokens. Bad
documents are refused with one generic message (the reason goes to the log: the page must
not map ports behind the gateway), the failure is remembered briefly and /token limits
before it fetches (no amplification); the SSRF guard applies."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import httpx
import httpx2
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.browser import ScriptedBrowser
from tests.support.mcp_oauth import DEFAULT_REDIRECT_URI, make_oauth_rig
from tests.support.ports import HeldPort
from tests.support.tokens import pkce

ALICE = {"sub": "alice-cimd", "email": "alice@example.com", "email_verified": True, "name": "Alice"}
GENERIC = "the client metadata document could not be fetched or is invalid"
TOKEN_BURST = 300  # services.ratelimit DEFAULT_RULES["token"]


def self_signed_certificate(directory) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class DocumentServer:
    """HTTPS on loopback serving whatever `documents[path]` says, counting requests."""

    def __init__(self, cert: str, key: str):
        self.documents: dict[str, tuple[int, dict, bytes]] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, headers, body = server.documents.get(self.path, (404, {}, b"{}"))
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.base = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, path: str, document: dict | bytes, status: int = 200, **headers: str) -> str:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.documents[path] = (status, headers, body)
        return self.base + path

    def stop(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def documents(tls):
    server = DocumentServer(*tls)
    yield server
    server.stop()


def client_document(url: str, **changes) -> dict:
    return {"client_id": url, "client_name": "Metadata Client", "redirect_uris": [DEFAULT_REDIRECT_URI],
            "token_endpoint_auth_method": "none", "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"], **changes}


def authorize_page(gateway, client_id: str) -> httpx.Response:
    _, challenge = pkce()
    query = {"response_type": "code", "client_id": client_id, "redirect_uri": DEFAULT_REDIRECT_URI,
             "code_challenge": challenge, "code_challenge_method": "S256", "state": "s"}
    return httpx.get(f"{gateway.url}/authorize?{urlencode(query)}", timeout=20)


def token_request(http: httpx.Client, client_id: str) -> httpx.Response:
    return http.post("/token", data={"grant_type": "authorization_code", "client_id": client_id, "code": "c",
                                     "code_verifier": "v" * 43, "redirect_uri": DEFAULT_REDIRECT_URI})


def test_sdk_client_signs_in_with_a_metadata_document_client_id(gateway_factory, documents, tls):
    gateway = gateway_factory(extra_env={"SSL_CERT_FILE": tls[0]})
    server_id = gateway.add_server("http://127.0.0.1:9/mcp", ALICE["email"])
    url = documents.base + "/oauth/client.json"
    documents.publish("/oauth/client.json", client_document(url), **{"Cache-Control": "max-age=600"})

    async def main():
        async with ScriptedBrowser() as browser:
            rig = make_oauth_rig(f"{gateway.url}/mcp/{server_id}", browser, idp_login=ALICE,
                                 client_metadata_url=url)
            async with httpx2.AsyncClient(auth=rig.provider, timeout=30) as http:
                response = await http.post(rig.server_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            return rig, response

    rig, response = asyncio.run(main())
    assert response.status_code != 401
    token = rig.storage.tokens.access_token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["client_id"] == url
    assert claims["aud"] == f"{gateway.url}/mcp/{server_id}"
    # Fetched once for /authorize and /token together: cached by its Cache-Control.
    assert documents.hits["/oauth/client.json"] == 1
    page = authorize_page(gateway, url)
    assert page.status_code in (302, 303) and documents.hits["/oauth/client.json"] == 1


@pytest.mark.parametrize(
    ("name", "document", "status", "headers", "why"),
    [
        ("wrong-id", lambda url: client_document("https://elsewhere.example/client.json"), 200, {}, "own URL"),
        ("secret", lambda url: client_document(url, token_endpoint_auth_method="client_secret_post"), 200, {},
         "token_endpoint_auth_method none"),
        ("unnamed", lambda url: client_document(url, client_name=""), 200, {}, "client_name"),
        ("redirect", lambda url: {}, 302, {"Location": "https://elsewhere.example/"}, "redirect"),
        ("missing", lambda url: {}, 404, {}, "HTTP 404"),
        ("huge", lambda url: client_document(url, padding="x" * 6000), 200, {}, "larger than"),
        ("not-json", lambda url: b"<html>hello</html>", 200, {}, "not JSON"),
        # Redirect URIs are RFC 3986 URIs: a look-alike (Cyrillic a) host, an RTL override.
        ("idn-redirect", lambda url: client_document(url, redirect_uris=["https://\u0430pp.example/cb"]), 200, {},
         "xn--pp-6kc.example"),
        ("rtl-redirect", lambda url: client_document(url, redirect_uris=["https://app.example/\u202ecb"]), 200,
         {}, "must be ASCII"),
    ],
)
def test_bad_metadata_documents_are_refused_on_a_page_and_never_cached(
    gateway_factory, documents, tls, name, document, status, headers, why
):
    gateway = gateway_factory(extra_env={"SSL_CERT_FILE": tls[0]})
    path = f"/clients/{name}.json"
    url = documents.base + path
    body = document(url)
    documents.publish(path, body if isinstance(body, bytes) else body, status, **headers)

    refused = authorize_page(gateway, url)
    assert refused.status_code == 400 and "location" not in refused.headers  # shown, never redirected
    assert GENERIC in refused.text and why not in refused.text, refused.text
    assert why in gateway.log_text()  # the reason is for the operator
    assert documents.hits[path] == 1

    # The failure is remembered (for a minute): fixing the document does not make the
    # gateway fetch it again at once, and nothing about the failure was cached as a client.
    documents.publish(path, client_document(url))
    again = authorize_page(gateway, url)
    assert again.status_code == 400 and GENERIC in again.text
    assert documents.hits[path] == 1


def test_metadata_document_urls_are_fetched_through_the_ssrf_guard(gateway_factory, documents, tls):
    # No MCPGW_UPSTREAM_ALLOW: loopback is not a place the gateway may fetch from.
    gateway = gateway_factory(extra_env={"SSL_CERT_FILE": tls[0], "MCPGW_UPSTREAM_ALLOW": ""})
    url = documents.publish("/guarded.json", {})
    documents.publish("/guarded.json", client_document(url))
    refused = authorize_page(gateway, url)
    assert refused.status_code == 400 and "location" not in refused.headers
    assert GENERIC in refused.text and "refused" in gateway.log_text()
    assert documents.hits.get("/guarded.json", 0) == 0


@pytest.mark.parametrize("path", ["/\u202eclient.json", "/clients/\u0430pp.json", "/caf\u00e9.json", "/a b.json"])
def test_metadata_document_urls_must_be_ascii_uris(gateway_factory, documents, tls, path):
    """The client_id URL is shown on the consent page: a non-ASCII one (an RTL override, a
    look-alike) is refused before anything is fetched, at /authorize and at /token."""
    gateway = gateway_factory(extra_env={"SSL_CERT_FILE": tls[0]})
    url = documents.publish(path, {})
    documents.publish(path, client_document(url))
    refused = authorize_page(gateway, url)
    assert refused.status_code == 400 and "location" not in refused.headers
    assert "ASCII" in refused.text
    with httpx.Client(base_url=gateway.url, trust_env=False, timeout=30) as http:
        answer = token_request(http, url)
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_client"
    assert answer.text.isascii() and "\\u" not in answer.text
    assert not documents.hits  # nothing was fetched, under any spelling of the path


def test_token_limits_before_fetching_and_remembers_failed_documents(gateway_factory, documents, tls):
    """Finding 11: /token names a client_id URL whose document is missing. The gateway
    fetches it once for many rapid and concurrent requests (the failure is remembered), and
    past the rate limit it answers 429 without looking the client up at all."""
    gateway = gateway_factory(extra_env={"SSL_CERT_FILE": tls[0]})
    with httpx.Client(base_url=gateway.url, trust_env=False, timeout=30) as http:
        sequential = documents.base + "/missing/sequential.json"
        answers = [token_request(http, sequential) for _ in range(50)]
        assert {(a.status_code, a.json()["error"]) for a in answers} == {(401, "invalid_client")}
        assert documents.hits["/missing/sequential.json"] == 1

        revoked = [http.post("/revoke", data={"client_id": sequential, "token": "t"}) for _ in range(10)]
        assert {r.status_code for r in revoked} == {401}
        assert documents.hits["/missing/sequential.json"] == 1  # /revoke shares the memory

        together = documents.base + "/missing/concurrent.json"
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: token_request(http, together).status_code, range(40)))
        assert set(statuses) == {401}
        assert documents.hits["/missing/concurrent.json"] == 1  # one fetch in flight, shared

        # Faster than the bucket refills (20 a second): past the burst, 429s.
        limited = documents.base + "/missing/limited.json"
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: token_request(http, limited), range(TOKEN_BURST + 100)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {401, 429} and statuses.count(429) >= 10, statuses.count(429)
    assert TOKEN_BURST <= statuses.count(401) < TOKEN_BURST + 90
    slowed = next(a for a in answers if a.status_code == 429)
    assert slowed.json()["error"] == "slow_down" and slowed.headers["Retry-After"] == "10"
    assert documents.hits["/missing/limited.json"] == 1


class PlainHttpServer:
    """A loopback port that answers plain HTTP (no TLS): a TLS handshake to it fails."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def test_metadata_document_failures_look_the_same_to_the_caller(gateway_factory, documents, tls, tmp_path):
    """Finding 21: a closed port, a port that does not speak TLS, a TLS port whose
    certificate is not trusted and a 404 give byte-identical answers at /token and at
    /authorize; the log tells them apart, one line each."""
    gateway = gateway_factory(extra_env={"SSL_CERT_FILE": tls[0]})
    plain = PlainHttpServer()
    untrusted = DocumentServer(*self_signed_certificate(tmp_path))  # not the certificate SSL_CERT_FILE trusts
    closed = HeldPort()  # bound, never listening: refused, and no one else's meanwhile
    try:
        urls = {
            "closed": f"https://127.0.0.1:{closed.port}/c.json",
            "not-tls": f"https://127.0.0.1:{plain.port}/c.json",
            "untrusted": untrusted.publish("/c.json", {}),
            "404": documents.base + "/absent/c.json",
        }
        with httpx.Client(base_url=gateway.url, trust_env=False, timeout=30) as http:
            tokens = {kind: token_request(http, url) for kind, url in urls.items()}
        pages = {kind: authorize_page(gateway, url) for kind, url in urls.items()}
    finally:
        closed.close()
        plain.stop()
        untrusted.stop()
    assert {r.status_code for r in tokens.values()} == {401}
    assert len({r.content for r in tokens.values()}) == 1, {k: r.text for k, r in tokens.items()}
    assert tokens["closed"].json() == {"error": "invalid_client", "error_description": GENERIC}
    assert {r.status_code for r in pages.values()} == {400}
    assert len({r.content for r in pages.values()}) == 1, {k: r.text for k, r in pages.items()}
    log = gateway.log_text()
    for url in urls.values():
        lines = [line for line in log.splitlines() if "client metadata document" in line and url in line]
        assert len(lines) == 1, (url, lines)  # fetched once, logged once, detail included
    assert "Traceback" not in log
