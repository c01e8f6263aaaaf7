"""Label selectors: Kubernetes syntax, errors with positions, matching, canonical form, proto.

Cases marked "k8s" take their input from k8s.io/apimachinery/pkg/labels/selector_test.go;
test_selectors_kubernetes.py runs that file's tables whole. This module holds
what is Fleet's own: the canonical form, error positions and wording, proto.
"""

from __future__ import annotations

import grpc
import pytest

from fleet.errors import InvalidArgument
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
from fleet.v1 import common_pb2 as pb

# --- parsing -----------------------------------------------------------------

# (input, canonical string). Each requirement keeps its operator as written
# (as Kubernetes' String() does); requirements are sorted, values too.
CANONICAL = [
    ("x=a,y=b,z=c", "x=a,y=b,z=c"),  # k8s
    ("", ""),  # k8s
    ("   \t\n", ""),
    ("x!=a,y=b", "x!=a,y=b"),  # k8s
    ("x=", "x="),  # k8s
    ("x= ", "x="),  # k8s
    ("x=,z= ", "x=,z="),  # k8s
    ("x= ,z= ", "x=,z="),  # k8s
    ("!x", "!x"),  # k8s
    ("x>1", "x>1"),  # k8s
    ("x>1,z<5", "x>1,z<5"),  # k8s
    ("x=a,a=x", "a=x,x=a"),  # k8s TestDeterministicParse
    ("\rx", "x"),  # k8s
    ("this-is-a-dns.domain.com/key-with-dash", "this-is-a-dns.domain.com/key-with-dash"),  # k8s
    ("a.dns.com/key in (so,what)", "a.dns.com/key in (so,what)"),  # k8s
    (
        "0.1.2.domain/99 notin (10.10.100.1, tick.tack.clock)",  # k8s
        "0.1.2.domain/99 notin (10.10.100.1,tick.tack.clock)",
    ),
    ("foo  in\t (abc)", "foo in (abc)"),  # k8s; a one-value set stays a set
    ("x notin\n (abc)", "x notin (abc)"),  # k8s
    ("x  notin\t\t(abc,def)", "x notin (abc,def)"),  # k8s
    ("x in (abc,)", "x in (,abc)"),  # k8s: a trailing comma adds the empty value
    ("x in ()", "x in ()"),  # k8s: () is the set holding the empty value
    ("x notin ( )", "x notin ()"),  # k8s
    ("z notin ()", "z notin ()"),  # not 'z!=': the same meaning, but not what was written
    ("x notin (, a)", "x notin (,a)"),  # k8s
    ("x notin (abc,,def),bar,z in (),w", "bar,w,x notin (,abc,def),z in ()"),  # k8s
    ("a ", "a"),  # k8s
    ("a in (x,y,notin, z,in)", "a in (in,notin,x,y,z)"),  # k8s: keywords as values
    ("notin=in", "notin=in"),  # k8s: keywords as key and value
    ("in in (in)", "in in (in)"),
    ("!in", "!in"),
    ("a==b", "a==b"),
    ("y notin (jkl),y==jkl", "y==jkl,y notin (jkl)"),  # k8s TestToString's operators
    ("k in (a),k==a,k=a,k notin (a),k!=a", "k=a,k==a,k in (a),k!=a,k notin (a)"),
    ("b in (z,a,m)", "b in (a,m,z)"),
    ("a in (x,x,y)", "a in (x,y)"),
    ("a=b,a=b", "a=b"),
    ("z,!y,x>3,w<4,v notin (1,2)", "v notin (1,2),w<4,x>3,!y,z"),
    ("k>007", "k>7"),
    ("k, !k, k=a, k!=a, k>1, k<9", "k=a,k!=a,k,!k,k>1,k<9"),  # same key: operator order
    ("example.com/Tier == Web_1", "example.com/Tier==Web_1"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL)
def test_parse_gives_canonical_string(text: str, canonical: str) -> None:
    """Valid selectors parse, print in canonical form, and re-parse to the same value."""
    selector = parse(text)
    assert str(selector) == canonical
    assert parse(canonical) == selector
    assert str(parse(str(selector))) == canonical


# (input, 0-based position, message fragment)
SYNTAX_ERRORS = [
    ("x=a||y=b", 2, "invalid label value 'a||y'"),  # k8s
    ("x==a==b", 4, "expected ',' or end of string, found '=='"),  # k8s
    ("!x=a", 2, "'!x' takes no operator or value; expected ',' or end of string, found '='"),
    ("x<a", 2, "expected a non-negative 64-bit integer after '<', found 'a'"),  # k8s
    ("x>", 2, "expected a non-negative 64-bit integer after '>', found end of string"),
    ("x>-1", 2, "found '-1'"),  # '-1' is no valid label value in k8s either
    ("x>9223372036854775808", 2, "64-bit integer"),
    ("x,,y", 2, "expected a label key or '!' after ',', found ','"),  # k8s
    (",x,y", 0, "expected a label key or '!' at the start, found ','"),  # k8s
    ("x nott in (y)", 2, "expected '=', '==', '!=', 'in', 'notin', '>', '<', ',' or end"),  # k8s
    ("a in (xyz),", 11, "expected a label key or '!' after ',', found end of string"),  # k8s
    ("a in (xyz)b notin ()", 10, "expected ',' or end of string, found 'b'"),  # k8s
    ("a in (xyz abc)", 10, "expected ',' or ')' after 'xyz', found 'abc'"),  # k8s
    ("a notin(", 8, "expected a value, ',' or ')', found end of string"),  # k8s
    ("a (", 2, "after key 'a', found '('"),  # k8s
    ("(", 0, "expected a label key or '!' at the start, found '('"),  # k8s
    ("tier  in web", 9, "expected '(' after 'in', found 'web'"),
    ("tier notin web", 11, "expected '(' after 'notin', found 'web'"),
    ("x in (a", 7, "expected ',' or ')' after 'a', found end of string"),
    ("x=!", 2, "expected a value after '=', found '!'"),
    ("!", 1, "expected a label key, found end of string"),
    ("!!x", 1, "expected a label key, found '!'"),
    ("a!b", 1, "after key 'a', found '!'"),
    ("a=b c", 4, "expected ',' or end of string, found 'c'"),
    ("env=prod, Bad Key", 14, "after key 'Bad', found 'Key'"),
    ("env=prod,Foo.com/x=1", 9, "invalid label key 'Foo.com/x': prefix part"),
    ("a=b,/x", 4, "invalid label key '/x': prefix part must be non-empty"),
    ("x in (a,b c)", 10, "expected ',' or ')' after 'b'"),
    ("x in (a,-b)", 8, "invalid label value '-b'"),
    ("k=" + "v" * 64, 2, "must be no more than 63 characters"),
    ("k\x00=v", 0, "invalid label key"),  # NUL is a character, not the end
]


@pytest.mark.parametrize(("text", "position", "fragment"), SYNTAX_ERRORS)
def test_syntax_errors_name_position_and_expectation(
    text: str, position: int, fragment: str
) -> None:
    """Bad selectors are refused with the 0-based offset and what was expected."""
    with pytest.raises(SelectorSyntaxError) as info:
        parse(text)
    assert info.value.position == position
    assert str(info.value).startswith(f"position {position}: ")
    assert fragment in str(info.value)


def test_syntax_error_is_invalid_argument_and_value_error() -> None:
    """A syntax error maps to INVALID_ARGUMENT, is a ValueError, and carries the field."""
    with pytest.raises(SelectorSyntaxError) as info:
        parse("tier in web", field="selector")
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, SelectorError)
    assert isinstance(err, InvalidArgument)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(err) == "selector: position 8: expected '(' after 'in', found 'web'"


