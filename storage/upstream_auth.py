"""Connected accounts behind their own small interface: each user's upstream OAuth credential per
server, the gateway's client registration per (server, upstream issuer), and the refresh lease,
offered by every backend as `Storage.upstream_auth`. Writer and reader:
`services.proxy.upstream_auth`."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field


@dataclass(frozen=True)
class UpstreamCredential:
    """A user's tokens at one server's upstream. `token_enc` is SecretBox ciphertext of the
    token set, sealed with (user_sub, server_id, issuer) as associated data: the row opens
    only under the key it was written for."""

    user_sub: str
    server_id: str
    issuer: str
    token_enc: str
    expires_at: float = 0.0  # the access token's expiry; 0: unknown
    scope: str = ""
    upstream_subject: str = ""  # who the upstream says this is, when it says
    updated_at: float = 0.0  # also the version a conditional replace compares


@dataclass(frozen=True)
class UpstreamRegistration:
    """The gateway as a client of one upstream authorization server, for one server:
    `kind` dcr (registered once, kept), cimd (the client id is the gateway's metadata URL)
    or static (from the server's settings)."""

    server_id: str
    issuer: str
    client_id: str
    client_secret_enc: str = ""  # SecretBox ciphertext ("" for a public client)
    kind: str = "dcr"
    metadata: dict = field(default_factory=dict, compare=False, hash=False)  # the AS's answer, secret removed
    created_at: float = 0.0


class UpstreamAuthStore(abc.ABC):
    """Upstream credentials, registrations and refresh leases. All methods are async and
    share the Storage's connections and errors. Deleting a server (`delete_server`)
    deletes its credentials, registrations and leases on both backends."""

    @abc.abstractmethod
    async def get_credential(self, user_sub: str, server_id: str) -> UpstreamCredential | None:
        """A strongly consistent read."""

    @abc.abstractmethod
    async def put_credential(self, credential: UpstreamCredential, if_updated_at: float | None = None) -> bool:
        """Store the credential. With `if_updated_at`: only when a credential of that
        updated_at is still stored (a refresh never resurrects a disconnected account);
        False when that condition failed."""

    @abc.abstractmethod
    async def delete_credential(self, user_sub: str, server_id: str) -> bool:
        """Disconnect; False when there was none."""

    @abc.abstractmethod
    async def credentials_of_user(self, user_sub: str) -> list[UpstreamCredential]:
        """Every connected account of a user, by server id."""

    @abc.abstractmethod
    async def credentials_of_server(self, server_id: str) -> list[UpstreamCredential]:
        """Every connected account of a server, by user (who lost access when a grant goes)."""

    @abc.abstractmethod
    async def count_credentials(self, server_id: str) -> int:
        """How many users have connected an account for this server."""

    @abc.abstractmethod
    async def delete_user_credentials(self, user_sub: str) -> int:
        """A user removed: every credential of theirs."""

    @abc.abstractmethod
    async def get_registration(self, server_id: str, issuer: str) -> UpstreamRegistration | None: ...

    @abc.abstractmethod
    async def add_registration(self, registration: UpstreamRegistration) -> bool:
        """Keep a registration unless one exists already (two instances registering at
        once: the first stored wins, the caller reads it back); False when one existed."""

    @abc.abstractmethod
    async def delete_registration(self, server_id: str, issuer: str) -> bool:
        """Forget a registration the AS no longer knows (it is made again on next use)."""

    @abc.abstractmethod
    async def take_refresh_lease(self, user_sub: str, server_id: str, holder: str, until: float,
                                 now: float) -> bool:
        """Take (or extend) the refresh lease of (user, server) for `holder` until `until`,
        if it is free, expired at `now`, or already `holder`'s; one compare-and-set."""

    @abc.abstractmethod
    async def release_refresh_lease(self, user_sub: str, server_id: str, holder: str) -> None:
        """Give the lease back if `holder` still has it."""
