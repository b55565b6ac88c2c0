"""Tool rules (services/proxy/tools/policy.py): patterns are validated and matched like
fnmatch.fnmatchcase without regular expressions; deny wins; read-only and pinning fail
closed; the server default binds everyone, the owner included; a person reached by several
grants gets the union of what each allows, each narrowed by the default."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.access import Principal
from services.common.errors import InvalidInput
from services.proxy.tools.policy import (
    MAX_PATTERN,
    MAX_PATTERNS,
    Matcher,
    ToolFacts,
    ToolPolicy,
    glob_match,
    parse_patterns,
    parse_rule,
    policy_for,
    unmatched,
)
from storage.base import Grant, Server
from storage.tools import ToolRule

RO = ToolFacts(read_only=True, approved=True)
RW = ToolFacts(read_only=False, approved=True)
RO_UNAPPROVED = ToolFacts(read_only=True, approved=False)

# Names and patterns over a small alphabet, so that matches are frequent.
names = st.text(alphabet="ab_.-é\x00", max_size=12)
patterns = st.text(alphabet="ab_*?", min_size=1, max_size=8)


# ------------------------------------------------------------------------ matching


@settings(max_examples=2000, deadline=None)
@given(pattern=patterns, name=names)
def test_glob_match_is_fnmatchcase_for_star_and_question_mark(pattern: str, name: str) -> None:
    assert glob_match(pattern, name) == fnmatch.fnmatchcase(name, pattern)


@settings(max_examples=1000, deadline=None)
@given(rule=st.lists(patterns, max_size=4), name=names)
def test_a_matcher_matches_when_any_of_its_patterns_does(rule: list[str], name: str) -> None:
    """Exact names, `*`-only globs (the fast path) and `?` globs (the walk) all agree with
    fnmatch."""
    assert Matcher(rule)(name) == any(fnmatch.fnmatchcase(name, p) for p in rule)


def test_odd_and_huge_names_are_matched_exactly_and_only_by_wildcards() -> None:
    huge = "a" * 10_000
    for name in ("búsqueda", "工具", "tab\there", "nul\x00byte", "\u202eevil", huge, huge + "b"):
        assert Matcher(["*"])(name) and not Matcher(["search", "a"])(name)
    # Backtracking-prone patterns against a 10 kB name: the right answer, no regex.
    assert not Matcher(["*a*a*a*a*a*a*a*b"])(huge) and Matcher(["*a*a*a*a*a*a*a*b"])(huge + "b")
    assert not Matcher(["*a?a*a?a*a*a*b"])(huge) and Matcher(["*a?a*a?a*a*a*b"])(huge + "b")
    assert Matcher(["a*"])(huge) and not Matcher(["b*"])(huge)


# ---------------------------------------------------------------------- validation


def test_patterns_parse_from_commas_spaces_and_lists_without_duplicates() -> None:
    assert parse_patterns("a, b*  c,,a", "f") == ("a", "b*", "c")
    assert parse_patterns("one\ntwo\r\n", "f") == ("one", "two")  # a textarea's lines
    assert parse_patterns(["github_*", "x.y/z:w", "t?"], "f") == ("github_*", "x.y/z:w", "t?")
    assert parse_patterns(None, "f") == () and parse_patterns("", "f") == () and parse_patterns([], "f") == ()
    assert parse_patterns("a" * MAX_PATTERN, "f") == ("a" * MAX_PATTERN,)


@pytest.mark.parametrize("value", [
    "[abc]", "a|b", "(a)", "búsqueda", "a\x00b", "bad\x7fname", "a" * (MAX_PATTERN + 1), "x" * 10_000,
    "\u202e", "a^b", "a$", "a\\b", "{a,b}",
])
def test_a_pattern_outside_the_safe_charset_is_refused_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_patterns(value, "tools_allow")
    assert caught.value.field == "tools_allow"
    message = str(caught.value)
    assert "\n" not in message and len(message) < 300 and "wildcards" in message


@pytest.mark.parametrize("value", [5, {"a": 1}, ["a", 3], [None], b"a"])
def test_a_tool_list_must_be_text_or_a_list_of_text(value: object) -> None:
    with pytest.raises(InvalidInput, match="text"):
        parse_patterns(value, "tools_deny")


def test_too_many_patterns_and_a_read_only_that_is_not_a_bool_are_refused() -> None:
    with pytest.raises(InvalidInput, match=f"at most {MAX_PATTERNS}"):
        parse_patterns([f"t{i}" for i in range(MAX_PATTERNS + 1)], "tools_allow")
    with pytest.raises(InvalidInput, match="true or false"):
        parse_rule(read_only="yes")
    assert parse_rule("a", "b", True) == ToolRule(("a",), ("b",), True)


def test_unmatched_names_the_patterns_that_match_no_catalog_tool() -> None:
    assert unmatched(("search", "git_*", "nothing_*", "x?"), ["search", "git_push", "xy"]) == ["nothing_*"]


# -------------------------------------------------------------------------- policy


def test_deny_wins_over_allow_and_an_allow_list_limits() -> None:
    policy = ToolPolicy(ToolRule(allow=("github_*", "search"), deny=("github_delete*",)), None, False)
    assert policy.decide("github_push", RW).allowed and policy.decide("search", RW).allowed
    refused = policy.decide("github_delete_repo", RW)
    assert not refused.allowed and refused.reason == "server_rule"
    assert policy.decide("fetch", RW).reason == "server_rule"  # not in the allow list
    assert not policy.unrestricted


def test_a_glob_that_matches_nothing_lets_nothing_through() -> None:
    policy = ToolPolicy(ToolRule(allow=("nothing_*",)), None, False)
    assert not any(policy.decide(name, RO).allowed for name in ("search", "fetch", "", "nothing"))
    assert policy.decide("nothing_here", RO).allowed


def test_read_only_needs_the_hint_in_the_catalog_and_fails_closed() -> None:
    policy = ToolPolicy(ToolRule(read_only=True), None, False)
    assert policy.decide("search", RO).allowed
    for facts in (RW, None):  # not read-only, or not in the catalog at all
        refused = policy.decide("search", facts)
        assert not refused.allowed and refused.reason == "read_only"


def test_pinning_passes_approved_definitions_only() -> None:
    policy = ToolPolicy(ToolRule(), None, True)
    assert not policy.unrestricted
    assert policy.decide("search", RO).allowed
    for facts in (RO_UNAPPROVED, None):
        assert policy.decide("search", facts).reason == "not_approved"


def test_the_owner_is_bound_by_the_default_but_not_by_grant_rules() -> None:
    owner = ToolPolicy(ToolRule(deny=("rm",)), None, False)
    assert not owner.decide("rm", RW).allowed and owner.decide("write", RW).allowed
    assert ToolPolicy(ToolRule(), None, False).unrestricted


def test_several_grants_give_the_union_each_narrowed_by_the_default() -> None:
    default = ToolRule(deny=("admin_*",))
    email = ToolRule(allow=("search", "admin_reset"))
    domain = ToolRule(read_only=True)
    policy = ToolPolicy(default, [email, domain], False)
    assert policy.decide("search", RW).allowed  # the e-mail grant allows it
    assert policy.decide("list_things", RO).allowed  # the domain grant: read-only tools
    assert policy.decide("write_things", RW).reason == "grant_rule"  # neither
    assert policy.decide("admin_reset", RW).reason == "server_rule"  # the default denies it for all
    assert ToolPolicy(default, [domain], False).decide("write_things", RW).reason == "read_only"
    assert ToolPolicy(ToolRule(), [], False).decide("search", RO).reason == "not_shared"
    assert ToolPolicy(ToolRule(), [email, ToolRule()], False).unrestricted  # one grant allows all


def _reference(default: ToolRule, grants: list[ToolRule] | None, pinned: bool, name: str,
               facts: ToolFacts | None) -> bool:
    """The rule as the issue states it, written the plain way."""

    def passes(rule: ToolRule) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in rule.deny):
            return False
        if rule.allow and not any(fnmatch.fnmatchcase(name, p) for p in rule.allow):
            return False
        return not rule.read_only or (facts is not None and facts.read_only)

    if not passes(default) or (pinned and (facts is None or not facts.approved)):
        return False
    return grants is None or any(passes(g) for g in grants)


rules = st.builds(ToolRule, st.lists(patterns, max_size=3).map(tuple), st.lists(patterns, max_size=2).map(tuple),
                  st.booleans())
facts = st.none() | st.builds(ToolFacts, st.booleans(), st.booleans())


@settings(max_examples=1500, deadline=None)
@given(default=rules, grants=st.none() | st.lists(rules, max_size=3), pinned=st.booleans(),
       name=names, tool=facts)
def test_decide_agrees_with_the_plain_statement_of_the_rule(default, grants, pinned, name, tool) -> None:
    decision = ToolPolicy(default, grants, pinned).decide(name, tool)
    assert decision.allowed == _reference(default, grants, pinned, name, tool)
    assert decision.allowed == (decision.reason == "")


# ------------------------------------------------------- who gets which rules


def server(**rule) -> Server:
    return Server("srv_a", "A", "http://127.0.0.1:9/mcp", owner_sub="u-owner", owner_email="o@x.org", **rule)


def test_policy_for_applies_the_grants_that_reach_the_caller() -> None:
    srv = server(tools_deny=("rm",))
    grants = (Grant("srv_a", "email", "bob@x.org", tools_allow=("search",)),
              Grant("srv_a", "domain", "x.org", tools_read_only=True),
              Grant("srv_a", "email", "eve@y.org", tools_allow=("*",)))
    owner = policy_for(Principal("u-owner"), srv, grants)
    assert owner.grants is None and owner.decide("write", RW).allowed and not owner.decide("rm", RW).allowed
    bob = policy_for(Principal("u-bob", email="bob@x.org", hd="x.org"), srv, grants)
    assert bob.decide("search", RW).allowed and bob.decide("list", RO).allowed
    assert not bob.decide("write", RW).allowed
    # The domain grant only (no verified e-mail in the token): read-only.
    carol = policy_for(Principal("u-carol", hd="x.org"), srv, grants)
    assert not carol.decide("search", RW).allowed and carol.decide("search", RO).allowed
    # An e-mail suffix is not a domain grant; a stranger gets nothing.
    for stranger in (Principal("u-dan", email="dan@x.org"), Principal("u-x")):
        assert policy_for(stranger, srv, grants).decide("list", RO).reason == "not_shared"


def test_before_the_owner_signs_in_their_verified_email_is_the_owner() -> None:
    srv = Server("srv_a", "A", "http://127.0.0.1:9/mcp", owner_email="o@x.org", tools_allow=("search",))
    grants = (Grant("srv_a", "email", "o@x.org", tools_deny=("search",)),)
    policy = policy_for(Principal("u-o", email="o@x.org"), srv, grants)
    assert policy.grants is None and policy.decide("search", RW).allowed
    assert not policy.decide("write", RW).allowed
