"""A network namespace whose only peer is the host side of a veth pair.

Inside it a process sees its own loopback and one /30 link to the host:
no default route, so nothing on the internet (or the host's other networks)
can be reached, and a host would have to install from what it was given.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
"""The whole environment commands get inside: `env -i PATH=...`, as on a fresh host."""


class NetnsUnavailableError(Exception):
    """This machine cannot make the namespace (not root, no `ip`, no netns support)."""


@dataclass(frozen=True)
class Netns:
    """A namespace made by `netns()`; run commands in it with a clean environment."""

    name: str
    """The namespace (`ip netns list`)."""
    host_ip: str
    """The host end of the veth pair: the only address reachable from inside."""
    ns_ip: str
    """The namespace end."""

    def argv(self, argv: Sequence[str | Path], env: Mapping[str, str] | None = None) -> list[str]:
        """`argv` as run inside, with only PATH (and `env`) in its environment."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return [
            "ip", "netns", "exec", self.name,
            "env", "-i", f"PATH={CLEAN_PATH}", *extra,
            *(str(a) for a in argv),
        ]  # fmt: skip

    def run(
        self,
        argv: Sequence[str | Path],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        timeout: float = 180,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside and wait; stdout and stderr captured as text."""
        return subprocess.run(
            self.argv(argv, env),
            cwd=cwd,
            env={"PATH": CLEAN_PATH},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(
        self, argv: Sequence[str | Path], *, cwd: Path, log: Path, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside; stdout and stderr to `log`. `ip netns exec` and `env` exec,
        so the Popen's pid is the command's own."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.argv(argv, env),
                cwd=cwd,
                env={"PATH": CLEAN_PATH},
                stdout=out,
                stderr=subprocess.STDOUT,
            )


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetnsUnavailableError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host has a route or an address in."""
    nets = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            nets.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_ip("-j", "-4", "addr") or "[]"):
        for addr in link.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    """A private /30 that overlaps nothing the host routes (10.0.0.0/8, at random)."""
    used = _in_use()
    for _ in range(100):
        octets = secrets.token_bytes(3)
        net = ipaddress.IPv4Network(f"10.{octets[0]}.{octets[1]}.{octets[2] & 0xFC}/30")
        if not any(net.overlaps(other) for other in used):
            return net
    raise NetnsUnavailableError("no free /30 in 10.0.0.0/8 for the veth pair")


def check_available() -> None:
    """NetnsUnavailableError saying why this machine cannot run these tests."""
    if os.geteuid() != 0:
        raise NetnsUnavailableError("needs root (ip netns add, veth pairs)")
    if shutil.which("ip") is None:
        raise NetnsUnavailableError("needs `ip` from iproute2 (apt-get install iproute2)")


@contextmanager
def netns() -> Iterator[Netns]:
    """A fresh namespace and veth pair, deleted on exit (with its end of the pair)."""
    check_available()
    tag = secrets.token_hex(3)
    name, host_if, ns_if = f"fleet-dist-{tag}", f"fdh{tag}", f"fdn{tag}"
    subnet = _free_subnet()
    host_ip, ns_ip = (str(subnet[1]), str(subnet[2]))
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield Netns(name=name, host_ip=host_ip, ns_ip=ns_ip)
    finally:
        # Deleting the namespace deletes its veth end, and so the host's.
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30, check=False)
