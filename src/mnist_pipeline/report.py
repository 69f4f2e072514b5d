"""The evaluation report: model/report/ from eval_results.json, the history and results/.

  index.html            one page, no outside references (opens from the file system or `serve`)
  confusion_matrix.png  counts in the cells; rows: true digit, columns: predicted; mistakes in red
  mistakes.png          the most confident mistakes: test image, true and predicted digit, confidence
  training.svg          train loss and learning rate over all steps, epoch ends with test accuracy

The pictures are drawn with Pillow from tensors (no numpy or matplotlib in the image). The chart is
an SVG drawn here: the same drawing is the file and, inline, the page's chart (hover a point for
its values), so there is no second chart to keep in step. The folder is replaced as a whole;
results/ is only read.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

from mnist_pipeline import data, history
from mnist_pipeline.config import ReportConfig
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.volume import Volume, replace_dir

log = logging.getLogger(__name__)

FILES = ("index.html", "confusion_matrix.png", "mistakes.png", "training.svg")

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


def run(config: ReportConfig) -> Path:
    return build(Volume(config.root), config.mirror)


def build(volume: Volume, mirror: Optional[str] = None) -> Path:
    """Replace model/report/ with a report of the current eval_results.json; returns index.html's path."""
    evaluation = load_evaluation(volume)
    summary = history.summary(history.read(volume))
    test_images = data.load_split(volume.data_dir, "test", mirror).images
    inferred = _infer_results(volume)

    def fill(folder: Path) -> None:
        confusion_image(evaluation).save(folder / "confusion_matrix.png", optimize=True)
        mistakes_image(evaluation, test_images).save(folder / "mistakes.png", optimize=True)
        chart = training_svg(summary)
        (folder / "training.svg").write_text(chart)
        inline = chart.replace(' xmlns="http://www.w3.org/2000/svg"', "", 1)  # HTML needs no namespace URL
        (folder / "index.html").write_text(_page(evaluation, summary, inline, inferred))

    replace_dir(volume.report_dir, fill)
    return volume.report_dir / "index.html"


def load_evaluation(volume: Volume) -> Dict[str, Any]:
    path = volume.eval_results
    try:
        evaluation = json.loads(path.read_text())
        missing = [k for k in ("accuracy", "test_loss", "correct", "total", "mistakes", "checkpoint",
                               "confusion_matrix") if k not in evaluation]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
        matrix = evaluation["confusion_matrix"]
        if len(matrix) != 10 or any(len(row) != 10 for row in matrix):
            raise ValueError("its confusion_matrix is not 10 x 10")
        for m in evaluation["mistakes"]:
            if not (0 <= m["test_index"] < evaluation["total"] and 0 <= float(m["confidence"]) <= 1):
                raise ValueError(f"its mistake {m} is not one of the test images")
    except FileNotFoundError:
        raise PipelineError(f"no {path} yet: run `mnist evaluate` first") from None
    except OSError as exc:
        raise PipelineError(f"cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise PipelineError(f"{path} is not an evaluation this version reads ({exc}); "
                            f"run `mnist evaluate` to write it again") from None
    return evaluation


# --- pictures -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: nothing to install


def _mix(low: Tuple[int, ...], high: Tuple[int, ...], t: float) -> Tuple[int, ...]:
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))


def _text_on(background: Tuple[int, ...]) -> Tuple[int, ...]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return WHITE if luminance < 150 else INK


def confusion_cell(matrix: List[List[int]], row: int, column: int) -> Image.Image:
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


def confusion_image(evaluation: Dict[str, Any]) -> Image.Image:
    matrix = evaluation["confusion_matrix"]
    width, height = MATRIX_ORIGIN[0] + 10 * CELL + 24, MATRIX_ORIGIN[1] + 10 * CELL + 20
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), f"Confusion matrix: {evaluation['correct']:,} of {evaluation['total']:,} right "
                        f"({evaluation['accuracy']:.2%})", fill=INK, font=_font(18))
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


