"""A CA shared by one test module, for suites that start their servers once per module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fleet.pki import CertificateAuthority, Role
from fleet.tls import TLSConfig


@dataclass(frozen=True)
class ModulePki:
    """A CA shared by one test module (the `pki` fixture is per test)."""

    ca: CertificateAuthority
    """The module's CA (trust domain fleet.local)."""
    root: Path
    """Where `issue` writes: <root>/<role>-<name>/."""

    @property
    def trust_domain(self) -> str:
        """The CA's trust domain."""
        return self.ca.trust_domain

    def issue(self, role: Role, name: str, **kw: Any) -> TLSConfig:
        """Issue <role>/<name> (kwargs as CertificateAuthority.issue) and write it."""
        stem = f"{role}-{name}-{len(list(self.root.glob('*')))}"
        return self.ca.issue(role, name, **kw).write(self.root / stem)

    def raw_credentials(self, role: Role, name: str, **kw: Any) -> grpc.ChannelCredentials:
        """Client credentials for a leaf `channel_credentials` would refuse (bad dates)."""
        leaf = self.ca.issue(role, name, **kw)
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem,
            private_key=leaf.key_pem,
            certificate_chain=leaf.cert_pem,
        )
