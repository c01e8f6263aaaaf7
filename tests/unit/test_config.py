"""fleet.config: TOML files into frozen dataclasses, env overrides, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from fleet.config import env_var_name, load_config
from fleet.errors import ConfigError
from fleet.retry import Backoff


@dataclass(frozen=True)
class Server:
    """The listening side."""

    listen: str
    """host:port to listen on."""
    port: int = 7000
    """A port number."""
    tags: tuple[str, ...] = ()
    """Free-form tags."""


@dataclass(frozen=True)
class Agent:
    """One [[agents]] entry."""

    name: str
    """Agent name."""
    argv: tuple[str, ...]
    """Command line."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment."""
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    """Restart policy."""


@dataclass(frozen=True)
class Limits:
    """Cross-checked pair."""

    low: int = 1
    """Lower bound."""
    high: int = 10
    """Upper bound."""

    def validate(self) -> None:
        """low must not exceed high."""
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")


@dataclass(frozen=True)
class Cfg:
    """A config exercising every supported field type."""

    server: Server
    """Required table."""
    name: str = "fleet"
    """A string."""
    ratio: float = 0.5
    """A float."""
    debug: bool = False
    """A boolean."""
    data_dir: Path = Path("/var/lib/fleet")
    """A path."""
    ports: tuple[int, ...] = (1, 2)
    """Integers."""
    labels: dict[str, str] = field(default_factory=dict)
    """A string map."""
    log_format: Literal["plain", "json"] = "plain"
    """A choice."""
    timeout: float | None = None
    """Optional number."""
    limits: Limits = Limits()
    """Checked table."""
    agents: tuple[Agent, ...] = ()
    """Array of tables."""


@dataclass(frozen=True)
class Defaults:
    """A config that needs no file."""

    level: Literal["info", "debug"] = "info"
    """Log level."""
    port: int = 9100
    """Port."""
    data_dir: Path | None = None
    """Optional path."""
    limits: Limits = Limits()
    """Checked table."""


@dataclass(frozen=True)
class Dotted:
    """Checked with a message that names its table."""

    low: int = 1
    """Must be positive."""

    def validate(self) -> None:
        """low must be positive."""
        if self.low < 1:
            raise ValueError(f"limits.low: must be positive, got {self.low}")


@dataclass(frozen=True)
class DottedTop:
    """Holds the table."""

    limits: Dotted = Dotted()
    """Checked table."""


FULL = """
name = "prod"
ratio = 2
debug = true
data_dir = "/srv/fleet"
ports = [7, 8]
log_format = "json"
timeout = 1.5

[labels]
zone = "eu-1"

[server]
listen = "0.0.0.0"
tags = ["a", "b"]

[limits]
low = 2
high = 3

[[agents]]
name = "web"
argv = ["python", "-m", "web"]
env = { PORT = "8080" }
restart = "always"

[[agents]]
name = "worker"
argv = ["worker"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str, **env: str) -> Cfg:
    return load_config(Cfg, write(tmp_path, text), env_prefix="FLEET_T_", environ=env)


def error(tmp_path: Path, text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, **env)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_full_file_loads_into_typed_frozen_dataclasses(tmp_path: Path) -> None:
    """Every supported type is read from TOML and converted to its field type."""
    cfg = load(tmp_path, FULL)
    assert cfg == Cfg(
        server=Server(listen="0.0.0.0", tags=("a", "b")),
        name="prod",
        ratio=2.0,
        debug=True,
        data_dir=Path("/srv/fleet"),
        ports=(7, 8),
        labels={"zone": "eu-1"},
        log_format="json",
        timeout=1.5,
        limits=Limits(low=2, high=3),
        agents=(
            Agent(name="web", argv=("python", "-m", "web"), env={"PORT": "8080"}, restart="always"),
            Agent(name="worker", argv=("worker",)),
        ),
    )
    assert isinstance(cfg.ratio, float)
    assert isinstance(cfg.data_dir, Path)


def test_missing_keys_take_the_dataclass_defaults(tmp_path: Path) -> None:
    """Keys left out of the file keep their defaults."""
    cfg = load(tmp_path, '[server]\nlisten = "h"\n')
    assert cfg == Cfg(server=Server(listen="h"))


def test_no_file_means_defaults_and_environment() -> None:
    """path=None builds the defaults, with env overrides applied."""
    assert load_config(Defaults, None, env_prefix="X_", environ={}) == Defaults()
    cfg = load_config(
        Defaults, None, env_prefix="X_", environ={"X_PORT": "1", "X_LIMITS_HIGH": "4"}
    )
    assert cfg == Defaults(port=1, limits=Limits(high=4))


def test_environment_overrides_scalars_by_prefix_rule(tmp_path: Path) -> None:
    """PREFIX + dotted key upper-cased with '.' -> '_' overrides the file value."""
    assert env_var_name("FLEET_MANAGER_", "server.listen") == "FLEET_MANAGER_SERVER_LISTEN"
    cfg = load(
        tmp_path,
        FULL,
        FLEET_T_SERVER_LISTEN="127.0.0.1",
        FLEET_T_SERVER_PORT="9",
        FLEET_T_DEBUG="off",
        FLEET_T_RATIO="0.25",
        FLEET_T_DATA_DIR="/tmp/x",
        FLEET_T_LOG_FORMAT="plain",
        FLEET_T_TIMEOUT="",
        FLEET_T_UNRELATED="ignored",
    )
    assert cfg.server == Server(listen="127.0.0.1", port=9, tags=("a", "b"))
    assert cfg.debug is False
    assert cfg.ratio == 0.25
    assert cfg.data_dir == Path("/tmp/x")
    assert cfg.log_format == "plain"
    assert cfg.timeout is None


def test_environment_can_supply_a_required_key(tmp_path: Path) -> None:
    """A required key missing from the file may come from its env variable."""
    cfg = load(tmp_path, 'name = "n"\n', FLEET_T_SERVER_LISTEN="h")
    assert cfg.server.listen == "h"


def test_unreadable_file_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """A missing file names the path and the OS reason."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read the file: No such file"):
        load_config(Cfg, path, env_prefix="F_", environ={})


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    """Broken TOML names the file and where the parser stopped."""
    message = error(tmp_path, '[server]\nlisten = "h"\nport = = 3\n')
    assert message.startswith(f"{tmp_path / 'fleet.toml'}: invalid TOML: ")
    assert "line 3" in message
    assert "column" in message


