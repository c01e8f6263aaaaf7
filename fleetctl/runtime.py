"""What every command shares: global options, consoles, and the error boundary.

Exit codes: 0 success; 1 something failed (a target, the manager, a file);
2 the command line is wrong (bad option value, invalid selector, bad config,
a request the manager rejects as INVALID_ARGUMENT); 130 interrupted. Every
error is one line on stderr, ``fleetctl: error: ...``, never a traceback
(set FLEETCTL_DEBUG=1 to see one for a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, TypeVar

import grpc
import typer
from rich.console import Console

from fleet.errors import ConfigError, FleetError
from fleetctl.client import Connection, connect, explain_rpc_error, hinted, resolve_connection
from fleetctl.output import OutputFormat
from fleetctl.settings import FleetctlConfig, load_settings, tls_sources

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "Cli", "GlobalOptions", "UsageProblem"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a killed writer

if TYPE_CHECKING:
    from fleet.v1.fleet_pb2_grpc import FleetServiceAsyncStub

Stub: TypeAlias = "FleetServiceAsyncStub"
T = TypeVar("T")


class UsageProblem(Exception):
    """The command line is wrong (exit 2); the message names the option and the problem."""


class Failure(Exception):
    """Something the operator asked for failed (exit 1); the message says what."""


@dataclass(frozen=True)
class GlobalOptions:
    """The root command's options; None means "not given on the command line"."""

    output: OutputFormat | None = None
    """-o table|wide|json|yaml."""
    manager: str | None = None
    """--manager host:port."""
    ca: Path | None = None
    """--ca."""
    cert: Path | None = None
    """--cert."""
    key: Path | None = None
    """--key."""
    timeout: float | None = None
    """--timeout seconds."""
    config: Path | None = None
    """--config file."""


