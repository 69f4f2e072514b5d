"""feedback/: what people told serve the model got right or wrong, kept for review (docs/feedback.md).

  feedback/<id>.png    the 28x28 image the model read (preprocess's output, contract.IMAGE_BYTES), grayscale
  feedback/<id>.json   format_version, label, predicted and version (as the server computed them), created,
                       status (pending, accepted, rejected) and split (train or heldout)

<id> is the sha256 of the image's bytes followed by the label's digit: the same drawing with the same label is
one sample, and a second submission of it is refused. The PNG is written first, then the JSON is created with
link(2), which fails when the name exists: of two writers of one sample (two workers, two pods on NFS) exactly
one lands it, with no lock. A sample exists once its JSON does; a PNG without one (a kill -9 between the two)
is no sample, and the next write of the same id replaces it. A review rewrites the JSON with os.replace.

The split is a pure function of the id (HELDOUT_EVERY), so a sample never moves between the training share and
the held-out one, whoever reviews it and in whichever order.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Optional, Tuple

from typing_extensions import TypedDict

from mnist_pipeline.contract import IMAGE_BYTES, IMAGE_SIZE, NUM_CLASSES
from mnist_pipeline.errors import PipelineError
from mnist_pipeline.faults import crash_point
from mnist_pipeline.records import _json as j
from mnist_pipeline.records.versions import MAX_VERSION
from mnist_pipeline.storage.atomic import (atomic_write_bytes, ensure_dir, fsync_dir, remove_dead_temps, temp_file,
                                           write_failed)
from mnist_pipeline.storage.files import read_regular
from mnist_pipeline.volume import Volume

FORMAT_VERSION = 1
STATUSES = ("pending", "accepted", "rejected")
SPLITS = ("train", "heldout")
HELDOUT_EVERY = 3  # one sample in three, by its id, is held out: training never sees it
ID = re.compile(r"^[0-9a-f]{64}$")
MIN_PREFIX = 6  # the shortest id prefix the review commands take
MAX_PNG_BYTES = 64 * 1024  # a 28x28 grayscale PNG is about 1 KB; far more is not one this program wrote
MAX_JSON_BYTES = 4096
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # UTC
FIX = "remove it with `mnist feedback delete ID` (or delete the file)"


class File(TypedDict):
    """feedback/<id>.json: one sample's label, what the server predicted for it, and its review."""

    __pydantic_config__ = j.STRICT
    format_version: Literal[FORMAT_VERSION]
    label: j.Whole(0, NUM_CLASSES - 1)  # what the person said the digit is
    predicted: j.Whole(0, NUM_CLASSES - 1)  # what the server's model read
    version: Optional[j.Whole(1, MAX_VERSION)]  # the version that answered (null: no version kept yet)
    created: j.Text(40, j.Pattern(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$",
                                  "a UTC time as 2026-01-31T12:00:00Z"))
    status: Literal[STATUSES]
    split: Literal[SPLITS]


class Duplicate(PipelineError):
    """The same image with the same label is kept already."""


class NoSuchSample(PipelineError):
    """An id (or prefix) that names no sample, or more than one."""


@dataclass(frozen=True)
class Sample:
    id: str
    label: int
    predicted: int
    version: Optional[int]
    created: str
    status: str
    split: str
    bytes: int = 0  # of its two files on the volume

    def to_json(self) -> Dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "label": self.label, "predicted": self.predicted,
                "version": self.version, "created": self.created, "status": self.status, "split": self.split}

    @property
    def age_s(self) -> float:
        return time.time() - _epoch_seconds(self.created)


def sample_id(image: bytes, label: int) -> str:
    return hashlib.sha256(image + str(label).encode()).hexdigest()


def split_of(sample: str) -> str:
    return "heldout" if int(sample[:8], 16) % HELDOUT_EVERY == 0 else "train"


