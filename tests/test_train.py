"""Training: the recipe, schedule, loss, the step, weight averages, the loop, exact resume, stopping cleanly,
DistributedDataParallel, and the errors a user can hit."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import checkpoint, evaluate, msdnet, train
from helpers.interrupts import StopRequest, TimeUp
from helpers.recipe import RECIPES, Recipe, RecipeError
from helpers.runfolder import FolderBusy, RunFolder
from helpers.schedule import learning_rate
from helpers.state import ResumeError

# A few steps of the tiny preset on the tiny dataset (60 training images, 12 held out): 3 steps an epoch.
TINY = Recipe(preset="tiny", epochs=3, batch_size=16, lr=0.05, weight_decay=5e-4, schedule="cosine",
              warmup_epochs=0.5, label_smoothing=0.1, val_size=12)


def run(recipe: Recipe, out: Path, source: Path, **kw) -> dict:
    return train.train(recipe, out, source=str(source), progress_bar=False, **kw)


def stop_at(step: int):
    def interrupt(s):
        if s == step:
            raise KeyboardInterrupt
    return interrupt


def log_records(out: Path) -> list[dict]:
    return RunFolder(out).records()


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- recipe and schedule


def test_the_paper_recipe_is_the_papers_settings():
    paper = RECIPES["paper"]
    assert (paper.epochs, paper.batch_size, paper.lr, paper.momentum, paper.weight_decay, paper.schedule) == \
        (300, 64, 0.1, 0.9, 1e-4, "paper")
    assert Recipe.from_dict(RECIPES["laptop"].to_dict()) == RECIPES["laptop"]


@pytest.mark.parametrize("change, words", [
    ({"epochs": 0}, "epochs must be at least 1, got 0"),
    ({"lr": float("nan")}, "lr must be a finite number >= 0, got nan"),
    ({"distill": 1.5}, "distill (gamma) must be in [0, 1], got 1.5"),
    ({"average": "mean"}, "average must be one of none, ema, swa, got 'mean'"),
    ({"cutout": 64}, "cutout must be 0 (off) to 31 pixels"),
    ({"batch_size": 10, "accumulate": 3}, "accumulate must be at least 1 and divide batch_size"),
    ({"epochs": 2.5}, "epochs must be int, got 2.5"),
    ({"warmup_epochs": 3.0}, "warmup_epochs must be >= 0 and fewer than epochs"),
])
def test_a_recipe_that_cannot_train_is_refused_by_name(change, words):
    with pytest.raises(RecipeError) as e:
        replace(TINY, **change)
    assert words in str(e.value)
    with pytest.raises(RecipeError, match="unknown recipe settings colour"):
        Recipe.from_dict({**TINY.to_dict(), "colour": 1})


def test_paper_schedule_divides_by_ten_at_half_and_three_quarters():
    lr = lambda epoch: learning_rate(epoch * 100, 100, RECIPES["paper"])
    assert [lr(0), lr(149), lr(150), lr(224), lr(225), lr(299)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    recipe = Recipe(epochs=10, lr=0.2, schedule="cosine", warmup_epochs=1.0)
    lrs = [learning_rate(s, 100, recipe) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.2 / 100) and lrs[99] == pytest.approx(0.2)
    assert lrs[100] == pytest.approx(0.2) and lrs[550] == pytest.approx(0.1)  # half-way through the decay
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[100:], lrs[101:]))


def test_constant_schedule_warms_up_then_holds_the_rate():
    recipe = Recipe(epochs=10, lr=0.02, schedule="constant", warmup_epochs=0.5)
    lrs = [learning_rate(s, 100, recipe) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.02 / 50) and lrs[49] == pytest.approx(0.02)
    assert lrs[50:] == pytest.approx([0.02] * 950)


# ----------------------------------------------------------------------------- the loss and the step


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
    q = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax([2, 0] / 2)
    kl2 = sum(qi * math.log(qi / 0.5) for qi in q)
    got = train.multi_exit_loss([first, last], labels, distill=1.0, temperature=2.0).item()
    assert got == pytest.approx(4 * kl2 + ce_last)  # at temperature T the soft term is T^2 KL


def test_distillation_teaches_the_earlier_exits_only():
    """The teacher is detached: the last exit's gradient is that of its own cross-entropy."""
    logits = [torch.randn(5, 10, requires_grad=True) for _ in range(3)]
    labels = torch.randint(0, 10, (5,))
    train.multi_exit_loss(logits, labels, distill=0.7, temperature=3.0).backward()
    last = logits[-1].detach().requires_grad_()
    F.cross_entropy(last, labels).backward()
    assert torch.allclose(logits[-1].grad, last.grad)
    assert all(z.grad.abs().sum() > 0 for z in logits[:-1])


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
    # Two micro-batches of 4 sum to the gradient of the batch of 8 (in eval mode, so that batch norm does
    # not normalize each micro-batch by its own statistics).
    c = msdnet.build("tiny")
    c.load_state_dict(a.state_dict())
    a.eval(), c.eval()
    train.train_step(a, torch.optim.SGD(a.parameters(), lr=0.1), x, y, micro_batches=1)
    train.train_step(c, torch.optim.SGD(c.parameters(), lr=0.1), x, y, micro_batches=2)
    assert all(torch.allclose(p, q, atol=1e-3) for p, q in zip(a.parameters(), c.parameters()))


