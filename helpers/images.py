"""A person's picture as the network sees it: decoded safely, upright, in [0, 1], cut to its centre square.

    x = images.load_image(open("cat.jpg", "rb").read())     # float [3, 32, 32] in [0, 1]
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .checks import whole
from .errors import InputError, InputTypeError

__all__ = ["load_image", "MAX_PIXELS", "MAX_JPEG_BUFFER", "BACKGROUND"]

MAX_PIXELS = 24_000_000
"""The most pixels a picture may have once decoded (JPEGs count after decoding at a reduced scale)."""

MAX_JPEG_BUFFER = 200_000_000
"""The most bytes a JPEG's coefficients may take while it is decoded when it comes in several scans
(progressive, or one colour at a time): libjpeg keeps them all at full size, whatever the reduced scale
(1.4 GB for a CMYK picture at Pillow's limit). With the decoded pixels (MAX_PIXELS) this keeps any upload
under 300 MB."""

BACKGROUND = "white"
"""What transparent parts of a picture are composited on."""

_HIGH_RANGE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # one channel, more than 8 bits


def _too_large(what: str) -> ValueError:
    return ValueError(f"that picture is too large to open safely ({what}); upload a smaller copy")


def _open(content: bytes, size: int) -> Image.Image:
    """The decoded picture, its pixel count checked before decoding; one clear error otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in words
            img = Image.open(io.BytesIO(content))
    except Image.DecompressionBombError:
        raise _too_large(f"over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"that file is not an image Pillow can read ({e.__class__.__name__}); "
                         "upload a PNG, JPEG, BMP or GIF") from None
    if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, still well above `size`
        kind = "progressive" if img.info.get("progressive") else "multi-scan" if _multi_scan(content) else None
        need = _jpeg_buffer(img) if kind else 0
        if need > MAX_JPEG_BUFFER:
            raise _too_large(f"a {kind} JPEG of {img.width:,} x {img.height:,} pixels, which takes about "
                             f"{need / 1e6:,.0f} MB to decode, over the limit of {MAX_JPEG_BUFFER / 1e6:,.0f} MB")
        img.draft(img.mode, (4 * size, 4 * size))
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise _too_large(f"{w:,} x {h:,} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,}")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise InputError(f"that file is not an image Pillow can read ({e.__class__.__name__}: {e}); "
                         "upload a PNG, JPEG, BMP or GIF") from None
    return img


def _jpeg_buffer(img: Image.Image) -> int:
    """The bytes libjpeg holds for the coefficients of a JPEG decoded in several scans (`img` opened, not
    loaded): each component's 64 coefficients of 2 bytes per 8x8 block, at full size."""
    layers = getattr(img, "layer", None) or [(None, 1, 1, None)] * len(img.getbands())  # (id, h, v sampling, table)
    h_max, v_max = max(l[1] for l in layers), max(l[2] for l in layers)
    return sum(math.ceil(img.width * h / h_max / 8) * math.ceil(img.height * v / v_max / 8) * 64 * 2
               for _, h, v, _ in layers)


_STANDALONE = {0x01, *range(0xD0, 0xDA)}  # markers without a length: TEM, RSTn, SOI, EOI
_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn; C4, C8 and CC are tables and a reserved code


def _multi_scan(content: bytes) -> bool:
    """Whether a sequential JPEG's first scan holds fewer colours than its frame, so that libjpeg, like for
    a progressive one, buffers the whole picture's coefficients before it can draw a row."""
    pos, colours = 2, None
    while pos + 4 <= len(content) and content[pos] == 0xFF:
        marker = content[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in _FRAMES and pos + 10 <= len(content):
            colours = content[pos + 9]
        if marker == 0xDA:  # start of the first scan: its own count of colours follows the length
            return colours is not None and content[pos + 4] < colours
        pos += 2 + int.from_bytes(content[pos + 2 : pos + 4], "big")
    return False


def _opaque(img: Image.Image) -> Image.Image:
    """A one-channel picture of more than 8 bits with one transparent value (a PNG's tRNS chunk): that
    value becomes the top of its range (white), i.e. composited on BACKGROUND. Resizing is linear, so
    this equals compositing after the resize."""
    transparent = img.info.get("transparency")
    if not isinstance(transparent, (int, float)) or isinstance(transparent, bool):
        return img
    white = _value_range(img)[1]
    pixels = np.array(img)  # a copy we may write: 2 or 4 bytes a pixel
    pixels[pixels == transparent] = white
    return Image.fromarray(pixels)


def _value_range(img: Image.Image) -> tuple[float, float]:
    """The values that map to black and white for a one-channel image of more than 8 bits.

    16-bit modes span 0..65535; 32-bit integers the same when they fit, else their own min..max; floats
    0..1 when they fit, else 0..255 when they fit, else their own min..max.
    """
    if img.mode.startswith("I;16"):
        return 0.0, 65535.0
    lo, hi = (float(v) for v in img.getextrema())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        lo, hi = (float(v) for v in np.nanquantile(np.asarray(img, dtype=np.float32)[::8, ::8], [0, 1]))
    for top in ((1.0, 255.0) if img.mode == "F" else (65535.0,)):
        if lo >= 0 and hi <= top:
            return 0.0, top
    return lo, hi if hi > lo else lo + 1


def load_image(content: bytes, size: int = 32) -> torch.Tensor:
    """A picture file as the network's input: upright, its centre square, resized.

    Args:
        content: the file's bytes (PNG, JPEG, BMP, GIF, TIFF, WebP: any format Pillow reads), at most
            MAX_PIXELS once decoded.
        size: the side of the result in pixels.

    Returns:
        float [3, size, size] in [0, 1], RGB. The EXIF orientation is applied; 16-bit and float pictures
        are scaled by their value range (see below), not clipped; transparent parts (an alpha channel, or
        a transparent value at any bit depth) are composited on white (BACKGROUND); a grey picture gives
        three equal channels.

    Raises:
        ValueError: a file that is no picture, a damaged one, or one too large to open safely.

    16-bit pictures span 0..65535; float ones 0..1 (or 0..255 when their values exceed 1); other ranges
    are stretched from their minimum to their maximum.
    """
    if not isinstance(content, (bytes, bytearray, memoryview)):
        raise InputTypeError(f"content must be the file's bytes (open(path, 'rb').read()), got {type(content).__name__}")
    size = whole(size, "size")
    img = _open(content, size)
    ImageOps.exif_transpose(img, in_place=True)
    side = min(img.size)  # the centre square: a resize alone would squash a wide or tall picture
    left, top = (img.width - side) // 2, (img.height - side) // 2
    box = (left, top, left + side, top + side)
    if img.mode in _HIGH_RANGE:
        img = _opaque(img)
        lo, hi = _value_range(img)
        small = img.resize((size, size), Image.Resampling.BILINEAR, box=box)  # linear: scale afterwards
        x = np.nan_to_num((np.asarray(small, dtype=np.float32) - lo) / (hi - lo), nan=0.0)
        return torch.from_numpy(x).clamp_(0, 1)[None].expand(3, -1, -1).contiguous()
    alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.info.get("transparency") is not None
    mode = "RGBA" if alpha else "RGB"
    try:
        img = img if img.mode == mode else img.convert(mode)
    except ValueError as e:  # e.g. a colour space Pillow cannot turn into RGB
        raise InputError(f"that picture's colours ({img.mode}) cannot be read as RGB: {e}") from None
    small = img.resize((size, size), Image.Resampling.BILINEAR, box=box)  # RGBA: Pillow resizes premultiplied
    if alpha:
        small = Image.alpha_composite(Image.new("RGBA", small.size, BACKGROUND), small).convert("RGB")
    return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1).float() / 255
