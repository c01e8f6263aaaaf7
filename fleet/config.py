"""Load a TOML file into a frozen, typed dataclass, with environment overrides.

One generic loader serves every component: the dataclass *is* the schema.
Sub-dataclasses are TOML tables, ``tuple[Sub, ...]`` is an array of tables
(``[[agents]]``), and the leaf types are ``str``, ``int``, ``float``,
``bool``, ``Path``, ``tuple[str, ...]``, ``tuple[int, ...]``,
``dict[str, str]``, ``Literal[...]`` and ``X | None``. Defaults come from
the dataclass; a field without one is a required key.

Every problem is a `ConfigError` with one line
``<source>: <dotted.key>: <what is wrong>``, where the source is the file or
the environment variable the bad value came from::

    manager.toml: server.lisen: unknown key (did you mean 'listen'?)
    manager.toml: server.port: expected an integer, got 'abc'
    env FLEET_MANAGER_SERVER_PORT: server.port: expected an integer, got 'x'

Environment overrides: scalar key ``server.listen`` with
``env_prefix="FLEET_MANAGER_"`` is overridden by ``FLEET_MANAGER_SERVER_LISTEN``.
Overrides win over the file. For an ``X | None`` field an empty value means
None. Arrays, tables and keys inside arrays of tables come from the file only.

A dataclass may define ``validate(self) -> None`` raising ValueError for
cross-field rules; it runs after the instance is built (inner tables first)
and its message is reported like any other bad value.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, Union, get_args, get_origin

from fleet.errors import ConfigError, FileSettingError

__all__ = ["env_var_name", "load_config"]

T = TypeVar("T")

_NONE = type(None)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def load_config(
    cls: type[T],
    path: str | Path | None,
    *,
    env_prefix: str,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from the TOML file at `path` (None: defaults and env only).

    Raises ConfigError (one line: source, dotted key, problem) for an
    unreadable file, bad TOML, unknown keys, wrong types, missing required
    keys, values outside a Literal, bad environment values and failed
    ``validate()`` checks.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    source = str(path) if path is not None else "(no config file)"
    raw: dict[str, Any] = {} if path is None else _read_toml(Path(path))
    origins: dict[str, str] = {}
    env = os.environ if environ is None else environ
    for dotted, tp in _scalar_keys(cls):
        name = env_var_name(env_prefix, dotted)
        if name in env:
            value = _parse_env(tp, env[name], f"env {name}", dotted)
            _put(raw, dotted, value)
            origins[dotted] = f"env {name}"
    result: T = _Builder(source, origins, env_prefix).build(cls, raw, "")
    return result


def env_var_name(env_prefix: str, dotted_key: str) -> str:
    """The environment variable overriding `dotted_key` (server.listen -> PREFIX_SERVER_LISTEN)."""
    return env_prefix + dotted_key.replace(".", "_").upper()


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line L, column C)".
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


# --- type introspection -------------------------------------------------------


def _optional_inner(tp: Any) -> Any | None:
    """For ``X | None`` return X; otherwise None."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not _NONE]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0]
        raise TypeError(f"unsupported config field type {tp!r}: only 'X | None' unions")
    return None


