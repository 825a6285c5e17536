"""An ipywidgets app to pick an image and an exit and see where that exit looks.

    from helpers import explorer, pretrained
    explorer.explore(pretrained.load())        # in a notebook cell: the app

Sliders pick the image (filtered by class, difficulty "k/10", and right or wrong at the chosen
exit) and the exit B1..B10; the target class, the scale of the map, the method (Grad-CAM, Grad-CAM++
or LayerCAM) and the overlay's opacity can be chosen; an upload explains your own picture. It shows
the image, the overlay, every exit's prediction and confidence for this image, and a strip of all
ten exits' maps.

Redraws are fast because the maps of all exits of the shown image are computed once (one trunk
pass) and kept, predictions come from evaluate's cache, and pictures are drawn with PIL.
"""
from __future__ import annotations

import io
import threading
import time

import ipywidgets as widgets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import data, evaluate, gradcam, msdnet, viz
from .cache import fingerprint

__all__ = ["Explorer", "explore", "load_image"]



def load_image(content: bytes, size: int = 32) -> torch.Tensor:
    """An uploaded file as a float image [3, size, size] in [0, 1] (RGB, its centre square resized), or a
    clear error."""
    try:
        img = Image.open(io.BytesIO(content))
        img.load()
    except Image.DecompressionBombError:
        raise ValueError("that picture is too large to open safely (over Pillow's limit of "
                         f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels); upload a smaller copy") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"that file is not an image Pillow can read ({e.__class__.__name__}); "
                         "upload a PNG, JPEG, BMP or GIF") from None
    img = img.convert("RGB")
    side = min(img.size)  # the centre square: a resize alone would squash a wide or tall picture
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


class _Predictor:
    """Every exit's logits for a split, computed in the background in chunks, in a seeded random order
    so that every class (and difficulty) appears from the first chunk on; `known` marks the images done.
    When all are done they are stored where evaluate.predict finds them, so the next start is instant."""

    def __init__(self, model: msdnet.MSDNet, split: data.Split, first: int, chunk: int, on_chunk) -> None:
        n = len(split)
        self.model, self.split, self.chunk, self.on_chunk = model, split, chunk, on_chunk
        self.order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        self.logits = torch.full((n, model.n_exits, model.config.num_classes), float("nan"))
        self.known = torch.zeros(n, dtype=torch.bool)
        self.error: BaseException | None = None
        self._predict(self.order[:first])  # what the first screen needs, before the app appears
        self.thread = threading.Thread(target=self._rest, args=(first,), daemon=True, name="explorer-predictions")

    def start(self) -> None:
        """Predict the rest in the background (called once the app's widgets exist)."""
        self.thread.start()

    @torch.no_grad()
    def _predict(self, idx: torch.Tensor) -> None:
        device = next(self.model.parameters()).device
        x = self.split.images[idx].to(device).float() / 255
        self.logits[idx] = torch.stack(self.model(x), 1).float().cpu()
        self.known[idx] = True

    def _rest(self, start: int) -> None:
        try:
            for i in range(start, len(self.order), self.chunk):
                self._predict(self.order[i : i + self.chunk])
                self.on_chunk()
            evaluate.store_predictions(self.model, self.split, evaluate.Predictions(self.logits, self.split.labels))
        except BaseException as e:  # shown in the app's status line; the images predicted so far stay usable
            self.error = e
            self.on_chunk()


