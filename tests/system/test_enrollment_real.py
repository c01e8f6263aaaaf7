"""Issue 16's acceptance, all real processes: join tokens, enrollment, renewal, revocation.

fleetctl (a process) -> a `fleet-manager` (SQLite) with `[enroll]` on, signing
30 s node certificates with an issuing CA `fleetctl pki intermediate` made;
`fleet-daemon enroll` (a process) joins host web-1 with a token fleetctl
printed, and the daemon runs on the config enroll wrote (no listening port:
the manager reaches it over its control stream). One manager serves the
module; the scenario runs in one test because each step needs the last.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import short_tmp
from manager_proc import free_port
from test_fleetctl_e2e import Fleet, _env, _reap_agents, _spawn, _stop
from test_fleetctl_e2e import _until as until

from fleet.pki import CertificateAuthority

pytestmark = pytest.mark.slow

CERT_SECONDS = 30
"""Lifetime of the node certificates the manager issues: renewed ~18 s after issue."""
LABELS = {"env": "prod", "tier": "web"}
"""What the first token grants."""

AGENT = """
[[agents]]
id = "web"
argv = ["sleep", "1000"]
start_secs = 0.2
stop_timeout = 2.0
"""
"""Appended to the config enroll wrote, as an operator would add an agent."""


@dataclass
class Site:
    """The manager process, fleetctl against it, and where hosts live."""

    fleet: Fleet
    root: Path
    enroll_port: int
    metrics_port: int

    def ok(self, *args: str) -> str:
        """fleetctl ARGS, asserting exit 0; its stdout."""
        result = self.fleetctl(*args)
        assert result.returncode == 0, f"fleetctl {' '.join(args)}: {result.stderr}{result.stdout}"
        return result.stdout

    def fleetctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.fleet.fleetctl(*args)

    def json(self, *args: str) -> Any:
        return self.fleet.json(*args)

    def node(self, name: str) -> dict[str, Any]:
        """`nodes list -o json`'s entry for `name` ({} if none)."""
        nodes = self.json("nodes", "list")["nodes"]
        return next((n for n in nodes if n["node_id"] == name), {})

    def host(self, name: str) -> Path:
        path = self.root / "hosts" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def enroll(self, command: str, host: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        """The `fleet-daemon enroll ...` line fleetctl printed, run for `host` (+ `extra`)."""
        words = shlex.split(command)
        assert words[:2] == ["fleet-daemon", "enroll"], command
        return subprocess.run(
            [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())",
             *words[1:], "--config", str(host / "daemon.toml"), "--tls-dir", str(host / "tls"),
             "--state-dir", str(host / "state"), *extra],
            env=_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    def start_daemon(self, host: Path) -> subprocess.Popen[bytes]:
        """`fleet-daemon --config` on what enroll wrote; paths a test may use, no /metrics."""
        env = {
            **_env(),
            "FLEET_DAEMON_RUN_DIR": str(host / "run"),
            "FLEET_DAEMON_LOG_DIR": str(host / "log"),
            "FLEET_DAEMON_METRICS_LISTEN": "",
            "FLEET_DAEMON_STOP_AGENTS_ON_EXIT": "true",
        }
        with (host / "daemon.log").open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from daemon.cli import main; sys.exit(main())",
                 "--config", str(host / "daemon.toml")],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.fleet.daemons[host.name] = proc
        return proc

    def manager_metric(self, name: str) -> float:
        """A sample of the manager's /metrics (0 if absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            body = answer.read().decode()
        found = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """A manager (SQLite) with enrollment on; an operator's fleetctl."""
    ca = CertificateAuthority.create()
    with short_tmp() as root:
        certs = root / "certs"
        ca.write(certs / "ca")
        tls = ca.issue("manager", "m1").write(certs / "m1")
        port, enroll_port, metrics_port = free_port(), free_port(), free_port()
        fleet = Fleet(
            root, f"127.0.0.1:{port}", ca.issue("operator", "alice").write(certs / "alice"), {}
        )
        site = Site(fleet, root, enroll_port, metrics_port)
        site.ok("pki", "intermediate", str(root / "issuer"), "--ca-dir", str(certs / "ca"))
        (root / "manager.toml").write_text(
            f'state_dir = "{root}/mstate"\n'
            f'[server]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{metrics_port}"\n'
            "shutdown_grace_seconds = 2.0\n"
            f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
            f'key_file = "{tls.key_file}"\n'
            "[liveness]\nmin_ttl_seconds = 1.0\njitter = 0.0\ngrace_seconds = 2.0\n"
            "failover_grace_seconds = 3.0\n"
            f'[enroll]\nlisten = "127.0.0.1:{enroll_port}"\n'
            f'manager_address = "127.0.0.1:{port}"\n'
            f'issuer_cert_file = "{root}/issuer/issuer.pem"\n'
            f'issuer_key_file = "{root}/issuer/issuer-key.pem"\n'
            f"node_cert_days = {CERT_SECONDS / 86400!r}\n"
            "max_token_ttl_days = 1.0\n"
            # Every host of this test enrolls from 127.0.0.1: the per-IP share of the rate.
            "rate_per_second = 100.0\nburst = 200\n"
        )
        manager = _spawn("manager.cli", root / "manager.toml", root / "manager.log")
        try:
            until(lambda: site.fleetctl("nodes", "list").returncode, lambda c: c == 0, within=60)
            yield site
        except BaseException:
            for log in root.rglob("*.log"):
                sys.stderr.write(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise
        finally:
            for proc in fleet.daemons.values():
                _stop(proc)
            _stop(manager)
            _reap_agents(fleet)


def files_in(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_fleetctl_refusals_a_user_meets(site: Site) -> None:
    """A token longer than the manager's cap or a bad label (exit 2), an unknown token id
    (exit 1, NOT_FOUND), a node name nobody has (revoked all the same, saying so): one line
    each."""
    long = site.fleetctl("tokens", "create", "--ttl", "2d")
    assert long.returncode == 2, long
    assert long.stderr.splitlines() == [
        "fleetctl: error: ttl: at most 1 day (the manager's enroll.max_token_ttl_days), got 2 days"
    ]
    assert site.json("tokens", "list", "--all")["tokens"] == [], "nothing was created"

    bad_label = site.fleetctl("tokens", "create", "--labels", "bad key=1")
    assert bad_label.returncode == 2, bad_label
    assert bad_label.stderr.splitlines()[0].startswith(
        "fleetctl: error: --labels: 'bad key=1': invalid label key 'bad key': "
    )

    unknown = site.fleetctl("tokens", "revoke", "zzzzzzzz")
    assert unknown.returncode == 1, unknown
    assert unknown.stderr.splitlines() == [
        "fleetctl: error: join token 'zzzzzzzz' does not exist (see `fleetctl tokens list`)"
    ]

    ghost = site.fleetctl("nodes", "revoke", "ghost-1", "--yes")
    assert ghost.returncode == 0, ghost
    assert ghost.stdout.startswith("node/ghost-1 revoked: certificates issued before ")
    assert "(0 connections closed)" in ghost.stdout
    assert ghost.stderr.splitlines() == [
        "fleetctl: no node ghost-1 is registered (see `fleetctl nodes list`); its name is"
        " revoked all the same"
    ]
    assert "ghost-1" not in {n["node_id"] for n in site.json("nodes", "list")["nodes"]}


def test_enroll_renew_revoke_and_enroll_again(site: Site) -> None:
    """A token enrolls web-1, which comes online with its labels; its certificate is renewed
    while the same daemon keeps serving; revoked, it is refused and shown REVOKED; deleting
    an online node needs --force; a --node-name token re-enrolls it."""
    # --- a token, and a host enrolled with it --------------------------------------------
    made = site.json(
        "tokens", "create", "--name-prefix", "web-", "--labels", "env=prod,tier=web",
        "--ttl", "10m",
    )  # fmt: skip
    assert made["names"] == "web-*"
    assert made["labels"] == LABELS
    assert made["uses_left"] == 1
    assert made["enroll_address"] == f"127.0.0.1:{site.enroll_port}"
    assert f"--token {made['token']} --ca-hash {made['ca_hash']}" in made["enroll_command"]
    web1 = site.host("web-1")
    enrolled = site.enroll(made["enroll_command"], web1, "--name", "web-1")
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled as node/web-1" in enrolled.stdout
    assert "(labels: env=prod, tier=web)" in enrolled.stdout
    with (web1 / "daemon.toml").open("a") as config:
        config.write(AGENT)
    daemon = site.start_daemon(web1)

    node = until(lambda: site.node("web-1"), lambda n: n.get("status") == "ONLINE", within=30)
    assert node["labels"] == LABELS
    assert node["operator_labels"] == LABELS
    first_expiry = node["cert_expire_time_ms"]
    assert time.time() * 1000 < first_expiry <= time.time() * 1000 + CERT_SECONDS * 1000
    (token,) = site.json("tokens", "list", "--all")["tokens"]
    assert (token["id"], token["uses_left"], token["enrolled_nodes"]) == (
        made["id"],
        0,
        ["web-1"],
    )
    assert site.json("tokens", "list")["tokens"] == [], "used up: listed only with --all"

    # The one-use token is spent: another host is refused with the manager's message.
    web2 = site.host("web-2")
    again = site.enroll(made["enroll_command"], web2, "--name", "web-2")
    assert again.returncode == 1
    assert again.stderr == (
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.enroll_port} refused the token:"
        " the join token is not valid (unknown, expired, used up or revoked)\n"
    )
    assert files_in(web2) == ["tls"], "no key, certificate or config"

    # An online node is not deleted without --force.
    refused = site.fleetctl("nodes", "delete", "web-1", "--yes")
    assert refused.returncode == 1, refused
    (line,) = refused.stderr.splitlines()
    assert line.startswith(
        "fleetctl: error: node web-1 is online; stop its daemon first, or force the deletion"
        " (its daemon registers again on its next call unless the node is revoked);"
        " --force deletes it anyway"
    )
    assert site.node("web-1")["status"] == "ONLINE"

    # --- renewal while serving -------------------------------------------------------------
    renewed = until(
        lambda: site.node("web-1"),
        lambda n: n.get("cert_expire_time_ms", 0) > first_expiry,
        within=CERT_SECONDS,
    )
    assert renewed["status"] == "ONLINE"
    assert daemon.poll() is None, "renewed without a restart"
    until(
        lambda: (web1 / "daemon.log").read_text(),
        lambda log: "manager link moving to the renewed certificate" in log,
    )
    live = site.json("agents", "list", "--node", "web-1", "--live")
    assert [(a["agent_id"], a["status"]) for a in live["agents"]] == [("web", "RUNNING")]
    pid = live["agents"][0]["pid"]
    site.fleet.agent_pids.add(pid)
    site.ok("agents", "restart", "web", "--node", "web-1")
    after = site.json("agents", "list", "--node", "web-1", "--live")["agents"]
    assert after[0]["status"] == "RUNNING"
    assert after[0]["pid"] not in (0, pid)
    site.fleet.agent_pids.add(after[0]["pid"])
    assert daemon.poll() is None

    # --- revocation --------------------------------------------------------------------------
    # Counted before the revocation: the daemon's first refused reconnects can come before
    # the checks below end, and its next one only after a backoff longer than `until` waits.
    refusals = site.manager_metric("fleet_manager_revoked_refused_total")
    revoke = site.fleetctl("nodes", "revoke", "web-1", "--yes")
    assert revoke.returncode == 0, revoke.stderr
    assert revoke.stdout.startswith("node/web-1 revoked: certificates issued before ")
    assert "(1 connection closed)" in revoke.stdout
    assert revoke.stderr == ""
    revoked = site.node("web-1")
    assert revoked["status"] == "REVOKED"
    assert revoked["revoke_time"]
    row = next(ln for ln in site.ok("nodes", "list").splitlines() if "web-1" in ln)
    assert "REVOKED" in row
    assert site.json("nodes", "show", "web-1")["status"] == "OFFLINE"
    until(
        lambda: (web1 / "daemon.log").read_text(),
        lambda log: "the certificate of node/web-1 was revoked at" in log,
    )
    until(
        lambda: site.manager_metric("fleet_manager_revoked_refused_total"),
        lambda n: n > refusals,
    )
    assert site.json("nodes", "show", "web-1")["status"] == "OFFLINE", "refused, it stays out"

    # --- enrolling again ---------------------------------------------------------------------
    prefixed = site.json("tokens", "create", "--name-prefix", "web-")
    key = (web1 / "tls" / "node-key.pem").read_bytes()
    refused = site.enroll(prefixed["enroll_command"], web1, "--name", "web-1", "--force")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"fleet-daemon enroll: the manager at 127.0.0.1:{site.enroll_port} refused the name"
        " 'web-1': node web-1 already exists; enrolling it again needs a token made with"
        " `fleetctl tokens create --node-name web-1`\n"
    )
    assert (web1 / "tls" / "node-key.pem").read_bytes() == key, "the old key is put back"

    named = site.json("tokens", "create", "--node-name", "web-1")
    assert "--name web-1" in named["enroll_command"]
    _stop(daemon)
    forced = site.enroll(named["enroll_command"], web1, "--force")
    assert forced.returncode == 0, forced.stderr
    with (web1 / "daemon.toml").open("a") as config:
        config.write(AGENT)
    daemon = site.start_daemon(web1)
    back = until(lambda: site.node("web-1"), lambda n: n.get("status") == "ONLINE", within=30)
    assert back["revoke_time"] is None
    assert back["cert_expire_time_ms"] > renewed["cert_expire_time_ms"]
    row = next(ln for ln in site.ok("nodes", "list").splitlines() if "web-1" in ln)
    assert "REVOKED" not in row
    assert "ONLINE" in row

    # --- deletion of an online node, forced ------------------------------------------------
    deleted = site.fleetctl("nodes", "delete", "web-1", "--force", "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == "node/web-1 deleted\n"
    assert "its certificate still works until it expires" in deleted.stderr
    os.kill(daemon.pid, signal.SIGTERM)
    assert daemon.wait(30) == 0
