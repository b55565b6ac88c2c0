"""Records <-> DynamoDB items: attribute codecs, the key and index attributes of every
record, and expression placeholders."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from decimal import Decimal
from typing import Any, TypeVar, get_origin, get_type_hints

from ..base import (
    AuthCode,
    Client,
    Consent,
    Grant,
    McpSession,
    Pending,
    RefreshFamily,
    RefreshToken,
    RevokedAccessToken,
    Server,
    SigningKey,
    User,
    legacy_internal_upstream,
)
from ..tools import ToolChange, ToolEntry
from ..usage import (
    LATENCY_BUCKETS,
    ServerUser,
    UsageEvent,
)
from .schema import EXP_SHARDS, TTL_ATTRIBUTE

R = TypeVar("R")

HIST_ATTRIBUTES = tuple(f"h{i}" for i in range(LATENCY_BUCKETS))
REVOKED_PK = "REVOKED"
SIGNING_PK = "SIGNINGKEYS"
ACTIVE_SK = "ACTIVE"


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
TOOL_ENTRIES = _Codec(ToolEntry)
TOOL_CHANGES = _Codec(ToolChange)


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


def _tool_key(server_id: str, name: str) -> dict:
    return _key(f"SERVER#{_esc(server_id)}", f"TOOL#{_esc(name)}")


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



def _sorted(records: list[R], key: Callable[[R], Any]) -> list[R]:
    return sorted(records, key=key)
