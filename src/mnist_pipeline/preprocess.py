"""A user's image -> the model's input, the way MNIST itself was made. Shared by `mnist predict` and serve.

MNIST's digits are white on black, cropped to the ink, scaled so the longer side is 20 px (keeping
the aspect ratio, anti-aliased) and placed in 28x28 with their centre of mass at the centre. A photo
or a drawing is none of that, so: grayscale; invert when the background is light; stretch the
background to 0 and the darkest ink to 255; crop to the ink's bounding box; scale; centre by mass.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, ImageOps

from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.model import IMAGE_SIZE

DIGIT_BOX = 20  # MNIST: the longer side of the digit, inside the 28x28 frame
MAX_PIXELS = 40_000_000  # a 7000x5700 photo; refused from the header, before decoding a bomb
INK = 0.25  # of full contrast: what counts as ink for the bounding box (JPEG noise stays below)
MIN_CONTRAST = 32  # grey levels between background and ink; less is an empty page
_INK_MASK = [255 if v > INK * 255 else 0 for v in range(256)]


class ImageError(PipelineError):
    """The bytes are not a usable image (not one, truncated, too large, blank)."""


def decode(data: bytes) -> Image.Image:
    """Bytes of any image Pillow reads -> an 8-bit grayscale image (the first frame of an animation)."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # from the header only: nothing decoded yet
            if width * height > MAX_PIXELS:
                raise ImageError(f"the image is {width}x{height} pixels, more than {MAX_PIXELS:,}; scale it down")
            image.load()
            return _grayscale(image)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"the image has more than {MAX_PIXELS:,} pixels; scale it down") from None
        except Image.UnidentifiedImageError:
            raise ImageError("not an image: Pillow does not recognise its format; "
                             "send a PNG, JPEG, WebP, BMP or GIF") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            what = "truncated or corrupt" if "truncat" in str(exc) or isinstance(exc, EOFError) else "not an image"
            raise ImageError(
                f"{what}: Pillow cannot read it ({first_line(exc, 120)}); send a PNG, JPEG, WebP, BMP or GIF"
            ) from None


def _grayscale(image: Image.Image) -> Image.Image:
    """Luminance; transparent parts become white paper (a drawing on a transparent canvas is dark ink)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return image.convert("L")


def to_mnist(image: Image.Image) -> torch.Tensor:
    """8-bit grayscale image of one digit -> uint8 [28, 28], white ink on black, MNIST-style.

    The full-size steps are Pillow's (C, a fraction of a millisecond for a 280x280 drawing); torch
    only computes the centre of mass of the small 20 px patch.
    """
    width, height = image.size
    edges = ((0, 0, width, 1), (0, height - 1, width, height), (0, 0, 1, height), (width - 1, 0, width, height))
    border = b"".join(image.crop(box).tobytes() for box in edges)
    background = sorted(border)[len(border) // 2]  # the median: the paper, whatever ink touches the edge
    if background > 127:  # dark ink on light paper: MNIST's ink is the bright part
        image, background = ImageOps.invert(image), 255 - background
    contrast = image.getextrema()[1] - background
    if contrast < MIN_CONTRAST:
        raise ImageError("no digit found: the image is blank (no ink stands out from the background)")
    # background -> 0, the brightest ink -> 255
    image = image.point([min(255, max(0, round((v - background) * 255 / contrast))) for v in range(256)])
    box = image.point(_INK_MASK).getbbox()
    crop = image.crop(box)

    scale = DIGIT_BOX / max(crop.size)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    # Pillow's resampling filters average over the source when shrinking (anti-aliasing, as MNIST did)
    patch_image = crop.resize(size, Image.Resampling.LANCZOS)
    patch = torch.frombuffer(bytearray(patch_image.tobytes()), dtype=torch.uint8).reshape(size[1], size[0]).float()

    # place the patch so that its centre of mass lands on the frame's centre (kept inside the frame)
    total = patch.sum().clamp_min(1e-6)
    com_y = float((patch.sum(dim=1) * torch.arange(size[1])).sum() / total) + 0.5
    com_x = float((patch.sum(dim=0) * torch.arange(size[0])).sum() / total) + 0.5
    y = min(max(round(IMAGE_SIZE / 2 - com_y), 0), IMAGE_SIZE - size[1])
    x = min(max(round(IMAGE_SIZE / 2 - com_x), 0), IMAGE_SIZE - size[0])
    frame = torch.zeros(IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    frame[y:y + size[1], x:x + size[0]] = patch.to(torch.uint8)
    return frame


def from_bytes(data: bytes) -> torch.Tensor:
    """Image file bytes -> uint8 [28, 28] for the model."""
    return to_mnist(decode(data))