def mistakes_image(evaluation: Dict[str, Any], test_images: torch.Tensor) -> Image.Image:
    mistakes = evaluation["mistakes"]
    rows = math.ceil(len(mistakes) / COLUMNS)
    width = GRID_ORIGIN[0] * 2 + COLUMNS * TILE[0]
    image = Image.new("RGB", (width, GRID_ORIGIN[1] + rows * TILE[1] + 12), WHITE)
    draw = ImageDraw.Draw(image)
    wrong = evaluation["total"] - evaluation["correct"]
    title = f"The {len(mistakes)} most confident mistakes of {wrong:,}" if wrong else "No mistakes"
    draw.text((GRID_ORIGIN[0], 10), title, fill=INK, font=_font(18))
    note = "most confident first; under each: true digit, predicted digit, confidence" if mistakes else \
        "every test image is classified right"
    draw.text((GRID_ORIGIN[0], 36), note, fill=MUTED, font=_font(13))
    for k, mistake in enumerate(mistakes):
        digit = Image.frombytes("L", (28, 28), bytes(test_images[mistake["test_index"]].flatten().tolist()))
        box = mistake_digit_box(k)
        image.paste(digit.resize((28 * SCALE, 28 * SCALE), Image.Resampling.NEAREST), box[:2])
        draw.rectangle((box[0] - 1, box[1] - 1, box[2], box[3]), outline=GRID_LINE)
        centre = (box[0] + box[2]) / 2
        _arrow_caption(draw, centre, box[3] + 14, f"true {mistake['label']}", str(mistake["predicted"]))
        draw.text((centre, box[3] + 33), f"{mistake['confidence']:.1%} sure", fill=RED, font=_font(13),
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


# --- training chart (SVG) -------------------------------------------------------------------------

CHART = (960, 400)
PLOT = (76, 56, 884, 340)  # left, top, right, bottom of the plotting area


def _log_ticks(low: float, high: float) -> List[float]:
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))
    steps = (1, 2, 5) if hi - lo <= 2 else (1,)
    return [m * 10.0**e for e in range(lo, hi + 1) for m in steps if low <= m * 10.0**e <= high]


def _linear_ticks(high: float, count: int = 5) -> List[float]:
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(high / step) + 1)]


def _number(value: float) -> str:
    return f"{value:g}" if value >= 1e-3 or value == 0 else f"{value:.0e}"


