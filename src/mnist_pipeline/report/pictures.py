"""The report's pictures, drawn with Pillow from an evaluation and the test images (no numpy or matplotlib).

  confusion_matrix.png  counts in the cells; rows: true digit, columns: predicted; mistakes in red
  mistakes.png          the most confident mistakes: test image, true and predicted digit, confidence
  feedback_*.png        the same two of the held-out feedback, when the evaluation scored some
"""

from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence, Tuple, Union

import torch
from PIL import Image, ImageDraw, ImageFont

from mnist_pipeline.records.evaluation import Evaluation, FeedbackMistake, FeedbackScores, Mistake

# confusion_matrix.png layout (tests crop cells by it)
CELL = 52
MATRIX_ORIGIN = (84, 96)  # top-left corner of cell (0, 0)
# mistakes.png layout
SCALE = 3  # each test image pixel as SCALE x SCALE
COLUMNS = 8
TILE = (104, 136)
GRID_ORIGIN = (12, 64)
DIGIT_OFFSET = ((TILE[0] - 28 * SCALE) // 2, 6)  # of the digit inside its tile

INK, MUTED, GRID_LINE = (17, 24, 39), (107, 114, 128), (209, 213, 219)
BLUE, RED, WHITE = (37, 99, 235), (220, 38, 38), (255, 255, 255)


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: nothing to install


def _mix(low: Tuple[int, ...], high: Tuple[int, ...], t: float) -> Tuple[int, ...]:
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))


def _text_on(background: Tuple[int, ...]) -> Tuple[int, ...]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return WHITE if luminance < 150 else INK


def confusion_cell(matrix: Sequence[Sequence[int]], row: int, column: int) -> Image.Image:
    """One cell of the heat map: blue on the diagonal, red for mistakes (square-root scale)."""
    count = matrix[row][column]
    if row == column:
        top = max(matrix[d][d] for d in range(10)) or 1
        colour = _mix((219, 234, 254), BLUE, count / top)
    elif count:
        top = max(matrix[r][c] for r in range(10) for c in range(10) if r != c)
        colour = _mix((254, 226, 226), RED, math.sqrt(count / top))
    else:
        colour = WHITE
    cell = Image.new("RGB", (CELL, CELL), colour)
    draw = ImageDraw.Draw(cell)
    draw.rectangle((0, 0, CELL - 1, CELL - 1), outline=GRID_LINE)
    ink = (180, 180, 180) if count == 0 else _text_on(colour)
    draw.text((CELL / 2, CELL / 2), str(count), fill=ink, font=_font(16 if count < 1000 else 14), anchor="mm")
    return cell


def confusion_box(row: int, column: int) -> Tuple[int, int, int, int]:
    x, y = MATRIX_ORIGIN[0] + column * CELL, MATRIX_ORIGIN[1] + row * CELL
    return x, y, x + CELL, y + CELL


def confusion_image(evaluation: Evaluation) -> Image.Image:
    return confusion_drawing(evaluation.confusion_matrix, "Confusion matrix")


def feedback_confusion_image(scores: FeedbackScores) -> Image.Image:
    return confusion_drawing(scores.confusion_matrix, "Held-out feedback")


def confusion_drawing(matrix: Sequence[Sequence[int]], title: str) -> Image.Image:
    """The heat map of `matrix` (rows: true digit), under `title` and how many it has right."""
    total, correct = sum(map(sum, matrix)), sum(matrix[d][d] for d in range(10))
    width, height = MATRIX_ORIGIN[0] + 10 * CELL + 24, MATRIX_ORIGIN[1] + 10 * CELL + 20
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), f"{title}: {correct:,} of {total:,} right ({correct / max(1, total):.2%})", fill=INK,
              font=_font(18))
    x0, y0 = MATRIX_ORIGIN
    draw.text((x0 + 5 * CELL, y0 - 46), "predicted digit", fill=INK, font=_font(15), anchor="mm")
    for d in range(10):
        draw.text((x0 + d * CELL + CELL / 2, y0 - 16), str(d), fill=INK, font=_font(15), anchor="mm")
        draw.text((x0 - 16, y0 + d * CELL + CELL / 2), str(d), fill=INK, font=_font(15), anchor="mm")
        for c in range(10):
            image.paste(confusion_cell(matrix, d, c), confusion_box(d, c)[:2])
    label = Image.new("RGB", (10 * CELL, 22), WHITE)  # the row axis' title, written sideways
    ImageDraw.Draw(label).text((5 * CELL, 11), "true digit", fill=INK, font=_font(15), anchor="mm")
    image.paste(label.rotate(90, expand=True), (x0 - 58, y0))
    return image


