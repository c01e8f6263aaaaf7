"""`fleet-daemon enroll`: join this host to a fleet with a join token.

    fleet-daemon enroll --manager HOST:PORT --token T --ca-hash sha256:...

1. Discovery with the pin: a plain TLS connection to the manager's
   enrollment port only reads the certificate chain it serves (nothing is
   trusted or sent yet). The chain must hold a CA whose public key hashes to
   ``--ca-hash`` and that signed the served certificate, which must name
   ``manager.<trust domain>``; the trust domain is the pinned CA's
   (`check_served_chain`, a pure function). Otherwise nothing happens: the
   command never goes on unpinned.
2. The node's key is made here and written 0600 before anything is sent; it
   never leaves the host. Only then the token and a CSR for
   ``node/<name>`` go to ``EnrollmentService.Enroll`` over a gRPC channel
   that trusts the pinned CA alone and expects ``manager.<td>``.
3. The answer is checked as the daemon checks its files at start (key
   match, chain to the CA, dates, identity ``node/<name>``) and its CA
   against the pin; then ``<tls-dir>/node.pem``, ``ca.pem`` and a minimal
   daemon config are written.

A refusal leaves the host as it was: the key written in step 2 is removed
(or, with --force, the previous key put back). This is a short-lived command,
so it uses cryptography freely (the daemon itself keeps it out).
"""

from __future__ import annotations

import _ssl
import argparse
import datetime as dt
import json
import random
import re
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from fleet.enroll import ca_hash, make_csr, parse_ca_hash, parse_token
from fleet.errors import ConfigError
from fleet.files import write_file_atomic
from fleet.identity import Identity, check_name
from fleet.pki import ca_trust_domain
from fleet.tls import TLSConfig, channel_options
from fleet.v1 import enroll_pb2, enroll_pb2_grpc

__all__ = [
    "EnrollError",
    "EnrollOptions",
    "PinnedCA",
    "check_served_chain",
    "enroll",
    "main",
    "served_chain",
]

DEFAULT_CONFIG = Path("/etc/fleet/daemon.toml")
DEFAULT_TLS_DIR = Path("/etc/fleet/tls")
DEFAULT_STATE_DIR = Path("/var/lib/fleet-daemon")
CONNECT_TIMEOUT = 15.0
"""Seconds to reach the manager and read its chain."""
ENROLL_TIMEOUT = 30.0
"""Deadline of the Enroll call."""


class EnrollError(Exception):
    """Enrollment cannot go on; `message` is the one line to show (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class EnrollOptions:
    """What `fleet-daemon enroll` was told (checked by the parser)."""

    manager: str
    """host:port of the manager's enrollment port."""
    token: str
    """The join token, ``<id>.<secret>``."""
    ca_hash: str
    """The pin, ``sha256:<hex>`` of the fleet CA's public key."""
    name: str
    """The node name to enroll as."""
    manager_address: str = ""
    """host:port daemons reach ManagerService at; empty: what the manager answers."""
    config: Path = DEFAULT_CONFIG
    """The daemon config to write."""
    tls_dir: Path = DEFAULT_TLS_DIR
    """Where ca.pem, node.pem and node-key.pem go."""
    state_dir: Path = DEFAULT_STATE_DIR
    """The daemon's state_dir, written into the config."""
    force: bool = False
    """Replace an existing config and key."""
    next_steps: bool = True
    """Print how to start the daemon; install.sh, which starts it itself, turns it off."""


@dataclass(frozen=True)
class PinnedCA:
    """The CA the manager served whose key matches the pin."""

    cert_pem: bytes
    """Its certificate (PEM): the only root the Enroll channel trusts."""
    trust_domain: str
    """The fleet it names; the manager must hold ``manager.<trust_domain>``."""


# --- discovery --------------------------------------------------------------


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


