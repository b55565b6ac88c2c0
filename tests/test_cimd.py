"""Client ID metadata documents end to end: the MCP SDK client presents an https client_id
URL, the real gateway fetches the document from a real HTTPS server on loopback (trusted
through SSL_CERT_FILE), validates it, caches it, and the flow ends in tokens. Bad
documents are refused on a readable page and never cached; the SSRF guard applies."""

from __future__ import annotations

import asyncio
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
from tests.support.tokens import pkce

ALICE = {"sub": "alice-cimd", "email": "alice@example.com", "email_verified": True, "name": "Alice"}


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
    assert why in refused.text, refused.text
    assert documents.hits[path] == 1

    # The error was not cached: once the document is fixed, the next attempt fetches it again.
    documents.publish(path, client_document(url))
    fixed = authorize_page(gateway, url)
    assert fixed.status_code in (302, 303), fixed.text
    assert documents.hits[path] == 2


def test_metadata_document_urls_are_fetched_through_the_ssrf_guard(gateway_factory, documents, tls):
    # No MCPGW_UPSTREAM_ALLOW: loopback is not a place the gateway may fetch from.
    gateway = gateway_factory(extra_env={"SSL_CERT_FILE": tls[0], "MCPGW_UPSTREAM_ALLOW": ""})
    url = documents.publish("/guarded.json", {})
    documents.publish("/guarded.json", client_document(url))
    refused = authorize_page(gateway, url)
    assert refused.status_code == 400 and "location" not in refused.headers
    assert "refused" in refused.text.lower()
    assert documents.hits.get("/guarded.json", 0) == 0