# --- matching ----------------------------------------------------------------

MATCHES = [
    ("", {"x": "y"}, True),  # k8s
    ("", {}, True),
    ("x=y", {"x": "y"}, True),  # k8s
    ("x=y,z=w", {"x": "y", "z": "w"}, True),  # k8s
    ("x!=y,z!=w", {"x": "z", "z": "a"}, True),  # k8s
    ("notin=in", {"notin": "in"}, True),  # k8s
    ("x", {"x": "z"}, True),  # k8s
    ("!x", {"y": "z"}, True),  # k8s
    ("x>1", {"x": "2"}, True),  # k8s
    ("x<1", {"x": "0"}, True),  # k8s
    ("x=z", {}, False),  # k8s
    ("x=y", {"x": "z"}, False),  # k8s
    ("x=y,z=w", {"x": "w", "z": "w"}, False),  # k8s
    ("x!=y,z!=w", {"x": "z", "z": "w"}, False),  # k8s
    ("x", {"y": "z"}, False),  # k8s
    ("!x", {"x": "z"}, False),  # k8s
    ("x>1", {"x": "0"}, False),  # k8s
    ("x<1", {"x": "2"}, False),  # k8s
    ("foo=bar,baz=blah", {"foo": "bar", "baz": "blah"}, True),  # k8s
    ("foo=bar,foobar=bar,baz=blah", {"foo": "bar", "baz": "blah"}, False),  # k8s
    ("x in (foo),y notin (alpha)", {"x": "foo", "y": "baz"}, True),  # k8s
    ("x in (foo),y in (alpha)", {"x": "foo", "y": "baz"}, False),  # k8s
    ("x notin (),y", {"y": ""}, True),  # k8s: x absent, y present and empty
    ("!x,y", {"y": ""}, True),  # k8s
    ("x notin (),!y", {"y": ""}, False),  # k8s
    ("x in ()", {"y": "baz"}, False),  # k8s
    ("x in ()", {"x": ""}, True),
    # () holds the empty value (selector.go's parseValues), so 'notin ()' is '!=':
    ("z notin ()", {"z": ""}, False),
    ("z notin ()", {"z": "a"}, True),
    ("z notin ()", {}, True),
    ("z>1", {"z": "2"}, True),  # k8s
    ("z>1", {"z": "v2"}, False),  # k8s: a non-integer value never matches
    # != and notin match an absent key; in, =, >, < need it present.
    ("x!=a", {}, True),
    ("x notin (a,b)", {}, True),
    ("x notin (a,b)", {"x": "b"}, False),
    ("x in (a,b)", {}, False),
    ("x>1", {}, False),
    ("x<1", {}, False),
    # Integers are read as Go's strconv.ParseInt(s, 10, 64) reads them.
    ("x>9", {"x": "10"}, True),  # numeric, not string, comparison
    ("x<10", {"x": "9"}, True),
    ("x>5", {"x": "007"}, True),
    ("x<0", {"x": "-3"}, True),
    ("x>0", {"x": "+3"}, True),
    ("x<5", {"x": "3.0"}, False),
    ("x<5", {"x": " 3"}, False),
    ("x<5", {"x": "1_0"}, False),  # Python's int() would accept this; Go does not
    ("x<5", {"x": "٣"}, False),  # nor non-ASCII digits
    ("x<5", {"x": ""}, False),
    ("x>0", {"x": "9223372036854775807"}, True),
    ("x>0", {"x": "9223372036854775808"}, False),  # out of int64: not an integer
    ("x>3,x<3", {"x": "3"}, False),
    ("a=x,a=y", {"a": "x"}, False),  # contradictory equalities match nothing
]


