"""`fleet-daemon enroll` waits out the manager's enrollment rate limit instead of failing.

A real manager with enrollment on and a tight per-caller limit; the host
side is daemon.enroll's own client (discovery with the pin, then Enroll).
The limit runs on the manager's clock, which the test's `sleep` advances,
so the retry is exercised without waiting in real time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from enroll_helpers import enroll_settings, token_request
from fleet_harness import operator_stub
from manager_harness import FakeClock, manager_config, running_manager

from daemon import enroll as host
from fleet.enroll import ca_hash, make_csr
from fleet.identity import Identity


def _options(port: int, token: str, pin: str, name: str, tmp_path: Path) -> host.EnrollOptions:
    return host.EnrollOptions(
        manager=f"127.0.0.1:{port}",
        token=token,
        ca_hash=pin,
        name=name,
        config=tmp_path / name / "daemon.toml",
        tls_dir=tmp_path / name / "tls",
        state_dir=tmp_path / name / "state",
    )


async def test_enroll_retries_while_rate_limited(
    pki: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One caller gets a tenth of the global limit: 1 attempt a second, a burst of 1.
    settings = enroll_settings(pki.ca, tmp_path / "issuer", rate_per_second=10.0, burst=10)
    config = manager_config(
        pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state", enroll=settings
    )
    clock = FakeClock()
    async with running_manager(config, clock) as manager, operator_stub(pki, manager.port) as op:
        made = await op.CreateJoinToken(token_request(name_prefix="web-", uses=2))
        pin = ca_hash(pki.ca.cert_pem)
        assert made.ca_hash == pin
        port = manager.enroll_port
        pinned = host.check_served_chain(
            await asyncio.to_thread(host.served_chain, f"127.0.0.1:{port}"),
            pin,
            f"127.0.0.1:{port}",
        )
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            clock.advance(seconds)

        for name in ("web-1", "web-2"):
            _, csr = make_csr(Identity("node", name, pki.ca.trust_domain))
            opts = _options(port, made.token, pin, name, tmp_path)
            reply = await asyncio.to_thread(host._call_enroll, opts, pinned, csr, sleep=sleep)
            assert reply.node_id == name
        # The first spent the burst; the second was refused, waited, and got through.
        assert slept
        assert all(s >= 1.0 for s in slept)
        assert "rate-limiting enrollments; retrying in" in capsys.readouterr().err
        assert manager.metrics.enroll_rate_limited._value.get() == len(slept)


async def test_enroll_gives_up_after_its_patience(
    pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limit that never lets up ends in one clear line, not a hang."""
    settings = enroll_settings(pki.ca, tmp_path / "issuer", rate_per_second=0.01, burst=10)
    config = manager_config(
        pki, f"sqlite+aiosqlite:///{tmp_path / 'm.db'}", tmp_path / "state", enroll=settings
    )
    async with (
        running_manager(config, FakeClock()) as manager,
        operator_stub(pki, manager.port) as op,
    ):
        made = await op.CreateJoinToken(token_request(name_prefix="web-", uses=2))
        pin = ca_hash(pki.ca.cert_pem)
        port = manager.enroll_port
        pinned = host.check_served_chain(
            await asyncio.to_thread(host.served_chain, f"127.0.0.1:{port}"),
            pin,
            f"127.0.0.1:{port}",
        )
        monkeypatch.setattr(host, "RATE_LIMIT_PATIENCE", 30.0)
        waited = [0.0]

        def sleep(seconds: float) -> None:  # the manager's clock stands still: no refill
            waited[0] += seconds

        def clock() -> float:
            return waited[0]

        _, csr = make_csr(Identity("node", "web-1", pki.ca.trust_domain))
        await asyncio.to_thread(
            host._call_enroll, _options(port, made.token, pin, "web-1", tmp_path), pinned, csr
        )  # spends the caller's burst
        _, csr = make_csr(Identity("node", "web-2", pki.ca.trust_domain))
        with pytest.raises(host.EnrollError, match="still enrolling too many hosts"):
            await asyncio.to_thread(
                host._call_enroll,
                _options(port, made.token, pin, "web-2", tmp_path),
                pinned,
                csr,
                sleep=sleep,
                clock=clock,
            )
        assert 0 < waited[0] <= 30.0