def served_chain(manager: str, *, timeout: float = CONNECT_TIMEOUT) -> list[bytes]:
    """The certificates (DER, leaf first) the server at `manager` presents; EnrollError if
    it cannot be reached. Nothing is verified here: `check_served_chain` decides."""
    host, port = _split(manager)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reads the chain; the pin decides (module doc)
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock) as tls,
        ):
            # Public from Python 3.13, a private method of the SSL object before.
            get = getattr(tls, "get_unverified_chain", None) or getattr(
                getattr(tls, "_sslobj", None), "get_unverified_chain", None
            )
            if get is None:
                raise EnrollError(
                    f"this Python ({sys.version.split()[0]}) cannot read the certificate chain"
                    " a server presents; enroll with CPython 3.11 or later"
                )
            chain = get() or []
    except ssl.SSLError as exc:
        raise EnrollError(
            f"TLS with the manager at {manager} failed ({exc.reason or exc});"
            " is --manager its enrollment port?"
        ) from None
    except OSError as exc:
        raise EnrollError(
            f"cannot reach the manager at {manager}: {exc.strerror or exc or type(exc).__name__}"
        ) from None
    # 3.13 returns DER bytes; 3.11/3.12 _ssl.Certificate objects.
    return [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in chain]


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def check_served_chain(chain: Sequence[bytes], pin: str, manager: str) -> PinnedCA:
    """The pinned CA if the chain served by `manager` (DER, leaf first) proves it.

    EnrollError unless: some certificate's public key hashes to `pin`, it is
    a CA naming a trust domain, the served certificate chains up to it (each
    link signed by the next, intermediates being CAs), and that certificate
    carries ``manager.<trust domain>``.
    """
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError:
        raise EnrollError(f"the manager at {manager} presented an unreadable certificate") from None
    if not certs:
        raise EnrollError(f"the manager at {manager} presented no certificate")
    pinned = next((c for c in certs if ca_hash(_pem(c)) == pin), None)
    if pinned is None:
        if not any(_is_ca(c) for c in certs):  # the mTLS port serves the leaf alone
            raise EnrollError(
                f"the manager at {manager} presented no CA matching {pin}, and no CA at all:"
                " is --manager the manager's enrollment port?"
            )
        raise EnrollError(
            f"the manager at {manager} presented no CA matching {pin}; check --ca-hash"
            " (fleetctl tokens create prints it) and --manager"
        )
    if not _is_ca(pinned):
        raise EnrollError(
            f"the certificate matching {pin} that the manager at {manager} presented is not"
            " a CA; check --ca-hash"
        )
    trust_domain = ca_trust_domain(pinned)
    if trust_domain is None:
        raise EnrollError(
            f"the CA matching {pin} names no trust domain (no spiffe://<td> SAN URI);"
            " it is not a Fleet CA"
        )
    leaf = certs[0]
    current, hops = leaf, 0
    while not _signed_by(current, pinned):
        issuer = next(
            (c for c in certs if c is not current and _is_ca(c) and _signed_by(current, c)),
            None,
        )
        hops += 1
        if issuer is None or hops > len(certs):
            raise EnrollError(
                f"the manager at {manager} presented a certificate"
                f" ({leaf.subject.rfc4514_string()}) that the CA matching {pin} did not sign;"
                " refusing to enroll: check --manager and --ca-hash"
            )
        current = issuer
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    wanted = f"manager.{trust_domain}"
    if wanted not in names:
        raise EnrollError(
            f"the manager at {manager} presented a certificate for"
            f" {', '.join(names) or leaf.subject.rfc4514_string()}, not {wanted};"
            " refusing to enroll"
        )
    return PinnedCA(_pem(pinned), trust_domain)


# --- enrollment -------------------------------------------------------------

_REFUSALS: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAUTHENTICATED: "refused the token",
    grpc.StatusCode.PERMISSION_DENIED: "refused the name {name!r}",
    grpc.StatusCode.INVALID_ARGUMENT: "refused the request",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "is still enrolling too many hosts at once; try again"
    " later",
    grpc.StatusCode.UNIMPLEMENTED: "does not serve enrollment (is --manager its enrollment port?)",
    grpc.StatusCode.UNAVAILABLE: "did not complete the connection (is --manager its enrollment"
    " port?)",
}


RATE_LIMIT_PATIENCE = 120.0
"""Seconds to keep retrying while the manager's enrollment rate limit refuses us.

Many hosts installed at once (or behind one NAT address) meet the limit by
design; waiting it out beats failing an unattended install."""

_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?) s")


