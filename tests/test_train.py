"""Training: schedule, loss, the step, weight averages, exact resume, DistributedDataParallel, and the errors a
user can hit."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import atomic, checkpoint, evaluate, msdnet, run, safeguards, train


def tiny_args(out: Path, source: Path, *extra: str):
    """A few steps of the tiny preset on the tiny dataset (60 training images, 12 held out)."""
    return train.parse_args([
        "--preset", "tiny", "--source", str(source), "--out", str(out), "--val-size", "12",
        "--batch-size", "16", "--epochs", "3", "--lr", "0.05", "--schedule", "cosine", "--warmup-epochs", "0.5",
        "--label-smoothing", "0.1", "--weight-decay", "5e-4", *extra,
    ])  # fmt: skip


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_paper_schedule_divides_by_ten_at_half_and_three_quarters():
    args = train.parse_args(["--epochs", "300", "--lr", "0.1"])
    lr = lambda epoch: train.learning_rate(epoch * 100, 100, args)
    assert [lr(0), lr(149), lr(150), lr(224), lr(225), lr(299)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    args = train.parse_args(["--epochs", "10", "--lr", "0.2", "--schedule", "cosine", "--warmup-epochs", "1"])
    lrs = [train.learning_rate(s, 100, args) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.2 / 100) and lrs[99] == pytest.approx(0.2)
    assert lrs[100] == pytest.approx(0.2) and lrs[550] == pytest.approx(0.1)  # half-way through the decay
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[100:], lrs[101:]))


def test_constant_schedule_warms_up_then_holds_the_rate():
    args = train.parse_args(["--epochs", "10", "--lr", "0.02", "--schedule", "constant", "--warmup-epochs", "0.5"])
    lrs = [train.learning_rate(s, 100, args) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.02 / 50) and lrs[49] == pytest.approx(0.02)
    assert lrs[50:] == pytest.approx([0.02] * 950)


def test_multi_exit_loss_is_the_sum_of_each_exits_cross_entropy():
    logits = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    labels = torch.tensor([0])
    want = -math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)
    assert train.multi_exit_loss(logits, labels).item() == pytest.approx(want)
    smoothed = train.multi_exit_loss(logits, labels, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(sum(F.cross_entropy(z, labels, label_smoothing=0.1) for z in logits).item())


def test_distillation_loss_has_the_known_value():
    # Two exits, label 0: the first exit is unsure (p = 1/2, 1/2), the last is sure (p = e^2/(e^2+1), 1/(e^2+1)).
    first, last = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    labels = torch.tensor([0])
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)  # KL(teacher || student) at T = 1
    ce_first, ce_last = math.log(2), -math.log(p[0])
    got = train.multi_exit_loss([first, last], labels, distill=0.25, temperature=1.0).item()
    assert got == pytest.approx(0.75 * ce_first + 0.25 * kl + ce_last)
    # At temperature T the soft term is T^2 KL of the softened distributions.
    q = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax([2, 0] / 2)
    kl2 = sum(qi * math.log(qi / 0.5) for qi in q)
    got = train.multi_exit_loss([first, last], labels, distill=1.0, temperature=2.0).item()
    assert got == pytest.approx(4 * kl2 + ce_last)
    assert train.multi_exit_loss([first, last], labels, distill=0.0).item() == pytest.approx(ce_first + ce_last)


def test_distillation_teaches_the_earlier_exits_only():
    """The teacher is detached: the last exit's gradient is that of its own cross-entropy."""
    torch.manual_seed(0)
    logits = [torch.randn(5, 10, requires_grad=True) for _ in range(3)]
    labels = torch.randint(0, 10, (5,))
    train.multi_exit_loss(logits, labels, distill=0.7, temperature=3.0).backward()
    last = logits[-1].detach().requires_grad_()
    F.cross_entropy(last, labels).backward()
    assert torch.allclose(logits[-1].grad, last.grad)
    assert all(z.grad.abs().sum() > 0 for z in logits[:-1])


