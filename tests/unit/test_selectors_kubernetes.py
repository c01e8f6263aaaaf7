"""Kubernetes' own label-selector tests, run against `fleet.selectors`.

Ported from kubernetes/apimachinery ``pkg/labels/selector_test.go`` at commit
eed236ceee2c19c2753a3d93ac0631dc20750454 (July 2026), one table per Go test
function and in its order, keeping every parse, match and ``String()`` case
whose outcome Fleet shares. Where Fleet's canonical form differs from
``String()`` (it sorts requirements by key, then operator, and prints ``>``
operands without leading zeros) the expected string says so.

Not ported, because Fleet has no such API: TestLexer, TestLexerSequence and
TestParserLookahead (the Go lexer's token stream; the parse cases cover what
it decides), the invalid ``Requirement{}`` rows of TestToString and
TestRequirementSelectorMatching and TestRequirementConstructor's
"unsupportedOp" (a Fleet `Requirement` cannot be built invalid, and an
unknown operator in a protobuf message is tested in test_selectors.py),
TestAdd, TestRequiresExactMatch, TestMatchesNothing, TestSafeSort and the
benchmarks.
"""

from __future__ import annotations

import pytest

from fleet.selectors import (
    Operator,
    Requirement,
    Selector,
    SelectorError,
    SelectorSyntaxError,
    from_proto,
    parse,
    to_proto,
)

EQ, EQ2, NE = Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.NOT_EQUALS
IN, NOTIN = Operator.IN, Operator.NOT_IN
EXISTS, NOT_EXISTS, GT, LT = Operator.EXISTS, Operator.NOT_EXISTS, Operator.GT, Operator.LT


def _selector(*requirements: tuple[str, Operator, tuple[str, ...]]) -> Selector:
    return Selector(tuple(Requirement(k, op, v) for k, op, v in requirements))


# --- TestSelectorParse, TestDeterministicParse ------------------------------

SELECTOR_PARSE_GOOD = [
    "x=a,y=b,z=c",
    "",
    "x!=a,y=b",
    "x=",
    "x= ",
    "x=,z= ",
    "x= ,z= ",
    "!x",
    "x>1",
    "x>1,z<5",
]
SELECTOR_PARSE_BAD = ["x=a||y=b", "x==a==b", "!x=a", "x<a"]


@pytest.mark.parametrize("text", SELECTOR_PARSE_GOOD)
def test_selector_parse_good_strings_restring_to_themselves(text: str) -> None:
    """TestSelectorParse: a good string prints back as itself without its spaces."""
    assert str(parse(text)) == text.replace(" ", "")


@pytest.mark.parametrize("text", SELECTOR_PARSE_BAD)
def test_selector_parse_bad_strings_are_refused(text: str) -> None:
    """TestSelectorParse: a bad string is a syntax error."""
    with pytest.raises(SelectorSyntaxError):
        parse(text)


def test_deterministic_parse() -> None:
    """TestDeterministicParse: the order requirements are written in does not matter."""
    assert str(parse("x=a,a=x")) == str(parse("a=x,x=a")) == "a=x,x=a"


# --- TestEverything, TestSelectorMatches, TestSetMatches ---------------------


def test_everything() -> None:
    """TestEverything: the everything selector matches and is empty."""
    assert Selector.everything().matches({"x": "y"})
    assert Selector.everything().is_empty


