"""Grad-CAM (Selvaraju et al., ICCV 2017) and Grad-CAM++ for every exit of an MSD-Net.

    gradcam(model, x, exit=5)                 # [B, 32, 32] in [0, 1], exit counts like B1..B10
    gradcam_all_exits(model, x)               # [B, 10, 32, 32] from one pass through the trunk
    gradcam(model, x, exit=3, site=Site(block=2, size=16))   # a finer map for an early exit

For class c and a feature map A with K channels, Grad-CAM weighs each channel by the spatial mean
of the gradient of the pre-softmax score y_c, w_k = mean_ij dy_c/dA_k[i, j], and the map is
ReLU(sum_k w_k A_k), upsampled bilinearly to the image. Grad-CAM++ (Chattopadhyay et al., WACV
2018) changes only how the weights are computed.

The maps come from MSDNet.walk (every module's output kept) and the gradients from
torch.autograd.grad with respect to them: no hooks, so none can be left behind, and the model comes
back as it was given. By default exit k is explained at the map its classifier reads (the coarsest
output of block k, the blog's choice), so all ten maps cost one pass through the trunk and ten small
backward passes through the heads.
"""
from __future__ import annotations

import operator
import sys
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import checks, data, layers, msdnet
from .cache import cached, fingerprint
from .errors import InputError, InputTypeError

__all__ = ["Site", "CAM", "Method", "METHODS", "TARGETS", "targets_for", "class_activation_map", "default_site", "sites",
           "latest_sites", "latest_site", "compute", "gradcam",
           "gradcam_all_exits", "normalize", "maps_for_split", "guided_backprop", "guided_gradcam"]


class Site(NamedTuple):
    """Where to take the feature map: block (1-based, like the exits), module (the position of a module
    in that block's nn.Sequential, from 0: an MSD layer or a transition; -1: the block's output), and
    the scale by its size in pixels. model.module_at(block, module) is the module itself."""

    block: int
    module: int = -1
    size: int = 8  # the coarsest map of the CIFAR presets; default_site reads it from the model's config


def default_site(exit: int, model: msdnet.MSDNet | None = None) -> Site:
    """The map classifier `exit` reads: the coarsest output of block `exit` (8x8 on CIFAR)."""
    return Site(exit, -1, model.config.coarsest_size if model is not None else Site._field_defaults["size"])


def sites(model: msdnet.MSDNet, exit: int) -> list[Site]:
    """Every map (block, module, scale) that can explain exit `exit`, i.e. that its score depends on.
    Finer scales reach the classifier only through the strided paths of later MSD layers."""
    exit = _check_exit(model, exit)
    x = torch.zeros(1, 3, model.config.image_size, model.config.image_size, device=_device(model))
    with msdnet.eval_mode(model), torch.enable_grad():  # training mode would move the batch-norm statistics
        maps, logits = _run(model, x, exit, keep_all=True)
        candidates = list(maps)
        # allow_unused: a map the score does not depend on gets None, decided by the graph, not by values
        grads = torch.autograd.grad(logits[exit - 1].sum(), [maps[s] for s in candidates], allow_unused=True)
    return [site for site, g in zip(candidates, grads) if g is not None]


def latest_sites(model: msdnet.MSDNet, exit: int) -> dict[int, Site]:
    """Per size in pixels, the last map of that size exit `exit` depends on: the one closest to the
    classifier, so the most processed map at that resolution. One pass through the model for all sizes."""
    latest: dict[int, Site] = {}
    for s in sites(model, exit):
        if s.size not in latest or (s.block, s.module) > (latest[s.size].block, latest[s.size].module):
            latest[s.size] = s
    return dict(sorted(latest.items()))


def latest_site(model: msdnet.MSDNet, exit: int, size: int | None = None) -> Site:
    """The last map of `size` pixels (default: the finest there is) that exit `exit` depends on."""
    latest = latest_sites(model, exit)
    size = max(latest) if size is None else size
    if size not in latest:
        raise InputError(f"exit B{exit} depends on maps of {sorted(latest)} pixels, not {size}")
    return latest[size]


def _device(model: msdnet.MSDNet) -> torch.device:
    return next(model.parameters()).device


