"""The shipped CIFAR-10 checkpoints: load one offline, or export one from a training run.

    model = pretrained.load()                 # the paper's model: eval mode, images in [0, 1], SHA-256 checked
    model = pretrained.load(preset="seed")    # a card of another preset, once one is shipped

    python -m helpers.pretrained evaluate            # per-exit accuracy of the shipped weights on the test split
    python -m helpers.pretrained export --run runs/X --command "..."   # make data/pretrained/ from a run

Each preset (msdnet.PRESETS) has at most one card in data/pretrained/: its weights
(weights_name(preset)), a JSON card beside them, and the chained training log the card names.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from . import atomic, checkpoint, data, msdnet
from .evaluate import exit_accuracies
from .train import init_record_of

__all__ = ["PRETRAINED_DIR", "DEFAULT_PRESET", "WEIGHTS_NAME", "weights_name", "shipped_presets", "load", "sha256",
           "export"]

PRETRAINED_DIR = data.PROJECT_ROOT / "data" / "pretrained"
DEFAULT_PRESET = "cifar10-anytime"  # the paper's CIFAR model: what load() gives


def weights_name(preset: str = DEFAULT_PRESET) -> str:
    """The file name of a preset's shipped weights, the preset's name as it is (so no two collide):
    msdnet-cifar10-anytime.pt for the paper's model, msdnet-seed.pt for the blog's."""
    if preset not in msdnet.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(msdnet.PRESETS)}")
    return f"msdnet-{preset}.pt"


WEIGHTS_NAME = weights_name()


def _log_name(preset: str) -> str:
    """The chained training log's file name; the default card's keeps the name it always had."""
    return "training-log.jsonl" if preset == DEFAULT_PRESET else Path(weights_name(preset)).stem + "-training-log.jsonl"


def shipped_presets(folder: Path | None = None) -> list[str]:
    """The presets that have weights in `folder` (default: data/pretrained/)."""
    folder = PRETRAINED_DIR if folder is None else folder
    return [p for p in msdnet.PRESETS if (folder / weights_name(p)).is_file()]


def sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 in hex, as its card records it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def _shipped(path: Path) -> bool:
    """Is `path` in data/pretrained/, where git can restore what is lost? The folder is compared, not
    the file: a shipped file may be a link (git-annex, LFS not pulled) that leads elsewhere or nowhere."""
    return Path(os.path.abspath(path)).parent.resolve() == PRETRAINED_DIR.resolve()


def _recorded_sha256(card: Path, weights: Path) -> str:
    """The SHA-256 the card beside `weights` records, or one clear error saying what is wrong with the card."""
    restore = f"restore it with `git checkout -- {card}`, or load unchecked weights with verify=False"
    if not card.is_file():
        if not _shipped(weights):  # weights of one's own (a run's best.pt) have no card
            raise checkpoint.CheckpointError(
                f"no card {card.name} beside {weights.name}, so its SHA-256 cannot be checked: load weights of your "
                f"own (a run's best.pt, say) with pretrained.load(path, verify=False)")
        raise checkpoint.CheckpointError(
            f"no card {card.name} beside {weights.name}, so its SHA-256 cannot be checked; {restore}")
    try:
        recorded = json.loads(card.read_text()).get("sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise checkpoint.CheckpointError(f"{card} is not a valid card (not a JSON object: {e}); {restore}") from None
    if not isinstance(recorded, str):
        raise checkpoint.CheckpointError(f"{card} records no sha256 for {weights.name}; {restore}")
    return recorded


def load(path: str | os.PathLike | None = None, device: str | torch.device = "cpu", verify: bool = True,
         preset: str | None = None) -> msdnet.MSDNet:
    """The shipped MSD-Net of `preset` (default: the paper's, cifar10-anytime), or the weights at `path`,
    in float32 and eval mode, after checking the SHA-256 recorded in the JSON card beside the weights.
    verify=False loads weights without a card (a run's best.pt, say) unchecked."""
    if path and preset:
        raise ValueError("pass either path (weights of your own) or preset (a shipped card), not both")
    preset = preset or DEFAULT_PRESET
    weights = Path(path) if path else PRETRAINED_DIR / weights_name(preset)
    card = _card_path(weights)
    if not weights.is_file():
        if not path and preset != DEFAULT_PRESET and not card.is_file():
            raise checkpoint.CheckpointError(
                f"no weights are shipped for the preset {preset!r} (shipped: {', '.join(shipped_presets()) or 'none'}); "
                f"train them and export the run (README, 'How it was made'), or load a run's weights by path")
        if weights.is_dir():
            raise checkpoint.CheckpointError(f"{weights} is a folder: pass the weights file in it (a .pt file)")
        if path and not _shipped(weights):
            raise checkpoint.CheckpointError(f"no weights at {weights}: check the path")
        raise checkpoint.CheckpointError(f"no weights at {weights}; restore them with `git checkout -- {weights}`")
    if verify:
        expected = _recorded_sha256(card, weights)
        actual = sha256(weights)
        if actual != expected:
            raise checkpoint.CheckpointError(
                f"{weights} is damaged or was replaced: its SHA-256 is {actual[:12]}..., the card {card.name} "
                f"records {expected[:12]}...; restore it with `git checkout -- {weights}` (or git lfs pull)"
            )
    model = _read_weights(weights)
    if not path and model.config != msdnet.PRESETS[preset]:  # a card's file replaced by another preset's
        raise checkpoint.CheckpointError(f"{weights} holds another model than the preset {preset!r}; "
                                         f"restore it with `git checkout -- {weights}`")
    return model.to(device).eval()


def _read_weights(weights: Path) -> msdnet.MSDNet:
    ckpt = checkpoint.read(weights)
    model = msdnet.build(msdnet.MSDNetConfig.from_dict(ckpt["config"]))
    as_float = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    checkpoint.load_weights(model, {**ckpt, "model": as_float}, weights)
    return model


def _chain_total(training: dict, key: str) -> int:
    """Sum a field over a run and the runs it was initialised from."""
    total = 0
    while training is not None:
        total += training[key]
        training = training.get("started_from")
    return total


def _parent(last: dict) -> dict | None:
    """The card and log of the weights the run started from: as the run recorded them when it started,
    or (runs from before it did) as they are now beside the --init-from file."""
    if last.get("init_record"):
        return last["init_record"]
    init = last["run"].get("init_from")
    return init_record_of(Path(init)) if init else None


def _chained_log(run_dir: Path, parent: dict | None, up_to_epoch: int) -> list[dict]:
    """The earlier cycles' log (the run's parent's), then this run's up to the epoch whose weights are
    shipped, each record tagged with its cycle and its epoch counted from the very start."""
    earlier: list[dict] = []
    if parent is not None:
        earlier = [{"cycle": 1, "total_epoch": r["epoch"], **r} for r in parent["log"]]
    cycle = max((r["cycle"] for r in earlier), default=0) + 1
    done = max((r["total_epoch"] for r in earlier), default=0)
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    ours = [r for r in map(json.loads, lines) if r["epoch"] <= up_to_epoch]
    return earlier + [{**r, "cycle": cycle, "total_epoch": done + r["epoch"]} for r in ours]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _chosen_weights(run_dir: Path) -> tuple[dict, dict, Path]:
    """The weights a run ships: best.pt (chosen on validation, the moving average when the run kept
    one) if the run wrote it, else the last epoch's (again the moving average if there is one).
    Returns (weights checkpoint, the run's last.pt, the file the weights came from)."""
    if (run_dir / "best.pt").is_file():
        best = checkpoint.read(run_dir / "best.pt")
        # A run brought back from a GPU machine may carry best.pt alone (last.pt, with the optimizer, is large).
        last = checkpoint.read(run_dir / "last.pt") if (run_dir / "last.pt").is_file() else best
        trained = _trained_if_better(run_dir, last, best)
        return (trained, last, run_dir / "last.pt") if trained else (best, last, run_dir / "best.pt")
    last = checkpoint.read(run_dir / "last.pt")
    if last.get("batch_in_epoch"):
        raise checkpoint.CheckpointError(
            f"{run_dir / 'last.pt'} was saved in the middle of epoch {last['epoch'] + 1} (batch {last['batch_in_epoch']}), "
            "so its weights were never validated: finish the epoch with --resume, then export"
        )
    chosen = _last_weights(last, "ema" if "ema" in last else "trained")
    record = _val_record(run_dir, last["epoch"])
    if record:
        chosen["val_accuracy_per_exit"] = record["acc_ema" if chosen["weights"] == "ema" else "acc"]
    return chosen, last, run_dir / "last.pt"


def _last_weights(last: dict, kind: str) -> dict:
    """last.pt's trained weights, or ("ema") its moving average, as a checkpoint export can ship."""
    model = last["model"]
    if kind == "ema":  # AveragedModel's state: the averaged model's under "module.", and a step count
        model = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    return {"config": last["config"], "model": model, "weights": kind, "epoch": last["epoch"],
            "elapsed_s": last["elapsed_s"], "hardware": last.get("hardware"), "val_accuracy_per_exit": None}


def _val_record(run_dir: Path, epoch: int) -> dict | None:
    """The run log's validation record of `epoch` when it is the last record, else None."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    if records and records[-1]["eval_split"] == "val" and records[-1]["epoch"] == epoch:
        return records[-1]
    return None


def _trained_if_better(run_dir: Path, last: dict, best: dict) -> dict | None:
    """At the end of a cosine schedule the trained weights can overtake their moving average, which lags
    them by about 1 / (1 - decay) steps. When the last epoch's trained weights (validated at an epoch
    boundary, like the average) score higher on validation than best.pt, they are the ones to ship."""
    if last is best or last.get("batch_in_epoch") or best.get("weights") != "ema" or not best.get("val_accuracy_per_exit"):
        return None
    record = _val_record(run_dir, last["epoch"])
    if not record or _mean(record["acc"]) <= _mean(best["val_accuracy_per_exit"]):
        return None
    return {**_last_weights(last, "trained"), "val_accuracy_per_exit": record["acc"]}


def _refuse_if_worse(val_acc: list[float] | None, shipped_card: Path, source_file: Path) -> None:
    if not val_acc or not shipped_card.is_file():
        return
    shipped_val = json.loads(shipped_card.read_text()).get("val_accuracy_per_exit")
    if shipped_val and _mean(val_acc) < _mean(shipped_val):
        raise checkpoint.CheckpointError(
            f"{source_file} scores {_mean(val_acc):.2%} on validation (mean over the exits), the shipped "
            f"weights {_mean(shipped_val):.2%}: not exported. Train on, or pass --allow-worse to replace them anyway."
        )


def _training_record(chosen: dict, last: dict, command: str, hardware: str | None, note: str | None) -> dict:
    """The card's account of how the weights were made, chained to the cycles before when the run
    started from shipped weights (their card is read before it is replaced)."""
    hardware = hardware or chosen.get("hardware") or last.get("hardware") or "unknown (not recorded by the run)"
    training = {**last["run"], "epochs_done": chosen["epoch"], "wall_time_s": round(chosen["elapsed_s"]),
                "weights": chosen["weights"], "command": command, "hardware": hardware,
                # the torch that trained (a GPU machine's may differ from the exporting one's); older runs did not record it
                "torch": chosen.get("torch") or last.get("torch") or str(torch.__version__)}
    if "data" in last:  # what the run trained on: image count and content hash, and where it was read from
        training["trained_on"] = {**last["data"], "source": last.get("data_source")}
    if last["epoch"] != chosen["epoch"]:
        training["note_epochs"] = f"chosen on validation after epoch {chosen['epoch']} of the {last['epoch']} run so far"
    if note:
        training["note"] = note
    parent = _parent(last)
    if parent is not None:
        training["init_from_sha256"] = parent["card"]["sha256"]
        training["started_from"] = parent["card"]["training"]
    training["total_epochs"] = _chain_total(training, "epochs_done")
    training["total_wall_time_s"] = _chain_total(training, "wall_time_s")
    return training


def export(run_dir: Path, out_dir: Path, command: str, hardware: str | None = None, source: str | None = None,
           note: str | None = None, allow_worse: bool = False) -> dict:
    """Half-precision weights, a JSON card (config, command, epochs, wall time, hardware, accuracy, SHA-256)
    and the training log, from a run's best.pt (chosen on validation) or, without one, its last.pt.
    `note` records what the numbers alone don't say (for example, that the wall time includes hours the
    run was paused). `hardware` defaults to what the run recorded (the GPU's name, or the CPU's).
    The shipped checkpoint only improves: weights whose mean validation accuracy over
    the exits is below the card's in `out_dir` are refused unless `allow_worse`."""
    chosen, last, source_file = _chosen_weights(run_dir)
    preset = last["run"].get("preset", DEFAULT_PRESET)  # each preset has its own card: a seed run never replaces the default
    name, log_name = weights_name(preset), _log_name(preset)
    val_acc = chosen["val_accuracy_per_exit"]
    if not allow_worse:
        _refuse_if_worse(val_acc, out_dir / _card_path(Path(name)), source_file)
    ckpt = {**chosen, "run": last["run"]}
    training = _training_record(chosen, last, command, hardware, note)
    parent = _parent(last)
    model = msdnet.build(msdnet.MSDNetConfig.from_dict(ckpt["config"]))
    checkpoint.load_weights(model, ckpt, source_file)
    half = checkpoint.half(model.state_dict())
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, staged = out_dir / name, out_dir / f".{name}.new"
    atomic.save({"format": "msdnet-weights/1", "config": ckpt["config"], "model": half}, staged)
    try:
        test = data.load("test", source)
        acc32 = exit_accuracies(model.eval(), test)
        shipped = _read_weights(staged).eval()  # what users get: fp16 weights back in float32
        acc16 = exit_accuracies(shipped, test)
        acc_flip = exit_accuracies(shipped, test, flip=True)  # a row of its own: it costs two passes
    except BaseException:  # a failed (or interrupted) measurement leaves the shipped files as they were
        staged.unlink(missing_ok=True)
        raise
    costs = msdnet.exit_costs(model)
    log = _chained_log(run_dir, parent, chosen["epoch"])  # this run's records last
    card = {
        "weights": name,
        "preset": preset,
        "training_log": log_name,
        "sha256": sha256(staged),
        "file_bytes": staged.stat().st_size,
        "config": ckpt["config"],
        "training": training,
        "test_accuracy_per_exit": [round(a, 4) for a in acc16],
        "test_accuracy_per_exit_float32": [round(a, 4) for a in acc32],
        "test_accuracy_per_exit_flip_tta": [round(a, 4) for a in acc_flip],
        "val_accuracy_per_exit": val_acc,
        "test_images": len(test),
        "params_per_exit": [c.params for c in costs],
        "macs_per_exit": [c.macs for c in costs],
        "macs_per_exit_flip_tta": [2 * c.macs for c in costs],
    }
    chained_log = "".join(json.dumps(r) + "\n" for r in log)
    os.replace(staged, weights)  # everything is measured: only now replace the shipped files
    atomic.write_text(_card_path(weights), json.dumps(card, indent=2) + "\n")
    atomic.write_text(out_dir / log_name, chained_log)
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helpers.pretrained")
    sub = p.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluate", help="per-exit accuracy of the shipped weights on the test split")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--weights", default=None, help="weights of your own (default: a shipped card, see --preset)")
    which.add_argument("--preset", default=None, choices=sorted(msdnet.PRESETS),
                       help=f"whose shipped card to evaluate (default: {DEFAULT_PRESET})")
    ev.add_argument("--flip", action="store_true",
                    help="also with flip test-time augmentation (image and mirror, logits averaged: twice the cost)")
    ev.add_argument("--source", default=None, help=f"CIFAR-10 source (default: ${data.ENV_SOURCE} or torchvision)")
    ex = sub.add_parser("export", help="write data/pretrained/ from a finished run")
    ex.add_argument("--run", required=True, type=Path)
    ex.add_argument("--command", required=True, help="the exact training command, recorded in the card")
    ex.add_argument("--hardware", default=None, help="default: what the run recorded (GPU name, or CPU)")
    ex.add_argument("--out", type=Path, default=PRETRAINED_DIR)
    ex.add_argument("--source", default=None)
    ex.add_argument("--note", default=None, help="a remark kept in the card's training record")
    ex.add_argument("--allow-worse", action="store_true",
                    help="replace the shipped weights even when these score lower on validation")
    args = p.parse_args(argv)
    try:
        if args.cmd == "export":
            card = export(args.run, args.out, args.command, args.hardware, args.source, args.note, args.allow_worse)
            accs = card["test_accuracy_per_exit"]
            print(f"wrote {args.out / card['weights']}, its card and {card['training_log']}")
        else:
            model, test = load(args.weights, preset=args.preset), data.load("test", args.source)
            accs = exit_accuracies(model, test)
            accs_flip = exit_accuracies(model, test, flip=True) if args.flip else None
    except (checkpoint.CheckpointError, data.DataNotFoundError, ValueError) as e:  # bad input: one message
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("test accuracy per exit: " + " ".join(f"B{k + 1}={a * 100:.2f}" for k, a in enumerate(accs)))
    if args.cmd == "evaluate" and accs_flip:
        print("with flip TTA (2x MACs): " + " ".join(f"B{k + 1}={a * 100:.2f}" for k, a in enumerate(accs_flip)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
