"""A user's image -> the model's input, the way MNIST itself was made. Shared by `mnist predict` and serve.

MNIST's digits are white on black, cropped to the ink, scaled so the longer side is 20 px (keeping
the aspect ratio, anti-aliased) and placed in 28x28 with their centre of mass at the centre. A photo
or a drawing is none of that, so: grayscale; invert when the background is light; stretch the
background to 0 and the darkest ink to 255; crop to the ink's bounding box; scale; centre by mass.

Pillow and plain Python only: `mnist predict` runs where torch is and numpy is not, serve's slim
image has numpy and no torch. An image comes out as contract.IMAGE_BYTES bytes; each runtime makes
its own array of them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import warnings
from typing import Iterator, Tuple, Union

from PIL import Image, ImageChops, PngImagePlugin

from mnist_pipeline.contract import IMAGE_SIZE
from mnist_pipeline.errors import PipelineError, first_line

DIGIT_BOX = 20  # MNIST: the longer side of the digit, inside the 28x28 frame
# What decoding one image may allocate, whatever its file size: checked from the header, before
# decoding (a PNG of a few hundred KB can decode to gigabytes). 32 MiB: a 2900x2900 RGBA drawing, a
# 5800x5800 grayscale scan, a progressive 10-megapixel JPEG photo (a baseline one of any size the
# upload limit lets through: it is decoded reduced). At most about half as much again is held beside
# it while it becomes grayscale.
MAX_DECODED_BYTES = 32 * 2**20
# The longer side an image is worked on at: a JPEG is decoded at the scale closest above it, anything
# larger is reduced to it (box average) before the MNIST steps. The digit ends up 20 px tall.
WORK_SIDE = 1024
MAX_SCANS = 100  # of a JPEG: libjpeg decodes each, and a small file can repeat one thousands of times
# A digit's file needs no text: Pillow inflates a PNG's compressed text chunks as it opens the file (up to
# 1 MB each and 64 MB in all by default), so a small file could cost much. Pillow's documented limits, lowered.
PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY = 64 * 1024
# the formats the error messages name; Pillow's others (TIFF, PSD, EPS, ...) are more parser than a
# digit needs
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
INK = 0.25  # of full contrast: what counts as ink for the bounding box (JPEG noise stays below)
MIN_CONTRAST = 32  # grey levels between background and ink; less is an empty page
INK_LEVEL = int(INK * 255)  # grey levels above it are ink
SMALL_PIXELS = 512 * 512  # an image this small is copied whole to read its edges
# a JPEG marker that ends entropy-coded data: 0xFF followed by anything but a stuffed 0 or a restart
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class ImageError(PipelineError):
    """The bytes are not a usable image (not one, truncated, too large, blank)."""


def opened(data: bytes) -> Image.Image:
    """Bytes of an image -> the image as its header describes it, checked against the limits and not decoded yet
    (`.size`: what decoding it gives); `decode` finishes it."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    with _reading(), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        full_size, full_mode = image.size, image.mode  # from the header only: nothing decoded yet
        if image.format == "JPEG":
            # libjpeg decodes straight to grayscale, at 1/2, 1/4 or 1/8 scale when that still covers WORK_SIDE
            scale = WORK_SIDE / max(full_size)
            image.draft("L", (max(1, int(full_size[0] * scale)), max(1, int(full_size[1] * scale))))
        passes = scans(image, data, MAX_SCANS + 1)
        if passes > MAX_SCANS:
            raise ImageError(f"the JPEG has more than {MAX_SCANS} scans (a progressive one has about 10), and each "
                             f"costs a pass over the image: save it as a baseline JPEG or a PNG")
        cost = decoded_bytes(image, full_size, passes)
        if cost > MAX_DECODED_BYTES:
            width, height = full_size
            raise ImageError(f"the image is {width}x{height} pixels ({full_mode}): decoding it takes "
                             f"{cost / 2**20:,.0f} MB, more than the {MAX_DECODED_BYTES // 2**20} MB an image "
                             f"may; scale it down")
        return image


