"""`Storage` on one DynamoDB table (single-table design, boto3 in a thread pool), for
several gateway instances behind a load balancer. The table layout, expiry and the
limits of this design: docs/storage.md."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..base import (
    Storage,
    StorageError,
    StorageUnavailable,
    User,
)
from .codecs import (
    FAMILIES,
    REVOKED_PK,
    USERS,
    _Codec,
    _esc,
    _Expr,
    _key,
    _num,
    _sorted,
    _ts,
    _user_key,
)
from .errors import RETRY_AFTER, _cancellation_codes, _is_boto_error, _storage_error
from .oauth import OAuthRecords
from .schema import EXP_INDEX, EXP_SHARDS, ensure_table
from .servers import ServerRecords
from .tools import DynamoDBTools
from .upstream_auth import DynamoDBUpstreamAuth
from .usage import DynamoDBUsage

T = TypeVar("T")

TRANSACTION_ATTEMPTS = 8
BATCH_WRITE_SIZE = 25


class DynamoDBStorage(ServerRecords, OAuthRecords, Storage):
    """`Storage` on the DynamoDB table `table` in `region` (`endpoint` for a local or
    compatible server). Credentials come from the usual boto3 chain."""

    def __init__(self, table: str, region: str, endpoint: str = "", workers: int = 16) -> None:
        self.table = table
        self.region = region
        self.endpoint = endpoint
        self.workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._client: Any = None
        self.usage = DynamoDBUsage(self)
        self.tools = DynamoDBTools(self)
        self.upstream_auth = DynamoDBUpstreamAuth(self)

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
        ensure_table(client, self.table)
        return client

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


    # ------------------------------------------------------- removing a user

    async def list_users(self) -> list[User]:
        items = await self._run(self._scan_users)
        return _sorted([USERS.decode(i) for i in items], lambda u: (u.email, u.sub))

    def _scan_users(self) -> list[dict]:
        # No index holds every user (GSI1 has verified e-mails only): one Scan, read by the
        # operator's `users list` alone; its cost grows with the whole table.
        expr = _Expr()
        params: dict[str, Any] = {
            "TableName": self.table,
            "ConsistentRead": True,
            **expr.params(FilterExpression=(
                f"{expr.n('SK')} = {expr.v({'S': 'USER'})} AND begins_with({expr.n('PK')}, {expr.v({'S': 'USER#'})})"
            )),
        }
        items: list[dict] = []
        while True:
            page = self._db.scan(**params)
            items.extend(page.get("Items", []))
            if not page.get("LastEvaluatedKey"):
                return items
            params["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    async def delete_user(self, sub: str) -> bool:
        return await self._run(self._delete, _user_key(sub)) is not None

    async def delete_user_sessions(self, sub: str) -> int:
        return await self._run(self._delete_user_sessions, sub)

    def _delete_user_sessions(self, sub: str) -> int:
        # Sessions are indexed by server only: one query per server, filtered to the user;
        # each delete re-checks the owner.
        deleted = 0
        for server in self._query_index("GSI3", "SERVERS", ProjectionExpression="server_id"):
            expr = _Expr()
            mine = f"{expr.n('user_sub')} = {expr.v({'S': sub})}"
            for item in self._query_index("GSI1", f"SRVSESS#{_esc(server['server_id']['S'])}", expr=expr,
                                          FilterExpression=mine):
                check = _Expr()
                condition = f"{check.n('user_sub')} = {check.v({'S': sub})}"
                deleted += self._delete(_key(item["PK"]["S"], item["SK"]["S"]), condition, check) is not None
        return deleted

    # -------------------------------------------------------------- housekeeping

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
        purged += self.usage.purge_old_hours(now)
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
