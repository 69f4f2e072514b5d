"""model/aliases/: named pointers to versions (production, staging, ...) and the log of every move.

  model/aliases/<name>.json  {"format_version": 1, "version": N}
  model/aliases/log.jsonl    one move a line, appended: time, alias, from (null: unset before), to,
                             reason (auto-promotion, promote, rollback)

An alias moves under the registry lock (records/versions.LOCK): its file is replaced atomically,
then the move is appended to the log. The alias file is the truth (serve reads it alone); the log
is its history, which rollback walks back. A line cut short by a kill -9 at the log's end is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Tuple, Union

from typing_extensions import TypedDict

from mnist_pipeline import limits
from mnist_pipeline.errors import BelowThreshold, NotEvaluated, PipelineError
from mnist_pipeline.records import _json as j
from mnist_pipeline.records import checkpoint, evaluation, versions
from mnist_pipeline.storage.atomic import ensure_dir, write_failed
from mnist_pipeline.storage.files import read_regular
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PRODUCTION = "production"
REASONS = ("auto-promotion", "promote", "rollback")
PROMOTE_MODES = ("auto", "never", "always")


AliasName = j.Text(40, j.Pattern(f"^{limits.ALIAS.pattern}$", "an alias name (lowercase letters, digits, '-')"))


class File(TypedDict):
    """model/aliases/<name>.json: the version an alias points to."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[FORMAT_VERSION]
    version: versions.VersionNumber


# model/aliases/log.jsonl, one line: a move of an alias ("from" is a Python keyword, hence this form)
Line = TypedDict("Line", {"time": j.Text(40), "alias": AliasName, "from": Optional[versions.VersionNumber],
                          "to": versions.VersionNumber, "reason": j.Text(40)})
Line.__pydantic_config__ = j.STRICT


@dataclass(frozen=True)
class Move:
    time: str
    alias: str
    before: Optional[int]  # "from" in the file
    to: int
    reason: str

    def to_json(self) -> Dict[str, object]:
        return {"time": self.time, "alias": self.alias, "from": self.before, "to": self.to, "reason": self.reason}


def read(volume: Volume, name: str) -> Optional[int]:
    """The version alias `name` points to; None when it is not set; PipelineError when its file is malformed."""
    path = volume.alias_path(limits.alias(name))
    try:
        return j.check_format(File, j.load(path, "alias"), FORMAT_VERSION)["version"]
    except FileNotFoundError:
        return None
    except j.Invalid as exc:
        raise j.problem(path, exc, f"`mnist promote N --alias {name}` writes it again") from None


def every(volume: Volume) -> Dict[str, int]:
    """Every alias and its version; one whose file is malformed is left out with a warning."""
    found = {}
    try:
        names = sorted(p.name[:-5] for p in volume.aliases_dir.glob("*.json"))
    except OSError:
        return found
    for name in names:
        if not limits.ALIAS.fullmatch(name):
            continue
        try:
            number = read(volume, name)
        except PipelineError as exc:
            log.warning("%s", exc)
            continue
        if number is not None:
            found[name] = number
    return found


def gated(volume: Volume, model: Union[str, int], threshold: float
          ) -> Tuple[Optional[versions.Version], checkpoint.Checkpoint, evaluation.Evaluation]:
    """What predict and serve's torch runtime use: the version `model` names (a number, or an alias's current
    one) if its evaluation passes `threshold`, its checkpoint loaded. While production is unset (no version has
    passed evaluate's rule yet, or the volume predates versions), the current checkpoint through
    evaluation.evaluated, version None. Raises NotEvaluated or BelowThreshold (exit 3) or PipelineError saying
    what to do."""
    passed = gate(volume, model, threshold)
    if passed is None:
        saved, scores = evaluation.evaluated(volume, threshold)
        return None, saved, scores
    version, saved, scores = versions.load(volume, passed[0].number)
    return version, saved, scores


def gate(volume: Volume, model: Union[str, int], threshold: float
         ) -> Optional[Tuple[versions.Version, evaluation.Evaluation]]:
    """The gate without loading a checkpoint (no torch): the version `model` names and its evaluation if it
    passes `threshold`; None while production is unset (`gated` then reads the current checkpoint). Raises as
    `gated` does."""
    number = model if isinstance(model, int) else read(volume, model)
    if number is None:
        if model != PRODUCTION:
            raise NotEvaluated(f"alias {model!r} is not set: `mnist promote N --alias {model}` sets it")
        return None
    version, scores = versions.checked(volume, number)
    if not scores.passes(threshold):
        raise BelowThreshold(f"accuracy {scores.accuracy:.4f} of version {number} (epoch {version.epoch}) is not "
                             f"above the threshold {threshold}: promote a better version (`mnist models` lists "
                             f"them) or lower --threshold")
    return version, scores


def catalogue(volume: Volume) -> List[Dict[str, Any]]:
    """Every version as `mnist models --json` and GET /models list it, oldest first, with its aliases."""
    pointed: Dict[int, List[str]] = {}
    for name, number in every(volume).items():
        pointed.setdefault(number, []).append(name)
    rows: List[Dict[str, Any]] = []
    for found in versions.listing(volume):
        names = pointed.get(found.number, [])
        if isinstance(found, versions.Corrupt):
            log.warning("skipping a corrupt version: %s", found.problem)
            rows.append({"version": found.number, "corrupt": found.problem, "aliases": names})
        else:
            rows.append({"version": found.number, "epoch": found.epoch, "accuracy": found.accuracy,
                         "test_loss": found.test_loss, "created": found.created, "sha256": found.sha256,
                         "aliases": names, "feedback": found.feedback.to_json() if found.feedback else None})
    return rows


