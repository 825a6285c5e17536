"""One training run of `python -m helpers.train`: set up afresh, from given weights or resumed, fed
batch by batch, validated and saved after every epoch."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import checkpoint, data, evaluate, msdnet
from .averaging import WeightAverage
from .cache import fingerprint
from .safeguards import (
    TRAIN_STATE, Diverged, Dist, Progress, append_record, autocast_dtype, check_data, check_resume, hardware_name,
    last_logged_epoch, resolved, run_settings,
)  # fmt: skip
from .schedule import BudgetFit, learning_rate

__all__ = ["Run"]


class Run:
    """One training run: its model, optimizer, data and progress, set up afresh, from --init-from or
    resumed, and its moves: the next batch, the rate of the next step, the end of an epoch, a save.

    Args:
        args: the settings of `train.parse_args`.
        device: the device to train on (checked by `safeguards.device_for`).
    """

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.init_record = None  # the card and log of the --init-from weights, as they were when the run began
        self.settings = run_settings(args)  # as the command that began the run wrote them
        self.init_path = resolved(args.init_from)  # how --resume compares --init-from
        if args.threads:
            torch.set_num_threads(args.threads)
        self.ddp = Dist(device)
        self.out = Path(args.out)
        self.ckpt_path, self.log_path = self.out / "last.pt", self.out / "log.jsonl"
        if args.batch_size % (self.ddp.world * args.accumulate):
            raise ValueError(f"--batch-size {args.batch_size} must divide by processes x --accumulate "
                             f"({self.ddp.world} x {args.accumulate})")
        if not args.resume and self.ckpt_path.exists():
            raise FileExistsError(f"{self.ckpt_path} exists: continue it with --resume, or choose another --out")
        if args.resume and not self.ckpt_path.exists():
            raise checkpoint.CheckpointError(f"--resume: there is no {self.ckpt_path} to resume; drop --resume to start a new run")
        # The files are read before the data, so that a wrong one is refused in seconds.
        resumed = self._read_resume() if args.resume else None
        start = self._read_init_from() if args.init_from and not args.resume else None
        self._load_data()
        if resumed is not None:
            check_data(resumed, self.ckpt_path, self.trained_on)
        torch.manual_seed(args.seed)
        self.model = msdnet.build(args.preset).to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if start is not None:
            checkpoint.load_weights(self.model, start, args.init_from)
        decay = [p for p in self.model.parameters() if p.dim() > 1]
        no_decay = [p for p in self.model.parameters() if p.dim() <= 1]  # batch norm and biases
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, momentum=args.momentum, nesterov=True)
        self.amp = autocast_dtype(args, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.gen = torch.Generator().manual_seed(args.seed)  # data order and augmentation, the same on every rank
        self.average = (WeightAverage(self.model, "swa") if args.swa
                        else WeightAverage(self.model, "ema", args.ema) if args.ema else None)
        self.progress = Progress()
        if resumed is not None:
            self._resume(resumed)
        self.net = nn.parallel.DistributedDataParallel(self.model) if self.ddp.world > 1 else self.model
        self.step_settings = dict(label_smoothing=args.label_smoothing, distill=args.distill,
                                  temperature=args.distill_temperature, amp=self.amp, scaler=self.scaler,
                                  micro_batches=args.accumulate, average=self.average)  # train.train_step's
        self.lr = 0.0
        p = self.progress
        self.fit = BudgetFit(args.fit_to, args.epochs, args.warmup_epochs, self.steps_per_epoch,
                             whole_first_epoch=p.epoch == 0 and p.batch_in_epoch == 0) if args.fit_to else None

    @property
    def epochs(self) -> int:
        """The schedule's length: --epochs, or what --fit-to chose."""
        return self.progress.fitted_epochs or self.args.epochs

    def _read_init_from(self) -> dict:
        args = self.args
        start = checkpoint.read(args.init_from)
        preset = next((name for name, cfg in msdnet.PRESETS.items() if cfg.to_dict() == start["config"]), None)
        if preset not in (None, args.preset):
            raise checkpoint.CheckpointError(
                f"--init-from {args.init_from} holds weights of the preset {preset!r}, not {args.preset!r}: pass --preset {preset}")
        from .export import init_record_of  # the card and log beside the weights, kept for the export

        self.init_record = init_record_of(args.init_from)
        return start

    def _load_data(self) -> None:
        args = self.args
        train_set = data.load("train" if args.val_size else "trainval", args.source, val_size=args.val_size)
        eval_set = data.load(args.eval_split, args.source, val_size=args.val_size)
        if args.train_subset:
            train_set = data.subset(train_set, args.train_subset, "--train-subset")
        if args.eval_subset:
            eval_set = data.subset(eval_set, args.eval_subset, "--eval-subset")
        self.trained_on = {"train_images": len(train_set),
                           "train_fingerprint": fingerprint((train_set.images, train_set.labels))}
        if self.device.type == "cuda":  # CIFAR-10 is 150 MB of uint8: it stays on the GPU
            torch.backends.cudnn.benchmark = True  # the training shapes never change
            train_set = data.Split(train_set.images.to(self.device), train_set.labels.to(self.device))
            eval_set = data.Split(eval_set.images.to(self.device), eval_set.labels.to(self.device))
        self.train_set, self.eval_set = train_set, eval_set
        self.steps_per_epoch = len(train_set) // args.batch_size  # the last partial batch is dropped
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set ({len(train_set)} images) is smaller than one batch ({args.batch_size})")

    def _read_resume(self) -> dict:
        ckpt = checkpoint.read(self.ckpt_path)
        check_resume(ckpt, self.args, self.ckpt_path)
        return ckpt

    def _resume(self, ckpt: dict) -> None:
        path = self.ckpt_path
        checkpoint.load_weights(self.model, ckpt, path)
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
        elif self.ddp.main:  # a compact checkpoint (checkpoint.compact)
            print("this checkpoint carries no optimizer state: the momentum starts again from zero", flush=True)
        if self.average is not None:
            self.average.load_state_dict(ckpt["average"])
        self.gen.set_state(ckpt["generator"])
        self.init_record = ckpt.get("init_record")
        self.settings = ckpt["run"]
        self.progress = p = Progress.from_dict(ckpt)
        if not (self.out / "best.pt").is_file():  # carried without it: the next validated epoch writes one
            p.best_score = -1.0
        if p.epoch_record and self.ddp.main and last_logged_epoch(self.log_path) < p.epoch_record["epoch"]:
            append_record(self.log_path, p.epoch_record)  # stopped between the checkpoint and its log line
        if self.ddp.main:
            print(f"resuming {path} at epoch {p.epoch + 1}, batch {p.batch_in_epoch}/{self.steps_per_epoch}", flush=True)

    def _about(self) -> dict:
        """What every saved file says of the run: its settings, the schedule's length, hardware and data."""
        return {"run": self.settings, "schedule_epochs": self.epochs, "hardware": hardware_name(self.device),
                "torch": str(torch.__version__), "data": self.trained_on, "data_source": data.resolve_source(self.args.source),
                **({"init_record": self.init_record} if self.init_record else {})}  # fmt: skip

    def save(self) -> None:
        """Write last.pt: all that --resume needs."""
        if self.ddp.main:
            checkpoint.write({
                "train_state": TRAIN_STATE, "config": self.model.config.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "generator": self.gen.get_state(), **self.progress.to_dict(), **self._about(),
                **({"init_path": self.init_path} if self.init_path else {}),
                **({"average": self.average.state_dict()} if self.average is not None else {}),
            }, self.ckpt_path)  # fmt: skip

    def batch(self) -> tuple[Tensor, Tensor]:
        """This process's share of the next batch, as images in [0, 1] and labels.

        Every rank augments the whole global batch with the shared generator, then takes its share, so
        the data and the random state are the same whatever the number of processes.
        """
        args, p, dev = self.args, self.progress, self.device
        idx = p.perm[p.batch_in_epoch * args.batch_size : (p.batch_in_epoch + 1) * args.batch_size]
        x = data.random_crop_flip(self.train_set.images[idx].to(dev), generator=self.gen)
        if args.cutout:  # the mean colour in 0..255, which the model normalizes to zero
            x = data.cutout(x, args.cutout, (self.model.mean.view(-1) * 255).round(), generator=self.gen)
        share = args.batch_size // self.ddp.world
        mine = slice(self.ddp.rank * share, (self.ddp.rank + 1) * share)
        x = x[mine].float().div_(255)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.train_set.labels[idx][mine].to(dev)

    def set_learning_rate(self) -> float:
        """Set the optimizer's rate for the next step from the schedule; returns it."""
        p = self.progress
        self.lr = learning_rate(p.epoch * self.steps_per_epoch + p.batch_in_epoch, self.steps_per_epoch, self.args,
                                self.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        return self.lr

    def stepped(self, loss: float) -> None:
        """Count a step taken and its loss."""
        p = self.progress
        p.batch_in_epoch += 1
        p.epoch_images += self.args.batch_size
        p.epoch_loss_sum += loss

    def diverged(self, error: Diverged) -> Diverged:
        """The error to stop with when the next step's loss is not finite, saying where and what to do."""
        p = self.progress
        kept = f"{self.ckpt_path} still holds the last good state" if self.ckpt_path.exists() else "nothing was saved"
        return Diverged(f"{error} at epoch {p.epoch + 1}, step {p.batch_in_epoch + 1} (lr {self.lr:.4g}): the run "
                        f"diverged and was stopped before the bad step; {kept}. Start again with a lower --lr or a "
                        "longer --warmup-epochs.")

    def end_epoch(self, train_seconds: float) -> None:
        """Close the epoch: validate (the average too), keep the best weights, fit the schedule, save, log."""
        args, p, spe = self.args, self.progress, self.steps_per_epoch
        train_end = time.perf_counter()
        epoch_time = p.epoch_time_s + train_seconds  # the whole epoch, also when a resume split it
        record = {"epoch": p.epoch + 1, "step": (p.epoch + 1) * spe,
                  "lr": learning_rate((p.epoch + 1) * spe - 1, spe, args, self.epochs),
                  "train_loss": p.epoch_loss_sum / spe, "eval_split": args.eval_split,
                  "train_images_per_s": round(p.epoch_images / max(epoch_time, 1e-9), 1),
                  "epoch_time_s": round(epoch_time, 1),
                  "compiled": bool(args.compile)}  # a compiled process's first epoch includes the compiling
        p.epoch, p.batch_in_epoch, p.perm, p.epoch_images, p.epoch_loss_sum, p.epoch_time_s = p.epoch + 1, 0, None, 0, 0.0, 0.0
        if self.ddp.main:
            record.update(self.validate())
            record["elapsed_s"] = round(p.elapsed_s, 1)
            p.epoch_record = record
        if self.fit is not None and not p.fitted_epochs:
            self.fit_schedule(train_end, epoch_time)  # before the save: the checkpoint holds the length
        self.save()  # the checkpoint, then the log line that announces it (a resume restores a lost line)
        if self.ddp.main:
            append_record(self.log_path, record)
        self.ddp.barrier()

    def fit_schedule(self, train_end: float, epoch_time: float) -> None:
        """--fit-to, after the first epoch: time a second validation pass (the first one paid for tuning
        its shapes), then let `BudgetFit` choose the schedule's length; rank 0's choice holds on every rank."""
        p = self.progress
        again = time.perf_counter()
        evaluate.exit_accuracies(self.model, self.eval_set, device=self.device)
        eval_s = (time.perf_counter() - again) * (2 if self.average is not None else 1)  # the average's pass too
        spent = p.elapsed_s + time.perf_counter() - train_end
        given, fits, epoch_s = self.fit.epochs(train_end, epoch_time, eval_s, spent, p.epoch)
        if self.ddp.world > 1:
            box = torch.tensor([given], device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(box, 0)
            given = int(box.item())
        p.fitted_epochs = given
        if self.ddp.main:
            print(f"--fit-to {self.args.fit_to:g} s: an epoch takes about {epoch_s:.1f} s with validation; "
                  f"the cosine schedule gets {given} epochs"
                  + (f" (the budget fits {fits}: too few to decay after the warm-up)" if given > fits else ""), flush=True)

    def validate(self) -> dict:
        """Every exit's accuracy on the evaluation split, of the trained weights and of their average;
        on validation, the better of them is kept in best.pt when it beats the best so far."""
        args, p = self.args, self.progress
        start = time.perf_counter()
        kept = accs = [round(a, 5) for a in evaluate.exit_accuracies(self.model, self.eval_set, device=self.device)]
        out = {"eval_images": len(self.eval_set), "acc": accs}
        print(f"epoch {p.epoch}: {args.eval_split} accuracy per exit {_per_exit(accs)}", flush=True)
        if self.average is not None:
            kept = [round(a, 5) for a in evaluate.exit_accuracies(self.average.module, self.eval_set, device=self.device)]
            out.update(average=self.average.kind, acc_average=kept)
            print(f"epoch {p.epoch}: {self.average.kind} average, per exit {_per_exit(kept)}", flush=True)
        out["eval_time_s"] = round(time.perf_counter() - start, 1)
        if args.eval_split == "val" and sum(kept) / len(kept) > p.best_score:  # chosen on validation only
            p.best_score = sum(kept) / len(kept)
            weights = self.average.module if self.average is not None else self.model
            checkpoint.write({"config": self.model.config.to_dict(), "model": weights.state_dict(),
                              "weights": self.average.kind if self.average is not None else "trained",
                              "epoch": p.epoch, "elapsed_s": p.elapsed_s, "val_accuracy_per_exit": kept,
                              **self._about()}, self.out / "best.pt")  # fmt: skip
        return out


def _per_exit(accs: list[float]) -> str:
    return " ".join(f"B{k + 1}={a:.3f}" for k, a in enumerate(accs))
