"""Do checkpoints combine into a better one? Their weight average (a "model soup", Wortsman et al.
2022) and their ensemble, judged on the validation hold-out.

    python benchmarks/checkpoint_averages.py 142dba0 3dcff3d                  # two shipped cycles, by commit
    python benchmarks/checkpoint_averages.py 142dba0 3dcff3d --bn-images 10000

A checkpoint is a commit (its `data/pretrained/msdnet-cifar10-anytime.pt`, read with `git show`) or a
weights file. Prints each exit's validation accuracy for every checkpoint alone, for the equal-weight
average of their weights (batch-norm statistics averaged too; with --bn-images N also recomputed on N
augmented training images with torch's `update_bn`) and for their ensemble (log-probabilities averaged,
which costs every member's multiply-accumulates). Seeded: the same command gives the same numbers.
The table is also written to DIR/checkpoint_averages.md with --results DIR.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.optim.swa_utils import update_bn

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from helpers import augment, checkpoint, data, pretrained
from helpers.evaluate import predict

SHIPPED = "data/pretrained/msdnet-cifar10-anytime.pt"
REPOSITORY = Path(__file__).resolve().parents[1]


def read(spec: str, folder: Path) -> torch.nn.Module:
    """A weights file, or the shipped weights as they were at a commit."""
    path = Path(spec)
    if not path.is_file():
        path = folder / f"{spec}.pt"
        shown = subprocess.run(["git", "show", f"{spec}:{SHIPPED}"], cwd=REPOSITORY, capture_output=True)
        if shown.returncode:
            raise checkpoint.CheckpointError(f"{spec!r} is neither a weights file nor a commit of this repository "
                                             f"that holds {SHIPPED} (git: {shown.stderr.decode().strip()})")
        path.write_bytes(shown.stdout)
        checkpoint.upgrade(path, path)  # a commit's weights may predate the current checkpoint format
    return pretrained.load(path, verify=False)


def val_log_probs(model: torch.nn.Module, val: data.Split) -> Tensor:
    """[images, exits, classes] log-probabilities on the validation split (nothing cached)."""
    return predict(model, val, cache=False).logits.log_softmax(-1)


def report(name: str, log_probs: Tensor, labels: Tensor) -> list[str]:
    """Prints each exit's accuracy (%) and their mean; returns them as a table row named `name`."""
    acc = (log_probs.argmax(-1) == labels[:, None]).double().mean(0) * 100
    print(f"{name:<28}" + " ".join(f"{a:6.2f}" for a in acc.tolist()) + f"   mean {acc.mean():.2f}", flush=True)
    return [name.strip()] + [f"{a:.2f}" for a in acc.tolist()] + [f"{acc.mean():.2f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="commits or weights files")
    p.add_argument("--bn-images", type=int, default=0, help="also recompute batch-norm statistics on N training images")
    p.add_argument("--source", default=None, help=f"CIFAR-10 source (default: ${data.ENV_SOURCE} or torchvision)")
    _report.add_option(p, default="")  # a comparison of the reader's own checkpoints: no page part unless asked
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        models = [read(spec, Path(tmp)) for spec in args.checkpoints]
    val = data.load("val", args.source)
    print("validation accuracy (%), exits B1..B10")
    members, rows = [], []
    for spec, model in zip(args.checkpoints, models):
        members.append(val_log_probs(model, val))
        rows.append(report(spec, members[-1], val.labels))
    states = [m.state_dict() for m in models]
    soup = models[0]
    soup.load_state_dict({k: sum(s[k] for s in states) / len(states) if v.is_floating_point() else v
                          for k, v in states[0].items()})
    rows.append(report("weight average", val_log_probs(soup, val), val.labels))
    if args.bn_images:
        train = data.load("train", args.source)
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.bn_images]
        # Augmented as in training: the network's scales and shifts were learned on those statistics.
        x = augment.random_crop_flip(train.images[pick], generator=torch.Generator().manual_seed(1)).float().div(255)
        update_bn([(x[i : i + 250],) for i in range(0, len(x), 250)], soup)
        rows.append(report("  statistics recomputed", val_log_probs(soup, val), val.labels))
        rows[-1][0] = f"weight average, statistics recomputed on {args.bn_images:,} training images"
    rows.append(report("ensemble", sum(members) / len(members), val.labels))
    page = _report.Report("checkpoint_averages", args.results)
    page.text(f"Accuracy on the {len(val):,} validation images of each checkpoint alone, the equal-weight average of "
              "their weights and their ensemble (log-probabilities averaged).")
    page.table(["checkpoint"] + [f"B{k} %" for k in range(1, len(rows[0]) - 1)] + ["mean %"], rows)
    page.write()


if __name__ == "__main__":
    _errors.run(main)
