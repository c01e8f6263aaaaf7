"""Label syntax: Kubernetes' rules for label keys and values, and node ids.

Nodes and agents carry labels that `fleet.selectors` selects on, so they
follow Kubernetes' syntax exactly (k8s.io/apimachinery/pkg/util/validation):

- key:   ``[prefix/]name``; prefix an optional lowercase RFC 1123 DNS
  subdomain of at most 253 characters, name 1..63 characters of
  ``[-_.A-Za-z0-9]`` that start and end alphanumeric.
- value: empty, or 1..63 characters with the same rule as a key's name.

Node ids are stricter than label values (see `validate_node_id`).

Every failure raises `LabelError`, which is both a `ValueError` (for pure
callers) and an `InvalidArgument` (so a servicer can let it propagate and the
client gets INVALID_ARGUMENT with the message). Messages follow Kubernetes'
wording, so operators who know it recognise them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fleet.errors import InvalidArgument

__all__ = [
    "MAX_LABELS",
    "MAX_NAME_LENGTH",
    "MAX_PREFIX_LENGTH",
    "LabelError",
    "is_valid_label_key",
    "is_valid_label_value",
    "validate_label_key",
    "validate_label_value",
    "validate_labels",
    "validate_node_id",
]

MAX_NAME_LENGTH = 63
"""Longest key name, label value and node id (a DNS label's limit)."""

MAX_PREFIX_LENGTH = 253
"""Longest key prefix (a DNS subdomain's limit)."""

MAX_LABELS = 64
"""Default cap on labels per object, so a selector scan stays cheap."""

_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
_NODE_ID = re.compile(_DNS_LABEL)

_NAME_RULE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character"
)
_SUBDOMAIN_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
    "'-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com')"
)


class LabelError(InvalidArgument, ValueError):
    """A label key, label value, label set or node id breaks the syntax rules.

    The message names the offending key or value and the rule it breaks; fix
    the input, retrying cannot help.
    """


def _key_problem(key: str) -> str | None:
    parts = key.split("/")
    if len(parts) > 2:
        return (
            f"a qualified name {_NAME_RULE} (e.g. 'MyName', 'my.name' or '123-abc') "
            "with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        )
    name = parts[-1]
    if len(parts) == 2:
        prefix = parts[0]
        if not prefix:
            return "prefix part must be non-empty"
        if len(prefix) > MAX_PREFIX_LENGTH:
            return f"prefix part must be no more than {MAX_PREFIX_LENGTH} characters"
        if not _DNS_SUBDOMAIN.fullmatch(prefix):
            return f"prefix part {_SUBDOMAIN_RULE}"
    if not name:
        return "name part must be non-empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"name part must be no more than {MAX_NAME_LENGTH} characters"
    if not _NAME.fullmatch(name):
        return f"name part {_NAME_RULE} (e.g. 'MyName', 'my.name' or '123-abc')"
    return None


def _value_problem(value: str) -> str | None:
    if not value:
        return None
    if len(value) > MAX_NAME_LENGTH:
        return f"must be no more than {MAX_NAME_LENGTH} characters"
    if not _NAME.fullmatch(value):
        return (
            f"a valid label must be an empty string or {_NAME_RULE.removeprefix('must ')} "
            "(e.g. 'MyValue', 'my_value' or '12345')"
        )
    return None


def is_valid_label_key(key: str) -> bool:
    """Whether `key` is a valid label key (no exception, for filters)."""
    return isinstance(key, str) and _key_problem(key) is None


def is_valid_label_value(value: str) -> bool:
    """Whether `value` is a valid label value (no exception, for filters)."""
    return isinstance(value, str) and _value_problem(value) is None


def validate_label_key(key: str, *, field: str | None = None) -> None:
    """Raise `LabelError` unless `key` is ``[DNS-subdomain/]name``.

    `field` (e.g. ``"selector.match_expressions[0].key"``) prefixes the message.
    """
    if not isinstance(key, str):
        raise LabelError(f"label key must be a string, not {type(key).__name__}", field=field)
    problem = _key_problem(key)
    if problem is not None:
        raise LabelError(f"invalid label key {key!r}: {problem}", field=field)


def validate_label_value(value: str, *, field: str | None = None) -> None:
    """Raise `LabelError` unless `value` is empty or a valid 1..63 char name."""
    if not isinstance(value, str):
        raise LabelError(f"label value must be a string, not {type(value).__name__}", field=field)
    problem = _value_problem(value)
    if problem is not None:
        raise LabelError(f"invalid label value {value!r}: {problem}", field=field)


def validate_labels(
    labels: Mapping[str, str], *, max_labels: int = MAX_LABELS, field: str | None = "labels"
) -> None:
    """Raise `LabelError` naming the first bad key (in sorted order) or value.

    Also refuses more than `max_labels` labels. Keys are checked in sorted
    order so the same bad input always yields the same message.
    """
    if len(labels) > max_labels:
        raise LabelError(f"must have at most {max_labels} labels, got {len(labels)}", field=field)
    for key in sorted(labels, key=str):
        validate_label_key(key, field=field)
        value = labels[key]
        if not isinstance(value, str):
            raise LabelError(
                f"label {key!r}: value must be a string, not {type(value).__name__}",
                field=field,
            )
        problem = _value_problem(value)
        if problem is not None:
            raise LabelError(f"label {key!r}: invalid value {value!r}: {problem}", field=field)


def validate_node_id(node_id: str, *, field: str | None = "node_id") -> None:
    """Raise `LabelError` unless `node_id` is a lowercase RFC 1123 DNS label.

    Stricter than a label value on purpose: a node id becomes the name in
    the node's certificate (SAN URI ``spiffe://<td>/node/<id>`` and DNS name
    ``<id>.node.<td>``). DNS names compare case-insensitively, so allowing
    upper case would let ``Web-1`` and ``web-1`` claim one certificate name;
    ``_`` is not valid in a hostname and ``.`` would add a DNS level. Every
    valid node id is still a valid label value, so it can be selected on.
    """
    if not isinstance(node_id, str):
        raise LabelError(f"node id must be a string, not {type(node_id).__name__}", field=field)
    if not node_id:
        raise LabelError("node id must be non-empty", field=field)
    if len(node_id) > MAX_NAME_LENGTH:
        raise LabelError(
            f"invalid node id {node_id[:20]!r}...: must be no more than "
            f"{MAX_NAME_LENGTH} characters (got {len(node_id)})",
            field=field,
        )
    if not _NODE_ID.fullmatch(node_id):
        raise LabelError(
            f"invalid node id {node_id!r}: a lowercase RFC 1123 label must consist of "
            "lower case alphanumeric characters or '-', and must start and end with an "
            "alphanumeric character (e.g. 'my-name' or '123-abc')",
            field=field,
        )
