"""Connected accounts on DynamoDB: credential, registration and lease items in their server's
own `SERVER#id` partition (so `delete_server` takes them along); GSI1 lists a user's."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..upstream_auth import UpstreamAuthStore, UpstreamCredential, UpstreamRegistration
from .codecs import _Codec, _esc, _Expr, _gsi, _key, _num, _ttl

if TYPE_CHECKING:
    from .store import DynamoDBStorage

CREDENTIALS = _Codec(UpstreamCredential)
REGISTRATIONS = _Codec(UpstreamRegistration)


def _credential_key(user_sub: str, server_id: str) -> dict:
    return _key(f"SERVER#{_esc(server_id)}", f"UPCRED#{_esc(user_sub)}")


def _registration_key(server_id: str, issuer: str) -> dict:
    return _key(f"SERVER#{_esc(server_id)}", f"UPREG#{_esc(issuer)}")


def _lease_key(user_sub: str, server_id: str) -> dict:
    return _key(f"SERVER#{_esc(server_id)}", f"UPLEASE#{_esc(user_sub)}")


class DynamoDBUpstreamAuth(UpstreamAuthStore):
    """`UpstreamAuthStore` on the table of its `DynamoDBStorage`."""

    def __init__(self, store: DynamoDBStorage) -> None:
        self._store = store

    async def get_credential(self, user_sub: str, server_id: str) -> UpstreamCredential | None:
        return await self._store._run(self._store._get, _credential_key(user_sub, server_id), CREDENTIALS)

    async def put_credential(self, credential: UpstreamCredential, if_updated_at: float | None = None) -> bool:
        return await self._store._run(self._put_credential, credential, if_updated_at)

    def _put_credential(self, credential: UpstreamCredential, if_updated_at: float | None) -> bool:
        item = {
            **_credential_key(credential.user_sub, credential.server_id),
            **CREDENTIALS.encode(credential),
            **_gsi("GSI1", f"UPCREDUSER#{_esc(credential.user_sub)}", credential.server_id),
        }
        params: dict = {"TableName": self._store.table, "Item": item}
        if if_updated_at is not None:
            expr = _Expr()
            params.update(expr.params(
                ConditionExpression=f"{expr.n('updated_at')} = {expr.v({'N': _num(if_updated_at)})}"
            ))
        db = self._store._db
        try:
            db.put_item(**params)
        except db.exceptions.ConditionalCheckFailedException:
            return False
        return True

    async def delete_credential(self, user_sub: str, server_id: str) -> bool:
        return await self._store._run(self._store._delete, _credential_key(user_sub, server_id)) is not None

    async def credentials_of_user(self, user_sub: str) -> list[UpstreamCredential]:
        items = await self._store._run(self._store._query_index, "GSI1", f"UPCREDUSER#{_esc(user_sub)}")
        return sorted((CREDENTIALS.decode(i) for i in items), key=lambda c: c.server_id)

    async def credentials_of_server(self, server_id: str) -> list[UpstreamCredential]:
        items = await self._store._run(self._store._query_partition, f"SERVER#{_esc(server_id)}", "UPCRED#")
        return sorted((CREDENTIALS.decode(i) for i in items), key=lambda c: c.user_sub)

    async def count_credentials(self, server_id: str) -> int:
        items = await self._store._run(
            functools.partial(self._store._query_partition, ProjectionExpression="PK"),
            f"SERVER#{_esc(server_id)}", "UPCRED#",
        )
        return len(items)

    async def delete_user_credentials(self, user_sub: str) -> int:
        found = await self.credentials_of_user(user_sub)
        return sum([await self.delete_credential(user_sub, c.server_id) for c in found])

    async def get_registration(self, server_id: str, issuer: str) -> UpstreamRegistration | None:
        return await self._store._run(self._store._get, _registration_key(server_id, issuer), REGISTRATIONS)

    async def add_registration(self, registration: UpstreamRegistration) -> bool:
        item = {**_registration_key(registration.server_id, registration.issuer), **REGISTRATIONS.encode(registration)}
        return await self._store._run(self._store._put, item, True)

    async def delete_registration(self, server_id: str, issuer: str) -> bool:
        return await self._store._run(self._store._delete, _registration_key(server_id, issuer)) is not None

    async def take_refresh_lease(self, user_sub: str, server_id: str, holder: str, until: float,
                                 now: float) -> bool:
        expr = _Expr()
        update = (f"SET {expr.n('holder')} = {expr.v({'S': holder})}, "
                  f"{expr.n('expires_at')} = {expr.v({'N': _num(until)})}, "
                  f"{expr.n('expires_at_ttl')} = {expr.v(_ttl(until + 60))}")
        condition = (f"attribute_not_exists({expr.n('PK')}) OR {expr.n('expires_at')} <= {expr.v({'N': _num(now)})}"
                     f" OR {expr.n('holder')} = {expr.v({'S': holder})}")
        done = await self._store._run(self._store._update, _lease_key(user_sub, server_id), expr, update, condition)
        return done is not None

    async def release_refresh_lease(self, user_sub: str, server_id: str, holder: str) -> None:
        expr = _Expr()
        await self._store._run(self._store._delete, _lease_key(user_sub, server_id),
                               f"{expr.n('holder')} = {expr.v({'S': holder})}", expr)
