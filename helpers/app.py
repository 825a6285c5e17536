"""The explorer as a web page: `python -m helpers.app` serves app/explorer.ipynb with Voila on this machine.

Extra arguments go to Voila, e.g. `python -m helpers.app --port=8867 --no-browser`. Needs the repository
checkout (the page lives in app/) and Voila (`pip install -e ".[test]"`, or `pip install voila`).

Voila leads a process group of its own (setsid), so that one signal reaches it and its kernels
together. On Linux it is also told to stop when the process that started it dies, however it dies
(kill -9 included): nothing is left serving. Its kernels stop with it (Jupyter kernels watch the server
that started them).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "app" / "explorer.ipynb"
TEMPLATE = "offline"  # app/voila/templates/offline: Voila's lab template without its CDN stylesheets
GRACE_S = 20.0
"""How long the server has to stop, kernels included, after a forwarded signal before it is killed."""

_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# Run before the server's own program (exec'd in its place): PR_SET_PDEATHSIG asks Linux to send SIGTERM
# when the starting thread's process dies; a parent already gone by then is caught by the pid check.
_GUARD = ("import ctypes, os, signal, sys\n"
          "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
          "if os.getppid() != int(sys.argv[1]): sys.exit(128 + signal.SIGTERM)\n"
          "os.execvp(sys.argv[2], sys.argv[2:])\n")


def guarded(args: list[str]) -> list[str]:
    """`args` run so that the process ends (SIGTERM) when this one dies, even by SIGKILL; as they are
    where the system has no such signal (not Linux).

    Returns:
        the command line to start instead of `args`.
    """
    if not sys.platform.startswith("linux"):
        return list(args)
    return [sys.executable, "-c", _GUARD, str(os.getpid()), *args]


def command(extra: list[str] = ()) -> tuple[list[str], dict]:
    """The Voila command line and environment that serve the page.

    Returns:
        (argv, env) for subprocess.
    """
    if not PAGE.exists():
        raise FileNotFoundError(f"{PAGE} is missing: run this from a checkout of the repository")
    env = dict(os.environ)
    # Voila finds templates in the Jupyter data directories; JUPYTER_PATH adds app/ to them.
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(ROOT / "app"), env.get("JUPYTER_PATH", "")) if p)
    args = [sys.executable, "-m", "voila", str(PAGE), f"--template={TEMPLATE}", "--Voila.ip=127.0.0.1",
            "--VoilaConfiguration.file_allowlist=[]",
            "--VoilaConfiguration.show_tracebacks=True",  # a missing dataset says what to do, on the page
            *extra]
    return args, env


def _below(pid: int) -> list:
    """The processes `pid` started, at any depth (psutil: ipykernel's dependency, so present with Voila)."""
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # no psutil, or the process is gone already
        return []


def _kill(processes: list, group: int | None = None) -> None:
    for p in processes:
        try:
            p.kill()
        except Exception:
            pass
    try:
        if group is not None:
            os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def serve(args: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> int:
    """Run a server in a process group of its own; SIGTERM, SIGINT and SIGHUP are forwarded to it.

    After a forwarded signal the server and what it started (Voila's kernels run in process groups of their own)
    have GRACE_S seconds to stop; then whatever is left is killed.

    Returns:
        the server's exit status; 128 + n when signal n ended it.
    """
    child = subprocess.Popen(guarded(args), env=env, cwd=cwd, start_new_session=True)
    signalled: list[float] = []
    below: list = []

    def forward(sig, frame) -> None:
        signalled.append(time.monotonic())
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    looked = 0.0
    try:
        while True:
            if time.monotonic() - looked > 1 or (signalled and looked < signalled[-1]):
                below, looked = _below(child.pid) or below, time.monotonic()  # known before they lose their parent
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if signalled and time.monotonic() > signalled[0] + GRACE_S:
                    _kill(_below(child.pid), child.pid)
    finally:
        if child.poll() is None:  # leaving on an error of our own: take the server down with us
            _kill(_below(child.pid), child.pid)
            child.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if below:  # what the server started and left behind
        import psutil

        end = (signalled[0] if signalled else time.monotonic()) + GRACE_S
        _kill(psutil.wait_procs(below, timeout=max(0.0, end - time.monotonic()))[1])
    return 128 - code if code < 0 else code


@contextmanager
def running(env_update: dict | None = None, log=None, wait_s: float = 60.0):
    """The explorer served in the background on a free localhost port, for the length of a `with` block.

    Args:
        env_update: environment variables for the server on top of `command`'s (a value of None removes one).
        log: an open file for the server's output (discarded when None).
        wait_s: how long Voila may take to answer.
    Yields:
        the page's URL.
    Raises:
        RuntimeError: Voila exited, or did not answer within wait_s.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args, env = command([f"--port={port}", "--no-browser"])
    for key, value in (env_update or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    out = log if log is not None else subprocess.DEVNULL
    server = subprocess.Popen(guarded(args), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("Voila exited before it served the page") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Voila did not answer on port {port} within {wait_s:.0f} s") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:  # Voila and its kernel, by process group; what outstays GRACE_S is killed
        below = _below(server.pid)
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=GRACE_S)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            _kill(below, server.pid)
            server.wait()


def parser() -> argparse.ArgumentParser:
    """The command line's own options (only --help); everything else is passed on to Voila."""
    return argparse.ArgumentParser(
        prog="python -m helpers.app", allow_abbrev=False,
        description="Serve the MSD-Net explorer (app/explorer.ipynb) as a web page with Voila, on this machine "
                    "only (127.0.0.1), until stopped with Ctrl+C.",
        epilog="Other options are passed on to Voila, e.g. --port=8867 (the port; default 8866) and --no-browser "
               "(do not open a browser); `python -m voila --help-all` lists them all. The page needs CIFAR-10 "
               "as the notebooks do (see the README).")


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.app [voila options]`: serve the explorer until stopped; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    _, extra = parser().parse_known_args(argv)  # --help prints ours and exits; the rest is Voila's
    try:
        import voila  # noqa: F401
    except ImportError:
        print('helpers.app needs Voila: pip install -e ".[test]" (or pip install voila)', file=sys.stderr)
        return 1
    args, env = command(extra)
    return serve(args, env, ROOT)


if __name__ == "__main__":
    sys.exit(main())
