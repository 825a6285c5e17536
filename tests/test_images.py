"""A person's picture decoded as the network sees it: upright, in [0, 1] by its real range, on white, safely."""
import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import images


def encode(img: Image.Image, fmt: str = "png", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_the_exif_orientation_is_applied():
    px = np.zeros((32, 32, 3), dtype=np.uint8)
    px[:16] = (255, 0, 0)  # stored: red on top, blue below
    px[16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    x = images.load_image(encode(Image.fromarray(px), exif=exif))
    assert x[0, :, -4:].mean() > 0.95 and x[2, :, -4:].mean() < 0.05  # shown: red on the right
    assert x[2, :, :4].mean() > 0.95 and x[0, :, :4].mean() < 0.05  # and blue on the left


def test_16_bit_pictures_are_scaled_by_their_range_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    x = images.load_image(encode(img))
    assert x.shape == (3, 32, 32) and abs(float(x.mean()) - 0.5) < 0.01 and float(x.max()) > 0.95
    as_int32 = images.load_image(encode(img.convert("I"), "tiff"))  # mode I: 16-bit values in 32-bit integers
    assert abs(float(as_int32.mean()) - 0.5) < 0.01


def test_float_pictures_keep_their_values():
    grey = images.load_image(encode(Image.fromarray(np.full((40, 40), 0.5, dtype=np.float32)), "tiff"))
    assert torch.allclose(grey, torch.full((3, 32, 32), 0.5))
    in_255 = images.load_image(encode(Image.fromarray(np.full((40, 40), 51.0, dtype=np.float32)), "tiff"))
    assert torch.allclose(in_255, torch.full((3, 32, 32), 0.2))


def test_transparent_parts_are_composited_on_white():
    assert images.BACKGROUND == "white"
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, 16:, 3] = 255  # left half transparent, right half opaque red
    x = images.load_image(encode(Image.fromarray(rgba)))
    assert torch.allclose(x[:, :, :12], torch.ones(3, 32, 12))
    assert torch.allclose(x[:, :, 20:], torch.tensor([1.0, 0, 0])[:, None, None].expand(3, 32, 12))
    half = images.load_image(encode(Image.new("LA", (8, 8), (0, 128))))  # black at half opacity: mid grey
    assert torch.allclose(half, torch.full((3, 32, 32), 127 / 255), atol=1 / 255)
    gif = Image.new("P", (8, 8), 0)
    gif.putpalette([0, 0, 0, 255, 0, 0])
    assert images.load_image(encode(gif, "gif", transparency=0)).min() == 1  # the transparent index: white


def test_a_picture_over_the_pixel_cap_is_refused_in_one_message(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100_000)
    with pytest.raises(ValueError, match=r"too large to open safely \(640 x 480 = 307,200 pixels, over the limit of 100,000\)"):
        images.load_image(encode(Image.new("RGB", (640, 480))))
    # A JPEG is decoded at a reduced scale (1/8 here), under the cap: accepted.
    x = images.load_image(encode(Image.new("RGB", (640, 480), (0, 200, 0)), "jpeg"))
    assert x.shape == (3, 32, 32) and abs(float(x[1].mean()) - 200 / 255) < 0.02


def test_the_cap_keeps_memory_well_below_pillows_limit():
    assert images.MAX_PIXELS * 4 * 3 <= 300e6 < Image.MAX_IMAGE_PIXELS * 4  # 4 bytes a pixel, a few copies at most


def test_non_images_and_decompression_bombs_are_refused_in_words(monkeypatch):
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        images.load_image(b"hello")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        images.load_image(encode(Image.new("RGB", (64, 64)))[:60])  # truncated
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match="too large to open safely .*Pillow's limit"):
        images.load_image(encode(Image.new("RGB", (64, 48))))


