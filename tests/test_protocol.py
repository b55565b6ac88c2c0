"""services.proxy.protocol (jsonrpc, eras, sse): JSON-RPC parsing and scopes, era detection, 2026 routing headers,
response outcomes, and the SSE parser fed in every possible split."""

from __future__ import annotations

import base64
import json

import pytest

from services.common.scopes import SCOPE_CONNECT, SCOPE_INVOKE
from services.proxy.protocol.eras import (
    check_modern_headers,
    check_routing_headers,
    decode_header_value,
    detect_era,
    era_of,
)
from services.proxy.protocol.jsonrpc import (
    HEADER_MISMATCH,
    INVALID_PARAMS,
    INVALID_REQUEST,
    PARSE_ERROR,
    ProtocolError,
    body_outcome,
    jsonrpc_error,
    outcome_of,
    parse_body,
    parse_message,
    response_outcome,
    scope_for,
)
from services.proxy.protocol.sse import SseEvent, SseParser

MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}


def rpc(method: str, id: int | str | None = 1, **params: object) -> bytes:
    message: dict[str, object] = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        message["id"] = id
    if params:
        message["params"] = params
    return json.dumps(message).encode()


def modern(method: str, id: int | str | None = 1, **params: object) -> bytes:
    return rpc(method, id, _meta=META, **params)


# --------------------------------------------------------------------------- JSON-RPC


def test_request_notification_response() -> None:
    call = parse_body(rpc("tools/call", 7, name="search", arguments={"q": "x"}))
    assert not call.is_batch
    message = call.first
    assert (message.kind, message.method, message.id, message.target) == (
        "request",
        "tools/call",
        7,
        "search",
    )
    assert message.scope == SCOPE_INVOKE and message.needs_invoke and call.scope == SCOPE_INVOKE
    assert message.params == {"name": "search", "arguments": {"q": "x"}}

    note = parse_body(rpc("notifications/initialized", None)).first
    assert (note.kind, note.id, note.scope) == ("notification", None, SCOPE_CONNECT)

    answer = parse_body(b'{"jsonrpc":"2.0","id":"s-1","result":{"action":"accept"}}').first
    assert (answer.kind, answer.method, answer.id, answer.scope) == ("response", None, "s-1", SCOPE_CONNECT)
    error = parse_body(b'{"jsonrpc":"2.0","id":3,"error":{"code":-1,"message":"no"}}').first
    assert error.kind == "response"


def test_batch() -> None:
    body = b"[" + rpc("notifications/initialized", None) + b"," + rpc("tools/call", 2, name="t") + b"]"
    parsed = parse_body(body)
    assert parsed.is_batch and len(parsed.messages) == 2
    assert parsed.scope == SCOPE_INVOKE and parsed.has_requests
    assert [m.id for m in parsed.requests] == [2]
    summary = parse_message(body)
    assert (summary.kind, summary.method, summary.id, summary.needs_invoke) == (
        "batch",
        "notifications/initialized",
        None,
        True,
    )
    assert summary.members == parsed.messages
    only_connect = parse_message(b"[" + rpc("ping", 1) + b"," + rpc("tools/list", 2) + b"]")
    assert not only_connect.needs_invoke


@pytest.mark.parametrize(
    "method",
    [
        "initialize",
        "server/discover",
        "ping",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/roots/list_changed",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "tasks/list",
        "subscriptions/listen",
        "resources/subscribe",
        "resources/unsubscribe",
        "logging/setLevel",
    ],
)
def test_connect_methods(method: str) -> None:
    assert scope_for(method) == SCOPE_CONNECT


@pytest.mark.parametrize(
    "method",
    [
        "tools/call",
        "resources/read",
        "prompts/get",
        "completion/complete",
        "tasks/get",
        "tasks/result",
        "tasks/cancel",
        "sampling/createMessage",
        "vendor/experimental",
        "tools/listing",
    ],
)
def test_invoke_methods(method: str) -> None:
    assert scope_for(method) == SCOPE_INVOKE