def test_a_few_epochs_lower_the_loss_and_log_every_exit(tmp_path, tiny_folder):
    args = tiny_args(tmp_path / "run", tiny_folder, "--epochs", "8", "--lr", "0.1", "--schedule", "paper", "--label-smoothing", "0")
    train.train(args)
    records = log_records(tmp_path / "run")
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert all(len(r["acc"]) == 4 and r["eval_split"] == "val" and r["eval_images"] == 12 for r in records)
    # The tiny images carry their class in the red channel: the loss must fall well below its start.
    assert records[-1]["train_loss"] < 0.75 * records[0]["train_loss"]  # chance: 4 exits x ln(10) = 9.2
    # The checkpoint holds tensors and plain types only.
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 8 and ckpt["config"] == msdnet.PRESETS["tiny"].to_dict()
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["weights"] == "trained"


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = state(a / "last.pt"), state(b / "last.pt")
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), name
    for key, buf in sa["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], sb["optimizer"]["state"][key]["momentum_buffer"])
    assert ("average" in sa) == ("average" in sb)
    if "average" in sa:
        assert sa["average"].keys() == sb["average"].keys()
        assert all(torch.equal(sa["average"][k], sb["average"][k]) for k in sa["average"])
    assert [r["acc"] for r in log_records(a)] == [r["acc"] for r in log_records(b)]
    assert [r.get("acc_average") for r in log_records(a)] == [r.get("acc_average") for r in log_records(b)]
    assert [r["train_loss"] for r in log_records(a)] == [r["train_loss"] for r in log_records(b)]


@pytest.mark.parametrize(
    "stop_at, extra",
    [(2, ()), (3, ()), (6, ()), (4, ("--ema", "0.9", "--distill", "0.5")), (5, ("--cutout", "16"))],
)  # mid-epoch, the last step of epoch 1, mid-epoch 2; with a moving average and distillation; with cutout
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, tiny_folder, stop_at, extra):
    train.train(tiny_args(tmp_path / "straight", tiny_folder, *extra))

    def interrupt(step):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(tmp_path / "stopped", tiny_folder, *extra), on_step=interrupt)
    saved = state(tmp_path / "stopped" / "last.pt")
    assert saved["epoch"] * 3 + saved["batch_in_epoch"] == stop_at  # 48 images / 16 = 3 steps an epoch
    train.train(tiny_args(tmp_path / "stopped", tiny_folder, *extra, "--resume"))
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    if extra:
        assert torch.equal(state(tmp_path / "straight" / "best.pt")["model"]["classifiers.0.linear.weight"],
                           state(tmp_path / "stopped" / "best.pt")["model"]["classifiers.0.linear.weight"])


@pytest.mark.slow  # torch.compile: a minute or more on 2 cores
def test_compile_takes_the_same_step_and_a_run_may_resume_with_it(tmp_path, tiny_folder, monkeypatch):
    """--compile changes the speed, not the run: its first step lands where the uncompiled step does (to
    float rounding: the fused kernels sum in another order; later steps amplify such rounding on this tiny
    model as much as channels_last does, so one step is compared), and a run begun without it resumes with it."""
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or real_compile(module, **kw))

    def interrupt(step):
        if step == 1:
            raise KeyboardInterrupt

    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    traced = []
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        counters.clear()
        with pytest.raises(KeyboardInterrupt):
            train.train(tiny_args(tmp_path / name, tiny_folder, "--epochs", "1", *extra), on_step=interrupt)
        traced.append(counters["stats"]["unique_graphs"])  # graphs dynamo traced: only a compiled step makes any
    assert len(compiled) == 1 and traced[0] == 0 and traced[1] >= 1
    a, b = state(tmp_path / "eager" / "last.pt"), state(tmp_path / "compiled" / "last.pt")
    assert a["batch_in_epoch"] == b["batch_in_epoch"] == 1 and a["model"].keys() == b["model"].keys()
    torch.manual_seed(0)  # the runs' --seed: the weights both began from
    start = msdnet.build("tiny").state_dict()
    name = "classifiers.0.linear.weight"
    assert not torch.allclose(a["model"][name], start[name], atol=1e-4)  # the step moved the weights...
    for key in a["model"]:  # ...and both runs moved them alike
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), rtol=1e-4, atol=1e-5), key
    train.train(tiny_args(tmp_path / "eager", tiny_folder, "--epochs", "1", "--resume", "--compile"))
    assert len(compiled) == 2 and state(tmp_path / "eager" / "last.pt")["epoch"] == 1
    record = json.loads((tmp_path / "eager" / "log.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["compiled"] is True  # the log says why this epoch's time is longer
    torch._dynamo.reset()  # no compiled code left behind for the tests after this one


def test_cutout_changes_what_the_network_sees_and_is_recorded(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "plain", tiny_folder))
    train.train(tiny_args(tmp_path / "cut", tiny_folder, "--cutout", "16"))
    plain, cut = log_records(tmp_path / "plain"), log_records(tmp_path / "cut")
    assert [r["train_loss"] for r in plain] != [r["train_loss"] for r in cut]
    assert state(tmp_path / "cut" / "last.pt")["run"]["cutout"] == 16
    with pytest.raises(SystemExit):
        train.parse_args(["--cutout", "-1"])


def test_the_moving_average_is_evaluated_and_the_best_validation_epoch_kept(tmp_path, tiny_folder):
    from helpers import data

    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "4", "--lr", "0.1", "--ema", "0.5"))
    records = log_records(tmp_path / "run")
    assert all(len(r["acc_average"]) == 4 and r["average"] == "ema" for r in records)
    means = [sum(r["acc_average"]) / 4 for r in records]
    best = state(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 1 + means.index(max(means)) and best["weights"] == "ema"
    assert best["val_accuracy_per_exit"] == records[best["epoch"] - 1]["acc_average"]
    # The kept weights are the averaged ones: evaluated again, they give the logged validation accuracy.
    model = msdnet.build("tiny")
    model.load_state_dict(best["model"])
    val = data.load("val", tiny_folder, val_size=12)
    assert evaluate.exit_accuracies(model, val) == pytest.approx(best["val_accuracy_per_exit"], abs=1e-5)
    # With the test split as the per-epoch measure nothing is chosen: choosing on test would leak it.
    train.train(tiny_args(tmp_path / "on-test", tiny_folder, "--epochs", "1", "--eval-split", "test", "--ema", "0.5"))
    assert not (tmp_path / "on-test" / "best.pt").exists()


def test_swa_keeps_the_equal_weight_mean_of_the_weights_after_every_step(tmp_path, tiny_folder, monkeypatch):
    from helpers.averaging import WeightAverage

    seen = []  # the trained weights the average is given after each step
    update = WeightAverage.update

    def record(self, model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        update(self, model)

    monkeypatch.setattr(WeightAverage, "update", record)
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "2", "--schedule", "constant", "--swa"))
    assert len(seen) == 6  # 2 epochs of 3 steps (48 training images, batch 16)
    average = state(tmp_path / "run" / "last.pt")["average"]
    floats = [k for k, v in seen[0].items() if v.is_floating_point()]  # weights and batch-norm statistics
    assert len(floats) > 100
    for key in floats:
        assert torch.allclose(average["module." + key], sum(w[key] for w in seen) / len(seen), atol=1e-6), key
    records = log_records(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2] and all(r["average"] == "swa" for r in records)
    assert "acc_ema" not in records[0] and len(records[0]["acc_average"]) == 4
    assert state(tmp_path / "run" / "best.pt")["weights"] == "swa"


