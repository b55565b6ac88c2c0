"""Tool rules: validating name and glob patterns, matching them without regular expressions,
and the effective policy of one caller on one server (`ToolPolicy.decide`). Pure, no I/O."""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from services.common.access import Principal, decide_for
from services.common.errors import InvalidInput
from storage.base import Grant, Server
from storage.tools import ToolRule

# What a rule may name: MCP's recommended tool-name characters (letters, digits, _ - .)
# plus / and : (namespaced names), and the wildcards * (any run) and ? (one character).
PATTERN_CHARS = frozenset(string.ascii_letters + string.digits + "_-./:*?")
MAX_PATTERN = 128
MAX_PATTERNS = 100  # per list


@dataclass(frozen=True, slots=True)
class ToolFacts:
    """What the catalog says about one tool definition: is it read-only (annotations'
    readOnlyHint is True), and is it the definition the owner approved (pinning)."""

    read_only: bool
    approved: bool


@dataclass(frozen=True, slots=True)
class ToolDecision:
    allowed: bool
    reason: str = ""  # "" when allowed, else server_rule | grant_rule | read_only | not_approved | not_shared
    message: str = ""


ALLOWED = ToolDecision(True)


# --------------------------------------------------------------------------- patterns


def parse_patterns(value: object, field: str) -> tuple[str, ...]:
    """A list of tool names and globs from a comma- or space-separated string or a list of
    strings; duplicates dropped, order kept. Raise InvalidInput naming `field`."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise InvalidInput("a tool list must be text or a list of text", field)
    patterns: list[str] = []
    for item in items:
        for part in item.replace(",", " ").split():
            if len(part) > MAX_PATTERN or not set(part) <= PATTERN_CHARS:
                shown = part if len(part) <= 40 else part[:40] + "…"
                raise InvalidInput(
                    f"{shown!r} is not a tool name or glob: up to {MAX_PATTERN} letters, digits, "
                    "'_', '-', '.', '/', ':' and the wildcards '*' and '?'", field)
            if part not in patterns:
                patterns.append(part)
    if len(patterns) > MAX_PATTERNS:
        raise InvalidInput(f"at most {MAX_PATTERNS} tool names or globs per list", field)
    return tuple(patterns)


def parse_rule(allow: object = None, deny: object = None, read_only: object = False) -> ToolRule:
    """A validated rule (the fields are as the dashboard's form or the CLI give them)."""
    if not isinstance(read_only, bool):
        raise InvalidInput("read-only must be true or false", "read_only")
    return ToolRule(parse_patterns(allow, "tools_allow"), parse_patterns(deny, "tools_deny"), read_only)


def glob_match(pattern: str, name: str) -> bool:
    """fnmatch.fnmatchcase(name, pattern) for patterns whose only wildcards are `*` and `?`
    (validated patterns have no `[`), without building a regular expression: a walk that
    backtracks to the last `*` only, O(len(pattern) * len(name)) at worst."""
    p = n = 0
    star, mark = -1, 0
    plen, nlen = len(pattern), len(name)
    while n < nlen:
        if p < plen and (pattern[p] == "?" or pattern[p] == name[n]) and pattern[p] != "*":
            p += 1
            n += 1
        elif p < plen and pattern[p] == "*":
            star, mark = p, n
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            n = mark
        else:
            return False
    while p < plen and pattern[p] == "*":
        p += 1
    return p == plen


def _star_glob(pattern: str) -> Callable[[str], bool]:
    """A matcher for a glob with `*` only: the literal pieces in order, found with str
    methods (C speed; leftmost-first is exact when every wildcard is `*`)."""
    head, *middle, tail = pattern.split("*")
    least = len(head) + len(tail) + sum(map(len, middle))

    def match(name: str) -> bool:
        if len(name) < least or not name.startswith(head) or not name.endswith(tail):
            return False
        at, end = len(head), len(name) - len(tail)
        for piece in middle:
            found = name.find(piece, at, end)
            if found < 0:
                return False
            at = found + len(piece)
        return True

    return match


def _question_glob(pattern: str) -> Callable[[str], bool]:
    """A matcher for a glob with `?` only: same length, and equal where it is not `?`."""
    fixed = tuple((i, c) for i, c in enumerate(pattern) if c != "?")
    size = len(pattern)

    def match(name: str) -> bool:
        if len(name) != size:
            return False
        for i, c in fixed:
            if name[i] != c:
                return False
        return True

    return match


class Matcher:
    """A set of names and globs: exact names by one set lookup, then each glob."""

    __slots__ = ("names", "globs")

    def __init__(self, patterns: Iterable[str]) -> None:
        names, globs = set(), []
        for pattern in patterns:
            if "?" in pattern and "*" not in pattern:
                globs.append(_question_glob(pattern))
            elif "?" in pattern:
                globs.append(functools.partial(glob_match, pattern))
            elif "*" in pattern:
                globs.append(_star_glob(pattern))
            else:
                names.add(pattern)
        self.names = frozenset(names)
        self.globs = tuple(globs)

    def __call__(self, name: str) -> bool:
        if name in self.names:
            return True
        for glob in self.globs:  # a loop, not any(): no generator on the hot path
            if glob(name):
                return True
        return False


def unmatched(patterns: Sequence[str], names: Iterable[str]) -> list[str]:
    """The patterns that match none of `names` (the catalog): worth a warning, not an error,
    since a rule may be set before the tool was ever listed."""
    names = list(names)
    return [p for p in patterns if not any(Matcher((p,))(n) for n in names)]


# ------------------------------------------------------------------------- the policy


@dataclass(frozen=True, slots=True)
class CompiledRule:
    allow: Matcher | None  # None: no allow list
    deny: Matcher
    read_only: bool

    def refusal(self, name: str, facts: ToolFacts | None) -> str:
        """"" when the rule lets the tool through, else "rule" or "read_only"."""
        if self.deny(name) or (self.allow is not None and not self.allow(name)):
            return "rule"
        if self.read_only and (facts is None or not facts.read_only):
            return "read_only"  # not in the catalog, or no readOnlyHint: not read-only
        return ""


@functools.lru_cache(maxsize=4096)
def compile_rule(rule: ToolRule) -> CompiledRule:
    return CompiledRule(Matcher(rule.allow) if rule.allow else None, Matcher(rule.deny), rule.read_only)


class ToolPolicy:
    """What one caller may do on one server. The server's default rule applies to
    everyone, the owner included; the owner is not limited by grant rules. Anyone else
    passes if at least one of the grants that reach them (an e-mail grant and a domain grant
    may both) lets the tool through: the union of what each grant allows, each narrowed by
    the default. On a pinned server only approved definitions pass."""

    __slots__ = ("default", "grants", "pinned", "unrestricted")

    def __init__(self, default: ToolRule, grants: Sequence[ToolRule] | None, pinned: bool) -> None:
        self.default = compile_rule(default)
        self.grants = None if grants is None else tuple(compile_rule(g) for g in grants)
        self.pinned = pinned
        # Every tool passes: the proxy may skip buffering and filtering (not the catalog).
        self.unrestricted = (not pinned and default.empty
                             and (grants is None or any(g.empty for g in grants)))

    def decide(self, name: str, facts: ToolFacts | None) -> ToolDecision:
        """May the caller use tool `name`, whose catalog facts are `facts` (None: not in
        the catalog)? Fail closed: no facts means not read-only and not approved."""
        if self.unrestricted:
            return ALLOWED
        refusal = self.default.refusal(name, facts)
        if refusal:
            if refusal == "read_only":
                return ToolDecision(False, "read_only", "this server's tools are shared read-only")
            return ToolDecision(False, "server_rule", "this tool is switched off on this server")
        if self.pinned and (facts is None or not facts.approved):
            return ToolDecision(False, "not_approved", "this tool's definition awaits the owner's approval")
        if self.grants is None:
            return ALLOWED
        if not self.grants:
            return ToolDecision(False, "not_shared", "this server has not been shared with your account")
        refusals = [grant.refusal(name, facts) for grant in self.grants]
        if "" in refusals:
            return ALLOWED
        if all(r == "read_only" for r in refusals):
            return ToolDecision(False, "read_only", "this server is shared with you read-only")
        return ToolDecision(False, "grant_rule", "this tool is not shared with you")


def policy_for(principal: Principal, server: Server, grants: Sequence[Grant]) -> ToolPolicy:
    """The policy of `principal` on `server`, from the records the access cache holds; who
    is the owner and which grants reach whom is the one sharing rule (access.decide_for)."""
    default = ToolRule.of(server)
    if decide_for(principal, server, ()).allowed:
        return ToolPolicy(default, None, server.tools_pinned)
    reaching = [ToolRule.of(g) for g in grants if decide_for(principal, server, (g,)).allowed]
    return ToolPolicy(default, reaching, server.tools_pinned)
