"""The explorer driven from Python: moving its widgets changes what it shows as it must."""
import io
from datetime import datetime, timezone

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import data, evaluate, explorer, msdnet


@pytest.fixture
def app(tmp_path_factory):  # a fresh app per test: no test sees another's clicks
    from conftest import write_class_folders

    folder = write_class_folders(tmp_path_factory.mktemp("explorer") / "tiny")
    split = data.load("test", source=folder, data_dir=tmp_path_factory.mktemp("cache"))
    torch.manual_seed(0)
    model = msdnet.build("tiny").eval()
    return explorer.Explorer(model, split, evaluate.predict(model, split, cache=False))


def shown(app):
    return app.title.value, bytes(app.overlay.value), bytes(app.strip.value), bytes(app.bars.value)


def test_it_shows_an_image_with_its_difficulty_and_the_chosen_exits_answer(app):
    title = app.title.value
    i = app.current_index()
    assert data.CLASSES[int(app.preds.labels[i])].capitalize() in title
    assert f"({int(app.difficulty[i])}/4)" in title and "B4 says" in title
    for img in (app.picture, app.overlay, app.bars, app.strip):
        assert bytes(img.value).startswith(b"\x89PNG")


def test_moving_the_exit_slider_changes_the_overlay_and_the_label(app):
    app.exit.value = "B4"
    before = shown(app)
    app.exit.value = "B1"
    after = shown(app)
    assert "B1 says" in after[0] and before[0] != after[0]
    assert before[1] != after[1]  # another exit, another map
    assert app.exit.description == "Exit"


def test_moving_the_image_slider_shows_another_image(app):
    app.image.value = 0
    first = bytes(app.picture.value)
    app.image.value = 5
    assert bytes(app.picture.value) != first and app.current_index() == int(app.indices[5])


def test_filters_narrow_the_images_the_slider_walks_through(app):
    app.class_filter.value = "truck"
    assert app.image.max == 1  # 2 test trucks in the tiny set
    assert all(app.preds.labels[i] == 9 for i in app.indices)
    app.exit.value = "B2"
    app.correct_filter.value = "wrong"
    assert all(not app.preds.correct[i, 1] for i in app.indices)
    app.class_filter.value = "all"
    app.correct_filter.value = "any"
    app.difficulty_filter.value = "0/4"
    assert all(app.difficulty[i] == 0 for i in app.indices)
    app.difficulty_filter.value = "any"
    assert len(app.indices) == 20


def test_method_target_opacity_and_scale_change_the_overlay(app):
    app.exit.value = "B3"
    overlay = lambda: bytes(app.overlay.value)
    base = overlay()
    app.method.value = "gradcam++"
    plus = overlay()
    app.method.value = "gradcam"
    app.alpha.value = 0.9
    assert overlay() not in (base, plus)
    app.alpha.value = 0.5
    app.target.value = "airplane" if "airplane" not in app.title.value else "ship"
    assert overlay() != base
    app.target.value = "predicted"
    assert 32 in app.scale.options  # exit 3 of the tiny net can be explained at 32x32
    app.scale.value = 32
    assert overlay() != base
    app.scale.value = 8


def test_bars_follow_the_exits_predictions(app):
    app.image.value = 0
    maps, logits = app.maps()
    assert torch.allclose(logits, app.preds.logits[app.current_index()], atol=1e-5)
    assert maps.shape == (4, 32, 32)


def test_an_uploaded_image_is_resized_and_a_non_image_refused(app):
    png = io.BytesIO()
    Image.fromarray(np.full((64, 48, 3), 200, dtype=np.uint8)).save(png, format="png")
    app.upload.value = ({"name": "mine.png", "type": "image/png", "size": 10, "content": memoryview(png.getvalue()),
                         "last_modified": datetime.now(timezone.utc)},)
    assert app.uploaded.shape == (3, 32, 32) and "your image" in app.title.value and "mine.png" in app.status.value
    app.upload.value = ({"name": "notes.txt", "type": "text/plain", "size": 5, "content": memoryview(b"hello"),
                         "last_modified": datetime.now(timezone.utc)},)
    assert "notes.txt" in app.status.value and "not an image" in app.status.value
    app.back.click()
    assert app.uploaded is None and "your image" not in app.title.value


def test_load_image_accepts_rgba_and_grayscale():
    for mode in ("RGBA", "L"):
        buf = io.BytesIO()
        Image.new(mode, (10, 20)).save(buf, format="png")
        assert explorer.load_image(buf.getvalue()).shape == (3, 32, 32)


def test_show_jumps_to_an_image_whatever_the_filters(app):
    app.class_filter.value = "cat"
    app.show(19)
    assert app.current_index() == 19 and app.class_filter.value == "all"
    with pytest.raises(ValueError, match="between 0 and 19"):
        app.show(20)


def _upload(app, array: np.ndarray, name: str = "mine.png") -> None:
    png = io.BytesIO()
    Image.fromarray(array).save(png, format="png")
    app.upload.value = ({"name": name, "type": "image/png", "size": len(png.getvalue()),
                         "content": memoryview(png.getvalue()), "last_modified": datetime.now(timezone.utc)},)