@pytest.mark.parametrize(
    ("body", "target"),
    [
        (rpc("prompts/get", name="greet"), "greet"),
        (rpc("resources/read", uri="file:///a.txt"), "file:///a.txt"),
        (rpc("resources/subscribe", uri="memo://x"), "memo://x"),
        (rpc("tasks/get", taskId="task-9"), "task-9"),
        (rpc("completion/complete", ref={"type": "ref/prompt", "name": "greet"}), "greet"),
        (rpc("completion/complete", ref={"type": "ref/resource", "uri": "memo://{id}"}), "memo://{id}"),
        (rpc("tools/list"), None),
        (rpc("initialize", protocolVersion="2025-11-25"), None),
    ],
)
def test_targets(body: bytes, target: str | None) -> None:
    assert parse_body(body).first.target == target


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", PARSE_ERROR),
        (b"\xff\xfe", PARSE_ERROR),
        (b"", PARSE_ERROR),
        (b"[" * 100_000, PARSE_ERROR),
        (b"[]", INVALID_REQUEST),
        (b"42", INVALID_REQUEST),
        (b'"tools/call"', INVALID_REQUEST),
        (b"[1]", INVALID_REQUEST),
        (b'{"jsonrpc":"1.0","id":1,"method":"ping"}', INVALID_REQUEST),
        (b'{"id":1,"method":"ping"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":null,"method":"ping"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"ping"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":true,"method":"ping"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":{},"method":"ping"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"method":""}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"method":7}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"result":{},"error":{}}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}', INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}', INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":5}}', INVALID_PARAMS),
        (b'{"jsonrpc":"2.0","id":1,"method":"resources/read"}', INVALID_PARAMS),
    ],
)
def test_malformed_bodies(body: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_body(body)
    assert info.value.code == code
    assert info.value.http_status == 400
    error = json.loads(info.value.body())
    assert error["jsonrpc"] == "2.0" and error["error"]["code"] == code


def test_errors_echo_a_usable_id() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_body(b'{"jsonrpc":"2.0","id":"abc","method":"tools/call","params":{}}')
    assert info.value.id == "abc"
    assert json.loads(info.value.body())["id"] == "abc"


def test_jsonrpc_error() -> None:
    assert (
        jsonrpc_error(-32600, "bad") == b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"bad"}}'
    )
    assert json.loads(jsonrpc_error(-32020, "mismatch", 4, data={"header": "Mcp-Name"})) == {
        "jsonrpc": "2.0",
        "id": 4,
        "error": {"code": -32020, "message": "mismatch", "data": {"header": "Mcp-Name"}},
    }


# --------------------------------------------------------------------------- era


def test_era_of_legacy_traffic() -> None:
    assert detect_era("GET", {}, None) == detect_era("DELETE", None, None)
    get = detect_era("GET", {"mcp-protocol-version": "2025-06-18"}, None)
    assert (get.era, get.version, get.source) == ("legacy", "2025-06-18", "header")
    init = detect_era("POST", {}, parse_body(rpc("initialize", protocolVersion="2025-11-25")))
    assert (init.era, init.version, init.source) == ("legacy", "2025-11-25", "initialize")
    plain = detect_era("POST", {}, parse_body(rpc("tools/list")))
    assert (plain.era, plain.version, plain.source) == ("legacy", "2025-03-26", "default")
    call = detect_era("POST", {"MCP-Protocol-Version": "2025-11-25"}, parse_body(rpc("tools/call", name="x")))
    assert (call.era, call.version) == ("legacy", "2025-11-25")
    batch = b"[" + rpc("ping") + b"]"
    assert detect_era("POST", {"MCP-Protocol-Version": MODERN}, parse_body(batch)).era == "legacy"
    response = parse_body(b'{"jsonrpc":"2.0","id":1,"result":{}}')
    assert detect_era("POST", {}, response).era == "legacy"


def test_era_of_modern_traffic() -> None:
    era = detect_era("POST", {"MCP-Protocol-Version": MODERN}, parse_body(modern("server/discover")))
    assert (era.era, era.version, era.source, era.is_modern) == ("modern", MODERN, "claim", True)
    # A modern header without the _meta claim is forwarded: the upstream answers -32602 itself.
    bare = detect_era("POST", {"MCP-Protocol-Version": MODERN}, parse_body(rpc("tools/list")))
    assert (bare.era, bare.source) == ("modern", "header")
    # So is an unknown version: the upstream answers -32022 with what it supports.
    unknown = detect_era("POST", {"MCP-Protocol-Version": "2027-01-01"}, parse_body(rpc("tools/list")))
    assert (unknown.era, unknown.version) == ("modern", "2027-01-01")
    note = detect_era("POST", {"MCP-Protocol-Version": MODERN}, parse_body(rpc("notifications/x", None)))
    assert note.era == "modern"


@pytest.mark.parametrize(
    "headers", [{}, {"MCP-Protocol-Version": "2025-11-25"}, {"MCP-Protocol-Version": "2026-07-29"}]
)
def test_version_claim_must_match_the_header(headers: dict[str, str]) -> None:
    with pytest.raises(ProtocolError) as info:
        detect_era("POST", headers, parse_body(modern("tools/list", 9)))
    assert info.value.code == HEADER_MISMATCH and info.value.http_status == 400 and info.value.id == 9


