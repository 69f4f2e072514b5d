"""model/versions/<N>/: every checkpoint evaluate has scored, kept as an immutable numbered version.

  model/versions/<N>/mnist_cnn.pt       the checkpoint: a hard link to the one scored where the file
                                        system allows (train replaces mnist_cnn.pt by a rename, never
                                        in place, so the link keeps the old bytes), else a copy
  model/versions/<N>/eval_results.json  its evaluation (records/evaluation.py)
  model/versions/<N>/mnist_cnn.onnx     the same network as an ONNX model, added under the registry lock
                                        once its parity check passed (export.py)
  model/versions/<N>/version.json       format_version, sha256 and bytes of the checkpoint, epoch,
                                        recipe (its train_config), data_sha256, created, accuracy,
                                        test_loss, package (this program's version); format 2 adds
                                        feedback (its held-out feedback figures), and a version
                                        scored without any is written as format 1
  model/versions/counter.json           {"format_version": 1, "next": N}: numbers are never reused,
                                        even after prune removed the newest

A version is filled in a flocked temp folder, then renamed to <N> under the registry lock, N taken
from the counter: a kill -9 leaves no <N> or a whole one, and two registrations at once get two
numbers. Aliases, the pointers to versions, are records/aliases.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple, Union

from typing_extensions import NotRequired, TypedDict

from mnist_pipeline import __version__
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.faults import crash_point, hold_point
from mnist_pipeline.records import _json as j
from mnist_pipeline.records import checkpoint as checkpoints
from mnist_pipeline.records import evaluation as evaluations
from mnist_pipeline.storage.atomic import fsync_dir, ensure_dir, remove_dead_temps, temp_dir, write_failed
from mnist_pipeline.storage.files import describe, read_regular
from mnist_pipeline.storage.locks import brief_lock, is_running
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
WITHOUT_FEEDBACK = 1  # the format of a version scored without held-out feedback
COUNTER_FORMAT = 1
LOCK = "versions"  # held while a number is taken, an alias moves or versions are pruned
CHECKPOINT, EVALUATION, METADATA = "mnist_cnn.pt", "eval_results.json", "version.json"
MAX_VERSION = 10**9
VersionNumber = j.Whole(1, MAX_VERSION)


class Feedback(TypedDict):
    """How a version read the accepted held-out feedback when evaluate scored it (its eval_results.json has
    the rest)."""

    digest: j.Sha256  # of the set (records/feedback.Accepted.digest)
    total: j.Whole(1, evaluations.MAX_SAMPLES)
    correct: j.Whole(0, evaluations.MAX_SAMPLES)
    accuracy: j.Fraction  # correct / total


class File(TypedDict):
    """model/versions/<N>/version.json: what version N keeps (its checkpoint, by sha256 and size)."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[WITHOUT_FEEDBACK, FORMAT_VERSION]
    sha256: j.Sha256  # of the checkpoint
    bytes: j.Whole(1, checkpoints.MAX_BYTES)
    epoch: j.Whole(0, checkpoints.MAX_EPOCH)
    accuracy: j.Fraction
    test_loss: j.Number(0)
    created: j.Text(40)
    recipe: Dict[str, Any]  # its train_config
    data_sha256: j.Sha256  # of the MNIST files' checksums
    package: j.Text(40)  # this program's version
    feedback: NotRequired[Feedback]  # format 2: there, format 1: absent


