"""bench/connect_sim's per-node credentials: built once, built again when the files change."""

from __future__ import annotations

from pathlib import Path

from bench.connect_sim import Credentials
from fleet.pki import CertificateAuthority


def test_credentials_are_reused_until_the_files_change(tmp_path: Path) -> None:
    """Dials with unchanged files share one credentials object; a renewed certificate
    gets a new one (a simulated node dials with what its files hold, as the daemon)."""
    ca = CertificateAuthority.create()
    tls = ca.issue("node", "n1").write(tmp_path / "n1")
    credentials = Credentials(tls)
    first = credentials.get()
    assert credentials.get() is first
    ca.issue("node", "n1").write(tmp_path / "n1")  # renewed: same paths, new contents
    renewed = credentials.get()
    assert renewed is not first
    assert credentials.get() is renewed