def test_the_train_step_refuses_a_loss_that_is_not_finite_before_stepping():
    model = msdnet.build("tiny")
    model.classifiers[-1].linear.bias.data[0] = float("inf")  # the last exit's loss is not finite
    before = {k: v.clone() for k, v in model.named_parameters()}
    with pytest.raises(train.Diverged, match="the loss became nan"):
        train.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.rand(4, 3, 32, 32),
                         torch.zeros(4, dtype=torch.long))
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # no step was taken


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


# ----------------------------------------------------------------------------- the loop


def test_a_few_epochs_lower_the_loss_and_log_every_exit(tmp_path, tiny_folder):
    out = tmp_path / "run"
    record = run(replace(TINY, epochs=8, lr=0.1, schedule="paper", label_smoothing=0.0), out, tiny_folder)
    records = log_records(out)
    assert [r["epoch"] for r in records] == list(range(1, 9)) and record == records[-1]
    assert all(len(r["acc"]) == 4 and r["val_images"] == 12 for r in records)
    # The tiny images carry their class in the red channel: the loss must fall well below its start.
    assert records[-1]["train_loss"] < 0.75 * records[0]["train_loss"]  # chance: 4 exits x ln(10) = 9.2
    # The log tells the run's speed and time; the elapsed time adds up the epochs'.
    assert all(r["train_images_per_s"] > 0 and "CPU" in r["hardware"] for r in records)
    assert records[-1]["elapsed_s"] == pytest.approx(sum(r["epoch_time_s"] for r in records), abs=0.5)
    # The state holds tensors and plain types only; best.pt holds the weights chosen on validation.
    saved = state(out / "last.pt")
    assert saved["progress"]["epoch"] == 8 and saved["recipe"]["epochs"] == 8
    best = state(out / "best.pt")
    means = [sum(r["acc"]) / 4 for r in records]
    assert best["weights"] == "trained" and best["epoch"] == 1 + means.index(max(means))


def test_the_moving_average_is_evaluated_and_the_best_validation_epoch_kept(tmp_path, tiny_folder):
    from helpers import data

    out = tmp_path / "run"
    run(replace(TINY, epochs=4, lr=0.1, average="ema", ema_decay=0.5), out, tiny_folder)
    records = log_records(out)
    assert all(len(r["acc_average"]) == 4 and r["average"] == "ema" for r in records)
    means = [sum(r["acc_average"]) / 4 for r in records]
    best = state(out / "best.pt")
    assert best["epoch"] == 1 + means.index(max(means)) and best["weights"] == "ema"
    # The kept weights are the averaged ones: evaluated again, they give the logged validation accuracy.
    model = msdnet.build("tiny")
    model.load_state_dict(best["model"])
    val = data.load("val", tiny_folder, val_size=12)
    assert evaluate.exit_accuracies(model, val) == pytest.approx(best["val_accuracy_per_exit"], abs=1e-5)


