"""The in-memory deny list: refusing revoked certificates by notBefore, merging refreshes."""

from __future__ import annotations

import datetime as dt

import pytest

from fleet.errors import Unauthenticated
from fleet.pki import CertificateAuthority
from manager.service.deny_list import DenyList, not_before_ms

CA = CertificateAuthority.create()
T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def pem(start: dt.datetime) -> bytes:
    """node/n1's certificate starting at `start`."""
    return CA.issue("node", "n1", not_before=start, not_after=start + dt.timedelta(days=7)).cert_pem


def ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


async def test_only_certificates_before_the_cutoff_are_refused() -> None:
    """Older certificates are UNAUTHENTICATED naming the node (and counted); one starting at
    the cutoff passes; unlisted names are never parsed."""
    cutoff = T0 + dt.timedelta(hours=1)
    loaded = {"n1": ms(cutoff)}

    async def load() -> dict[str, int]:
        return loaded

    refused: list[str] = []
    deny = DenyList(load, on_refused=refused.append)
    await deny.load()
    with pytest.raises(Unauthenticated) as err:
        deny.check("n1", pem(T0))
    assert err.value.message == (
        "the certificate of node/n1 was revoked at 2026-12-01 01:00:00 UTC; enroll the host again"
    )
    deny.check("n1", pem(cutoff))
    deny.check("n2", b"not even a certificate")  # not listed: a dict lookup, no parse
    with pytest.raises(Unauthenticated):
        deny.check("n1", None)
    assert refused == ["n1", "n1"], "each refusal is counted, nothing else"


async def test_refresh_reports_new_revocations_and_never_forgets_local_ones() -> None:
    """A refresh hands names revoked elsewhere to on_revoked; a read that missed this
    replica's own `add` does not undo it."""
    rows: dict[str, int] = {}
    seen: list[list[str]] = []

    async def load() -> dict[str, int]:
        return dict(rows)

    async def on_revoked(names: list[str]) -> None:
        seen.append(names)

    deny = DenyList(load, on_revoked=on_revoked)
    await deny.load()
    deny.add("local", ms(T0))
    rows["remote"] = ms(T0)
    assert await deny.refresh() == ["remote"]
    assert deny.cutoff("local") == ms(T0)
    assert seen == [["remote"]]
    rows["remote"] = ms(T0) + 5000  # revoked again, later
    assert await deny.refresh() == ["remote"]
    assert await deny.refresh() == []
    assert sorted(deny.listed()) == ["local", "remote"]


def test_not_before_is_read_in_milliseconds() -> None:
    """The parse the memo caches."""
    assert not_before_ms(pem(T0)) == ms(T0)


async def test_a_listed_node_is_not_dialled_until_it_shows_a_newer_certificate() -> None:
    """The manager cannot see a dialled daemon's notBefore: a revoked node is not dialled
    until it has called in with a certificate from after its cutoff; a later revocation
    (here or merged from another replica) takes that back."""
    cutoff = T0 + dt.timedelta(hours=1)

    async def load() -> dict[str, int]:
        return {"n1": ms(cutoff)}

    deny = DenyList(load)
    await deny.load()
    assert deny.dial_refusal("n2") is None, "not listed"
    refusal = deny.dial_refusal("n1")
    assert refusal is not None
    assert refusal.startswith("the certificate of node/n1 was revoked at 2026-12-01 01:00:00 UTC")
    with pytest.raises(Unauthenticated):
        deny.check("n1", pem(T0))
    assert deny.dial_refusal("n1") is not None, "the old certificate called in: still refused"
    deny.check("n1", pem(cutoff))
    assert deny.dial_refusal("n1") is None, "enrolled again"
    deny.add("n1", ms(cutoff + dt.timedelta(hours=1)))
    assert deny.dial_refusal("n1") is not None, "revoked again"
    deny.check("n1", pem(cutoff + dt.timedelta(hours=2)))
    assert deny.dial_refusal("n1") is None
    assert deny.merge({"n1": ms(cutoff + dt.timedelta(hours=3))}) == ["n1"]
    assert deny.dial_refusal("n1") is not None, "revoked again on another replica"
