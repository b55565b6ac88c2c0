"""DynamoDB: clients, codes, refresh tokens, consents, signing keys, revocations."""

from __future__ import annotations

import time
from typing import Any

from ..base import (
    SIGNING_KEY_STATUSES,
    AuthCode,
    Client,
    Conflict,
    Consent,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    SigningKey,
    StorageError,
)
from .codecs import (
    ACTIVE_SK,
    CLIENTS,
    CODES,
    CONSENTS,
    FAMILIES,
    REFRESH_TOKENS,
    REVOKED,
    REVOKED_PK,
    SIGNING_KEYS,
    SIGNING_PK,
    TTL_ATTRIBUTE,
    _client_item,
    _client_key,
    _code_item,
    _code_key,
    _consent_pk,
    _esc,
    _Expr,
    _family_item,
    _family_key,
    _gsi,
    _key,
    _num,
    _signing_key_key,
    _sorted,
    _token_item,
    _token_key,
    _ts,
    _ttl,
)


class OAuthRecords:
    """Clients, authorization codes, refresh families and tokens, consents, signing keys
    and revoked access tokens (a mixin of DynamoDBStorage, whose plumbing it uses)."""

    # ------------------------------------------------------------------- clients

    async def create_client(self, client: Client) -> None:
        if not await self._run(self._put, _client_item(client), True):
            raise Conflict(f"client {client.client_id} exists")

    async def put_client(self, client: Client) -> None:
        await self._run(self._put, _client_item(client))

    async def get_client(self, client_id: str) -> Client | None:
        return await self._run(self._get, _client_key(client_id), CLIENTS)

    async def touch_client(self, client_id: str, at: float) -> None:
        # The condition keeps last_used_at monotonic; a failed condition is not an error.
        expr = _Expr()
        used = expr.n("last_used_at")
        value = expr.v({"N": _num(at)})
        update = f"SET {used} = {value}, {expr.n('GSI1SK')} = {expr.v({'S': _ts(at)})}"
        condition = f"attribute_exists({expr.n('PK')}) AND {used} < {value}"
        await self._run(self._update, _client_key(client_id), expr, update, condition)

    async def delete_client(self, client_id: str) -> bool:
        return await self._run(self._delete, _client_key(client_id)) is not None

    async def reap_idle_clients(self, kind: str, unused_since: float, limit: int = 500) -> int:
        return await self._run(self._reap_idle_clients, kind, unused_since, limit, time.time())

    def _reap_idle_clients(self, kind: str, unused_since: float, limit: int, now: float) -> int:
        # GSI1 holds clients by kind and by last use (or creation): the candidates are one
        # range of it; the filter then applies max(created_at, last_used_at) exactly.
        def idle(expr: _Expr) -> str:
            cutoff = {"N": _num(unused_since)}
            return (
                f"{expr.n('created_at')} < {expr.v(cutoff)} "
                f"AND {expr.n('last_used_at')} < {expr.v(cutoff)}"
            )

        expr = _Expr()
        candidates = self._query_index(
            "GSI1",
            f"CLIENTIDLE#{_esc(kind)}",
            "<",
            _ts(unused_since),
            expr=expr,
            FilterExpression=idle(expr),
        )
        reaped = 0
        for item in candidates:
            if reaped >= limit:
                break
            client_id = item["client_id"]["S"]
            if self._has_live_family(client_id, now):
                continue
            # Re-checked at the delete: a client used meanwhile stays.
            again = _Expr()
            if self._delete(_client_key(client_id), f"attribute_exists({again.n('PK')}) AND {idle(again)}", again):
                reaped += 1
        return reaped

    def _has_live_family(self, client_id: str, now: float) -> bool:
        expr = _Expr()
        live = f"{expr.n('revoked_at')} = {expr.v({'N': '0'})} AND {expr.n('expires_at')} > {expr.v({'N': _num(now)})}"
        families = self._query_index(
            "GSI2",
            f"FAMCLIENT#{_esc(client_id)}",
            expr=expr,
            limit=1,
            FilterExpression=live,
        )
        return bool(families)

    # --------------------------------------------------------------------- codes

    async def put_code(self, code: AuthCode) -> None:
        # Insert-only: overwriting would resurrect a redeemed code.
        if not await self._run(self._put, _code_item(code), True):
            raise Conflict(f"code {code.code_hash[:8]}… exists")

    async def redeem_code(self, code_hash: str) -> tuple[AuthCode | None, bool]:
        return await self._run(self._redeem_code, code_hash)

    def _redeem_code(self, code_hash: str) -> tuple[AuthCode | None, bool]:
        expr = _Expr()
        used = expr.n("used")
        try:
            response = self._db.update_item(
                TableName=self.table,
                Key=_code_key(code_hash),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **expr.params(
                    UpdateExpression=f"SET {used} = {expr.v({'BOOL': True})}",
                    ConditionExpression=f"{used} = {expr.v({'BOOL': False})}",
                ),
            )
        except self._db.exceptions.ConditionalCheckFailedException as exc:
            old = (getattr(exc, "response", None) or {}).get("Item")
            return (None if old is None else CODES.decode(old)), False
        return CODES.decode(response["Attributes"]), True

    # ------------------------------------------------------------ refresh tokens

    async def create_family(self, family: RefreshFamily, first: RefreshToken) -> None:
        codes = await self._run(
            self._transact,
            [
                {"Put": {"TableName": self.table, "Item": _family_item(family),
                         "ConditionExpression": "attribute_not_exists(PK)"}},
                {"Put": {"TableName": self.table, "Item": _token_item(first),
                         "ConditionExpression": "attribute_not_exists(PK)"}},
            ],
        )
        if codes is not None:
            raise Conflict(f"refresh family {family.family_id}: {codes}")

    async def get_family(self, family_id: str) -> RefreshFamily | None:
        return await self._run(self._get, _family_key(family_id), FAMILIES)

    async def families_of_user(self, user_sub: str) -> list[RefreshFamily]:
        items = await self._run(self._query_index, "GSI1", f"FAMUSER#{_esc(user_sub)}")
        families = [FAMILIES.decode(i) for i in items]
        return _sorted(families, lambda f: (-f.created_at, f.family_id))

    async def get_refresh_token(self, token_hash: str) -> RefreshToken | None:
        return await self._run(self._get, _token_key(token_hash), REFRESH_TOKENS)

    async def rotate_refresh_token(
        self, old_hash: str, successor: RefreshToken, successor_enc: str, now: float
    ) -> bool:
        if now <= 0:
            # used_at = 0 means "unused": rotating at 0 would leave the token reusable.
            raise ValueError("rotate_refresh_token needs a positive `now`")
        old = _Expr()
        used = old.n("used_at")
        at = old.v({"N": _num(now)})
        mark = {
            "TableName": self.table,
            "Key": _token_key(old_hash),
            **old.params(
                UpdateExpression=(
                    f"SET {used} = {at}, {old.n('replaced_by')} = {old.v({'S': successor.token_hash})}, "
                    f"{old.n('successor_enc')} = {old.v({'S': successor_enc})}"
                ),
                ConditionExpression=f"{used} = {old.v({'N': '0'})}",
            ),
        }
        fam = _Expr()
        touch = {
            "TableName": self.table,
            "Key": _family_key(successor.family_id),
            # Rotations of one family are sequential (one live token), so `now` only grows.
            **fam.params(
                UpdateExpression=f"SET {fam.n('last_used_at')} = {fam.v({'N': _num(now)})}",
                ConditionExpression=f"attribute_exists({fam.n('PK')})",
            ),
        }
        put = {"TableName": self.table, "Item": _token_item(successor),
               "ConditionExpression": "attribute_not_exists(PK)"}
        codes = await self._run(self._transact, [{"Update": mark}, {"Put": put}, {"Update": touch}])
        if codes is None:
            return True
        if codes and codes[0] == "ConditionalCheckFailed":
            return False  # used already, or unknown
        raise Conflict(f"refresh token successor: {codes}")

    async def revoke_family(self, family_id: str, at: float) -> bool:
        return await self._run(self._revoke_family, family_id, at)

    def _revoke_family(self, family_id: str, at: float) -> bool:
        # The first revocation time is kept: it is what the owner saw happen.
        expr = _Expr()
        revoked = expr.n("revoked_at")
        update = f"SET {revoked} = {expr.v({'N': _num(at)})}, {expr.n('EXPSK')} = {expr.v({'S': '0'})}"
        condition = f"attribute_exists({expr.n('PK')}) AND {revoked} = {expr.v({'N': '0'})}"
        try:
            self._db.update_item(
                TableName=self.table,
                Key=_family_key(family_id),
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
                **expr.params(UpdateExpression=update, ConditionExpression=condition),
            )
        except self._db.exceptions.ConditionalCheckFailedException as exc:
            return bool((getattr(exc, "response", None) or {}).get("Item"))
        return True

    # ------------------------------------------------------------------- consent

    async def get_consent(self, user_sub: str, client_id: str, audience: str) -> Consent | None:
        key = _key(_consent_pk(user_sub, client_id), f"AUD#{audience}")
        return await self._run(self._get, key, CONSENTS)

    async def put_consent(self, consent: Consent) -> None:
        key = _key(_consent_pk(consent.user_sub, consent.client_id), f"AUD#{consent.audience}")
        # GSI1 lists a user's consents (delete_user_consents); items written before it
        # existed are found through the user's refresh families instead.
        index = _gsi("GSI1", f"CONSENTUSER#{_esc(consent.user_sub)}", _esc(consent.client_id))
        await self._run(self._put, {**key, **CONSENTS.encode(consent), **index})

    async def delete_consents(self, user_sub: str, client_id: str) -> int:
        return await self._run(self._delete_consents, user_sub, client_id)

    def _delete_consents(self, user_sub: str, client_id: str) -> int:
        pk = _consent_pk(user_sub, client_id)
        items = self._query_partition(pk, ProjectionExpression="PK, SK")
        return sum(self._delete(_key(pk, item["SK"]["S"])) is not None for item in items)

    async def delete_user_consents(self, sub: str) -> int:
        return await self._run(self._delete_user_consents, sub)

    def _delete_user_consents(self, sub: str) -> int:
        clients = {item["client_id"]["S"] for item in self._query_index(
            "GSI1", f"CONSENTUSER#{_esc(sub)}", ProjectionExpression="client_id")}
        clients |= {item["client_id"]["S"] for item in self._query_index(
            "GSI1", f"FAMUSER#{_esc(sub)}", ProjectionExpression="client_id")}
        return sum(self._delete_consents(sub, client_id) for client_id in sorted(clients))

    # -------------------------------------------------------------- signing keys

    async def list_signing_keys(self) -> list[SigningKey]:
        items = await self._run(self._query_partition, SIGNING_PK, "KEY#")
        return _sorted([SIGNING_KEYS.decode(i) for i in items], lambda k: (k.created_at, k.kid))

    async def add_signing_key(self, key: SigningKey, only_if_none_active: bool = False) -> bool:
        if key.status not in SIGNING_KEY_STATUSES:
            raise ValueError(f"unknown signing key status {key.status!r}")
        put = {
            "Put": {
                "TableName": self.table,
                "Item": {**_signing_key_key(key.kid), **SIGNING_KEYS.encode(key)},
                "ConditionExpression": "attribute_not_exists(PK)",
            }
        }
        if key.status != "active":
            if not await self._run(self._put, put["Put"]["Item"], True):
                raise Conflict(f"signing key {key.kid} exists")
            return True
        # The ACTIVE sentinel lists the active kids: a key is active exactly when the
        # sentinel says so, and "none active" is one condition on one item.
        expr = _Expr()
        kids = expr.n("active_kids")
        sentinel: dict[str, Any] = {
            "TableName": self.table,
            "Key": _key(SIGNING_PK, ACTIVE_SK),
            **expr.params(
                UpdateExpression=f"ADD {kids} {expr.v({'SS': [key.kid]})}",
                ConditionExpression=(
                    f"attribute_not_exists({kids}) OR size({kids}) = {expr.v({'N': '0'})}"
                    if only_if_none_active
                    else ""
                ),
            ),
        }
        codes = await self._run(self._transact, [put, {"Update": sentinel}])
        if codes is None:
            return True
        if codes[0] == "ConditionalCheckFailed":
            raise Conflict(f"signing key {key.kid} exists")
        if only_if_none_active and codes[1:2] == ["ConditionalCheckFailed"]:
            return False
        raise StorageError(f"dynamodb: add_signing_key cancelled: {codes}")

    async def set_signing_key_status(self, kid: str, status: str, retire_at: float = 0.0) -> None:
        if status not in SIGNING_KEY_STATUSES:
            raise ValueError(f"unknown signing key status {status!r}")
        key = _Expr()
        change = {
            "TableName": self.table,
            "Key": _signing_key_key(kid),
            **key.params(
                UpdateExpression=(
                    f"SET {key.n('status')} = {key.v({'S': status})}, "
                    f"{key.n('retire_at')} = {key.v({'N': _num(retire_at)})}"
                ),
                ConditionExpression=f"attribute_exists({key.n('PK')})",
            ),
        }
        expr = _Expr()
        verb = "ADD" if status == "active" else "DELETE"
        sentinel = {
            "TableName": self.table,
            "Key": _key(SIGNING_PK, ACTIVE_SK),
            **expr.params(UpdateExpression=f"{verb} {expr.n('active_kids')} {expr.v({'SS': [kid]})}"),
        }
        codes = await self._run(self._transact, [{"Update": change}, {"Update": sentinel}])
        if codes is None:
            return
        if codes[0] == "ConditionalCheckFailed":
            raise KeyError(kid)
        raise StorageError(f"dynamodb: set_signing_key_status cancelled: {codes}")

    # ----------------------------------------------------- revoked access tokens

    async def revoke_access_token(self, revoked: RevokedAccessToken) -> None:
        expr = _Expr()
        expires = expr.n("expires_at")
        at = expr.v({"N": _num(revoked.expires_at)})
        update = (
            f"SET {expires} = {at}, {expr.n('jti')} = {expr.v({'S': revoked.jti})}, "
            f"{expr.n(TTL_ATTRIBUTE)} = {expr.v(_ttl(revoked.expires_at))}"
        )
        # Kept until the latest expiry asked for.
        condition = f"attribute_not_exists({expires}) OR {expires} < {at}"
        await self._run(self._update, _key(REVOKED_PK, revoked.jti), expr, update, condition)

    async def revoked_access_tokens(self, now: float) -> list[RevokedAccessToken]:
        items = await self._run(self._revoked_since, now)
        return _sorted([REVOKED.decode(i) for i in items], lambda r: (r.expires_at, r.jti))

    def _revoked_since(self, now: float, expired: bool = False) -> list[dict]:
        expr = _Expr()
        op = "<=" if expired else ">"
        condition = f"{expr.n('PK')} = {expr.v({'S': REVOKED_PK})}"
        return self._query(
            ConsistentRead=True,
            **expr.params(
                KeyConditionExpression=condition,
                FilterExpression=f"{expr.n('expires_at')} {op} {expr.v({'N': _num(now)})}",
            ),
        )
