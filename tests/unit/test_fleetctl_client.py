"""fleetctl's connection errors: one line saying which address, what failed, what to check."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from fleetctl_fake import FakeFleet, FakeManager, Fleetctl, demo_fleet, serve
from grpc import aio

from fleet.pki import CertificateAuthority
from fleet.tls import TLSConfig
from fleet.v1 import fleet_pb2_grpc


@contextmanager
def raw_tls_server(cert_pem: bytes, key_pem: bytes, client_ca_pem: bytes) -> Iterator[str]:
    """A grpc.aio server with hand-made credentials (no fleet.tls checks), for broken setups."""
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        server = aio.server()
        fleet_pb2_grpc.add_FleetServiceServicer_to_server(
            fleet_pb2_grpc.FleetServiceServicer(), server
        )
        creds = grpc.ssl_server_credentials(
            [(key_pem, cert_pem)], root_certificates=client_ca_pem, require_client_auth=True
        )
        state["port"] = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await state["stop"].wait()
        await server.stop(0)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"127.0.0.1:{state['port']}"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def _runner(address: str, operator: TLSConfig, home: Path) -> Fleetctl:
    return Fleetctl(FakeManager(address, FakeFleet()), operator, home)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fleetctl: error: ")
    return lines[0]


def test_connection_refused_names_the_address(pki, tmp_path: Path) -> None:
    """Nothing listening: exit 1, 'connection refused' with the address and what to check."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fleetctl = _runner(f"127.0.0.1:{port}", pki.issue("operator", "alice"), tmp_path)
    result = fleetctl("nodes", "list")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert f"manager at 127.0.0.1:{port}: connection refused" in line
    assert "FLEET_MANAGER" in line


def test_unknown_ca_is_explained(pki, tmp_path: Path) -> None:
    """Our CA did not sign the manager's certificate: 'unknown CA', --ca to check."""
    other = CertificateAuthority.create()
    operator = other.issue("operator", "alice").write(tmp_path / "other")
    with serve(pki.issue("manager", "manager"), demo_fleet()) as manager:
        result = _runner(manager.address, operator, tmp_path)("nodes", "list")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert f"TLS with the manager at {manager.address} failed: unknown CA" in line
    assert "--ca" in line


def test_expired_manager_certificate_is_explained(pki, tmp_path: Path) -> None:
    """The manager shows an expired certificate: the message says expired and when."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    leaf = pki.ca.issue("manager", "manager", not_before=past, not_after=past + dt.timedelta(1))
    with raw_tls_server(leaf.cert_pem, leaf.key_pem, pki.ca.cert_pem) as address:
        result = _runner(address, pki.issue("operator", "alice"), tmp_path)("nodes", "list")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "the manager's certificate expired on " in line


def test_name_mismatch_is_explained(pki, tmp_path: Path) -> None:
    """A server holding a node certificate is not the manager: name mismatch, both names."""
    with serve(pki.issue("node", "node-1"), demo_fleet()) as manager:
        result = _runner(manager.address, pki.issue("operator", "alice"), tmp_path)("nodes", "list")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "name mismatch: expected a certificate for manager.fleet.local" in line
    assert "node-1.node.fleet.local" in line


def test_name_mismatch_through_an_intermediate_is_explained(pki, tmp_path: Path) -> None:
    """An enrolled node's port (certificate from the issuing CA): name mismatch, not unknown CA."""
    leaf = pki.ca.create_intermediate().issue("node", "node-1")
    with raw_tls_server(leaf.cert_pem, leaf.key_pem, pki.ca.cert_pem) as address:
        result = _runner(address, pki.issue("operator", "alice"), tmp_path)("nodes", "list")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "name mismatch: expected a certificate for manager.fleet.local" in line
    assert "node-1.node.fleet.local" in line


