"""Drop the progress bars an executed notebook stored, keeping every other output.

A progress bar made with leave=False (helpers' predict and map loops, the notebooks' own loops)
disappears from a live notebook when it finishes, but the .ipynb keeps the text it had when it was
first drawn ("predicting: 0%| | 0/20"), which is all GitHub or nbviewer can show. Run this on a
notebook after executing it, before committing it:

    python tools/drop_progress_bars.py notebooks/*.ipynb
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

# tqdm's text: "<desc>: <pct>%|<bar>| <n>/<total> [<elapsed>..."
PROGRESS = re.compile(r"^[^\n]*:\s+\d+%\|[^|]*\|\s*\d+/\d+\s*\[")


def is_progress_bar(output: dict) -> bool:
    data = output.get("data", {})
    text = "".join(data.get("text/plain", ""))
    return "application/vnd.jupyter.widget-view+json" in data and bool(PROGRESS.match(text))


def drop(path: Path) -> int:
    """Remove the stored progress bars of one notebook (written through a temporary file); returns how many."""
    nb = json.loads(path.read_text())
    dropped = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        kept = [o for o in cell["outputs"] if not is_progress_bar(o)]
        dropped += len(cell["outputs"]) - len(kept)
        cell["outputs"] = kept
    if dropped:
        tmp = path.with_suffix(".ipynb.tmp")
        tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return dropped


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {drop(Path(name))} progress bars dropped")
