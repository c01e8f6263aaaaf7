"""Who a certificate speaks for: ``spiffe://<trust-domain>/<role>/<name>``.

Pure Python with no crypto library, so processes that only check identities
(the daemon, through gRPC's auth context) need not load one; `fleet.pki`
re-exports everything here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast, get_args

__all__ = ["ROLES", "Identity", "Role", "check_name", "check_trust_domain"]

Role = Literal["manager", "node", "operator"]
ROLES: tuple[Role, ...] = get_args(Role)

# Kubernetes label-value syntax (what node ids use), and DNS names for trust domains.
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_TRUST_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_URI_RE = re.compile(r"spiffe://([^/]+)/([^/]+)/([^/]+)")


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for: ``spiffe://<trust_domain>/<role>/<name>``."""

    role: Role
    """manager, node or operator: what the holder may call."""
    name: str
    """The node id, manager replica or operator name (label-value syntax)."""
    trust_domain: str
    """The fleet this identity belongs to (one CA per trust domain)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        check_name(self.name)
        check_trust_domain(self.trust_domain)

    @property
    def uri(self) -> str:
        """The SPIFFE ID carried as the certificate's SAN URI."""
        return f"spiffe://{self.trust_domain}/{self.role}/{self.name}"

    @property
    def server_name(self) -> str:
        """The DNS SAN every leaf carries; dial with it to check the peer's identity."""
        return f"{self.name}.{self.role}.{self.trust_domain}"

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"

    @classmethod
    def from_uri(cls, uri: str) -> Identity:
        """Parse ``spiffe://<td>/<role>/<name>``; ValueError says what is wrong."""
        match = _URI_RE.fullmatch(uri)
        if match is None:
            raise ValueError(f"{uri!r} is not of the form spiffe://<trust-domain>/<role>/<name>")
        trust_domain, role, name = match.groups()
        if role not in ROLES:
            raise ValueError(f"{uri!r}: role {role!r} is not one of {', '.join(ROLES)}")
        try:
            return cls(cast(Role, role), name, trust_domain)
        except ValueError as exc:
            raise ValueError(f"{uri!r}: {exc}") from None


def check_name(name: str) -> str:
    """Return `name` if it is a valid identity name (the node-id syntax), else raise ValueError."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"name {name!r} must be 1-63 letters, digits, '.', '_' or '-',"
            " starting and ending with a letter or digit"
        )
    return name


def check_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a lower-case DNS name, else raise ValueError."""
    if len(trust_domain) > 253 or not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise ValueError(f"trust domain {trust_domain!r} must be a lower-case DNS name")
    return trust_domain
