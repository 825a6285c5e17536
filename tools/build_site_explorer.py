"""The data of the site's static explorer (docs/explorer.md), computed once from the shipped checkpoint.

    CIFAR10_SOURCE=/path/to/cifar10 python tools/build_site_explorer.py

For a fixed, seeded selection of test images (100 per class: up to 4 of each difficulty k/10, the rest
drawn at random from the class) it writes docs/_static/explorer/data.js: the images (PNGs of 100), every
exit's prediction and confidence, and every exit's Grad-CAM and Grad-CAM++ map (8x8, each scaled to
its own range, uint8) for its own prediction and, where the exit is wrong, for the true class (where it
is right the two are the same map). The page upsamples a map bilinearly to 32x32 and rescales it to
[0, 1], as gradcam.normalize does. Written under a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import atomic, data, evaluate, gradcam, msdnet  # noqa: E402  (the checkout's helpers, installed or not)
from helpers.cache import fingerprint  # noqa: E402

OUT = ROOT / "docs" / "_static" / "explorer" / "data.js"
METHODS = ("gradcam", "gradcam++")
PREFIX = "window.EXPLORER_DATA = "
IMAGES_PER_PNG = 100


def choose(preds: evaluate.Predictions, per_class: int = 100, per_difficulty: int = 4, seed: int = 0) -> torch.Tensor:
    """The test images the page shows, in the order its Image slider walks them.

    Args:
        preds: every exit's predictions for the test split, labels [N].
        per_class: images per class. per_difficulty: at most this many of each difficulty k/10 per class,
            drawn first; the rest of the class's share is drawn from its remaining images.
        seed: the one seed of every draw.
    Returns:
        int64 [classes * per_class] indices into the split, shuffled (seeded).
    """
    g = torch.Generator().manual_seed(seed)
    difficulty, chosen = evaluate.difficulty(preds), []
    for c in range(preds.logits.shape[-1]):
        members = torch.nonzero(preds.labels == c)[:, 0]
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} test images, fewer than --per-class {per_class}")
        members = members[torch.randperm(len(members), generator=g)]
        first = torch.cat([members[difficulty[members] == k][:per_difficulty] for k in range(preds.n_exits + 1)])
        rest = members[~torch.isin(members, first)]
        chosen.append(torch.cat([first, rest])[:per_class])
    chosen = torch.cat(chosen)
    return chosen[torch.randperm(len(chosen), generator=g)]


def quantize(raw: torch.Tensor) -> np.ndarray:
    """Maps scaled each to its own range and rounded to bytes (an all-equal map becomes 0).

    Args:
        raw: float [..., h, w]. Returns: uint8 [..., h, w].
    """
    flat = raw.reshape(-1, raw.shape[-2] * raw.shape[-1]).double()
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    scaled = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp(min=1e-300), torch.zeros_like(flat))
    return (scaled * 255).round().to(torch.uint8).reshape(raw.shape).numpy()


def atlases(images: torch.Tensor, per_png: int = 100) -> list[bytes]:
    """The images side by side in PNGs of `per_png` images each (the page decodes the first one's PNG first).

    Args:
        images: uint8 [n, 3, s, s]. Returns: PNG bytes, each ceil(sqrt(per_png)) images wide, row-major.
    """
    _, _, s, _ = images.shape
    cols = math.ceil(math.sqrt(per_png))
    out = []
    for start in range(0, len(images), per_png):
        part = images[start : start + per_png].permute(0, 2, 3, 1).numpy()
        grid = np.zeros((math.ceil(len(part) / cols) * s, cols * s, 3), dtype=np.uint8)
        for i, img in enumerate(part):
            r, c = divmod(i, cols)
            grid[r * s : (r + 1) * s, c * s : (c + 1) * s] = img
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="png", optimize=True)
        out.append(buf.getvalue())
    return out


def _jet() -> bytes:
    """matplotlib's jet, 256 entries of RGB bytes: the colours viz.overlay uses."""
    from matplotlib import colormaps
    return (colormaps["jet"](np.arange(256))[:, :3] * 255).round().astype(np.uint8).tobytes()


def build(model: msdnet.MSDNet, split: data.Split, preds: evaluate.Predictions, chosen: torch.Tensor,
          selection: str) -> dict:
    """The page's data for the chosen images, as one JSON-ready dict (binary parts in base64).

    Args:
        split: the test split; preds: its predictions; chosen: indices into it, in the page's order.
        selection: the sentence the page shows about how the images were chosen.
    """
    picked = data.Split(split.images[chosen], split.labels[chosen])
    logits, labels = preds.logits[chosen], preds.labels[chosen]
    wrong = (logits.argmax(-1) != labels[:, None]).numpy()  # [n, exits]
    blobs = []
    for method in METHODS:  # per method: the own-prediction maps [n, exits, 8, 8], then the true class's where wrong
        own = gradcam.maps_for_split(model, picked, method=method)
        true = gradcam.maps_for_split(model, picked, method=method, target="true")
        blobs += [quantize(own).tobytes(), quantize(true)[wrong].tobytes()]
    return {
        "format": 2,
        "classes": list(data.CLASSES),
        "exits": model.n_exits,
        "size": model.config.image_size,
        "map_size": model.config.coarsest_size,
        "methods": [[m, gradcam.METHODS[m].title] for m in METHODS],
        "selection": selection,
        "weights": fingerprint(model.state_dict().values()),
        "index": chosen.tolist(),
        "label": labels.tolist(),
        "predicted": logits.argmax(-1).reshape(-1).tolist(),
        "confidence": (evaluate.scores(logits) * 1000).round().long().reshape(-1).tolist(),  # per mille
        "jet": base64.b64encode(_jet()).decode(),
        "images_per_png": IMAGES_PER_PNG,
        "images": [base64.b64encode(png).decode() for png in atlases(picked.images, IMAGES_PER_PNG)],
        "maps": base64.b64encode(b"".join(blobs)).decode(),
    }


def write(content: dict, path: Path = OUT) -> None:
    """The data as a script that sets window.EXPLORER_DATA (a script loads from file:// too; fetch does not)."""
    atomic.write_text(path, PREFIX + json.dumps(content, separators=(",", ":")) + ";\n")


def read(path: Path = OUT) -> dict:
    """write()'s file decoded: the JSON fields, and numpy arrays for the binary ones.

    Returns:
        the dict, plus images uint8 [n, 3, s, s] and maps {method: {"predicted": uint8 [n, exits, m, m],
        "true": uint8 [n, exits, m, m]}} (the true class's maps filled in where the exit is right).
    """
    text = path.read_text(encoding="utf-8")
    if not text.startswith(PREFIX):
        raise ValueError(f"{path} is not the explorer's data (it does not start with {PREFIX.strip()!r})")
    d = json.loads(text[len(PREFIX):].rstrip().rstrip(";"))
    n, e, s, m = len(d["label"]), d["exits"], d["size"], d["map_size"]
    images = []
    for png in d["images"]:
        with Image.open(io.BytesIO(base64.b64decode(png))) as im:
            grid = np.asarray(im.convert("RGB"))
        cols = grid.shape[1] // s
        images += [grid[(i // cols) * s : (i // cols + 1) * s, (i % cols) * s : (i % cols + 1) * s]
                   for i in range(min(d["images_per_png"], n - len(images)))]
    d["images"] = np.stack(images).transpose(0, 3, 1, 2)
    wrong = np.asarray(d["predicted"]).reshape(n, e) != np.asarray(d["label"])[:, None]
    blob, at, maps = np.frombuffer(base64.b64decode(d["maps"]), dtype=np.uint8), 0, {}
    for method, _ in d["methods"]:
        own = blob[at : at + n * e * m * m].reshape(n, e, m, m)
        at += own.size
        true = own.copy()
        true[wrong] = blob[at : at + wrong.sum() * m * m].reshape(-1, m, m)
        at += int(wrong.sum()) * m * m
        maps[method] = {"predicted": own, "true": true}
    if at != blob.size:
        raise ValueError(f"{path}: the maps hold {blob.size} bytes, {at} expected")
    d["maps"] = maps
    return d


def main() -> None:
    from helpers import checkpoint, pretrained

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT, help="the data file (default: docs/_static/explorer/data.js)")
    p.add_argument("--per-class", type=int, default=100, help="images per class (default: 100)")
    p.add_argument("--per-difficulty", type=int, default=4,
                   help="at most this many of each difficulty k/10 per class, drawn first (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the draw (default: 0)")
    args = p.parse_args()
    try:
        split, model = data.load("test"), pretrained.load()
    except (data.DataNotFoundError, checkpoint.CheckpointError) as e:  # what the user can fix: the message alone
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    preds = evaluate.predict(model, split)
    chosen = choose(preds, args.per_class, args.per_difficulty, args.seed)
    selection = (f"{len(chosen):,} of the {len(split):,} test images: {args.per_class} per class, of which up to "
                 f"{args.per_difficulty} of each difficulty k/{model.n_exits} (where the class has them) and the rest "
                 f"drawn at random from the class (seed {args.seed})")
    write(build(model, split, preds, chosen, selection), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): {selection}")


if __name__ == "__main__":
    main()