def png_of(image: bytes) -> bytes:
    """contract.IMAGE_BYTES pixels as a grayscale PNG (the same bytes give the same file)."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("L", (IMAGE_SIZE, IMAGE_SIZE), image).save(out, "PNG")
    return out.getvalue()


def add(volume: Volume, image: bytes, label: int, predicted: int, version: Optional[int]) -> Sample:
    """Keep `image` (contract.IMAGE_BYTES) with its `label` as a pending sample. Duplicate when it is kept already."""
    if len(image) != IMAGE_BYTES or not 0 <= label < NUM_CLASSES:
        raise ValueError("a sample is 784 pixels and a digit")
    sid = sample_id(image, label)
    sample = Sample(id=sid, label=label, predicted=predicted, version=version,
                    created=time.strftime(TIME_FORMAT, time.gmtime()), status="pending", split=split_of(sid))
    folder = ensure_dir(volume.feedback_dir)
    record = volume.feedback_record(sid)
    if record.exists():
        raise Duplicate(f"sample {sid[:12]} is kept already")
    atomic_write_bytes(volume.feedback_image(sid), png_of(image), fault_point="feedback-image-before-rename")
    data = _text(sample.to_json()).encode()
    try:
        _create(folder, record, data)
    except FileExistsError:
        raise Duplicate(f"sample {sid[:12]} is kept already") from None
    except OSError as exc:
        raise write_failed(record, exc) from None
    return replace(sample, bytes=len(data) + volume.feedback_image(sid).stat().st_size)


def _create(folder: Path, path: Path, data: bytes) -> None:
    """`data` as the new file `path`, whole or not at all; FileExistsError when `path` exists (link(2) refuses to
    replace, on NFS too, where O_EXCL and flock are not to be trusted)."""
    remove_dead_temps(folder)
    fd, tmp = temp_file(folder, path.name)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("feedback-before-rename")
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # a file system without hard links (some SMB and FUSE ones): a rename, after a look, so two
            # writers of one sample at the same moment may both land it, as one file (the later one's time)
            if os.path.lexists(path):
                raise FileExistsError(path) from None
            os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        os.close(fd)


def read(volume: Volume, sid: str) -> Sample:
    """Sample `sid`'s record; FileNotFoundError when there is none, PipelineError naming the file when it is
    malformed."""
    path = volume.feedback_record(sid)
    try:
        data = read_regular(path, MAX_JSON_BYTES, "feedback record")
        record = _parse(data)
        values = j.check_format(File, record, FORMAT_VERSION)
    except j.Invalid as exc:
        raise j.problem(path, exc, FIX) from None
    if values["split"] != split_of(sid):
        raise j.problem(path, j.Invalid(f"split is {values['split']!r}, but its id puts it in {split_of(sid)!r}"),
                        FIX)
    values.pop("format_version")
    size = len(data)
    with contextlib.suppress(OSError):
        size += volume.feedback_image(sid).stat().st_size
    return Sample(id=sid, bytes=size, **values)


def image(volume: Volume, sample: Sample) -> bytes:
    """Sample's 28x28 pixels, checked against its id; PipelineError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = volume.feedback_image(sample.id)
    try:
        data = read_regular(path, MAX_PNG_BYTES, "feedback image")
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing: sample {sample.id[:12]} has no image; {FIX}") from None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as picture:
            if picture.size != (IMAGE_SIZE, IMAGE_SIZE) or picture.mode != "L":
                raise j.Invalid(f"it is a {picture.size[0]}x{picture.size[1]} {picture.mode} image, not a 28x28 "
                                f"grayscale one")
            pixels = picture.tobytes()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, j.Invalid):
            raise j.problem(path, exc, FIX) from None
        raise j.problem(path, j.Invalid("it is not a PNG image"), FIX) from None
    if sample_id(pixels, sample.label) != sample.id:
        raise j.problem(path, j.Invalid("its pixels and label do not hash to its name (changed since it was kept)"),
                        FIX)
    return pixels