@pytest.mark.parametrize(("text", "labels", "expected"), MATCHES)
def test_matching_follows_kubernetes(text: str, labels: dict[str, str], expected: bool) -> None:
    """Selectors match label sets exactly as Kubernetes decides."""
    assert parse(text).matches(labels) is expected


def test_everything_matches_everything_and_is_empty() -> None:
    """The empty selector restricts nothing and prints as the empty string."""
    everything = Selector.everything()
    assert everything.is_empty
    assert everything == parse("") == parse("  ")
    assert str(everything) == ""
    assert everything.matches({})
    assert everything.matches({"x": "y"})
    assert not parse("x").is_empty


def test_from_labels_matches_supersets() -> None:
    """A selector built from a label set matches that set and any superset only."""
    selector = Selector.from_labels({"env": "prod", "tier": "web"})
    assert str(selector) == "env=prod,tier=web"
    assert selector.matches({"env": "prod", "tier": "web", "extra": "1"})
    assert not selector.matches({"env": "prod"})


# --- value semantics -----------------------------------------------------------


def test_selector_is_hashable_and_equal_by_canonical_form() -> None:
    """Differently spaced or ordered but identical selectors are equal and hash alike."""
    a = parse("tier in (web, api), env = prod, env=prod")
    b = parse("env=prod,tier in (api,web)")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, parse("env=prod")}) == 2
    assert repr(a) == "Selector('env=prod,tier in (api,web)')"


def test_operators_that_mean_the_same_still_print_as_written() -> None:
    """'=', '==' and 'in (v)' match alike but stay apart, so a selector prints as written."""
    spellings = [parse("env=prod"), parse("env==prod"), parse("env in (prod)")]
    assert [str(s) for s in spellings] == ["env=prod", "env==prod", "env in (prod)"]
    assert len(set(spellings)) == 3
    for labels in ({"env": "prod"}, {"env": "dev"}, {}):
        assert len({s.matches(labels) for s in spellings}) == 1
    assert str(parse("env!=prod")) != str(parse("env notin (prod)"))