def _check_exit(model: msdnet.MSDNet, exit) -> int:
    """The exit as a number 1..n (None: the last), or one clear error."""
    return model.n_exits if exit is None else msdnet.exit_number(exit, model.n_exits)


def _is_index(v) -> bool:
    """An integer of any kind (Python's, NumPy's, a one-element tensor's), not a bool."""
    try:
        return not isinstance(v, bool) and operator.index(v) is not None
    except TypeError:
        return False


def _check_images(x) -> None:
    """One line for what is not a tensor of images at all (a NumPy array, a list); the model checks the rest."""
    if not isinstance(x, Tensor):
        hint = "torch.from_numpy(x) (HWC arrays: .permute(2, 0, 1)[None])" if hasattr(x, "__array__") else "torch.as_tensor(x)"
        raise InputTypeError(f"Grad-CAM takes a torch.Tensor of float images [B, 3, H, W] in [0, 1], got "
                             f"{type(x).__name__}; convert it with {hint}")


def _differentiable(model: msdnet.MSDNet, x: Tensor) -> Tensor:
    """A checked copy of the images that autograd tracks: every map computed from it then has a gradient,
    even when the caller froze the model's parameters."""
    _check_images(x)
    model.check_input(x)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("Grad-CAM needs gradients, which torch.inference_mode() turns off for good: call it outside "
                           "inference_mode (inside torch.no_grad() it works: it turns gradients back on by itself)")
    return x.detach().clone().requires_grad_(True)


def _resolve(model: msdnet.MSDNet, site, exit: int) -> Site:
    exit = _check_exit(model, exit)
    if not isinstance(site, Site):
        if isinstance(site, tuple) and 1 <= len(site) <= 3 and all(_is_index(v) for v in site):
            site = Site(*map(operator.index, site))  # a plain (block, module, size)
        else:
            # pytorch-grad-cam's target_layers are modules; here a map is named by block, module and size
            got = f"a module ({type(site).__name__})" if isinstance(site, torch.nn.Module) else repr(site)
            raise InputTypeError(f"site must be a gradcam.Site(block, module, size), e.g. gradcam.Site({exit}, -1, "
                            f"{model.config.coarsest_size}), or one of gradcam.sites(model, {exit}) (for several exits, "
                            f"a list of them, one per exit); got {got}")
    if not 1 <= site.block <= model.n_exits:
        raise InputError(f"{site}: block must be between 1 and {model.n_exits}")
    if site.block > exit:
        raise InputError(f"{site} does not influence exit B{exit}: block {site.block} runs after it; "
                         f"choose a block between 1 and {exit}")
    n_modules = model.block_length(site.block)
    if not -n_modules <= site.module < n_modules:
        raise InputError(f"{site}: block {site.block} has {n_modules} modules (module 0..{n_modules - 1}, or -1)")
    return Site(site.block, site.module % n_modules, site.size)


def _run(model: msdnet.MSDNet, x: Tensor, n_exits: int, keep: set[Site] = frozenset(), keep_all: bool = False):
    """Exits 1..n_exits through model.walk; returns the kept maps {Site: tensor} and every exit's logits."""
    kept, logits = {}, []
    for exit in model.walk(_differentiable(model, x), n_exits, intermediates=True):
        for i, maps in enumerate(exit.intermediates):
            for t in maps:
                site = Site(exit.number, i, t.shape[-1])
                if keep_all or site in keep:
                    kept[site] = t
        logits.append(exit.logits)
    return kept, logits


def _check_site_has_map(model: msdnet.MSDNet, maps: dict, site: Site) -> None:
    if site not in maps:  # only the maps asked for were kept: list the module's sizes from a pass of its own
        x = torch.zeros(1, 3, model.config.image_size, model.config.image_size, device=_device(model))
        with msdnet.eval_mode(model), torch.enable_grad():
            every = _run(model, x, site.block, keep_all=True)[0]
        sizes = sorted({s.size for s in every if s.block == site.block and s.module == site.module}, reverse=True)
        raise InputError(f"{site}: that module has no {site.size}x{site.size} map (its scales: {sizes})")


# ----------------------------------------------------------------------------- the weights: the one thing methods change


def _gradcam_weights(grads: Tensor, maps: Tensor) -> Tensor:
    return grads.mean(dim=(2, 3))  # [B, K]: the spatial mean of the gradient