def training_svg(summary: Dict[str, Any]) -> str:
    width, height = CHART
    left, top, right, bottom = PLOT
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" font-size="13">',
           '<title>Training: train loss and learning rate over all steps</title>',
           f'<rect width="{width}" height="{height}" fill="#fff"/>']
    points = [p for p in summary["points"] if p["loss"] > 0]
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#6b7280">'
                   'No training history yet (model/history.jsonl): train writes it</text></svg>')
        return "\n".join(out)
    steps = max([p["x"] for p in points] + [e["x"] for e in summary["epochs"]])
    loss_low = 10 ** math.floor(math.log10(min(p["loss"] for p in points)))
    loss_high = max(10 ** math.ceil(math.log10(max(p["loss"] for p in points))), loss_low * 10)
    lr_high = max(p["lr"] for p in points) * 1.05 or 1.0

    def sx(step: float) -> float:
        return left + (right - left) * step / steps

    def sy_loss(loss: float) -> float:
        return bottom - (bottom - top) * math.log(loss / loss_low) / math.log(loss_high / loss_low)

    def sy_lr(lr: float) -> float:
        return bottom - (bottom - top) * lr / lr_high

    grey = 'stroke="#e5e7eb"'
    for tick in _log_ticks(loss_low, loss_high):
        y = sy_loss(tick)
        out.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" {grey}/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#2563eb">{_number(tick)}</text>')
    for tick in _linear_ticks(lr_high):
        y = sy_lr(tick)
        out.append(f'<text x="{right + 6}" y="{y + 4:.1f}" fill="#ea580c">{_number(tick)}</text>')
    for tick in _linear_ticks(steps, 8):
        x = sx(tick)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 5}" stroke="#111827"/>'
                   f'<text x="{x:.1f}" y="{bottom + 19}" text-anchor="middle">{tick:g}</text>')
    for epoch in summary["epochs"]:
        x = sx(epoch["x"])
        evaluation = epoch["eval"]
        scores = f"test {evaluation['accuracy']:.2%}" if evaluation else "not evaluated"
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#6b7280" '
                   f'stroke-dasharray="4 3"/>'
                   f'<text x="{x - 4:.1f}" y="{top + 14}" text-anchor="end" fill="#111827">epoch {epoch["epoch"]}'
                   f'</text><text x="{x - 4:.1f}" y="{top + 30}" text-anchor="end" fill="#15803d">{scores}</text>')
    loss_path = " ".join(f"{sx(p['x']):.1f},{sy_loss(p['loss']):.1f}" for p in points)
    lr_path = " ".join(f"{sx(p['x']):.1f},{sy_lr(p['lr']):.1f}" for p in points)
    out.append(f'<polyline points="{lr_path}" fill="none" stroke="#ea580c" stroke-width="1.5" '
               f'stroke-dasharray="6 3"/>')
    out.append(f'<polyline points="{loss_path}" fill="none" stroke="#2563eb" stroke-width="2"/>')
    for p in points:  # hover targets in a browser
        out.append(f'<circle cx="{sx(p["x"]):.1f}" cy="{sy_loss(p["loss"]):.1f}" r="3" fill="#2563eb" '
                   f'fill-opacity="0.01"><title>epoch {p["epoch"]}, step {p["step"]}: train loss {p["loss"]:.4f}, '
                   f'learning rate {p["lr"]:.4g}</title></circle>')
    out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
               f'stroke="#111827"/>')
    middle = (top + bottom) / 2
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 40}" text-anchor="middle">training step '
               f'(batches, all epochs)</text>'
               f'<text transform="translate(20 {middle}) rotate(-90)" text-anchor="middle" fill="#2563eb">'
               f'train loss (log scale)</text>'
               f'<text transform="translate({width - 14} {middle}) rotate(90)" text-anchor="middle" '
               f'fill="#ea580c">learning rate</text>')
    out.append(f'<text x="{left}" y="24" font-size="17" fill="#111827">Training: train loss (mean of each '
               f'{history.EVERY} steps) and learning rate</text>'
               f'<line x1="{left}" x2="{left + 24}" y1="42" y2="42" stroke="#2563eb" stroke-width="2"/>'
               f'<text x="{left + 30}" y="46">train loss</text>'
               f'<line x1="{left + 120}" x2="{left + 144}" y1="42" y2="42" stroke="#ea580c" stroke-width="1.5" '
               f'stroke-dasharray="6 3"/><text x="{left + 150}" y="46">learning rate</text>'
               f'<line x1="{left + 270}" x2="{left + 270}" y1="35" y2="49" stroke="#6b7280" '
               f'stroke-dasharray="4 3"/><text x="{left + 278}" y="46">end of an epoch, its test accuracy</text>')
    out.append("</svg>")
    return "\n".join(out)


# --- the page -------------------------------------------------------------------------------------


