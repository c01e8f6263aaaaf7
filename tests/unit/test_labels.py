"""Label key/value syntax (Kubernetes' rules) and the node-id rule."""

from __future__ import annotations

import grpc
import pytest

from fleet.errors import InvalidArgument
from fleet.labels import (
    LabelError,
    is_valid_label_key,
    is_valid_label_value,
    validate_label_key,
    validate_label_value,
    validate_labels,
    validate_node_id,
)

# Cases follow k8s.io/apimachinery/pkg/util/validation/validation_test.go
# (TestIsQualifiedName, TestIsValidLabelValue).
GOOD_KEYS = [
    "simple",
    "now-with-dashes",
    "1-starts-with-num",
    "1234",
    "simple/simple",
    "now-with-dashes/simple",
    "now-with-dashes/now-with-dashes",
    "now.with.dots/simple",
    "now-with.dashes-and.dots/simple",
    "1-num.2-num/3-num",
    "1234/5678",
    "1.2.3.4/5678",
    "Uppercase_Is_OK_123",
    "example.com/Uppercase_Is_OK_123",
    "requests.storage-foo",
    "a" * 63,
    "a" * 253 + "/" + "b" * 63,
    "in",
    "notin",
]
BAD_KEYS = [
    ("", "name part must be non-empty"),
    ("nospecialchars%^=@", "name part must consist of alphanumeric"),
    ("cantendwithadash-", "name part must consist of alphanumeric"),
    ("-cantstartwithadash-", "name part must consist of alphanumeric"),
    ("only/one/slash", "a qualified name must consist of"),
    ("Example.com/abc", "prefix part a lowercase RFC 1123 subdomain"),
    ("example_com/abc", "prefix part a lowercase RFC 1123 subdomain"),
    ("example.com/", "name part must be non-empty"),
    ("/simple", "prefix part must be non-empty"),
    ("example..com/a", "prefix part a lowercase RFC 1123 subdomain"),
    ("a" * 64, "name part must be no more than 63 characters"),
    ("a" * 254 + "/abc", "prefix part must be no more than 253 characters"),
    ("white space", "name part must consist of alphanumeric"),
    ("ünïcode", "name part must consist of alphanumeric"),
]
GOOD_VALUES = ["", "simple", "now-with-dashes", "1-starts-with-num", "end-with-num-1", "1234",
               "a" * 63, "Upper_And.dots-9", "in"]  # fmt: skip
BAD_VALUES = [
    ("nospecialchars%^=@", "a valid label must be an empty string or consist of"),
    ("Tama-nui-te-rā.is.Māori.sun", "a valid label must be an empty string"),
    ("\\backslashes\\are\\bad", "a valid label must be an empty string"),
    ("-starts-with-dash", "a valid label must be an empty string"),
    ("ends-with-dash-", "a valid label must be an empty string"),
    (".starts.with.dot", "a valid label must be an empty string"),
    ("ends.with.dot.", "a valid label must be an empty string"),
    ("a b", "a valid label must be an empty string"),
    ("a" * 64, "must be no more than 63 characters"),
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_valid_keys_are_accepted(key: str) -> None:
    """Keys Kubernetes accepts pass validation."""
    validate_label_key(key)
    assert is_valid_label_key(key)


@pytest.mark.parametrize(("key", "reason"), BAD_KEYS)
def test_invalid_keys_are_refused_with_kubernetes_wording(key: str, reason: str) -> None:
    """A bad key is refused and the message quotes the key and the broken rule."""
    with pytest.raises(LabelError) as info:
        validate_label_key(key)
    assert f"invalid label key {key!r}: {reason}" in str(info.value)
    assert not is_valid_label_key(key)


@pytest.mark.parametrize("value", GOOD_VALUES)
def test_valid_values_are_accepted(value: str) -> None:
    """Values Kubernetes accepts pass validation, the empty value included."""
    validate_label_value(value)
    assert is_valid_label_value(value)


@pytest.mark.parametrize(("value", "reason"), BAD_VALUES)
def test_invalid_values_are_refused(value: str, reason: str) -> None:
    """A bad value is refused and the message quotes it and the broken rule."""
    with pytest.raises(LabelError, match="invalid label value") as info:
        validate_label_value(value)
    assert reason in str(info.value)
    assert not is_valid_label_value(value)


def test_label_error_is_value_error_and_invalid_argument() -> None:
    """LabelError maps to INVALID_ARGUMENT and is still a ValueError for pure callers."""
    with pytest.raises(LabelError) as info:
        validate_label_key("bad key", field="labels")
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, InvalidArgument)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == "labels"
    assert str(err).startswith("labels: invalid label key 'bad key'")


def test_non_string_key_is_refused() -> None:
    """A key that is not a string gets a clear type message, not a crash."""
    with pytest.raises(LabelError, match="label key must be a string, not int"):
        validate_label_key(3)  # type: ignore[arg-type]


def test_validate_labels_accepts_a_good_set() -> None:
    """A typical label set passes."""
    validate_labels({"env": "prod", "example.com/tier": "web", "canary": ""})


def test_validate_labels_names_the_bad_key() -> None:
    """A bad value is reported with the key it belongs to."""
    with pytest.raises(LabelError) as info:
        validate_labels({"env": "prod", "tier": "web api"})
    assert str(info.value).startswith("labels: label 'tier': invalid value 'web api'")


def test_validate_labels_reports_the_first_bad_key_in_sorted_order() -> None:
    """The same bad input always yields the same message whatever the dict order."""
    for labels in ({"b b": "1", "a a": "1"}, {"a a": "1", "b b": "1"}):
        with pytest.raises(LabelError, match="invalid label key 'a a'"):
            validate_labels(labels)


def test_validate_labels_refuses_non_string_value() -> None:
    """A non-string value names its key and type."""
    with pytest.raises(LabelError, match="label 'n': value must be a string, not int"):
        validate_labels({"n": 1})  # type: ignore[dict-item]


def test_validate_labels_caps_the_count() -> None:
    """More than max_labels labels are refused, naming the limit and the count."""
    validate_labels({f"k{i}": "v" for i in range(3)}, max_labels=3)
    with pytest.raises(LabelError, match="must have at most 3 labels, got 4"):
        validate_labels({f"k{i}": "v" for i in range(4)}, max_labels=3)


@pytest.mark.parametrize("node_id", ["web-1", "a", "0", "db-eu-west-3", "x" * 63])
def test_valid_node_ids(node_id: str) -> None:
    """Lowercase RFC 1123 labels are valid node ids (and valid label values)."""
    validate_node_id(node_id)
    assert is_valid_label_value(node_id)


@pytest.mark.parametrize(
    ("node_id", "reason"),
    [
        ("", "node id must be non-empty"),
        ("Web-1", "lowercase RFC 1123 label"),  # would collide with web-1 in DNS
        ("web_1", "lowercase RFC 1123 label"),  # '_' is no hostname character
        ("web.1", "lowercase RFC 1123 label"),  # would add a DNS level
        ("-web", "lowercase RFC 1123 label"),
        ("web-", "lowercase RFC 1123 label"),
        ("x" * 64, "must be no more than 63 characters (got 64)"),
    ],
)
def test_invalid_node_ids(node_id: str, reason: str) -> None:
    """Node ids that could not be a certificate's DNS label are refused."""
    with pytest.raises(LabelError) as info:
        validate_node_id(node_id)
    assert str(info.value).startswith("node_id: ")
    assert reason in str(info.value)