def test_era_of_labels() -> None:
    assert era_of(parse_message(modern("tools/list")), {"MCP-Protocol-Version": MODERN}) == "2026"
    assert era_of(parse_message(modern("tools/list")), {}) == "2026"  # never raises
    assert era_of(parse_message(rpc("tools/list")), {"MCP-Protocol-Version": "2025-11-25"}) == "2025"
    assert era_of(None, {}) == "2025"


# --------------------------------------------------------------------------- 2026 headers


def headers_for(method: str, name: str | None = None) -> dict[str, str]:
    headers = {"MCP-Protocol-Version": MODERN, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    return headers


def b64(value: str) -> str:
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (modern("tools/call", name="search"), headers_for("tools/call", "search")),
        (modern("tools/call", name="héllo wörld"), headers_for("tools/call", b64("héllo wörld"))),
        (modern("tools/call", name=" padded "), headers_for("tools/call", b64(" padded "))),
        (modern("prompts/get", name="greet"), headers_for("prompts/get", "greet")),
        (modern("resources/read", uri="memo://a b"), headers_for("resources/read", b64("memo://a b"))),
        (modern("tools/list"), headers_for("tools/list")),
        (modern("tools/list"), {**headers_for("tools/list"), "Mcp-Name": "ignored"}),
        (modern("server/discover"), headers_for("server/discover")),
        (modern("tasks/get", taskId="t1"), headers_for("tasks/get")),  # task Mcp-Name checked when sent
        (modern("tasks/get", taskId="t1"), headers_for("tasks/get", "t1")),
        (rpc("notifications/initialized", None, _meta=META), {"MCP-Protocol-Version": MODERN}),
        (modern("tools/call", name="x"), {k.lower(): v for k, v in headers_for("tools/call", "x").items()}),
    ],
)
def test_matching_headers_pass(body: bytes, headers: dict[str, str]) -> None:
    message = parse_message(body)
    check_modern_headers(headers, message)
    check_routing_headers(message, headers)


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (modern("tools/call", name="search"), {"MCP-Protocol-Version": MODERN}),
        (modern("tools/call", name="search"), headers_for("tools/call")),
        (modern("tools/call", name="search"), headers_for("TOOLS/CALL", "search")),
        (modern("tools/call", name="search"), headers_for("tools/list", "search")),
        (modern("tools/call", name="search"), headers_for("tools/call", "Search")),
        (modern("tools/call", name="search"), headers_for("tools/call", "other")),
        (modern("tools/call", name="héllo"), headers_for("tools/call", "héllo")),  # raw non-ASCII
        (modern("tools/call", name="search"), headers_for("tools/call", "=?base64?!!!?=")),
        (modern("tools/call", name="search"), headers_for("tools/call", b64("searcH"))),
        (modern("resources/read", uri="memo://a"), headers_for("resources/read", "memo://b")),
        (modern("prompts/get", name="a"), headers_for("prompts/get")),
        (modern("tasks/cancel", taskId="t1"), headers_for("tasks/cancel", "t2")),
        (rpc("notifications/x", None, _meta=META), headers_for("notifications/y")),
    ],
)
def test_mismatching_headers_are_refused(body: bytes, headers: dict[str, str]) -> None:
    message = parse_message(body)
    with pytest.raises(ProtocolError) as info:
        check_routing_headers(message, headers)
    assert info.value.code == HEADER_MISMATCH and info.value.http_status == 400


def test_legacy_requests_need_no_routing_headers_but_must_not_lie() -> None:
    legacy = {"MCP-Protocol-Version": "2025-11-25"}
    check_routing_headers(parse_message(rpc("tools/call", name="search")), legacy)
    check_routing_headers(
        parse_message(rpc("tools/call", name="search")), {**legacy, "Mcp-Method": "tools/call"}
    )
    check_routing_headers(parse_message(b"[" + rpc("ping") + b"]"), legacy)
    with pytest.raises(ProtocolError) as info:
        check_routing_headers(
            parse_message(rpc("tools/call", name="search")), {**legacy, "Mcp-Name": "other"}
        )
    assert info.value.code == HEADER_MISMATCH


def test_decode_header_value() -> None:
    assert decode_header_value("plain") == "plain"
    assert decode_header_value(b64("日本")) == "日本"
    assert decode_header_value("=?BASE64?abc?=") == "=?BASE64?abc?="  # markers are case-sensitive
    for bad in ("=?base64?%%%?=", "tab\there", "ünïcode", b64("x")[:-2] + "=?="):
        with pytest.raises(ValueError):
            decode_header_value(bad)