def test_weight_averages_have_their_known_values():
    from helpers.averaging import WeightAverage

    model = torch.nn.Linear(1, 1, bias=False)
    ema, swa = WeightAverage(model, "ema", decay=0.5), WeightAverage(model, "swa")
    for w in (4.0, 8.0, 2.0):
        model.weight.data.fill_(w)
        ema.update(model)
        swa.update(model)
    assert ema.module.weight.item() == pytest.approx((4 * 0.5 + 8 * 0.5) * 0.5 + 2 * 0.5)  # the first copies
    assert swa.module.weight.item() == pytest.approx((4 + 8 + 2) / 3)
    assert int(swa.n_averaged) == 3 and set(swa.state_dict()) == {"module.weight", "n_averaged"}


@pytest.mark.slow  # torch.compile: a minute or more on 2 cores
def test_the_weight_average_updates_without_reading_back_from_the_device():
    """Any data-dependent branch (a read back to the host, a stall on a GPU) breaks a full graph."""
    from helpers.averaging import WeightAverage

    model = msdnet.build("tiny")
    for kind in ("ema", "swa"):
        average = WeightAverage(model, kind, decay=0.9)
        step = torch.compile(average.update, backend="eager", fullgraph=True)
        step(model)
        step(model)
        assert int(average.n_averaged) == 2
    torch._dynamo.reset()


def test_the_train_step_takes_the_step_of_the_loop_notebook_02_teaches():
    torch.manual_seed(1)
    a, b = msdnet.build("tiny"), msdnet.build("tiny")
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True) for m in (a, b))
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss = train.train_step(a, opt_a, x, y)
    want = train.multi_exit_loss(b(x), y)
    opt_b.zero_grad()
    want.backward()
    opt_b.step()
    assert loss == pytest.approx(want.item())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # Two micro-batches of 4 sum to the gradient of the batch of 8: the same step, to rounding (in eval
    # mode, so that batch norm does not normalize each micro-batch by its own statistics).
    c = msdnet.build("tiny")
    c.load_state_dict(a.state_dict())
    a.eval(), c.eval()
    opt_c = torch.optim.SGD(c.parameters(), lr=0.1)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    train.train_step(a, opt_a, x, y, micro_batches=1)
    train.train_step(c, opt_c, x, y, micro_batches=2)
    assert all(torch.allclose(p, q, atol=1e-3) for p, q in zip(a.parameters(), c.parameters()))