class Counter(TypedDict):
    """model/versions/counter.json: the next version's number (numbers are never reused)."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[COUNTER_FORMAT]
    next: VersionNumber


class NoSuchVersion(PipelineError):
    """A version number that is not kept (never registered, or pruned)."""


@dataclass(frozen=True)
class Version:
    number: int
    sha256: str  # of the checkpoint
    bytes: int
    epoch: int
    accuracy: float
    test_loss: float
    created: str
    recipe: Dict[str, Any]
    data_sha256: str
    package: str
    feedback: Optional[evaluations.FeedbackFigures] = None  # None: scored without held-out feedback

    def to_json(self) -> Dict[str, Any]:
        record = {"format_version": FORMAT_VERSION if self.feedback else WITHOUT_FEEDBACK, "sha256": self.sha256,
                  "bytes": self.bytes, "epoch": self.epoch, "accuracy": self.accuracy, "test_loss": self.test_loss,
                  "created": self.created, "recipe": self.recipe, "data_sha256": self.data_sha256,
                  "package": self.package}
        if self.feedback:
            record["feedback"] = self.feedback.to_json()
        return record


@dataclass(frozen=True)
class Corrupt:
    """A version folder that does not read: listed, never served."""

    number: int
    problem: str


def register(volume: Volume, saved: checkpoints.Checkpoint, scores: evaluations.Evaluation,
             data_sha256: str) -> Optional[Version]:
    """Keep `saved` with its `scores` as the next version; None when a version of it exists already,
    or when the checkpoint file changed since it was scored (the next evaluate registers the new one)."""
    folder = ensure_dir(volume.versions_dir)
    remove_dead_temps(folder)  # what a killed registration left
    fd, staging = temp_dir(folder, "version")
    try:
        size = _keep_checkpoint(saved, staging / CHECKPOINT)
        if size is None:
            log.warning("%s changed while it was scored: not registered as a version", describe(saved.path))
            return None
        version = Version(number=0, sha256=saved.sha256, bytes=size, epoch=saved.epoch, accuracy=scores.accuracy,
                          test_loss=scores.test_loss, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          recipe=dataclasses.asdict(saved.state.train_config), data_sha256=data_sha256,
                          package=__version__, feedback=scores.feedback.figures if scores.feedback else None)
        j.dump(staging / EVALUATION, scores.to_json(), fault_point="")
        j.dump(staging / METADATA, version.to_json(), fault_point="")  # (each fsyncs the folder too)
        with registry_lock(volume, "register its version"):
            if any(isinstance(v, Version) and v.sha256 == saved.sha256 for v in listing(volume)):
                return None
            number = _next_number(volume)
            hold_point("version-before-rename")
            crash_point("version-before-rename")
            os.rename(staging, volume.version_dir(number))
            fsync_dir(folder)
            j.dump(volume.versions_dir / "counter.json", {"format_version": COUNTER_FORMAT, "next": number + 1},
                   fault_point="")
        return dataclasses.replace(version, number=number)
    except OSError as exc:
        raise write_failed(volume.versions_dir, exc) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        os.close(fd)


def registry_lock(volume: Volume, why: str):
    """The registry lock, saying so when another process holds it (a test waits for that line)."""
    if is_running(volume, LOCK):
        log.info("waiting for another process to finish with model/versions/ to %s", why)
    return brief_lock(volume, LOCK)


def _keep_checkpoint(saved: checkpoints.Checkpoint, target: os.PathLike) -> Optional[int]:
    """Link (else copy) `saved`'s file to `target`; its size, or None if those are no longer the bytes scored."""
    try:
        os.link(saved.path, target)
        data = read_regular(target, checkpoints.MAX_BYTES, "checkpoint")
    except OSError:  # another file system, or links not allowed: a copy, written and synced
        data = read_regular(saved.path, checkpoints.MAX_BYTES, "checkpoint")
        with open(target, "xb") as copy:
            copy.write(data)
            copy.flush()
            os.fsync(copy.fileno())
    return len(data) if hashlib.sha256(data).hexdigest() == saved.sha256 else None


