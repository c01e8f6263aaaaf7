"""fleetctl as a subprocess -> a real fleet-manager -> real fleet-daemons -> agent processes.

Two daemons (node n1 zone=a, node n2 zone=b, both env=prod) each supervise
`web` (a sleep); n1 also runs `hung`, a sleep with a heartbeat health check it
never passes (restart = never: UNHEALTHY, left running). Everything is a real
process on 127.0.0.1 with mTLS. One
fleet serves the whole module (starting it takes ~20 s on 2 cores); the test
that takes a daemon down runs last.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from daemon_helpers import short_tmp

from fleet.pki import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def _spawn(module_main: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", f"import sys; from {module_main} import main; sys.exit(main())",
             *(["serve"] if module_main == "manager.cli" else []), "--config", str(config)],
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _until(probe: Callable[[], T], ok: Callable[[T], bool], within: float = 30.0) -> T:
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within}s; last: {value!r}")
        time.sleep(0.2)


@dataclass
class Fleet:
    """The running processes and how to call fleetctl against them."""

    root: Path
    manager_address: str
    operator: Any
    daemons: dict[str, subprocess.Popen[bytes]]

    def fleetctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `fleetctl ARGS` as a process with the operator's certificate from env vars."""
        env = {
            **_env(),
            "FLEET_MANAGER": self.manager_address,
            "FLEET_CA": str(self.operator.ca_file),
            "FLEET_CERT": str(self.operator.cert_file),
            "FLEET_KEY": str(self.operator.key_file),
            "XDG_CONFIG_HOME": str(self.root / "xdg"),
            "COLUMNS": "200",
        }
        return subprocess.run(
            [sys.executable, "-c", "from fleetctl.app import main; main()", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str) -> Any:
        """`fleetctl -o json ARGS`, asserting exit 0."""
        result = self.fleetctl("-o", "json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def on_terminal(self, *args: str, answer: bytes) -> tuple[int, str]:
        """Run fleetctl on a pseudo-terminal, answer its prompt with `answer`."""
        master, slave = os.openpty()
        env = {
            **_env(),
            "FLEET_MANAGER": self.manager_address,
            "FLEET_CA": str(self.operator.ca_file),
            "FLEET_CERT": str(self.operator.cert_file),
            "FLEET_KEY": str(self.operator.key_file),
            "XDG_CONFIG_HOME": str(self.root / "xdg"),
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", "from fleetctl.app import main; main()", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        out, answered, deadline = b"", False, time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if not answered and b"Proceed?" in out:
                    os.write(master, answer + b"\n")
                    answered = True
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            os.close(master)
        return proc.returncode, out.decode(errors="replace")

    def pids(self) -> dict[str, int]:
        """node/agent -> pid, from the daemons' synced states."""
        agents = self.json("agents", "list")["agents"]
        pids = {f"{a['node_id']}/{a['agent_id']}": a["pid"] for a in agents}
        self.agent_pids.update(p for p in pids.values() if p)
        return pids

    agent_pids: set[int] = field(default_factory=set)
    """Every agent pid seen, so teardown can reap agents a killed daemon left behind."""


HUNG = """
[[agents]]
id = "hung"
argv = ["sleep", "1000"]
start_secs = 0.2
stop_timeout = 2.0
restart = "never"
health = { kind = "heartbeat", timeout = 1.0 }
"""


def _daemon_toml(
    root: Path, tls: Any, manager: str, labels: dict[str, str], more_agents: str = ""
) -> str:
    label_lines = "\n".join(f'{k} = "{v}"' for k, v in labels.items())
    return f"""
listen = "127.0.0.1:0"
state_dir = "{root}/state"
run_dir = "{root}/run"
log_dir = "{root}/log"
metrics_listen = ""
sample_interval_seconds = 0.5
stop_agents_on_exit = true
shutdown_grace_seconds = 1.0
[labels]
{label_lines}
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = ["{manager}"]
heartbeat_interval_seconds = 1.0
metrics_interval_seconds = 1.0
sync_interval_seconds = 5.0
[manager.reconnect]
initial = 0.2
maximum = 1.0
[[agents]]
id = "web"
argv = ["sleep", "1000"]
start_secs = 0.2
stop_timeout = 2.0
{more_agents}"""


def _reap_agents(fleet: Fleet) -> None:
    """Kill agents of our daemons that outlived them (checked by their log path)."""
    for pid in fleet.agent_pids:
        try:
            if not os.readlink(f"/proc/{pid}/fd/1").startswith(str(fleet.root)):
                continue
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A manager (SQLite) and two daemons, n1 and n2, each running agent `web`."""
    ca = CertificateAuthority.create()
    certs = tmp_path_factory.mktemp("certs")

    def issue(role: Any, name: str) -> Any:
        return ca.issue(role, name).write(certs / f"{role}-{name}")

    with short_tmp() as root:
        port = _free_port()
        manager_tls = issue("manager", "m1")
        (root / "manager.toml").write_text(
            f'state_dir = "{root}/mstate"\n'
            f'[server]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = ""\n'
            "shutdown_grace_seconds = 2.0\n"
            f'[tls]\nca_file = "{manager_tls.ca_file}"\ncert_file = "{manager_tls.cert_file}"\n'
            f'key_file = "{manager_tls.key_file}"\n'
            # A dead daemon's node goes OFFLINE within seconds (the stale test).
            "[liveness]\nmin_ttl_seconds = 1.0\njitter = 0.0\ngrace_seconds = 2.0\n"
            "failover_grace_seconds = 3.0\n"
        )
        # The manager first: a daemon stopped while its manager is up takes >20 s to exit.
        procs = [_spawn("manager.cli", root / "manager.toml", root / "manager.log")]
        fleet = Fleet(root, f"127.0.0.1:{port}", issue("operator", "alice"), {})
        try:
            for node, zone in (("n1", "a"), ("n2", "b")):
                droot = root / node
                droot.mkdir()
                (droot / "daemon.toml").write_text(
                    _daemon_toml(
                        droot, issue("node", node), f"127.0.0.1:{port}",
                        {"env": "prod", "zone": zone}, HUNG if node == "n1" else "",
                    )
                )  # fmt: skip
                proc = _spawn("daemon.cli", droot / "daemon.toml", droot / "daemon.log")
                fleet.daemons[node] = proc
                procs.append(proc)

            def ready() -> dict[str, Any]:
                result = fleet.fleetctl("-o", "json", "agents", "list")
                if result.returncode != 0:
                    return {}
                agents = json.loads(result.stdout)["agents"]
                return {a["node_id"]: a for a in agents if a["status"] == "RUNNING"}

            _until(ready, lambda r: set(r) == {"n1", "n2"}, within=60)
            fleet.pids()
            yield fleet
        except BaseException:
            for log in root.rglob("*.log"):
                sys.stderr.write(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise
        finally:
            for proc in {*procs, *fleet.daemons.values()}:  # a test may restart a daemon
                _stop(proc)
            _reap_agents(fleet)


def test_nodes_list_shows_both_daemons_with_labels(fleet: Fleet) -> None:
    """`nodes list -l zone=b -o json` shows exactly n2, online, with its labels."""
    nodes = fleet.json("nodes", "list", "-l", "zone=b")["nodes"]
    assert [(n["node_id"], n["status"]) for n in nodes] == [("n2", "ONLINE")]
    assert nodes[0]["labels"] == {"env": "prod", "zone": "b"}
    table = fleet.fleetctl("nodes", "list")
    assert table.returncode == 0
    assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == ["n1", "n2"]


def test_restart_on_one_node_changes_the_pid(fleet: Fleet) -> None:
    """`agents restart web --node n1` restarts that agent process: its pid changes, n2's not."""
    before = fleet.pids()
    result = fleet.fleetctl("agents", "restart", "web", "--node", "n1")
    assert result.returncode == 0, result.stderr
    after = _until(fleet.pids, lambda p: p.get("n1/web") not in (None, before["n1/web"]))
    assert after["n2/web"] == before["n2/web"]
    assert "1 ok, 0 failed" in result.stdout


def test_plan_touches_nothing(fleet: Fleet) -> None:
    """`--plan` lists both targets and leaves every pid as it was."""
    before = fleet.pids()
    plan = fleet.json("agents", "restart", "web", "-l", "env=prod", "--plan")
    assert sorted(t["node_id"] for t in plan["targets"]) == ["n1", "n2"]
    assert {t["outcome"] for t in plan["targets"]} == {"PLANNED"}
    time.sleep(1.0)
    assert fleet.pids() == before


def test_fanout_without_yes_and_without_tty_is_refused(fleet: Fleet) -> None:
    """A two-target restart from a script without --yes exits 2 and restarts nothing."""
    before = fleet.pids()
    result = fleet.fleetctl("agents", "restart", "web", "-l", "env=prod")
    assert result.returncode == 2
    assert "pass --yes" in result.stderr
    assert "Traceback" not in result.stderr
    assert fleet.pids() == before


def test_events_show_the_operation(fleet: Fleet) -> None:
    """After a restart, `events --kind operation` shows it with the operator as actor."""
    assert fleet.fleetctl("agents", "restart", "web", "--node", "n1").returncode == 0

    def operations() -> list[dict[str, Any]]:
        return list(fleet.json("events", "--kind", "operation")["events"])

    events = _until(operations, lambda e: len(e) >= 1, within=15)
    assert any(e["actor"] == "operator/alice" for e in events)
    registered = fleet.json("events", "--kind", "node-registered")["events"]
    assert {e["node_id"] for e in registered} == {"n1", "n2"}


def test_terminal_prompt_no_changes_nothing_and_yes_restarts(fleet: Fleet) -> None:
    """On a terminal a two-target restart asks first: 'n' aborts (exit 1), 'y' restarts both."""
    before = fleet.pids()
    code, out = fleet.on_terminal("agents", "restart", "web", "-l", "env=prod", answer=b"n")
    assert code == 1, out
    assert "restart agent web on 2 targets: n1/web, n2/web" in out
    assert "aborted; nothing was changed" in out
    assert fleet.pids() == before
    code, out = fleet.on_terminal("agents", "restart", "web", "-l", "env=prod", answer=b"y")
    assert code == 0, out
    assert "2 ok, 0 failed, 0 skipped of 2" in out
    assert "Traceback" not in out
    after = _until(fleet.pids, lambda p: p["n1/web"] != before["n1/web"])
    assert after["n2/web"] != before["n2/web"]


def test_ctrl_c_ends_a_followed_feed_quietly(fleet: Fleet) -> None:
    """`events -f --tail 5` runs until Ctrl-C, then exits 130 with nothing on stderr."""
    env = {
        **_env(),
        "FLEET_MANAGER": fleet.manager_address,
        "FLEET_CA": str(fleet.operator.ca_file),
        "FLEET_CERT": str(fleet.operator.cert_file),
        "FLEET_KEY": str(fleet.operator.key_file),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", "from fleetctl.app import main; main()",
         "events", "-f", "--tail", "5", "--kind", "node-registered"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # both registrations (the last five) come first
        assert "NODE_REGISTERED" in first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert err == ""


def test_agents_show_says_why_an_agent_restarted_and_what_it_runs(fleet: Fleet) -> None:
    """The reported bug: after kill -9 of an agent, `agents show --live` says exit code -9,
    killed by SIGKILL, and shows the spec its daemon runs; list --status filters."""
    before = fleet.pids()["n1/web"]
    os.kill(before, signal.SIGKILL)
    _until(fleet.pids, lambda p: p.get("n1/web") not in (None, before))
    shown = fleet.json("agents", "show", "n1/web", "--live")
    assert shown["exit_code"] == -9
    assert shown["last_exit"]["kind"] == "killed"
    assert shown["last_exit"]["reason"] == "killed by SIGKILL"
    assert shown["spec"]["argv"] == ["sleep", "1000"]
    assert shown["log_path"].endswith("web.log")
    table = fleet.fleetctl("agents", "show", "n1/web")
    assert table.returncode == 0, table.stderr
    assert "killed by SIGKILL (exit code -9)" in table.stdout
    assert "sleep 1000" in table.stdout
    wide = fleet.fleetctl("-o", "wide", "agents", "list", "--node", "n1")
    assert "killed by SIGKILL" in wide.stdout
    running = fleet.json("agents", "list", "--status", "running,backoff")["agents"]
    assert {a["node_id"] for a in running} == {"n1", "n2"}
    assert fleet.json("agents", "list", "--status", "FATAL")["agents"] == []
    bad = fleet.fleetctl("agents", "list", "--status", "runing")
    assert bad.returncode == 2
    assert "unknown agent state 'runing'" in bad.stderr


def test_unhealthy_finds_the_hung_agent_and_its_events_say_why(fleet: Fleet) -> None:
    """`--unhealthy` lists exactly n1/hung; `agents show` gives its health and its check; after
    a restart, its agent-state-changed event says why it is unhealthy."""

    def unhealthy() -> list[str]:
        agents = fleet.json("agents", "list", "--unhealthy")["agents"]
        return [f"{a['node_id']}/{a['agent_id']}" for a in agents]

    assert _until(unhealthy, lambda found: bool(found)) == ["n1/hung"]
    assert fleet.json("agents", "list", "--unhealthy", "--status", "FATAL")["agents"] == []
    shown = fleet.fleetctl("agents", "show", "n1/hung")
    assert shown.returncode == 0, shown.stderr
    lines = {
        label.strip(): value.strip()
        for label, _, value in (line.partition(":") for line in shown.stdout.splitlines())
    }
    # "UNHEALTHY since <time> (<age>): unhealthy: no heartbeat for ..." (split at the first ':')
    assert lines["Health"].startswith("UNHEALTHY since "), lines["Health"]
    assert "no heartbeat for 1." in shown.stdout
    assert lines["Health check"] == "heartbeat (timeout 1s)"
    restarted = fleet.fleetctl("agents", "restart", "hung", "--node", "n1")
    assert restarted.returncode == 0, restarted.stderr

    def why() -> list[str]:
        feed = fleet.json("events", "--kind", "agent-state-changed", "--node", "n1", "--tail", "50")
        return [e["message"] for e in feed["events"] if e["agent_id"] == "hung"]

    messages = _until(why, lambda m: any("-> UNHEALTHY: unhealthy: no heartbeat" in x for x in m))
    assert any(
        x.startswith("hung on n1: health PENDING -> UNHEALTHY: unhealthy: no heartbeat for 1.")
        and x.endswith("(timeout 1s); left running (restart = never)")
        for x in messages
    ), messages
    assert any(x.endswith(": restarted by an operator") for x in messages), messages


def test_operator_labels_survive_a_daemon_killed_and_restarted(fleet: Fleet) -> None:
    """The reported bug: `nodes label n1 canary=true`, kill -9 n1's daemon, start it again:
    n1 keeps canary, and `nodes show -o wide` says where each label comes from."""
    labelled = fleet.fleetctl("nodes", "label", "n1", "canary=true")
    assert labelled.returncode == 0, labelled.stderr
    registered = len(
        fleet.json("events", "--kind", "node-registered", "--node", "n1", "--since", "0")["events"]
    )
    old = fleet.daemons["n1"]
    old.kill()
    old.wait()
    droot = fleet.root / "n1"
    fleet.daemons["n1"] = _spawn("daemon.cli", droot / "daemon.toml", droot / "daemon.log")

    def registrations() -> int:
        events = fleet.json("events", "--kind", "node-registered", "--node", "n1", "--since", "0")
        return len(events["events"])

    _until(registrations, lambda n: n > registered, within=60)
    (node,) = fleet.json("nodes", "list", "-l", "canary=true")["nodes"]
    assert node["node_id"] == "n1"
    assert node["labels"] == {"canary": "true", "env": "prod", "zone": "a"}
    assert node["operator_labels"] == {"canary": "true"}
    wide = fleet.fleetctl("-o", "wide", "nodes", "show", "n1")
    assert "canary=true (operator)" in wide.stdout
    assert "env=prod (daemon config)" in wide.stdout
    refused = fleet.fleetctl("nodes", "label", "n1", "env-")
    assert refused.returncode == 1
    assert "'env' of n1 comes from its daemon's config" in refused.stderr
    assert fleet.json("nodes", "show", "n1")["labels"]["env"] == "prod"


def test_nodes_label_says_what_removing_each_key_did(fleet: Fleet) -> None:
    """`k-` of an override says the daemon's value is back; of a key n2 lacks, that nothing was."""
    assert fleet.fleetctl("nodes", "label", "n2", "zone=z").returncode == 0
    result = fleet.fleetctl("nodes", "label", "n2", "zone-", "nope-")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "node/n2 labeled: env=prod,zone=b"
    assert result.stderr.splitlines() == [
        "fleetctl: nope: n2 has no such label; nothing removed",
        "fleetctl: zone: the operator's value is removed; zone=b from the daemon's config"
        " applies (only the host can change that one)",
    ]


def test_fanout_with_one_daemon_down(fleet: Fleet) -> None:
    """(Runs last.) n2's daemon killed: exit 1, n2 FAILED with a reason, n1 restarted OK."""
    before = fleet.pids()
    fleet.daemons["n2"].kill()  # a crashed daemon; its agent is reaped at teardown
    fleet.daemons["n2"].wait()
    result = fleet.fleetctl(
        "-o", "json", "agents", "restart", "web", "-l", "env=prod", "--yes", "--timeout", "20"
    )
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    outcome = {t["node_id"]: t for t in data["targets"]}
    assert outcome["n1"]["outcome"] == "OK"
    assert outcome["n2"]["outcome"] == "FAILED"
    assert outcome["n2"]["message"]
    assert data["summary"]["failed"] == 1
    assert "n2/web" in result.stderr
    assert fleet.pids()["n1/web"] != before["n1/web"]


def test_agents_of_an_offline_node_are_marked_stale(fleet: Fleet) -> None:
    """(After n2's daemon was killed.) Once n2 is OFFLINE its agents are listed as its
    daemon last reported them, marked stale in every format; `agents show` falls back."""
    _until(lambda: fleet.json("nodes", "show", "n2")["status"], lambda s: s == "OFFLINE")
    agents = {a["node_id"]: a for a in fleet.json("agents", "list")["agents"]}
    assert agents["n2"]["stale"] is True
    assert agents["n2"]["reported_at_ms"] > 0
    assert agents["n1"]["stale"] is False
    yaml_out = fleet.fleetctl("-o", "yaml", "agents", "list", "--node", "n2")
    assert "stale: true" in yaml_out.stdout
    table = fleet.fleetctl("agents", "list")
    assert table.returncode == 0
    n2_row = next(line for line in table.stdout.splitlines() if line.startswith("n2"))
    assert "*" in n2_row
    assert "node n2 is OFFLINE: its agents (marked *) are what its daemon last reported" in (
        table.stderr
    )
    shown = fleet.fleetctl("agents", "show", "n2/web", "--timeout", "10")
    assert shown.returncode == 0, shown.stderr
    assert "unavailable: the daemon could not be asked" in shown.stdout
    assert "the node is OFFLINE" in shown.stdout
