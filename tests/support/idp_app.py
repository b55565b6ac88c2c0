"""A *varied* test IdP: oidc-provider-mock's own CLI with ``kid`` added to ID-token headers.

The default test IdP runs the mock stock (``python -m oidc_provider_mock``, see idp.py):
oidc-provider-mock 0.3.4 signs ID tokens with its single key and puts no ``kid`` in the
JWS header, which OpenID Connect Core §10.1 allows when the key set holds one key. Real
providers such as Google do send ``kid``; this variant lets a test cover that behaviour
too (``IdpProcess(id_token_kid=True)``). Nothing else differs.

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