def test_unknown_key_suggests_the_close_match(tmp_path: Path) -> None:
    """A typo is reported with its dotted key and a did-you-mean."""
    message = error(tmp_path, '[server]\nlisen = "h"\n')
    assert (
        message == f"{tmp_path / 'fleet.toml'}: server.lisen: unknown key (did you mean 'listen'?)"
    )


def test_unknown_key_without_close_match_has_no_hint(tmp_path: Path) -> None:
    """A key nothing like any field is reported without a suggestion."""
    message = error(tmp_path, 'zzzzzz = 1\n[server]\nlisten = "h"\n')
    assert message.endswith(": zzzzzz: unknown key")


def test_unknown_key_inside_an_array_of_tables(tmp_path: Path) -> None:
    """Keys inside [[agents]] are checked and named with their index."""
    message = error(tmp_path, '[server]\nlisten="h"\n[[agents]]\nname="a"\nargs=["x"]\n')
    assert "agents[0].args: unknown key (did you mean 'argv'?)" in message


def test_wrong_type_names_key_expected_and_got(tmp_path: Path) -> None:
    """A string where an integer belongs is reported with both."""
    message = error(tmp_path, '[server]\nlisten = "h"\nport = "abc"\n')
    assert message == f"{tmp_path / 'fleet.toml'}: server.port: expected an integer, got 'abc'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("debug = 1", "debug: expected a boolean, got 1"),
        ("ratio = true", "ratio: expected a number, got true"),
        ("name = 5", "name: expected a string, got 5"),
        ("ports = [1, 'x']", "ports[1]: expected an integer, got 'x'"),
        ("ports = 3", "ports: expected an array, got 3"),
        ("labels = { a = 1 }", "labels.a: expected a string, got 1"),
        ("limits = 3", "limits: expected a table, got 3"),
        ("agents = 1", "agents: expected an array of tables, got 1"),
        ("data_dir = []", "data_dir: expected a path (string), got an array"),
    ],
)
def test_each_type_rejects_wrong_values(tmp_path: Path, text: str, expected: str) -> None:
    """Each field type reports a mismatch with the dotted key."""
    message = error(tmp_path, f'{text}\n[server]\nlisten = "h"\n')
    assert message.endswith(expected)


def test_missing_required_key(tmp_path: Path) -> None:
    """A field without a default must be present; the env var is suggested."""
    message = error(tmp_path, "[server]\nport = 1\n")
    assert message == (
        f"{tmp_path / 'fleet.toml'}: server.listen: missing required key "
        "(set it in the file or FLEET_T_SERVER_LISTEN)"
    )


