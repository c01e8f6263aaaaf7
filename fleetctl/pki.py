"""fleetctl pki: make the fleet's CA and issue certificates (fleet.pki, offline)."""

from __future__ import annotations

import enum
import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from fleet.pki import CertificateAuthority, check_trust_domain
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
            {"trust_domain": trust_domain, "ca_file": str(cert_path), "ca_key_file": str(key_path)},
            [("Trust domain", "trust_domain"), ("CA", "ca_file"), ("CA key", "ca_key_file")],
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


def _report(cli: Cli, data: dict[str, str], fields: list[tuple[str, str]]) -> None:
    print_object(cli.out, cli.fmt, data, fields)