def test_swa_keeps_the_equal_weight_mean_of_the_weights_after_every_step(tmp_path, tiny_folder, monkeypatch):
    from helpers.averaging import WeightAverage

    seen = []  # the trained weights the average is given after each step
    update = WeightAverage.update

    def record(self, model):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        update(self, model)

    monkeypatch.setattr(WeightAverage, "update", record)
    run(replace(TINY, epochs=2, schedule="constant", average="swa"), tmp_path / "run", tiny_folder)
    assert len(seen) == 6  # 2 epochs of 3 steps (48 training images, batch 16)
    average = state(tmp_path / "run" / "last.pt")["average"]
    floats = [k for k, v in seen[0].items() if v.is_floating_point()]  # weights and batch-norm statistics
    for key in floats:
        assert torch.allclose(average["module." + key], sum(w[key] for w in seen) / len(seen), atol=1e-6), key
    assert state(tmp_path / "run" / "best.pt")["weights"] == "swa"


def test_cutout_changes_what_the_network_sees(tmp_path, tiny_folder):
    run(TINY, tmp_path / "plain", tiny_folder)
    run(replace(TINY, cutout=16), tmp_path / "cut", tiny_folder)
    plain, cut = log_records(tmp_path / "plain"), log_records(tmp_path / "cut")
    assert [r["train_loss"] for r in plain] != [r["train_loss"] for r in cut]


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = state(a / "last.pt"), state(b / "last.pt")
    for name, tensor in sa["model"].items():
        assert torch.equal(tensor, sb["model"][name]), name
    for key, buf in sa["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], sb["optimizer"]["state"][key]["momentum_buffer"])
    assert (sa["average"] is None) == (sb["average"] is None)
    if sa["average"] is not None:
        assert all(torch.equal(sa["average"][k], sb["average"][k]) for k in sa["average"])
    assert torch.equal(sa["generator"], sb["generator"])
    fields = lambda r: (r["epoch"], r["acc"], r.get("acc_average"), r["train_loss"])  # times differ run to run
    assert list(map(fields, log_records(a))) == list(map(fields, log_records(b)))


@pytest.mark.parametrize("stop, change", [
    (2, {}), (3, {}), (6, {}), (4, {"average": "ema", "ema_decay": 0.9, "distill": 0.5}), (5, {"cutout": 16}),
])  # mid-epoch, the last step of epoch 1, the last step of epoch 2; with a moving average and distillation; cutout
def test_a_stopped_run_goes_on_with_the_same_call_to_the_same_weights(tmp_path, tiny_folder, stop, change, capsys):
    recipe = replace(TINY, **change)
    run(recipe, tmp_path / "straight", tiny_folder)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "stopped", tiny_folder, on_step=stop_at(stop))
    assert "run the same command to go on" in capsys.readouterr().err
    run(recipe, tmp_path / "stopped", tiny_folder)
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")
    assert torch.equal(state(tmp_path / "straight" / "best.pt")["model"]["classifiers.0.linear.weight"],
                       state(tmp_path / "stopped" / "best.pt")["model"]["classifiers.0.linear.weight"])


def test_a_finished_run_says_so_and_changes_nothing(tmp_path, tiny_folder, capsys):
    out = tmp_path / "run"
    first = run(replace(TINY, epochs=1), out, tiny_folder)
    before = (out / "last.pt").read_bytes()
    assert run(replace(TINY, epochs=1), out, tiny_folder) == first
    assert "holds a finished run (1 of 1 epochs): export it with `msdnet export" in capsys.readouterr().out
    assert (out / "last.pt").read_bytes() == before and len(log_records(out)) == 1


def test_a_time_limit_stops_the_run_saved(tmp_path, tiny_folder):
    out = tmp_path / "run"
    with pytest.raises(TimeUp):
        run(TINY, out, tiny_folder, time_limit=1e-9)  # stopped after its first step
    assert state(out / "last.pt")["progress"]["step"] == 1 and log_records(out) == []


