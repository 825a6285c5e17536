"""Training step, eager against torch.compile: images per second and compile time.

    python benchmarks/train_step_compile.py                                   # on a CUDA GPU: batch 512, bf16
    python benchmarks/train_step_compile.py --preset tiny --batch-size 8 --steps 3 --modes default   # CPU check

MSD-Net is many small layers: on a GPU its training step launches hundreds of short kernels, and the
GPU waits on Python between them. torch.compile fuses the elementwise work (BatchNorm, ReLU,
concatenation) into fewer kernels, and mode "reduce-overhead" also replays the step's kernels as one
CUDA graph. The step timed is `helpers.train.train_step` with the recipe's settings: random images,
bf16 autocast on CUDA, channels_last, label smoothing 0.2 and distillation 0.8, SGD with momentum, and
with --average the SWA average of the weights updated after every step. Each mode prints its line as
soon as it is measured, and a mode is skipped once --budget seconds have passed, so a short lease still
returns what it measured. The table is also written to docs/results/train_step_compile.md, which the
site's Benchmarks page includes.
"""
import argparse
import time

import torch

import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from helpers import msdnet, train
from helpers.averaging import WeightAverage


def measure(model: torch.nn.Module, step_model, x, y, steps: int, amp: torch.dtype | None,
            average: bool) -> tuple[float, float]:
    """(seconds for the first step, which includes any compilation; images per second after warm-up)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    avg = WeightAverage(model, "swa") if average else None
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def one():
        train.train_step(step_model, opt, x, y, label_smoothing=0.2, distill=0.8, amp=amp, average=avg)

    t = time.perf_counter()
    one()
    sync()
    first = time.perf_counter() - t
    for _ in range(2):  # warm-up (reduce-overhead records its graph here)
        one()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    sync()
    return first, steps * len(x) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="cifar10-anytime")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--modes", nargs="+", default=["eager", "default", "reduce-overhead"])
    p.add_argument("--contiguous", action="store_true", help="the default memory format instead of channels_last")
    p.add_argument("--average", action="store_true", help="update an SWA average of the weights after every step")
    p.add_argument("--budget", type=float, default=200, help="skip the modes left after this many seconds")
    _report.add_option(p)
    args = p.parse_args()
    t0 = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if dev.type == "cuda" else None
    torch.backends.cudnn.benchmark = dev.type == "cuda"  # as helpers.train sets it
    torch.manual_seed(0)
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    x = torch.rand(args.batch_size, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch_size,), device=dev)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    setup = (f"preset {args.preset}, batch {args.batch_size}, {'bf16 autocast' if amp else 'float32'}, "
             f"{'contiguous' if args.contiguous else 'channels_last'}")
    print(f"{name}, torch {torch.__version__}, {setup}, "
          f"{torch.get_num_threads()} CPU threads{', SWA average' if args.average else ''}", flush=True)
    rows = []
    for mode in args.modes:
        if time.perf_counter() - t0 > args.budget:
            print(f"{mode}: skipped (budget of {args.budget:.0f} s spent)", flush=True)
            rows.append([mode, f"skipped (budget of {args.budget:.0f} s spent)", ""])
            continue
        torch._dynamo.reset()
        model = msdnet.build(args.preset).to(dev).to(memory_format=fmt).train()
        try:
            step_model = model if mode == "eager" else train.compiled(model, mode=None if mode == "default" else mode)
            first, rate = measure(model, step_model, x, y, args.steps, amp, args.average)
        except Exception as e:  # a mode that fails here must not hide the others' numbers
            print(f"{mode}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
            rows.append([mode, f"failed ({type(e).__name__})", ""])
            continue
        print(f"{mode:16s} first step {first:7.1f} s   {rate:8.0f} images/s", flush=True)
        rows.append([mode, f"{first:.1f}", f"{rate:.0f}"])
    report = _report.Report("train_step_compile", args.results)
    report.text(f"The training step on {name}, eager against torch.compile ({setup}"
                f"{', SWA average updated after every step' if args.average else ''}); the first step includes "
                f"compilation, images/s over {args.steps} steps after warm-up.")
    report.table(["mode", "first step, s", "images/s"], rows)
    report.write()


if __name__ == "__main__":
    main()
