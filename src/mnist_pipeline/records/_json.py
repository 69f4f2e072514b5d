"""Strict reading of the JSON records: each file's shape is declared once, as a TypedDict whose fields carry their
ranges (Whole, Number, Text, Pattern below), and pydantic checks a file against it and writes its JSON Schema.

The declarations use annotated_types only, so importing a record module stays light; pydantic is imported when
the first file is checked (every command that reads no JSON record starts without it).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Dict, Optional, Tuple

from annotated_types import Ge, Le, Len, MaxLen

from mnist_pipeline.errors import PipelineError
from mnist_pipeline.storage.atomic import atomic_write_bytes
from mnist_pipeline.storage.files import read_regular

MAX_BYTES = 16 * 1024 * 1024  # far above any record this program writes
MAX_IMAGES = 10_000  # the test split
# every shape's pydantic config: no coercion (True is not 1, "0.5" not a number), no NaN or Infinity
STRICT = {"strict": True, "allow_inf_nan": False}


class Invalid(ValueError):
    """What is wrong with a record's content (the record module adds which file and how to fix it)."""


@dataclass(frozen=True)
class Pattern:
    """A string field's regular expression, and what a matching string is (for the error line)."""

    regex: str
    meaning: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Dict[str, Any]:
        _MEANINGS[self.regex] = self.meaning
        return {**handler(source), "pattern": self.regex}


_MEANINGS: Dict[str, str] = {}


def Whole(low: int, high: int = 2**53) -> Any:  # noqa: N802 - a type, named as one
    """A whole number in [low, high]."""
    return Annotated[int, Ge(low), Le(high)]


def Number(low: float = -math.inf, high: float = math.inf) -> Any:  # noqa: N802
    """A finite number in [low, high]."""
    bounds = ([Ge(low)] if low > -math.inf else []) + ([Le(high)] if high < math.inf else [])
    return Annotated[(float, *bounds)] if bounds else float


def Text(limit: int, *more: Any) -> Any:  # noqa: N802
    """A string of at most `limit` characters (and `more` constraints, such as a Pattern)."""
    return Annotated[(str, MaxLen(limit), *more)]


def List(item: Any, limit: int = 100_000, length: Optional[int] = None) -> Any:  # noqa: N802
    """A list of `item`s: exactly `length` of them, or at most `limit`."""
    return Annotated[typing.List[item], Len(length, length) if length is not None else MaxLen(limit)]


Sha256 = Annotated[str, Pattern("^[0-9a-f]{64}$", "a sha256 (64 hex digits)")]
Fraction = Number(0, 1)


def load(path: Path, what: str) -> Any:
    """The JSON value in `path`. FileNotFoundError when missing; Invalid when it is not JSON."""
    data = read_regular(path, MAX_BYTES, what)
    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constant)
    except UnicodeDecodeError:
        raise Invalid("it is not UTF-8 text") from None
    except RecursionError:
        raise Invalid("it nests too deeply") from None
    except ValueError as exc:
        raise Invalid(f"it is not JSON ({exc})") from None


def dump(path: Path, value: Dict[str, Any], fault_point: str) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, allow_nan=False) + "\n").encode(), fault_point)


def no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def version(record: Any, current: int) -> int:
    """The record's format_version: 1 when absent (the files written before records had one)."""
    found = record.get("format_version", 1) if isinstance(record, dict) else current
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise Invalid(f"format_version is {found!r:.40}, not a whole number from 1")
    if found > current:
        raise Invalid(f"its format_version {found} is newer than {current}, the newest this version reads: "
                      f"upgrade mnist-pipeline")
    return found


def check(shape: Any, value: Any) -> Any:
    """`value` (parsed, or JSON text) as `shape` declares it (ints stay ints, numbers become floats), or Invalid
    naming the first field that does not fit. (A dataclass's strict check takes JSON text: as Python, only an
    instance of the class would do.)"""
    from pydantic import ValidationError

    try:
        if isinstance(value, str):
            return adapter(shape).validate_json(value)
        return adapter(shape).validate_python(value)
    except ValidationError as exc:
        raise Invalid(_problem(exc.errors()[0])) from None


def check_format(shape: Any, record: Any, current: int) -> Any:
    """`record` checked as `shape`, the declaration of format `current`, which a file that does not say its
    format_version is taken to be (the formats that have never changed)."""
    if isinstance(record, dict):
        record = {"format_version": version(record, current), **record}
    return check(shape, record)


@functools.lru_cache(maxsize=None)
def adapter(shape: Any) -> Any:
    """pydantic's validator and schema writer for `shape` (built once per process)."""
    # importing pydantic and building a validator make enough objects to start full garbage collections,
    # which in a process holding torch walk its whole heap: frozen meanwhile, the objects already there are
    # left out of them (unless someone else froze them, for good)
    frozen = gc.get_freeze_count() == 0
    if frozen:
        gc.freeze()
    try:
        from pydantic import TypeAdapter

        return TypeAdapter(shape)
    finally:
        if frozen:
            gc.unfreeze()


def _problem(error: Dict[str, Any]) -> str:
    """One pydantic error in this program's words: which field, its value, what it must be."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    at, value = _where(loc) or "it", error.get("input")
    if kind == "missing":
        return f"{_where(loc[:-1]) or 'it'} has no {loc[-1]!r}"
    if kind == "string_pattern_mismatch":
        return f"{at} {value!r:.40} is not {_MEANINGS.get(ctx['pattern'], 'as expected')}"
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = ctx.get("ge", ctx.get("le"))
        return f"{at} is {value!r:.40}, {'below' if kind == 'greater_than_equal' else 'above'} {bound}"
    if kind == "too_short":
        return f"{at} has {ctx['actual_length']} items, fewer than {ctx['min_length']}"
    if kind == "too_long":
        return f"{at} has {ctx.get('actual_length') or 'too many'} items, more than {ctx['max_length']}"
    if kind == "string_too_long":
        return f"{at} is not a string of at most {ctx['max_length']} characters"
    if kind == "literal_error":
        return f"{at} is {value!r:.40}, not {ctx['expected']}"
    what = _EXPECTED.get(kind.split("_")[0], kind.replace("_", " "))
    return f"{at} is {value!r:.40}, not {what}"


_EXPECTED = {"int": "a whole number", "float": "a finite number", "finite": "a finite number", "string": "a string",
             "dict": "an object", "tuple": "a list", "list": "a list", "bool": "true or false", "none": "null"}


def _where(loc: Tuple[Any, ...]) -> str:
    """checkpoint.epoch, mistakes[3].label, per_class_accuracy[7]: a place in the file as messages name it."""
    text = ""
    for part in loc:
        if isinstance(part, int) or not str(part).isidentifier():
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def problem(path: Path, exc: Exception, fix: str) -> PipelineError:
    """The one error line for a malformed record file."""
    return PipelineError(f"{path} is not valid: {exc}; {fix}")
