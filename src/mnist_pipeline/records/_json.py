"""Strict reading of the JSON records: each check names the field and what it must be."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.storage.atomic import atomic_write_bytes
from mnist_pipeline.storage.files import read_regular

MAX_BYTES = 16 * 1024 * 1024  # far above any record this program writes


class Invalid(ValueError):
    """What is wrong with a record's content (the record module adds which file and how to fix it)."""


def load(path: Path, what: str) -> Dict[str, Any]:
    """The JSON object in `path`. FileNotFoundError when missing; Invalid when it is not a JSON object."""
    data = read_regular(path, MAX_BYTES, what)
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise Invalid("it is not UTF-8 text") from None
    except RecursionError:
        raise Invalid("it nests too deeply") from None
    except ValueError as exc:
        raise Invalid(f"it is not JSON ({exc})") from None
    return obj(value, "the file")


def dump(path: Path, value: Dict[str, Any], fault_point: str) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, allow_nan=False) + "\n").encode(), fault_point)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def obj(value: Any, name: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid(f"{name} is not an object")
    return value


def field(record: Dict[str, Any], key: str, name: str = "") -> Any:
    if key not in record:
        raise Invalid(f"{name or 'it'} has no {key!r}")
    return record[key]


def integer(value: Any, name: str, low: int = 0, high: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} is {value!r:.40}, not a whole number")
    if not low <= value <= high:
        raise Invalid(f"{name} is {value}, not from {low} to {high}")
    return value


def number(value: Any, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(f"{name} is {value!r:.40}, not a finite number")
    if not low <= value <= high:
        raise Invalid(f"{name} is {value}, not from {low:g} to {high:g}")
    return float(value)


def text(value: Any, name: str, limit: int = 200) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise Invalid(f"{name} is not a string of at most {limit} characters")
    return value


def scored_image(record: Dict[str, Any], at: str, images: int) -> Dict[str, Any]:
    """A test image's place and score as evaluation's mistakes and infer's predictions give them: test_index (one of
    `images`), label and predicted digit, confidence; `at` names the object in messages."""
    return {
        "test_index": integer(field(record, "test_index", at), f"{at}.test_index", 0, images - 1),
        "label": integer(field(record, "label", at), f"{at}.label", 0, 9),
        "predicted": integer(field(record, "predicted", at), f"{at}.predicted", 0, 9),
        "confidence": number(field(record, "confidence", at), f"{at}.confidence", 0, 1),
    }


def sha256(value: Any, name: str) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise Invalid(f"{name} is not a sha256 (64 hex digits)")
    return value


def array(value: Any, name: str, length: int = -1, limit: int = 100_000) -> List[Any]:
    if not isinstance(value, list) or (length >= 0 and len(value) != length) or len(value) > limit:
        size = f"of {length}" if length >= 0 else f"of at most {limit}"
        raise Invalid(f"{name} is not a list {size}")
    return value


def version(record: Dict[str, Any], current: int) -> int:
    """The record's format_version: 1 when absent (the files written before records had one)."""
    found = integer(record.get("format_version", 1), "format_version", 1)
    if found > current:
        raise Invalid(f"its format_version {found} is newer than {current}, the newest this version reads: "
                      f"upgrade mnist-pipeline")
    return found


def problem(path: Path, exc: Exception, fix: str) -> PipelineError:
    """The one error line for a malformed record file."""
    return PipelineError(f"{path} is not valid: {exc}; {fix}")