def test_selector_is_immutable() -> None:
    """A selector cannot be changed after construction."""
    selector = parse("a=b")
    with pytest.raises(AttributeError):
        selector.requirements = ()  # type: ignore[misc]


def test_requirement_constructor_canonicalises() -> None:
    """Requirements built in code are sorted, de-duplicated and printed like parsed ones."""
    req = Requirement("x", Operator.IN, ("def", "abc", "abc"))
    assert req.values == ("abc", "def")
    assert str(req) == "x in (abc,def)"
    assert Selector((req, Requirement("z", Operator.EXISTS))) == parse("z,x in (def,abc)")


@pytest.mark.parametrize(
    ("key", "op", "values", "fragment"),
    [
        ("x", Operator.IN, (), "values set can't be empty"),  # k8s
        ("x", Operator.NOT_IN, (), "values set can't be empty"),  # k8s
        ("foo", Operator.GT, ("bar",), "must be an integer"),  # k8s
        ("barz", Operator.LT, ("blah",), "must be an integer"),  # k8s
        ("a" * 254, Operator.EXISTS, (), "invalid label key"),  # k8s
        ("x", Operator.EXISTS, ("a",), "values set must be empty"),
        ("x", Operator.GT, ("1", "2"), "exactly one value is required"),
        ("x", Operator.IN, ("a b",), "invalid label value 'a b'"),
    ],
)
def test_requirement_constructor_refuses_invalid(
    key: str, op: Operator, values: tuple[str, ...], fragment: str
) -> None:
    """Building an invalid requirement in code raises SelectorError."""
    with pytest.raises(SelectorError, match=fragment):
        Requirement(key, op, values)


@pytest.mark.parametrize(
    ("key", "op", "values"),
    [("1foo", Operator.IN, ("bar",)), ("1234", Operator.IN, ("bar",)), ("y", Operator.GT, ("1",))],
)
def test_requirement_constructor_accepts_kubernetes_valid(
    key: str, op: Operator, values: tuple[str, ...]
) -> None:
    """k8s TestRequirementConstructor's valid cases construct."""
    assert Requirement(key, op, values).key == key


# --- protobuf ------------------------------------------------------------------


def test_to_proto_uses_match_labels_for_equality() -> None:
    """'=' becomes match_labels, every other requirement an expression with its own operator."""
    msg = to_proto(
        parse(
            "env=prod,tier in (web,api),!canary,zone!=b,shards>3,rank<2,gpu,"
            "os==linux,arch in (arm),z notin (),y notin (c)"
        )
    )
    assert dict(msg.match_labels) == {"env": "prod"}
    got = [(e.key, e.operator, list(e.values)) for e in msg.match_expressions]
    assert got == [
        ("arch", pb.SELECTOR_OPERATOR_IN, ["arm"]),
        ("canary", pb.SELECTOR_OPERATOR_NOT_EXISTS, []),
        ("gpu", pb.SELECTOR_OPERATOR_EXISTS, []),
        ("os", pb.SELECTOR_OPERATOR_DOUBLE_EQUALS, ["linux"]),
        ("rank", pb.SELECTOR_OPERATOR_LT, ["2"]),
        ("shards", pb.SELECTOR_OPERATOR_GT, ["3"]),
        ("tier", pb.SELECTOR_OPERATOR_IN, ["api", "web"]),
        ("y", pb.SELECTOR_OPERATOR_NOT_IN, ["c"]),
        ("z", pb.SELECTOR_OPERATOR_NOT_IN, [""]),
        ("zone", pb.SELECTOR_OPERATOR_NOT_EQUALS, ["b"]),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "env=prod,tier in (web,api),!canary,zone!=b,shards>3,rank<2,gpu",
        "a=x,a=y",  # second equality on a key cannot share the map
        "a=,b in (,c),d notin (,e)",
        "in=notin,notin in (in,x)",
        "z notin (),y in (),x!=,w==",
        "y==jkl,y notin (jkl),y in (jkl),y!=jkl",
    ],
)
def test_proto_round_trips_both_ways(text: str) -> None:
    """selector -> proto -> selector is the identity, and so is proto -> selector -> proto."""
    selector = parse(text)
    msg = to_proto(selector)
    assert from_proto(msg) == selector
    assert to_proto(from_proto(msg)) == msg
    assert pb.LabelSelector.FromString(msg.SerializeToString()) == msg


