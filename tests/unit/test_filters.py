"""Pub/Sub's filter language: the documented examples and hostile filters, as a table."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from eventaudit.contract import decode_attributes, encode_attributes
from eventaudit.filters import FilterError, SubscriptionFilter

NAME_COM = {"name": "com"}
NAME_CO = {"name": "co"}
NAME_ORG = {"name": "org"}
NONE: dict[str, str] = {}

# (filter, attributes, delivered): the rows of Pub/Sub's documented table first.
CASES = [
    ("attributes:name", NAME_COM, True),
    ("attributes:name", NONE, False),
    ("NOT attributes:name", NONE, True),
    ("NOT attributes:name", NAME_COM, False),
    ('attributes.name = "com"', NAME_COM, True),
    ('attributes.name = "com"', NAME_ORG, False),
    ('attributes.name = "com"', NONE, False),
    ('attributes.name != "com"', NAME_ORG, True),
    ('attributes.name != "com"', NONE, True),  # != is NOT =: a missing attribute matches
    ('attributes.name != "com"', NAME_COM, False),
    ('hasPrefix(attributes.name, "co")', NAME_COM, True),
    ('hasPrefix(attributes.name, "co")', NAME_ORG, False),
    ('hasPrefix(attributes.name, "co")', NONE, False),
    ('NOT hasPrefix(attributes.name, "co")', NONE, True),
    ('NOT hasPrefix(attributes.name, "co")', NAME_COM, False),
    ('hasPrefix(attributes.name, "")', NAME_ORG, True),
    ("-attributes:name", NONE, True),
    ('-attributes.name = "com"', NAME_COM, False),
    # Boolean operators, as in the documentation's examples.
    ('attributes:domain AND attributes.domain = "com"', {"domain": "com"}, True),
    ('attributes:domain AND attributes.domain = "com"', {"domain": "org"}, False),
    ('attributes.domain = "com" OR attributes.domain = "org"', {"domain": "org"}, True),
    ('attributes.domain = "com" OR attributes.domain = "org"', {"domain": "net"}, False),
    ("(attributes:a OR attributes:b) AND attributes:c", {"b": "", "c": ""}, True),
    ("(attributes:a OR attributes:b) AND attributes:c", {"a": "", "b": ""}, False),
    ("attributes:a AND (attributes:b OR NOT attributes:c)", {"a": "x"}, True),
    ("NOT (attributes:a AND attributes:b)", {"a": "x"}, True),
    ("NOT NOT attributes:a", {"a": "x"}, True),
    # Exact, case-sensitive comparison of keys and values.
    ('attributes.name = "COM"', NAME_COM, False),
    ('attributes.NAME = "com"', NAME_COM, False),
    ('attributes.name = "co"', NAME_COM, False),
    ('attributes.name = "com"', {"name": "com "}, False),
    ('attributes.name = "com"', {"name": "com\n"}, False),
    # Keys: hyphens and underscores bare, anything else as a string literal.
    ('attributes.ce-type = "dev.x"', {"ce-type": "dev.x"}, True),
    ('attributes."iana.org/language_tag" = "en"', {"iana.org/language_tag": "en"}, True),
    ('attributes:"k:v"', {"k:v": "1"}, True),
    # String literals with escapes.
    ('attributes.q = "say \\"hi\\""', {"q": 'say "hi"'}, True),
    ('attributes.q = "a\\\\b"', {"q": "a\\b"}, True),
    ('attributes.q = "\\x41\\u00e9\\101"', {"q": "AéA"}, True),
    ('attributes.q = "ü"', {"q": "ü"}, True),
    ('attributes.q = "١٢"', {"q": "12"}, False),  # Arabic-Indic digits are not ASCII ones
    # The audit's own attributes are on every audited message: present, whatever the event's.
    ("attributes:eventID", NONE, True),
    ("NOT attributes:traceparent", NAME_COM, False),
    ("attributes:Options AND attributes:publishTime", NONE, True),
    ("attributes:eventid", NONE, False),  # keys are case-sensitive
    # Whitespace is free between tokens.
    ('  attributes . name="com"  ', NAME_COM, True),
    ('hasPrefix( attributes.name , "c" )', NAME_CO, True),
]


@pytest.mark.parametrize(("text", "attributes", "delivered"), CASES)
def test_a_filter_delivers_what_pubsub_delivers(
    text: str, attributes: dict[str, str], delivered: bool
) -> None:
    assert SubscriptionFilter.parse(text).matches(attributes) is delivered


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty filter"),
        ("   \n", "empty filter"),
        ("attributes:a AND attributes:b OR attributes:c", "AND and OR"),
        ("attributes:a OR attributes:b AND attributes:c", "AND and OR"),
        ("attributes.name = com", "expected string"),
        ('attributes.name == "com"', "expected string"),
        ("attributes.name", "expected = or !="),
        ('attributes.name > "1"', "unexpected character"),
        ('name = "com"', "expected a condition on attributes"),
        ('data.name = "com"', "expected a condition on attributes"),
        ("attributes:", "expected word"),
        ('attributes:""', "cannot be empty"),
        ("(attributes:a", r"expected \), found the end"),
        ("attributes:a)", r"unexpected '\)'"),
        ("attributes:a attributes:b", "unexpected 'attributes'"),
        ("and attributes:a", "expected a condition"),
        ("attributes:a and attributes:b", "unexpected 'and'"),
        ('hasPrefix(attributes:name, "co")', r"expected \."),
        ('hasSuffix(attributes.name, "co")', "expected a condition"),
        ('attributes.q = "\\q"', "unknown escape"),
        ('attributes.q = "\\x4"', "incomplete escape"),
        ('attributes.q = "\\x"', "incomplete escape"),
        ('attributes.q = "\\u12"', "incomplete escape"),
        ('attributes.q = "\\U0001F60"', "incomplete escape"),
        ('attributes.eventID = "e-1"', "compares eventID, set by the audit"),
        ('hasPrefix(attributes.traceparent, "00-")', "compares traceparent"),
        ('NOT attributes.Options != "{}"', "compares Options"),
        ('attributes.q = "\\ud800"', "not a character"),
        ('attributes.q = "\\U00110000"', "not a character"),
        ('attributes.q = "open', "unexpected character"),
        ("attributes.under_score:x", "expected = or !="),
        ("NOT", "expected a condition"),
        ("-", "expected a condition"),
        ("(" * 100 + "attributes:a" + ")" * 100, "nested too deeply"),
        ("NOT " * 70 + "attributes:a", "at most 256 bytes"),
        ("- " * 100 + "attributes:a", "nested too deeply"),
        ('attributes.k = "' + "x" * 300 + '"', "at most 256 bytes"),
        ("attributes:a\x00", "unexpected character"),
        ("attributes\uff1aa", "unexpected character"),  # a fullwidth colon
    ],
)
def test_a_filter_outside_the_language_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(FilterError, match=reason):
        SubscriptionFilter.parse(text)


@pytest.mark.parametrize(
    "attributes",
    [{}, {"kind": "a"}, {"b": "2", "a": "1"}, {"ünï": "cödé", "q": 'say "|" \\'}],
)
def test_attributes_encode_and_decode_back(attributes: dict[str, str]) -> None:
    encoded = encode_attributes(attributes)
    assert decode_attributes(encoded) == attributes
    assert "\n" not in encoded


@pytest.mark.parametrize("encoded", ["[1]", '{"a": 1}', "{", "[" * 5000, "null"])
def test_undecodable_attributes_never_match_and_never_raise(encoded: str) -> None:
    with pytest.raises(ValueError):
        decode_attributes(encoded)
    assert SubscriptionFilter.parse("NOT attributes:a").matches_encoded(encoded) is False


_PIECES = ["attributes", ".", ":", "=", "!=", "(", ")", ",", "-", "NOT", "AND", "OR",
           "hasPrefix", '"a"', '"\\x4"', '"\\u00e9"', '"\\', "k", "eventID", " ", "\n", "\x00",
           "é", '"', "\\", "1", "attributes.k", '"k"', "ü"]  # fmt: skip


def test_no_string_of_filter_tokens_raises_anything_but_a_filter_error() -> None:
    rng = random.Random(8)
    parsed = 0
    for _ in range(20_000):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12)))
        try:
            subscription_filter = SubscriptionFilter.parse(text)
        except FilterError:
            continue
        parsed += 1
        assert subscription_filter.matches({"k": "a"}) in (True, False)
    assert parsed >= 1


Predicate = Callable[[dict[str, str]], bool]


def _generated(rng: random.Random, depth: int = 0) -> tuple[str, Predicate]:
    """A random filter in the language, and a Python predicate that says what it matches."""
    choice = rng.randrange(7 if depth < 4 else 4)
    key = rng.choice(["k", "j", '"k"'])
    plain = key.strip('"')
    value = rng.choice(["a", "b", ""])
    if choice == 0:
        return f"attributes:{key}", lambda a: plain in a
    if choice == 1:
        return f'attributes.{key} = "{value}"', lambda a: a.get(plain) == value
    if choice == 2:
        return f'attributes.{key} != "{value}"', lambda a: a.get(plain) != value
    if choice == 3:
        return (
            f'hasPrefix(attributes.{key}, "{value}")',
            lambda a: a.get(plain, "\0").startswith(value) and plain in a,
        )
    if choice == 4:
        text, pred = _generated(rng, depth + 1)
        return f"NOT ({text})", lambda a: not pred(a)
    parts = [_generated(rng, depth + 1) for _ in range(rng.randint(2, 3))]
    joiner = " AND " if choice == 5 else " OR "
    combine = all if choice == 5 else any
    text = joiner.join(f"({t})" for t, _ in parts)
    return text, lambda a: combine(p(a) for _, p in parts)


def test_generated_filters_match_what_they_say() -> None:
    rng = random.Random(9)
    attribute_sets = [{}, {"k": "a"}, {"k": "b"}, {"j": ""}, {"k": "ab", "j": "a"}]
    checked = 0
    for _ in range(2_000):
        text, predicate = _generated(rng)
        if len(text.encode()) > 256:
            continue
        parsed = SubscriptionFilter.parse(text)
        for attributes in attribute_sets:
            assert parsed.matches(attributes) == predicate(attributes), (text, attributes)
        checked += 1
    assert checked > 1_000
