"""All ten exits' Grad-CAM maps from one pass through the trunk, against the straightforward way.

    CIFAR10_SOURCE=../shared/data/cifar10-jpeg.tar.gz python benchmarks/gradcam.py

The straightforward way runs, for each exit, a forward pass of the network and a backward pass
from that exit's score to the map its classifier reads. gradcam_all_exits runs the trunk once and
ten backward passes that each go through one classifier only. Both give the same maps (checked),
and the ratio of their times is printed.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

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


if __name__ == "__main__":
    main()