def test_each_upload_shows_its_own_answer(app):
    """Uploads are told apart by their pixels: an answer computed for one picture is never shown for another
    (keyed by id(), freed tensors' ids came back and showed an earlier picture's prediction)."""
    rng = np.random.default_rng(0)
    for i in range(40):
        _upload(app, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), f"{i}.png")
        with torch.no_grad():
            want = torch.stack(app.model(app.uploaded[None]))[:, 0]
        _, logits = app.maps()
        assert torch.allclose(logits, want, atol=1e-5), f"upload {i} shows another picture's answer"
        app.back.click()  # freed: the next upload's tensor may well get its id


def test_a_picture_too_large_to_open_safely_is_refused_in_words(app, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as a 20000x20000 picture is under the real limit
        _upload(app, np.zeros((64, 48, 3), dtype=np.uint8), "huge.png")
    assert "huge.png" in app.status.value and "too large to open safely" in app.status.value
    app.back.click()


def test_without_cached_predictions_it_opens_at_once_and_predicts_the_rest_in_the_background(tiny_folder):
    split = data.load("test", source=tiny_folder)
    torch.manual_seed(0)
    model = msdnet.build("tiny").eval()
    assert evaluate.cached_predictions(model, split) is None
    app = explorer.Explorer(model, split, first=5, chunk=4)
    assert 5 <= int(app.known.sum()) <= len(split) and app.title.value  # usable from the first images on
    app.wait()
    assert bool(app.known.all()) and "all 20 images predicted" in app.progress.value
    want = evaluate.predict(model, split, cache=False)
    assert torch.allclose(app.preds.logits, want.logits, atol=1e-5)
    assert app.image.max == len(split) - 1  # the slider now walks through every image
    # Stored where predict() looks: the next explorer starts from the cache, predicting nothing.
    again = explorer.Explorer(model, split)
    assert bool(again.known.all()) and "predicting" not in again.progress.value and torch.allclose(again.preds.logits, want.logits, atol=1e-5)


def test_it_counts_the_images_that_pass_the_filters_and_names_the_explained_class(app):
    app.class_filter.value = "truck"
    app.image.value = 1
    assert app.count.value == "image 2 of 2 test images that pass the filters (of 20)"
    app.exit.value = "B3"
    app.target.value = "true"
    assert "for <b>truck</b> (the true class)" in app.explains.value
    app.target.value = "cat"
    assert "for <b>cat</b> (the class chosen)" in app.explains.value
    app.target.value = "predicted"
    said = app.title.value.split("B3 says ")[1].split("<span style='color:")[1].split(">")[1].split(" (")[0]
    assert f"for <b>{said}</b> (B3's own prediction)" in app.explains.value
    app.class_filter.value = "all"


def test_an_empty_filter_shows_a_message_and_no_broken_images(app):
    app.class_filter.value = "truck"
    app.difficulty_filter.value = "4/4"
    app.correct_filter.value = "wrong"  # right at all four exits, yet wrong at this one: nobody
    assert "no test image passes these filters" in app.title.value and app.count.value.startswith("0 test images")
    assert all(w.layout.display == "none" for w in (app.picture, app.overlay, app.bars, app.strip))
    for w, value in ((app.class_filter, "all"), (app.difficulty_filter, "any"), (app.correct_filter, "any")):
        w.value = value
    assert all(w.layout.display is None for w in (app.picture, app.overlay, app.bars, app.strip))


def test_an_upload_keeps_its_aspect_ratio_and_back_clears_the_button(app):
    wide = np.zeros((32, 96, 3), dtype=np.uint8)
    wide[:, 32:64] = (0, 0, 255)  # a blue square in the middle of a black strip three times as wide
    _upload(app, wide, "wide.png")
    assert torch.allclose(app.uploaded, torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 32, 32))
    assert "centre square" in app.status.value and len(app.upload.value) == 1
    app.back.click()
    assert app.uploaded is None and len(app.upload.value) == 0 and app.back.description == "Back to the test images"


def test_the_explorers_pictures_are_drawn_by_viz_with_known_colours():
    from helpers import viz

    bars = viz.prediction_bars([1.0, 0.5], ["cat", "dog"], [True, False], chosen=2)
    px = np.asarray(bars)
    assert tuple(px[16 + 8, 28 + 140]) == (0x2C, 0xA0, 0x2C)  # row 1, a full bar: right, green
    assert tuple(px[16 + 17 + 8, 28 + 40]) == (0xD6, 0x27, 0x28)  # row 2, half a bar: wrong, red
    assert tuple(px[16 + 17 + 8, 28 + 120]) == (255, 255, 255)  # beyond its 50%: white
    image = torch.zeros(3, 32, 32)
    strip = viz.exit_strip(image, torch.zeros(3, 32, 32), [True, None, False], chosen=1)
    assert strip.size == (3 * (64 + 6), 64 + 16)
    assert viz.png(strip).startswith(b"\x89PNG")
    assert viz.enlarged(image, None, 0, 6).shape == (192, 192, 3)
