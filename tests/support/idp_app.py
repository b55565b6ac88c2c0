"""Entry point of the test IdP: oidc-provider-mock's own CLI, with ``kid`` in ID-token headers.

Why the patch: oidc-provider-mock 0.3.4 signs ID tokens with its single key but puts no
``kid`` in the JWS header, while its JWKS lists the key with a ``kid``. Real providers
(Google included) always send ``kid``, and google-auth's ``id_token.verify_token`` with a
JWK set only accepts a token whose ``kid`` names a key ("Unable to find a signing key that
matches"). Adding the header makes the mock behave like the IdPs the gateway meets.

Claims need no patch: every non-standard user claim (``hd``) reaches the ID token as is,
and ``email_verified`` does with scope ``email``.

Run as a script (``python path/to/idp_app.py --port P ...``): it takes the same options as
``python -m oidc_provider_mock``.
"""

from __future__ import annotations

from typing import Any

from oidc_provider_mock import _app
from oidc_provider_mock.__main__ import run

_original_get_encode_header = _app.OpenIDCode.get_encode_header


def _get_encode_header_with_kid(self: Any, client: Any) -> dict[str, Any]:
    header = _original_get_encode_header(self, client)
    # Computed exactly the way /jwks renders the key, so the two always agree.
    public_jwks = _app.jose.KeySet((_app.storage.jwk,)).as_dict()
    header.setdefault("kid", public_jwks["keys"][0]["kid"])
    return header


_app.OpenIDCode.get_encode_header = _get_encode_header_with_kid  # type: ignore[method-assign]


if __name__ == "__main__":
    run()
