"""Turn a training run into a shipped card: half-precision weights, a JSON card and the chained log.

    python -m helpers.export --run runs/X --command "..."            # into data/pretrained/
    python -m helpers.export --run runs/X --command "..." --out DIR  # anywhere else

The three files are measured and written in a staging folder beside the output folder, which then
takes the output folder's place in one atomic exchange (two renames on systems without one), so a
reader finds either the old set or the new one.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import checkpoint, data, machine, msdnet, pretrained
from .checkpoint import CheckpointError
from .evaluate import exit_accuracies

__all__ = ["export", "init_record_of", "main"]

AVERAGES = ("ema", "swa")  # best.pt's "weights" when it holds a weight average


def init_record_of(weights: str | os.PathLike) -> dict | None:
    """The card and chained log beside the weights a run starts from, for the run to keep.

    Returns:
        {"card": the card, "log": its log's records}, or None when no card is beside the weights.
    """
    card_file = pretrained.card_path(weights)
    if not card_file.is_file():
        return None
    try:
        card = pretrained.read_card(card_file)
        if not isinstance(card.get("training_log"), str):
            raise CheckpointError(f"{card_file} names no training_log; export the run again")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (it is the card beside the weights a run starts from: move it away to start "
                              "from them without their record)") from None
    return {"card": card, "log": _read_log(Path(weights).parent / card["training_log"])}


def _read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines log, or one CheckpointError naming the file and the line."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"no log at {path}: restore the file (a run writes its log.jsonl at the end of "
                              "every epoch)") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a JSON-lines log (not text): restore the file") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise CheckpointError(f"{path}, line {n}, is not a JSON record (cut short?): restore the file, "
                                  "or delete the broken line")
        records.append(record)
    return records


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _kind(weights: str, run: dict) -> str:
    """"swa", "ema" or "trained": which weights a checkpoint holds, from its run's settings."""
    if weights in AVERAGES:
        return "swa" if run["swa"] else "ema"
    return weights


def _last_weights(last: dict, average: bool) -> dict:
    """last.pt's trained weights, or its weight average, as a checkpoint to ship."""
    model = last["model"]
    if average:  # the average's state: the model's under "module.", and a step count
        model = {k.removeprefix("module."): v for k, v in last["average"].items() if k.startswith("module.")}
    return {"config": last["config"], "model": model, "weights": _kind("ema" if average else "trained", last["run"]),
            "epoch": last["epoch"], "elapsed_s": last["elapsed_s"], "hardware": last["hardware"],
            "torch": last["torch"], "val_accuracy_per_exit": None}


def _val_record(records: list[dict], epoch: int) -> dict | None:
    """The log's validation record of `epoch` when it is the last record, else None."""
    if records and records[-1]["eval_split"] == "val" and records[-1]["epoch"] == epoch:
        return records[-1]
    return None


def _chosen_weights(run_dir: Path, records: list[dict]) -> tuple[dict, dict, Path]:
    """The weights a run ships: best.pt, or last.pt's when they score higher on validation (or there is no best.pt).

    Returns:
        (the weights as a checkpoint, the run's last.pt, the file the weights came from).
    """
    best_file, last_file = run_dir / "best.pt", run_dir / "last.pt"
    if best_file.is_file():
        best = checkpoint.read(best_file)
        last = checkpoint.read(last_file) if last_file.is_file() else best  # a GPU run may bring best.pt alone
        trained = _trained_if_better(records, last, best)
        if trained:
            return trained, last, last_file
        return {**best, "weights": _kind(best["weights"], best["run"])}, last, best_file
    if not last_file.is_file():
        raise CheckpointError(f"{run_dir} holds neither best.pt nor last.pt: pass the --out folder of a training run")
    last = checkpoint.read(last_file)
    if last["batch_in_epoch"]:
        raise CheckpointError(
            f"{last_file} was saved in the middle of epoch {last['epoch'] + 1} (batch {last['batch_in_epoch']}), "
            "so its weights were never validated: finish the epoch with --resume, then export")
    chosen = _last_weights(last, average="average" in last)
    record = _val_record(records, last["epoch"])
    if record:
        chosen["val_accuracy_per_exit"] = record["acc_average" if chosen["weights"] in AVERAGES else "acc"]
    return chosen, last, last_file


def _trained_if_better(records: list[dict], last: dict, best: dict) -> dict | None:
    """last.pt's trained weights when they beat best.pt's average on validation (the end of a cosine schedule)."""
    if last is best or last["batch_in_epoch"] or best["weights"] not in AVERAGES or not best["val_accuracy_per_exit"]:
        return None
    record = _val_record(records, last["epoch"])
    if not record or _mean(record["acc"]) <= _mean(best["val_accuracy_per_exit"]):
        return None
    return {**_last_weights(last, average=False), "val_accuracy_per_exit": record["acc"]}


def _refuse_unless_better(val_acc: list[float] | None, card_file: Path, source_file: Path) -> None:
    """Refuse to replace `card_file` with weights not shown to be at least as good on validation."""
    if not card_file.is_file():
        return
    shipped = pretrained.read_card(card_file).get("val_accuracy_per_exit")
    worse = "pass --allow-worse to replace them anyway, or export into another --out"
    if not val_acc:
        raise CheckpointError(
            f"{source_file} has no validation score (its run measured the test split or held out no images), "
            f"so it cannot be shown better than the weights of {card_file}: not exported; {worse}")
    if not shipped:
        raise CheckpointError(f"{card_file} records no validation score to compare with: not exported; {worse}")
    if _mean(val_acc) < _mean(shipped):
        raise CheckpointError(
            f"{source_file} scores {_mean(val_acc):.2%} on validation (mean over the exits), the weights of "
            f"{card_file} {_mean(shipped):.2%}: not exported. Train on, or {worse}")


def _chain_total(training: dict, key: str) -> int:
    total = 0
    while training is not None:
        total += training[key]
        training = training.get("started_from")
    return total


def _training_record(chosen: dict, last: dict, command: str, hardware: str | None, note: str | None) -> dict:
    """The card's account of how the weights were made, chained to the cycles before."""
    training = {**last["run"], "epochs_done": chosen["epoch"], "wall_time_s": round(chosen["elapsed_s"]),
                "weights": chosen["weights"], "command": command, "hardware": hardware or chosen["hardware"],
                "torch": chosen["torch"], "trained_on": {**last["data"], "source": last["data_source"]}}
    if last["epoch"] != chosen["epoch"]:
        training["note_epochs"] = f"chosen on validation after epoch {chosen['epoch']} of the {last['epoch']} run so far"
    if note:
        training["note"] = note
    parent = last.get("init_record")
    if parent is not None:
        training["init_from_sha256"] = parent["card"]["sha256"]
        training["started_from"] = parent["card"]["training"]
    training["total_epochs"] = _chain_total(training, "epochs_done")
    training["total_wall_time_s"] = _chain_total(training, "wall_time_s")
    return training


def _chained_log(records: list[dict], parent: dict | None, up_to_epoch: int) -> list[dict]:
    """The earlier cycles' log, then this run's records up to the shipped epoch, tagged with cycle and total epoch."""
    earlier = parent["log"] if parent is not None else []
    cycle = max((r["cycle"] for r in earlier), default=0) + 1
    done = max((r["total_epoch"] for r in earlier), default=0)
    ours = [r for r in records if r["epoch"] <= up_to_epoch]
    return earlier + [{**r, "cycle": cycle, "total_epoch": done + r["epoch"]} for r in ours]


# ----------------------------------------------------------------------------- the switch


def _beside(out: Path) -> tuple[Path, Path]:
    """The staging folder of an export into `out`, and where the old folder waits when no exchange exists."""
    return out.with_name(f".{out.name}.new"), out.with_name(f".{out.name}.old")


def _tidy(out: Path) -> None:
    """Finish or undo what a killed export left beside `out`, then remove it."""
    new, old = _beside(out)
    if old.exists() and not out.exists():  # killed between the two renames of _switch: the new set was complete
        os.rename(new if new.exists() else old, out)
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file: pass a folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError(errno.EACCES, "permission denied", str(out))
    except OSError as e:
        raise CheckpointError(f"--out {out} is not writable ({e.strerror}): choose another --out") from None


def _sync(path: Path) -> None:
    if os.name != "posix" and path.is_dir():
        return  # no fsync of a folder there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry(out: Path, new: Path, replaced: set[str]) -> None:
    """Hard-link into `new` what `out` holds besides the files being replaced and an earlier export's leftovers."""
    for entry in out.iterdir():
        leftover = entry.name.startswith(".") and (entry.name.endswith(".new") or ".tmp" in entry.name)
        if entry.name in replaced or leftover:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link)
        else:
            _link(str(entry), str(new / entry.name))
    shutil.copymode(out, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic rename, where the system and file system can; False where not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
            at_fdcwd, rename_exchange = -100, 2
            rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            return False
    except OSError:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _switch(new: Path, out: Path) -> None:
    """Put the complete folder `new` in the place of `out`; afterwards `new` holds the old folder, if any."""
    if not out.exists():
        os.rename(new, out)
    elif not _exchange(new, out):
        _, old = _beside(out)
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _sync(out.parent)


# ----------------------------------------------------------------------------- export


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike, command: str, hardware: str | None = None,
           source: str | None = None, note: str | None = None, allow_worse: bool = False,
           device: str | torch.device = "cpu") -> dict:
    """Measure a run's chosen weights on the test split and write their card set into `out_dir`.

    Args:
        run_dir: the run's folder (helpers.train's --out): best.pt and/or last.pt, and log.jsonl.
        out_dir: the folder of cards (pretrained.PRETRAINED_DIR ships); the run's preset names the files,
            other presets' files stay.
        command: the exact training command, recorded in the card.
        hardware: default: what the run recorded (the GPU's name, or the CPU's).
        source: the CIFAR-10 source (default: $CIFAR10_SOURCE or torchvision).
        note: what the numbers alone don't say, kept in the card's training record.
        allow_worse: replace a card whose weights score higher on validation, or that cannot be compared.
        device: where the test split is measured.
    Returns:
        the card written.
    """
    run_dir, out = Path(run_dir), Path(os.path.realpath(out_dir))
    dev = machine.device_for(device)
    if not run_dir.is_dir():
        raise CheckpointError(f"no training run at {run_dir}: pass the --out folder of helpers.train")
    records = _read_log(run_dir / "log.jsonl")
    chosen, last, source_file = _chosen_weights(run_dir, records)
    preset = last["run"]["preset"]
    name, log_file = pretrained.weights_name(preset), pretrained.log_name(preset)
    _check_writable(out)
    if not allow_worse:
        _refuse_unless_better(chosen["val_accuracy_per_exit"], out / pretrained.card_path(name), source_file)
    training = _training_record(chosen, last, command, hardware, note)
    log = _chained_log(records, last.get("init_record"), chosen["epoch"])
    model = msdnet.build(msdnet.MSDNetConfig.from_dict(chosen["config"]))
    checkpoint.load_weights(model, chosen, source_file)
    test = data.load("test", source)

    out.parent.mkdir(parents=True, exist_ok=True)
    _tidy(out)
    new, _ = _beside(out)
    new.mkdir()
    try:
        weights = new / name
        checkpoint.write({"config": chosen["config"], "model": checkpoint.half(model.state_dict())}, weights)  # fsynced
        acc32 = exit_accuracies(model.to(dev).eval(), test)
        shipped = pretrained.load(weights, device=dev, verify=False)  # what users get: fp16 back in float32
        acc16 = exit_accuracies(shipped, test)
        acc_flip = exit_accuracies(shipped, test, flip=True)
        costs = msdnet.exit_costs(model.cpu())
        card = {
            "format": pretrained.CARD_FORMAT,
            "weights": name,
            "preset": preset,
            "training_log": log_file,
            "sha256": pretrained.sha256(weights),
            "file_bytes": weights.stat().st_size,
            "config": chosen["config"],
            "training": training,
            "test_accuracy_per_exit": [round(a, 4) for a in acc16],
            "test_accuracy_per_exit_float32": [round(a, 4) for a in acc32],
            "test_accuracy_per_exit_flip_tta": [round(a, 4) for a in acc_flip],
            "val_accuracy_per_exit": chosen["val_accuracy_per_exit"],
            "test_images": len(test),
            "params_per_exit": [c.params for c in costs],
            "macs_per_exit": [c.macs for c in costs],
            "macs_per_exit_flip_tta": [2 * c.macs for c in costs],
        }
        for path, text in ((new / pretrained.card_path(name), json.dumps(card, indent=2) + "\n"),
                           (new / log_file, "".join(json.dumps(r) + "\n" for r in log))):
            path.write_text(text)
            _sync(path)
        if out.exists():
            _carry(out, new, {name, pretrained.card_path(name).name, log_file})
        _sync(new)
        _switch(new, out)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # the unfinished set, or after the switch the old one
    return card


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers.export`: the command line of export()."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m helpers.export",
                                description="Write a run's weights, card and log into a folder of cards.")
    p.add_argument("--run", required=True, type=Path, help="the run's folder (helpers.train's --out)")
    p.add_argument("--command", required=True, help="the exact training command, recorded in the card")
    p.add_argument("--out", type=Path, default=pretrained.PRETRAINED_DIR, help="default: data/pretrained")
    p.add_argument("--hardware", default=None, help="default: what the run recorded (GPU name, or CPU)")
    p.add_argument("--source", default=None, help=f"CIFAR-10 source (default: ${data.ENV_SOURCE} or torchvision)")
    p.add_argument("--note", default=None, help="a remark kept in the card's training record")
    p.add_argument("--allow-worse", action="store_true",
                   help="replace the card even when its weights score higher on validation, or cannot be compared")
    p.add_argument("--device", default="cpu", help="where the test split is measured: cpu (default), cuda, cuda:N, mps")
    args = p.parse_args(argv)
    try:
        card = export(args.run, args.out, args.command, args.hardware, args.source, args.note, args.allow_worse,
                      args.device)
    except (CheckpointError, data.DataNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was replaced", file=sys.stderr)
        return 130
    accs = card["test_accuracy_per_exit"]
    print(f"wrote {args.out / card['weights']}, its card and {card['training_log']}")
    print("test accuracy per exit: " + " ".join(f"B{k + 1}={a * 100:.2f}" for k, a in enumerate(accs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
