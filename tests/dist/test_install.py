"""The artifact `make dist` builds installs on a host with nothing but it and the system Python.

Run by `make test-dist` (it builds the tarball first). The host is a fresh
directory in a network namespace with no route anywhere but one veth peer,
commands run with an empty environment (`env -i PATH=...`) and
/usr/bin/python3: whatever install.sh needs must be in the tarball.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from manager_proc import Manager, free_port
from netns import CLEAN_PATH, Netns

from fleet.tls import channel_credentials, channel_options
from fleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
COMMANDS = ("fleet-daemon", "fleetctl", "fleet-manager", "fleet-agent")

# Run inside the namespace with the system Python: connect to HOST:PORT and
# print "connected" or the errno's name and how long failing took.
PROBE = """
import errno, socket, sys, time
start = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc.errno), round(time.monotonic() - start, 3))
else:
    print("connected")
"""


def _where(root: Path) -> list[str]:
    """install.sh flags that keep every file it writes under `root` (never /etc, /usr)."""
    return [
        "--prefix", f"{root}/opt", "--config-dir", f"{root}/etc",
        "--bin-dir", f"{root}/bin", "--unit-dir", f"{root}/systemd",
        "--python", SYSTEM_PYTHON,
    ]  # fmt: skip


def _fresh_host(tarball: Path, root: Path) -> Path:
    """`root`: a new directory holding only a copy of the tarball."""
    root.mkdir()
    shutil.copy(tarball, root / tarball.name)
    return root


def _unpack_inside(ns: Netns, tarball: Path, host: Path) -> Path:
    done = ns.run(["tar", "-xzf", tarball.name], cwd=host)
    assert done.returncode == 0, done.stderr
    top = host / tarball.name.removesuffix(".tar.gz")
    assert sorted(p.name for p in top.iterdir()) == sorted(
        [f"{top.name}.pyz", "install.sh", "README.md", "systemd"]
    )
    return top


def _probe(ns: Netns, host: str, port: int) -> str:
    done = ns.run([SYSTEM_PYTHON, "-c", PROBE, host, str(port)], cwd=Path("/"), timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _prove_isolated(ns: Netns) -> None:
    """Inside, the host's end of the veth answers and nothing else is routed."""
    routes = subprocess.run(
        ["ip", "-n", ns.name, "-4", "route", "show", "default"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    assert routes.stdout.strip() == ""
    with socket.create_server((ns.host_ip, 0)) as listener:
        assert _probe(ns, ns.host_ip, listener.getsockname()[1]) == "connected"
    # No route: the kernel refuses at once, no packet leaves.
    unreachable, seconds = _probe(ns, "1.1.1.1", 443).split()
    assert unreachable == "ENETUNREACH"
    assert float(seconds) < 1.0


def _home_shiv() -> set[str]:
    """What root's ~/.shiv holds (shiv's default extraction place, which we must not use)."""
    home = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".shiv"
    return {p.name for p in home.iterdir()} if home.is_dir() else set()


def _settings(unit: str) -> list[str]:
    return [ln for ln in unit.splitlines() if ln and not ln.startswith(("#", "["))]


def test_installs_from_the_tarball_alone_in_a_namespace_without_a_route(
    ns: Netns, tarball: Path, tmp_path: Path
) -> None:
    """With only the tarball, /usr/bin/python3 and no network, install.sh installs every command,
    native extensions load, and the unit runs the installed wrapper."""
    _prove_isolated(ns)
    host = _fresh_host(tarball, tmp_path / "host")
    top = _unpack_inside(ns, tarball, host)
    home_before = _home_shiv()

    done = ns.run([top / "install.sh", *_where(host), "--no-enroll", "--no-start"], cwd=host)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert ": ok" in done.stdout  # the native check, on the system Python
    assert "not enrolled yet" in done.stdout

    for command, usage in zip(
        COMMANDS,
        ("usage: fleet-daemon", "Usage: fleetctl", "Usage: fleet-manager", "usage: fleet-agent"),
        strict=True,
    ):
        ran = ns.run([host / "bin" / command, "--help"], cwd=host, timeout=60)
        assert ran.returncode == 0, f"{command}: {ran.stderr}"
        assert usage in ran.stdout
        assert (host / "bin" / command).resolve() == host / "opt" / "bin" / command

    wrapper = (host / "opt" / "bin" / "fleet-daemon").read_text()
    assert f"SHIV_ROOT={host}/opt/lib/shiv\n" in wrapper
    assert f"exec '{SYSTEM_PYTHON}' -I '{host}/opt/lib/fleet.pyz' fleet-daemon \"$@\"" in wrapper
    unpacked = [p.name for p in (host / "opt" / "lib" / "shiv").iterdir() if p.is_dir()]
    assert unpacked == [f"{top.name}.pyz_{unpacked[0].rsplit('_', 1)[1]}"]
    assert _home_shiv() == home_before

    unit = (host / "systemd" / "fleet-daemon.service").read_text()
    template = (REPO / "configs" / "systemd" / "fleet-daemon.service").read_text()
    installed = _settings(unit)
    assert f"ExecStart={host}/opt/bin/fleet-daemon --config {host}/etc/daemon.toml" in installed
    assert f"Environment=SHIV_ROOT={host}/opt/lib/shiv" in installed
    kept = [s for s in _settings(template) if not s.startswith(("ExecStart=", "Documentation="))]
    assert [s for s in kept if s not in installed] == []  # the hardening and KillMode stay
    _systemd_accepts(host / "systemd" / "fleet-daemon.service")


def _systemd_accepts(unit: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return  # tests/system/test_daemon_systemd_unit.py says why it is worth installing
    done = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    problems = [ln for ln in done.stderr.splitlines() if "fleet-daemon.service" in ln]
    assert problems == [], done.stderr


# --- install.sh run again: upgrades ---------------------------------------------


def _install(top: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [top / "install.sh", *_where(root), "--no-start", *extra],
        env={"PATH": CLEAN_PATH}, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def _as_version(unpacked: Path, tmp_path: Path, version: str) -> Path:
    """A copy of the unpacked tarball whose zipapp is named as release `version`."""
    copy = tmp_path / version
    shutil.copytree(unpacked, copy)
    (pyz,) = copy.glob("fleet-*.pyz")
    tag = pyz.name.split("-", 2)[2]
    pyz.rename(copy / f"fleet-{version}-{tag}")
    return copy


def test_running_install_again_upgrades_keeps_one_previous_and_never_re_enrolls(
    unpacked: Path, tmp_path: Path
) -> None:
    """Each run switches every command to the new zipapp, keeps the one before (a running
    daemon's), removes older ones, and skips enrollment once the config exists."""
    if os.geteuid() != 0:
        pytest.skip("install.sh needs root")
    root = tmp_path / "host"
    lib = root / "opt" / "lib"

    def state() -> tuple[str, list[str], list[str]]:
        unpacked_dirs = sorted(p.name.rsplit("_", 1)[0] for p in (lib / "shiv").glob("fleet-*"))
        assert os.readlink(lib / "previous.pyz") == names["9.0.2"]
        return (
            os.readlink(lib / "fleet.pyz"),
            sorted(p.name for p in lib.glob("fleet-*.pyz")),
            unpacked_dirs,
        )

    releases = {v: _as_version(unpacked, tmp_path, v) for v in ("9.0.1", "9.0.2", "9.0.3")}
    names = {v: next(releases[v].glob("*.pyz")).name for v in releases}
    for version in releases:
        done = _install(releases[version], root, "--no-enroll")
        assert done.returncode == 0, done.stderr
    assert state() == (
        names["9.0.3"],
        [names["9.0.2"], names["9.0.3"]],
        [names["9.0.2"], names["9.0.3"]],
    )
    again = _install(releases["9.0.3"], root, "--no-enroll")
    assert again.returncode == 0, again.stderr
    assert state() == (
        names["9.0.3"],
        [names["9.0.2"], names["9.0.3"]],
        [names["9.0.2"], names["9.0.3"]],
    )
    ran = subprocess.run(
        [root / "bin" / "fleet-daemon", "--help"], env={"PATH": CLEAN_PATH},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr

    # Enrolled before: the flags are accepted and nothing is sent anywhere.
    (root / "etc").mkdir()
    (root / "etc" / "daemon.toml").write_text("# written by fleet-daemon enroll\n")
    upgrade = _install(
        releases["9.0.3"], root,
        "--manager", "127.0.0.1:9", "--token", f"abcd1234.{'x' * 43}",
        "--ca-hash", f"sha256:{'0' * 64}",
    )  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    assert "exists: upgrade only, not enrolling again" in upgrade.stdout
    assert (root / "etc" / "daemon.toml").read_text() == "# written by fleet-daemon enroll\n"


# --- bad input --------------------------------------------------------------------

GOOD = [
    "--manager",
    "m.example:7445",
    "--token",
    f"abcd1234.{'x' * 43}",
    "--ca-hash",
    f"sha256:{'a' * 64}",
]


def _replace(flags: list[str], flag: str, value: str) -> list[str]:
    out = list(flags)
    out[out.index(flag) + 1] = value
    return out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "--manager, --token and --ca-hash are needed to enroll"),
        (
            ["--manager", "m.example:7445"],
            2,
            "--manager, --token and --ca-hash are needed to enroll",
        ),
        (_replace(GOOD, "--token", "not-a-token"), 2, "--token: a join token is '<id>.<secret>'"),
        (
            _replace(GOOD, "--ca-hash", "md5:00"),
            2,
            "--ca-hash 'md5:00': expected 'sha256:' and 64 hex",
        ),
        (_replace(GOOD, "--manager", "m.example"), 2, "--manager 'm.example': expected HOST:PORT"),
        ([*GOOD, "--name", "-bad-"], 2, "--name '-bad-': 1-63 letters"),
        ([*GOOD, "--frobnicate"], 2, "unknown option '--frobnicate'"),
        ([*GOOD, "--token"], 2, "--token needs a value"),
        (
            [*GOOD, "--python", "/nonexistent/python3"],
            1,
            "--python /nonexistent/python3: no such executable",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_installs_nothing(
    unpacked: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    """A missing or malformed flag exits non-zero naming it, before anything is written."""
    where = ["--prefix", f"{tmp_path}/opt", "--config-dir", f"{tmp_path}/etc",
             "--bin-dir", f"{tmp_path}/bin", "--unit-dir", f"{tmp_path}/systemd"]  # fmt: skip
    done = subprocess.run(
        [unpacked / "install.sh", *where, *args], env={"PATH": CLEAN_PATH},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (code, "")
    assert message in done.stderr.splitlines()[0]
    assert not any((tmp_path / d).exists() for d in ("opt", "etc", "bin", "systemd"))


def test_a_python_other_than_the_artifacts_is_refused_by_name(
    unpacked: Path, tmp_path: Path
) -> None:
    """An artifact built for another CPython says which it needs and which this host has."""
    (pyz,) = unpacked.glob("fleet-*.pyz")
    version, _, rest = pyz.name.removeprefix("fleet-").partition("-")
    pyz.rename(unpacked / f"fleet-{version}-cp399-{rest.split('-', 1)[1]}")
    done = subprocess.run(
        [unpacked / "install.sh", "--prefix", f"{tmp_path}/opt", "--no-enroll"],
        env={"PATH": CLEAN_PATH}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert "needs CPython 3.99" in line
    assert f"{SYSTEM_PYTHON} is cpython 3." in line
    assert not (tmp_path / "opt").exists()


# --- coming online at a manager ---------------------------------------------------


@dataclass(frozen=True)
class RealManager:
    """A `fleet-manager serve` child on the namespace's peer address."""

    address: str
    """ManagerService and FleetService (mTLS)."""
    enroll_address: str
    """EnrollmentService (TLS, no client certificate); empty when enrollment is off."""
    operator: Any
    """TLSConfig of operator/alice."""
    trust_domain: str


@contextmanager
def _manager(pki: Any, ip: str, root: Path, *, enroll: bool) -> Iterator[RealManager]:
    root.mkdir()
    tls = pki.issue("manager", "m1")
    port, enroll_port = free_port(), free_port()
    config = f"""
state_dir = "{root}/state"
[server]
listen = "{ip}:{port}"
metrics_listen = ""
shutdown_grace_seconds = 2.0
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[liveness]
min_ttl_seconds = 1.0
jitter = 0.0
"""
    if enroll:
        ca_pem, ca_key = pki.ca.write(root / "ca")
        config += f"""
[enroll]
listen = "{ip}:{enroll_port}"
manager_address = "{ip}:{port}"
issuer_cert_file = "{ca_pem}"
issuer_key_file = "{ca_key}"
"""
    (root / "manager.toml").write_text(config)
    manager = Manager(root, port)
    manager.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert manager.popen is not None
            assert manager.popen.poll() is None, (root / "manager.err").read_text()
            try:
                socket.create_connection((ip, enroll_port if enroll else port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield RealManager(
            address=f"{ip}:{port}",
            enroll_address=f"{ip}:{enroll_port}" if enroll else "",
            operator=pki.issue("operator", "alice"),
            trust_domain=pki.trust_domain,
        )
    finally:
        manager.stop()


@contextmanager
def _fleet(m: RealManager) -> Iterator[fleet_pb2_grpc.FleetServiceStub]:
    with grpc.secure_channel(
        m.address,
        channel_credentials(m.operator),
        options=channel_options(f"manager.{m.trust_domain}"),
    ) as channel:
        yield fleet_pb2_grpc.FleetServiceStub(channel)


@contextmanager
def _installed_daemon(ns: Netns, host: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The installed daemon, started from its wrapper inside the namespace (no systemd there),
    its state, sockets and logs under `host` instead of /var and /run."""
    var = host / "var"
    daemon = ns.popen(
        [host / "bin" / "fleet-daemon", "--config", host / "etc" / "daemon.toml"],
        cwd=host,
        log=log,
        env={
            "FLEET_DAEMON_STATE_DIR": f"{var}/lib",
            "FLEET_DAEMON_RUN_DIR": f"{var}/run",
            "FLEET_DAEMON_LOG_DIR": f"{var}/log",
            "FLEET_DAEMON_METRICS_LISTEN": "",
        },
    )
    try:
        yield daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def _wait_online(
    m: RealManager, node_id: str, daemon: subprocess.Popen[bytes], log: Path
) -> fleet_pb2.Node:
    deadline = time.monotonic() + 60
    with _fleet(m) as fleet:
        while True:
            assert daemon.poll() is None, log.read_text()
            nodes = fleet.ListNodes(fleet_pb2.FleetServiceListNodesRequest(), timeout=10).nodes
            for node in nodes:
                if node.node_id == node_id and node.status == common_pb2.NODE_STATUS_ONLINE:
                    return node
            assert time.monotonic() < deadline, f"{node_id} not online: {nodes}\n{log.read_text()}"
            time.sleep(0.5)


def test_installed_daemon_comes_online_through_the_namespaces_one_link(
    ns: Netns, tarball: Path, tmp_path: Path, pki: Any
) -> None:
    """The daemon from the zipapp, run by its wrapper with the system Python inside the
    namespace, reaches a real manager on the peer address and is ONLINE with its labels
    (certificates minted here; enrollment is the next test)."""
    host = _fresh_host(tarball, tmp_path / "host")
    top = _unpack_inside(ns, tarball, host)
    done = ns.run([top / "install.sh", *_where(host), "--no-enroll", "--no-start"], cwd=host)
    assert done.returncode == 0, done.stderr
    with _manager(pki, ns.host_ip, tmp_path / "manager", enroll=False) as m:
        tls = pki.issue("node", "dist-0")
        (host / "etc").mkdir()
        (host / "etc" / "daemon.toml").write_text(
            f"""
listen = ""
[labels]
env = "dist"
[tls]
ca_file = "{tls.ca_file}"
cert_file = "{tls.cert_file}"
key_file = "{tls.key_file}"
[manager]
addresses = ["{m.address}"]
"""
        )
        log = tmp_path / "daemon.log"
        with _installed_daemon(ns, host, log) as daemon:
            node = _wait_online(m, "dist-0", daemon, log)
        assert node.labels["env"] == "dist"
        assert daemon.returncode == 0, log.read_text()


def test_installed_host_enrolls_and_comes_online_with_the_token_labels(
    ns: Netns, tarball: Path, tmp_path: Path, pki: Any
) -> None:
    """install.sh with a join token the real manager made enrolls the host at the address the
    token came with, through the namespace's one link; the installed daemon, started from its
    wrapper, reaches the manager where enrollment told it and comes online with the token's
    labels, and the token is spent on it."""
    host = _fresh_host(tarball, tmp_path / "host")
    top = _unpack_inside(ns, tarball, host)
    with _manager(pki, ns.host_ip, tmp_path / "manager", enroll=True) as m:
        with _fleet(m) as fleet:
            made = fleet.CreateJoinToken(
                fleet_pb2.FleetServiceCreateJoinTokenRequest(
                    node_name="dist-1", labels={"env": "dist", "site": "netns"}, ttl_seconds=600
                ),
                timeout=10,
            )
        assert made.enroll_address == m.enroll_address  # the peer address, not a wildcard
        done = ns.run(
            [top / "install.sh", *_where(host), "--no-start",
             "--manager", made.enroll_address, "--token", made.token, "--ca-hash", made.ca_hash,
             "--name", "dist-1"],
            cwd=host,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"manager {m.address}" in done.stdout, "where daemons reach it: the manager's answer"
        key_files = [p for p in (host / "etc" / "tls").iterdir() if "key" in p.name]
        assert key_files
        assert all(p.stat().st_mode & 0o077 == 0 for p in key_files)
        log = tmp_path / "daemon.log"
        with _installed_daemon(ns, host, log) as daemon:
            node = _wait_online(m, "dist-1", daemon, log)
            assert dict(node.operator_labels) == {"env": "dist", "site": "netns"}
            assert {"env": "dist", "site": "netns"}.items() <= dict(node.labels).items()
            assert node.cert_expire_time > time.time() * 1000
            with _fleet(m) as fleet:
                tokens = fleet.ListJoinTokens(
                    fleet_pb2.FleetServiceListJoinTokensRequest(all=True), timeout=10
                ).tokens
            assert [(t.id, t.uses_left, list(t.enrolled_nodes)) for t in tokens] == [
                (made.info.id, 0, ["dist-1"])
            ]
        assert daemon.returncode == 0, log.read_text()
