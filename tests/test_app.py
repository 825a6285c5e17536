"""`python -m helpers.app` stopped as a terminal or a service manager stops it: nothing it started keeps running."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
ROOT = Path(__file__).resolve().parent.parent

# A stand-in for Voila: it starts a "kernel" in a session of its own, as jupyter_client does.
SERVER = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    kernel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    def stop(sig, frame):
        kernel.terminate()
        kernel.wait()
        open(sys.argv[2], "w").write(str(sig))
        sys.exit(0)
    if sys.argv[3] == "polite":
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    else:  # deaf to both: it and its kernel must be killed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    open(sys.argv[1], "w").write(f"{os.getpid()} {kernel.pid}")
    while True:
        time.sleep(0.1)
""")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("server", ["polite", "deaf"])
def test_a_signal_stops_the_server_and_what_it_started(tmp_path, sig, server):
    pids, stopped = tmp_path / "pids", tmp_path / "stopped"
    outer = subprocess.Popen([sys.executable, "-c", (
        "import sys; from helpers import app; app.GRACE_S = 1; "
        f"sys.exit(app.serve([sys.executable, '-c', {SERVER!r}, {str(pids)!r}, {str(stopped)!r}, {server!r}]))")],
        cwd=ROOT)
    started = []
    try:
        started = list(map(int, wait_for(pids).split()))
        outer.send_signal(sig)
        code = outer.wait(timeout=30)
        left = [pid for pid in started if not gone(pid)]
    finally:
        for p in [outer.pid, *started]:  # whatever happened, leave nothing behind
            if not gone(p):
                os.kill(p, signal.SIGKILL)
    if server == "polite":
        assert code == 0 and stopped.read_text() == str(int(sig))  # forwarded, and waited for
    else:
        assert code == 128 + signal.SIGKILL and not stopped.exists()
    assert not left, "still running after helpers.app ended: the server or its kernel"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_stops_voila_and_its_kernel(tmp_path):
    pytest.importorskip("voila")
    port = free_port()
    log, started = open(tmp_path / "voila.log", "w"), []
    outer = subprocess.Popen([sys.executable, "-m", "helpers.app", f"--port={port}", "--no-browser"], cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and outer.poll() is None, (tmp_path / "voila.log").read_text()
                time.sleep(0.5)
        try:  # the page starts a kernel (which may fail to find CIFAR-10 here: it still runs)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=120).read()
        except OSError:
            pass
        started = psutil.Process(outer.pid).children(recursive=True)
        assert any("ipykernel" in " ".join(p.cmdline()) for p in started), [p.cmdline() for p in started]
        outer.send_signal(signal.SIGTERM)
        outer.wait(timeout=60)
        left = [p.cmdline() for p in started if not gone(p.pid)]
    finally:
        for p in [psutil.Process(outer.pid), *started] if outer.poll() is None else started:
            if not gone(p.pid):
                p.kill()  # whatever happened, leave nothing behind
        log.close()
    assert outer.returncode == 0, (tmp_path / "voila.log").read_text()[-3000:]
    assert not left, f"still running after helpers.app ended: {left}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_of_the_app_stops_the_server_and_what_it_started(tmp_path):
    pids, stopped = tmp_path / "pids", tmp_path / "stopped"
    outer = subprocess.Popen([sys.executable, "-c", (
        "import sys; from helpers import app; "
        f"sys.exit(app.serve([sys.executable, '-c', {SERVER!r}, {str(pids)!r}, {str(stopped)!r}, 'polite']))")],
        cwd=ROOT)
    started = []
    try:
        started = list(map(int, wait_for(pids).split()))
        outer.kill()  # SIGKILL: the app runs no code of its own any more
        outer.wait(timeout=30)
        assert wait_for(stopped) == str(int(signal.SIGTERM))  # the server was told, and stopped its kernel
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in started if not gone(pid)]
    finally:
        for p in started:  # whatever happened, leave nothing behind
            if not gone(p):
                os.kill(p, signal.SIGKILL)
    assert not left, "still running after helpers.app was killed: the server or its kernel"


def test_help_is_the_apps_own_and_other_options_go_to_voila(capsys):
    from helpers import app

    with pytest.raises(SystemExit) as e:
        app.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python -m helpers.app") and "NOTEBOOK_FILENAME" not in out
    assert "--port=8867" in out and "--no-browser" in out
    assert app.parser().parse_known_args(["--port=8867", "--no-browser", "--help-all"])[1] == [
        "--port=8867", "--no-browser", "--help-all"]
    run = subprocess.run([sys.executable, "-m", "helpers.app", "-h"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("usage: python -m helpers.app") and not run.stderr