# --------------------------------------------------------------------------- outcomes


def test_outcomes() -> None:
    ok = b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}'
    assert response_outcome(ok, 1) is not None and outcome_of(ok, 1) == "ok"
    tool_error = '{"jsonrpc":"2.0","id":"a","result":{"isError":true,"content":[]}}'
    assert outcome_of(tool_error, "a") == "tool_error"
    failed = b'{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"unknown tool"}}'
    outcome = response_outcome(failed, 1)
    assert outcome is not None and (outcome.ok, outcome.code, outcome.label) == (False, -32602, "-32602")
    assert outcome_of(failed, 2) is None  # another request's answer
    assert outcome_of(failed, "1") is None  # "1" and 1 are different ids
    assert outcome_of(b'{"jsonrpc":"2.0","method":"notifications/progress","params":{}}', 1) is None
    assert outcome_of(b"not json", 1) is None
    assert outcome_of(b"", 1) is None
    assert outcome_of(ok, None) is None
    batch = (
        b'[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"error":{"code":-1,"message":"x"}}]'
    )
    assert outcome_of(batch, 2) == "-1"
    pending = response_outcome('{"jsonrpc":"2.0","id":5,"result":{"resultType":"input_required"}}', 5)
    assert pending is not None and pending.result_type == "input_required"
    assert pending.label == "input_required"  # interim: the usage record waits for the retry


def test_body_outcome_agrees_with_outcome_of_on_whole_answers() -> None:
    """The proxy's label for a JSON answer: outcome_of, "ok" where that finds no answer."""
    bodies = [
        b'{"jsonrpc":"2.0","id":1,"result":{"content":[]}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"isError":true,"content":[]}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"isError": false}}',
        b'{"jsonrpc":"2.0","id":1,"result":{"isError" :\n true,"content":[]}}',
        b'{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"unknown tool"}}',
        b'{"jsonrpc":"2.0","id":2,"error":{"code":-1,"message":"another id"}}',
        b'[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":2,"error":{"code":-1,"message":"x"}}]',
        b'{"jsonrpc":"2.0","id":1,"result":{"text":"the word \\"error\\" in a result"}}',
        b"not json",
        b'{"jsonrpc":"2.0","id":1,"result":' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","requestState":"s"}}',
    ]
    for body in bodies:
        assert body_outcome(body, 1) == (outcome_of(body, 1) or "ok"), body
    assert body_outcome(bodies[1], 1) == "tool_error" and body_outcome(bodies[4], 1) == "-32602"
    assert body_outcome(bodies[-1], 1) == "input_required"
    assert body_outcome(bodies[3], 1) == "tool_error"  # whitespace around the colon
    assert body_outcome(b'{"jsonrpc":"2.0","id":1,"result":' + DEEP + b"}", 1) == "unknown"


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("data", [
    b'{"jsonrpc":"2.0","id":1,"result":' + DEEP + b"}",
    ('{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x","data":' + DEEP.decode() + "}}"),
    b"[" + b'{"jsonrpc":"2.0","id":1,"result":' + DEEP + b"}]",
])
def test_an_answer_nested_too_deeply_is_unknown_not_an_exception(data) -> None:
    """Issue 7, finding 15: upstream bytes 100,000 levels deep (RecursionError in json)."""
    outcome = response_outcome(data, 1)
    assert outcome is not None and (outcome.known, outcome.label) == (False, "unknown")
    assert outcome_of(data, 1) == "unknown"
    assert outcome_of(DEEP, 1) is None  # nothing that looks like an answer: not even parsed


def test_a_request_nested_too_deeply_is_a_parse_error() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_message(DEEP)
    assert (info.value.code, info.value.message, info.value.http_status) == (
        PARSE_ERROR, "parse error: nested too deeply", 400)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        parse_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":' + DEEP + b"}")


# --------------------------------------------------------------------------- SSE

