"""What each setting may be: one rule each, used on flags and MNIST_* values (cli) and on a
checkpoint's saved train_config (records.checkpoint.read). No torch here: the CLI checks before torch loads.

Each check takes a parsed value and returns it, or raises ValueError saying what it must be.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict

TRAIN_IMAGES = 60000  # a batch cannot be larger than the training split
MAX_SEED = 2**32 - 1  # torch's generators take 64 bits; the data order mixes the epoch into the seed
MAX_EPOCHS = 1000  # one call's worth; more is a typo, not a plan
# of each epoch's examples, the most drawn from accepted feedback: MNIST stays at least half of what trains
MAX_FEEDBACK_SHARE = 0.5


ALIAS = re.compile(r"[a-z][a-z0-9-]{0,39}")  # a file name on every file system: no slash, no dot


def alias(value: Any) -> str:
    """A version alias's name (production, staging, ...)."""
    if not isinstance(value, str) or not ALIAS.fullmatch(value):
        raise ValueError(f"{str(value)[:60]!r} is not an alias name: a lowercase letter, then lowercase letters, "
                         f"digits or '-' (at most 40), e.g. production")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def positive(value: Any) -> int:
    if _integer(value) < 1:
        raise ValueError("must be at least 1")
    return value


def non_negative_int(value: Any) -> int:
    if _integer(value) < 0:
        raise ValueError("must be 0 or more")
    return value


def seed(value: Any) -> int:
    if not 0 <= _integer(value) <= MAX_SEED:
        raise ValueError(f"must be from 0 to {MAX_SEED}")
    return value


def epochs(value: Any) -> int:
    if not 1 <= _integer(value) <= MAX_EPOCHS:
        raise ValueError(f"must be from 1 to {MAX_EPOCHS}")
    return value


def batch_size(value: Any) -> int:
    if not 1 <= _integer(value) <= TRAIN_IMAGES:
        raise ValueError(f"must be from 1 to {TRAIN_IMAGES} (the training images)")
    return value


def positive_number(value: Any) -> float:
    if not _number(value) > 0:
        raise ValueError("must be a finite number more than 0")
    return float(value)


learning_rate = positive_number  # any step size above 0


def non_negative(value: Any) -> float:
    if not _number(value) >= 0:
        raise ValueError("must be a finite number, 0 or more")
    return float(value)


def fraction(value: Any) -> float:
    if not 0 <= _number(value) <= 1:
        raise ValueError("must be a fraction from 0 to 1")
    return float(value)


def feedback_share(value: Any) -> float:
    if not 0 <= _number(value) <= MAX_FEEDBACK_SHARE:
        raise ValueError(f"must be a fraction from 0 (no feedback) to {MAX_FEEDBACK_SHARE}")
    return float(value)


def below_one(value: Any) -> float:
    if not 0 <= _number(value) < 1:
        raise ValueError("must be from 0 to less than 1")
    return float(value)


# the saved hyper-parameters (config.Recipe's fields): a checkpoint's are checked at load
TRAIN_CONFIG: Dict[str, Callable[[Any], Any]] = {
    "seed": seed,
    "batch_size": batch_size,
    "peak_lr": learning_rate,
    "momentum": below_one,
    "weight_decay": non_negative,
    "warmup_fraction": below_one,
    "epoch_decay": fraction,
    "max_steps": non_negative_int,
}


def check_train_config(config: Dict[str, Any]) -> None:
    """ValueError naming the first field of a saved train_config that is missing or out of range."""
    for key, check in TRAIN_CONFIG.items():
        if key not in config:
            raise ValueError(f"its train_config has no '{key}'")
        try:
            check(config[key])
        except ValueError as exc:
            raise ValueError(f"its train_config has {key}={config[key]!r}, which {_must(exc)}") from None


def _must(exc: ValueError) -> str:
    text = str(exc)
    return text if text.startswith("must") else f"is bad ({text})"
