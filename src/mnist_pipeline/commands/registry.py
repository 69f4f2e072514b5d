"""The registry's commands: `mnist models [log|prune]`, `mnist promote N`, `mnist rollback`.

What they print lives here; what they do, in records/versions.py and records/aliases.py. No torch
at import: cli.py builds their parsers before torch loads.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any, Dict

from mnist_pipeline.errors import UsageError
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

Values = Dict[str, Any]


def models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("list", "log", "prune"), default="list",
                        help="list (the default): the versions; log: every alias move; prune: remove the oldest "
                             "versions no alias points to, keeping --keep")


def promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", nargs="?", type=version_number, metavar="N",
                        help="the version (`mnist models` lists them)")


def version_number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a version number (1, 2, ...: "
                                         f"`mnist models` lists them)")
    return int(text)


def models(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline.records import aliases

    volume = Volume(v["root"])
    if args.action == "log":
        moves = aliases.history(volume)
        if v["json"]:
            print(json.dumps([m.to_json() for m in moves], indent=2))
        for m in moves if not v["json"] else ():
            print(f"{m.time}  {m.alias}: {m.before or 'none'} -> {m.to}  ({m.reason})")
        if not moves and not v["json"]:
            print("no alias has moved yet")
        return 0
    if args.action == "prune":
        gone = aliases.prune(volume, v["keep"])
        print(f"removed versions {', '.join(map(str, gone))}" if gone else
              f"nothing to remove: at most {v['keep']} versions without an alias")
        return 0
    rows = aliases.catalogue(volume)
    if v["json"]:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no versions yet: `mnist evaluate` keeps each checkpoint it scores as one")
        return 0
    # feedback: how it read the accepted held-out feedback when evaluate scored it (that set, of that many)
    print(f"{'version':>7}  {'epoch':>5}  {'accuracy':>8}  {'feedback':>14}  {'created':<24}  aliases")
    for row in rows:
        if "corrupt" in row:
            print(f"{row['version']:>7}  corrupt: {row['corrupt']}")
        else:
            print(f"{row['version']:>7}  {row['epoch']:>5}  {row['accuracy']:>8.4f}  "
                  f"{feedback_cell(row['feedback']):>14}  {row['created']:<24}  {', '.join(row['aliases'])}")
    return 0


def feedback_cell(figures: Any) -> str:
    """A version's held-out feedback accuracy and the samples it is of, e.g. `0.9310 of 312`; `-`: none."""
    return f"{figures['accuracy']:.4f} of {figures['total']}" if figures else "-"


def promote(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline.records import aliases

    if args.version is None:
        raise UsageError("which version? `mnist promote N` (`mnist models` lists them)")
    move = aliases.promote(Volume(v["root"]), args.version, v["alias"])
    print(f"{v['alias']}: version {move.before or 'none'} -> {move.to}" if move else
          f"{v['alias']} points to version {args.version} already")
    return 0


def rollback(args: argparse.Namespace, v: Values) -> int:
    from mnist_pipeline.records import aliases

    move = aliases.rollback(Volume(v["root"]), v["alias"])
    print(f"{v['alias']}: version {move.before} -> {move.to} (rolled back)")
    return 0