def _gradcam_pp_weights(grads: Tensor, maps: Tensor) -> Tensor:
    # Chattopadhyay et al., eq. 19, with exp(score) as the paper's choice of output function.
    g2, g3 = grads.pow(2), grads.pow(3)
    sum_a = maps.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return (alpha * grads.clamp(min=0)).sum(dim=(2, 3))


def _layercam_weights(grads: Tensor, maps: Tensor) -> Tensor:
    # Jiang et al., LayerCAM (IEEE TIP 2021): a weight per position, the positive part of the gradient there.
    return grads.clamp(min=0)  # [B, K, h, w]


class Method(NamedTuple):
    """A CAM method: its name as shown to readers, and how it weighs the feature map's channels. The
    weights may be per channel, [B, K], or per channel and position, [B, K, h, w]."""

    title: str
    weights: Callable[[Tensor, Tensor], Tensor]


# The one registry: add a method here and every function, the cache and the explorer offer it.
METHODS = {
    "gradcam": Method("Grad-CAM", _gradcam_weights),
    "gradcam++": Method("Grad-CAM++", _gradcam_pp_weights),
    "layercam": Method("LayerCAM", _layercam_weights),
}


# The code that computes maps: a change to any of it (the forward path, a CAM method) names the cache files anew.
_CODE = (msdnet, layers, sys.modules[__name__])


def class_activation_map(score: Tensor, fmap: Tensor, method: str = "gradcam", retain_graph: bool = False) -> Tensor:
    """The map [B, h, w] for a scalar `score` (summed over the batch) computed from `fmap` [B, K, h, w].
    These are the lines the method is: gradient, weights per channel, ReLU of the weighted sum."""
    (grads,) = torch.autograd.grad(score, fmap, retain_graph=retain_graph, allow_unused=True)
    if grads is None:
        raise InputError("the score does not depend on this feature map")
    a = fmap.detach()
    weights = METHODS[method].weights(grads, a)  # [B, K] or [B, K, h, w]
    if weights.dim() == 2:
        weights = weights[:, :, None, None]
    return F.relu((weights * a).sum(1))


class CAM(NamedTuple):
    """compute()'s result: the raw heatmaps [B, exits, H, W] at the feature map's resolution, each exit's
    logits [B, exits, classes], and the class each map explains [B, exits]."""

    heatmaps: Tensor  # [B, exits, H, W]: raw ReLU(sum_k w_k A_k) at the feature map's resolution
    logits: Tensor  # [B, exits, classes]
    targets: Tensor  # [B, exits]: the class each map explains


TARGETS = ("None or 'predicted' (each exit's own prediction), 'true' (the true labels), a class index, "
           "a class name, or one class index per image")


def targets_for(target, logits: Tensor, labels: Tensor | None = None) -> Tensor:
    """The class each image's map explains, [B], for one exit's logits [B, classes].

    target is one of TARGETS, the same set everywhere a target is taken (compute, maps_for_split, the
    explorer); 'true' needs the labels."""
    b, n = logits.shape
    names = data.CLASSES if n == len(data.CLASSES) else ()
    usage = (f"target must be {TARGETS} ({b}); class names: {', '.join(names) or 'none for this model'}")
    if target is None or (isinstance(target, str) and target == "predicted"):
        return logits.argmax(1)
    if isinstance(target, str) and target == "true":
        if labels is None:
            raise InputError("target='true' needs the true labels: pass labels= (one class index per image)")
        target = labels
    elif isinstance(target, str):
        if target not in names:
            raise InputError(f"{usage}; got {target!r}")
        target = names.index(target)
    if isinstance(target, bool):
        raise InputError(f"{usage}; got {target!r}")
    if isinstance(target, int):
        t = torch.full((b,), target, dtype=torch.long, device=logits.device)
    else:
        try:
            t = torch.as_tensor(target, device=logits.device)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{usage}; got {target!r}") from None
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise InputError(f"{usage}; got values of dtype {t.dtype}")
        t = t.long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
    if t.shape != (b,):
        raise InputError(f"{usage}; got {tuple(t.shape)}")
    if ((t < 0) | (t >= n)).any():
        raise InputError(f"target classes must be between 0 and {n - 1}")
    return t


