"""DynamoDB: users, servers, grants, pending states and MCP sessions."""

from __future__ import annotations

from ..base import (
    Conflict,
    Grant,
    McpSession,
    Pending,
    Server,
    User,
)
from .codecs import (
    GRANTS,
    PENDING,
    SERVERS,
    SESSIONS,
    TTL_ATTRIBUTE,
    USERS,
    _esc,
    _Expr,
    _grant_item,
    _grant_key,
    _key,
    _num,
    _pending_item,
    _pending_key,
    _server_item,
    _server_key,
    _session_item,
    _session_key,
    _sorted,
    _ts,
    _ttl,
    _update_expression,
    _user_indexes,
    _user_key,
)


class ServerRecords:
    """Users, servers and their sharing rules, pending states and MCP sessions (a mixin of
    DynamoDBStorage, whose plumbing it uses)."""

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
        # Grants, tool catalog entries and tool history lines share the server's partition.
        children = [
            _key(pk, item["SK"]["S"])
            for item in self._query_partition(pk, ProjectionExpression="PK, SK")
            if item["SK"]["S"] != "SERVER"
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