def _infer_results(volume: Volume) -> Optional[Dict[str, Any]]:
    """results/predictions.json with each image as a data: URI, or None (the report never writes there)."""
    try:
        summary = json.loads((volume.results_dir / "predictions.json").read_text())
        for entry in summary["predictions"]:
            if Path(entry["file"]).name != entry["file"]:
                raise ValueError(f"{entry['file']!r} is not a file name in results/")
            png = (volume.results_dir / entry["file"]).read_bytes()
            entry["src"] = "data:image/png;base64," + base64.b64encode(png).decode()
            entry["confidence"] = float(entry["confidence"])
        summary["checkpoint"] = {"sha256": summary["checkpoint"]["sha256"], "epoch": summary["checkpoint"]["epoch"]}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("the report leaves out results/: %s", exc)
        return None
    return summary


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1000px; color: #111827; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #e5e7eb; padding-bottom: .3rem; }
.muted { color: #6b7280; } code { font-size: .9em; word-break: break-all; }
.figures { display: flex; gap: 2.5rem; flex-wrap: wrap; margin: 1rem 0; }
.figure b { display: block; font-size: 1.8rem; } img { max-width: 100%; }
table { border-collapse: collapse; } td, th { padding: .25rem .7rem; text-align: right; border-bottom: 1px solid #eee; }
.low { color: #dc2626; font-weight: 600; }
.infer { display: flex; gap: 1rem; flex-wrap: wrap; } .infer div { text-align: center; }
.infer img { width: 84px; height: 84px; image-rendering: pixelated; border: 1px solid #d1d5db; display: block;
  margin: 0 auto .3rem; }
"""


def _page(evaluation: Dict[str, Any], summary: Dict[str, Any], chart: str,
          inferred: Optional[Dict[str, Any]]) -> str:
    e = html.escape
    checkpoint = evaluation["checkpoint"]
    matrix = evaluation["confusion_matrix"]
    per_class = []
    worst = min(range(10), key=lambda d: matrix[d][d] / max(1, sum(matrix[d])))
    for d in range(10):
        total = sum(matrix[d])
        confused = max((c for c in range(10) if c != d), key=lambda c: matrix[d][c])
        times = matrix[d][confused]
        mix = f"{confused} ({times} {'time' if times == 1 else 'times'})" if times else "-"
        css = ' class="low"' if d == worst else ""
        per_class.append(f"<tr><td>{d}</td><td>{total:,}</td><td{css}>{matrix[d][d] / max(1, total):.2%}</td>"
                         f"<td>{mix}</td></tr>")
    epochs = summary["epochs"]
    epoch_rows = "".join(
        f"<tr><td>{r['epoch']}</td><td>{r['steps']:,}</td><td>{r['train_loss']:.4f}</td>"
        + (f"<td>{r['eval']['accuracy']:.2%}</td><td>{r['eval']['test_loss']:.4f}</td>" if r["eval"]
           else '<td class="muted">-</td><td class="muted">-</td>') + "</tr>"
        for r in epochs
    )
    if inferred:
        note = "" if inferred["checkpoint"]["sha256"] == checkpoint["sha256"] else (
            f' <span class="low">(by an older checkpoint, epoch {e(str(inferred["checkpoint"]["epoch"]))}; '
            f"run <code>mnist infer</code>, then <code>mnist report</code>)</span>")
        cards = "".join(
            f'<div><img src="{e(p["src"])}" alt="results/{e(p["file"])}" title="results/{e(p["file"])}">'
            f'predicted <b>{e(str(p["predicted"]))}</b><br>'
            f'<span class="{"" if p["predicted"] == p["label"] else "low"}">true {e(str(p["label"]))}</span>, '
            f'{p["confidence"]:.1%}</div>'
            for p in inferred["predictions"]
        )
        infer_html = f'<p class="muted">{len(inferred["predictions"])} random test images from results/{note}</p>' \
                     f'<div class="infer">{cards}</div>'
    else:
        infer_html = '<p class="muted">No infer results yet: run <code>mnist infer</code>, then ' \
                     '<code>mnist report</code>.</p>'
    wrong = evaluation["total"] - evaluation["correct"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>MNIST model report: epoch {checkpoint['epoch']}, accuracy {evaluation['accuracy']:.2%}</title>
<style>{STYLE}</style></head><body>
<h1>MNIST model report</h1>
<p class="muted">Checkpoint after epoch {checkpoint['epoch']}, sha256 <code>{e(checkpoint['sha256'])}</code>;
evaluated {e(str(evaluation.get('evaluated_at', '?')))} on {e(str(evaluation.get('device', '?')))}.</p>
<div class="figures">
<div class="figure">test accuracy<b>{evaluation['accuracy']:.2%}</b></div>
<div class="figure">right<b>{evaluation['correct']:,} / {evaluation['total']:,}</b></div>
<div class="figure">mistakes<b>{wrong:,}</b></div>
<div class="figure">test loss<b>{evaluation['test_loss']:.4f}</b></div>
</div>

<h2>Which digits get confused</h2>
<p>Rows are the true digit, columns the digit the model predicted: the blue diagonal is right, every red cell
is a mistake (darker: more). <a href="confusion_matrix.png">confusion_matrix.png</a></p>
<img src="confusion_matrix.png" alt="confusion matrix with counts">
<h3>Per digit</h3>
<table><tr><th>digit</th><th>test images</th><th>right</th><th>most often taken for</th></tr>
{''.join(per_class)}</table>

<h2>What the mistakes look like</h2>
<p>The test images the model gets wrong while most sure of itself. <a href="mistakes.png">mistakes.png</a></p>
<img src="mistakes.png" alt="the most confident mistakes">

<h2>Training</h2>
<p>Hover a point for its values. <a href="training.svg">training.svg</a></p>
{chart}
<table><tr><th>epoch</th><th>steps</th><th>train loss</th><th>test accuracy</th><th>test loss</th></tr>
{epoch_rows}</table>

<h2>Latest infer images</h2>
{infer_html}
</body></html>
"""