def compute(model: msdnet.MSDNet, x: Tensor, exits: list[int], target=None, site: Site | list[Site] | None = None,
            method: str = "gradcam", labels: Tensor | None = None) -> CAM:
    """Raw class activation maps for several exits of the same images, from one forward pass.

    target: one of TARGETS (see targets_for); "true" explains the classes in `labels`.
    site: one per exit (default: the map each classifier reads).
    """
    _check_images(x)
    if method not in METHODS:
        raise InputError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if isinstance(exits, (str, bytes)) or not hasattr(exits, "__len__"):
        raise InputTypeError(f"exits must be a list of exit numbers (e.g. [1, 5, 10]), got {exits!r}")
    if not len(exits):
        raise InputError("exits must name at least one exit")
    exits = [_check_exit(model, k) for k in exits]
    if site is None:
        site_list = [default_site(k, model) for k in exits]
    else:
        site_list = list(site) if isinstance(site, list) else [site] * len(exits)
    if len(site_list) != len(exits):
        raise InputError(f"give one site per exit: {len(exits)} exits, got {len(site_list)} sites")
    site_list = [_resolve(model, s, k) for s, k in zip(site_list, exits)]
    with msdnet.eval_mode(model), torch.enable_grad():  # batch statistics would couple the images' gradients
        maps, logits = _run(model, x.detach(), max(exits), keep=set(site_list))
        out_maps, out_logits, out_targets = [], [], []
        for i, (k, s) in enumerate(zip(exits, site_list)):
            _check_site_has_map(model, maps, s)
            z = logits[k - 1]
            t = targets_for(target, z.detach(), labels)
            score = z.gather(1, t[:, None]).sum()  # images are independent: one backward for the batch
            try:
                cam = class_activation_map(score, maps[s], method, retain_graph=i < len(exits) - 1)
            except ValueError:
                raise InputError(f"{s} does not influence exit B{k}; choose one of gradcam.sites(model, {k})") from None
            out_maps.append(cam)
            out_logits.append(z.detach())
            out_targets.append(t)
    size = max(m.shape[-1] for m in out_maps)
    out_maps = [m if m.shape[-1] == size else F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                for m in out_maps]
    return CAM(torch.stack(out_maps, 1), torch.stack(out_logits, 1), torch.stack(out_targets, 1))


def normalize(maps: Tensor, size: int | None = None) -> Tensor:
    """Upsample [..., h, w] maps bilinearly to size x size and scale each to [0, 1] (an all-zero map stays 0)."""
    checks.tensor(maps, "maps", "[..., h, w]")
    if maps.dim() < 2 or maps.is_complex() or maps.dtype == torch.bool:
        raise InputError(f"maps must be real numbers [..., h, w], got {maps.dtype} {list(maps.shape)}")
    size = None if size is None else checks.whole(size, "size")
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:]).float()
    if size is not None and size != shape[-1]:
        flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False)
    lo = flat.amin(dim=(2, 3), keepdim=True)
    hi = flat.amax(dim=(2, 3), keepdim=True)
    flat = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(flat))
    return flat.reshape(*shape[:-2], *flat.shape[-2:])


def gradcam(model: msdnet.MSDNet, x: Tensor, exit: int | None = None, target=None, site: Site | None = None,
            method: str = "gradcam", raw: bool = False, labels: Tensor | None = None) -> Tensor:
    """The map of exit `exit` (1-based; default: the last) for each image: [B, 32, 32] in [0, 1], or with
    raw=True the unnormalized map at the feature map's own resolution."""
    cam = compute(model, x, [_check_exit(model, exit)], target, site, method, labels)
    maps = cam.heatmaps[:, 0]
    return maps if raw else normalize(maps, model.config.image_size)


def gradcam_all_exits(model: msdnet.MSDNet, x: Tensor, target=None, method: str = "gradcam",
                      raw: bool = False, labels: Tensor | None = None) -> Tensor:
    """The maps of all exits, [B, exits, 32, 32] in [0, 1] (raw=True: [B, exits, 8, 8] unnormalized),
    from one forward pass through the trunk."""
    cam = compute(model, x, list(range(1, model.n_exits + 1)), target, None, method, labels)
    return cam.heatmaps if raw else normalize(cam.heatmaps, model.config.image_size)


