"""Pub/Sub's subscription filter language, parsed and evaluated against message attributes.

The grammar (Pub/Sub's documentation, "Filter messages from a subscription"):

    filter     := expression
    expression := term (AND term)* | term (OR term)*   -- AND and OR mix only in parentheses
    term       := (NOT | '-') term | '(' expression ')' | condition
    condition  := attributes:KEY | attributes.KEY = "v" | attributes.KEY != "v"
                | hasPrefix(attributes.KEY, "p")
    KEY        := letters, digits, '-' and '_', or a string literal

`!=` is `NOT =` (a message without the attribute matches it), keys and values are compared
exactly (case-sensitive), and a filter is at most 256 bytes. Anything else is a FilterError:
the exporter then reports the subscription as unsupported rather than guess what it expects.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from eventaudit.contract import CONTRACT_ATTRIBUTES, decode_attributes

MAX_FILTER_BYTES = 256
_MAX_DEPTH = 64  # a filter of 256 bytes nests at most ~128 deep; a parse stays far from the limit


class FilterError(ValueError):
    """A filter that is not in the language this module evaluates."""


@dataclass(frozen=True, slots=True)
class Has:
    """attributes:KEY"""

    key: str


@dataclass(frozen=True, slots=True)
class Equals:
    """attributes.KEY = "value" (negated: `!=`)."""

    key: str
    value: str


@dataclass(frozen=True, slots=True)
class HasPrefix:
    """hasPrefix(attributes.KEY, "prefix")"""

    key: str
    prefix: str


@dataclass(frozen=True, slots=True)
class Not:
    """NOT term, -term, and a != comparison."""

    term: Node


@dataclass(frozen=True, slots=True)
class All:
    """term AND term ..."""

    terms: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Any_:
    """term OR term ..."""

    terms: tuple[Node, ...]


Node = Has | Equals | HasPrefix | Not | All | Any_

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>!=|=|:|\(|\)|,|-|\.)
      | (?P<word>[A-Za-z0-9_\-]+)
    )""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a",
            "b": "\b", "f": "\f", "v": "\v", "?": "?"}  # fmt: skip
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|[0-7]{3}|.)", re.DOTALL)


def _unquote(literal: str) -> str:
    """A string literal's value: C-style escapes, including hex, octal and Unicode ones."""

    def escape(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] in "xuU":
            if len(code) == 1:
                raise FilterError(f"incomplete escape \\{code} in {literal}")
            value = int(code[1:], 16)
        elif code[0] in "01234567" and len(code) == 3:
            value = int(code, 8)
        elif code in _ESCAPES:
            return _ESCAPES[code]
        else:
            raise FilterError(f"unknown escape \\{code} in {literal}")
        if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
            raise FilterError(f"escape \\{code} is not a character")
        return chr(value)

    return _ESCAPE.sub(escape, literal[1:-1])


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise FilterError(f"unexpected character {text[pos:].strip()[0]!r} at {pos}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.pos = 0
        self.depth = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            found = "the end" if token is None else repr(token[1])
            raise FilterError(f"expected {value or kind}, found {found}")
        self.pos += 1
        return token[1]

    def at(self, kind: str, value: str) -> bool:
        return self.peek() == (kind, value)

    def expression(self) -> Node:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise FilterError("filter is nested too deeply")
        terms = [self.term()]
        joiner: str | None = None
        while self.at("word", "AND") or self.at("word", "OR"):
            word = self.take("word")
            if joiner is not None and word != joiner:
                raise FilterError("AND and OR can only be combined with parentheses")
            joiner = word
            terms.append(self.term())
        self.depth -= 1
        if joiner is None:
            return terms[0]
        return All(tuple(terms)) if joiner == "AND" else Any_(tuple(terms))

    def term(self) -> Node:
        if self.at("word", "NOT") or self.at("op", "-"):
            self.pos += 1
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise FilterError("filter is nested too deeply")
            negated = Not(self.term())
            self.depth -= 1
            return negated
        if self.at("op", "("):
            self.pos += 1
            node = self.expression()
            self.take("op", ")")
            return node
        if self.at("word", "hasPrefix"):
            self.pos += 1
            self.take("op", "(")
            key = self.attribute(".")
            self.take("op", ",")
            prefix = _unquote(self.take("string"))
            self.take("op", ")")
            return HasPrefix(key, prefix)
        token = self.peek()
        if token is None or token != ("word", "attributes"):
            found = "the end" if token is None else repr(token[1])
            raise FilterError(f"expected a condition on attributes, found {found}")
        self.pos += 1
        if self.at("op", ":"):
            self.pos += 1
            return Has(self.key())
        self.take("op", ".")
        key = self.key()
        if self.at("op", "="):
            self.pos += 1
            return Equals(key, _unquote(self.take("string")))
        if self.at("op", "!="):
            self.pos += 1
            return Not(Equals(key, _unquote(self.take("string"))))
        raise FilterError(f"expected = or != after attributes.{key}")

    def attribute(self, separator: str) -> str:
        self.take("word", "attributes")
        self.take("op", separator)
        return self.key()

    def key(self) -> str:
        token = self.peek()
        if token is not None and token[0] == "string":
            self.pos += 1
            key = _unquote(token[1])
            if not key:
                raise FilterError("an attribute key cannot be empty")
            return key
        return self.take("word")


@dataclass(frozen=True)
class SubscriptionFilter:
    """A parsed filter: `matches(attributes)` says whether Pub/Sub delivers a message."""

    text: str
    root: Node

    @classmethod
    def parse(cls, text: str) -> SubscriptionFilter:
        """Parse `text`; FilterError (saying why) when it is not a filter this module reads."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_FILTER_BYTES:
            raise FilterError(f"a filter is at most {MAX_FILTER_BYTES} bytes")
        parser = _Parser(text)
        if not parser.tokens:
            raise FilterError("empty filter")
        root = parser.expression()
        rest = parser.peek()
        if rest is not None:
            raise FilterError(f"unexpected {rest[1]!r} after the filter")
        audit = sorted(_compared(root) & CONTRACT_ATTRIBUTES)
        if audit:
            raise FilterError(
                f"compares {', '.join(audit)}, set by the audit per message (not recorded)"
            )
        return cls(text, root)

    def matches(self, attributes: Mapping[str, str]) -> bool:
        """True when a message with these attributes (and the audit's own, which every
        audited message carries) is delivered on the subscription."""
        return _evaluate(self.root, {**_AUDIT_PRESENT, **attributes})

    def compared_keys(self) -> set[str]:
        """The attribute keys whose values the filter compares (= != hasPrefix)."""
        return _compared(self.root)

    def matches_encoded(self, encoded: str) -> bool:
        """`matches` on attributes as `encode_attributes` wrote them (events repeat a few
        attribute sets: each is decoded and evaluated once); False for undecodable ones."""
        return _matches_encoded(self, encoded)


@functools.lru_cache(maxsize=16_384)
def _matches_encoded(subscription_filter: SubscriptionFilter, encoded: str) -> bool:
    try:
        return subscription_filter.matches(decode_attributes(encoded))
    except ValueError:
        return False


# Every audited message has these; their values differ per message and are not all recorded.
_AUDIT_PRESENT = dict.fromkeys(CONTRACT_ATTRIBUTES, "")


def _compared(node: Node) -> set[str]:
    match node:
        case Equals(key, _) | HasPrefix(key, _):
            return {key}
        case Not(term):
            return _compared(term)
        case All(terms) | Any_(terms):
            return set().union(*(_compared(t) for t in terms))
    return set()


def _evaluate(node: Node, attributes: Mapping[str, str]) -> bool:
    match node:
        case Has(key):
            return key in attributes
        case Equals(key, value):
            return attributes.get(key) == value
        case HasPrefix(key, prefix):
            found = attributes.get(key)
            return found is not None and found.startswith(prefix)
        case Not(term):
            return not _evaluate(term, attributes)
        case All(terms):
            return all(_evaluate(t, attributes) for t in terms)
        case Any_(terms):
            return any(_evaluate(t, attributes) for t in terms)
    raise AssertionError(f"not a filter node: {node!r}")