def mistake_digit_box(k: int) -> Tuple[int, int, int, int]:
    """Where the k-th mistake's test image (scaled up SCALE times) lies in mistakes.png."""
    x = GRID_ORIGIN[0] + (k % COLUMNS) * TILE[0] + DIGIT_OFFSET[0]
    y = GRID_ORIGIN[1] + (k // COLUMNS) * TILE[1] + DIGIT_OFFSET[1]
    return x, y, x + 28 * SCALE, y + 28 * SCALE


def mistakes_image(evaluation: Evaluation, test_images: torch.Tensor) -> Image.Image:
    mistakes = evaluation.mistakes
    wrong = evaluation.total - evaluation.correct
    if mistakes:
        title = f"The {len(mistakes)} most confident mistakes of {wrong:,}"
        note = "most confident first; under each: true digit, predicted digit, confidence"
    elif wrong:  # an evaluation of format 1's first files, which did not list them
        title, note = f"{wrong:,} mistakes", "this evaluation does not list them: `mnist evaluate` writes a new one"
    else:
        title, note = "No mistakes", "every test image is classified right"
    return mistakes_drawing([(bytes(test_images[m.test_index].flatten().tolist()), m) for m in mistakes], title, note)


def feedback_mistakes_image(scores: FeedbackScores, images: Mapping[str, bytes]) -> Image.Image:
    """The held-out feedback mistakes whose pixels `images` holds (by id; those deleted since are left out)."""
    figures, shown = scores.figures, [(images[m.id], m) for m in scores.mistakes if m.id in images]
    wrong = figures.total - figures.correct
    if not wrong:
        title, note = "No mistakes", f"every one of the {figures.total:,} held-out feedback samples is read right"
    else:
        title = f"The {len(shown)} most confident mistakes of {wrong:,} on held-out feedback"
        note = "most confident first; under each: the digit people said, predicted digit, confidence" + (
            f" ({len(scores.mistakes) - len(shown)} deleted since)" if len(shown) < len(scores.mistakes) else "")
    return mistakes_drawing(shown, title, note)


def mistakes_drawing(tiles: Sequence[Tuple[bytes, Union[Mistake, FeedbackMistake]]], title: str,
                     note: str) -> Image.Image:
    """A grid of 28x28 images (IMAGE_BYTES pixels each) scaled up, each captioned `true -> predicted` and its
    confidence, under `title` and `note`."""
    rows = math.ceil(len(tiles) / COLUMNS)
    width = GRID_ORIGIN[0] * 2 + COLUMNS * TILE[0]
    image = Image.new("RGB", (width, GRID_ORIGIN[1] + rows * TILE[1] + 12), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((GRID_ORIGIN[0], 10), title, fill=INK, font=_font(18))
    draw.text((GRID_ORIGIN[0], 36), note, fill=MUTED, font=_font(13))
    for k, (pixels, mistake) in enumerate(tiles):
        digit = Image.frombytes("L", (28, 28), pixels)
        box = mistake_digit_box(k)
        image.paste(digit.resize((28 * SCALE, 28 * SCALE), Image.Resampling.NEAREST), box[:2])
        draw.rectangle((box[0] - 1, box[1] - 1, box[2], box[3]), outline=GRID_LINE)
        centre = (box[0] + box[2]) / 2
        _arrow_caption(draw, centre, box[3] + 14, f"true {mistake.label}", str(mistake.predicted))
        draw.text((centre, box[3] + 33), f"{mistake.confidence:.1%} sure", fill=RED, font=_font(13),
                  anchor="mm")
    return image


def _arrow_caption(draw: ImageDraw.ImageDraw, centre: float, y: float, before: str, after: str) -> None:
    """`before -> after` centred at (centre, y), the arrow drawn (the bundled font has no arrow glyph)."""
    font, gap, arrow = _font(15), 5, 16
    width = font.getlength(before) + font.getlength(after) + arrow + 2 * gap
    x = centre - width / 2
    draw.text((x, y), before, fill=INK, font=font, anchor="lm")
    x += font.getlength(before) + gap
    draw.line((x, y, x + arrow - 3, y), fill=INK, width=2)
    draw.polygon([(x + arrow, y), (x + arrow - 6, y - 4), (x + arrow - 6, y + 4)], fill=INK)
    draw.text((x + arrow + gap, y), after, fill=INK, font=font, anchor="lm")