def test_missing_required_table(tmp_path: Path) -> None:
    """A required table that is absent is named."""
    assert error(tmp_path, 'name = "x"\n').endswith(": server: missing required key")


def test_missing_required_key_in_array_of_tables(tmp_path: Path) -> None:
    """A required key inside [[agents]] is named with its index."""
    message = error(tmp_path, '[server]\nlisten="h"\n[[agents]]\nargv=["x"]\n')
    assert message.endswith(": agents[0].name: missing required key")


def test_literal_value_not_allowed(tmp_path: Path) -> None:
    """A value outside a Literal lists the allowed ones."""
    message = error(tmp_path, 'log_format = "xml"\n[server]\nlisten="h"\n')
    assert message.endswith(": log_format: must be one of plain, json, got 'xml'")


def test_validate_failure_is_a_config_error(tmp_path: Path) -> None:
    """validate()'s ValueError becomes a one-line ConfigError naming the table."""
    message = error(tmp_path, '[server]\nlisten="h"\n[limits]\nlow = 5\nhigh = 2\n')
    assert message == f"{tmp_path / 'fleet.toml'}: limits: low (5) must not exceed high (2)"


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    """An unparseable env override names the variable, not the file."""
    message = error(tmp_path, FULL, FLEET_T_SERVER_PORT="abc")
    assert message == "env FLEET_T_SERVER_PORT: server.port: expected an integer, got 'abc'"
    message = error(tmp_path, FULL, FLEET_T_DEBUG="maybe")
    assert message == "env FLEET_T_DEBUG: debug: expected a boolean (true/false), got 'maybe'"
    message = error(tmp_path, FULL, FLEET_T_LOG_FORMAT="xml")
    assert message == "env FLEET_T_LOG_FORMAT: log_format: must be one of plain, json, got 'xml'"


def test_validate_failure_caused_by_environment(tmp_path: Path) -> None:
    """validate() still runs after env overrides are applied."""
    with pytest.raises(ConfigError, match=r"limits: low \(9\) must not exceed high \(3\)"):
        load(tmp_path, FULL, FLEET_T_LIMITS_LOW="9")


def test_validate_failure_names_the_environment_variable_that_set_the_value(
    tmp_path: Path,
) -> None:
    """A failed check on an env value names the variable (and the file if it set the other)."""
    no_limits = FULL.split("[limits]")[0] + FULL.split("high = 3\n")[1]
    message = error(tmp_path, no_limits, FLEET_T_LIMITS_LOW="20")
    assert message == "env FLEET_T_LIMITS_LOW: limits: low (20) must not exceed high (10)"
    message = error(tmp_path, FULL, FLEET_T_LIMITS_LOW="9")
    assert message == (
        f"{tmp_path / 'fleet.toml'}, env FLEET_T_LIMITS_LOW:"
        " limits: low (9) must not exceed high (3)"
    )


def test_validate_message_naming_its_table_is_not_prefixed_again(tmp_path: Path) -> None:
    """A check that says `limits.low: ...` is reported as that, not `limits: limits.low: ...`."""

    path = write(tmp_path, "[limits]\nlow = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(DottedTop, path, env_prefix="F_", environ={})
    assert info.value.message == f"{path}: limits.low: must be positive, got 0"


def test_non_utf8_file(tmp_path: Path) -> None:
    """A binary file is reported as not UTF-8."""
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin\.toml: not UTF-8 text"):
        load_config(Defaults, path, env_prefix="F_", environ={})


def test_result_is_frozen(tmp_path: Path) -> None:
    """The loaded config cannot be mutated by accident."""
    cfg = load(tmp_path, FULL)
    with pytest.raises(AttributeError):
        cfg.name = "other"  # type: ignore[misc]


@dataclass(frozen=True)
class WithBackoff:
    """A config embedding a shared plumbing dataclass."""

    reconnect: Backoff = field(default_factory=Backoff)
    """Reconnect policy."""


def test_shared_dataclass_constructor_errors_are_config_errors(tmp_path: Path) -> None:
    """A ValueError from a nested dataclass's own checks names its table."""
    path = write(tmp_path, "[reconnect]\ninitial = 1\nmultiplier = 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(WithBackoff, path, env_prefix="F_", environ={})
    assert str(info.value) == f"{path}: reconnect: multiplier must be >= 1, got 0.5"
    cfg = load_config(WithBackoff, path, env_prefix="F_", environ={"F_RECONNECT_MULTIPLIER": "3"})
    assert cfg.reconnect == Backoff(initial=1.0, multiplier=3.0)