class Cli:
    """Per-invocation state hung on the Typer context (``ctx.obj``)."""

    def __init__(self, options: GlobalOptions) -> None:
        self.options = options
        self.out = Console(highlight=False)
        # Piped output (grep, awk) must not wrap: one row per line, like kubectl.
        self.screen_width = self.out.width
        if not self.out.is_terminal and "COLUMNS" not in os.environ:
            self.out = Console(highlight=False, width=100_000)
            self.screen_width = 80
        self.err = Console(stderr=True, highlight=False)
        self._config: FleetctlConfig | None = None
        self.sigint: Callable[[], None] | None = None
        """While set, Ctrl-C in `call` runs this instead of interrupting the body
        (`run` asks whether to cancel the job it follows)."""
        self._on_sigint: Callable[[], None] | None = None

    @classmethod
    def of(cls, ctx: typer.Context) -> Cli:
        """The Cli of this invocation (made by the root callback)."""
        obj = ctx.find_root().obj
        if not isinstance(obj, Cli):  # invoked without the root callback (tests of a sub-app)
            obj = ctx.find_root().obj = Cli(GlobalOptions())
        return obj

    def config(self) -> FleetctlConfig:
        """File + env + flags, loaded once (ConfigError if unusable)."""
        if self._config is None:
            self._config = load_settings(self.options.config, self._overrides())
        return self._config

    def _overrides(self) -> dict[str, Any]:
        o = self.options
        return {
            "manager": o.manager,
            "ca": o.ca,
            "cert": o.cert,
            "key": o.key,
            "timeout": o.timeout,
        }

    @property
    def fmt(self) -> OutputFormat:
        """The -o format: the flag, else the config's default."""
        if self.options.output is not None:
            return self.options.output
        return OutputFormat(self.config().output)

    def note(self, message: str, *, style: str = "") -> None:
        """One line on stderr, after whatever stdout holds (so the two never interleave)."""
        with contextlib.suppress(OSError, ValueError):
            self.out.file.flush()
        self.err.print(message, markup=False, soft_wrap=True, style=style)

    def warn(self, message: str) -> None:
        """One warning line on stderr."""
        self.note(f"fleetctl: {message}", style="yellow")

    def fail(self, message: str, code: int) -> NoReturn:
        """Print one error line and exit with `code`."""
        self.note(f"fleetctl: error: {message}", style="red")
        raise typer.Exit(code)

    @contextlib.contextmanager
    def ctrl_c_raises(self) -> Iterator[None]:
        """Inside `call`'s body: Ctrl-C raises KeyboardInterrupt for a while.

        For a blocking prompt: the loop's handler would only note the signal
        until the prompt returned.
        """
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)  # restores default_int_handler
        try:
            yield
        finally:
            if self._on_sigint is not None:
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.add_signal_handler(signal.SIGINT, self._on_sigint)

    def confirm(self, question: str, *, aborted: str) -> None:
        """Ask `question` (y/N) on stderr; unless the answer is yes, exit 1 with `aborted`.

        Ctrl-C or the end of input (Ctrl-D) is a no. Inside `call`'s body the loop's
        SIGINT handler is lifted meanwhile: otherwise Ctrl-C only re-asked.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        try:
            with self.ctrl_c_raises() if loop is not None else contextlib.nullcontext():
                yes = typer.confirm(question, default=False, err=True)
        except (typer.Abort, KeyboardInterrupt, EOFError):
            self.note("")  # the prompt's line stays open after ^C / ^D
            yes = False
        if not yes:
            self.fail(aborted, EXIT_FAILED)

    def checked(self, check: Callable[[], T]) -> T:
        """`check()`'s result; a UsageProblem it raises exits 2 with its one line."""
        try:
            return check()
        except UsageProblem as exc:
            self.fail(str(exc), EXIT_USAGE)

    def execute(self, body: Callable[[], int]) -> NoReturn:
        """Run a local command body, mapping every error to one line and an exit code."""
        try:
            code = body()
        except typer.Exit:
            raise
        except UsageProblem as exc:
            self.fail(str(exc), EXIT_USAGE)
        except ConfigError as exc:
            self.fail(exc.message, EXIT_USAGE)
        except Failure as exc:
            self.fail(str(exc), EXIT_FAILED)
        except FleetError as exc:
            self.fail(hinted(exc), EXIT_USAGE if _is_usage(exc.code) else EXIT_FAILED)
        except KeyboardInterrupt:
            self.fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as a SIGPIPE would,
            # and keep the interpreter's final flush from complaining.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except Exception as exc:
            if os.environ.get("FLEETCTL_DEBUG"):
                traceback.print_exc()
            self.fail(
                f"internal error ({type(exc).__name__}: {exc}); this is a bug in fleetctl,"
                " rerun with FLEETCTL_DEBUG=1 for the traceback and report it",
                EXIT_FAILED,
            )
        raise typer.Exit(code)

    def call(
        self,
        body: Callable[[Stub, Connection], Awaitable[int]],
        *,
        on_interrupt: str | None = "interrupted",
    ) -> NoReturn:
        """Connect to the manager, run `body` with a stub, map errors, exit.

        Ctrl-C exits 130 with `on_interrupt` as the error line (None: silently,
        for followed streams, where Ctrl-C is the normal way out).
        """

        def run() -> int:
            config = self.config()
            conn = resolve_connection(config, tls_sources(self.options.config, self._overrides()))
            self.fmt  # noqa: B018  # a bad FLEET_OUTPUT fails before the call, not after
            interrupted: list[bool] = []

            async def main() -> int:
                loop = asyncio.get_running_loop()
                task = asyncio.current_task()
                assert task is not None

                def on_sigint() -> None:
                    if self.sigint is not None:
                        self.sigint()
                        return
                    interrupted.append(True)
                    task.cancel()

                self._on_sigint = on_sigint

                # Our own handler: cancelling the call can surface as an RpcError
                # ("Cancelling all calls") that must not read as a manager failure.
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.add_signal_handler(signal.SIGINT, on_sigint)
                try:
                    async with connect(conn) as stub:
                        return await body(stub, conn)
                except (asyncio.CancelledError, grpc.RpcError):
                    if interrupted:
                        return EXIT_INTERRUPTED
                    raise
                finally:
                    with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                        loop.remove_signal_handler(signal.SIGINT)

            try:
                code = asyncio.run(main())
            except grpc.RpcError as exc:
                usage = _is_usage(exc.code())
                self.fail(explain_rpc_error(exc, conn), EXIT_USAGE if usage else EXIT_FAILED)
            if interrupted:
                if on_interrupt:
                    self.fail(on_interrupt, EXIT_INTERRUPTED)
                raise typer.Exit(EXIT_INTERRUPTED)
            return code

        self.execute(run)


def _is_usage(code: Any) -> bool:
    return bool(code == grpc.StatusCode.INVALID_ARGUMENT)


def stdin_is_interactive() -> bool:
    """True when a person can answer a prompt (stdin is a terminal)."""
    try:
        return bool(sys.stdin.isatty())
    except (AttributeError, ValueError):
        return False
