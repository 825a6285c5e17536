"""All ten exits' Grad-CAM maps from one pass through the trunk, against the straightforward way.

    python benchmarks/gradcam.py

The straightforward way runs, for each exit, a forward pass of the network and a backward pass
from that exit's score to the map its classifier reads. gradcam_all_exits runs the trunk once and
ten backward passes that each go through one classifier only. Both give the same maps (checked),
and the ratio of their times is printed. Then the tool people use: jacobgil's pytorch-grad-cam (the
`grad-cam` package), the way a user would apply it to an early-exit network: per exit, a `GradCAM`
on a wrapper that returns that exit's logits, with an `nn.Identity` tap on the map its classifier
reads. Its maps are checked against ours (after the same upsampling and scaling) and its time is
compared too.
The table is also written to docs/results/gradcam.md, which the site's Benchmarks page includes.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import _errors  # benchmarks/_errors.py: this script's folder is on sys.path when it runs
import _report  # benchmarks/_report.py: the page part docs/benchmarks.md includes
from helpers import data, gradcam, pretrained


def straightforward(model, x: torch.Tensor) -> torch.Tensor:
    maps = []
    for k in range(model.n_exits):
        with torch.enable_grad():
            logits, feats = model(x, return_features=True)  # a full forward pass per exit
            z, a = logits[k], feats[k]
            score = z.gather(1, z.argmax(1, keepdim=True)).sum()
            (g,) = torch.autograd.grad(score, a)
        maps.append(F.relu((g.mean(dim=(2, 3))[:, :, None, None] * a.detach()).sum(1)))
    return torch.stack(maps, 1)


class OneExit(nn.Module):
    """The network up to exit k, returning that exit's logits, with a tap on the map classifier k reads:
    what pytorch-grad-cam needs (a model with one output, and a layer to hook)."""

    def __init__(self, model, k: int) -> None:
        super().__init__()
        self.model, self.k, self.tap = model, k, nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.model.standardize(x)
        for block in range(1, self.k + 1):
            xs = self.model.advance(block, xs)
        return self.model.classify(self.k, [*xs[:-1], self.tap(xs[-1])])


def pytorch_grad_cam(model, x: torch.Tensor) -> torch.Tensor:
    """Ten maps with pytorch-grad-cam, [B, 10, 32, 32], each upsampled and scaled to [0, 1] by it."""
    from pytorch_grad_cam import GradCAM

    maps = []
    for k in range(1, model.n_exits + 1):
        wrapper = OneExit(model, k).eval()
        with GradCAM(model=wrapper, target_layers=[wrapper.tap]) as cam:
            maps.append(torch.from_numpy(cam(input_tensor=x, targets=None)))  # targets=None: the predicted class
    return torch.stack(maps, 1)


def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    _report.add_option(p)
    args = p.parse_args()
    model = pretrained.load()
    x = data.subset(data.load("test"), args.images).images.float() / 255
    best_time(lambda: gradcam.gradcam_all_exits(model, x[:4], raw=True), 1)  # warm-up
    t_one, one = best_time(lambda: gradcam.gradcam_all_exits(model, x, raw=True), args.repeats)
    t_each, each = best_time(lambda: straightforward(model, x), args.repeats)
    same = torch.allclose(one, each, atol=1e-5, rtol=1e-4)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.images} test images, all 10 exits")
    print(f"straightforward (forward + backward per exit): {t_each:.2f} s")
    print(f"one trunk pass (gradcam_all_exits):            {t_one:.2f} s")
    print(f"same maps: {same}; speed-up {t_each / t_one:.1f}x")
    if not same:
        raise SystemExit("the two ways disagree")
    t_pgc, theirs = best_time(lambda: pytorch_grad_cam(model, x), args.repeats)
    ours = gradcam.normalize(one, 32)  # upsampled bilinearly and scaled to [0, 1], as pytorch-grad-cam does
    corr = torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten().float()]))[0, 1].item()
    print(f"pytorch-grad-cam (a GradCAM per exit, wrapper + tap): {t_pgc:.2f} s; "
          f"map correlation with ours {corr:.4f}, largest difference {(ours - theirs).abs().max():.4f}")
    print(f"ours vs pytorch-grad-cam: {t_pgc / t_one:.1f}x faster")
    report = _report.Report("gradcam", args.results)
    report.text(f"Grad-CAM maps of all {model.n_exits} exits for {args.images} test images, best of "
                f"{args.repeats} runs each; pytorch-grad-cam's maps compared with ours after the same upsampling "
                "and scaling.")
    report.table(["way", "time, s", "one trunk pass faster by", "maps against one trunk pass"],
                 [["one trunk pass (gradcam_all_exits)", f"{t_one:.2f}", "", ""],
                  ["forward + backward per exit", f"{t_each:.2f}", f"{t_each / t_one:.1f}x", "the same"],
                  ["pytorch-grad-cam, a GradCAM per exit", f"{t_pgc:.2f}", f"{t_pgc / t_one:.1f}x",
                   f"correlation {corr:.4f}, largest difference {(ours - theirs).abs().max():.4f}"]])
    report.write()


if __name__ == "__main__":
    _errors.run(main)
