"""`Storage` on one DynamoDB table (single-table design, boto3 in a thread pool), for
several gateway instances behind a load balancer.

Table layout. Every key part taken from data is escaped (`%` -> `%25`, `#` -> `%23`) so
that `#` only ever separates parts. Base key PK (S) + SK (S); three general GSIs
GSI1..GSI3 (GSIxPK S, GSIxSK S, projection ALL) and one sparse expiry GSI `EXP`
(EXPPK S, EXPSK S, KEYS_ONLY) that purge_expired reads instead of scanning. `ts(t)` is
a time as a fixed-width sortable string.

  record         PK / SK                                 GSIs (only when the value is set)
  user           USER#sub / USER                         GSI1 USEREMAIL#email (verified only) / sub
                                                         GSI2 USERHD#hd / sub
  client         CLIENT#id / CLIENT                      GSI1 CLIENTIDLE#kind / ts(last used, else created)
  server         SERVER#id / SERVER                      GSI1 OWNER#sub / ts(created)#id
                                                         GSI2 OWNEREMAIL#email / id
                                                         GSI3 SERVERS / ts(created)#id
  grant          SERVER#id / GRANT#kind#value            GSI1 GRANT#kind#value / server_id
  pending        PENDING#kind#key / PENDING              EXP
  code           CODE#hash / CODE                        EXP
  family         FAMILY#id / FAMILY                      GSI1 FAMUSER#sub / ts(created)#id
                                                         GSI2 FAMCLIENT#client_id / id
                                                         EXP (expiry; "0" once revoked; removed
                                                         once its tokens are purged)
  refresh token  RT#hash / RT                            GSI1 RTFAM#family / hash; EXP (family expiry)
  consent        CONSENT#user#client / AUD#audience
  signing key    SIGNINGKEYS / KEY#kid                   (one partition)
  active keys    SIGNINGKEYS / ACTIVE                    sentinel: string set `active_kids`
  revocation     REVOKED / jti                           (one partition, filtered on expiry)
  session        SESSION#id / SESSION                    GSI1 SRVSESS#server / ts(expires)#id; EXP
  usage event    EVENTS#server / ts(at)#sequence         (newest first: ScanIndexForward=False)
  daily agg.     DAILY#server / day#target#user          counters and buckets h0..h31 by ADD
  hourly agg.    HOURLY#server / hour#target#user        EXP (hour); TTL a few days
  usage user     USAGEUSERS#server / U#user
  usage servers  USAGESERVERS / server                   (servers with event partitions, for retention)
  EXP entries    EXPPK = EXP#type#shard (8 shards per type, by a hash of PK), EXPSK = ts(expiry)

Expiry: pending states, codes, sessions, revocations, refresh tokens and hourly rows carry
`expires_at_ttl` (epoch seconds), the table's TTL attribute, so DynamoDB deletes them by
itself. TTL deletion is lazy (up to days), so reads still check expiry, and
purge_expired deletes what is due through Queries on the EXP index (and the REVOKED
partition): never a Scan. The only background Query-and-filter is reap_idle_clients
(GSI1 by kind and idle time, then one Query per candidate on the families-by-client
index).

One-shot operations are single conditional writes: put_code/create_* with
attribute_not_exists, redeem_code an UpdateItem on `used = false`, take_pending a
DeleteItem with ReturnValues=ALL_OLD on `expires_at > now`, create_family and
rotate_refresh_token one TransactWriteItems, add_signing_key(only_if_none_active) a
transaction with a conditional update of the ACTIVE sentinel (no active kid left).

Limits worth knowing: GSI reads are eventually consistent (a server listed a few ms
after its creation); each server's usage events share one partition (~1000 writes/s);
multi-item cascades (delete_server, bind_owner, delete_consents) are a Query then one
conditional write per item, not one transaction.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import random
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from datetime import UTC, datetime
from decimal import Decimal
from itertools import count
from typing import Any, TypeVar, get_origin, get_type_hints

from ..base import (
    LATENCY_BUCKETS,
    AuthCode,
    Client,
    Conflict,
    Consent,
    Grant,
    McpSession,
    Pending,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Server,
    ServerUser,
    SigningKey,
    Storage,
    StorageError,
    StorageUnavailable,
    UsageAggregate,
    UsageEvent,
    UsagePeriod,
    UsageRollup,
    User,
    latency_bucket,
    legacy_internal_upstream,
)

__all__ = ["DynamoDBStorage"]

T = TypeVar("T")
R = TypeVar("R")

GSIS = ("GSI1", "GSI2", "GSI3")
EXP_INDEX = "EXP"
EXP_SHARDS = 8
EXP_TYPES = ("pending", "code", "session", "rt", "family", "hourly")
TTL_ATTRIBUTE = "expires_at_ttl"
HOURLY_KEPT_SECONDS = 3 * 86400  # as in the SQLite backend: hourly rows serve the 24-hour view
SIGNING_KEY_STATUSES = ("active", "retiring", "retired")
HIST_ATTRIBUTES = tuple(f"h{i}" for i in range(LATENCY_BUCKETS))
OPEN_TIMEOUT = 300.0
TRANSACTION_ATTEMPTS = 8
BATCH_WRITE_SIZE = 25
KEY_ATTRIBUTES = ("PK", "SK", *(f"{g}{p}" for g in GSIS for p in ("PK", "SK")), "EXPPK", "EXPSK")
REVOKED_PK = "REVOKED"
SIGNING_PK = "SIGNINGKEYS"
ACTIVE_SK = "ACTIVE"

_sequence = count()


def _esc(part: str) -> str:
    return part.replace("%", "%25").replace("#", "%23")


def _ts(t: float) -> str:
    """A sortable string for a time: fixed width, microseconds."""
    return f"{max(0.0, t):020.6f}"


def _num(value: float | int) -> str:
    if isinstance(value, bool):
        raise TypeError("bool is not a number here")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot store non-finite number {value!r}")
    text = repr(float(value))
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    return text


def _ttl(at: float) -> dict:
    return {"N": str(max(0, math.ceil(at)))}


def _shard(pk: str) -> int:
    return zlib.crc32(pk.encode()) % EXP_SHARDS


def _exp(kind: str, pk: str, sort: str) -> dict[str, dict]:
    return {"EXPPK": {"S": f"EXP#{kind}#{_shard(pk)}"}, "EXPSK": {"S": sort}}


# ------------------------------------------------------------------ record mapping


class _Codec:
    """Dataclass fields <-> DynamoDB attributes under the same names: str S, bool BOOL,
    numbers N, tuples and dicts JSON text (S)."""

    def __init__(self, record: type) -> None:
        self.record = record
        hints = get_type_hints(record)
        self.fields = tuple((f.name, hints[f.name]) for f in fields(record))

    def encode(self, record: Any) -> dict[str, dict]:
        return {name: _encode(getattr(record, name), hint) for name, hint in self.fields}

    def decode(self, item: dict[str, dict]) -> Any:
        values = {name: _decode(item[name], hint) for name, hint in self.fields if name in item}
        return self.record(**values)


def _encode(value: Any, hint: Any) -> dict:
    if hint is bool:
        return {"BOOL": bool(value)}
    if hint is int or hint is float:
        return {"N": _num(value)}
    if hint is str:
        return {"S": value}
    if get_origin(hint) is tuple or hint is dict or get_origin(hint) is dict:
        return {"S": json.dumps(value, separators=(",", ":"))}
    raise TypeError(f"no encoding for {hint!r}")


def _decode(attribute: dict, hint: Any) -> Any:
    if hint is bool:
        return attribute["BOOL"]
    if hint is int:
        return int(Decimal(attribute["N"]))
    if hint is float:
        return float(attribute["N"])
    if hint is str:
        return attribute["S"]
    if get_origin(hint) is tuple:
        return tuple(json.loads(attribute["S"]))
    return json.loads(attribute["S"])


class _ServerCodec(_Codec):
    """Servers written before `internal_upstream` existed have no such attribute: they get
    what the SQLite migration gives old rows (storage.base.legacy_internal_upstream)."""

    def decode(self, item: dict[str, dict]) -> Any:
        server = super().decode(item)
        if "internal_upstream" not in item and legacy_internal_upstream(server.upstream_url):
            server = replace(server, internal_upstream=True)
        return server


USERS = _Codec(User)
CLIENTS = _Codec(Client)
SERVERS = _ServerCodec(Server)
GRANTS = _Codec(Grant)
PENDING = _Codec(Pending)
CODES = _Codec(AuthCode)
FAMILIES = _Codec(RefreshFamily)
REFRESH_TOKENS = _Codec(RefreshToken)
CONSENTS = _Codec(Consent)
SIGNING_KEYS = _Codec(SigningKey)
REVOKED = _Codec(RevokedAccessToken)
SESSIONS = _Codec(McpSession)
USAGE_EVENTS = _Codec(UsageEvent)
SERVER_USERS = _Codec(ServerUser)


def _key(pk: str, sk: str) -> dict[str, dict]:
    return {"PK": {"S": pk}, "SK": {"S": sk}}


def _user_key(sub: str) -> dict:
    return _key(f"USER#{_esc(sub)}", "USER")


def _client_key(client_id: str) -> dict:
    return _key(f"CLIENT#{_esc(client_id)}", "CLIENT")


def _server_key(server_id: str) -> dict:
    return _key(f"SERVER#{_esc(server_id)}", "SERVER")


def _grant_key(server_id: str, kind: str, value: str) -> dict:
    return _key(f"SERVER#{_esc(server_id)}", f"GRANT#{_esc(kind)}#{_esc(value)}")


def _pending_key(kind: str, key: str) -> dict:
    return _key(f"PENDING#{_esc(kind)}#{_esc(key)}", "PENDING")


def _code_key(code_hash: str) -> dict:
    return _key(f"CODE#{_esc(code_hash)}", "CODE")


def _family_key(family_id: str) -> dict:
    return _key(f"FAMILY#{_esc(family_id)}", "FAMILY")


def _token_key(token_hash: str) -> dict:
    return _key(f"RT#{_esc(token_hash)}", "RT")


def _consent_pk(user_sub: str, client_id: str) -> str:
    return f"CONSENT#{_esc(user_sub)}#{_esc(client_id)}"


def _signing_key_key(kid: str) -> dict:
    return _key(SIGNING_PK, f"KEY#{kid}")


def _session_key(session_id: str) -> dict:
    return _key(f"SESSION#{_esc(session_id)}", "SESSION")


def _gsi(index: str, pk: str, sk: str) -> dict[str, dict]:
    return {f"{index}PK": {"S": pk}, f"{index}SK": {"S": sk}}


def _user_item(user: User) -> dict:
    return {**_user_key(user.sub), **USERS.encode(user), **_user_indexes(user)}


def _user_indexes(user: User) -> dict:
    item: dict = {}
    if user.email and user.email_verified:
        item.update(_gsi("GSI1", f"USEREMAIL#{_esc(user.email)}", user.sub))
    if user.hd:
        item.update(_gsi("GSI2", f"USERHD#{_esc(user.hd)}", user.sub))
    return item


def _client_idle_key(client: Client) -> str:
    return _ts(client.last_used_at or client.created_at)


def _client_item(client: Client) -> dict:
    return {
        **_client_key(client.client_id),
        **CLIENTS.encode(client),
        **_gsi("GSI1", f"CLIENTIDLE#{_esc(client.kind)}", _client_idle_key(client)),
    }


def _server_item(server: Server) -> dict:
    created = f"{_ts(server.created_at)}#{server.server_id}"
    item = {**_server_key(server.server_id), **SERVERS.encode(server)}
    if server.owner_sub:
        item.update(_gsi("GSI1", f"OWNER#{_esc(server.owner_sub)}", created))
    if server.owner_email:
        item.update(_gsi("GSI2", f"OWNEREMAIL#{_esc(server.owner_email)}", server.server_id))
    item.update(_gsi("GSI3", "SERVERS", created))
    return item


def _grant_item(grant: Grant) -> dict:
    return {
        **_grant_key(grant.server_id, grant.kind, grant.value),
        **GRANTS.encode(grant),
        **_gsi("GSI1", f"GRANT#{_esc(grant.kind)}#{_esc(grant.value)}", grant.server_id),
    }


def _pending_item(pending: Pending) -> dict:
    key = _pending_key(pending.kind, pending.key)
    return {
        **key,
        **PENDING.encode(pending),
        TTL_ATTRIBUTE: _ttl(pending.expires_at),
        **_exp("pending", key["PK"]["S"], _ts(pending.expires_at)),
    }


def _code_item(code: AuthCode) -> dict:
    key = _code_key(code.code_hash)
    return {
        **key,
        **CODES.encode(code),
        TTL_ATTRIBUTE: _ttl(code.expires_at),
        **_exp("code", key["PK"]["S"], _ts(code.expires_at)),
    }


def _family_item(family: RefreshFamily) -> dict:
    key = _family_key(family.family_id)
    dead = "0" if family.revoked_at else _ts(family.expires_at)
    return {
        **key,
        **FAMILIES.encode(family),
        **_gsi("GSI1", f"FAMUSER#{_esc(family.user_sub)}", f"{_ts(family.created_at)}#{family.family_id}"),
        **_gsi("GSI2", f"FAMCLIENT#{_esc(family.client_id)}", family.family_id),
        **_exp("family", key["PK"]["S"], dead),
    }


def _token_item(token: RefreshToken) -> dict:
    key = _token_key(token.token_hash)
    return {
        **key,
        **REFRESH_TOKENS.encode(token),
        **_gsi("GSI1", f"RTFAM#{_esc(token.family_id)}", token.token_hash),
        TTL_ATTRIBUTE: _ttl(token.family_expires_at),
        **_exp("rt", key["PK"]["S"], _ts(token.family_expires_at)),
    }


def _session_item(session: McpSession) -> dict:
    key = _session_key(session.session_id)
    return {
        **key,
        **SESSIONS.encode(session),
        **_gsi("GSI1", f"SRVSESS#{_esc(session.server_id)}", f"{_ts(session.expires_at)}#{session.session_id}"),
        TTL_ATTRIBUTE: _ttl(session.expires_at),
        **_exp("session", key["PK"]["S"], _ts(session.expires_at)),
    }


class _Expr:
    """Builds an expression's placeholders: every attribute name goes through
    ExpressionAttributeNames (DynamoDB reserves hundreds of words: day, hour, name, …)."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.values: dict[str, dict] = {}

    def n(self, name: str) -> str:
        for placeholder, known in self.names.items():
            if known == name:
                return placeholder
        placeholder = f"#n{len(self.names)}"
        self.names[placeholder] = name
        return placeholder

    def v(self, value: dict) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = value
        return placeholder

    def params(self, **expressions: str) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in expressions.items() if v}
        if self.names:
            out["ExpressionAttributeNames"] = dict(self.names)
        if self.values:
            out["ExpressionAttributeValues"] = dict(self.values)
        return out