SELECTOR_MATCHES = [
    ("", {"x": "y"}, True),
    ("x=y", {"x": "y"}, True),
    ("x=y,z=w", {"x": "y", "z": "w"}, True),
    ("x!=y,z!=w", {"x": "z", "z": "a"}, True),
    ("notin=in", {"notin": "in"}, True),  # in and notin in exactMatch
    ("x", {"x": "z"}, True),
    ("!x", {"y": "z"}, True),
    ("x>1", {"x": "2"}, True),
    ("x<1", {"x": "0"}, True),
    ("x=z", {}, False),
    ("x=y", {"x": "z"}, False),
    ("x=y,z=w", {"x": "w", "z": "w"}, False),
    ("x!=y,z!=w", {"x": "z", "z": "w"}, False),
    ("x", {"y": "z"}, False),
    ("!x", {"x": "z"}, False),
    ("x>1", {"x": "0"}, False),
    ("x<1", {"x": "2"}, False),
    ("foo=bar", {"foo": "bar", "baz": "blah"}, True),
    ("baz=blah", {"foo": "bar", "baz": "blah"}, True),
    ("foo=bar,baz=blah", {"foo": "bar", "baz": "blah"}, True),
    ("foo=blah", {"foo": "bar", "baz": "blah"}, False),
    ("baz=bar", {"foo": "bar", "baz": "blah"}, False),
    ("foo=bar,foobar=bar,baz=blah", {"foo": "bar", "baz": "blah"}, False),
]


@pytest.mark.parametrize(("text", "labels", "expected"), SELECTOR_MATCHES)
def test_selector_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    """TestSelectorMatches: parsed selectors match exactly the label sets Kubernetes says."""
    assert parse(text).matches(labels) is expected


@pytest.mark.parametrize(
    "selector_set", [{}, {"foo": "bar"}, {"baz": "blah"}, {"foo": "bar", "baz": "blah"}]
)
def test_set_matches(selector_set: dict[str, str]) -> None:
    """TestSetMatches: a selector made from a label set matches a superset of it."""
    assert Selector.from_labels(selector_set).matches({"foo": "bar", "baz": "blah"})


def test_nil_map_and_empty_set_are_everything() -> None:
    """TestNilMapIsValid, TestSetIsEmpty: no labels and no requirements select everything."""
    assert Selector.from_labels({}).is_empty
    assert Selector().is_empty


# --- TestParseOperator ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "operator"),
    [
        ("x in (a)", IN),
        ("x=a", EQ),
        ("x==a", EQ2),
        ("x>1", GT),
        ("x<1", LT),
        ("x notin (a)", NOTIN),
        ("x!=a", NE),
    ],
)
def test_parse_operator_accepts_binary_operators(text: str, operator: Operator) -> None:
    """TestParseOperator: each binary operator parses to itself."""
    (requirement,) = parse(text).requirements
    assert requirement.operator is operator


@pytest.mark.parametrize("text", ["x ! a", "x exists", "x ("])
def test_parse_operator_refuses_non_operators(text: str) -> None:
    """TestParseOperator: '!', 'exists' and '(' are not binary operators."""
    with pytest.raises(SelectorSyntaxError, match="expected '=', '==', '!=', 'in', 'notin'"):
        parse(text)


# --- TestRequirementConstructor --------------------------------------------------

REQUIREMENT_CONSTRUCTOR = [
    ("x1", IN, (), "values set can't be empty"),
    ("x2", NOTIN, (), "values set can't be empty"),
    ("x3", IN, ("foo",), None),
    ("x4", NOTIN, ("foo",), None),
    ("x5", EQ, ("foo", "bar"), "exactly one value is required"),
    ("x6", EXISTS, (), None),
    ("x7", NOT_EXISTS, (), None),
    ("x8", EXISTS, ("foo",), "values set must be empty"),
    ("x9", IN, ("bar",), None),
    ("x10", IN, ("bar",), None),
    ("x11", GT, ("1",), None),
    ("x12", LT, ("6",), None),
    ("x13", GT, (), "exactly one value is required"),
    ("x14", GT, ("bar",), "must be an integer"),
    ("x15", LT, ("bar",), "must be an integer"),
    ("a" * 254, EXISTS, (), "invalid label key"),
    ("x16", EQ, ("a" * 254,), "must be no more than 63 characters"),
    ("x17", EQ, ("a b",), "invalid label value 'a b'"),
]


@pytest.mark.parametrize(("key", "op", "values", "error"), REQUIREMENT_CONSTRUCTOR)
def test_requirement_constructor(
    key: str, op: Operator, values: tuple[str, ...], error: str | None
) -> None:
    """TestRequirementConstructor: the same requirements are valid, the same refused."""
    if error is None:
        assert Requirement(key, op, values).key == key
    else:
        with pytest.raises(SelectorError, match=error):
            Requirement(key, op, values)


