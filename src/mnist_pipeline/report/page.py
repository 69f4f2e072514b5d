"""The report's page: one HTML file with no outside references (it opens from the file system or serve).

Every value that comes from a file is escaped: the page is served on the API's origin.
"""

from __future__ import annotations

import html
from typing import Any, Dict, List, Optional, Sequence

from mnist_pipeline.records.aliases import Move
from mnist_pipeline.records.evaluation import Evaluation
from mnist_pipeline.records.history import EpochRow, Summary
from mnist_pipeline.records.predictions import Predictions

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


MAX_EPOCH_ROWS = 200  # the table shows the latest epochs; the chart shows them all
MAX_MOVE_ROWS = 50  # the latest alias moves; `mnist models log` has them all


def versions_section(versions: List[Dict[str, Any]], moves: Sequence[Move]) -> str:
    """The versions kept (as aliases.catalogue lists them) and the latest alias moves."""
    e = html.escape
    scored = any(v.get("feedback") for v in versions)
    if not versions:
        return '<p class="muted">No versions yet: <code>mnist evaluate</code> keeps each checkpoint it scores.</p>'
    rows = "".join(
        f"<tr><td>{v['version']}</td>" + (
            f'<td colspan="{3 + scored}" class="low">corrupt: {e(v["corrupt"])}</td>' if "corrupt" in v else
            f"<td>{v['epoch']}</td><td>{v['accuracy']:.2%}</td>{_feedback_cell(v, scored)}"
            f"<td>{e(v['created'])}</td>")
        + f"<td>{e(', '.join(v['aliases']))}</td></tr>"
        for v in versions)
    history = "".join(
        f"<tr><td>{e(m.time)}</td><td>{e(m.alias)}</td><td>{m.before or '-'}</td><td>{m.to}</td>"
        f"<td>{e(m.reason)}</td></tr>" for m in reversed(moves[-MAX_MOVE_ROWS:]))
    return (f"<table><tr><th>version</th><th>epoch</th><th>test accuracy</th>"
            f"{'<th>held-out feedback</th>' if scored else ''}<th>created</th><th>aliases</th></tr>"
            f"{rows}</table>\n<h3>Alias moves, latest first</h3>\n" +
            (f"<table><tr><th>time</th><th>alias</th><th>from</th><th>to</th><th>why</th></tr>{history}</table>"
             if moves else '<p class="muted">No alias has moved yet.</p>'))


def _feedback_cell(version: Dict[str, Any], scored: bool) -> str:
    """A version's held-out feedback accuracy when it was scored, and of how many samples (no column while no
    version has one)."""
    figures = version.get("feedback")
    if not scored:
        return ""
    return f"<td>{figures['accuracy']:.2%} of {figures['total']:,}</td>" if figures else '<td class="muted">-</td>'


def _feedback_figure(evaluation: Evaluation) -> str:
    """The held-out feedback accuracy among the headline figures ("": none scored)."""
    if evaluation.feedback is None:
        return ""
    figures = evaluation.feedback.figures
    return (f'<div class="figure">held-out feedback accuracy<b>{figures.accuracy:.2%}</b>'
            f'<a href="#held-out-feedback">of {figures.total:,} samples</a></div>\n')


def feedback_section(evaluation: Evaluation) -> str:
    """How the model reads the accepted held-out feedback, beside MNIST's figures ("": none was scored)."""
    scores = evaluation.feedback
    if scores is None:
        return ""
    figures = scores.figures
    return f"""
<h2 id="held-out-feedback">Held-out feedback</h2>
<p>People's corrections sent to <code>mnist serve --feedback on</code>, accepted in review, from the share
training never sees: {figures.total:,} samples (set <code>{html.escape(figures.digest[:12])}</code>).</p>
<div class="figures">
<div class="figure">feedback accuracy<b>{figures.accuracy:.2%}</b></div>
<div class="figure">right<b>{figures.correct:,} / {figures.total:,}</b></div>
<div class="figure">MNIST test accuracy<b>{evaluation.accuracy:.2%}</b></div>
</div>
<p>Rows are the digit people said, columns the digit the model predicted.
<a href="feedback_confusion.png">feedback_confusion.png</a></p>
<img src="feedback_confusion.png" alt="held-out feedback confusion matrix with counts">
<h3>Per digit</h3>
<table><tr><th>digit</th><th>samples</th><th>right</th><th>most often taken for</th></tr>
{_per_digit_rows(scores.confusion_matrix)}</table>
<h3>What the mistakes look like</h3>
<p>The held-out feedback samples the model gets wrong while most sure of itself.
<a href="feedback_mistakes.png">feedback_mistakes.png</a></p>
<img src="feedback_mistakes.png" alt="the most confident held-out feedback mistakes">
"""