def decode(data: Union[bytes, Image.Image]) -> Image.Image:
    """Bytes of an image (or what `opened` made of them) -> an 8-bit grayscale image (the first frame of an
    animation), at most WORK_SIDE pixels on its longer side."""
    image = opened(data) if isinstance(data, bytes) else data
    with _reading():
        image.load()
        return _reduced(_grayscale(image))


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """Pillow's errors, and its decompression-bomb warning made one, as one ImageError saying what to send."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own limit, checked as it opens the file, before the header is ours to look at
        raise ImageError(f"the image has more than {Image.MAX_IMAGE_PIXELS:,} pixels, more than this decodes; "
                         f"scale it down") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image: not a format this reads; send a PNG, JPEG, WebP, BMP or GIF") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        what = "truncated or corrupt" if "truncat" in str(exc) or isinstance(exc, EOFError) else "not an image"
        raise ImageError(
            f"{what}: Pillow cannot read it ({first_line(exc, 120)}); send a PNG, JPEG, WebP, BMP or GIF"
        ) from None


def decoded_bytes(image: Image.Image, full_size: Tuple[int, int], passes: int) -> int:
    """The memory decoding `image` (opened, perhaps drafted, not loaded) takes, from its header: Pillow's
    pixels and what the format's decoder holds besides. `full_size`: the file's own, before a draft; `passes`:
    its scans."""
    width, height = image.size
    # Pillow keeps "1", "L" and "P" in a byte a pixel, 16-bit grey in two, everything else in four
    cost = width * height * (1 if image.mode in ("1", "L", "P") else 2 if image.mode.startswith("I;16") else 4)
    if image.format == "WEBP":  # libwebp's own buffer and the copy handed to Pillow
        cost *= 3
    elif passes > 1:
        # a progressive (or multi-scan) JPEG: libjpeg holds every DCT coefficient of the full-size
        # image, 2 bytes each, whatever the scale it is decoded at; a component sampled at half the
        # resolution (the usual colour) has a quarter of them
        most_h = max(h for _, h, _, _ in image.layer)
        most_v = max(v for _, _, v, _ in image.layer)
        cost += sum(-(-full_size[0] * h // (8 * most_h)) * -(-full_size[1] * v // (8 * most_v)) * 64 * 2
                    for _, h, v, _ in image.layer)
    return cost


def scans(image: Image.Image, data: bytes, most: int = 2) -> int:
    """How many scans `image` (opened from `data`) has, counting to `most`: 1 but for a progressive or multi-scan
    JPEG, whose decoder buffers the whole image and whose cost grows with its scans, not its pixels."""
    return _jpeg_scans(data, most) if image.format == "JPEG" else 1


def _jpeg_scans(data: bytes, most: int) -> int:
    """How many scans (SOS segments) the JPEG's own image has, counting to `most`. Segments are skipped by their
    lengths, so an EXIF thumbnail's scan is not counted."""
    at, scans = 2, 0
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            at += 2
            continue
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        if marker == 0xDA:
            scans += 1
            if scans >= most:
                break
            found = _JPEG_MARKER.search(data, at)  # the entropy-coded data runs to the next marker
            if found is None:
                break
            at = found.start()
    return scans


def _grayscale(image: Image.Image) -> Image.Image:
    """Luminance; transparent parts become white paper (a drawing on a transparent canvas is dark ink).

    Done on 8-bit bands: next to the decoded image, at most its grey and alpha bands exist at once
    (a quarter of an RGBA image each), never another full-size RGBA copy.
    """
    if image.mode == "P" and "transparency" in image.info:
        return _palette_on_paper(image)
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        grey = image.getchannel("L") if image.mode == "LA" else image.convert("L")
        image.close()  # frees the decoded pixels: only the two bands are needed from here on
        paper = Image.new("L", grey.size, 255)
        paper.paste(grey, mask=alpha)  # grey where opaque, white where transparent, blended between
        return paper
    if image.mode == "L":
        return image
    if image.mode in ("PA", "La", "RGBa"):  # rare: through Pillow's own conversion to RGBA
        rgba = image.convert("RGBA")
        image.close()
        return _grayscale(rgba)
    grey = image.convert("L")
    image.close()
    return grey


