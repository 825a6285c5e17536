"""An ipywidgets app: pick an image and an exit, and see where that exit looks.

    from helpers import explorer, pretrained
    explorer.explore(pretrained.load())        # in a notebook cell: the app
"""
from __future__ import annotations

import atexit
import copy
import threading
import time
import weakref
from contextlib import contextmanager

import ipywidgets as widgets
import torch

from . import checks, data, evaluate, gradcam, images, msdnet, viz
from .cache import fingerprint
from .errors import InputError
from .images import load_image
from .turns import Turns

__all__ = ["Explorer", "explore", "load_image", "CHUNK_SECONDS", "SPLIT_NAMES"]

CHUNK_SECONDS = 0.03
"""How long one background chunk of predictions should take: the longest a control waits for the model."""

SPLIT_NAMES = {"train": "training", "val": "validation", "trainval": "training", "test": "test"}
"""What the app calls the images of each split data.load reads."""


_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop every background thread before the interpreter tears torch down under it."""
    for app in list(_RUNNING):
        app.close(widgets_too=False)


def _control(handler):
    """A widget callback: it waits at most one background chunk, and ignores the app's own changes."""
    def run(self, change=None):
        with self._turns.take():
            if self._started and not self._quiet:
                handler(self, change)
    return run


class _AppBox(widgets.VBox):
    """The app's outermost box: displaying it starts the app."""

    def _repr_mimebundle_(self, **kwargs):
        self.on_display()
        return super()._repr_mimebundle_(**kwargs)