def test_manager_refusing_our_certificate_is_explained(pki, tmp_path: Path) -> None:
    """The manager trusts another CA for clients: 'refused our certificate'."""
    leaf = pki.ca.issue("manager", "manager")
    other = CertificateAuthority.create()
    with raw_tls_server(leaf.cert_pem, leaf.key_pem, other.cert_pem) as address:
        result = _runner(address, pki.issue("operator", "alice"), tmp_path)("nodes", "list")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "the manager refused our certificate" in line


def test_our_expired_certificate_is_caught_before_dialing(pki, tmp_path: Path) -> None:
    """An expired operator certificate is reported from the file, naming it (exit 2)."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    operator = pki.ca.issue(
        "operator", "alice", not_before=past, not_after=past + dt.timedelta(days=1)
    ).write(tmp_path / "op")
    result = _runner("127.0.0.1:1", operator, tmp_path)("nodes", "list")
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert str(operator.cert_file) in line
    assert "expired on" in line


def test_a_node_certificate_is_not_an_operator(pki, tmp_path: Path) -> None:
    """Using a node's certificate with fleetctl is refused locally, saying which role is needed."""
    result = _runner("127.0.0.1:1", pki.issue("node", "node-1"), tmp_path)("nodes", "list")
    assert result.exit_code == 2
    assert "it is node/node-1" in _one_error_line(result.stderr)


def test_silent_server_hits_the_deadline(pki, tmp_path: Path) -> None:
    """A peer that accepts but never answers: exit 1 within --timeout, saying so."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        fleetctl = _runner(address, pki.issue("operator", "alice"), tmp_path)
        result = fleetctl("--timeout", "0.5", "nodes", "list")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert address in line
    assert "0.5s" in line or "timed out" in line


@pytest.mark.parametrize("missing", ["--ca", "--cert", "--key"])
def test_missing_tls_option_names_flag_and_env(pki, tmp_path: Path, missing: str) -> None:
    """Without a certificate option fleetctl names the flag and the env var to set."""
    fleetctl = _runner("127.0.0.1:1", pki.issue("operator", "alice"), tmp_path)
    flags = fleetctl.flags()
    i = flags.index(missing)
    del flags[i : i + 2]
    result = fleetctl(*flags, "nodes", "list", connect=False)
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert f"{missing} (FLEET_{missing[2:].upper()})" in line


def test_an_unusable_tls_file_is_named_by_where_it_was_set(pki, tmp_path: Path) -> None:
    """A missing, unreadable or invalid file names the flag, variable or config-file key it
    came from, the path and the cause, in one line (exit 2), nothing dialled."""
    fleetctl = _runner("127.0.0.1:1", pki.issue("operator", "alice"), tmp_path)
    op = fleetctl.operator
    gone = tmp_path / "gone.pem"
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    base = ["--manager", "127.0.0.1:1"]

    flag = fleetctl(*base, "--ca", str(op.ca_file), "--cert", str(gone), "--key",
                    str(op.key_file), "nodes", "list", connect=False)  # fmt: skip
    assert flag.exit_code == 2
    assert _one_error_line(flag.stderr) == f"fleetctl: error: --cert: {gone}: no such file"

    env = {"FLEET_CA": str(op.ca_file), "FLEET_CERT": str(op.cert_file), "FLEET_KEY": str(junk)}
    by_env = fleetctl(*base, "nodes", "list", connect=False, env=env)
    assert by_env.exit_code == 2
    assert _one_error_line(by_env.stderr) == (
        f"fleetctl: error: FLEET_KEY: {junk}: not a PEM private key"
    )

    config = tmp_path / "fleetctl.toml"
    config.write_text(f'ca = "{tmp_path}"\ncert = "{op.cert_file}"\nkey = "{op.key_file}"\n')
    in_file = fleetctl(*base, "--config", str(config), "nodes", "list", connect=False)
    assert in_file.exit_code == 2
    assert _one_error_line(in_file.stderr) == (
        f"fleetctl: error: {config}: ca: {tmp_path}: is a directory, not a file"
    )
