"""The explorer as a web page: `python -m helpers.app` serves app/explorer.ipynb with Voila (code hidden,
no notebook around it), on this machine only, with a template that fetches nothing from the internet.

Extra arguments go to Voila, e.g. `python -m helpers.app --port=8867 --no-browser`. Needs the repository
checkout (the page lives in app/) and `pip install -e ".[test]"` (or just `pip install voila`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "app" / "explorer.ipynb"
TEMPLATE = "offline"  # app/voila/templates/offline: Voila's lab template less its CDN stylesheets


def command(extra: list[str] = ()) -> tuple[list[str], dict]:
    """The Voila command line and environment that serve the page (the test starts it the same way)."""
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


def main(argv: list[str] | None = None) -> int:
    try:
        import voila  # noqa: F401
    except ImportError:
        print('helpers.app needs Voila: pip install -e ".[test]" (or pip install voila)', file=sys.stderr)
        return 1
    args, env = command(sys.argv[1:] if argv is None else argv)
    return subprocess.call(args, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
