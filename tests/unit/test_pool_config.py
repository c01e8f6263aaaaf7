"""PoolConfig: the original design's defaults, validation, and the channel arguments it yields."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from fleet.config import load_config
from fleet.errors import ConfigError
from fleet.retry import Backoff
from manager.pool import DaemonPool, PoolConfig
from manager.pool.channel import channel_args


def test_defaults_follow_the_original_design() -> None:
    """Calls time out after 30 s by default; the pool is bounded and closes idle channels."""
    config = PoolConfig()
    config.validate()
    assert config.call_timeout == 30.0
    assert config.max_attempts >= 1
    assert config.idle_close_after == 300.0
    assert config.max_channels >= 500  # a 500-daemon fan-out fits


def test_every_field_is_documented() -> None:
    """Each setting carries a docstring (operators read them in the example config)."""
    import inspect

    source = inspect.getsource(PoolConfig)
    for f in dataclasses.fields(PoolConfig):
        assert f"{f.name}:" in source
        after = source.split(f"    {f.name}:", 1)[1].split("\n", 2)
        assert after[1].strip().startswith('"""'), f.name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("call_timeout", 0.0),
        ("connect_timeout", -1.0),
        ("idle_close_after", float("nan")),
        ("max_attempts", 0),
        ("max_channels", 0),
        ("keepalive_time", float("inf")),
    ],
)
def test_unusable_settings_are_refused_by_name(field: str, value: Any) -> None:
    """A non-positive or non-finite setting is a ValueError naming the setting."""
    with pytest.raises(ValueError, match=f"^{field} must be a positive number"):
        PoolConfig(**{field: value}).validate()


def test_pool_refuses_a_bad_config_at_construction(pki: Any) -> None:
    """DaemonPool turns a bad setting into a one-line ConfigError before opening anything."""
    with pytest.raises(ConfigError, match=r"^daemon pool: max_channels must be a positive"):
        DaemonPool(pki.issue("manager", "m1"), pki.trust_domain, config=PoolConfig(max_channels=0))


def test_pool_refuses_unusable_certificate_files(tmp_path: Path, pki: Any) -> None:
    """Missing certificate files fail at construction with ConfigError, not at the first call."""
    tls = pki.issue("manager", "m1")
    broken = dataclasses.replace(tls, cert_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match=r"missing\.pem"):
        DaemonPool(broken, pki.trust_domain)


def test_loads_from_toml_with_env_override(tmp_path: Path) -> None:
    """The config loads from a [retry] table and FLEET_* overrides like every other config."""
    path = tmp_path / "pool.toml"
    path.write_text(
        "call_timeout = 5.0\nmax_channels = 64\n[retry]\ninitial = 0.5\nmaximum = 4.0\n"
    )
    config = load_config(
        PoolConfig, path, env_prefix="FLEET_POOL_", environ={"FLEET_POOL_MAX_ATTEMPTS": "2"}
    )
    assert (config.call_timeout, config.max_channels, config.max_attempts) == (5.0, 64, 2)
    assert config.retry == Backoff(initial=0.5, maximum=4.0)


def test_channel_args_make_each_daemon_its_own_connection() -> None:
    """Channel arguments pin the daemon's identity, a local subchannel pool and keepalive."""
    config = PoolConfig(keepalive_time=45.0, connect_timeout=7.0)
    a = dict(channel_args("node-a", "node-a.node.fleet.local", config))
    b = dict(channel_args("node-b", "node-b.node.fleet.local", config))
    assert a["grpc.ssl_target_name_override"] == "node-a.node.fleet.local"
    assert a["grpc.use_local_subchannel_pool"] == 1
    assert (a["fleet.node_id"], b["fleet.node_id"]) == ("node-a", "node-b")
    assert a["grpc.keepalive_time_ms"] == 45000
    assert a["grpc.min_reconnect_backoff_ms"] == 7000
    assert a != b


@dataclasses.dataclass(frozen=True)
class _ManagerLike:
    """A config holding a [pool] table, as the manager's does."""

    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)
    """The pool's settings."""


def test_readme_example_loads(tmp_path: Path) -> None:
    """The [pool] example in manager/pool/README.md is a valid config (so it cannot rot)."""
    readme = Path(__file__).parents[2] / "manager" / "pool" / "README.md"
    example = readme.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "manager.toml"
    path.write_text(example)
    config = load_config(_ManagerLike, path, env_prefix="FLEET_TEST_", environ={})
    assert config.pool == PoolConfig()  # the example spells out the defaults
