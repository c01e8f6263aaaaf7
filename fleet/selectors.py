"""Kubernetes label selectors: parse, match, print, and convert to/from protobuf.

The string syntax and the matching rules are Kubernetes' own
(k8s.io/apimachinery/pkg/labels/selector.go)::

    env=prod, tier in (web,api), !canary, release notin (beta), shards>3

- ``k=v`` / ``k==v``: the label exists and equals v; ``k!=v``: absent or not v.
- ``k in (a,b)``: exists and is one of them; ``k notin (a,b)``: absent or none.
  ``()`` is the set holding the empty value, as selector.go parses it, so
  ``k notin ()`` means ``k!=`` and ``k in ()`` means ``k=``.
- ``k``: exists; ``!k``: absent. ``k>n`` / ``k<n``: exists and, read as a
  64-bit integer, compares so (a non-integer label value never matches).
- ``,`` is AND; the empty string selects everything. Values may be empty
  (``k=``, ``k in (a,)``).

A `Selector` is an immutable value in canonical form, and two selectors are
equal exactly when their canonical strings are. Each requirement keeps the
operator it was written with, as Kubernetes' ``String()`` does (``y==jkl``
stays ``==``, ``y notin (jkl)`` stays ``notin``, ``z notin ()`` stays
``notin ()``), and so does the protobuf form, so what an operator wrote is
what every message about it shows. The canonical form departs from
selector.go's ``String()`` only where it cannot change a meaning:

- requirements are sorted by key, then operator, then values, and exact
  duplicates are dropped (AND is idempotent);
- ``>``/``<`` operands print without leading zeros (``k>007`` is ``k>7``).

A value list is comma-separated items that may be empty (``(a,,)`` holds
``a`` and the empty value, as in selector.go since 2025). One lexical corner
differs: a NUL character is an ordinary (invalid) character, not the end of
the input.

Pure code: no I/O. Errors are `SelectorError` (an `InvalidArgument`, so
servicers may let it propagate) and its `SelectorSyntaxError` with a position.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fleet.errors import InvalidArgument
from fleet.labels import LabelError, validate_label_key, validate_label_value
from fleet.v1 import common_pb2

__all__ = [
    "Operator",
    "Requirement",
    "Selector",
    "SelectorError",
    "SelectorSyntaxError",
    "from_proto",
    "parse",
    "to_proto",
]

_INT64_MAX = 2**63 - 1
_GO_INT = re.compile(r"[+-]?[0-9]+")  # what Go's strconv.ParseInt(s, 10, 64) accepts


class SelectorError(InvalidArgument, ValueError):
    """A selector (string, requirement or protobuf message) is invalid.

    The message names the offending field or position; fix the selector.
    """


class SelectorSyntaxError(SelectorError):
    """The selector string does not parse; `position` is the 0-based offset."""

    def __init__(self, position: int, message: str, *, field: str | None = None) -> None:
        super().__init__(f"position {position}: {message}", field=field)
        self.position = position


class Operator(enum.Enum):
    """Operator of one requirement, as written; declaration order is the canonical order.

    EQUALS and DOUBLE_EQUALS mean what IN with one value means, NOT_EQUALS
    what NOT_IN with one value means; they differ only in how they print.
    """

    EQUALS = "="
    DOUBLE_EQUALS = "=="
    IN = "in"
    NOT_EQUALS = "!="
    NOT_IN = "notin"
    EXISTS = "exists"
    NOT_EXISTS = "!"
    GT = ">"
    LT = "<"


_INCLUDES = frozenset({Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.IN})
_EXCLUDES = frozenset({Operator.NOT_EQUALS, Operator.NOT_IN})
_EXACT = frozenset({Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.NOT_EQUALS})
_RANK = {op: i for i, op in enumerate(Operator)}
_TO_PB = {op: common_pb2.SelectorOperator.Value(f"SELECTOR_OPERATOR_{op.name}") for op in Operator}
_FROM_PB = {pb: op for op, pb in _TO_PB.items()}


def _go_int(text: str) -> int | None:
    """`text` as Go's ParseInt(text, 10, 64) reads it, or None."""
    if not _GO_INT.fullmatch(text):
        return None
    number = int(text)
    return number if -_INT64_MAX - 1 <= number <= _INT64_MAX else None


