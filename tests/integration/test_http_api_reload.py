"""The HTTP API's port picks up a replaced certificate at the next handshake.

A real manager with `[http] listen`; its certificate files are replaced on
disk (atomically, as `fleetctl pki` and renewal write them) while an
operator's keep-alive connection stays open.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from enroll_helpers import serial_of, served_serial
from http_helpers import HttpEnv, http_env, https_client, post

from fleet.pki import CertificateAuthority, write_file_atomic
from fleet.tls import TLSConfig


def connection_serial(response: httpx.Response) -> int:
    """The serial of the certificate the server presented on `response`'s connection."""
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    return int(x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number)


async def new_connection_serial(env: HttpEnv) -> int:
    """The serial a new TLS connection to the HTTP port is served (a full handshake)."""
    operator = env.pki.issue("operator", "probe")
    return await asyncio.to_thread(served_serial, env.manager.http_port or 0, operator)


def reissue(env: HttpEnv) -> TLSConfig:
    """A new certificate and key for the manager, written over its files."""
    return env.pki.issue("manager", "m1", hostnames=("localhost",), ips=("127.0.0.1",))


async def test_a_replaced_certificate_serves_new_connections_and_old_ones_go_on(
    pki: Any, tmp_path: Path
) -> None:
    """After the files are replaced, a new connection is served the new certificate, and the
    keep-alive connection opened before keeps working with the old one."""
    async with http_env(pki, tmp_path) as env:
        manager_tls = env.manager.config.tls
        old = serial_of(manager_tls.cert_file)
        before = await env.call("ListNodes")
        assert before.status_code == 200
        assert connection_serial(before) == old
        assert await new_connection_serial(env) == old

        fresh = reissue(env)
        assert fresh.cert_file == manager_tls.cert_file  # the files the manager serves
        new = serial_of(fresh.cert_file)
        assert new != old

        assert await new_connection_serial(env) == new
        after = await env.call("ListNodes")  # on the pooled connection from before
        assert after.status_code == 200
        assert after.extensions["network_stream"] is before.extensions["network_stream"]
        assert connection_serial(after) == old
        async with env.client("operator", "bob") as bob:
            r = await bob.post(
                "/v1/fleet.v1.FleetService/ListNodes",
                content=b"{}",
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 200
            assert connection_serial(r) == new


async def test_a_broken_replacement_keeps_the_last_good_certificate_and_is_logged(
    pki: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage in the certificate file: new connections are still served the last good
    certificate, the manager says why once, and a good file after it is picked up."""
    caplog.set_level(logging.INFO, logger="manager.httpapi.server")
    async with http_env(pki, tmp_path) as env:
        cert_file = env.manager.config.tls.cert_file
        good = serial_of(reissue(env).cert_file)
        assert await new_connection_serial(env) == good

        write_file_atomic(cert_file, b"not a certificate\n", mode=0o644)
        for _ in range(3):
            assert await new_connection_serial(env) == good
        r = await env.call("ListNodes")
        assert r.status_code == 200
        warnings = [
            rec.getMessage()
            for rec in caplog.records
            if rec.name == "manager.httpapi.server" and rec.levelno == logging.WARNING
        ]
        assert len(warnings) == 1, warnings  # once per change, not once per handshake
        assert "still serving the old" in warnings[0]
        assert str(cert_file) in warnings[0]

        repaired = serial_of(reissue(env).cert_file)
        assert await new_connection_serial(env) == repaired
        reloads = [
            rec.getMessage()
            for rec in caplog.records
            if rec.name == "manager.httpapi.server" and "reloaded" in rec.getMessage()
        ]
        assert len(reloads) == 2, reloads  # the good file, then the repaired one


async def test_a_ca_bundle_admits_clients_of_the_new_ca(pki: Any, tmp_path: Path) -> None:
    """CA rotation's first step: once the CA file holds the old and a new CA, an operator
    certificate of the new CA is let in (the new context's trust store verifies clients)."""
    async with http_env(pki, tmp_path) as env:
        ca_file = env.manager.config.tls.ca_file
        new_ca = CertificateAuthority.create(trust_domain=pki.trust_domain)
        carol = new_ca.issue("operator", "carol").write(tmp_path / "carol")
        bundle = ca_file.read_bytes() + new_ca.cert_pem
        write_file_atomic(carol.ca_file, bundle, mode=0o644)  # carol trusts the manager's CA too
        async with https_client(pki, env.manager.http_port or 0, carol) as client:
            with pytest.raises(httpx.TransportError):
                await post(client, "ListNodes")
            write_file_atomic(ca_file, bundle, mode=0o644)
            r = await post(client, "ListNodes")
        assert r.status_code == 200
        assert r.json() == {}
