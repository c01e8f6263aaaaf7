"""Every operator feature for a daemon with NO listening port, through its control stream.

fleetctl (a process) -> a real fleet-manager -> real fleet-daemons: n1 has
`listen = ""` (reachable only through the Connect stream it opened), n2
listens on a port as before (dialled, or its stream: either works). Both
supervise `web` (a sleep). Everything a user does through fleetctl must work
on n1 as on n2: nodes list/show, agents list/show --live/start/stop/restart,
metrics query and per-agent metrics, agent logs (with --follow), apply a
definition and see it run, run a job and read its output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from daemon_helpers import short_tmp
from test_fleetctl_e2e import Fleet, _daemon_toml, _env, _free_port, _reap_agents, _spawn, _stop
from test_fleetctl_e2e import _until as until

from fleet.pki import CertificateAuthority

pytestmark = pytest.mark.slow

NODES = ("n1", "n2")
NO_PORT = "n1"
FLEETCTL = "from fleetctl.app import main; main()"


def _no_listen(toml: str) -> str:
    """The daemon's config with no listening address (the stream is the only way in)."""
    assert 'listen = "127.0.0.1:0"' in toml
    return toml.replace('listen = "127.0.0.1:0"', 'listen = ""', 1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A manager (SQLite), n1 without a port and n2 with one, each running `web`."""
    ca = CertificateAuthority.create()
    certs = tmp_path_factory.mktemp("certs")

    def issue(role: Any, name: str) -> Any:
        return ca.issue(role, name).write(certs / f"{role}-{name}")

    with short_tmp() as root:
        port = _free_port()
        tls = issue("manager", "m1")
        (root / "manager.toml").write_text(
            f'state_dir = "{root}/mstate"\n'
            f'[server]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = ""\n'
            "shutdown_grace_seconds = 2.0\n"
            f'[tls]\nca_file = "{tls.ca_file}"\ncert_file = "{tls.cert_file}"\n'
            f'key_file = "{tls.key_file}"\n'
            "[liveness]\nmin_ttl_seconds = 1.0\njitter = 0.0\ngrace_seconds = 2.0\n"
            "failover_grace_seconds = 3.0\n"
            "[control]\noffline_grace_seconds = 10.0\n"
        )
        procs = [_spawn("manager.cli", root / "manager.toml", root / "manager.log")]
        fleet = Fleet(root, f"127.0.0.1:{port}", issue("operator", "alice"), {})
        try:
            for node, zone in (("n1", "a"), ("n2", "b")):
                droot = root / node
                droot.mkdir()
                toml = _daemon_toml(
                    droot, issue("node", node), f"127.0.0.1:{port}", {"env": "prod", "zone": zone}
                )
                (droot / "daemon.toml").write_text(_no_listen(toml) if node == NO_PORT else toml)
                proc = _spawn("daemon.cli", droot / "daemon.toml", droot / "daemon.log")
                fleet.daemons[node] = proc
                procs.append(proc)

            def ready() -> dict[str, Any]:
                result = fleet.fleetctl("-o", "json", "agents", "list")
                if result.returncode != 0:
                    return {}
                agents = json.loads(result.stdout)["agents"]
                return {a["node_id"]: a for a in agents if a["status"] == "RUNNING"}

            until(ready, lambda r: set(r) == set(NODES), within=90)
            fleet.pids()
            yield fleet
        except BaseException:
            for log in root.rglob("*.log"):
                sys.stderr.write(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise
        finally:
            for proc in {*procs, *fleet.daemons.values()}:
                _stop(proc)
            _reap_agents(fleet)


def ok(fleet: Fleet, *args: str, timeout: float = 60) -> str:
    """fleetctl ARGS, asserting exit 0; its stdout."""
    result = fleet.fleetctl(*args, timeout=timeout)
    assert result.returncode == 0, f"fleetctl {' '.join(args)}: {result.stderr}{result.stdout}"
    return result.stdout


def test_the_portless_daemon_listens_on_no_tcp_port(fleet: Fleet) -> None:
    """n1's daemon process has no listening TCP socket; n2's has one."""

    def listening(node: str) -> list[Any]:
        proc = psutil.Process(fleet.daemons[node].pid)
        return [c for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN]

    assert listening(NO_PORT) == []
    assert listening("n2") != []


def test_nodes_list_and_show_online(fleet: Fleet) -> None:
    """Both nodes ONLINE, with their labels, in list and show."""
    nodes = {n["node_id"]: n for n in fleet.json("nodes", "list")["nodes"]}
    assert {k: v["status"] for k, v in nodes.items()} == {"n1": "ONLINE", "n2": "ONLINE"}
    shown = fleet.json("nodes", "show", NO_PORT)
    assert shown["status"] == "ONLINE"
    assert shown["labels"] == {"env": "prod", "zone": "a"}
    assert NO_PORT in ok(fleet, "nodes", "list")
    assert {k: v["stream"] for k, v in nodes.items()} == {"n1": "CONNECTED", "n2": "CONNECTED"}
    assert "Control stream:  connected since " in ok(fleet, "nodes", "show", NO_PORT)


@pytest.mark.parametrize("node", NODES)
def test_agents_list_show_live_and_operate(fleet: Fleet, node: str) -> None:
    """Live agent state from the daemon, then stop / start / restart each change the process."""
    live = fleet.json("agents", "show", f"{node}/web", "--live")
    assert live["status"] == "RUNNING", live
    ok(fleet, "agents", "stop", "web", "--node", node)
    until(lambda: fleet.pids().get(f"{node}/web"), lambda p: not p, within=30)
    assert fleet.json("agents", "show", f"{node}/web", "--live")["status"] == "STOPPED"
    ok(fleet, "agents", "start", "web", "--node", node)
    first = until(lambda: fleet.pids().get(f"{node}/web"), bool, within=30)
    ok(fleet, "agents", "restart", "web", "--node", node)
    until(lambda: fleet.pids().get(f"{node}/web"), lambda p: p and p != first, within=30)
    listed = fleet.json("agents", "list", "--node", node)["agents"]
    assert [a["status"] for a in listed if a["agent_id"] == "web"] == ["RUNNING"]


@pytest.mark.parametrize("node", NODES)
def test_metrics_query_and_per_agent_metrics(fleet: Fleet, node: str) -> None:
    """Host metrics came up the stream and are stored; per-agent samples come from the daemon."""

    def cpu() -> Any:
        result = fleet.fleetctl("-o", "json", "metrics", "query", "--node", node, "--type", "cpu")
        return json.loads(result.stdout) if result.returncode == 0 else {}

    stored = until(cpu, lambda r: bool(r.get("series")), within=60)
    assert any(s.get("points") for s in stored["series"]), stored
    agent = until(
        lambda: fleet.fleetctl("-o", "json", "metrics", "agent", f"{node}/web"),
        lambda r: r.returncode == 0 and bool(json.loads(r.stdout).get("samples")),
        within=60,
    )
    assert json.loads(agent.stdout)["samples"]


@pytest.mark.parametrize("node", NODES)
def test_agent_logs_and_follow(fleet: Fleet, node: str) -> None:
    """logs returns; logs -f keeps streaming until stopped (no error, no early exit)."""
    ok(fleet, "agents", "logs", f"{node}/web")
    proc = subprocess.Popen(
        [sys.executable, "-c", FLEETCTL, "agents", "logs", "-f", f"{node}/web"],
        env={
            **_env(),
            "FLEET_MANAGER": fleet.manager_address,
            "FLEET_CA": str(fleet.operator.ca_file),
            "FLEET_CERT": str(fleet.operator.cert_file),
            "FLEET_KEY": str(fleet.operator.key_file),
            "XDG_CONFIG_HOME": str(fleet.root / "xdg"),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(5)
        assert proc.poll() is None, f"logs -f ended by itself: {proc.communicate()}"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_apply_rolls_a_definition_out_to_both(fleet: Fleet, tmp_path: Path) -> None:
    """A definition for env=prod runs on n1 (through its stream) and n2."""
    sleep = subprocess.run(["which", "sleep"], capture_output=True, text=True).stdout.strip()
    path = tmp_path / "defs.toml"
    path.write_text(
        '[[definitions]]\nname = "cc-apply"\nselector = "env=prod"\n'
        f'[definitions.agent]\nargv = ["{sleep}", "1001"]\n'
        '[definitions.update]\nmax_parallel = "100%"\nmin_healthy_time = "0s"\n'
    )
    ok(fleet, "apply", "-f", str(path), "--message", "control channel")
    running = until(
        lambda: {
            a["node_id"]
            for a in fleet.json("agents", "list")["agents"]
            if a["agent_id"] == "cc-apply" and a["status"] == "RUNNING"
        },
        lambda r: r == set(NODES),
        within=120,
    )
    assert running == set(NODES)
    fleet.pids()


def test_run_a_job_and_read_its_output(fleet: Fleet) -> None:
    """fleetctl run on both: each node's output, SUCCESS; n1's read again from n1 itself."""
    out = ok(fleet, "run", "-l", "env=prod", "--yes", "--", "sh", "-c", "echo via-$0", "x")
    for node in NODES:
        assert f"{node} | via-x" in out.splitlines(), out
    (job, *_) = fleet.json("jobs", "list")["jobs"]
    assert job["state"] == "SUCCESS"
    # --from-node: ReadJobOutput on the daemon, through its control stream.
    logs = ok(fleet, "jobs", "logs", job["id"], NO_PORT, "--from-node")
    assert "via-x" in logs


def test_a_lost_stream_is_shown_through_its_grace_then_the_node_is_offline(fleet: Fleet) -> None:
    """(Last: it kills n2's daemon.) During the grace n2 still reads ONLINE with a fresh
    heartbeat; `nodes show` says why: its stream is lost and when it goes offline."""
    fleet.daemons["n2"].kill()
    fleet.daemons["n2"].wait()
    shown = until(
        lambda: ok(fleet, "nodes", "show", "n2"),
        lambda text: "Control stream:  lost " in text or "Status:          OFFLINE" in text,
        within=15,
    )
    if "Status:          ONLINE" in shown:  # else the 10 s grace passed before we looked
        assert "Control stream:  lost " in shown, shown
        assert "unless it reconnects" in shown, shown
        row = ok(fleet, "-o", "wide", "nodes", "list").split("n2", 1)[1].splitlines()[0]
        assert "lost" in row or "OFFLINE" in row, row  # OFFLINE: the grace ended meanwhile
    gone = until(
        lambda: fleet.json("nodes", "show", "n2"), lambda n: n["status"] == "OFFLINE", within=30
    )
    assert gone["stream"] == "NONE"
    assert fleet.json("nodes", "show", NO_PORT)["stream"] == "CONNECTED"