def history(volume: Volume) -> List[Move]:
    """Every move, oldest first."""
    try:
        text = read_regular(volume.alias_log, j.MAX_BYTES, "alias log").decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    moves = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values = j.check(Line, json.loads(line, parse_constant=j.no_constant))
            moves.append(Move(values["time"], values["alias"], values["from"], values["to"], values["reason"]))
        except (ValueError, j.Invalid) as exc:
            if number == len(lines):  # the last line, without its newline: an append cut short
                break
            log.warning("%s line %d is skipped: %s", volume.alias_log.name, number, exc)
    return moves


def promote(volume: Volume, number: int, name: str = PRODUCTION, reason: str = "promote") -> Optional[Move]:
    """Point `name` at version `number` (checked whole first); None if it points there already."""
    versions.load(volume, number)
    with versions.registry_lock(volume, f"move {name}"):
        versions.load(volume, number)  # not pruned meanwhile
        return _move(volume, name, number, reason)


def rollback(volume: Volume, name: str = PRODUCTION) -> Move:
    """Point `name` back at the version it pointed to before its current one (walking back, one call a step)."""
    with versions.registry_lock(volume, f"move {name}"):
        current = read(volume, name)
        if current is None:
            raise PipelineError(f"alias {name!r} is not set, so there is nothing to roll back: "
                                f"`mnist promote N --alias {name}` sets it")
        targets = _targets(history(volume), name)
        while targets and targets[-1] == current:
            targets.pop()
        if not targets:
            raise PipelineError(f"alias {name!r} has no previous version to roll back to (it points to version "
                                f"{current}, its first): `mnist promote N --alias {name}` moves it")
        previous = targets[-1]
        versions.load(volume, previous)
        return _move(volume, name, previous, "rollback")


def _targets(moves: List[Move], name: str) -> List[int]:
    """The alias's stack of targets: a promotion pushes one, a rollback pops back to where it went."""
    stack: List[int] = []
    for move in moves:
        if move.alias != name:
            continue
        if move.reason == "rollback":
            while stack and stack[-1] != move.to:
                stack.pop()
            if not stack:
                stack.append(move.to)
        else:
            stack.append(move.to)
    return stack


def auto_promote(volume: Volume, new: versions.Version, threshold: float, mode: str, margin: float = 0.0,
                 judge: Optional[Callable[[versions.Version], Optional[evaluation.FeedbackFigures]]] = None
                 ) -> Tuple[Optional[Move], Optional[str]]:
    """evaluate's rule for production: `always`; `never`; or `auto`: when `new` passes the threshold and is at
    least as accurate as the current production version (or there is none that reads). With held-out feedback
    (`new.feedback`, and `judge` saying how production's version reads the same set), `auto` asks instead that
    `new` is at most `margin` percentage points less accurate on MNIST's test set, and not less accurate on the
    held-out feedback. The move, and the line saying which figure held it back when that rule did."""
    if mode == "never":
        return None, None
    with versions.registry_lock(volume, f"move {PRODUCTION}"):
        if mode == "auto":
            if not new.accuracy > threshold:
                return None, None
            current = _readable(volume, read(volume, PRODUCTION))
            theirs = judge(current) if current is not None and new.feedback and judge else None
            if theirs is not None:
                held_back = _held_back(new, current, theirs, margin)
                if held_back:
                    return None, held_back
            elif current is not None and new.accuracy < current.accuracy:
                return None, None
        return _move(volume, PRODUCTION, new.number, "auto-promotion"), None


def _held_back(new: versions.Version, current: versions.Version, theirs: evaluation.FeedbackFigures,
               margin: float) -> Optional[str]:
    """Why `new` does not replace `current` under the feedback rule (None: it does)."""
    ours = new.feedback
    stays = f"production stays at version {current.number}: version {new.number} reads"
    # (accuracies are counts over 10,000 images: the tolerance absorbs the float subtraction only)
    if new.accuracy < current.accuracy - margin / 100 - 1e-9:
        return (f"{stays} {new.accuracy:.2%} of MNIST's test set, more than {margin:g} point below version "
                f"{current.number}'s {current.accuracy:.2%} (--promote-margin)")
    if ours.correct * theirs.total < theirs.correct * ours.total:
        return (f"{stays} {ours.accuracy:.1%} of {ours.total} held-out feedback samples, version {current.number} "
                f"{theirs.accuracy:.1%}")
    return None


def _readable(volume: Volume, number: Optional[int]) -> Optional[versions.Version]:
    if number is None:
        return None
    try:
        return versions.read(volume, number)
    except (FileNotFoundError, PipelineError) as exc:
        log.warning("production's version %d does not read (%s): the new version replaces it", number, exc)
        return None


def prune(volume: Volume, keep: int) -> List[int]:
    """Remove the oldest versions beyond the `keep` newest that no alias points to; the numbers removed."""
    with versions.registry_lock(volume, "prune"):
        return versions.prune(volume, keep, set(every(volume).values()))


def _move(volume: Volume, name: str, to: int, reason: str) -> Optional[Move]:
    before = read(volume, name)
    if before == to:
        return None
    move = Move(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), alias=name, before=before, to=to, reason=reason)
    j.dump(volume.alias_path(name), {"format_version": FORMAT_VERSION, "version": to},
           fault_point="alias-before-rename")
    _append(volume, move)
    log.info("%s: version %s -> %d (%s)", name, before or "none", to, reason)
    return move


def _append(volume: Volume, move: Move) -> None:
    path = volume.alias_log
    ensure_dir(path.parent)
    line = (json.dumps(move.to_json()) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_failed(path, exc) from None