def test_a_second_stop_request_abandons_validation_and_keeps_state_and_log_in_step(tmp_path, tiny_folder, monkeypatch):
    """Ctrl-C, then Ctrl-C again while epoch 1 is validated: the state is saved as it was before validation
    (no advanced epoch without its log line); the same call validates epoch 1 again and goes on."""
    out = tmp_path / "run"
    real = evaluate.exit_accuracies
    calls = []

    def interrupted_twice(*args, **kwargs):  # during the first validation, as a user presses Ctrl-C twice
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "exit_accuracies", interrupted_twice)
    with pytest.raises(KeyboardInterrupt):
        run(TINY, out, tiny_folder)
    saved = state(out / "last.pt")["progress"]
    assert (saved["epoch"], saved["step"]) == (0, 3) and log_records(out) == []
    run(TINY, out, tiny_folder)
    run(TINY, tmp_path / "straight", tiny_folder)
    assert_same_run(tmp_path / "straight", out)


def test_one_stop_request_finishes_the_step_and_its_epoch_end(tmp_path, tiny_folder):
    """SIGTERM (a service manager, or the end of a job's time) stops after the current step, saved."""
    out = tmp_path / "run"

    def term(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        run(TINY, out, tiny_folder, on_step=term)
    saved = state(out / "last.pt")["progress"]
    assert (saved["epoch"], saved["step"]) == (1, 1) and [r["epoch"] for r in log_records(out)] == [1]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers come back


def test_stop_requests_outside_the_main_thread_leave_signals_alone():
    box = []
    threading.Thread(target=lambda: box.append(StopRequest().__enter__()._previous)).start()
    import time

    time.sleep(0.5)
    assert box == [{}]


def test_a_log_line_lost_after_its_state_is_restored(tmp_path, tiny_folder):
    run(TINY, tmp_path / "straight", tiny_folder)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(TINY, out, tiny_folder, on_step=stop_at(4))
    (out / "log.jsonl").write_text("")  # killed after epoch 1's state was saved, before its log line
    run(TINY, out, tiny_folder)
    assert_same_run(tmp_path / "straight", out)


def test_another_recipe_in_the_same_folder_is_refused_by_name(tmp_path, tiny_folder):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(TINY, out, tiny_folder, on_step=stop_at(2))
    with pytest.raises(ResumeError, match=r"is a run of another recipe \(lr: 0.05 -> 0.1\): run the command that "
                                          "began it, or choose another --out"):
        run(replace(TINY, lr=0.1), out, tiny_folder)


def test_other_images_are_refused_but_the_same_folder_written_otherwise_is_not(tmp_path, tiny_folder):
    import shutil

    from PIL import Image

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(TINY, out, tiny_folder, on_step=stop_at(2))
    other = tmp_path / "edited"
    shutil.copytree(tiny_folder, other)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(sorted((other / "train" / "cat").iterdir())[0])
    with pytest.raises(ResumeError, match="was trained on other images"):
        run(TINY, out, other)
    train.train(TINY, out, source=str(tiny_folder) + "/", progress_bar=False)  # the same folder, another spelling
    assert [r["epoch"] for r in log_records(out)] == [1, 2, 3]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_state_is_refused_clearly(tmp_path, tiny_folder, damage):
    out = tmp_path / "run"
    run(replace(TINY, epochs=1), out, tiny_folder)
    raw = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(b"\x00garbage" if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        run(replace(TINY, epochs=1), out, tiny_folder)


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_state(tmp_path, tiny_folder, monkeypatch):
    real, calls = train.multi_exit_loss, []

    def poisoned(*args, **kwargs):  # the 5th batch's (epoch 2, step 2) loss is infinite
        calls.append(1)
        return real(*args, **kwargs) * (float("inf") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(train, "multi_exit_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(train.Diverged) as e:
        run(replace(TINY, average="ema", ema_decay=0.5), out, tiny_folder)
    assert str(e.value).startswith("the loss became inf at epoch 2, step 2: the run stopped before that step")
    assert "lower lr" in str(e.value)
    saved = state(out / "last.pt")
    assert (saved["progress"]["epoch"], saved["progress"]["step"]) == (1, 0)  # the state epoch 1 ended with
    for part in (saved["model"], saved["average"]):
        assert all(torch.isfinite(v).all() for v in part.values() if v.is_floating_point())
    assert [r["epoch"] for r in log_records(out)] == [1]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, tiny_folder):
    out = tmp_path / "run"
    with RunFolder(out).lock():  # as a run in another process holds it
        with pytest.raises(FolderBusy, match="another training run is writing to"):
            run(replace(TINY, epochs=1), out, tiny_folder)
    run(replace(TINY, epochs=1), out, tiny_folder)  # free again once it ended


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path):
    from helpers import data

    with pytest.raises(data.DataNotFoundError):
        run(TINY, tmp_path / "run", tmp_path / "none")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- processes and compile


def msdnet_cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port())] \
        if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "helpers", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_flags(source: Path) -> list[str]:
    return ["--recipe", "paper", "--preset", "tiny", "--source", str(source), "--val-size", "12", "--batch-size", "16",
            "--epochs", "2", "--lr", "0.05", "--schedule", "cosine", "--device", "cpu", "--threads", "1"]