class Explorer:
    """The app's state and widgets: display `Explorer(model, split).widget`, or call `start()` first.

    It works on its own copy of the model: the caller's model is never changed. The constructor computes
    nothing; `start()` (or the widget's first display) draws, and predicts a split without cached
    predictions in a background thread, chunk by chunk: filters cover the images predicted so far.

    Args:
        model: an MSD-Net taking float images [B, 3, H, W] in [0, 1], on any device (the app computes there).
        split: "train", "val", "trainval" or "test" (read with data.load from `source`), or a data.Split
            (images uint8 in 0..255, or float in [0, 1]).
        preds: every exit's predictions for the split; default: evaluate's cache, else predicted here.
        classes: the class names, indexed by label: one distinct string per class of the model.
        chunk: images per background chunk; None: as many as take about CHUNK_SECONDS.
        split_name: what the text calls the images; None: SPLIT_NAMES[split] for a split named, else nothing.
    """

    def __init__(self, model: msdnet.MSDNet, split: str | data.Split = "test", preds: evaluate.Predictions | None = None,
                 classes=data.CLASSES, chunk: int | None = None, split_name: str | None = None, source=None) -> None:
        if isinstance(split, str):
            split_name = SPLIT_NAMES.get(split, split) if split_name is None else split_name
            split = data.load(split, source)
        checks.split(split)
        n_classes = model.config.num_classes
        if isinstance(classes, str) or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes) \
                or len(classes) != n_classes:
            raise InputError(f"classes must be {n_classes} distinct names, one per class of the model, got {classes!r}")
        classes = tuple(classes)
        self.model = copy.deepcopy(model).eval()
        self.split, self.classes, self.n_exits, n = split, classes, model.n_exits, len(split)
        self._image = f"{split_name} image" if split_name else "image"
        self._turns, self._quiet, self._started, self._published = Turns(), False, False, 0.0
        self._stop, self._thread, self._error, self._chunk = threading.Event(), None, None, chunk
        preds = evaluate.cached_predictions(model, split) if preds is None else preds
        self._known = torch.full((n,), preds is not None)
        if preds is None:  # predicted in the background
            preds = evaluate.Predictions(torch.full((n, model.n_exits, model.config.num_classes), float("nan")),
                                         split.labels.clone())
        evaluate.check_predictions(preds)
        if len(preds) != n:
            raise InputError(f"predictions for {len(preds)} images, but the split has {n}")
        self.preds, self.difficulty = preds, evaluate.difficulty(preds) if self._known.all() else torch.zeros(n).long()
        self.uploaded, self.last_redraw_s = None, 0.0  # uploaded: float [3, H, W] in [0, 1], or None
        self._maps, self._finest_of_exit, self._indices = {}, {}, torch.zeros(0, dtype=torch.long)
        # The slider's order and the background's: a seeded shuffle; new predictions join the slider's end.
        self._order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        self._build_widgets()

    def _build_widgets(self) -> None:
        exits, w = [f"B{k}" for k in range(1, self.n_exits + 1)], widgets
        self.class_filter = w.Dropdown(options=["all", *self.classes], value="all", description="Class")
        self.difficulty_filter = w.Dropdown(options=["any", *[f"{k}/{self.n_exits}" for k in range(self.n_exits + 1)]],
                                            value="any", description="Difficulty")
        self.correct_filter = w.Dropdown(options=["any", "right", "wrong"], value="any", description="At this exit")
        # 1-based, as the count beside it; continuous_update=False: a drag sends its last value only
        self.image = w.IntSlider(min=1, max=1, value=1, description="Image", continuous_update=False, disabled=True)
        self.exit = w.SelectionSlider(options=exits, value=exits[-1], description="Exit", continuous_update=False)
        self.target = w.Dropdown(options=["predicted", "true", *self.classes], value="predicted", description="Target")
        coarse = self.model.config.coarsest_size
        self.scale = w.Dropdown(options=[coarse], value=coarse, description="Scale")
        self.method = w.ToggleButtons(options=[(m.title, key) for key, m in gradcam.METHODS.items()], value="gradcam",
                                      description="Method")
        self.alpha = w.FloatSlider(min=0, max=1, step=0.05, value=0.5, description="Opacity")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="Your image",
                                   tooltip=f"a picture of your own; transparent parts are shown on {images.BACKGROUND}")
        self.back = w.Button(description=f"Back to the {self._image}s", disabled=True, layout=w.Layout(width="auto"))
        self.count, self.title, self.explains, self.status, self.progress = (w.HTML() for _ in range(5))
        self.title.value = "<b>starting…</b>"
        self.picture, self.overlay, self.bars, self.strip = self._pictures = tuple(w.Image(format="png") for _ in range(4))
        for p in self._pictures:
            p.layout.display = "none"  # a browser draws empty images as broken-image icons
        controls = w.VBox([w.HBox([self.class_filter, self.difficulty_filter, self.correct_filter]),
                           w.HBox([self.image, self.count]), self.exit, w.HBox([self.target, self.scale, self.alpha]),
                           w.HBox([self.method, self.upload, self.back])])
        self.widget = _AppBox([controls, self.title, self.explains, w.HBox([self.picture, self.overlay, self.bars]),
                               self.strip, self.status, self.progress])
        self.widget.on_display = self.start
        for f in (self.class_filter, self.difficulty_filter, self.correct_filter):
            f.observe(self._on_filter, "value")
        self.exit.observe(self._on_exit, "value")
        for c in (self.image, self.target, self.scale, self.method, self.alpha):
            c.observe(self._on_view, "value")
        self.upload.observe(self._on_upload, "value")
        self.back.on_click(self._on_back)

    # ------------------------------------------------------------------ starting and stopping

    def start(self) -> "Explorer":
        """Draw the first image; predict the split in the background if needed. Returns self; again, a no-op."""
        with self._turns.take():
            if self._started:
                return self
            self._started = True
            self._update_scales()
            self._refilter()
            self.redraw()
            if not self._known.all():
                self._thread = threading.Thread(target=self._predict_all, daemon=True, name="explorer-predictions")
                self._update_progress()
                _RUNNING.add(self)
                self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> None:
        """Block until every image is predicted (starting the app if needed); re-raise the background's error."""
        self.start()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error

    def close(self, widgets_too: bool = True) -> None:
        """Stop the background predictions (within one chunk), then close the widgets."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        _RUNNING.discard(self)
        todo = [self.widget] if widgets_too else []
        for w in todo:  # a list that grows as it is walked: every box, and what it holds
            todo.extend(getattr(w, "children", ()))
            w.close()

    def _predict_all(self) -> None:
        """The background thread: the unknown images in the slider's order, one chunk per turn."""
        order = self._order[~self._known[self._order]]
        device = next(self.model.parameters()).device
        n, i = self._chunk or 1, 0
        try:
            while i < len(order):
                with self._turns.take(control=False):
                    if self._stop.is_set():
                        return
                    idx, start = order[i : i + n], time.perf_counter()
                    with torch.no_grad():
                        logits = torch.stack(self.model(checks.unit_images(self.split.images[idx].to(device))), 1)
                    took = time.perf_counter() - start
                    self._publish(idx, logits.float().cpu())
                i += len(idx)
                if self._chunk is None:  # about CHUNK_SECONDS per chunk, growing at most twofold
                    n = max(1, min(2 * n, int(n * CHUNK_SECONDS / max(took, 1e-6))))
            if not self._stop.is_set():
                evaluate.store_predictions(self.model, self.split, self.preds)
        except BaseException as e:  # shown in the progress line; the images predicted so far stay usable
            self._error = e
        with self._turns.take(control=False):
            self._update_progress()

    def _publish(self, idx: torch.Tensor, logits: torch.Tensor) -> None:
        """A chunk's predictions into the app's state (the turn held); the widgets follow a few times a second."""
        self.preds.logits[idx] = logits
        self.difficulty[idx] = evaluate.difficulty(evaluate.Predictions(logits, self.preds.labels[idx]))
        self._known[idx] = True
        was_empty, now = len(self._indices) == 0, time.monotonic()
        if was_empty or now - self._published > 0.25 or self._known.all():
            self._published = now
            self._update_progress()
            self._refilter()
            if was_empty and len(self._indices) and self.uploaded is None:
                self.redraw()  # the first image to pass the filters

    def _update_progress(self) -> None:
        done, n = int(self._known.sum()), len(self.split)
        self.progress.value = (
            f"<span style='color:{viz.WRONG}'>predicting stopped after {done:,} images: {self._error}</span>"
            if self._error is not None else f"all {n:,} images predicted (kept in data/cache/ for next time)"
            if done == n else f"predicting in the background: {done:,} of {n:,} images ready (the filters and the "
            "Image slider cover those)")

    # ------------------------------------------------------------------ what is shown

    @property
    def exit_number(self) -> int:
        """The chosen exit, 1..n_exits."""
        return int(self.exit.value[1:])

    def current_index(self) -> int | None:
        """The shown image's index into the split; None for an upload or when no image passes the filters."""
        with self._turns.take():
            if self.uploaded is not None or len(self._indices) == 0:
                return None
            return int(self._indices[min(self.image.value, len(self._indices)) - 1])

    def current_image(self) -> torch.Tensor | None:
        """The shown image, float [3, H, W] in [0, 1], or None."""
        with self._turns.take():
            i = self.current_index()
            return self.uploaded if self.uploaded is not None else None if i is None else \
                checks.unit_images(self.split.images[i : i + 1])[0]

    @property
    def indices(self) -> torch.Tensor:
        """[M] indices into the split of the images that pass the filters; Image slider value v shows [v - 1]."""
        with self._turns.take():
            return self._indices.clone()

    @property
    def known(self) -> torch.Tensor:
        """[N] bool: the images whose predictions are ready."""
        with self._turns.take():
            return self._known.clone()

    @contextmanager
    def _quietly(self):
        """The app's own widget changes (the turn held): its callbacks ignore them."""
        quiet, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = quiet

    def _refilter(self) -> None:
        """The images that pass the filters; the shown image stays shown when it still passes."""
        shown, mask = self.current_index(), self._known.clone()
        if self.class_filter.value != "all":
            mask &= self.preds.labels == self.classes.index(self.class_filter.value)
        if self.difficulty_filter.value != "any":
            mask &= self.difficulty == int(self.difficulty_filter.value.split("/")[0])
        if self.correct_filter.value != "any":
            right = self.preds.correct[:, self.exit_number - 1]
            mask &= right if self.correct_filter.value == "right" else ~right
        self._indices = self._order[mask[self._order]]
        where = torch.nonzero(self._indices == shown)[:, 0] if shown is not None else []
        with self._quietly():  # the background only ever raises max: it writes no trait a person moves
            self.image.max = max(len(self._indices), 1)
            value = int(where[0]) + 1 if len(where) else min(self.image.value, self.image.max)
            if value != self.image.value:
                self.image.value = value
            if self.image.disabled != (len(self._indices) <= 1):
                self.image.disabled = len(self._indices) <= 1
        self._update_count()

    def _update_count(self) -> None:
        n, total = len(self._indices), len(self.split)
        where = f"image {min(self.image.value, n):,} of " if n else ""
        self.count.value = f"{where}{n:,} {self._image}s that pass the filters (of {total:,})"

    def _update_scales(self) -> None:
        k = self.exit_number
        if k not in self._finest_of_exit:  # a pass through the model: once per exit
            self._finest_of_exit[k] = gradcam.latest_sites(self.model, k)
        sizes = list(self._finest_of_exit[k])
        with self._quietly(), self.scale.hold_trait_notifications():
            keep = self.scale.value if self.scale.value in sizes else min(sizes)
            self.scale.options = sizes
            self.scale.value = keep

    def _target(self, index: int | None) -> tuple[str | int, torch.Tensor | None]:
        """(target, labels) for gradcam.compute; an upload has no true class: "true" explains the prediction.
        A class is passed by its index: the names are this app's (`classes`), not necessarily CIFAR-10's."""
        if self.target.value == "true":
            return ("true", self.preds.labels[index : index + 1]) if index is not None else ("predicted", None)
        if self.target.value in self.classes:
            return self.classes.index(self.target.value), None
        return self.target.value, None

    def heatmaps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shown image's heatmaps and logits, kept per image, target and method.

        Returns:
            heatmaps [exits, H, W] in [0, 1], the chosen exit's at the chosen scale; logits [exits, classes].
        """
        with self._turns.take():
            index, image = self.current_index(), self.current_image()
            (target, labels), method = self._target(index), self.method.value
            size, k = self.model.config.image_size, self.exit_number
            # An upload is known by its pixels: ids of freed tensors are reused, and would show an old answer.
            key = (index if index is not None else fingerprint([self.uploaded]), target, method)
            if len(self._maps) > 256:
                self._maps.clear()
            x = image[None].to(next(self.model.parameters()).device)  # the model's device; answers kept on the CPU
            if key not in self._maps:  # all exits at the classifiers' own maps: one trunk pass
                cam = gradcam.compute(self.model, x, list(range(1, self.n_exits + 1)), target, None, method, labels)
                self._maps[key] = (gradcam.normalize(cam.heatmaps[0], size).cpu(), cam.logits[0].cpu())
            maps, logits = self._maps[key]
            if self.scale.value == self.model.config.coarsest_size:
                return maps, logits
            fine_key = (*key, k, self.scale.value)  # a finer map exists for this exit only
            if fine_key not in self._maps:
                site = self._finest_of_exit[k][self.scale.value]
                fine = gradcam.compute(self.model, x, [k], target, site, method, labels)
                self._maps[fine_key] = gradcam.normalize(fine.heatmaps[0, 0], size).cpu()
            maps = maps.clone()
            maps[k - 1] = self._maps[fine_key]
            return maps, logits

    def show(self, index: int) -> None:
        """Show image `index` (0-based, into the split), clearing the filters so that every image can be reached."""
        index = checks.whole(index, "index", low=0, high=len(self.split) - 1)
        with self.start()._turns.take():
            if not self._known[index]:
                raise InputError(f"image {index} is not predicted yet: call wait() first")
            self._on_back()
            for w, value in ((self.class_filter, "all"), (self.difficulty_filter, "any"), (self.correct_filter, "any")):
                w.value = value
            self.image.value = int(torch.nonzero(self._indices == index)[0, 0]) + 1

    # ------------------------------------------------------------------ events

    @_control
    def _on_filter(self, change) -> None:
        self._refilter()
        self.redraw()

    @_control
    def _on_view(self, change) -> None:
        self.redraw()

    @_control
    def _on_exit(self, change) -> None:
        self._update_scales()
        if self.correct_filter.value != "any":
            self._refilter()
        self.redraw()

    @_control
    def _on_upload(self, change) -> None:
        if not change["new"]:
            return
        f, size = change["new"][0], self.model.config.image_size
        try:
            self.uploaded = load_image(bytes(f["content"]), size)
        except ValueError as e:
            self.status.value = f"<span style='color:{viz.WRONG}'>{f['name']}: {e}</span>"
            return
        self.status.value = (f"showing your image {f['name']}: its centre square, resized to {size}x{size} as the "
                             f"network sees it (transparent parts on {images.BACKGROUND})")
        self.back.disabled = False
        self.redraw()

    @_control
    def _on_back(self, button=None) -> None:
        self.uploaded = None
        if self.upload.value:
            self.upload.value = ()  # the button's counter back to 0 (its observer ignores empty)
        self.back.disabled = True
        self.status.value = ""
        self.redraw()

    # ------------------------------------------------------------------ drawing

    def redraw(self) -> None:
        """Draw the shown image, its overlay, every exit's prediction and the strip of maps."""
        with self._turns.take():
            start = time.perf_counter()
            self._draw()
            self.last_redraw_s = time.perf_counter() - start

    def _draw(self) -> None:
        self._update_count()
        index, image = self.current_index(), self.current_image()
        if image is None:  # a message, and no empty images (a browser draws those as broken-image icons)
            more = " yet: more arrive as they are predicted" if not self._known.all() else ": loosen one of them"
            self.title.value = f"<b>no {self._image} passes these filters</b>{more}" if self._known.any() else \
                f"<b>predicting the first {self._image}s…</b>"
            self.explains.value = ""
            for p in self._pictures:
                p.layout.display = "none"
            return
        maps, logits = self.heatmaps()
        (target, labels), k = self._target(index), self.exit_number
        explained = int(gradcam.targets_for(target, logits[k - 1 : k], labels)[0])
        label, n_right = (None, None) if index is None else (int(self.preds.labels[index]), int(self.difficulty[index]))
        view = viz.explorer_view(image, maps, logits, k, self.alpha.value, label, n_right, explained, self.target.value,
                                 self.classes)
        self.title.value, self.explains.value = view.title, view.explains
        for p, png in zip(self._pictures, view.pngs):
            p.value, p.layout.display = png, None


def explore(model: msdnet.MSDNet, split: str | data.Split = "test", source=None) -> widgets.Widget:
    """The app for `model` over a split, started; display what it returns.

    Args:
        split: "train", "val", "trainval" or "test" (read with data.load from `source`), or a data.Split.
    """
    return Explorer(model, split, source=source).start().widget
