"""Helpers for the console's browser tests: `fleetctl ui` as a child, Chromium, page errors.

The console is what an operator runs: `fleetctl ui` as its own process,
talking to a real manager over the operator's mTLS connection. The browser
is Debian's Chromium (`make test-tools` installs it) driven by Playwright's sync
API; Playwright's own browser download is never used.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, WebError

from fleet.tls import TLSConfig

REPO = Path(__file__).resolve().parents[2]

CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium, the only browser the tests drive (`make test-tools` installs it)."""

CHROMIUM_ARGS = (
    # The machine has no GPU and no network beyond loopback: without these,
    # Chromium tries a GPU process and keeps dialling Google's services
    # (update, sync, QUIC probes), each attempt refused or timing out.
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
"""Flags for every launch, on top of Playwright's headless defaults."""

NODES = {
    "node-1": ({"env": "prod", "zone": "a"}, ("web", "worker")),
    "node-2": ({"env": "staging", "zone": "b"}, ("web", "probe")),
}
"""The `fleet` fixture's daemons: node -> (labels, agents), each agent a `sleep`."""

ARTIFACTS = REPO / "test-artifacts" / "console"
"""Where `shot` writes screenshots (git-ignored; CI keeps them as artifacts)."""

URL_LINE = re.compile(r"Fleet console: (?P<url>http://\S+/login\?secret=\S+)")
"""The one line `fleetctl ui` prints on stdout when it is ready."""

FLEETCTL = (sys.executable, "-c", "import sys; from fleetctl.app import main; sys.exit(main())")
"""The command line of `fleetctl` in this interpreter (the venv's, without its script shim)."""

CONSOLE_START_SECONDS = 30.0
"""How long `fleetctl ui` may take to print its URL (it imports grpc on a busy machine)."""


def on_ci() -> bool:
    """True under CI (CI=true), where a missing prerequisite fails instead of skipping."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_chromium() -> Path:
    """Debian's Chromium; skip the test without it (fail under CI) naming the fix."""
    if os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = (
        f"{CHROMIUM} is not installed: run `make test-tools` (apt-get install chromium, as root)"
    )
    if on_ci():
        pytest.fail(f"the browser tests need Chromium under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def write_fleetctl_config(path: Path, manager: str, operator: TLSConfig) -> Path:
    """A fleetctl.toml naming `manager` (host:port) and the operator's certificate files."""
    path.write_text(
        f'manager = "{manager}"\n'
        f'ca = "{operator.ca_file}"\n'
        f'cert = "{operator.cert_file}"\n'
        f'key = "{operator.key_file}"\n'
    )
    return path


@dataclass(frozen=True)
class Fleetctl:
    """`fleetctl` as the operator runs it: a process reading a config file."""

    config: Path
    """The fleetctl.toml (manager address, operator certificate)."""
    home: Path
    """Its XDG_CONFIG_HOME, so nothing of the user's is read."""

    def __call__(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run `fleetctl --config CONFIG ARGS`; its exit code, stdout and stderr."""
        return subprocess.run(
            [*FLEETCTL, "--config", str(self.config), *args],
            env=fleetctl_env(self.home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def json(self, *args: str) -> Any:
        """`fleetctl -o json ARGS`, which must exit 0; its answer."""
        result = self("-o", "json", *args)
        assert result.returncode == 0, f"fleetctl {' '.join(args)}: {result.stderr}"
        return json.loads(result.stdout)


# --- fleetctl ui ---------------------------------------------------------------


@dataclass
class Console:
    """A running `fleetctl ui` and the login URL it printed."""

    process: subprocess.Popen[bytes]
    """The child; stopped by its pid (`stop`)."""
    login_url: str
    """http://127.0.0.1:PORT/login?secret=...; works once."""
    stderr_path: Path
    """The child's stderr, for failure messages."""
    stdout_lines: queue.Queue[bytes]
    """What the child printed after the URL line (b"" marks its end)."""

    @property
    def origin(self) -> str:
        """scheme://host:port of the console, as a browser sends it in `Origin`."""
        parts = urlsplit(self.login_url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def port(self) -> int:
        """The port `fleetctl ui` listens on."""
        port = urlsplit(self.login_url).port
        assert port is not None, self.login_url
        return port

    def url(self, route: str = "") -> str:
        """The console URL of a hash route: url("#/nodes") -> http://127.0.0.1:P/#/nodes."""
        return f"{self.origin}/{route}"

    def stderr(self) -> str:
        """Everything the child wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM by pid, then SIGKILL after `grace` seconds; the exit code.

        Raises AssertionError when it had to be killed: a console that ignores
        SIGTERM is a defect the operator would notice at Ctrl-C.
        """
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"fleetctl ui (pid {self.process.pid}) ignored SIGTERM for {grace:.0f} s;"
                f" killed. stderr:\n{self.stderr()}"
            ) from None


def fleetctl_env(home: Path) -> dict[str, str]:
    """The environment of a fleetctl child: ours without FLEET_*/FLEETCTL_*, its own XDG home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "FLEETCTL_"))}
    env.update(PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(home))
    return env


def start_console(
    config: Path, workdir: Path, *args: str, timeout: float = CONSOLE_START_SECONDS
) -> Console:
    """Start `fleetctl --config CONFIG ui --no-browser --listen 127.0.0.1:0 ARGS`.

    Returns once it printed its URL line; fails the test with the child's
    stderr if it exits first or stays silent for `timeout` seconds.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stderr_path = workdir / "fleetctl-ui.err"
    argv = [*FLEETCTL, "--config", str(config), "ui", "--no-browser", "--listen", "127.0.0.1:0"]
    argv += args
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(
            argv,
            cwd=workdir,
            env=fleetctl_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            # Its own session: a Ctrl-C at the terminal reaches pytest only,
            # and the fixture stops the child by its pid.
            start_new_session=True,
        )
    lines = _pump(process)
    try:
        first = lines.get(timeout=timeout)
    except queue.Empty:
        first = None
    text = (first or b"").decode(errors="replace").strip()
    match = URL_LINE.fullmatch(text)
    if match is None:
        console = Console(process, "", stderr_path, lines)
        try:
            console.stop(grace=5.0)
        finally:
            if first is None:
                what = f"printed nothing within {timeout:.0f} s"
            elif not first:
                what = f"exited with {process.returncode} before printing its URL"
            else:
                what = f"printed {text!r} instead of 'Fleet console: URL'"
            pytest.fail(f"fleetctl ui {what}; stderr:\n{console.stderr()}", pytrace=False)
    return Console(process, match["url"], stderr_path, lines)


def _pump(process: subprocess.Popen[bytes]) -> queue.Queue[bytes]:
    """Read the child's stdout on a thread into a queue, b"" at its end.

    Draining it all keeps a chatty child from blocking on a full pipe.
    """
    lines: queue.Queue[bytes] = queue.Queue()
    assert process.stdout is not None
    stdout = process.stdout

    def pump() -> None:
        with stdout:
            for line in stdout:
                lines.put(line)
        lines.put(b"")

    threading.Thread(target=pump, name=f"fleetctl-ui-{process.pid}", daemon=True).start()
    return lines


@contextmanager
def running_console(config: Path, workdir: Path, *args: str) -> Iterator[Console]:
    """`start_console`, stopped by its pid afterwards."""
    console = start_console(config, workdir, *args)
    try:
        yield console
    finally:
        console.stop()


# --- the browser -----------------------------------------------------------------

CONTEXT_OPTIONS: dict[str, Any] = {
    # The same pixels on every machine: screenshots stay comparable.
    "viewport": {"width": 1280, "height": 800},
    "device_scale_factor": 1,
    "locale": "en-US",
    "timezone_id": "UTC",
    "color_scheme": "light",
    "reduced_motion": "reduce",
}
"""Options of every browser context the tests open."""


@dataclass
class PageErrors:
    """What went wrong in a browser context: console errors and uncaught exceptions."""

    seen: list[str] = field(default_factory=list)
    """One line each, in the order they happened."""

    def watch(self, context: BrowserContext) -> None:
        """Record the errors of every page `context` opens from now on."""
        context.on("console", self._on_console)
        context.on("weberror", self._on_weberror)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            where = message.location
            self.seen.append(
                f"console.error ({where.get('url')}:{where.get('lineNumber')}): {message.text}"
            )

    def _on_weberror(self, error: WebError) -> None:
        self.seen.append(f"uncaught {error.error.name}: {error.error.message}")

    def check(self) -> None:
        """Raise AssertionError listing every error seen, if any."""
        if self.seen:
            listing = "\n".join(f"  {line}" for line in self.seen)
            raise AssertionError(f"the page reported {len(self.seen)} error(s):\n{listing}")


@contextmanager
def watched_page(browser: Browser, **options: Any) -> Iterator[Page]:
    """A page in a new context (`options` on top of CONTEXT_OPTIONS).

    On exit the context is closed, then AssertionError lists every console
    error and uncaught exception its pages reported.
    """
    errors = PageErrors()
    context = browser.new_context(**{**CONTEXT_OPTIONS, **options})
    errors.watch(context)
    try:
        yield context.new_page()
    finally:
        # Closing dispatches the events still in flight, so check after it.
        context.close()
        errors.check()


def shot(page: Page, name: str) -> Path:
    """Save a full-page PNG of `page` as test-artifacts/console/<name>.png; its path."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ValueError(f"screenshot name {name!r}: use lowercase letters, digits, '.', '_', '-'")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    # From the top: scrolled, the sticky header would be drawn across the middle of the page.
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=path, full_page=True)
    return path


def page_selector(name: str, *, ready: bool = True) -> str:
    """The CSS selector of console page `name`'s root, once its first data is shown."""
    return f'[data-page="{name}"]' + ('[data-ready="true"]' if ready else "")


def open_page(page: Page, route: str, name: str, *, timeout_ms: float = 15_000) -> None:
    """Go to console route `route` ("#/nodes") and wait until page `name` shows its data.

    Fails if the page then shows an error (an element with role="alert").
    """
    page.goto(f"/{route}")
    page.wait_for_selector(page_selector(name), timeout=timeout_ms)
    alerts = page.get_by_role("alert").all_inner_texts()
    assert not alerts, f"page {name!r} ({route}) shows errors: {alerts}"


def session_cookie(storage_state: dict[str, Any]) -> tuple[str, str]:
    """The console's session cookie (name, value) from a logged-in context's storage state."""
    cookies = [c for c in storage_state["cookies"] if c["name"].startswith("fleet_console_")]
    assert len(cookies) == 1, f"expected one console cookie, got {storage_state['cookies']}"
    return cookies[0]["name"], cookies[0]["value"]