def _call_enroll(
    opts: EnrollOptions,
    pinned: PinnedCA,
    csr_pem: bytes,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> enroll_pb2.EnrollResponse:
    creds = grpc.ssl_channel_credentials(root_certificates=pinned.cert_pem)
    options = channel_options(f"manager.{pinned.trust_domain}")
    give_up = clock() + RATE_LIMIT_PATIENCE
    with grpc.secure_channel(opts.manager, creds, options=options) as channel:
        stub = enroll_pb2_grpc.EnrollmentServiceStub(channel)
        request = enroll_pb2.EnrollRequest(token=opts.token, node_name=opts.name, csr_pem=csr_pem)
        attempt = 0
        while True:
            try:
                reply: enroll_pb2.EnrollResponse = stub.Enroll(request, timeout=ENROLL_TIMEOUT)
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                details = exc.details() or ""
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    suggested = _RETRY_IN.search(details)
                    delay = float(suggested.group(1)) if suggested else min(2.0**attempt, 10.0)
                    # Jitter spreads hosts that were refused together (not a secret).
                    delay += random.uniform(0, delay / 2)  # noqa: S311
                    if clock() + delay < give_up:
                        print(
                            f"fleet-daemon enroll: the manager is rate-limiting enrollments;"
                            f" retrying in {delay:.1f} s",
                            file=sys.stderr,
                        )
                        sleep(delay)
                        attempt += 1
                        continue
                what = _REFUSALS.get(code, f"answered {code.name}").format(name=opts.name)
                raise EnrollError(f"the manager at {opts.manager} {what}: {details}") from None
            return reply


def _check_reply(
    opts: EnrollOptions,
    pinned: PinnedCA,
    files: TLSConfig,
    key_pem: bytes,
    reply: enroll_pb2.EnrollResponse,
) -> dt.datetime:
    """The certificate's expiry if the answer is usable; EnrollError naming what is not."""
    try:
        cas = x509.load_pem_x509_certificates(reply.ca_pem)
    except ValueError:
        cas = []
    if not any(ca_hash(_pem(c)) == opts.ca_hash for c in cas):
        raise EnrollError(
            f"the manager at {opts.manager} returned a CA that does not match {opts.ca_hash}"
        )
    try:
        loaded = files._check(reply.ca_pem, reply.certificate_pem, key_pem, now=None)
    except ConfigError as exc:
        raise EnrollError(f"the manager's certificate is unusable: {exc.message}") from None
    wanted = Identity("node", opts.name, pinned.trust_domain)
    if loaded.identity != wanted:
        raise EnrollError(
            f"the manager issued a certificate for {loaded.identity.uri}, not {wanted.uri}"
        )
    return loaded.validity[0][3]


def _config_toml(opts: EnrollOptions, files: TLSConfig, address: str, td: str) -> str:
    def q(value: object) -> str:
        return json.dumps(str(value))  # a JSON string is a TOML basic string

    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"""\
# Written by `fleet-daemon enroll` on {stamp} for node/{opts.name} (trust domain {td}).
# Every other key has its default (configs/daemon.toml, docs/configuration.md).
node_id = {q(opts.name)}
# No listening port: the manager reaches this host over its control stream.
listen = ""
state_dir = {q(opts.state_dir)}

[tls]
ca_file = {q(files.ca_file)}
cert_file = {q(files.cert_file)}
key_file = {q(files.key_file)}
# Renewed over the manager link at two thirds of its lifetime.
auto_renew = true

[manager]
addresses = [{q(address)}]
"""


def enroll(opts: EnrollOptions, *, say: Callable[[str], None] = print) -> None:
    """Enroll (module doc); EnrollError with one line if anything stops it."""
    files = TLSConfig(
        ca_file=opts.tls_dir / "ca.pem",
        cert_file=opts.tls_dir / "node.pem",
        key_file=opts.tls_dir / "node-key.pem",
    )
    if not opts.force:
        for path, what in ((opts.config, "the daemon config"), (files.key_file, "a node key")):
            if path.exists():
                raise EnrollError(
                    f"{path} exists ({what}); pass --force to replace it"
                    " (this host then gets a new identity)"
                )
    pinned = check_served_chain(served_chain(opts.manager), opts.ca_hash, opts.manager)
    identity = Identity("node", opts.name, pinned.trust_domain)
    key_pem, csr_pem = make_csr(identity)
    try:
        old_key: bytes | None = files.key_file.read_bytes()
    except FileNotFoundError:
        old_key = None
    except OSError as exc:
        raise EnrollError(f"cannot read {files.key_file}: {exc.strerror}") from None
    try:
        write_file_atomic(files.key_file, key_pem, mode=0o600)
    except OSError as exc:
        raise EnrollError(f"cannot write {files.key_file}: {exc.strerror or exc}") from None
    try:
        reply = _call_enroll(opts, pinned, csr_pem)
        expires = _check_reply(opts, pinned, files, key_pem, reply)
    except BaseException:
        # Refused or unusable: leave the host as it was.
        if old_key is None:
            files.key_file.unlink(missing_ok=True)
        else:
            write_file_atomic(files.key_file, old_key, mode=0o600)
        raise
    try:
        write_file_atomic(files.cert_file, reply.certificate_pem, mode=0o644)
        write_file_atomic(files.ca_file, reply.ca_pem, mode=0o644)
    except OSError as exc:
        raise EnrollError(f"cannot write the certificate: {exc}") from None
    labels = ", ".join(f"{k}={v}" for k, v in sorted(reply.labels.items())) or "none"
    say(
        f"enrolled as node/{opts.name} in trust domain {pinned.trust_domain}"
        f" (labels: {labels}); certificate valid until {expires:%Y-%m-%d %H:%M:%S} UTC"
    )
    say(f"wrote {files.key_file} (0600), {files.cert_file}, {files.ca_file}")
    address = opts.manager_address or reply.manager_address
    if not address:
        raise EnrollError(
            "the manager did not say where daemons reach it (it has no [enroll]"
            " manager_address) and --manager-address was not given: the certificate is in"
            f" {opts.tls_dir}, but no config was written; write {opts.config} yourself"
            " (configs/daemon.toml)"
        )
    try:
        write_file_atomic(
            opts.config,
            _config_toml(opts, files, address, pinned.trust_domain).encode(),
            mode=0o644,
        )
    except OSError as exc:
        raise EnrollError(f"cannot write {opts.config}: {exc.strerror or exc}") from None
    say(f"wrote {opts.config} (manager {address}; no listening port)")
    if not opts.next_steps:
        return
    if opts.config == DEFAULT_CONFIG:
        say("next: systemctl enable --now fleet-daemon")
        say(f"  or in the foreground: fleet-daemon --config {opts.config}")
    else:
        say(f"next: fleet-daemon --config {opts.config}")
        say(f"  (the systemd unit reads {DEFAULT_CONFIG}; point its ExecStart here)")


# --- command line -----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet-daemon enroll",
        description="Join this host to a fleet: get a node certificate for a join token and"
        " write the daemon's TLS files and config.",
    )
    parser.add_argument(
        "--manager", required=True, metavar="HOST:PORT", help="the manager's enrollment port"
    )
    parser.add_argument(
        "--token", required=True, metavar="TOKEN", help="the join token (fleetctl tokens create)"
    )
    parser.add_argument(
        "--ca-hash", required=True, metavar="sha256:HEX", help="the fleet CA's pin (printed too)"
    )
    parser.add_argument(
        "--name", metavar="NAME", help="node name (default: this host's short hostname)"
    )
    parser.add_argument(
        "--manager-address",
        default="",
        metavar="HOST:PORT",
        help="where the daemon reaches the manager (default: what the manager answers)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        metavar="PATH",
        help=f"daemon config to write (default {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--tls-dir",
        type=Path,
        default=DEFAULT_TLS_DIR,
        metavar="DIR",
        help=f"for ca.pem, node.pem, node-key.pem (default {DEFAULT_TLS_DIR})",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"the daemon's state_dir (default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an existing config and key (re-enroll)"
    )
    # install.sh installs the unit (ExecStart at its config) and starts it: the
    # "next: ..." lines would tell its user to do what it then does.
    parser.add_argument("--no-next-steps", action="store_true", help=argparse.SUPPRESS)
    return parser


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EnrollOptions:
    """The options, or a usage error (exit 2) naming the bad flag."""
    try:
        _split(args.manager)
    except ValueError as exc:
        parser.error(f"--manager: {exc}")
    if args.manager_address:
        try:
            _split(args.manager_address)
        except ValueError as exc:
            parser.error(f"--manager-address: {exc}")
    try:
        parse_token(args.token)
    except ValueError as exc:
        parser.error(f"--token: {exc}")
    try:
        pin = parse_ca_hash(args.ca_hash)
    except ValueError as exc:
        parser.error(f"--ca-hash: {exc}")
    name = args.name
    if name is None:
        host = socket.gethostname().split(".")[0]
        try:
            name = check_name(host)
        except ValueError as exc:
            parser.error(f"this host's name is no valid node name ({exc}); pass --name")
    else:
        try:
            check_name(name)
        except ValueError as exc:
            parser.error(f"--name: {exc}")
    return EnrollOptions(
        manager=args.manager,
        token=args.token.strip(),
        ca_hash=pin,
        name=name,
        manager_address=args.manager_address,
        config=args.config,
        tls_dir=args.tls_dir,
        state_dir=args.state_dir,
        force=args.force,
        next_steps=not args.no_next_steps,
    )


def main(argv: Sequence[str]) -> int:
    """`fleet-daemon enroll ...`: 0 enrolled, 1 refused or failed, 2 bad flags."""
    parser = _parser()
    opts = _options(parser, parser.parse_args(argv))
    try:
        enroll(opts)
    except EnrollError as exc:
        print(f"fleet-daemon enroll: {exc.message}", file=sys.stderr)
        return 1
    return 0
