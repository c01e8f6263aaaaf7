"""fleetctl pki: make the fleet's CA and issue certificates (fleet.pki, offline)."""

from __future__ import annotations

import enum
import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from fleet.enroll import ca_hash
from fleet.errors import ConfigError
from fleet.pki import CertificateAuthority, check_trust_domain, write_file_atomic
from fleetctl.output import print_object
from fleetctl.runtime import EXIT_OK, Cli, Failure, UsageProblem

__all__ = ["app"]

app = typer.Typer(
    help="The fleet's private CA and its certificates (no manager needed).", no_args_is_help=True
)


class RoleChoice(enum.StrEnum):
    """Who the certificate is for."""

    manager = "manager"
    node = "node"
    operator = "operator"


@app.command("init")
def init(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Where to write ca.pem and ca-key.pem.")],
    trust_domain: Annotated[
        str, typer.Option("--trust-domain", help="The fleet's trust domain (a DNS name).")
    ] = "fleet.local",
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 3650,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an existing CA (invalidates all its certificates)."),
    ] = False,
) -> None:
    """Create the fleet's CA in DIRECTORY; refuses to replace one without --force."""
    cli = Cli.of(ctx)

    def body() -> int:
        try:
            check_trust_domain(trust_domain)
        except ValueError as exc:
            raise UsageProblem(f"--trust-domain: {exc}") from None
        key_path = directory / "ca-key.pem"
        if key_path.exists() and not force:
            raise Failure(
                f"{key_path} exists; refusing to replace the CA (every certificate it issued"
                " would stop working); pass --force to replace it anyway"
            )
        ca = CertificateAuthority.create(trust_domain, valid_days=days)
        try:
            cert_path, key_path = ca.write(directory, overwrite=force)
        except OSError as exc:
            raise Failure(f"cannot write the CA into {directory}: {exc.strerror or exc}") from None
        _report(
            cli,
            {
                "trust_domain": trust_domain,
                "ca_file": str(cert_path),
                "ca_key_file": str(key_path),
                "ca_hash": ca_hash(ca.cert_pem),
            },
            [
                ("Trust domain", "trust_domain"),
                ("CA", "ca_file"),
                ("CA key", "ca_key_file"),
                ("CA hash", "ca_hash"),
            ],
        )
        return EXIT_OK

    cli.execute(body)


@app.command("issue")
def issue(
    ctx: typer.Context,
    role: Annotated[RoleChoice, typer.Argument(help="manager, node or operator.")],
    name: Annotated[str, typer.Argument(help="Node id, operator name or manager replica name.")],
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Extra DNS name for the SAN (repeatable).")
    ] = None,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="IP address for the SAN (repeatable).")
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 365,
    ca_dir: Annotated[
        Path, typer.Option("--ca-dir", help="Directory holding ca.pem and ca-key.pem.")
    ] = Path("certs"),
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write (default: --ca-dir).")
    ] = None,
) -> None:
    """Issue a certificate for ROLE/NAME, signed by the CA in --ca-dir."""
    cli = Cli.of(ctx)

    def body() -> int:
        for address in ip or []:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise UsageProblem(f"--ip: {address!r} is not an IP address") from None
        ca = CertificateAuthority.load(ca_dir / "ca.pem", ca_dir / "ca-key.pem")
        try:
            issued = ca.issue(role.value, name, hostnames=host or [], ips=ip or [], valid_days=days)
        except ValueError as exc:
            raise UsageProblem(f"{role.value} {name!r}: {exc}") from None
        target = out or ca_dir
        try:
            cfg = issued.write(target)
        except OSError as exc:
            raise Failure(f"cannot write into {target}: {exc.strerror or exc}") from None
        _report(
            cli,
            {
                "identity": issued.identity.uri,
                "server_name": issued.identity.server_name,
                "not_after": issued.certificate.not_valid_after_utc.isoformat(),
                "cert_file": str(cfg.cert_file),
                "key_file": str(cfg.key_file),
                "ca_file": str(cfg.ca_file),
            },
            [
                ("Identity", "identity"),
                ("DNS name", "server_name"),
                ("Valid until", "not_after"),
                ("Certificate", "cert_file"),
                ("Key", "key_file"),
                ("CA", "ca_file"),
            ],
        )
        return EXIT_OK

    cli.execute(body)


@app.command("intermediate")
def intermediate(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Argument(help="Where to write issuer.pem and issuer-key.pem (for the manager).")
    ],
    ca_dir: Annotated[
        Path, typer.Option("--ca-dir", help="Directory holding the root's ca.pem and ca-key.pem.")
    ] = Path("certs"),
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 365,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing issuer key in OUT.")
    ] = False,
) -> None:
    """Make an issuing CA, signed by the root, for the manager to sign node certificates.

    Give the manager OUT/issuer.pem and OUT/issuer-key.pem as `[enroll]
    issuer_cert_file` / `issuer_key_file`; the root's key can then stay offline.
    """
    cli = Cli.of(ctx)

    def body() -> int:
        root = CertificateAuthority.load(ca_dir / "ca.pem", ca_dir / "ca-key.pem")
        key_path, cert_path = out / "issuer-key.pem", out / "issuer.pem"
        if key_path.exists() and not force:
            raise Failure(f"{key_path} exists; pass --force to replace it")
        try:
            issuer = root.create_intermediate(valid_days=days)
        except ValueError as exc:
            raise Failure(f"{ca_dir / 'ca.pem'}: {exc}") from None
        try:
            write_file_atomic(key_path, issuer.key_pem, mode=0o600)
            write_file_atomic(cert_path, issuer.cert_pem + issuer.chain_pem, mode=0o644)
        except OSError as exc:
            raise Failure(f"cannot write into {out}: {exc.strerror or exc}") from None
        try:  # prove the pair loads as the manager will load it
            CertificateAuthority.load(cert_path, key_path, root_path=ca_dir / "ca.pem")
        except ConfigError as exc:
            raise Failure(str(exc)) from None
        _report(
            cli,
            {
                "issuer_cert_file": str(cert_path),
                "issuer_key_file": str(key_path),
                "root": str(ca_dir / "ca.pem"),
                "ca_hash": ca_hash(root.cert_pem),
            },
            [
                ("Issuer certificate", "issuer_cert_file"),
                ("Issuer key", "issuer_key_file"),
                ("Signed by", "root"),
                ("CA hash", "ca_hash"),
            ],
        )
        return EXIT_OK

    cli.execute(body)


@app.command("ca-hash")
def show_ca_hash(
    ctx: typer.Context,
    ca_file: Annotated[Path, typer.Argument(help="The fleet CA certificate (ca.pem).")] = Path(
        "certs/ca.pem"
    ),
) -> None:
    """Print the CA pin hosts enroll with: sha256 of the CA's public key."""
    cli = Cli.of(ctx)

    def body() -> int:
        try:
            pem = ca_file.read_bytes()
        except OSError as exc:
            raise Failure(f"{ca_file}: cannot read it ({exc.strerror or exc})") from None
        try:
            value = ca_hash(pem)
        except ValueError:
            raise Failure(f"{ca_file}: not a PEM certificate") from None
        cli.out.print(value, markup=False)
        return EXIT_OK

    cli.execute(body)


def _report(cli: Cli, data: dict[str, str], fields: list[tuple[str, str]]) -> None:
    print_object(cli.out, cli.fmt, data, fields)