@pytest.mark.slow  # two processes of torch: half a minute
def test_ddp_with_two_cpu_processes_agrees_with_one_process(tmp_path, tiny_folder):
    # Two processes of 8 images each, gradients averaged, equal one process with 2 micro-batches of 8.
    ddp = msdnet_cli(["train", *tiny_flags(tiny_folder), "--out", str(tmp_path / "ddp")], nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = msdnet_cli(["train", *tiny_flags(tiny_folder), "--out", str(tmp_path / "one"), "--accumulate", "2"])
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = state(tmp_path / "ddp" / "last.pt")["model"], state(tmp_path / "one" / "last.pt")["model"]
    params = dict(msdnet.build("tiny").named_parameters())
    for name in params:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert len(log_records(tmp_path / "ddp")) == 2  # one log, written by rank 0


@pytest.mark.slow  # torch.compile: a minute or more on 2 cores
def test_compile_takes_the_same_step_and_a_run_may_go_on_with_it(tmp_path, tiny_folder):
    """--compile changes the speed, not the run: its first step lands where the uncompiled step does (to
    float rounding), and a run begun without it goes on with it."""
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    traced = []
    for name, compile in (("eager", False), ("compiled", True)):
        counters.clear()
        with pytest.raises(KeyboardInterrupt):
            run(replace(TINY, epochs=1), tmp_path / name, tiny_folder, compile=compile, on_step=stop_at(1))
        traced.append(counters["stats"]["unique_graphs"])  # graphs dynamo traced: only a compiled step makes any
    assert traced[0] == 0 and traced[1] >= 1
    a, b = state(tmp_path / "eager" / "last.pt"), state(tmp_path / "compiled" / "last.pt")
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), rtol=1e-4, atol=1e-5), key
    run(replace(TINY, epochs=1), tmp_path / "eager", tiny_folder, compile=True)
    assert state(tmp_path / "eager" / "last.pt")["progress"]["epoch"] == 1
    torch._dynamo.reset()


@pytest.mark.slow  # the real CIFAR-10: the slow lane
def test_the_command_line_trains_on_the_real_mirror_and_goes_on(tmp_path, real_cifar, monkeypatch):
    from conftest import REAL_SOURCE

    real_cifar("test")  # fails (in CI) or skips when the mirror is absent
    monkeypatch.setenv("MSDNET_DATA_DIR", str(real_cifar.data_dir))  # decoded once per test session
    flags = ["train", "--recipe", "paper", "--schedule", "cosine", "--preset", "tiny", "--source", REAL_SOURCE, "--out",
             str(tmp_path / "real"), "--epochs", "2", "--batch-size", "64", "--train-subset", "2560", "--val-size", "1000",
             "--device", "cpu"]
    stopped = msdnet_cli([*flags, "--time-limit", "5"])
    assert stopped.returncode == 0 and "run the same command to go on" in stopped.stderr, stopped.stderr[-2000:]
    done = msdnet_cli(flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stdout and "done:" in done.stdout
    records = log_records(tmp_path / "real")
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["val_images"] == 1000
    assert records[-1]["acc"][-1] > 0.15  # better than chance (0.10) after 80 steps on real photos