# --- TestToString ------------------------------------------------------------------

TO_STRING = [
    (
        _selector(("x", IN, ("abc", "def")), ("y", NOTIN, ("jkl",)), ("z", EXISTS, ())),
        "x in (abc,def),y notin (jkl),z",
    ),
    (
        _selector(("x", NOTIN, ("abc", "def")), ("y", NE, ("jkl",)), ("z", NOT_EXISTS, ())),
        "x notin (abc,def),y!=jkl,!z",
    ),
    (
        _selector(("x", NOTIN, ("abc",)), ("y", IN, ("jkl", "mno")), ("z", NOTIN, ("",))),
        "x notin (abc),y in (jkl,mno),z notin ()",
    ),
    (
        _selector(("x", EQ, ("abc",)), ("y", EQ2, ("jkl",)), ("z", NE, ("a",)), ("z", EXISTS, ())),
        "x=abc,y==jkl,z!=a,z",
    ),
    (
        _selector(("x", GT, ("2",)), ("y", LT, ("8",)), ("z", EXISTS, ())),
        "x>2,y<8,z",
    ),
]


@pytest.mark.parametrize(("selector", "text"), TO_STRING)
def test_to_string_keeps_each_operator_as_written(selector: Selector, text: str) -> None:
    """TestToString: each requirement prints with its own operator, and the string and
    protobuf forms give back the same selector."""
    assert str(selector) == text
    assert parse(text) == selector
    assert from_proto(to_proto(selector)) == selector


# --- TestRequirementSelectorMatching ------------------------------------------------

REQUIREMENT_SELECTOR_MATCHING = [
    ({"x": "foo", "y": "baz"}, _selector(("x", IN, ("foo",)), ("y", NOTIN, ("alpha",))), True),
    ({"x": "foo", "y": "baz"}, _selector(("x", IN, ("foo",)), ("y", IN, ("alpha",))), False),
    ({"y": ""}, _selector(("x", NOTIN, ("",)), ("y", EXISTS, ())), True),
    ({"y": ""}, _selector(("x", NOT_EXISTS, ()), ("y", EXISTS, ())), True),
    ({"y": ""}, _selector(("x", NOTIN, ("",)), ("y", NOT_EXISTS, ())), False),
    ({"y": "baz"}, _selector(("x", IN, ("",))), False),
    ({"z": "2"}, _selector(("z", GT, ("1",))), True),
    ({"z": "v2"}, _selector(("z", GT, ("1",))), False),
]


@pytest.mark.parametrize(("labels", "selector", "expected"), REQUIREMENT_SELECTOR_MATCHING)
def test_requirement_selector_matching(
    labels: dict[str, str], selector: Selector, expected: bool
) -> None:
    """TestRequirementSelectorMatching: built selectors match as Kubernetes says,
    also after printing and re-parsing."""
    assert selector.matches(labels) is expected
    assert parse(str(selector)).matches(labels) is expected


# --- TestSetSelectorParser ----------------------------------------------------------