class Explorer:
    """The app's state and widgets; `Explorer(model, split).widget` is what a notebook displays.

    Without `preds`, the predictions come from evaluate's cache when the model met this split before;
    else the first `first` images (a random sample of the split) are predicted before the app appears and
    the rest in the background, `chunk` at a time: filters and the image slider cover the images
    predicted so far, and the status line counts them. `wait()` blocks until all are done.
    The model is put in eval mode and stays so: the app (and its background thread) uses it until closed."""

    def __init__(self, model: msdnet.MSDNet, split: data.Split, preds: evaluate.Predictions | None = None,
                 classes=data.CLASSES, first: int = 200, chunk: int = 500, split_name: str = "test") -> None:
        self.model = model.eval()
        self.split, self.split_name = split, split_name
        self.classes = classes
        self.n_exits = model.n_exits
        self._predictor = None
        if preds is None:
            preds = evaluate.cached_predictions(model, split)
        if preds is None:
            self._predictor = _Predictor(model, split, min(first, len(split)), chunk, self._on_predicted)
            preds = evaluate.Predictions(self._predictor.logits, split.labels)
        if len(preds) != len(split):
            raise ValueError(f"predictions for {len(preds)} images, but the split has {len(split)}")
        self.preds = preds
        self.difficulty = evaluate.difficulty(self.preds)
        self.uploaded: torch.Tensor | None = None
        self._maps: dict = {}
        self.last_redraw_s = 0.0
        self._build_widgets()
        self._indices = torch.arange(len(split))
        self._refilter()
        self._finest_of_exit: dict[int, dict[int, gradcam.Site]] = {}
        self._update_scales()
        self._connect()
        self.redraw()
        if self._predictor is not None:
            self._on_predicted()  # the count so far
            self._predictor.start()

    def _build_widgets(self) -> None:
        classes, split_name = self.classes, self.split_name
        exits = [f"B{k}" for k in range(1, self.n_exits + 1)]
        self.class_filter = widgets.Dropdown(options=["all", *classes], value="all", description="Class")
        self.difficulty_filter = widgets.Dropdown(options=["any", *[f"{k}/{self.n_exits}" for k in range(self.n_exits + 1)]],
                                                  value="any", description="Difficulty")
        self.correct_filter = widgets.Dropdown(options=["any", "right", "wrong"], value="any",
                                               description="At this exit")
        self.image = widgets.IntSlider(min=0, max=max(len(self.split) - 1, 0), value=0, description="Image",
                                       continuous_update=False)
        # continuous_update=False: a drag sends its last value only, so moves never queue up behind redraws
        self.exit = widgets.SelectionSlider(options=exits, value=exits[-1], description="Exit", continuous_update=False)
        self.target = widgets.Dropdown(options=["predicted", "true", *classes], value="predicted", description="Target")
        coarse = self.model.config.coarsest_size
        self.scale = widgets.Dropdown(options=[coarse], value=coarse, description="Scale")
        self.method = widgets.ToggleButtons(options=[(m.title, key) for key, m in gradcam.METHODS.items()],
                                            value="gradcam", description="Method")
        self.alpha = widgets.FloatSlider(min=0, max=1, step=0.05, value=0.5, description="Opacity")
        self.upload = widgets.FileUpload(accept="image/*", multiple=False, description="Your image")
        self.back = widgets.Button(description=f"Back to the {split_name} images", disabled=True,
                                   layout=widgets.Layout(width="auto"))
        self.count = widgets.HTML()
        self.title = widgets.HTML()
        self.explains = widgets.HTML()
        self.status = widgets.HTML()
        self.progress = widgets.HTML()
        self.picture = widgets.Image(format="png")
        self.overlay = widgets.Image(format="png")
        self.bars = widgets.Image(format="png")
        self.strip = widgets.Image(format="png")
        controls = widgets.VBox([
            widgets.HBox([self.class_filter, self.difficulty_filter, self.correct_filter]),
            widgets.HBox([self.image, self.count]),
            self.exit,
            widgets.HBox([self.target, self.scale, self.alpha]),
            widgets.HBox([self.method, self.upload, self.back]),
        ])
        pictures = widgets.HBox([self.picture, self.overlay, self.bars])
        self.widget = widgets.VBox([controls, self.title, self.explains, pictures, self.strip, self.status, self.progress])

    def _connect(self) -> None:
        for w in (self.class_filter, self.difficulty_filter, self.correct_filter):
            w.observe(self._on_filter, "value")
        self.exit.observe(self._on_exit, "value")
        for w in (self.image, self.target, self.scale, self.method, self.alpha):
            w.observe(lambda change: self.redraw(), "value")
        self.upload.observe(self._on_upload, "value")
        self.back.on_click(self._on_back)

    # ------------------------------------------------------------------ what is shown

    @property
    def exit_number(self) -> int:
        return int(self.exit.value[1:])

    def current_index(self) -> int | None:
        """Index into the split of the image shown (None: an uploaded image or an empty filter)."""
        if self.uploaded is not None or len(self._indices) == 0:
            return None
        return int(self._indices[min(self.image.value, len(self._indices) - 1)])

    def current_image(self) -> torch.Tensor | None:
        if self.uploaded is not None:
            return self.uploaded
        i = self.current_index()
        return None if i is None else self.split.images[i].float() / 255

    @property
    def indices(self) -> torch.Tensor:
        """The indices into the split of the images that pass the filters, in the Image slider's order."""
        return self._indices.clone()

    @property
    def known(self) -> torch.Tensor:
        """[N] bool: the images whose predictions are ready (all of them unless predicting in the background)."""
        if self._predictor is None:
            return torch.ones(len(self.split), dtype=torch.bool)
        return self._predictor.known.clone()

    def wait(self) -> None:
        """Block until every image is predicted (returns at once when all were)."""
        if self._predictor is not None:
            self._predictor.thread.join()
            if self._predictor.error is not None:
                raise self._predictor.error

    def _on_predicted(self) -> None:
        """Called from the background thread after each chunk: widen the filters to the new images."""
        p = self._predictor
        self.difficulty = evaluate.difficulty(self.preds)
        done = int(p.known.sum())
        if p.error is not None:
            self.progress.value = f"<span style='color:{viz.WRONG}'>predicting stopped after {done:,} images: {p.error}</span>"
        elif done < len(self.split):
            self.progress.value = (f"predicting in the background: {done:,} of {len(self.split):,} images ready "
                                   "(the filters and the Image slider cover those)")
        else:
            self.progress.value = f"all {len(self.split):,} images predicted (kept in data/cache/ for next time)"
        shown = self.current_index()
        self._refilter()
        if shown is not None and self.current_index() != shown:  # keep the picture the reader is looking at
            where = torch.nonzero(self._indices == shown)
            if len(where):
                self.image.value = int(where[0, 0])

    def _refilter(self) -> None:
        mask = self.known
        if self.class_filter.value != "all":
            mask &= self.preds.labels == self.classes.index(self.class_filter.value)
        if self.difficulty_filter.value != "any":
            mask &= self.difficulty == int(self.difficulty_filter.value.split("/")[0])
        if self.correct_filter.value != "any":
            right = self.preds.correct[:, self.exit_number - 1]
            mask &= right if self.correct_filter.value == "right" else ~right
        self._indices = torch.nonzero(mask)[:, 0]
        with self.image.hold_trait_notifications():
            self.image.max = max(len(self._indices) - 1, 0)
            self.image.value = min(self.image.value, self.image.max)
        self.image.disabled = len(self._indices) <= 1
        self._update_count()

    def _update_count(self) -> None:
        n, total = len(self._indices), len(self.split)
        where = f"image {self.image.value + 1:,} of " if n else ""
        self.count.value = f"{where}{n:,} {self.split_name} images that pass the filters (of {total:,})"

    def _update_scales(self) -> None:
        k = self.exit_number
        if k not in self._finest_of_exit:  # a pass through the model: once per exit
            self._finest_of_exit[k] = gradcam.latest_sites(self.model, k)
        sizes = list(self._finest_of_exit[k])
        with self.scale.hold_trait_notifications():
            keep = self.scale.value if self.scale.value in sizes else min(sizes)
            self.scale.options = sizes
            self.scale.value = keep

    def _target(self, index: int | None) -> tuple[str, torch.Tensor | None]:
        """(target, labels) for gradcam.compute: the dropdown's value is one of gradcam.TARGETS already;
        an upload has no true class, so "true" falls back to the prediction there."""
        if self.target.value == "true":
            return ("true", self.preds.labels[index : index + 1]) if index is not None else ("predicted", None)
        return self.target.value, None

    def maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps [exits, 32, 32] in [0, 1] for the shown image at the chosen scale, logits [exits, classes]).
        The default scale gives every exit's map from one pass and is kept per image, target and method."""
        index, image = self.current_index(), self.current_image()
        target, labels = self._target(index)
        method = self.method.value
        # An upload is known by its pixels: ids of freed tensors are reused, and would show an old answer.
        shown = index if index is not None else ("upload", fingerprint([self.uploaded]))
        if len(self._maps) > 256:
            self._maps.clear()
        key = (shown, target, method)
        if key not in self._maps:  # all exits at the classifiers' own 8x8 maps: one trunk pass
            cam = gradcam.compute(self.model, image[None], list(range(1, self.n_exits + 1)), target, None, method, labels)
            self._maps[key] = (gradcam.normalize(cam.maps[0], self.model.config.image_size), cam.logits[0])
        maps, logits = self._maps[key]
        if self.scale.value == self.model.config.coarsest_size:
            return maps, logits
        k = self.exit_number
        fine_key = (*key, k, self.scale.value)  # a finer map exists for this exit only; the others stay 8x8
        if fine_key not in self._maps:
            site = self._finest_of_exit[k][self.scale.value]
            fine = gradcam.compute(self.model, image[None], [k], target, site, method, labels)
            self._maps[fine_key] = gradcam.normalize(fine.maps[0, 0], self.model.config.image_size)
        maps = maps.clone()
        maps[k - 1] = self._maps[fine_key]
        return maps, logits

    def show(self, index: int) -> None:
        """Show image `index` of the split: the filters are cleared so that every image can be reached."""
        if not 0 <= index < len(self.split):
            raise ValueError(f"index must be between 0 and {len(self.split) - 1}, got {index}")
        self._on_back()
        for w, value in ((self.class_filter, "all"), (self.difficulty_filter, "any"), (self.correct_filter, "any")):
            w.value = value
        self.image.value = index

    # ------------------------------------------------------------------ events

    def _on_filter(self, change) -> None:
        self._refilter()
        self.redraw()

    def _on_exit(self, change) -> None:
        self._update_scales()
        if self.correct_filter.value != "any":
            self._refilter()
        self.redraw()

    def _on_upload(self, change) -> None:
        files = change["new"]
        if not files:
            return
        f = files[0]
        try:
            self.uploaded = load_image(bytes(f["content"]), self.model.config.image_size)
        except ValueError as e:
            self.status.value = f"<span style='color:{viz.WRONG}'>{f['name']}: {e}</span>"
            return
        size = self.model.config.image_size
        self.status.value = f"showing your image {f['name']}: its centre square, resized to {size}x{size} as the network sees it"
        self.back.disabled = False
        self.redraw()

    def _on_back(self, button=None) -> None:
        self.uploaded = None
        if self.upload.value:
            self.upload.value = ()  # the upload button's counter goes back to 0 (its observer ignores empty)
        self.back.disabled = True
        self.status.value = ""
        self.redraw()

    # ------------------------------------------------------------------ drawing

    def redraw(self) -> None:
        start = time.perf_counter()
        self._update_count()
        image = self.current_image()
        pictures = (self.picture, self.overlay, self.bars, self.strip)
        if image is None:  # a message, and no empty images (a browser draws those as broken-image icons)
            self.title.value = f"<b>no {self.split_name} image passes these filters</b>: loosen one of them"
            self.explains.value = ""
            for w in pictures:
                w.layout.display = "none"
            self.last_redraw_s = time.perf_counter() - start
            return
        for w in pictures:
            w.layout.display = None
        index = self.current_index()
        maps, logits = self.maps()
        k = self.exit_number
        probs = logits.softmax(-1)
        conf, predicted = probs.max(-1)
        label = None if index is None else int(self.preds.labels[index])
        right = [None if label is None else int(p) == label for p in predicted]
        name = "your image" if label is None else f"{self.classes[label].capitalize()} ({int(self.difficulty[index])}/{self.n_exits})"
        verdict = "" if right[k - 1] is None else (" ✓" if right[k - 1] else " ✗")
        colour = viz.RIGHT if right[k - 1] else viz.WRONG if right[k - 1] is False else viz.NEUTRAL
        self.title.value = (f"<b>{name}</b> — B{k} says <span style='color:{colour}'>"
                            f"{self.classes[int(predicted[k - 1])]} ({conf[k - 1]:.0%}){verdict}</span>")
        target, labels = self._target(index)
        explained = int(gradcam.targets_for(target, logits[k - 1 : k], labels)[0])
        why = {"predicted": "B{k}'s own prediction", "true": "the true class"}.get(self.target.value, "the class chosen")
        if self.target.value == "true" and label is None:
            why = "B{k}'s own prediction: your image has no true class"
        self.explains.value = (f"The heatmap shows where B{k} looked for <b>{self.classes[explained]}</b> "
                               f"({why.format(k=k)}); each map is scaled to its own maximum.")
        self.picture.value = viz.png(viz.enlarged(image, None, 0, 6))
        self.overlay.value = viz.png(viz.enlarged(image, maps[k - 1], self.alpha.value, 6))
        names = [self.classes[int(p)] for p in predicted]
        self.bars.value = viz.png(viz.prediction_bars(conf.tolist(), names, right, k))
        self.strip.value = viz.png(viz.exit_strip(image, maps, right, k, self.alpha.value))
        self.last_redraw_s = time.perf_counter() - start


def explore(model: msdnet.MSDNet, split: str | data.Split = "test", source=None) -> widgets.Widget:
    """The explorer for `model` over a split (default: the test split; predictions from evaluate's cache)."""
    if isinstance(split, str):
        split = data.load(split, source)
    return Explorer(model, split).widget