def _palette_on_paper(image: Image.Image) -> Image.Image:
    """A palette image with transparent entries -> grey on white paper, entry by entry (no RGBA copy)."""
    palette = image.getpalette("RGB") or []
    transparency = image.info.pop("transparency")
    alphas = [255] * 256
    if isinstance(transparency, bytes):  # an alpha for each entry, in order
        alphas[:len(transparency)] = transparency[:256]
    elif isinstance(transparency, int) and 0 <= transparency < 256:  # the one transparent entry
        alphas[transparency] = 0
    greys = []
    for index in range(len(palette) // 3):
        red, green, blue = palette[3 * index:3 * index + 3]
        grey = (red * 299 + green * 587 + blue * 114) // 1000  # the L of Pillow's convert
        grey = 255 - (255 - grey) * alphas[index] // 255
        greys += [grey] * 3
    image.putpalette(greys, "RGB")
    grey = image.convert("L")
    image.close()
    return grey


def _reduced(image: Image.Image) -> Image.Image:
    """At most WORK_SIDE pixels on the longer side: the MNIST steps then copy a small image, not a large one."""
    factor = -(-max(image.size) // WORK_SIDE)  # rounded up
    return image.reduce(factor) if factor > 1 else image


def to_mnist(image: Image.Image) -> bytes:
    """8-bit grayscale image of one digit -> 28x28 uint8 pixels row by row, white ink on black, MNIST-style.

    The full-size image gets three C passes (its border, its extremes, the ink's box); the rest works on
    the crop. Plain Python only computes the centre of mass of the small 20 px patch and places it.
    """
    width, height = image.size
    background = sorted(_border(image))[2 * (width + height) // 2]  # the median: the paper, whatever ink touches
    if background > 127:  # dark ink on light paper: MNIST's ink is the bright part
        image, background = ImageChops.invert(image), 255 - background
    contrast = image.getextrema()[1] - background
    if contrast < MIN_CONTRAST:
        raise ImageError("no digit found: the image is blank (no ink stands out from the background)")
    stretch, ink = _stretch(background, contrast)
    # the ink's box: the levels the stretch puts above INK of full contrast (JPEG noise stays below)
    crop = image.crop(ImageChops.subtract(image, Image.new("L", image.size, ink - 1)).getbbox())

    scale = DIGIT_BOX / max(crop.size)
    width, height = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    # Pillow's resampling filters average over the source when shrinking (anti-aliasing, as MNIST did);
    # reducing_gap first box-averages by a whole factor, "indistinguishable from fair resampling in most
    # cases" at 3 (Pillow's documentation), and faster on a large crop. The stretch is
    # linear: done on the 20 px patch (a C table lookup), not on the crop.
    patch = crop.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0).tobytes().translate(stretch)
    rows = [patch[y * width:(y + 1) * width] for y in range(height)]

    # place the patch so that its centre of mass lands on the frame's centre (kept inside the frame)
    total = max(sum(patch), 1e-6)
    com_y = sum(y * sum(row) for y, row in enumerate(rows)) / total + 0.5
    com_x = sum(x * sum(patch[x::width]) for x in range(width)) / total + 0.5
    y = min(max(round(IMAGE_SIZE / 2 - com_y), 0), IMAGE_SIZE - height)
    x = min(max(round(IMAGE_SIZE / 2 - com_x), 0), IMAGE_SIZE - width)
    frame = bytearray(IMAGE_SIZE * IMAGE_SIZE)
    for row_number, row in enumerate(rows, y):
        frame[row_number * IMAGE_SIZE + x:row_number * IMAGE_SIZE + x + width] = row
    return bytes(frame)


def _border(image: Image.Image) -> bytes:
    """The pixels of the image's four edges (its corners twice): from its bytes when it is small (one copy costs
    less than four crops), else from four crops."""
    width, height = image.size
    if width * height <= SMALL_PIXELS:
        pixels = image.tobytes()
        return pixels[:width] + pixels[-width:] + pixels[::width] + pixels[width - 1::width]
    edges = ((0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height), (width - 1, 0, width, height))
    return b"".join(image.crop(box).tobytes() for box in edges)


@functools.lru_cache(maxsize=64)
def _stretch(background: int, contrast: int) -> Tuple[bytes, int]:
    """The table (for bytes.translate) that takes `background` to 0 and `background + contrast` to 255, and the
    lowest level it puts above INK_LEVEL: where ink begins (most images share a few)."""
    table = bytes(min(255, max(0, round((v - background) * 255 / contrast))) for v in range(256))
    return table, next(v for v in range(256) if table[v] > INK_LEVEL)


def from_bytes(data: Union[bytes, Image.Image]) -> bytes:
    """Image file bytes (or what `opened` made of them) -> the model's 28x28 uint8 pixels, row by row
    (contract.IMAGE_BYTES)."""
    return to_mnist(decode(data))
