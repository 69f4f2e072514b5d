"""Flag and MNIST_* values from their text: each returns the value, or raises ValueError saying what it
must be (argparse and settings.resolve put that in the usage error). The rules themselves are in
limits.py, shared with the checks of a checkpoint's saved settings. No torch here.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Callable, Tuple, Union

from mnist_pipeline import limits


def choice(*options: str) -> Callable[[str], str]:
    """The parser of a setting that takes one of `options`."""
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be {', '.join(options[:-1])} or {options[-1]}")
        return text
    return parse


device = choice("auto", "cpu", "cuda")
runtime = choice("auto", "onnx", "torch")
promote = choice("auto", "never", "always")
export = choice("auto", "never")


def positive_int(text: str) -> int:
    return limits.positive(int(text))


def non_negative_int(text: str) -> int:
    return limits.non_negative_int(int(text))


def non_negative_float(text: str) -> float:
    return limits.non_negative(float(text))


def positive_float(text: str) -> float:
    return limits.positive_number(float(text))


def learning_rate(text: str) -> float:
    return limits.learning_rate(float(text))


def fraction(text: str) -> float:
    return limits.fraction(float(text))


def feedback_share(text: str) -> float:
    return limits.feedback_share(float(text))


def seed(text: str) -> int:
    return limits.seed(int(text))


def epochs(text: str) -> int:
    return limits.epochs(int(text))


def batch_size(text: str) -> int:
    return limits.batch_size(int(text))


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def on_off(text: str) -> bool:
    """A switch given a value (--feedback on): the words boolean takes."""
    return boolean(text) if text.strip() else _refuse_empty()


def _refuse_empty() -> bool:
    raise ValueError("must be on or off")


def addresses(text: str) -> Tuple[str, ...]:
    """Comma-separated IP addresses (empty: none)."""
    import ipaddress

    found = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            found.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise ValueError(f"{part[:60]!r} is not an IP address (e.g. 10.0.0.2, comma-separated)") from None
    return tuple(found)


def host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise ValueError("must be a host name or IP address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    return text


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port from 1 to 65535 (0: any free one)")
    return value


def root(text: str) -> Path:
    if not text.strip():
        raise ValueError("must be a folder (empty would mean the current one)")
    return Path(text)


def mirror(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a folder or an http(s) URL")
    if "://" in text:
        try:
            parts = urllib.parse.urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"is not a usable URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("must be a folder or an http(s) URL")
        if not parts.hostname or any(c.isspace() or ord(c) < 32 for c in text):
            raise ValueError("is not a usable URL (no host name, or a space in it)")
    return text


def alias(text: str) -> str:
    return limits.alias(text)


def model(text: str) -> Union[str, int]:
    """A version number (pinned) or an alias name (followed)."""
    if text.isdigit():
        return limits.positive(int(text))
    try:
        return limits.alias(text)
    except ValueError:
        raise ValueError(f"{text[:60]!r} is neither a version number nor an alias name (e.g. production, 3)") from None
