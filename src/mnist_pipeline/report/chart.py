"""The training chart: an SVG drawn here, the file training.svg and, inline, the page's chart (hover a
point for its values), so there is no second chart to keep in step.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

from mnist_pipeline.records import history

CHART = (960, 400)
MAX_POINTS = 2000  # more than the chart's width in pixels: a longer history is thinned to this
MAX_EPOCH_MARKS = 100  # dashed lines at epoch ends; more would fill the plot
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


def thin(points: List[Dict[str, Any]], most: int) -> List[Dict[str, Any]]:
    """At most `most` of `points`, evenly spread, the first and the last kept."""
    if len(points) <= most:
        return points
    stride = (len(points) - 1) / (most - 1)
    return [points[round(k * stride)] for k in range(most)]


def training_svg(summary: Dict[str, Any]) -> str:
    width, height = CHART
    left, top, right, bottom = PLOT
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" font-size="13">',
           '<title>Training: train loss and learning rate over all steps</title>',
           f'<rect width="{width}" height="{height}" fill="#fff"/>']
    points = thin([p for p in summary["points"] if p["loss"] > 0], MAX_POINTS)
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
    for epoch in thin(summary["epochs"], MAX_EPOCH_MARKS):
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
