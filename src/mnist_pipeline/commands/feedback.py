"""`mnist feedback [list|accept|reject|delete|stats]`: review what people sent serve's POST /feedback.

What it prints lives here; the samples themselves, in records/feedback.py. No torch.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

from mnist_pipeline.errors import UsageError
from mnist_pipeline.volume import Volume

Values = Dict[str, Any]
SHEET_COLUMNS = 20
SHEET_SCALE = 2  # each 28x28 sample drawn at twice its size
MAX_SHEET = 2000  # samples on one contact sheet (the first by id)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("list", "accept", "reject", "delete", "stats"), default="list",
                        help="list (the default): the pending samples, and a contact sheet of them; accept, reject: "
                             "review samples (either can be undone by the other); delete: remove samples; stats: "
                             "counts by status and split")
    parser.add_argument("ids", nargs="*", metavar="ID", help="samples, by id or its first digits (at least 6)")
    parser.add_argument("--all", action="store_true", help="accept or reject every pending sample")
    parser.add_argument("--older-than", type=_days, metavar="DAYS", help="delete: every sample older than DAYS days")
    parser.add_argument("--sheet", type=Path, metavar="PNG",
                        help="list: where the contact sheet goes (default: model/feedback_sheet.png in the volume)")


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of days (0 or more, e.g. 30)")
    return value


def feedback(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline.records import feedback as samples

    volume = Volume(v["root"])
    action = args.action
    if action not in ("accept", "reject", "delete") and (args.ids or args.all or args.older_than is not None):
        raise UsageError(f"`mnist feedback {action}` takes no IDs, --all or --older-than")
    if action != "list" and args.sheet is not None:
        raise UsageError("--sheet goes with `mnist feedback list`")
    if action == "stats":
        return _stats(list(samples.every(volume)))
    if action == "list":
        return _list(volume, args.sheet)
    if action == "delete":
        if args.all or (args.ids and args.older_than is not None) or not (args.ids or args.older_than is not None):
            raise UsageError("which samples? `mnist feedback delete ID...` or `--older-than DAYS`")
        chosen = [samples.resolve(volume, given) for given in args.ids] if args.ids else [
            s.id for s in samples.every(volume) if s.age_s >= args.older_than * 86400]
        for sid in chosen:
            samples.delete(volume, sid)
        print(f"deleted {len(chosen)} sample{'s' if len(chosen) != 1 else ''}")
        return 0
    if args.older_than is not None or args.all == bool(args.ids):
        raise UsageError(f"which samples? `mnist feedback {action} ID...` or `mnist feedback {action} --all` "
                         f"(every pending one)")
    chosen = [samples.resolve(volume, given) for given in args.ids] if args.ids else [
        s.id for s in samples.every(volume) if s.status == "pending"]
    status = "accepted" if action == "accept" else "rejected"
    changed = sum(samples.review(volume, sid, status)[1] for sid in chosen)
    print(f"{status} {changed} sample{'s' if changed != 1 else ''}"
          + (f" ({len(chosen) - changed} were {status} already)" if changed < len(chosen) else ""))
    return 0


def _list(volume: Volume, sheet: Any) -> int:
    from mnist_pipeline.records import feedback as samples

    pending = [s for s in samples.every(volume) if s.status == "pending"]
    if not pending:
        print("no samples wait for review (serve --feedback on keeps what people send)")
        return 0
    print(f"{'id':<12}  {'label':>5}  {'predicted':>9}  {'version':>7}  {'split':<7}  created")
    for s in pending:
        print(f"{s.id[:12]:<12}  {s.label:>5}  {s.predicted:>9}  {s.version or '-':>7}  {s.split:<7}  {s.created}")
    target = sheet or volume.model_dir / "feedback_sheet.png"
    shown = _sheet(volume, pending[:MAX_SHEET], target)
    print(f"{len(pending)} pending; contact sheet of {shown}, in this order, row by row: {target}")
    return 0


def _sheet(volume: Volume, pending: List[Any], target: Path) -> int:
    """The samples' images in a grid, each with a strip below it: green where the model read the label, red
    where it did not (the label itself is in the listing)."""
    from PIL import Image, ImageDraw

    from mnist_pipeline.records import feedback as samples
    from mnist_pipeline.storage.atomic import atomic_write_bytes

    side = 28 * SHEET_SCALE
    cell = side + 8
    rows = math.ceil(len(pending) / SHEET_COLUMNS)
    sheet = Image.new("RGB", (cell * min(len(pending), SHEET_COLUMNS), cell * rows), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for place, sample in enumerate(pending):
        x, y = cell * (place % SHEET_COLUMNS) + 2, cell * (place // SHEET_COLUMNS) + 2
        picture = Image.frombytes("L", (28, 28), samples.image(volume, sample)).resize((side, side), Image.NEAREST)
        sheet.paste(picture.convert("RGB"), (x, y))
        colour = (60, 170, 80) if sample.label == sample.predicted else (210, 60, 60)
        draw.rectangle((x, y + side + 1, x + side - 1, y + side + 3), fill=colour)
    import io

    out = io.BytesIO()
    sheet.save(out, "PNG")
    atomic_write_bytes(target, out.getvalue())
    return len(pending)


def _stats(every: List[Any]) -> int:
    counts = Counter((s.status, s.split) for s in every)
    print(f"{'status':<9}  {'train':>6}  {'heldout':>7}  {'total':>6}")
    for status in ("pending", "accepted", "rejected"):
        train, held = counts[(status, "train")], counts[(status, "heldout")]
        print(f"{status:<9}  {train:>6}  {held:>7}  {train + held:>6}")
    print(f"{'all':<9}  {sum(n for (_, s), n in counts.items() if s == 'train'):>6}  "
          f"{sum(n for (_, s), n in counts.items() if s == 'heldout'):>7}  {len(every):>6}")
    return 0
