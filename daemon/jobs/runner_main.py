"""The wrapper each job step runs under: ``python -I -S runner_main.py FD TAG KEEP IDS -- ARGV``.

Why a wrapper: after a daemon restart the step's process is no longer the
daemon's child, so its exit status cannot be waited for. This wrapper is
the step's parent, so it always can; it writes the status as one JSON line
to file descriptor FD (opened by the daemon on ``<jobdir>/step-<n>.status``),
then SIGKILLs its own process group, so nothing the step left behind
outlives it or writes after the end.

It runs as the daemon's user and starts the step as IDS (``uid:gid:groups``,
or "-" for the daemon's own): so the daemon's interpreter need not be
executable by the step's user.

It leads the step's session and process group (the daemon spawns it with
start_new_session), ignores SIGTERM/SIGINT/SIGHUP with a handler (not
SIG_IGN, which the step would inherit) so a stop of the group reaches the
step while the wrapper lives to record how it ended. Only a SIGKILL of the
group ends the wrapper without a status; the daemon that sent it knows.

Standard library only, and run with -I -S: it starts in ~15 ms and never
imports Fleet (the step may run as a user who cannot read the daemon's venv).
TAG only names the step in `ps` output, for re-adoption after a crash.
KEEP is "-" or a descriptor handed on to the step (a script the step's user
could not open by path: the interpreter reads ``/dev/fd/KEEP``).
"""

import json
import os
import signal
import subprocess
import sys


def _ignore(signum: int, frame: object) -> None:  # a handler, so exec resets it
    pass


def _write(fd: int, body: dict[str, object]) -> None:
    data = (json.dumps(body) + "\n").encode()
    os.write(fd, data)
    os.fsync(fd)


def main() -> None:
    fd = int(sys.argv[1])
    keep: tuple[int, ...] = () if sys.argv[3] == "-" else (int(sys.argv[3]),)
    user = group = groups = None
    if sys.argv[4] != "-":
        uid, gid, extra = sys.argv[4].split(":")
        user, group, groups = int(uid), int(gid), [int(g) for g in extra.split(",") if g]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    os.set_inheritable(fd, False)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _ignore)
    try:
        child = subprocess.Popen(  # noqa: S603  # the job's argv, never a shell
            argv,
            stdin=subprocess.DEVNULL,
            close_fds=True,
            pass_fds=keep,
            user=user,
            group=group,
            extra_groups=groups,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        message = f"cannot start {argv[0]!r}: {getattr(exc, 'strerror', None) or exc}"
        sys.stderr.write(f"fleet: {message}\n")
        sys.stderr.flush()
        _write(fd, {"error": message, "exit_code": 127})
        return
    code = child.wait()  # retried across our handled signals (PEP 475)
    _write(fd, {"exit_code": code})


if __name__ == "__main__":
    main()
    os.killpg(0, signal.SIGKILL)  # the step's leftovers end with it (and so do we)