def _is_scalar(tp: Any) -> bool:
    return tp in (str, int, float, bool, Path) or get_origin(tp) is Literal


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _init_fields(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            yield f, hints[f.name]


def _scalar_keys(cls: type[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every dotted key an environment variable may override, with its type."""
    for f, tp in _init_fields(cls):
        dotted = f"{prefix}{f.name}"
        inner = _optional_inner(tp)
        base = tp if inner is None else inner
        if _is_scalar(base):
            yield dotted, tp
        elif _is_dataclass_type(base):
            yield from _scalar_keys(base, dotted + ".")


def _put(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *tables, leaf = dotted.split(".")
    node = raw
    for part in tables:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return  # the file has a non-table here; the builder reports that
        node = child
    node[leaf] = value


# --- environment values -------------------------------------------------------


def _parse_env(tp: Any, text: str, source: str, dotted: str) -> Any:
    def fail(problem: str) -> NoReturn:
        raise ConfigError(f"{source}: {dotted}: {problem}")

    inner = _optional_inner(tp)
    if inner is not None:
        if text == "":
            return None
        tp = inner
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        fail(f"expected a boolean (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            fail(f"expected an integer, got {text!r}")
    if tp is float:
        try:
            return float(text)
        except ValueError:
            fail(f"expected a number, got {text!r}")
    if get_origin(tp) is Literal:
        for choice in get_args(tp):
            if str(choice) == text:
                return choice
        fail(f"must be one of {_choices(tp)}, got {text!r}")
    return text  # str and Path: the builder converts Path


# --- building -----------------------------------------------------------------


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _choices(tp: Any) -> str:
    return ", ".join(str(c) for c in get_args(tp))


class _Builder:
    """Converts the raw TOML tree, reporting the first problem with its key."""

    def __init__(self, source: str, origins: Mapping[str, str], env_prefix: str) -> None:
        self._source = source
        self._origins = origins
        self._env_prefix = env_prefix

    def fail(self, key: str, problem: str) -> NoReturn:
        source = self._origins.get(key, self._source)
        raise ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")

    def build(self, cls: type[T], raw: Mapping[str, Any], prefix: str) -> T:
        fields = dict(_init_fields(cls))
        names = {f.name: f for f in fields}
        for key in raw:
            if key not in names:
                close = difflib.get_close_matches(key, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(f"{prefix}{key}", f"unknown key{hint}")
        # Keys a class has but a config file may not set, with why, checked before their
        # value is read: "expected a table" would send the operator the wrong way.
        for key, why in getattr(cls, "config_refused_keys", {}).items():
            if key in raw:
                self.fail(f"{prefix}{key}", why)
        kwargs: dict[str, Any] = {}
        for f, tp in fields.items():
            dotted = f"{prefix}{f.name}"
            if f.name in raw:
                kwargs[f.name] = self.value(tp, raw[f.name], dotted)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(dotted, f"missing required key{self._env_hint(tp, dotted)}")
        table = prefix.rstrip(".")
        try:
            obj = cls(**kwargs)
            validate = getattr(obj, "validate", None)
            if callable(validate):
                validate()
        except ValueError as exc:
            self._fail_check(table, str(exc), raw, list(names))
        except FileSettingError as exc:  # a file a key names: said of the key, where it was set
            self.fail(f"{prefix}{exc.field}", f"{exc.path}: {exc.problem}")
        return obj

    def _fail_check(
        self, table: str, message: str, raw: Mapping[str, Any], names: list[str]
    ) -> NoReturn:
        """A failed ``validate()`` as one line, with the source of the values it names.

        A check names the keys it is about; one set by an environment variable is reported
        with that variable (and the file too when the file set another named key), so the
        operator is not sent to look in the file for a value that is not there. A message
        that already starts with its table (``server.listen: ...``) is not prefixed again.
        """
        prefix = f"{table}." if table else ""
        named = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", message)]
        env = [self._origins[prefix + n] for n in named if prefix + n in self._origins]
        in_file = any(n in raw and prefix + n not in self._origins for n in named)
        source = ", ".join(([self._source] if in_file or not env else []) + env)
        if table and not message.startswith((f"{table}.", f"{table}:")):
            message = f"{table}: {message}"
        raise ConfigError(f"{source}: {message}")

    def _env_hint(self, tp: Any, dotted: str) -> str:
        if "[" in dotted or not _is_scalar(_optional_inner(tp) or tp):
            return ""
        return f" (set it in the file or {env_var_name(self._env_prefix, dotted)})"

    def value(self, tp: Any, value: Any, key: str) -> Any:
        inner = _optional_inner(tp)
        if inner is not None:
            return None if value is None else self.value(inner, value, key)
        origin = get_origin(tp)
        if tp is bool:
            return self._check(value, bool, "a boolean", key)
        if tp is int:
            if isinstance(value, bool):
                self.fail(key, f"expected an integer, got {_describe(value)}")
            return self._check(value, int, "an integer", key)
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                self.fail(key, f"expected a number, got {_describe(value)}")
            return float(value)
        if tp is str:
            return self._check(value, str, "a string", key)
        if tp is Path:
            return Path(self._check(value, str, "a path (string)", key))
        if origin is Literal:
            choices = get_args(tp)
            # `in` alone would accept True for Literal[1]; compare types too.
            if not any(value == c and type(value) is type(c) for c in choices):
                self.fail(key, f"must be one of {_choices(tp)}, got {_describe(value)}")
            return value
        if origin is tuple:
            args = get_args(tp)
            if len(args) != 2 or args[1] is not Ellipsis:
                raise TypeError(f"unsupported config field type {tp!r}: use tuple[X, ...]")
            what = "an array of tables" if _is_dataclass_type(args[0]) else "an array"
            items = self._check(value, list, what, key)
            return tuple(self.value(args[0], item, f"{key}[{i}]") for i, item in enumerate(items))
        if origin is dict:
            key_tp, value_tp = get_args(tp)
            if key_tp is not str:
                raise TypeError(f"unsupported config field type {tp!r}: keys must be str")
            table = self._check(value, dict, "a table", key)
            return {k: self.value(value_tp, v, f"{key}.{k}") for k, v in table.items()}
        if _is_dataclass_type(tp):
            table = self._check(value, dict, "a table", key)
            return self.build(tp, table, f"{key}.")
        raise TypeError(f"unsupported config field type {tp!r} for {key}")

    def _check(self, value: Any, tp: type[Any], what: str, key: str) -> Any:
        if not isinstance(value, tp):
            self.fail(key, f"expected {what}, got {_describe(value)}")
        return value