def _integer_operand(text: str) -> int | None:
    """The operand of ``>``/``<``: a label value that is an int64, so 0..2**63-1."""
    number = _go_int(text)
    return number if number is not None and text[0] not in "+-" else None


def _values_problem(op: Operator, values: tuple[str, ...]) -> str | None:
    if op in (Operator.IN, Operator.NOT_IN) and not values:
        return "for 'in', 'notin' operators, values set can't be empty"
    if op in _EXACT and len(values) != 1:
        return f"for '=', '==', '!=' operators, exactly one value is required, got {len(values)}"
    if op in (Operator.EXISTS, Operator.NOT_EXISTS) and values:
        return "values set must be empty for exists and does not exist"
    if op in (Operator.GT, Operator.LT):
        if len(values) != 1:
            return f"for '>', '<' operators, exactly one value is required, got {len(values)}"
        if _integer_operand(values[0]) is None:
            return f"for '>', '<' operators, the value must be an integer, got {values[0]!r}"
    return None


@dataclass(frozen=True)
class Requirement:
    """One condition on one label; build with keyword or positional args.

    Construction validates and canonicalises (values sorted, de-duplicated,
    integers without leading zeros) and raises `SelectorError` when invalid.
    """

    key: str
    """Label key, ``[dns-subdomain/]name``."""
    operator: Operator
    """How the label's value is compared with `values`."""
    values: tuple[str, ...] = ()
    """Sorted distinct values: one or more for IN/NOT_IN, none for (NOT_)EXISTS, exactly one
    for the rest (an integer for GT/LT)."""

    def __post_init__(self) -> None:
        try:
            validate_label_key(self.key)
            for value in self.values:
                validate_label_value(value)
        except LabelError as exc:
            raise SelectorError(exc.message) from None
        values = tuple(sorted(set(self.values)))
        problem = _values_problem(self.operator, values)
        if problem is not None:
            raise SelectorError(f"requirement on {self.key!r}: {problem}")
        if self.operator in (Operator.GT, Operator.LT):
            values = (str(int(values[0])),)
        object.__setattr__(self, "values", values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether `labels` satisfy this requirement (Kubernetes' rules)."""
        present = self.key in labels
        op = self.operator
        if op is Operator.EXISTS:
            return present
        if op is Operator.NOT_EXISTS:
            return not present
        if op in _INCLUDES:
            return present and labels[self.key] in self.values
        if op in _EXCLUDES:
            return not present or labels[self.key] not in self.values
        have = _go_int(labels[self.key]) if present else None
        if have is None:
            return False
        want = int(self.values[0])
        return have > want if op is Operator.GT else have < want

    def sort_key(self) -> tuple[str, int, tuple[str, ...]]:
        """Canonical order: by key, then operator, then values."""
        return (self.key, _RANK[self.operator], self.values)

    def __str__(self) -> str:
        op, key, values = self.operator, self.key, self.values
        if op is Operator.EXISTS:
            return key
        if op is Operator.NOT_EXISTS:
            return f"!{key}"
        if op in (Operator.IN, Operator.NOT_IN):
            return f"{key} {op.value} ({','.join(values)})"
        return f"{key}{op.value}{values[0]}"


@dataclass(frozen=True)
class Selector:
    """An AND of requirements, kept sorted and de-duplicated (canonical form).

    Hashable; equal exactly when the canonical strings are equal.
    """

    requirements: tuple[Requirement, ...] = ()
    """The requirements, in canonical order; empty selects everything."""

    def __post_init__(self) -> None:
        unique = {r.sort_key(): r for r in self.requirements}
        object.__setattr__(self, "requirements", tuple(unique[k] for k in sorted(unique)))

    @classmethod
    def everything(cls) -> Selector:
        """The empty selector, which matches every label set."""
        return cls(())

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> Selector:
        """The selector ``k1=v1,k2=v2,...`` matching supersets of `labels`."""
        return cls(tuple(Requirement(k, Operator.EQUALS, (v,)) for k, v in labels.items()))

    @property
    def is_empty(self) -> bool:
        """True when the selector does not restrict anything."""
        return not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether `labels` satisfy every requirement."""
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    def __repr__(self) -> str:
        return f"Selector({str(self)!r})"


# --- parsing ---------------------------------------------------------------
# A hand-written lexer and recursive-descent parser shaped like
# selector.go's, reporting the offset of the token where parsing failed.

# Whitespace is selector.go's: space, tab, CR, LF. Two-character symbols first.
_TOKEN = re.compile(r"(!=|==|[=!(),><])|([^ \t\r\n=!(),><]+)")
_KEYWORDS = frozenset({"in", "notin"})
_BINARY = {op.value: op for op in Operator if op not in (Operator.EXISTS, Operator.NOT_EXISTS)}
_EXPECTED_OP = "'=', '==', '!=', 'in', 'notin', '>', '<', ',' or end of string"


@dataclass(frozen=True)
class _Token:
    kind: str
    """'id' (identifier), 'end', a symbol like '!=' or a keyword 'in'/'notin'."""
    text: str
    """The literal as written ("" at the end)."""
    pos: int
    """0-based offset of the first character."""

    def shown(self) -> str:
        return "end of string" if self.kind == "end" else repr(self.text)


def _lex(text: str) -> list[_Token]:
    tokens = []
    for m in _TOKEN.finditer(text):  # what no group matches is whitespace
        symbol, word = m.group(1, 2)
        if symbol:
            tokens.append(_Token(symbol, symbol, m.start()))
        else:
            tokens.append(_Token(word if word in _KEYWORDS else "id", word, m.start()))
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str, field: str | None) -> None:
        self.tokens = _lex(text)
        self.index = 0
        self.field = field

    def error(self, token: _Token, message: str) -> SelectorSyntaxError:
        return SelectorSyntaxError(token.pos, message, field=self.field)

    def peek(self, *, as_value: bool = True) -> _Token:
        token = self.tokens[self.index]
        # Like selector.go, 'in'/'notin' are plain words where a key or value goes.
        if as_value and token.kind in _KEYWORDS:
            return _Token("id", token.text, token.pos)
        return token

    def take(self, *, as_value: bool = True) -> _Token:
        token = self.peek(as_value=as_value)
        self.index += 1
        return token

    def parse(self) -> Selector:
        requirements: list[Requirement] = []
        if self.peek().kind == "end":
            return Selector()
        while True:
            token = self.peek()
            if token.kind not in ("id", "!"):
                after = "after ','" if requirements else "at the start"
                raise self.error(
                    token, f"expected a label key or '!' {after}, found {token.shown()}"
                )
            requirements.append(self.requirement())
            token = self.take()
            if token.kind == "end":
                return Selector(tuple(requirements))
            if token.kind != ",":
                raise self.error(token, f"expected ',' or end of string, found {token.shown()}")

    def label(self, token: _Token, check: Callable[[str], None]) -> str:
        try:
            check(token.text)
        except LabelError as exc:
            raise self.error(token, exc.message) from None
        return token.text

    def requirement(self) -> Requirement:
        negated = self.peek().kind == "!"
        if negated:
            self.take()
        token = self.take()
        if token.kind != "id":
            raise self.error(token, f"expected a label key, found {token.shown()}")
        key = self.label(token, validate_label_key)
        token = self.peek()
        if token.kind in (",", "end"):
            return Requirement(key, Operator.NOT_EXISTS if negated else Operator.EXISTS)
        if negated:
            raise self.error(
                token,
                f"'!{key}' takes no operator or value; expected ',' or end of string, "
                f"found {token.shown()}",
            )
        operator = self.take(as_value=False)
        op = _BINARY.get(operator.kind)
        if op is None:
            raise self.error(
                operator, f"expected {_EXPECTED_OP} after key {key!r}, found {operator.shown()}"
            )
        token = self.peek()
        if operator.kind in _KEYWORDS:
            values = self.value_set(operator)
        elif token.kind in (",", "end"):  # `k=` and `k=,j=x`: the empty value
            values = [_Token("id", "", token.pos)]
        elif token.kind == "id":
            values = [self.take()]
        else:
            raise self.error(
                token, f"expected a value after {operator.text!r}, found {token.shown()}"
            )
        if op in (Operator.GT, Operator.LT) and _integer_operand(values[0].text) is None:
            shown = values[0].shown() if values[0].text else token.shown()
            raise self.error(
                values[0],
                f"expected a non-negative 64-bit integer after {operator.text!r}, found {shown}",
            )
        return Requirement(key, op, tuple(self.label(v, validate_label_value) for v in values))

    def value_set(self, operator: _Token) -> list[_Token]:
        token = self.take()
        if token.kind != "(":
            raise self.error(token, f"expected '(' after {operator.text!r}, found {token.shown()}")
        # Comma-separated items, each a value or nothing (the empty value).
        values: list[_Token] = []
        while True:
            token = self.peek()
            expected = "a value, ',' or ')'"
            if token.kind == "id":
                values.append(self.take())
                token, expected = self.peek(), f"',' or ')' after {values[-1].text!r}"
            else:
                values.append(_Token("id", "", token.pos))
            if token.kind == ")":
                self.take()
                return values
            if token.kind != ",":
                raise self.error(token, f"expected {expected}, found {token.shown()}")
            self.take()


def parse(text: str, *, field: str | None = None) -> Selector:
    """Parse Kubernetes selector syntax; empty or blank text selects everything.

    Raises `SelectorSyntaxError` (with `.position`) naming what was expected;
    `field` (e.g. "selector") prefixes the message for API answers.
    """
    return _Parser(text, field).parse()


# --- protobuf ----------------------------------------------------------------


def to_proto(selector: Selector) -> common_pb2.LabelSelector:
    """The `LabelSelector` message for `selector`; `from_proto` inverts it exactly.

    ``k=v`` goes to match_labels, except a second ``=`` on the same key
    (``a=x,a=y``, which matches nothing), which becomes an EQUALS expression
    because a map holds one value per key. Every other requirement is an
    expression with the operator it was written with.
    """
    msg = common_pb2.LabelSelector()
    for req in selector.requirements:
        if req.operator is Operator.EQUALS and req.key not in msg.match_labels:
            msg.match_labels[req.key] = req.values[0]
            continue
        msg.match_expressions.add(key=req.key, operator=_TO_PB[req.operator], values=req.values)
    return msg


def _check(check: Callable[[str], None], text: str, field: str) -> None:
    try:
        check(text)
    except LabelError as exc:
        raise SelectorError(exc.message, field=field) from None


def _expression(expr: common_pb2.LabelSelectorRequirement, where: str) -> Requirement:
    op = _FROM_PB.get(expr.operator)
    if op is None:
        names = ", ".join(common_pb2.SelectorOperator.Name(pb) for pb in sorted(_FROM_PB))
        what = "unset" if expr.operator == 0 else f"unknown operator {expr.operator}"
        raise SelectorError(f"{what}; expected one of {names}", field=f"{where}.operator")
    _check(validate_label_key, expr.key, f"{where}.key")
    for i, value in enumerate(expr.values):
        _check(validate_label_value, value, f"{where}.values[{i}]")
    problem = _values_problem(op, tuple(expr.values))
    if problem:
        raise SelectorError(problem, field=f"{where}.values")
    return Requirement(expr.key, op, tuple(expr.values))


def from_proto(msg: common_pb2.LabelSelector, *, field: str = "selector") -> Selector:
    """The `Selector` a `LabelSelector` message describes.

    Raises `SelectorError` naming the bad field (``selector.match_expressions[1].operator``)
    for an unknown or unset operator, a wrong number of values, a non-integer
    for GT/LT, or a key or value that breaks the label syntax.
    """
    requirements = []
    for key, value in sorted(msg.match_labels.items()):
        _check(validate_label_key, key, f"{field}.match_labels")
        _check(validate_label_value, value, f"{field}.match_labels[{key!r}]")
        requirements.append(Requirement(key, Operator.EQUALS, (value,)))
    for i, expr in enumerate(msg.match_expressions):
        requirements.append(_expression(expr, f"{field}.match_expressions[{i}]"))
    return Selector(tuple(requirements))