def page(evaluation: Evaluation, summary: Summary, chart: str, predictions: Optional[Predictions],
         pictures: Dict[str, str], versions: str, format_version: int, feedback: str = "") -> str:
    """index.html: `chart` the inline SVG, `pictures` infer's images by file name (data: URIs), `versions`
    versions_section's HTML, `format_version` the report folder's, `feedback` feedback_section's HTML."""
    e = html.escape
    wrong = evaluation.total - evaluation.correct
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="mnist-report-format" content="{format_version}"><link rel="icon" href="data:,">
<title>MNIST model report: epoch {evaluation.epoch}, accuracy {evaluation.accuracy:.2%}</title>
<style>{STYLE}</style></head><body>
<h1>MNIST model report</h1>
<p class="muted">Checkpoint after epoch {evaluation.epoch}, sha256 <code>{e(evaluation.sha256)}</code>;
evaluated {e(evaluation.evaluated_at)} on {e(evaluation.device)}.</p>
<div class="figures">
<div class="figure">test accuracy<b>{evaluation.accuracy:.2%}</b></div>
<div class="figure">right<b>{evaluation.correct:,} / {evaluation.total:,}</b></div>
<div class="figure">mistakes<b>{wrong:,}</b></div>
<div class="figure">test loss<b>{evaluation.test_loss:.4f}</b></div>
{_feedback_figure(evaluation)}</div>

<h2>Which digits get confused</h2>
<p>Rows are the true digit, columns the digit the model predicted: the blue diagonal is right, every red cell
is a mistake (darker: more). <a href="confusion_matrix.png">confusion_matrix.png</a></p>
<img src="confusion_matrix.png" alt="confusion matrix with counts">
<h3>Per digit</h3>
<table><tr><th>digit</th><th>test images</th><th>right</th><th>most often taken for</th></tr>
{_per_digit_rows(evaluation.confusion_matrix)}</table>

<h2>What the mistakes look like</h2>
<p>The test images the model gets wrong while most sure of itself. <a href="mistakes.png">mistakes.png</a></p>
<img src="mistakes.png" alt="the most confident mistakes">
{feedback}
<h2>Training</h2>
<p>Hover a point for its values. <a href="training.svg">training.svg</a></p>
{chart}
<table><tr><th>epoch</th><th>steps</th><th>train loss</th><th>test accuracy</th><th>test loss</th></tr>
{_epoch_rows(summary.epochs)}</table>

<h2>Versions</h2>
{versions or '<p class="muted">No versions listed.</p>'}

<h2>Latest infer images</h2>
{_infer_section(evaluation, predictions, pictures)}
</body></html>
"""


def _per_digit_rows(matrix: Sequence[Sequence[int]]) -> str:
    """A row a digit: its test images, the share right (the worst in red), what it is most often taken for."""
    rows = []
    present = [d for d in range(10) if sum(matrix[d])] or [0]  # (held-out feedback may lack a digit)
    worst = min(present, key=lambda d: matrix[d][d] / max(1, sum(matrix[d])))
    for d in range(10):
        total = sum(matrix[d])
        confused = max((c for c in range(10) if c != d), key=lambda c: matrix[d][c])
        times = matrix[d][confused]
        mix = f"{confused} ({times} {'time' if times == 1 else 'times'})" if times else "-"
        css = ' class="low"' if d == worst else ""
        right = f"{matrix[d][d] / total:.2%}" if total else "-"
        rows.append(f"<tr><td>{d}</td><td>{total:,}</td><td{css}>{right}</td><td>{mix}</td></tr>")
    return "".join(rows)


def _epoch_rows(every: List[EpochRow]) -> str:
    """The latest MAX_EPOCH_ROWS epochs, a row each, and how many earlier ones are left out."""
    epochs = every[-MAX_EPOCH_ROWS:]
    older = len(every) - len(epochs)
    return "".join(
        f"<tr><td>{r.end.epoch}</td><td>{r.end.steps:,}</td><td>{r.end.train_loss:.4f}</td>"
        + (f"<td>{r.scores.accuracy:.2%}</td><td>{r.scores.test_loss:.4f}</td>" if r.scores
           else '<td class="muted">-</td><td class="muted">-</td>') + "</tr>"
        for r in epochs
    ) + (f'<tr><td colspan="5" class="muted">and {older:,} earlier epochs</td></tr>' if older else "")


def _infer_section(evaluation: Evaluation, predictions: Optional[Predictions], pictures: Dict[str, str]) -> str:
    """infer's images with what the model said of each, or how to get them."""
    e = html.escape
    if not predictions:
        return '<p class="muted">No infer results yet: run <code>mnist infer</code>, then ' \
               '<code>mnist report</code>.</p>'
    note = "" if predictions.sha256 == evaluation.sha256 else (
        f' <span class="low">(by an older checkpoint, epoch {predictions.epoch}; '
        f"run <code>mnist infer</code>, then <code>mnist report</code>)</span>")
    cards = "".join(
        f'<div><img src="{e(pictures[p.file])}" alt="results/{e(p.file)}" title="results/{e(p.file)}">'
        f'predicted <b>{p.predicted}</b><br>'
        f'<span class="{"" if p.predicted == p.label else "low"}">true {p.label}</span>, '
        f'{p.confidence:.1%}</div>'
        for p in predictions.predictions
    )
    return f'<p class="muted">{len(predictions.predictions)} random test images from results/{note}</p>' \
           f'<div class="infer">{cards}</div>'