def test_the_train_step_refuses_a_loss_that_is_not_finite_before_stepping():
    model = msdnet.build("tiny")
    model.classifiers[-1].linear.bias.data[0] = float("inf")  # the last exit's loss is not finite
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(safeguards.Diverged, match="the loss became nan"):
        train.train_step(model, optimizer, torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # no step was taken


@pytest.mark.slow  # torch.compile: a minute or more on 2 cores
def test_the_compiled_step_compiles_once_and_updates_the_average(tmp_path, tiny_folder, monkeypatch):
    """--compile with static shapes: batch 20 of 48 images drops the last 8 of every epoch, so every
    step has the same shape and nothing compiles again; the average is updated after every step."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # a recompile fails the run
    counters = torch._dynamo.utils.counters
    counters.clear()
    out = tmp_path / "run"
    train.train(tiny_args(out, tiny_folder, "--compile", "--swa", "--schedule", "constant", "--batch-size", "20",
                          "--epochs", "2"))
    assert counters["stats"]["unique_graphs"] >= 1  # the step ran compiled
    last = state(out / "last.pt")
    assert last["epoch"] == 2 and int(last["average"]["n_averaged"]) == 4  # 2 steps an epoch, 8 images dropped
    assert [r["compiled"] for r in log_records(out)] == [True, True]
    torch._dynamo.reset()


def test_an_older_resume_state_is_refused_with_one_message(tmp_path, tiny_folder, capsys):
    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(out, tiny_folder), on_step=interrupt)
    argv = ["--preset", "tiny", "--source", str(tiny_folder), "--out", str(out), "--val-size", "12", "--batch-size", "16",
            "--epochs", "3", "--lr", "0.05", "--schedule", "cosine", "--warmup-epochs", "0.5", "--label-smoothing", "0.1",
            "--weight-decay", "5e-4", "--resume"]  # fmt: skip
    saved = state(out / "last.pt")
    for older in ({k: v for k, v in saved.items() if k != "train_state"}, {**saved, "format": "msdnet-train/1"}):
        torch.save(older, out / "last.pt")
        capsys.readouterr()
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert ("another version of helpers.train" in err) or ("format 'msdnet-train/1'" in err)
    torch.save(saved, out / "last.pt")
    assert train.main(argv) == 0


class StepClock:
    """A stand-in for time.perf_counter that advances one second per training step, so times have known answers."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def step(self, stop_at=None):
        def on_step(step):
            self.now += 1.0
            if step == stop_at:
                raise KeyboardInterrupt

        return on_step


def use_clock(monkeypatch) -> StepClock:
    """The training loop and the run read this clock instead of the real one."""
    clock = StepClock()
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(run, "time", clock)
    return clock


@pytest.mark.parametrize("stop_at", [None, 2, 5])  # straight, mid-epoch 1, mid-epoch 2
def test_an_epoch_split_by_a_resume_is_timed_whole(tmp_path, tiny_folder, monkeypatch, stop_at):
    clock = use_clock(monkeypatch)
    if stop_at is not None:
        with pytest.raises(KeyboardInterrupt):
            train.train(tiny_args(tmp_path / "run", tiny_folder), on_step=clock.step(stop_at))
        assert state(tmp_path / "run" / "last.pt")["epoch_time_s"] == stop_at % 3  # the split epoch's part so far
    train.train(tiny_args(tmp_path / "run", tiny_folder, *(["--resume"] if stop_at else [])), on_step=clock.step())
    records = log_records(tmp_path / "run")
    # 3 steps of 16 images an epoch, one second each: whole epochs, whichever process ran them.
    assert [r["epoch_time_s"] for r in records] == [3.0, 3.0, 3.0]
    assert [r["train_images_per_s"] for r in records] == [16.0, 16.0, 16.0]
    assert [r["elapsed_s"] for r in records] == [3.0, 6.0, 9.0]


@pytest.mark.parametrize("budget, cap, want", [(10, 20, 3), (11.9, 20, 3), (12, 20, 4), (100, 5, 5), (2, 20, 2)])
def test_fit_to_gives_the_schedule_the_epochs_that_fit_the_budget(tmp_path, tiny_folder, monkeypatch, budget, cap, want):
    # 3 steps an epoch at one second each, validation free: the first epoch spends 3 of the budget and
    # each further epoch 3 more, so 10 s fit 1 + 2 epochs, 12 s fit 1 + 3; --epochs caps it; 2 s fit only
    # the warm-up epoch, and the schedule still gets one more, so that the rate decays.
    clock = use_clock(monkeypatch)
    out = tmp_path / "run"
    args = tiny_args(out, tiny_folder, "--epochs", str(cap), "--warmup-epochs", "1", "--fit-to", str(budget))
    train.train(args, on_step=clock.step())
    assert args.epochs == cap  # the settings are left as given
    records = log_records(out)
    assert [r["epoch"] for r in records] == list(range(1, want + 1))
    last = state(out / "last.pt")
    assert last["fitted_epochs"] == last["schedule_epochs"] == want and last["run"]["epochs"] == cap
    if want > 1:  # the cosine decays over the fitted epochs, to nearly zero at the last step
        assert records[-1]["lr"] == pytest.approx(train.learning_rate(3 * want - 1, 3, train.parse_args(
            ["--epochs", str(want), "--lr", "0.05", "--schedule", "cosine", "--warmup-epochs", "1"])))
        assert records[-1]["lr"] < 0.05 / 3  # well below the peak: it decayed


def test_budget_fit_counts_the_timed_steps_and_the_validation():
    from helpers.schedule import BudgetFit

    fit = BudgetFit(budget_s=100, cap=50, warmup_epochs=1, steps_per_epoch=8, whole_first_epoch=True)
    for batch, now in enumerate([0, 30, 31, 32, 33, 34, 35, 36]):  # when each step starts: the first takes 30 s
        fit.before_step(batch, now)
    assert fit.start == (31, 2)  # timing begins at the first quarter
    # Steps 2..7 take 6 s: 1 s a step, an epoch 8 s + 2 s of validation; the 60 s left fit 6 more.
    assert fit.epochs(train_end=37, epoch_time=37, eval_s=2, spent_s=40, done=1) == (7, 7, 10.0)
    assert fit.epochs(train_end=37, epoch_time=37, eval_s=2, spent_s=99, done=1)[0] == 2  # one epoch to decay
    split = BudgetFit(budget_s=100, cap=50, warmup_epochs=1, steps_per_epoch=8, whole_first_epoch=False)
    split.before_step(4, 0.0)  # a resumed first epoch is not timed in part: its whole time counts
    assert split.start is None and split.epochs(train_end=0, epoch_time=16, eval_s=0, spent_s=16, done=1)[2] == 16


@pytest.mark.parametrize("stop_at", [4, 3, 1])  # in epoch 2, after the fit; after epoch 1's steps, before it; in epoch 1
def test_a_fitted_run_resumes_with_its_fitted_length_and_the_same_weights(tmp_path, tiny_folder, monkeypatch, stop_at):
    flags = ("--epochs", "20", "--warmup-epochs", "1", "--fit-to", "10")
    clock = use_clock(monkeypatch)
    train.train(tiny_args(tmp_path / "straight", tiny_folder, *flags), on_step=clock.step())
    clock = use_clock(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # a resumed first epoch is timed whole: 3 steps of 1 s, as straight
        train.train(tiny_args(tmp_path / "split", tiny_folder, *flags), on_step=clock.step(stop_at))
    train.train(tiny_args(tmp_path / "split", tiny_folder, *flags, "--resume"), on_step=clock.step())
    assert [r["epoch"] for r in log_records(tmp_path / "split")] == [1, 2, 3]
    a, b = state(tmp_path / "straight" / "last.pt"), state(tmp_path / "split" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fit_to_times_the_steps_after_the_first_quarter_and_both_validations(tmp_path, tiny_folder, monkeypatch):
    # 6 steps an epoch: the first takes 10 s (warm-up), the others 1 s; every validation pass 1 s, and with
    # the moving average an epoch has two. The first epoch spends 15 s of training, 2 s of validation and
    # a 1 s timing pass; a later epoch costs 6 + 2 = 8 s, so a 48 s budget fits 1 + floor(30 / 8) = 4 epochs
    # (5 if the average's pass were left out, 6 without validation, 2 with the warm-up step counted).
    clock = use_clock(monkeypatch)
    validate = evaluate.exit_accuracies

    def slow_validation(*args, **kwargs):
        clock.now += 1.0
        return validate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "exit_accuracies", slow_validation)

    def on_step(step):
        clock.now += 10.0 if step == 1 else 1.0

    out = tmp_path / "run"
    train.train(tiny_args(out, tiny_folder, "--batch-size", "8", "--epochs", "20", "--warmup-epochs", "1",
                          "--ema", "0.9", "--fit-to", "48"), on_step=on_step)
    assert state(out / "last.pt")["fitted_epochs"] == 4
    assert [r["epoch"] for r in log_records(out)] == [1, 2, 3, 4]


def test_resume_with_other_settings_is_refused(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1"))
    with pytest.raises(checkpoint.CheckpointError, match="--lr: checkpoint 0.05, now 0.1"):
        train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1", "--lr", "0.1", "--resume"))


def test_an_existing_run_is_not_overwritten(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1"))
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_checkpoint_is_refused_clearly(tmp_path, tiny_folder, damage):
    train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1"))
    path = tmp_path / "run" / "last.pt"
    raw = path.read_bytes()
    path.write_bytes(b"\x00garbage" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        train.train(tiny_args(tmp_path / "run", tiny_folder, "--epochs", "1", "--resume"))


def test_weights_for_another_config_are_refused_by_name(tmp_path):
    other = msdnet.build("tiny", growth_rate=6)
    path = tmp_path / "other.pt"
    checkpoint.save(other, path)
    with pytest.raises(checkpoint.CheckpointError, match="growth_rate: checkpoint 6 vs model 4"):
        checkpoint.load_weights(msdnet.build("tiny"), checkpoint.read(path), path)


def test_init_from_starts_from_given_weights(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "first", tiny_folder, "--epochs", "1"))
    args = tiny_args(tmp_path / "second", tiny_folder, "--epochs", "1", "--init-from", str(tmp_path / "first" / "last.pt"), "--lr", "0")
    train.train(args)  # lr 0: the weights stay those it started from
    a, b = state(tmp_path / "first" / "last.pt")["model"], state(tmp_path / "second" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a if "running" not in k and "num_batches" not in k)


def test_resume_compares_init_from_as_a_resolved_path(tmp_path, tiny_folder, monkeypatch):
    start = tmp_path / "weights" / "start.pt"
    checkpoint.save(msdnet.build("tiny"), start)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link.pt").symlink_to(start)

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "weights")
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(out, tiny_folder, "--init-from", "start.pt"), on_step=interrupt)
    monkeypatch.chdir(tmp_path / "elsewhere")  # the same file, spelled another way from another folder
    for spelling in ("../weights/./start.pt", str(tmp_path / "link.pt")):
        args = tiny_args(out, tiny_folder, "--init-from", spelling, "--resume", "--time-limit", "1e-9")
        with pytest.raises(safeguards.TimeUp):  # resumed: stopped after one step, resumable again
            train.train(args)
    (tmp_path / "other.pt").write_bytes(start.read_bytes())  # the same weights in another file: another run
    with pytest.raises(checkpoint.CheckpointError, match="--init-from: checkpoint 'start.pt', now"):
        train.train(tiny_args(out, tiny_folder, "--init-from", str(tmp_path / "other.pt"), "--resume"))
    train.train(tiny_args(out, tiny_folder, "--init-from", "../weights/start.pt", "--resume"))
    assert state(out / "last.pt")["epoch"] == 3


def test_atomic_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic.save({"x": torch.ones(1)}, path)

    def crash(obj, f):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        atomic.save({"x": torch.zeros(1)}, path)
    assert torch.load(path, weights_only=True)["x"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_a_subset_larger_than_the_split_names_its_flag(tmp_path, tiny_folder, capsys):
    argv = ["--preset", "tiny", "--source", str(tiny_folder), "--out", str(tmp_path / "run"), "--val-size", "12"]
    assert train.main([*argv, "--eval-subset", "13"]) == 2
    assert "error: --eval-subset must be between 1 and 12 (the split's images), got 13" in capsys.readouterr().err


def test_weights_of_another_preset_name_the_preset_to_pass(tmp_path, tiny_folder, capsys):
    seed = tmp_path / "seed.pt"
    checkpoint.save(msdnet.build("seed"), seed)
    argv = ["--preset", "tiny", "--source", str(tiny_folder), "--out", str(tmp_path / "run"), "--val-size", "12",
            "--batch-size", "16"]
    assert train.main([*argv, "--init-from", str(seed)]) == 2
    assert f"--init-from {seed} holds weights of the preset 'seed', not 'tiny': pass --preset seed" in capsys.readouterr().err


def test_a_broken_card_beside_the_starting_weights_is_named(tmp_path, tiny_folder, capsys):
    start = tmp_path / "start.pt"
    checkpoint.save(msdnet.build("tiny"), start)
    start.with_suffix(".json").write_text("[1, 2]")
    argv = ["--preset", "tiny", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--val-size", "12",
            "--batch-size", "16", "--init-from", str(start)]
    assert train.main(argv) == 2  # before the data: the source does not exist
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(start.with_suffix(".json")) in err and err.count("\n") == 1


def test_cli_reports_missing_data_in_one_clear_message(tmp_path, capsys):
    rc = train.main(["--preset", "tiny", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10 could not be loaded") and "Traceback" not in err


def run_cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29531"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "helpers.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_ddp_with_two_cpu_processes_agrees_with_one_process(tmp_path, tiny_folder):
    common = ["--preset", "tiny", "--source", str(tiny_folder), "--val-size", "12", "--batch-size", "16",
              "--epochs", "2", "--lr", "0.05", "--schedule", "cosine", "--device", "cpu", "--threads", "1"]  # fmt: skip
    # Two processes of 8 images each, gradients averaged, equal one process with 2 micro-batches of 8.
    ddp = run_cli([*common, "--out", str(tmp_path / "ddp")], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = run_cli([*common, "--out", str(tmp_path / "one"), "--accumulate", "2"])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = state(tmp_path / "ddp" / "last.pt")["model"], state(tmp_path / "one" / "last.pt")["model"]
    params = dict(msdnet.build("tiny").named_parameters())
    assert set(params) <= set(a)
    for name in params:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert not torch.equal(a[next(iter(params))], msdnet.build("tiny").state_dict()[next(iter(params))])  # it trained


@pytest.mark.slow  # the real CIFAR-10: the slow lane
def test_cli_short_run_on_the_real_mirror_and_resume(tmp_path, real_cifar, monkeypatch):
    from conftest import REAL_SOURCE

    real_cifar("test")  # fails (in CI) or skips when the mirror is absent
    args = ["--preset", "tiny", "--source", REAL_SOURCE, "--out", str(tmp_path / "real"), "--epochs", "2",
            "--batch-size", "64", "--train-subset", "2560", "--eval-subset", "500", "--schedule", "cosine", "--lr", "0.1"]  # fmt: skip
    assert train.main(args) == 0
    assert train.main([*args, "--resume"]) == 0  # already finished: resumes to the end, nothing to do
    records = log_records(tmp_path / "real")
    assert len(records) == 2 and records[-1]["eval_images"] == 500
    assert records[-1]["acc"][-1] > 0.15  # better than chance (0.10) after 80 steps on real photos


def test_a_compact_checkpoint_resumes_at_the_same_step(tmp_path, tiny_folder, capsys):
    """checkpoint.compact keeps a run going across machines: half-precision weights and moving average,
    no optimizer state; --resume goes on from the same step with the momentum starting from zero."""
    extra = ("--ema", "0.9")

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(tmp_path / "run", tiny_folder, *extra), on_step=interrupt)
    full = tmp_path / "run" / "last.pt"
    checkpoint.compact(full, tmp_path / "small.pt")
    small = state(tmp_path / "small.pt")
    assert "optimizer" not in small and (small["epoch"], small["batch_in_epoch"]) == (1, 1)
    assert {v.dtype for v in small["model"].values() if v.is_floating_point()} == {torch.float16}
    assert (tmp_path / "small.pt").stat().st_size < 0.7 * full.stat().st_size
    (tmp_path / "small.pt").replace(full)
    (tmp_path / "run" / "best.pt").unlink()  # as when only last.pt and the log were carried over
    train.train(tiny_args(tmp_path / "run", tiny_folder, *extra, "--resume"))
    assert "momentum starts again from zero" in capsys.readouterr().out
    assert [r["epoch"] for r in log_records(tmp_path / "run")] == [1, 2, 3]
    assert state(tmp_path / "run" / "best.pt")["epoch"] >= 2  # chosen again among the epochs run since


def test_a_diverging_run_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, tiny_folder, capsys,
                                                                                           monkeypatch):
    """Epoch 1 is saved; in epoch 2 a batch makes the loss infinite: the run ends with one line, and last.pt
    still holds epoch 1's state, not one the bad step touched."""
    real, calls = train.multi_exit_loss, []

    def poisoned(*args, **kwargs):  # the 5th batch's (epoch 2, step 2) loss is infinite
        calls.append(1)
        return real(*args, **kwargs) * (float("inf") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(train, "multi_exit_loss", poisoned)
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--source", str(tiny_folder), "--out", str(out), "--val-size", "12", "--batch-size", "16",
            "--epochs", "3", "--lr", "0.05", "--schedule", "cosine", "--ema", "0.5"]  # fmt: skip
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "the loss became inf at epoch 2, step 2" in err and f"{out / 'last.pt'} still holds the last good state" in err
    assert "lower --lr" in err and "Traceback" not in err
    saved = state(out / "last.pt")
    assert (saved["epoch"], saved["batch_in_epoch"]) == (1, 0)  # the state epoch 1 ended with
    for part in (saved["model"], saved["average"]):
        assert all(torch.isfinite(v).all() for v in part.values() if v.is_floating_point())
    assert [r["epoch"] for r in log_records(out)] == [1]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, tiny_folder):
    out = tmp_path / "run"
    with safeguards.exclusive(out):  # as a run in another process holds it
        with pytest.raises(safeguards.OutFolderBusy, match="another training run is writing to"):
            train.train(tiny_args(out, tiny_folder, "--epochs", "1"))
    train.train(tiny_args(out, tiny_folder, "--epochs", "1"))  # free again once it ended


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "mps", "foo"])
def test_a_device_this_machine_lacks_is_named_before_the_data_loads(tmp_path, device, capsys):
    if device == "cuda" and torch.cuda.is_available() or device == "cuda:3" and torch.cuda.device_count() > 3:
        pytest.skip(f"this machine has {device}")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has mps")
    # The source does not exist: an error about the data would mean it was read first.
    argv = ["--preset", "tiny", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--device", device]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --device {device}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "cpu" in err and "CIFAR-10" not in err  # what to use instead
    assert not (tmp_path / "run").exists()


def test_the_command_line_names_a_missing_device_in_one_line(tmp_path):
    done = run_cli(["--preset", "tiny", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                    "--device", "foo"])
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: --device foo: unknown device 'foo': use one of cpu")


def test_an_out_folder_that_cannot_be_written_is_named_in_one_line(tmp_path, tiny_folder, capsys):
    argv = ["--preset", "tiny", "--source", str(tiny_folder), "--val-size", "12", "--batch-size", "16"]
    (tmp_path / "a-file").write_text("")
    places = [tmp_path / "a-file" / "run"]  # under a file
    if os.geteuid() != 0:  # a folder without write permission (root writes anywhere)
        (tmp_path / "locked").mkdir(mode=0o500)
        places.append(tmp_path / "locked" / "run")
    else:
        try:
            Path("/sys/msdnet-test").mkdir()
        except OSError:
            places.append(Path("/sys/msdnet-test"))  # a read-only file system
    for place in places:
        assert train.main([*argv, "--out", str(place)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {place}: cannot write there (") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path):
    assert train.main(["--preset", "tiny", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_a_log_line_lost_after_its_checkpoint_is_restored_on_resume(tmp_path, tiny_folder):
    train.train(tiny_args(tmp_path / "straight", tiny_folder))
    out = tmp_path / "run"

    def interrupt(step):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(out, tiny_folder), on_step=interrupt)
    log = out / "log.jsonl"
    log.write_text("")  # killed after epoch 1's checkpoint, before its log line
    train.train(tiny_args(out, tiny_folder, "--resume"))
    fields = lambda r: (r["epoch"], r["acc"], r["train_loss"])  # the times differ from run to run
    assert list(map(fields, log_records(out))) == list(map(fields, log_records(tmp_path / "straight")))


def test_resume_refuses_other_images_but_not_the_same_folder_written_otherwise(tmp_path, tiny_folder):
    from PIL import Image

    def interrupt(step):
        if step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_args(out, tiny_folder), on_step=interrupt)
    other = tmp_path / "edited"
    import shutil

    shutil.copytree(tiny_folder, other)
    first = sorted((other / "train" / "cat").iterdir())[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(first)  # one training image edited: same count, other content
    args = tiny_args(out, other, "--resume")
    args.source = str(other)
    with pytest.raises(checkpoint.CheckpointError, match="trained on other images"):
        train.train(args)
    args.source = str(tiny_folder) + "/"  # the same folder, written with a trailing slash
    train.train(args)
    assert [r["epoch"] for r in log_records(out)] == [1, 2, 3]


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--distill", "1.5"], "--distill (gamma) must be in [0, 1]"),
    (["--distill-temperature", "0"], "--distill-temperature must be > 0"),
    (["--ema", "1"], "--ema (the decay) must be in [0, 1)"),
    (["--swa", "--ema", "0.999"], "--swa and --ema are two kinds of average: choose one"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1)"),
    (["--fit-to", "60", "--schedule", "paper"], "--fit-to needs --schedule cosine and --warmup-epochs >= 1"),
    (["--fit-to", "60", "--schedule", "cosine", "--warmup-epochs", "0.5"], "--fit-to needs --schedule cosine"),
])
def test_bad_training_settings_are_refused_in_one_line(flags, words, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err
