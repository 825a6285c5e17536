"""Drop the progress bars an executed notebook stored, keeping every other output and widget.

A progress bar made with leave=False (helpers' predict and map loops, the notebooks' own loops)
disappears from a live notebook when it finishes, but the .ipynb keeps the text it had when it was
first drawn ("predicting: 0%| | 0/20"), which is all GitHub or nbviewer can show, and the notebook's
metadata keeps the bar's widget state. Run this on a
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


WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
VIEW = "application/vnd.jupyter.widget-view+json"


def _keep_shown_widgets(nb: dict) -> bool:
    """Keep in the metadata only the widget models an output still shows (and the models they use)."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state")
    if state is None:
        return False
    todo = [o["data"][VIEW]["model_id"] for c in nb["cells"] if c["cell_type"] == "code"
            for o in c["outputs"] if VIEW in o.get("data", {})]
    shown: set[str] = set()
    while todo:
        model = todo.pop()
        if model in shown or model not in state:
            continue
        shown.add(model)
        todo += re.findall(r"IPY_MODEL_([0-9a-f]+)", json.dumps(state[model]))
    if shown == set(state):
        return False
    if shown:
        nb["metadata"]["widgets"][WIDGET_STATE]["state"] = {k: v for k, v in state.items() if k in shown}
    else:
        del nb["metadata"]["widgets"]
    return True


def drop(path: Path) -> int:
    """Remove the stored progress bars of one notebook and their widget state (written through a
    temporary file); returns how many outputs were dropped."""
    nb = json.loads(path.read_text())
    dropped = 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        kept = [o for o in cell["outputs"] if not is_progress_bar(o)]
        dropped += len(cell["outputs"]) - len(kept)
        cell["outputs"] = kept
    if _keep_shown_widgets(nb) or dropped:
        tmp = path.with_suffix(".ipynb.tmp")
        tmp.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return dropped


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {drop(Path(name))} progress bars dropped")