def test_from_proto_accepts_hand_written_messages() -> None:
    """A message as another client would write it means what Kubernetes says it means."""
    msg = pb.LabelSelector(
        match_labels={"env": "prod"},
        match_expressions=[
            pb.LabelSelectorRequirement(
                key="tier", operator=pb.SELECTOR_OPERATOR_IN, values=["web"]
            ),
            pb.LabelSelectorRequirement(
                key="zone", operator=pb.SELECTOR_OPERATOR_NOT_IN, values=["b", "a", "b"]
            ),
            pb.LabelSelectorRequirement(key="n", operator=pb.SELECTOR_OPERATOR_GT, values=["010"]),
        ],
    )
    selector = from_proto(msg)
    assert str(selector) == "env=prod,n>10,tier in (web),zone notin (a,b)"
    assert selector.matches({"env": "prod", "tier": "web", "n": "11"})
    assert not selector.matches({"env": "prod", "tier": "web", "n": "10"})


def _expr(key: str, op: int, *values: str) -> pb.LabelSelector:
    return pb.LabelSelector(
        match_expressions=[
            pb.LabelSelectorRequirement(key="ok", operator=pb.SELECTOR_OPERATOR_EXISTS),
            pb.LabelSelectorRequirement(key=key, operator=op, values=values),  # type: ignore[arg-type]
        ]
    )


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (
            _expr("a", 10),
            "selector.match_expressions[1].operator: unknown operator 10; expected one of "
            "SELECTOR_OPERATOR_IN, SELECTOR_OPERATOR_NOT_IN, SELECTOR_OPERATOR_EXISTS, "
            "SELECTOR_OPERATOR_NOT_EXISTS, SELECTOR_OPERATOR_GT, SELECTOR_OPERATOR_LT, "
            "SELECTOR_OPERATOR_EQUALS, SELECTOR_OPERATOR_DOUBLE_EQUALS, "
            "SELECTOR_OPERATOR_NOT_EQUALS",
        ),
        (_expr("a", pb.SELECTOR_OPERATOR_UNSPECIFIED), "match_expressions[1].operator: unset;"),
        (
            _expr("a", pb.SELECTOR_OPERATOR_EXISTS, "x"),
            "selector.match_expressions[1].values: values set must be empty for exists",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_NOT_EXISTS, "x"),
            "selector.match_expressions[1].values: values set must be empty",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_GT),
            "selector.match_expressions[1].values: for '>', '<' operators, exactly one value "
            "is required, got 0",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_LT, "1", "2"),
            "exactly one value is required, got 2",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_GT, "x"),
            "selector.match_expressions[1].values: for '>', '<' operators, the value must be "
            "an integer, got 'x'",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_GT, "-1"),
            "selector.match_expressions[1].values[0]: invalid label value '-1'",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_IN),
            "selector.match_expressions[1].values: for 'in', 'notin' operators, values set "
            "can't be empty",
        ),
        (  # 'notin ()' is values [""]; no values at all is refused, as NewRequirement does
            _expr("a", pb.SELECTOR_OPERATOR_NOT_IN),
            "selector.match_expressions[1].values: for 'in', 'notin' operators, values set "
            "can't be empty",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_EQUALS),
            "selector.match_expressions[1].values: for '=', '==', '!=' operators, exactly one "
            "value is required, got 0",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_NOT_EQUALS, "x", "y"),
            "exactly one value is required, got 2",
        ),
        (
            _expr("Bad Key", pb.SELECTOR_OPERATOR_EXISTS),
            "selector.match_expressions[1].key: invalid label key 'Bad Key'",
        ),
        (
            _expr("a", pb.SELECTOR_OPERATOR_IN, "ok", "not ok"),
            "selector.match_expressions[1].values[1]: invalid label value 'not ok'",
        ),
        (
            pb.LabelSelector(match_labels={"/x": "y"}),
            "selector.match_labels: invalid label key '/x': prefix part must be non-empty",
        ),
        (
            pb.LabelSelector(match_labels={"x": "y z"}),
            "selector.match_labels['x']: invalid label value 'y z'",
        ),
    ],
)
def test_from_proto_refuses_invalid_content_naming_the_field(
    msg: pb.LabelSelector, message: str
) -> None:
    """Bad proto content is INVALID_ARGUMENT naming the exact field."""
    with pytest.raises(SelectorError) as info:
        from_proto(msg)
    assert message in str(info.value)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_from_proto_field_prefix_is_configurable() -> None:
    """Callers embedding the selector under another name get that name in errors."""
    with pytest.raises(SelectorError, match=r"^request\.nodes\.match_expressions\[1\]\.operator"):
        from_proto(_expr("a", 42), field="request.nodes")