SET_SELECTOR_PARSER = [
    ("", _selector()),
    ("\rx", _selector(("x", EXISTS, ()))),
    (
        "this-is-a-dns.domain.com/key-with-dash",
        _selector(("this-is-a-dns.domain.com/key-with-dash", EXISTS, ())),
    ),
    (
        "this-is-another-dns.domain.com/key-with-dash in (so,what)",
        _selector(("this-is-another-dns.domain.com/key-with-dash", IN, ("so", "what"))),
    ),
    (
        "0.1.2.domain/99 notin (10.10.100.1, tick.tack.clock)",
        _selector(("0.1.2.domain/99", NOTIN, ("10.10.100.1", "tick.tack.clock"))),
    ),
    ("foo  in\t (abc)", _selector(("foo", IN, ("abc",)))),
    ("x notin\n (abc)", _selector(("x", NOTIN, ("abc",)))),
    ("x  notin\t\t(abc,def)", _selector(("x", NOTIN, ("abc", "def")))),
    ("x in (abc,def)", _selector(("x", IN, ("abc", "def")))),
    ("x in (abc,)", _selector(("x", IN, ("abc", "")))),
    ("x in (abc,abc)", _selector(("x", IN, ("abc",)))),
    ("x in ()", _selector(("x", IN, ("",)))),
    ("x in (a,,)", _selector(("x", IN, ("a", "")))),
    ("x in (a,,,)", _selector(("x", IN, ("a", "")))),
    ("x in (a,,,,,,)", _selector(("x", IN, ("a", "")))),
    ("x in (a,,a,,a,,a,,)", _selector(("x", IN, ("a", "")))),
    (
        "x notin (abc,,def),bar,z in (),w",
        _selector(
            ("bar", EXISTS, ()),
            ("w", EXISTS, ()),
            ("x", NOTIN, ("abc", "", "def")),
            ("z", IN, ("",)),
        ),
    ),
    ("x,y in (a)", _selector(("y", IN, ("a",)), ("x", EXISTS, ()))),
    ("x=a", _selector(("x", EQ, ("a",)))),
    ("x>1", _selector(("x", GT, ("1",)))),
    ("x<7", _selector(("x", LT, ("7",)))),
    ("x=a,y!=b", _selector(("x", EQ, ("a",)), ("y", NE, ("b",)))),
    (
        "x=a,y!=b,z in (h,i,j)",
        _selector(("x", EQ, ("a",)), ("y", NE, ("b",)), ("z", IN, ("h", "i", "j"))),
    ),
    ("x notin ( )", _selector(("x", NOTIN, ("",)))),
    ("x notin (, a)", _selector(("x", NOTIN, ("", "a")))),
    ("a ", _selector(("a", EXISTS, ()))),
    (  # operator 'in' inside list of identifiers
        "a in (x,y,notin, z,in)",
        _selector(("a", IN, ("in", "notin", "x", "y", "z"))),
    ),
]
SET_SELECTOR_PARSER_INVALID = [
    "x=a||y=b",
    "x,,y",
    ",x,y",
    "x nott in (y)",
    "a in (xyz),",
    "a in (xyz)b notin ()",
    "a in (xyz abc)",  # no comma
    "a notin(",  # bad formed
    "a (",  # cpar
    "(",  # opar
]


@pytest.mark.parametrize(("text", "expected"), SET_SELECTOR_PARSER)
def test_set_selector_parser(text: str, expected: Selector) -> None:
    """TestSetSelectorParser: valid strings parse to the same requirements, operators
    included, and print back to something that parses to them again."""
    selector = parse(text)
    assert selector == expected
    assert parse(str(selector)) == selector


@pytest.mark.parametrize("text", SET_SELECTOR_PARSER_INVALID)
def test_set_selector_parser_refuses(text: str) -> None:
    """TestSetSelectorParser: the invalid strings are syntax errors."""
    with pytest.raises(SelectorSyntaxError):
        parse(text)


# --- TestSetSelectorString, TestValidatedSelectorFromSet ------------------------------


@pytest.mark.parametrize(
    ("labels", "text"),
    [({}, ""), ({"app": "foo"}, "app=foo"), ({"app": "foo", "a": "b"}, "a=b,app=foo")],
)
def test_set_selector_string(labels: dict[str, str], text: str) -> None:
    """TestSetSelectorString: a selector from a label set prints sorted, with '='."""
    assert str(Selector.from_labels(labels)) == text


def test_validated_selector_from_set() -> None:
    """TestValidatedSelectorFromSet: labels become '=' requirements; a bad value is refused."""
    assert Selector.from_labels({"key": "val"}) == _selector(("key", EQ, ("val",)))
    with pytest.raises(SelectorError, match="must be no more than 63 characters"):
        Selector.from_labels(
            {"Key": "axahm2EJ8Phiephe2eixohbee9eGeiyees1thuozi1xoh0GiuH3diewi8iem7Nui"}
        )
