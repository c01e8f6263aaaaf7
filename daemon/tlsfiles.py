"""The daemon's TLS files, checked in a short-lived child process.

`fleet.tls.TLSConfig` checks its files with cryptography (parse, key match,
dates, chain, identity). That library costs the long-lived daemon ~13 MiB of
RSS for a check that runs at start and when the files change, so
`DaemonTLSConfig` runs the very same check (`TLSConfig._load`) in a child
Python process and keeps the result while the files' (inode, size, mtime,
ctime) stay the same. Dates are re-checked against the clock on every use
(`fleet.tls.check_validity`), so messages and decisions are those of
`TLSConfig`, and an expiring certificate is still noticed.

Certificate renewal (daemon.renewal) needs cryptography twice more, and gets
it the same way: `new_key_and_csr` makes the new key and its CSR in a child,
and `check_bundle` checks what the manager returned (the very checks of
`TLSConfig`) in a child before it replaces the files.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.errors import ConfigError, FleetError
from fleet.identity import Identity
from fleet.tls import TLSConfig, TLSFileError, _Loaded, check_validity

__all__ = ["DaemonTLSConfig", "check_bundle", "new_key_and_csr"]

_Stamp = tuple[tuple[int, ...], ...]

# What the child runs: take the request on stdin, answer one JSON object on stdout.
_CHILD = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
    "import daemon.tlsfiles as m; m._child()"
)
_TIMEOUT = 60.0

_cache: dict[TLSConfig, tuple[_Stamp, _Loaded]] = {}
_lock = threading.Lock()  # gRPC's handshake threads and the event loop both load


@dataclass(frozen=True)
class DaemonTLSConfig(TLSConfig):
    """A `TLSConfig` whose files are checked out of process (see the module doc)."""

    auto_renew: bool = True
    """Renew the certificate over the manager link at two thirds of its lifetime
    (daemon.renewal; needs a manager that issues certificates)."""

    def _load(self, *, now: dt.datetime | None) -> _Loaded:
        now = now or dt.datetime.now(dt.UTC)
        with _lock:
            stamp = _stamp(self)
            cached = _cache.get(self)
            if cached is not None and cached[0] == stamp:
                check_validity(cached[1].validity, now)
                return cached[1]
            loaded = _check_in_child(self, now)
            _cache[self] = (stamp, loaded)
            return loaded


def _stamp(cfg: TLSConfig) -> _Stamp:
    stamps: list[tuple[int, ...]] = []
    for path in (cfg.ca_file, cfg.cert_file, cfg.key_file):
        try:
            st = os.stat(path)
        except OSError:
            stamps.append((-1,))
        else:
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(stamps)


def _check_in_child(cfg: TLSConfig, now: dt.datetime) -> _Loaded:
    answer = _run_child(
        {"op": "files", "files": _files(cfg), "now": now.isoformat()}, "check the TLS files"
    )
    return _loaded(answer)


def check_bundle(
    cfg: TLSConfig, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *, now: dt.datetime
) -> _Loaded:
    """`TLSConfig`'s checks on contents meant for `cfg`'s files, in a child process.

    ConfigError naming the file and the problem, as if the contents were in
    the files; FleetError if the child cannot run.
    """
    request = {
        "op": "bundle",
        "files": _files(cfg),
        "now": now.isoformat(),
        "pems": [base64.b64encode(p).decode() for p in (ca_pem, cert_pem, key_pem)],
    }
    return _loaded(_run_child(request, "check the new certificate"))


def new_key_and_csr(identity: Identity) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a CSR for `identity` (`fleet.enroll.make_csr`), made in a child.

    Returns (key PEM, CSR PEM); the key reaches this process through a pipe only.
    """
    answer = _run_child({"op": "csr", "identity": identity.uri}, "make a new key")
    return base64.b64decode(answer["key_pem"]), base64.b64decode(answer["csr_pem"])


def _files(cfg: TLSConfig) -> list[str]:
    return [str(cfg.ca_file), str(cfg.cert_file), str(cfg.key_file)]


def _run_child(request: dict[str, Any], what: str) -> dict[str, Any]:
    """Run `_child` on `request`; its answer, or ConfigError for an "error" answer."""
    path = json.dumps([p for p in sys.path if p])
    try:
        done = subprocess.run(  # noqa: S603  # our own interpreter and code, no shell
            [sys.executable, "-c", _CHILD, path],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise FleetError(f"could not {what} in a child process: {exc}") from None
    try:
        answer: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        why = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise FleetError(
            f"could not {what} in a child process (exit {done.returncode}): {why}"
        ) from None
    if "file_error" in answer:  # which file, so the caller can name its config key
        what, path, problem = answer["file_error"]
        raise TLSFileError(what, Path(path), problem)
    if "error" in answer:
        raise ConfigError(answer["error"])
    return answer


def _loaded(answer: dict[str, Any]) -> _Loaded:
    return _Loaded(
        ca_pem=base64.b64decode(answer["ca_pem"]),
        cert_pem=base64.b64decode(answer["cert_pem"]),
        key_pem=base64.b64decode(answer["key_pem"]),
        identity=Identity.from_uri(answer["identity"]),
        validity=tuple(
            (Path(p), what, dt.datetime.fromisoformat(nb), dt.datetime.fromisoformat(na))
            for p, what, nb, na in answer["validity"]
        ),
    )


def _child() -> None:
    """The child's side: one operation on the request read from stdin, the answer as JSON."""
    request = json.load(sys.stdin)
    op = request.get("op", "files")
    if op == "csr":
        from fleet.enroll import make_csr

        key_pem, csr_pem = make_csr(Identity.from_uri(request["identity"]))
        answer: dict[str, Any] = {
            "key_pem": base64.b64encode(key_pem).decode(),
            "csr_pem": base64.b64encode(csr_pem).decode(),
        }
        json.dump(answer, sys.stdout)
        return
    cfg = TLSConfig(*(Path(p) for p in request["files"]))
    now = dt.datetime.fromisoformat(request["now"])
    try:
        if op == "bundle":
            ca_pem, cert_pem, key_pem = (base64.b64decode(p) for p in request["pems"])
            loaded = cfg._check(ca_pem, cert_pem, key_pem, now=now)
        else:
            loaded = cfg._load(now=now)
    except TLSFileError as exc:
        answer = {"error": exc.message, "file_error": [exc.what, str(exc.path), exc.problem]}
    except ConfigError as exc:
        answer = {"error": exc.message}
    else:
        answer = {
            "ca_pem": base64.b64encode(loaded.ca_pem).decode(),
            "cert_pem": base64.b64encode(loaded.cert_pem).decode(),
            "key_pem": base64.b64encode(loaded.key_pem).decode(),
            "identity": loaded.identity.uri,
            "validity": [
                [str(p), what, nb.isoformat(), na.isoformat()]
                for p, what, nb, na in loaded.validity
            ],
        }
    json.dump(answer, sys.stdout)