@pytest.mark.slow
def test_decoding_the_largest_picture_allowed_stays_under_300_mb(tmp_path):
    side = int(images.MAX_PIXELS ** 0.5)
    path = tmp_path / "big.png"
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba).save(path, compress_level=1)
    del rgba
    script = textwrap.dedent(f"""
        import resource
        from helpers import images
        content = open(r"{path}", "rb").read()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        images.load_image(content)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    grew_mb = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grew_mb < 300


def test_a_16_bit_grey_picture_with_a_transparent_value_is_composited_on_white():
    grey = np.full((40, 40), 30000, dtype=np.uint16)
    grey[:, :20] = 0  # left half: the tRNS value, transparent
    img = Image.fromarray(grey)
    assert img.mode == "I;16"
    x = images.load_image(encode(img, transparency=0))
    assert torch.allclose(x[:, :, :14], torch.ones(3, 32, 14))  # white, as an 8-bit grey PNG's transparent part
    assert torch.allclose(x[:, :, 18:], torch.full((3, 32, 14), 30000 / 65535))
    eight_bit = images.load_image(encode(Image.fromarray((grey // 257).astype(np.uint8)), transparency=0))
    assert torch.allclose(eight_bit[:, :, :14], x[:, :, :14])


def progressive_jpeg_declaring(width: int, height: int, mode: str = "CMYK") -> bytes:
    """A small progressive JPEG whose header declares width x height: Pillow opens it at that size, and
    libjpeg would set aside its whole coefficient buffer before finding the data short."""
    content = bytearray(encode(Image.new(mode, (64, 64)), "jpeg", progressive=True))
    sof = content.find(b"\xff\xc2")
    content[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(content)


def multi_scan_jpeg_declaring(width: int, height: int) -> bytes:
    """A small sequential JPEG whose header declares width x height and whose first scan holds one colour
    of three: libjpeg buffers such a picture's coefficients as it does a progressive one's."""
    content = bytearray(encode(Image.new("RGB", (64, 64)), "jpeg"))
    sof = content.find(b"\xff\xc0")
    content[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    sos = content.find(b"\xff\xda")
    length = int.from_bytes(content[sos + 2 : sos + 4], "big")
    one_colour = b"\xff\xda\x00\x08\x01" + content[sos + 5 : sos + 7] + b"\x00\x3f\x00"
    return bytes(content[:sos] + one_colour + content[sos + 2 + length :])


def test_a_multi_scan_jpeg_too_large_to_decode_is_refused_before_decoding():
    with pytest.raises(ValueError, match=r"too large to open safely \(a multi-scan JPEG of 12,000 x 12,000 pixels, "
                                         r"which takes about 432 MB to decode"):
        images.load_image(multi_scan_jpeg_declaring(12000, 12000))  # 4:2:0, 1.5 x 144 M / 64 blocks x 128 bytes
    assert images.load_image(multi_scan_jpeg_declaring(8000, 8000)).shape == (3, 32, 32)  # 192 MB: decoded
    baseline = bytearray(encode(Image.new("RGB", (64, 64)), "jpeg"))
    sof = baseline.find(b"\xff\xc0")
    baseline[sof + 5 : sof + 9] = (12000).to_bytes(2, "big") * 2  # one scan: decoded a few rows at a time
    assert images.load_image(bytes(baseline)).shape == (3, 32, 32)


def test_a_progressive_jpeg_too_large_to_decode_is_refused_before_decoding():
    big = progressive_jpeg_declaring(6000, 6000)  # 36 M pixels x 4 components x 2 bytes: 288 MB of coefficients
    with pytest.raises(ValueError, match=r"too large to open safely \(a progressive JPEG of 6,000 x 6,000 pixels, "
                                         r"which takes about 288 MB to decode, over the limit of 200 MB\)") as e:
        images.load_image(big)
    assert "\n" not in str(e.value)
    assert images.load_image(progressive_jpeg_declaring(3000, 3000)).shape == (3, 32, 32)  # 72 MB: decoded


def test_any_upload_stays_under_300_mb_while_decoded():
    cases = [progressive_jpeg_declaring(12000, 12000), progressive_jpeg_declaring(13000, 13000, "RGB"),
             progressive_jpeg_declaring(4900, 4900), progressive_jpeg_declaring(8000, 8000, "RGB"),
             multi_scan_jpeg_declaring(12000, 12000), multi_scan_jpeg_declaring(8000, 8000)]
    script = textwrap.dedent("""
        import resource, sys
        from helpers import images
        contents = [bytes.fromhex(line) for line in sys.stdin.read().split()]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for content in contents:
            try:
                images.load_image(content)
            except ValueError:
                pass
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    run = subprocess.run([sys.executable, "-c", script], input="\n".join(c.hex() for c in cases), capture_output=True,
                         text=True, check=True)
    assert float(run.stdout) < 300, f"{float(run.stdout):.0f} MB"
