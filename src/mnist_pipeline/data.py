"""MNIST files: fetch from a mirror, verify, parse IDX into tensors.

data/ keeps the four files decompressed: they load in a fraction of the time
of gzip and verify against the same checksums (of the decompressed content,
which hold for every correct copy whatever its compression). A split is parsed
once per process: evaluate and its report, or a whole pipeline, share it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import stat
import struct
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Optional

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.faults import crash_point
from mnist_pipeline.storage.atomic import ensure_dir, remove_dead_temps, temp_file
from mnist_pipeline.storage.files import NotReadable, describe, read_regular

if TYPE_CHECKING:  # torch loads with the first split parsed: fetching and checking need none of it
    import torch

log = logging.getLogger(__name__)

# sha256 of each file's decompressed content
FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# decompressed sizes: a mirror that sends more (a gzip bomb) is cut off there
SIZES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
SPLITS = {"train": "train", "test": "t10k"}

# Used, in order, only when no mirror is given.
PUBLIC_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DOWNLOAD_TIMEOUT_S = 60  # for each read
DOWNLOAD_DEADLINE_S = 600  # for a whole file: a mirror that trickles is given up on
CHUNK = 1 << 20


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def load_split(data_dir: Path, split: str, mirror: Optional[str]) -> Split:
    """The `split` ('train' or 'test') as tensors, fetched into data_dir first if needed.

    Parsed once per process while its files stay as they are (callers do not change the tensors:
    they are shared), wherever they are linked from; a file that changed is read and verified again.
    """
    prefix = SPLITS[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    cached = _parsed.get(split)
    if cached is not None and cached[0] == _identity(data_dir, names):
        return cached[1]
    images = _parse_idx(_verified_bytes(data_dir, names[0], mirror), ndim=3)
    labels = _parse_idx(_verified_bytes(data_dir, names[1], mirror), ndim=1)
    if len(images) != len(labels):
        raise PipelineError(f"MNIST {split} split has {len(images)} images but {len(labels)} labels")
    loaded = Split(images=images, labels=labels.long())
    _parsed[split] = (_identity(data_dir, names), loaded)
    return loaded


_parsed: dict = {}  # split -> (its files' identity, the Split): the last one parsed


def _identity(data_dir: Path, names: tuple) -> tuple:
    """What changes when a file is replaced or rewritten, without reading it (the same for a hard link)."""
    identity = []
    for name in names:
        try:
            info = os.stat(data_dir / name)
        except OSError:
            return ()
        identity.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns))
    return tuple(identity)


def ensure(data_dir: Path, mirror: Optional[str], splits: tuple = ("train", "test")) -> None:
    """Fetch and verify the files of `splits` without parsing them."""
    for name in FILES:
        if name.startswith(tuple(SPLITS[split] for split in splits)):
            _verified_bytes(data_dir, name, mirror)


def _verified_bytes(data_dir: Path, name: str, mirror: Optional[str]) -> bytes:
    path = data_dir / name
    try:
        data = read_regular(path, SIZES[name], "MNIST file")
    except FileNotFoundError:
        data = None
    except NotReadable as exc:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise PipelineError(f"{exc}: remove it, and the next run fetches the file again") from None
        data = b""  # larger than the real file: a bad copy, fetched again below
    if data is not None:
        if hashlib.sha256(data).hexdigest() == FILES[name]:
            return data
        log.warning("%s does not match its checksum; fetching it again", describe(path))
    _fetch(data_dir, name, mirror)
    return read_regular(path, SIZES[name], "MNIST file")


def _fetch(data_dir: Path, name: str, mirror: Optional[str]) -> None:
    ensure_dir(data_dir)
    remove_dead_temps(data_dir)
    sources = [mirror] if mirror else list(PUBLIC_MIRRORS)
    problems = []
    for source in sources:
        try:
            _fetch_from(source, name, data_dir)
            return
        except _SourceProblem as exc:
            problems.append(f"{source}: {exc}")
            log.warning("could not fetch %s from %s: %s", name, source, exc)
    if mirror:
        raise PipelineError(
            f"cannot fetch MNIST file {name} from MNIST_MIRROR={mirror}: {problems[0].split(': ', 1)[1]}; "
            f"point --mirror / MNIST_MIRROR at a folder or http(s) URL holding the four MNIST files "
            f"(.gz or raw), or unset it to use the public mirrors"
        )
    raise PipelineError(
        f"cannot fetch MNIST file {name} from any public mirror ({'; '.join(problems)}); "
        f"check the network, or set --mirror / MNIST_MIRROR to a local copy"
    )


class _SourceProblem(Exception):
    pass


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _fetch_from(source: str, name: str, data_dir: Path) -> None:
    """Copy `name` from one source into data_dir: verified, then renamed into place."""
    fd, tmp = temp_file(data_dir, name)  # the open descriptor holds the temp's flock until the rename
    try:
        with open(fd, "wb", closefd=False) as out:
            with _open_source(source, name) as (stream, compressed):
                digest = _copy_decompressed(stream, out, compressed, name)
            out.flush()
            os.fsync(out.fileno())
        if digest != FILES[name]:
            raise _SourceProblem(f"{name} does not match its sha256 checksum (corrupt or truncated copy)")
        crash_point("data-before-rename")
        os.replace(tmp, data_dir / name)
        log.info("fetched %s from %s", name, source)
    except OSError as exc:
        raise PipelineError(f"cannot write {data_dir / name}: {exc.strerror}; check the volume") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.close(fd)


@contextlib.contextmanager
def _open_source(source: str, name: str):
    """Yield (binary stream, is_gzipped) for `name` at `source`: from a URL .gz before raw (a fifth of the
    bytes), from a folder raw before .gz (no inflating)."""
    if _is_url(source):
        base = source if source.endswith("/") else source + "/"
        last = None
        for candidate, compressed in ((name + ".gz", True), (name, False)):
            try:
                response = urllib.request.urlopen(base + candidate, timeout=DOWNLOAD_TIMEOUT_S)
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code} for {base + candidate}"
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
                # HTTPException: a server that does not speak HTTP; ValueError: a URL urllib cannot use
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                raise _SourceProblem(f"unreachable ({reason})") from None
            with response:
                yield response, compressed
            return
        raise _SourceProblem(last or "not found")
    folder = Path(source)
    if not folder.is_dir():
        raise _SourceProblem(f"no such folder {folder}")
    for candidate, compressed in ((name, False), (name + ".gz", True)):
        path = folder / candidate
        if path.is_file():
            try:
                stream = open(path, "rb")
            except OSError as exc:
                raise _SourceProblem(f"cannot read {path}: {exc.strerror}") from None
            with stream:
                yield stream, compressed
            return
    raise _SourceProblem(f"neither {name}.gz nor {name} is in {folder}")


def _copy_decompressed(stream: BinaryIO, out: BinaryIO, compressed: bool, name: str) -> str:
    """Copy, decompressing if needed, no more than SIZES[name] bytes; return the sha256 of what was written."""
    digest = hashlib.sha256()
    timed = _Deadline(stream, time.monotonic() + DOWNLOAD_DEADLINE_S)
    reader = gzip.GzipFile(fileobj=timed) if compressed else timed
    limit, written = SIZES[name], 0
    while True:
        try:
            chunk = reader.read(CHUNK)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise _SourceProblem(f"corrupt or truncated gzip data ({exc})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            raise _SourceProblem(f"reading it broke off ({type(exc).__name__}: {exc})") from None
        if not chunk:
            break
        written += len(chunk)
        if written > limit:
            raise _SourceProblem(f"{name} is larger than the {limit} bytes MNIST's file has (not an MNIST file)")
        digest.update(chunk)
        out.write(chunk)  # an OSError here is the volume's: the caller says so
    return digest.hexdigest()


class _Deadline:
    """A source stream whose reads give up once the whole file's deadline has passed."""

    def __init__(self, stream: BinaryIO, deadline: float):
        self.stream, self.deadline = stream, deadline

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all when -1), fewer only at the end, like a file's read()."""
        # read1 gives what has arrived; read() would wait on a trickle until it has all of it
        read1 = getattr(self.stream, "read1", self.stream.read)
        parts, wanted = [], size if size >= 0 else float("inf")
        while wanted > 0:
            if time.monotonic() > self.deadline:
                raise _SourceProblem(f"it took more than {DOWNLOAD_DEADLINE_S} s (a stalled or trickling mirror)")
            part = read1(int(min(wanted, CHUNK)))
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)


def png(image: torch.Tensor) -> bytes:
    """An 8-bit grayscale PNG of a uint8 [H, W] tensor (the format is small enough to write by hand)."""
    height, width = image.shape
    rows = b"".join(b"\x00" + bytes(row) for row in image.tolist())  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _parse_idx(data: bytes, ndim: int) -> torch.Tensor:
    """IDX: 2 zero bytes, a type byte (0x08 = uint8), the dimension count, then big-endian sizes."""
    import torch

    zero, dtype, dims = struct.unpack_from(">HBB", data)
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise PipelineError("MNIST file has an unexpected IDX header; delete the data/ folder to fetch it again")
    shape = struct.unpack_from(f">{dims}I", data, 4)
    offset = 4 + 4 * dims
    # bytearray: frombuffer wants a writable buffer
    return torch.frombuffer(bytearray(memoryview(data)[offset:]), dtype=torch.uint8).reshape(shape)

