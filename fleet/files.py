"""Writing files so readers never see half of one (no crypto library needed).

Lives apart from `fleet.pki` so the daemon, which keeps cryptography out of
its long-lived process, can replace its certificate files with it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_file_atomic"]


def write_file_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write `data` to `path` with `mode` so readers see the old or the new file, never half.

    The temporary file is created with `mode` from the start, so a private key
    is never readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
