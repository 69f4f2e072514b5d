"""The training chart: an SVG drawn here, the file training.svg and, inline, the page's chart (hover a
point for its values), so there is no second chart to keep in step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, TypeVar

from mnist_pipeline.records import history
from mnist_pipeline.records.history import EpochRow, Placed, Summary

CHART = (960, 400)
MAX_POINTS = 2000  # more than the chart's width in pixels: a longer history is thinned to this
MAX_EPOCH_MARKS = 100  # dashed lines at epoch ends; more would fill the plot
PLOT = (76, 56, 884, 340)  # left, top, right, bottom of the plotting area
T = TypeVar("T")


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


def thin(points: List[T], most: int) -> List[T]:
    """At most `most` of `points`, evenly spread, the first and the last kept."""
    if len(points) <= most:
        return points
    stride = (len(points) - 1) / (most - 1)
    return [points[round(k * stride)] for k in range(most)]


@dataclass(frozen=True)
class _Scales:
    """Where a step, a loss (log scale, left axis) and a learning rate (right axis) fall in the plot."""

    steps: float
    loss_low: float
    loss_high: float
    lr_high: float

    @classmethod
    def of(cls, points: List[Placed], epochs: List[EpochRow]) -> "_Scales":
        loss_low = 10 ** math.floor(math.log10(min(p.point.loss for p in points)))
        return cls(steps=max([p.x for p in points] + [e.x for e in epochs]), loss_low=loss_low,
                   loss_high=max(10 ** math.ceil(math.log10(max(p.point.loss for p in points))), loss_low * 10),
                   lr_high=max(p.point.lr for p in points) * 1.05 or 1.0)

    def x(self, step: float) -> float:
        left, _, right, _ = PLOT
        return left + (right - left) * step / self.steps

    def loss(self, loss: float) -> float:
        _, top, _, bottom = PLOT
        return bottom - (bottom - top) * math.log(loss / self.loss_low) / math.log(self.loss_high / self.loss_low)

    def lr(self, lr: float) -> float:
        _, top, _, bottom = PLOT
        return bottom - (bottom - top) * lr / self.lr_high


def training_svg(summary: Summary) -> str:
    width, height = CHART
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif" font-size="13">',
           '<title>Training: train loss and learning rate over all steps</title>',
           f'<rect width="{width}" height="{height}" fill="#fff"/>']
    points = thin([p for p in summary.points if p.point.loss > 0], MAX_POINTS)
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#6b7280">'
                   'No training history yet (model/history.jsonl): train writes it</text></svg>')
        return "\n".join(out)
    scales = _Scales.of(points, summary.epochs)
    out += _ticks(scales)
    out += _epoch_marks(scales, thin(summary.epochs, MAX_EPOCH_MARKS))
    out += _curves(scales, points)
    out += _frame_and_legend()
    out.append("</svg>")
    return "\n".join(out)


def _ticks(scales: _Scales) -> List[str]:
    """Loss ticks and grid lines on the left, learning rates on the right, steps below."""
    left, _, right, bottom = PLOT
    out = []
    for tick in _log_ticks(scales.loss_low, scales.loss_high):
        y = scales.loss(tick)
        out.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#2563eb">{_number(tick)}</text>')
    for tick in _linear_ticks(scales.lr_high):
        y = scales.lr(tick)
        out.append(f'<text x="{right + 6}" y="{y + 4:.1f}" fill="#ea580c">{_number(tick)}</text>')
    for tick in _linear_ticks(scales.steps, 8):
        x = scales.x(tick)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 5}" stroke="#111827"/>'
                   f'<text x="{x:.1f}" y="{bottom + 19}" text-anchor="middle">{tick:g}</text>')
    return out


def _epoch_marks(scales: _Scales, epochs: List[EpochRow]) -> List[str]:
    """A dashed line at each epoch's end, with its number and test accuracy."""
    _, top, _, bottom = PLOT
    out = []
    for epoch in epochs:
        x = scales.x(epoch.x)
        scores = f"test {epoch.scores.accuracy:.2%}" if epoch.scores else "not evaluated"
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="#6b7280" '
                   f'stroke-dasharray="4 3"/>'
                   f'<text x="{x - 4:.1f}" y="{top + 14}" text-anchor="end" fill="#111827">epoch {epoch.end.epoch}'
                   f'</text><text x="{x - 4:.1f}" y="{top + 30}" text-anchor="end" fill="#15803d">{scores}</text>')
    return out


def _curves(scales: _Scales, points: List[Placed]) -> List[str]:
    """The learning rate (dashed), the loss over it, and an invisible circle at each point to hover."""
    loss_path = " ".join(f"{scales.x(p.x):.1f},{scales.loss(p.point.loss):.1f}" for p in points)
    lr_path = " ".join(f"{scales.x(p.x):.1f},{scales.lr(p.point.lr):.1f}" for p in points)
    out = [f'<polyline points="{lr_path}" fill="none" stroke="#ea580c" stroke-width="1.5" stroke-dasharray="6 3"/>',
           f'<polyline points="{loss_path}" fill="none" stroke="#2563eb" stroke-width="2"/>']
    for placed in points:
        p = placed.point
        out.append(f'<circle cx="{scales.x(placed.x):.1f}" cy="{scales.loss(p.loss):.1f}" r="3" fill="#2563eb" '
                   f'fill-opacity="0.01"><title>epoch {p.epoch}, step {p.step}: train loss {p.loss:.4f}, '
                   f'learning rate {p.lr:.4g}</title></circle>')
    return out


def _frame_and_legend() -> List[str]:
    width, _ = CHART
    left, top, right, bottom = PLOT
    middle = (top + bottom) / 2
    return [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" '
            f'stroke="#111827"/>',
            f'<text x="{(left + right) / 2}" y="{bottom + 40}" text-anchor="middle">training step '
            f'(batches, all epochs)</text>'
            f'<text transform="translate(20 {middle}) rotate(-90)" text-anchor="middle" fill="#2563eb">'
            f'train loss (log scale)</text>'
            f'<text transform="translate({width - 14} {middle}) rotate(90)" text-anchor="middle" '
            f'fill="#ea580c">learning rate</text>',
            f'<text x="{left}" y="24" font-size="17" fill="#111827">Training: train loss (mean of each '
            f'{history.EVERY} steps) and learning rate</text>'
            f'<line x1="{left}" x2="{left + 24}" y1="42" y2="42" stroke="#2563eb" stroke-width="2"/>'
            f'<text x="{left + 30}" y="46">train loss</text>'
            f'<line x1="{left + 120}" x2="{left + 144}" y1="42" y2="42" stroke="#ea580c" stroke-width="1.5" '
            f'stroke-dasharray="6 3"/><text x="{left + 150}" y="46">learning rate</text>'
            f'<line x1="{left + 270}" x2="{left + 270}" y1="35" y2="49" stroke="#6b7280" '
            f'stroke-dasharray="4 3"/><text x="{left + 278}" y="46">end of an epoch, its test accuracy</text>']