def maps_for_split(model: msdnet.MSDNet, split, method: str = "gradcam", target=None, batch_size: int = 200,
                   cache: bool = True, cache_dir=None) -> Tensor:
    """The raw maps of every exit for every image of a split (a data.Split): [N, exits, 8, 8], float32.
    target is one of TARGETS, as in compute: None (each exit explains its own prediction), "true" (the
    split's labels), one class for every image, or one class per image of the split.

    Streams the split in batches with a progress bar, keeps only the low-resolution maps (upsample what
    you show with normalize), and is cached on disk like the predictions, under a name that includes
    this code's and the model's source. Images uint8 in 0..255 or float in [0, 1]; batch_size >= 1.
    """
    # Resolve once for the whole split, so that a bad target fails before any work and per-image
    # targets can be sliced per batch; the logits are not needed for that, only their shape.
    checks.split(split)
    batch_size = checks.whole(batch_size, "batch_size")
    if method not in METHODS:
        raise InputError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    fixed = None if target is None or (isinstance(target, str) and target == "predicted") else targets_for(
        target, torch.zeros(len(split), model.config.num_classes), split.labels)

    def run() -> dict:
        out = []
        for i in tqdm(range(0, len(split), batch_size), desc=f"{method} maps", unit="batch", leave=False):
            x = checks.unit_images(split.images[i : i + batch_size])
            t = None if fixed is None else fixed[i : i + batch_size]
            out.append(compute(model, x.to(_device(model)), list(range(1, model.n_exits + 1)), t, None, method).heatmaps.cpu())
        return {"maps": torch.cat(out)}

    if fixed is None:
        which = "pred"
    elif isinstance(target, str) and target == "true":
        which = "true"
    else:  # any other choice of classes: named by its contents, so two choices never share a cache file
        which = "t" + fingerprint([fixed])
    kind = f"{method.replace('+', 'p')}-{which}"
    shape = [len(split), model.n_exits]

    def wrong(saved: dict) -> str | None:
        maps = saved.get("maps")
        if not isinstance(maps, Tensor):
            return f"keys {sorted(saved)}, not maps"
        return None if maps.dim() == 4 and list(maps.shape[:2]) == shape else f"maps {list(maps.shape)}, not {shape} + [h, w]"

    return cached(kind, model, split.images, split.labels, run, cache_dir, enabled=cache, expect=wrong, code=_CODE)["maps"]


# ----------------------------------------------------------------------------- Guided Grad-CAM


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients, and only where the input was positive
    (Springenberg et al. 2015, guided backpropagation)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


class _GuidedReLUs:
    """Within the block, every nn.ReLU of the model runs as _GuidedReLU; on leaving, however it is
    left, the modules are as before (an instance attribute set and deleted: no hooks)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]

    def __enter__(self):
        for m in self.relus:
            m.forward = _GuidedReLU.apply
        return self

    def __exit__(self, *exc) -> None:
        for m in self.relus:
            del m.forward


def guided_backprop(model: msdnet.MSDNet, x: Tensor, exit: int | None = None, target=None,
                    labels: Tensor | None = None) -> Tensor:
    """Guided backpropagation of exit `exit`'s score (default: the last exit's) for `target` (as in
    compute) to the pixels: [B, 3, H, W], the fine detail that Guided Grad-CAM multiplies by the coarse map."""
    exit = _check_exit(model, exit)
    _check_images(x)
    with msdnet.eval_mode(model), torch.enable_grad(), _GuidedReLUs(model):
        x = _differentiable(model, x)
        z = model(x, exits=exit)[exit - 1]
        t = targets_for(target, z.detach(), labels)
        (grad,) = torch.autograd.grad(z.gather(1, t[:, None]).sum(), x)
    return grad


def guided_gradcam(model: msdnet.MSDNet, x: Tensor, exit: int | None = None, target=None, method: str = "gradcam",
                   labels: Tensor | None = None) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al.): guided backpropagation times the Grad-CAM map upsampled
    bilinearly to the image, [B, 3, H, W]: where the map points, the pixels that matter there.
    The map is scaled to [0, 1] per image, so the result keeps guided backpropagation's units."""
    cam = gradcam(model, x, exit, target, method=method, labels=labels)  # [B, H, W] in [0, 1]
    return guided_backprop(model, x, exit, target, labels) * cam[:, None]