def ids(volume: Volume) -> List[str]:
    """The kept samples' ids (those with a record), sorted."""
    try:
        names = os.listdir(volume.feedback_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PipelineError(f"cannot list {volume.feedback_dir}: {exc.strerror}; check the volume") from None
    return sorted(name[:-5] for name in names if name.endswith(".json") and ID.match(name[:-5]))


def every(volume: Volume) -> Iterator[Sample]:
    """Every kept sample, strictly read (the first malformed one is an error naming it), in id order."""
    for sid in ids(volume):
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
            yield read(volume, sid)


@dataclass(frozen=True)
class Accepted:
    """The accepted samples of one split, in id order: what training mixes in (train) or evaluate scores
    (heldout)."""

    ids: Tuple[str, ...]
    pixels: bytes  # len(ids) images of contract.IMAGE_BYTES each, one after another
    labels: Tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def digest(self) -> str:
        """One sha256 for the set (its ids name the pixels and labels): equal digests, equal sets."""
        return hashlib.sha256("".join(self.ids).encode()).hexdigest()


def accepted(volume: Volume, split: str) -> Accepted:
    """Every accepted sample of `split`, strictly read (a malformed or changed one is an error naming its file)."""
    if split not in SPLITS:
        raise ValueError(split)
    chosen, pixels = [], []
    for sample in every(volume):
        if sample.status != "accepted" or sample.split != split:
            continue
        try:
            pixels.append(image(volume, sample))
        except PipelineError:
            if volume.feedback_record(sample.id).exists():
                raise
            continue  # deleted since its record was read (a deletion removes the record first)
        chosen.append(sample)
    return Accepted(ids=tuple(sample.id for sample in chosen), pixels=b"".join(pixels),
                    labels=tuple(sample.label for sample in chosen))


def resolve(volume: Volume, given: str) -> str:
    """The id `given` names: itself, or the one id it is a prefix of (at least MIN_PREFIX hex digits)."""
    text = given.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{%d,64}" % MIN_PREFIX, text):
        raise NoSuchSample(f"{given[:70]!r} is not a sample id: {MIN_PREFIX} to 64 hex digits, as `mnist feedback` "
                           f"lists them")
    found = [sid for sid in ids(volume) if sid.startswith(text)]
    if len(found) != 1:
        raise NoSuchSample(f"{given!r} names {'no' if not found else len(found)} samples: give "
                           f"{'an id `mnist feedback` lists' if not found else 'more of its digits'}")
    return found[0]


def review(volume: Volume, sid: str, status: str) -> Tuple[Sample, bool]:
    """Set sample `sid`'s status (accepted, rejected or pending again); (the sample, whether it changed)."""
    if status not in STATUSES:
        raise ValueError(status)
    sample = read(volume, sid)
    if sample.status == status:
        return sample, False
    changed = replace(sample, status=status)
    atomic_write_bytes(volume.feedback_record(sid), _text(changed.to_json()).encode(),
                       fault_point="feedback-before-rename")
    return changed, True


def delete(volume: Volume, sid: str) -> None:
    """Remove sample `sid`: its record first (then it is no sample), then its image."""
    for path in (volume.feedback_record(sid), volume.feedback_image(sid)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PipelineError(f"cannot delete {path}: {exc.strerror}; mount the volume read-write") from None
    with contextlib.suppress(OSError):
        fsync_dir(volume.feedback_dir)


class Pending:
    """How many samples wait for review and their bytes, for serve's cap: the folder is listed on each call, but
    only the records changed since the last call are read again (each worker keeps its own)."""

    def __init__(self, volume: Volume):
        self.volume = volume
        self.seen: Dict[str, Tuple[int, int, bool]] = {}  # id -> (record's mtime_ns, bytes, pending)

    def totals(self) -> Tuple[int, int]:
        """(pending samples, their bytes)."""
        now: Dict[str, Tuple[int, int, bool]] = {}
        with contextlib.suppress(FileNotFoundError):
            with os.scandir(self.volume.feedback_dir) as entries:
                for entry in entries:
                    name = entry.name
                    if not name.endswith(".json") or not ID.match(name[:-5]):
                        continue
                    with contextlib.suppress(OSError):
                        stamp = entry.stat().st_mtime_ns
                        known = self.seen.get(name[:-5])
                        now[name[:-5]] = known if known and known[0] == stamp else self._look(name[:-5], stamp)
        self.seen = now
        pending = [size for _, size, waiting in now.values() if waiting]
        return len(pending), sum(pending)

    def _look(self, sid: str, stamp: int) -> Tuple[int, int, bool]:
        try:
            sample = read(self.volume, sid)
        except PipelineError:  # a malformed record counts as pending: it waits for a person too
            return stamp, MAX_JSON_BYTES, True
        return stamp, sample.bytes, sample.status == "pending"


def _epoch_seconds(created: str) -> float:
    import calendar

    return calendar.timegm(time.strptime(created, TIME_FORMAT))


def _text(record: Dict[str, Any]) -> str:
    return json.dumps(record, indent=2, allow_nan=False) + "\n"


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=j.no_constant)
    except UnicodeDecodeError:
        raise j.Invalid("it is not UTF-8 text") from None
    except RecursionError:
        raise j.Invalid("it nests too deeply") from None
    except ValueError as exc:
        raise j.Invalid(f"it is not JSON ({exc})") from None