STREAM = (
    b"\xef\xbb\xbfdata: first\n\n"  # a BOM opens the stream
    b": keepalive\r\n\r\n"  # comment only
    b'id: 7\r\nevent: message\r\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\r\ndata: line2\r\n\r\n'
    b"retry: 3000\rdata:no space\r\r"  # CR-only line ends
    b"data\n\n"  # a field name without a colon: empty data
    b"id: x\x00y\nretry: soon\nunknown: field\ndata: z\n\n"  # ignored id (NUL) and retry (not digits)
    b"\n"  # a stray blank line
    b"data: caf\xc3\xa9\n:trailing comment\ndata:  two spaces\r\n\n"  # UTF-8 and mixed line ends
    b"data: incomplete"  # no blank line yet
)
EXPECTED = [
    SseEvent(raw=b"\xef\xbb\xbfdata: first\n\n", data="first", has_data=True),
    SseEvent(raw=b": keepalive\r\n\r\n", comments=("keepalive",)),
    SseEvent(
        raw=b'id: 7\r\nevent: message\r\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\r\ndata: line2\r\n\r\n',
        id="7",
        event="message",
        data='{"jsonrpc":"2.0","id":1,"result":{}}\nline2',
        has_data=True,
    ),
    SseEvent(raw=b"retry: 3000\rdata:no space\r\r", data="no space", has_data=True, retry=3000),
    SseEvent(raw=b"data\n\n", data="", has_data=True),
    SseEvent(raw=b"id: x\x00y\nretry: soon\nunknown: field\ndata: z\n\n", data="z", has_data=True),
    SseEvent(raw=b"\n"),
    SseEvent(
        raw=b"data: caf\xc3\xa9\n:trailing comment\ndata:  two spaces\r\n\n",
        data="café\n two spaces",
        has_data=True,
        comments=("trailing comment",),
    ),
]


def feed_all(chunks: list[bytes]) -> tuple[list[SseEvent], SseParser]:
    parser = SseParser()
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser


def test_sse_in_one_piece() -> None:
    events, parser = feed_all([STREAM])
    assert events == EXPECTED
    assert b"".join(e.raw for e in events) + parser.pending_bytes == STREAM
    assert parser.pending == len(b"data: incomplete")
    assert EXPECTED[1].is_comment_only and not EXPECTED[4].is_comment_only
    assert EXPECTED[0].type == "message" and EXPECTED[2].type == "message"


def test_sse_split_at_every_byte_boundary() -> None:
    for cut in range(len(STREAM) + 1):
        events, parser = feed_all([STREAM[:cut], STREAM[cut:]])
        assert events == EXPECTED, f"split at {cut}"
        assert parser.pending_bytes == b"data: incomplete"


def test_sse_split_at_every_pair_of_boundaries() -> None:
    stream = STREAM[:200]
    reference, _ = feed_all([stream])
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            events, parser = feed_all([stream[:first], stream[first:second], stream[second:]])
            assert events == reference, f"split at {first}, {second}"


def test_sse_byte_by_byte() -> None:
    events, parser = feed_all([bytes([b]) for b in STREAM])
    assert events == EXPECTED
    assert b"".join(e.raw for e in events) + parser.pending_bytes == STREAM


def test_sse_events_come_out_as_soon_as_they_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\n") == []
    assert [e.data for e in parser.feed(b"\n")] == ["a"]  # LF ends it at once
    assert parser.feed(b"data: b\r\n\r") == []  # the last CR may be half of CRLF
    (event,) = parser.feed(b"\n")
    assert event.raw == b"data: b\r\n\r\n"  # ...and it was: the CRLF stays with its event
    assert parser.feed(b"data: c\r\r") == []
    (event,) = parser.feed(b"data: d")  # the next byte settles it
    assert (event.raw, event.data) == (b"data: c\r\r", "c")
    assert parser.pending_bytes == b"data: d"


def test_sse_flush_at_end_of_stream() -> None:
    parser = SseParser()
    assert parser.feed(b"data: last\r\r") == []
    (event,) = parser.flush()
    assert (event.raw, event.data) == (b"data: last\r\r", "last")
    assert parser.pending == 0
    parser = SseParser()
    parser.feed(b"data: cut off")
    assert parser.flush() == []  # an event without its blank line is not an event
    assert parser.pending_bytes == b"data: cut off"
    parser = SseParser()
    parser.feed(b"data: x\r")
    assert parser.flush() == []  # the CR ended a line, not the event
    assert parser.feed(b"\n") == [SseEvent(raw=b"data: x\r\n", data="x", has_data=True)]


def test_sse_large_event_in_many_chunks() -> None:
    payload = json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"text": "z" * 300_000}})
    stream = f"event: message\ndata: {payload}\n\n".encode()
    events, parser = feed_all([stream[i : i + 1000] for i in range(0, len(stream), 1000)])
    assert len(events) == 1 and events[0].data == payload and events[0].raw == stream
    assert outcome_of(events[0].data, 3) == "ok"


def test_sse_event_size_limit() -> None:
    parser = SseParser(max_event_size=100)
    parser.feed(b"data: " + b"x" * 50)
    with pytest.raises(ValueError, match="larger than 100"):
        parser.feed(b"x" * 60)
