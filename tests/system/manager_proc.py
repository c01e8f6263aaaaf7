"""A real `fleet-manager serve` process for system tests."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Manager:
    """A `fleet-manager serve` process on a SQLite file; restartable on the same port and db."""

    root: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def db(self) -> Path:
        return self.root / "state" / "manager.db"

    def start(self) -> None:
        with open(self.root / "manager.err", "ab") as err:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from manager.cli import main; main()",
                    "serve",
                    "--config",
                    str(self.root / "manager.toml"),
                ],
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []  # schema not there yet
        finally:
            conn.close()