def _update_expression(sets: Iterable[str] = (), adds: Iterable[str] = (), removes: Iterable[str] = ()) -> str:
    parts = []
    for word, clauses in (("SET", list(sets)), ("ADD", list(adds)), ("REMOVE", list(removes))):
        if clauses:
            parts.append(f"{word} {', '.join(clauses)}")
    return " ".join(parts)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return response.get("Error", {}).get("Code", "")


def _cancellation_codes(exc: Exception) -> list[str]:
    response = getattr(exc, "response", None) or {}
    reasons = response.get("CancellationReasons") or []
    return [reason.get("Code", "") for reason in reasons]


def _utc(at: float, fmt: str) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime(fmt)


# ------------------------------------------------------------------------- backend


class DynamoDBStorage(Storage):
    """`Storage` on the DynamoDB table `table` in `region` (`endpoint` for a local or
    compatible server). Credentials come from the usual boto3 chain."""

    def __init__(self, table: str, region: str, endpoint: str = "", workers: int = 16) -> None:
        self.table = table
        self.region = region
        self.endpoint = endpoint
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._client: Any = None

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None or self._client is None:
            raise StorageError("dynamodb storage is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except (StorageError, KeyError, ValueError):
            raise
        except Exception as exc:
            if _is_boto_error(exc):
                raise _storage_error(exc) from exc
            raise

    @property
    def _db(self) -> Any:
        if self._client is None:
            raise StorageError("dynamodb storage is not open")
        return self._client

    def _get(self, key: dict, codec: _Codec) -> Any:
        item = self._db.get_item(TableName=self.table, Key=key, ConsistentRead=True).get("Item")
        return None if item is None else codec.decode(item)

    def _put(self, item: dict, new_only: bool = False) -> bool:
        """PutItem; with new_only, False when the key exists already."""
        params: dict[str, Any] = {"TableName": self.table, "Item": item}
        if new_only:
            params["ConditionExpression"] = "attribute_not_exists(PK)"
        try:
            self._db.put_item(**params)
        except self._db.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def _update(self, key: dict, expr: _Expr, update: str, condition: str = "", **extra: Any) -> dict | None:
        """UpdateItem; None when the condition failed, else the response."""
        try:
            return self._db.update_item(
                TableName=self.table,
                Key=key,
                **expr.params(UpdateExpression=update, ConditionExpression=condition),
                **extra,
            )
        except self._db.exceptions.ConditionalCheckFailedException:
            return None

    def _delete(self, key: dict, condition: str = "", expr: _Expr | None = None) -> dict | None:
        """DeleteItem returning the old item; None when nothing was deleted."""
        params: dict[str, Any] = {"TableName": self.table, "Key": key, "ReturnValues": "ALL_OLD"}
        params.update((expr or _Expr()).params(ConditionExpression=condition))
        try:
            return self._db.delete_item(**params).get("Attributes")
        except self._db.exceptions.ConditionalCheckFailedException:
            return None

    def _query(self, limit: int = 0, **params: Any) -> list[dict]:
        """Every page of a Query (or up to `limit` items)."""
        items: list[dict] = []
        params = {"TableName": self.table, **params}
        while True:
            page = self._db.query(**params)
            items.extend(page.get("Items", []))
            last = page.get("LastEvaluatedKey")
            if not last or (limit and len(items) >= limit):
                return items[:limit] if limit else items
            params["ExclusiveStartKey"] = last

    def _query_partition(self, pk: str, sk_prefix: str = "", sk_from: str = "", **extra: Any) -> list[dict]:
        expr = _Expr()
        condition = f"{expr.n('PK')} = {expr.v({'S': pk})}"
        if sk_prefix:
            condition += f" AND begins_with({expr.n('SK')}, {expr.v({'S': sk_prefix})})"
        elif sk_from:
            condition += f" AND {expr.n('SK')} >= {expr.v({'S': sk_from})}"
        return self._query(ConsistentRead=True, **expr.params(KeyConditionExpression=condition), **extra)

    def _query_index(
        self, index: str, pk: str, sk_op: str = "", sk_value: str = "",
        expr: _Expr | None = None, limit: int = 0, **extra: Any,
    ) -> list[dict]:
        """Query a GSI; `expr` carries the placeholders of a FilterExpression in `extra`."""
        expr = expr or _Expr()
        condition = f"{expr.n(index + 'PK')} = {expr.v({'S': pk})}"
        if sk_op:
            condition += f" AND {expr.n(index + 'SK')} {sk_op} {expr.v({'S': sk_value})}"
        return self._query(limit, IndexName=index, **expr.params(KeyConditionExpression=condition), **extra)

    def _transact(self, items: list[dict]) -> list[str] | None:
        """TransactWriteItems; None on success, else the cancellation reason codes.
        Transactions that lost to a concurrent one (TransactionConflict) are retried."""
        for attempt in range(TRANSACTION_ATTEMPTS):
            try:
                self._db.transact_write_items(TransactItems=items)
                return None
            except self._db.exceptions.TransactionCanceledException as exc:
                codes = _cancellation_codes(exc)
                if "TransactionConflict" not in codes or "ConditionalCheckFailed" in codes:
                    return codes or ["Unknown"]
            except self._db.exceptions.TransactionConflictException:
                pass
            time.sleep(random.uniform(0, 0.02 * 2**attempt))
        raise StorageUnavailable("dynamodb: transaction kept conflicting with concurrent writes", RETRY_AFTER)

    def _batch_write(self, requests: list[dict]) -> None:
        for start in range(0, len(requests), BATCH_WRITE_SIZE):
            pending = {self.table: requests[start : start + BATCH_WRITE_SIZE]}
            for attempt in range(10):
                unprocessed = self._db.batch_write_item(RequestItems=pending).get("UnprocessedItems")
                if not unprocessed:
                    break
                pending = unprocessed
                time.sleep(random.uniform(0, 0.05 * 2**attempt))
            else:
                raise StorageUnavailable("dynamodb: batch write kept being throttled", RETRY_AFTER)

    # ----------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._client is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="dynamodb")
        loop = asyncio.get_running_loop()
        try:
            self._client = await loop.run_in_executor(self._executor, self._connect)
        except BaseException as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            if _is_boto_error(exc):
                raise StorageError(f"dynamodb: cannot open table {self.table}: {exc}") from exc
            raise

    def _connect(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            max_pool_connections=self.workers,
            connect_timeout=5,
            read_timeout=15,
            retries={"mode": "standard", "max_attempts": 5},
        )
        client = boto3.session.Session().client(
            "dynamodb", endpoint_url=self.endpoint or None, config=config
        )
        self._ensure_table(client)
        return client

    def _ensure_table(self, client: Any) -> None:
        try:
            description = client.describe_table(TableName=self.table)["Table"]
        except client.exceptions.ResourceNotFoundException:
            description = None
        if description is None:
            try:
                client.create_table(**self._table_spec())
            except client.exceptions.ResourceInUseException:
                pass  # another process is creating it: wait for it below
        description = self._wait_active(client)
        indexes = {i["IndexName"] for i in description.get("GlobalSecondaryIndexes", [])}
        missing = {*GSIS, EXP_INDEX} - indexes
        if missing:
            raise StorageError(
                f"dynamodb: table {self.table} lacks the indexes {', '.join(sorted(missing))}"
            )
        ttl = client.describe_time_to_live(TableName=self.table).get("TimeToLiveDescription", {})
        if ttl.get("TimeToLiveStatus") in (None, "DISABLED"):
            try:
                client.update_time_to_live(
                    TableName=self.table,
                    TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
                )
            except client.exceptions.ClientError as exc:
                # Another process enabled it meanwhile ("already enabled" / in progress).
                if _error_code(exc) != "ValidationException":
                    raise

    def _wait_active(self, client: Any) -> dict:
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                description = client.describe_table(TableName=self.table)["Table"]
            except client.exceptions.ResourceNotFoundException:
                description = {}
            ready = description.get("TableStatus") == "ACTIVE" and all(
                index.get("IndexStatus") == "ACTIVE"
                for index in description.get("GlobalSecondaryIndexes", [])
            )
            if ready:
                return description
            if time.monotonic() > deadline:
                raise StorageError(f"dynamodb: table {self.table} did not become ACTIVE")
            time.sleep(0.5)

    def _table_spec(self) -> dict:
        def index(name: str, projection: str) -> dict:
            return {
                "IndexName": name,
                "KeySchema": [
                    {"AttributeName": f"{name}PK", "KeyType": "HASH"},
                    {"AttributeName": f"{name}SK", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": projection},
            }

        return {
            "TableName": self.table,
            "BillingMode": "PAY_PER_REQUEST",
            "AttributeDefinitions": [
                {"AttributeName": name, "AttributeType": "S"} for name in KEY_ATTRIBUTES
            ],
            "KeySchema": [
                {"AttributeName": "PK", "KeyType": "HASH"},
                {"AttributeName": "SK", "KeyType": "RANGE"},
            ],
            "GlobalSecondaryIndexes": [
                *(index(name, "ALL") for name in GSIS),
                index(EXP_INDEX, "KEYS_ONLY"),
            ],
        }

    async def close(self) -> None:
        executor, client = self._executor, self._client
        if executor is None:
            return
        self._executor = self._client = None
        try:
            if client is not None:
                await asyncio.get_running_loop().run_in_executor(executor, client.close)
        finally:
            executor.shutdown(wait=False)

    async def ping(self) -> None:
        await self._run(
            lambda: self._db.get_item(TableName=self.table, Key=_key("PING", "PING"))
        )

    # --------------------------------------------------------------------- users

    async def upsert_user(self, user: User) -> User:
        return await self._run(self._upsert_user, user)

    def _upsert_user(self, user: User) -> User:
        expr = _Expr()
        encoded = USERS.encode(user)
        sets = [f"{expr.n(name)} = {expr.v(value)}" for name, value in encoded.items() if name != "created_at"]
        sets.append(f"{expr.n('created_at')} = if_not_exists({expr.n('created_at')}, {expr.v(encoded['created_at'])})")
        indexes = _user_indexes(user)
        sets += [f"{expr.n(name)} = {expr.v(value)}" for name, value in indexes.items()]
        removes = [expr.n(a) for g in ("GSI1", "GSI2") for a in (f"{g}PK", f"{g}SK") if a not in indexes]
        response = self._update(
            _user_key(user.sub), expr, _update_expression(sets, removes=removes), ReturnValues="ALL_NEW"
        )
        assert response is not None  # unconditional
        return USERS.decode(response["Attributes"])

    async def get_user(self, sub: str) -> User | None:
        return await self._run(self._get, _user_key(sub), USERS)

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

    # ------------------------------------------------------------------- servers

    async def create_server(self, server: Server) -> None:
        if not await self._run(self._put, _server_item(server), True):
            raise Conflict(f"server {server.server_id} exists")

    async def update_server(self, server: Server) -> None:
        def replace() -> None:
            try:
                self._db.put_item(
                    TableName=self.table,
                    Item=_server_item(server),
                    ConditionExpression="attribute_exists(PK)",
                )
            except self._db.exceptions.ConditionalCheckFailedException:
                raise KeyError(server.server_id) from None

        await self._run(replace)

    async def get_server(self, server_id: str) -> Server | None:
        return await self._run(self._get, _server_key(server_id), SERVERS)

    async def list_servers(self) -> list[Server]:
        items = await self._run(self._query_index, "GSI3", "SERVERS")
        return _sorted([SERVERS.decode(i) for i in items], lambda s: (s.created_at, s.server_id))

    async def servers_owned_by(self, sub: str) -> list[Server]:
        items = await self._run(self._query_index, "GSI1", f"OWNER#{_esc(sub)}")
        return _sorted([SERVERS.decode(i) for i in items], lambda s: (s.created_at, s.server_id))

    async def bind_owner(self, email: str, sub: str) -> int:
        return await self._run(self._bind_owner, email, sub)

    def _bind_owner(self, email: str, sub: str) -> int:
        bound = 0
        for item in self._query_index("GSI2", f"OWNEREMAIL#{_esc(email)}"):
            server = SERVERS.decode(item)
            if server.owner_sub:
                continue
            created = f"{_ts(server.created_at)}#{server.server_id}"
            expr = _Expr()
            update = (
                f"SET {expr.n('owner_sub')} = {expr.v({'S': sub})}, "
                f"{expr.n('GSI1PK')} = {expr.v({'S': f'OWNER#{_esc(sub)}'})}, "
                f"{expr.n('GSI1SK')} = {expr.v({'S': created})}"
            )
            condition = (
                f"{expr.n('owner_sub')} = {expr.v({'S': ''})} "
                f"AND {expr.n('owner_email')} = {expr.v({'S': email})}"
            )
            if self._update(_server_key(server.server_id), expr, update, condition) is not None:
                bound += 1
        return bound

    async def delete_server(self, server_id: str) -> bool:
        return await self._run(self._delete_server, server_id)

    def _delete_server(self, server_id: str) -> bool:
        # Children first, the server last: a failure half-way leaves a server whose
        # deletion can simply be repeated, never orphans that nobody lists.
        pk = f"SERVER#{_esc(server_id)}"
        children = [
            _key(pk, item["SK"]["S"])
            for item in self._query_partition(pk, sk_prefix="GRANT#", ProjectionExpression="PK, SK")
        ]
        children += [
            _key(item["PK"]["S"], item["SK"]["S"])
            for item in self._query_index("GSI1", f"SRVSESS#{_esc(server_id)}")
        ]
        self._batch_write([{"DeleteRequest": {"Key": key}} for key in children])
        return self._delete(_server_key(server_id)) is not None

    async def add_grant(self, grant: Grant) -> bool:
        return await self._run(self._put, _grant_item(grant), True)

    async def remove_grant(self, server_id: str, kind: str, value: str) -> bool:
        return await self._run(self._delete, _grant_key(server_id, kind, value)) is not None

    async def grants_for(self, server_id: str) -> list[Grant]:
        items = await self._run(self._query_partition, f"SERVER#{_esc(server_id)}", "GRANT#")
        return _sorted([GRANTS.decode(i) for i in items], lambda g: (g.kind, g.value))

    async def grants_matching(self, kind: str, value: str) -> list[Grant]:
        items = await self._run(self._query_index, "GSI1", f"GRANT#{_esc(kind)}#{_esc(value)}")
        return _sorted([GRANTS.decode(i) for i in items], lambda g: g.server_id)

    async def users_matching(self, kind: str, value: str) -> list[User]:
        if kind == "email":
            index, pk = "GSI1", f"USEREMAIL#{_esc(value)}"  # verified e-mails only
        elif kind == "domain":
            index, pk = "GSI2", f"USERHD#{_esc(value)}"
        else:
            raise ValueError(f"unknown grant kind {kind!r}")
        items = await self._run(self._query_index, index, pk)
        users = [USERS.decode(i) for i in items]
        return _sorted(users, lambda u: (-u.last_login_at, u.sub))

    # ------------------------------------------------------------------- pending

    async def put_pending(self, pending: Pending) -> None:
        await self._run(self._put, _pending_item(pending))

    async def get_pending(self, kind: str, key: str, now: float) -> Pending | None:
        found = await self._run(self._get, _pending_key(kind, key), PENDING)
        return found if found is not None and found.expires_at > now else None

    async def take_pending(self, kind: str, key: str, now: float) -> Pending | None:
        expr = _Expr()
        condition = f"{expr.n('expires_at')} > {expr.v({'N': _num(now)})}"
        old = await self._run(self._delete, _pending_key(kind, key), condition, expr)
        return None if old is None else PENDING.decode(old)

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
        await self._run(self._put, {**key, **CONSENTS.encode(consent)})

    async def delete_consents(self, user_sub: str, client_id: str) -> int:
        return await self._run(self._delete_consents, user_sub, client_id)

    def _delete_consents(self, user_sub: str, client_id: str) -> int:
        pk = _consent_pk(user_sub, client_id)
        items = self._query_partition(pk, ProjectionExpression="PK, SK")
        return sum(self._delete(_key(pk, item["SK"]["S"])) is not None for item in items)

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

    # -------------------------------------------------------------- MCP sessions

    async def put_session(self, session: McpSession) -> None:
        await self._run(self._put, _session_item(session))

    async def get_session(self, session_id: str, now: float) -> McpSession | None:
        found = await self._run(self._get, _session_key(session_id), SESSIONS)
        return found if found is not None and found.expires_at > now else None

    async def touch_session(self, session_id: str, expires_at: float) -> None:
        expr = _Expr()
        stamp = _ts(expires_at)
        update = (
            f"SET {expr.n('expires_at')} = {expr.v({'N': _num(expires_at)})}, "
            f"{expr.n('GSI1SK')} = {expr.v({'S': f'{stamp}#{session_id}'})}, "
            f"{expr.n('EXPSK')} = {expr.v({'S': stamp})}, "
            f"{expr.n(TTL_ATTRIBUTE)} = {expr.v(_ttl(expires_at))}"
        )
        await self._run(
            self._update, _session_key(session_id), expr, update, f"attribute_exists({expr.n('PK')})"
        )

    async def delete_session(self, session_id: str) -> bool:
        return await self._run(self._delete, _session_key(session_id)) is not None

    async def count_sessions(self, server_id: str, now: float) -> int:
        return await self._run(self._count_sessions, server_id, now)

    def _count_sessions(self, server_id: str, now: float) -> int:
        # The key range does the work; the filter only settles sub-microsecond ties.
        expr = _Expr()
        condition = (
            f"{expr.n('GSI1PK')} = {expr.v({'S': f'SRVSESS#{_esc(server_id)}'})} "
            f"AND {expr.n('GSI1SK')} > {expr.v({'S': _ts(now)})}"
        )
        params = {
            "TableName": self.table,
            "IndexName": "GSI1",
            "Select": "COUNT",
            **expr.params(
                KeyConditionExpression=condition,
                FilterExpression=f"{expr.n('expires_at')} > {expr.v({'N': _num(now)})}",
            ),
        }
        total = 0
        while True:
            page = self._db.query(**params)
            total += page.get("Count", 0)
            if not page.get("LastEvaluatedKey"):
                return total
            params["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # --------------------------------------------------------------------- usage

    async def record_usage(self, events: list[UsageEvent]) -> None:
        if events:
            await self._run(self._record_usage, list(events))

    def _record_usage(self, events: list[UsageEvent]) -> None:
        # Pre-summing the batch turns N events into one UpdateItem per aggregate row.
        daily: dict[tuple[str, str, str, str], list] = {}
        hourly: dict[tuple[str, str, str, str], list] = {}
        users: dict[tuple[str, str], list] = {}
        for event in events:
            for sums, period in ((daily, _utc(event.at, "%Y-%m-%d")), (hourly, _utc(event.at, "%Y-%m-%dT%H"))):
                key = (event.server_id, period, event.target, event.user_sub)
                row = sums.get(key)
                if row is None:
                    row = sums[key] = [0, 0, 0.0, 0.0, [0] * LATENCY_BUCKETS]
                row[0] += 1
                row[1] += event.outcome != "ok"
                row[2] += event.latency_ms
                row[3] = max(row[3], event.latency_ms)
                row[4][latency_bucket(event.latency_ms)] += 1
            seen = users.get((event.server_id, event.user_sub))
            if seen is None:
                users[(event.server_id, event.user_sub)] = [event.user_email, event.at, event.at]
            else:
                if event.at >= seen[2]:
                    seen[0], seen[2] = event.user_email or seen[0], event.at
                seen[1] = min(seen[1], event.at)
        # Events first: the sequence orders events that share a timestamp, newest last.
        batch = f"{time.time_ns():020d}{random.getrandbits(32):08x}"
        puts = []
        for event in events:
            sort = f"{_ts(event.at)}#{batch}{next(_sequence) % 10**8:08d}"
            item = {**_key(f"EVENTS#{_esc(event.server_id)}", sort), **USAGE_EVENTS.encode(event)}
            puts.append({"PutRequest": {"Item": item}})
        # Which servers have event partitions: what purge_usage_events walks (no Scan).
        for server_id in {event.server_id for event in events}:
            puts.append({"PutRequest": {"Item": _key("USAGESERVERS", _esc(server_id))}})
        self._batch_write(puts)
        for key, totals in daily.items():
            self._add_aggregate("DAILY", "day", key, totals)
        for key, totals in hourly.items():
            self._add_aggregate("HOURLY", "hour", key, totals)
        for (server_id, user_sub), (email, first, last) in users.items():
            self._add_server_user(server_id, user_sub, email, first, last)

    def _add_aggregate(self, prefix: str, period_name: str, key: tuple, totals: list) -> None:
        server_id, period, target, user_sub = key
        calls, errors, latency_sum, latency_max, hist = totals
        pk = f"{prefix}#{_esc(server_id)}"
        item_key = _key(pk, f"{period}#{_esc(target)}#{_esc(user_sub)}")
        expr = _Expr()
        top = expr.v({"N": _num(latency_max)})
        maximum = expr.n("latency_ms_max")
        sets = [
            f"{expr.n(period_name)} = {expr.v({'S': period})}",
            f"{expr.n('server_id')} = {expr.v({'S': server_id})}",
            f"{expr.n('target')} = {expr.v({'S': target})}",
            f"{expr.n('user_sub')} = {expr.v({'S': user_sub})}",
            f"{maximum} = if_not_exists({maximum}, {top})",
        ]
        if prefix == "HOURLY":
            hour_start = datetime.strptime(period, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()
            ttl = _ttl(hour_start + HOURLY_KEPT_SECONDS + 3600)
            for name, value in {TTL_ATTRIBUTE: ttl, **_exp("hourly", pk, period)}.items():
                sets.append(f"{expr.n(name)} = {expr.v(value)}")
        adds = [
            f"{expr.n('calls')} {expr.v({'N': _num(calls)})}",
            f"{expr.n('errors')} {expr.v({'N': _num(errors)})}",
            f"{expr.n('latency_ms_sum')} {expr.v({'N': _num(latency_sum)})}",
            *(
                f"{expr.n(HIST_ATTRIBUTES[i])} {expr.v({'N': str(n)})}"
                for i, n in enumerate(hist)
                if n
            ),
        ]
        response = self._update(item_key, expr, _update_expression(sets, adds), ReturnValues="ALL_OLD")
        old = (response or {}).get("Attributes", {}).get("latency_ms_max")
        if old is not None and float(old["N"]) < latency_max:
            # DynamoDB has no max(): raise it only while it is lower (a rare second write).
            raise_max = _Expr()
            value = raise_max.v({"N": _num(latency_max)})
            name = raise_max.n("latency_ms_max")
            self._update(item_key, raise_max, f"SET {name} = {value}", f"{name} < {value}")

    def _add_server_user(self, server_id: str, user_sub: str, email: str, first: float, last: float) -> None:
        key = _key(f"USAGEUSERS#{_esc(server_id)}", f"U#{_esc(user_sub)}")
        expr = _Expr()
        last_used, first_used, mail = expr.n("last_used_at"), expr.n("first_used_at"), expr.n("user_email")
        at = expr.v({"N": _num(last)})
        sets = [
            f"{expr.n('server_id')} = {expr.v({'S': server_id})}",
            f"{expr.n('user_sub')} = {expr.v({'S': user_sub})}",
            f"{last_used} = {at}",
            f"{first_used} = if_not_exists({first_used}, {expr.v({'N': _num(first)})})",
            f"{mail} = {expr.v({'S': email})}" if email else f"{mail} = if_not_exists({mail}, {expr.v({'S': ''})})",
        ]
        # The usual case (this batch is the latest use) is one write; an older batch
        # arriving late only lowers first_used_at.
        condition = f"attribute_not_exists({last_used}) OR {last_used} <= {at}"
        response = self._update(key, expr, _update_expression(sets), condition, ReturnValues="ALL_NEW")
        stored_first = None if response is None else float(response["Attributes"]["first_used_at"]["N"])
        if stored_first is None or stored_first > first:
            lower = _Expr()
            name, value = lower.n("first_used_at"), lower.v({"N": _num(first)})
            self._update(key, lower, f"SET {name} = {value}", f"{name} > {value}")

    async def usage_aggregates(self, server_id: str, since_day: str) -> list[UsageAggregate]:
        items = await self._run(self._query_partition, f"DAILY#{_esc(server_id)}", "", since_day)
        aggregates = [
            UsageAggregate(
                day=i["day"]["S"],
                server_id=i["server_id"]["S"],
                target=i["target"]["S"],
                user_sub=i["user_sub"]["S"],
                calls=int(Decimal(i["calls"]["N"])),
                errors=int(Decimal(i["errors"]["N"])),
                latency_ms_sum=float(i["latency_ms_sum"]["N"]),
                latency_ms_max=float(i["latency_ms_max"]["N"]),
                latency_hist=_hist(i),
            )
            for i in items
        ]
        return _sorted(aggregates, lambda a: (a.day, a.target, a.user_sub))

    async def usage_rollup(self, server_id: str, since_day: str) -> list[UsageRollup]:
        return _rollup(await self._run(self._query_partition, f"DAILY#{_esc(server_id)}", "", since_day))

    async def usage_per_day(self, server_id: str, since_day: str) -> list[UsagePeriod]:
        items = await self._run(self._query_partition, f"DAILY#{_esc(server_id)}", "", since_day)
        return _periods(items, "day")

    async def usage_rollup_hours(self, server_id: str, since_hour: str) -> list[UsageRollup]:
        return _rollup(await self._run(self._query_partition, f"HOURLY#{_esc(server_id)}", "", since_hour))

    async def usage_per_hour(self, server_id: str, since_hour: str) -> list[UsagePeriod]:
        items = await self._run(self._query_partition, f"HOURLY#{_esc(server_id)}", "", since_hour)
        return _periods(items, "hour")

    async def server_users(self, server_id: str) -> list[ServerUser]:
        items = await self._run(self._query_partition, f"USAGEUSERS#{_esc(server_id)}", "U#")
        users = [SERVER_USERS.decode(i) for i in items]
        return _sorted(users, lambda u: (-u.last_used_at, u.user_sub))

    async def recent_usage(self, server_id: str, before: float, limit: int) -> list[UsageEvent]:
        if limit <= 0:
            return []
        return await self._run(self._recent_usage, server_id, before, limit)

    def _recent_usage(self, server_id: str, before: float, limit: int) -> list[UsageEvent]:
        expr = _Expr()
        condition = f"{expr.n('PK')} = {expr.v({'S': f'EVENTS#{_esc(server_id)}'})}"
        if math.isfinite(before):
            # Sort keys start with ts(at): every key of an event at `before` sorts above.
            condition += f" AND {expr.n('SK')} < {expr.v({'S': _ts(before)})}"
        page = self._db.query(
            TableName=self.table,
            ScanIndexForward=False,
            Limit=limit,
            ConsistentRead=True,
            **expr.params(KeyConditionExpression=condition),
        )
        return [USAGE_EVENTS.decode(i) for i in page.get("Items", [])]

    # -------------------------------------------------------------- housekeeping

    async def purge_usage_events(self, before: float, limit: int) -> int:
        return await self._run(self._purge_usage_events, before, limit)

    def _purge_usage_events(self, before: float, limit: int) -> int:
        # One Query per server's event partition (oldest first, keys below ts(before)),
        # found through the USAGESERVERS list, then batch deletes: never a Scan.
        purged = 0
        for server in self._query_partition("USAGESERVERS", ProjectionExpression="SK"):
            if purged >= limit:
                break
            expr = _Expr()
            condition = (
                f"{expr.n('PK')} = {expr.v({'S': 'EVENTS#' + server['SK']['S']})} "
                f"AND {expr.n('SK')} < {expr.v({'S': _ts(before)})}"
            )
            old = self._query(limit - purged, ProjectionExpression="PK, SK",
                              **expr.params(KeyConditionExpression=condition))
            self._batch_write([{"DeleteRequest": {"Key": {"PK": i["PK"], "SK": i["SK"]}}} for i in old])
            purged += len(old)
        return purged

    async def purge_expired(self, now: float) -> int:
        return await self._run(self._purge_expired, now)

    def _purge_expired(self, now: float) -> int:
        # TTL deletes all of this by itself, lazily; this catches up through the sparse
        # EXP index (no Scan). Every delete re-checks expiry, so a session touched
        # meanwhile survives. Families stay (revoked ones are listed); usage history stays.
        purged = 0
        stamp = _ts(now)
        for kind, attribute in (("pending", "expires_at"), ("code", "expires_at"),
                                ("session", "expires_at"), ("rt", "family_expires_at")):
            for key in self._expired_keys(kind, "<=", stamp):
                expr = _Expr()
                condition = f"{expr.n(attribute)} <= {expr.v({'N': _num(now)})}"
                purged += self._delete(key, condition, expr) is not None
        for key in self._expired_keys("family", "<=", stamp):
            family = self._get(key, FAMILIES)
            if family is None:
                continue
            if family.revoked_at == 0 and family.expires_at > now:
                continue
            tokens = self._query_index("GSI1", f"RTFAM#{_esc(family.family_id)}")
            purged += sum(
                self._delete(_key(t["PK"]["S"], t["SK"]["S"])) is not None for t in tokens
            )
            expr = _Expr()
            self._update(key, expr, f"REMOVE {expr.n('EXPPK')}, {expr.n('EXPSK')}")
        cutoff_hour = _utc(max(0.0, now - HOURLY_KEPT_SECONDS), "%Y-%m-%dT%H")
        for key in self._expired_keys("hourly", "<", cutoff_hour):
            expr = _Expr()
            condition = f"{expr.n('hour')} < {expr.v({'S': cutoff_hour})}"
            purged += self._delete(key, condition, expr) is not None
        for item in self._revoked_since(now, expired=True):
            expr = _Expr()
            condition = f"{expr.n('expires_at')} <= {expr.v({'N': _num(now)})}"
            purged += self._delete(_key(REVOKED_PK, item["SK"]["S"]), condition, expr) is not None
        return purged

    def _expired_keys(self, kind: str, op: str, bound: str) -> list[dict]:
        keys = []
        for shard in range(EXP_SHARDS):
            items = self._query_index(EXP_INDEX, f"EXP#{kind}#{shard}", op, bound)
            keys += [_key(i["PK"]["S"], i["SK"]["S"]) for i in items]
        return keys


# ------------------------------------------------------------------------- helpers


def _sorted(records: list[R], key: Callable[[R], Any]) -> list[R]:
    return sorted(records, key=key)


def _hist(item: dict) -> tuple[int, ...]:
    return tuple(int(Decimal(item[h]["N"])) if h in item else 0 for h in HIST_ATTRIBUTES)


def _rollup(items: list[dict]) -> list[UsageRollup]:
    """Per (target, user) sums of aggregate rows; histograms add up bucket by bucket."""
    sums: dict[tuple[str, str], list] = {}
    for item in items:
        key = (item["target"]["S"], item["user_sub"]["S"])
        row = sums.get(key)
        if row is None:
            row = sums[key] = [0, 0, 0.0, 0.0, [0] * LATENCY_BUCKETS]
        row[0] += int(Decimal(item["calls"]["N"]))
        row[1] += int(Decimal(item["errors"]["N"]))
        row[2] += float(item["latency_ms_sum"]["N"])
        row[3] = max(row[3], float(item["latency_ms_max"]["N"]))
        for i, n in enumerate(_hist(item)):
            row[4][i] += n
    return [
        UsageRollup(target, user, calls, errors, total, top, tuple(hist))
        for (target, user), (calls, errors, total, top, hist) in sorted(sums.items())
    ]


def _periods(items: list[dict], period_name: str) -> list[UsagePeriod]:
    sums: dict[str, list[int]] = {}
    for item in items:
        row = sums.setdefault(item[period_name]["S"], [0, 0])
        row[0] += int(Decimal(item["calls"]["N"]))
        row[1] += int(Decimal(item["errors"]["N"]))
    return [UsagePeriod(period, calls, errors) for period, (calls, errors) in sorted(sums.items())]


def _is_boto_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("botocore", "boto3"))


# Error codes of a table that cannot take the request just now (throttled, or the service
# is having trouble): the caller answers 503 with Retry-After. boto3's standard retry mode
# has already retried these before they reach us.
_UNAVAILABLE_CODES = frozenset({
    "ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
    "LimitExceededException", "InternalServerError", "ServiceUnavailable",
    "TransactionInProgressException",
})
RETRY_AFTER = 2  # seconds


def _storage_error(exc: Exception) -> StorageError:
    """The one mapping of a boto error to the storage contract's errors."""
    import botocore.exceptions as boto

    # No answer at all (connection refused or reset, a timeout) is unavailability too.
    transport = (boto.EndpointConnectionError, boto.ConnectionClosedError, boto.ConnectTimeoutError,
                 boto.ReadTimeoutError)
    if isinstance(exc, transport) or _error_code(exc) in _UNAVAILABLE_CODES:
        return StorageUnavailable(f"dynamodb: {exc}", RETRY_AFTER)
    return StorageError(f"dynamodb: {exc}")