def _next_number(volume: Volume) -> int:
    """The counter's next number, or one past the highest folder if that is higher (a counter lost or behind)."""
    highest = max(_numbers(volume), default=0)
    try:
        record = j.load(volume.versions_dir / "counter.json", "version counter")
        counted = j.check_format(Counter, record, COUNTER_FORMAT)["next"]
    except (FileNotFoundError, j.Invalid, PipelineError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("model/versions/counter.json does not read (%s): numbering goes on after version %d",
                        exc, highest)
        counted = 1
    return max(counted, highest + 1)


def _numbers(volume: Volume) -> Iterator[int]:
    try:
        names = os.listdir(volume.versions_dir)
    except FileNotFoundError:
        return
    for name in names:
        if name.isdigit() and name == str(int(name)) and 0 < int(name) <= MAX_VERSION:
            yield int(name)


def listing(volume: Volume) -> List[Union[Version, Corrupt]]:
    """Every version folder, oldest first: a Version, or Corrupt saying what is wrong with it."""
    found: List[Union[Version, Corrupt]] = []
    for number in sorted(_numbers(volume)):
        try:
            found.append(read(volume, number))
        except FileNotFoundError:
            continue  # pruned meanwhile
        except PipelineError as exc:
            found.append(Corrupt(number, str(exc)))
    return found


def read(volume: Volume, number: int) -> Version:
    """Version `number`'s metadata, checked against its evaluation and its checkpoint's size (not hashed:
    load() does that). FileNotFoundError when there is no such version; PipelineError when it is corrupt."""
    folder = volume.version_dir(number)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise PipelineError(f"version {number}: {describe(folder)} is not a folder")
    path = folder / METADATA
    try:
        record = j.load(path, "version metadata")
        found = j.version(record, FORMAT_VERSION)
        if found == WITHOUT_FEEDBACK and isinstance(record, dict) and "feedback" in record:
            raise j.Invalid(f"it has feedback figures, which format {found} does not have: its format_version is 2")
        values = j.check_format(File, record, FORMAT_VERSION)
        if found == FORMAT_VERSION and "feedback" not in values:
            raise j.Invalid("it has no 'feedback' (format 2 has it; a version without feedback is format 1)")
        figures = values.pop("feedback", None)
        version = Version(number=number, **{k: v for k, v in values.items() if k != "format_version"},
                          feedback=evaluations.FeedbackFigures.parse(figures) if figures else None)
        path = folder / EVALUATION
        scores = evaluations.parse(j.load(path, "evaluation"))
    except FileNotFoundError:
        if not folder.exists():
            raise
        raise PipelineError(f"version {number}: {describe(folder)} lacks {path.name}") from None
    except j.Invalid as exc:
        raise PipelineError(f"version {number}: {describe(path)} is not valid: {exc}") from None
    if (scores.sha256, scores.accuracy, scores.epoch) != (version.sha256, version.accuracy, version.epoch):
        raise PipelineError(f"version {number}: its {EVALUATION} is of another checkpoint than {METADATA} says")
    if (scores.feedback.figures if scores.feedback else None) != version.feedback:
        raise PipelineError(f"version {number}: its {EVALUATION} and {METADATA} give other held-out feedback figures")
    try:
        size = (folder / CHECKPOINT).stat().st_size
    except OSError:
        size = -1
    if size != version.bytes or not (folder / CHECKPOINT).is_file():
        raise PipelineError(f"version {number}: its {CHECKPOINT} is missing or not the {version.bytes} bytes kept")
    return version


def load(volume: Volume, number: int) -> Tuple[Version, checkpoints.Checkpoint, evaluations.Evaluation]:
    """Version `number` in full, its checkpoint loaded (torch), hashed and checked: what torch serves and promote
    checks. PipelineError (saying what to do) when it is missing or corrupt."""
    version, scores = checked(volume, number)
    try:
        saved = checkpoints.read(volume.version_dir(number) / CHECKPOINT)
    except FileNotFoundError as exc:
        raise PipelineError(f"version {number} is corrupt ({exc}): promote another one") from None
    if saved.sha256 != version.sha256:  # (replaced since it was hashed)
        raise _not_kept(number)
    return version, saved, scores


def kept(volume: Volume, number: int) -> Version:
    """Version `number`'s record (a small file, strictly read); NoSuchVersion when it is not kept."""
    try:
        return read(volume, number)
    except FileNotFoundError:
        raise NoSuchVersion(f"there is no version {number}: `mnist models` lists the versions kept") from None


def checked(volume: Volume, number: int) -> Tuple[Version, evaluations.Evaluation]:
    """Version `number` with its evaluation, its checkpoint's bytes hashed against version.json without
    loading them (no torch): what the ONNX runtime serves from. PipelineError (saying what to do) when it
    is missing or corrupt."""
    version = kept(volume, number)
    folder = volume.version_dir(number)
    try:
        sha256 = checkpoints.sha256_of(folder / CHECKPOINT)
        scores = evaluations.parse(j.load(folder / EVALUATION, "evaluation"))
    except (FileNotFoundError, j.Invalid) as exc:
        raise PipelineError(f"version {number} is corrupt ({exc}): promote another one") from None
    if sha256 != version.sha256:
        raise _not_kept(number)
    return version, scores


def _not_kept(number: int) -> PipelineError:
    return PipelineError(f"version {number} is corrupt: its {CHECKPOINT} is not the checkpoint it kept "
                         f"(sha256 differs): promote another one")


def prune(volume: Volume, keep: int, aliased: set) -> List[int]:
    """Remove the oldest versions beyond the `keep` newest that no alias points to (call under the lock).

    The numbers in `aliased` are never removed, nor counted. A version leaves by one rename into a
    temp folder, then goes: a kill -9 leaves it whole or under a temp name the next writer sweeps.
    """
    unaliased = [n for n in sorted(_numbers(volume)) if n not in aliased]
    gone = unaliased[:max(0, len(unaliased) - keep)]
    for number in gone:
        fd, aside = temp_dir(volume.versions_dir, f"{number}.pruned")
        try:
            os.rename(volume.version_dir(number), aside / str(number))
            fsync_dir(volume.versions_dir)
        except OSError as exc:
            raise write_failed(volume.version_dir(number), exc) from None
        finally:
            os.close(fd)
        remove_dead_temps(volume.versions_dir)
    return gone
