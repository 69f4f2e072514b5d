"""MNIST-style preprocessing of a user's image: MNIST test digits made to look like uploads and drawings."""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFilter

from mnist_pipeline import data, preprocess
from mnist_pipeline.records import checkpoint
from mnist_pipeline.model import IMAGE_SIZE, predict, stack
from mnist_pipeline.preprocess import ImageError



def bomb_png(side: int = 30000) -> bytes:
    """A decompression bomb: a side x side black 1-bit PNG, a few hundred KB that decode to ~side**2 / 8 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    packer, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the row's bits
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


COUNT = 300


def as_upload(digit: torch.Tensor, rng: random.Random) -> bytes:
    """A 28x28 MNIST digit as someone's photo or drawing of it: dark ink on light paper, several times
    larger, thicker strokes, off-centre on a bigger canvas, a colour tint, JPEG-compressed."""
    image = Image.frombytes("L", (IMAGE_SIZE, IMAGE_SIZE), bytes(digit.flatten().tolist()))
    scale = rng.uniform(3, 8)
    size = round(IMAGE_SIZE * scale)
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    image = image.filter(ImageFilter.MaxFilter(rng.choice((3, 5))))  # thicker pen
    image = Image.eval(image, lambda v: 255 - v)  # dark ink, light paper
    canvas = Image.new("L", (size + rng.randint(40, 300), size + rng.randint(40, 300)), 255)
    canvas.paste(image, (rng.randint(0, canvas.width - size), rng.randint(0, canvas.height - size)))
    paper, ink = [rng.randint(200, 255) for _ in range(3)], [rng.randint(0, 60) for _ in range(3)]
    tinted = Image.merge("RGB", [Image.eval(canvas, lambda v, p=p, i=i: i + (p - i) * v // 255)
                                 for p, i in zip(paper, ink, strict=True)])
    buffer = io.BytesIO()
    tinted.save(buffer, "JPEG", quality=rng.randint(60, 90))
    return buffer.getvalue()


def naive(upload: bytes) -> torch.Tensor:
    """Without the preprocessing: what a plain resize to 28x28 of the grayscale upload gives."""
    image = Image.open(io.BytesIO(upload)).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def accuracy(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(model, images, torch.device("cpu")).argmax(dim=1) == labels).float().mean().item()


def test_preprocessing_recovers_mnist_accuracy_on_uploads(trained_root: Path, mirror):
    test_set = data.load_split(trained_root / "data", "test", str(mirror))
    model = checkpoint.read(trained_root / "model" / "mnist_cnn.pt").build_model()
    rng = random.Random(0)
    indices = rng.sample(range(len(test_set)), COUNT)
    uploads = [as_upload(test_set.images[i], rng) for i in indices]
    labels = test_set.labels[indices]

    with_preprocessing = accuracy(model, stack([preprocess.from_bytes(u) for u in uploads]), labels)
    inverted_only = accuracy(model, torch.stack([255 - naive(u) for u in uploads]), labels)
    plain = accuracy(model, torch.stack([naive(u) for u in uploads]), labels)
    print(f"accuracy on {COUNT} upload-like digits: preprocessed {with_preprocessing:.3f}, "
          f"resized and inverted {inverted_only:.3f}, resized {plain:.3f}")
    assert with_preprocessing >= 0.97
    assert inverted_only < 0.8 and plain < 0.5


def test_light_ink_on_dark_and_dark_on_light_give_the_same_digit():
    image = Image.new("L", (90, 60), 0)
    image.paste(255, (50, 10, 58, 50))  # a light vertical bar, off-centre: a one
    dark_on_light = Image.eval(image, lambda v: 255 - v)
    a, b = preprocess.to_mnist(image), preprocess.to_mnist(dark_on_light)
    assert len(a) == IMAGE_SIZE * IMAGE_SIZE and a == b
    a = stack([a])[0]
    # the bar is scaled to 20 px tall and centred by mass on the frame's centre
    rows = torch.nonzero(a.any(dim=1)).flatten()
    assert int(rows[-1]) - int(rows[0]) + 1 == preprocess.DIGIT_BOX
    ys, xs = torch.nonzero(a.float() > 0, as_tuple=True)
    weights = a.float()[ys, xs]
    assert abs(float((ys.float() * weights).sum() / weights.sum()) + 0.5 - IMAGE_SIZE / 2) <= 1
    assert abs(float((xs.float() * weights).sum() / weights.sum()) + 0.5 - IMAGE_SIZE / 2) <= 1


def test_transparent_canvas_drawing_is_dark_ink_on_paper():
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (45, 20, 55, 80))
    frame = preprocess.to_mnist(preprocess.decode(png(image)))
    assert max(frame) == 255 and frame[0] == 0


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("payload, fragment", [
    (b"", "empty"),
    (b"hello, not an image", "not an image"),
    (png(Image.new("L", (64, 64), 0))[:60], "truncated"),
    (png(Image.new("L", (64, 64), 255)), "blank"),
])
def test_bad_images_raise_one_clear_error(payload, fragment):
    with pytest.raises(ImageError, match=fragment):
        preprocess.from_bytes(payload)


def test_decompression_bomb_is_refused_from_its_header():
    # (decoding it would take 900 MB and seconds: refused before that)
    bomb = bomb_png(30000)
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="more than [0-9,]+ pixels"):
        preprocess.decode(bomb)
    with pytest.raises(ImageError, match="7000x7000 pixels \\(1\\): decoding it takes 47 MB, more than the 32 MB"):
        preprocess.decode(bomb_png(7000))


def test_the_limit_is_on_decoded_bytes_for_the_mode_and_format():
    side = 4000  # 16 megapixels: 16 MB in 8-bit grey, 64 MB in RGBA
    grey = Image.new("L", (side, side), 255)
    grey.paste(0, (1800, 500, 2200, 3500))
    assert max(preprocess.from_bytes(png(grey))) == 255
    with pytest.raises(ImageError, match="4000x4000 pixels \\(RGBA\\): decoding it takes 61 MB"):
        preprocess.decode(png(grey.convert("RGBA")))
    # a baseline JPEG is decoded reduced, so as large a photo is fine; a progressive one holds all its
    # coefficients whatever the scale, so it counts at full size
    baseline, progressive = io.BytesIO(), io.BytesIO()
    grey.convert("RGB").save(baseline, "JPEG")
    grey.convert("RGB").save(progressive, "JPEG", progressive=True)
    assert preprocess.decode(baseline.getvalue()).size == (1000, 1000)
    with pytest.raises(ImageError, match="4000x4000 pixels \\(RGB\\)"):
        preprocess.decode(progressive.getvalue())


def test_transparency_is_white_paper_in_every_mode_that_has_it():
    rgba = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    rgba.paste((20, 20, 20, 255), (25, 10, 35, 50))
    rgba.paste((20, 20, 20, 128), (10, 10, 20, 50))  # half-transparent ink: half as dark
    expected = preprocess.decode(png(rgba))
    assert expected.getpixel((0, 0)) == 255 and expected.getpixel((30, 30)) < 40
    assert 120 < expected.getpixel((15, 30)) < 150
    palette = rgba.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    grey_alpha = rgba.convert("LA")
    for image in (palette, grey_alpha):
        got = preprocess.decode(png(image))
        assert max(abs(a - b) for a, b in zip(got.tobytes(), expected.tobytes(), strict=True)) <= 2, image.mode


def test_preprocessing_needs_neither_torch_nor_numpy(tmp_path):
    """`mnist predict` runs where numpy is not installed, serve's slim image has no torch: neither is imported."""
    image = Image.new("L", (90, 60), 255)
    image.paste(0, (50, 10, 58, 50))
    (tmp_path / "one.png").write_bytes(png(image))
    code = ("import sys\nfrom mnist_pipeline import preprocess\n"
            f"pixels = preprocess.from_bytes(open({str(tmp_path / 'one.png')!r}, 'rb').read())\n"
            "print(len(pixels), max(pixels), sorted({'torch', 'numpy'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["784", "255", "[]"], result.stderr[-2000:]


def test_what_a_small_file_makes_pillow_parse_is_bounded():
    blank = io.BytesIO()
    Image.new("L", (28, 28), 255).save(blank, "PNG")
    png = blank.getvalue()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # compressed text inflating to megabytes as the file is opened, in a 60 KB file: refused, not held
    text = zlib.compress(b"\0" * (1024 * 1024 - 1), 9)
    bomb = png[:33] + b"".join(chunk(b"zTXt", b"k%d\0\0" % i + text) for i in range(60)) + png[33:]
    with pytest.raises(ImageError, match="cannot read it"):
        preprocess.opened(bomb)

    # a JPEG whose last scan is repeated: each costs libjpeg a pass, whatever the pixels
    drawing = Image.new("L", (320, 320), 255)
    drawing.paste(0, (100, 100, 200, 110))
    buffer = io.BytesIO()
    drawing.save(buffer, "JPEG", progressive=True)
    jpeg = buffer.getvalue()
    last_scan = jpeg[jpeg.rindex(b"\xff\xda"):-2]
    with pytest.raises(ImageError, match="more than 100 scans"):
        preprocess.opened(jpeg[:-2] + last_scan * 200 + b"\xff\xd9")
    assert len(preprocess.from_bytes(jpeg)) == IMAGE_SIZE * IMAGE_SIZE  # a progressive JPEG as saved reads
