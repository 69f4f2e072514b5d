"""Every setting, once: its flag, MNIST_* twin, default, check and help (SETTINGS), which commands take it
(COMMAND_SETTINGS), and the frozen config each stage receives, built at the CLI edge.

Flags win over MNIST_* variables, which win over the defaults; argparse type-checks a variable's
value with the flag's own check. docs/settings.md and the Compose file's environment lists are
checked against this table (tests/test_cli.py). No torch here: `--help` and usage errors answer
before torch loads.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple, Union

from mnist_pipeline import limits

DEFAULT_ROOT = Path("mnist-volume")  # beside where you run it, named after the Compose volume
NPROC_PER_NODE = 1  # train's processes: one, no torchrun

# defaults that several stages share (None, where a field has it, means "not set")
DEVICE = "auto"  # CUDA when torch sees a GPU
WAIT_S = 30.0  # for the input, longer while its producer still runs
GRACE_S = 5.0  # see storage.waiting.wait_for
THRESHOLD = 0.95  # the gate: accuracy a checkpoint must exceed to be used
PRODUCTION = "production"  # the alias serve and predict follow, and evaluate promotes to


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters. Saved in the checkpoint; a resumed run keeps the saved ones."""

    seed: int = 0
    # the same on every device: 256 and 512 lose accuracy in one epoch (docs/performance.md); a GPU
    # makes 128 fast by replaying each step's kernels as one CUDA graph instead
    batch_size: int = 128
    peak_lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.2  # of each epoch, rising linearly from 0 to the peak
    epoch_decay: float = 0.5  # each later epoch peaks at this fraction of the previous one
    max_steps: int = 0  # batches per epoch, 0: the whole training set (a limit keeps tests fast)

    def steps_per_epoch(self, samples: int) -> int:
        """The last partial batch is dropped; the learning-rate cycle spans these steps."""
        full = samples // self.batch_size
        return min(full, self.max_steps) if self.max_steps else full


@dataclass(frozen=True)
class TrainConfig:
    root: Path
    mirror: Optional[str] = None
    epochs: int = 1
    recipe: Recipe = Recipe()
    fresh: bool = False
    device: str = DEVICE
    threads: Optional[int] = None
    save_every_s: float = 60.0  # progress saved this often mid-epoch, so a kill -9 loses at most this much; 0: never
    progress_every_s: float = 10.0  # plain progress lines when stderr is no terminal
    explicit: FrozenSet[str] = frozenset()  # the Recipe fields the user set (a resumed run names those it ignores)


@dataclass(frozen=True)
class EvaluateConfig:
    root: Path
    mirror: Optional[str] = None
    wait_s: float = WAIT_S
    grace_s: float = GRACE_S
    device: str = DEVICE
    threads: Optional[int] = None
    started: float = dataclasses.field(default_factory=time.monotonic)  # --grace counts from the command's start
    threshold: float = THRESHOLD  # what a new version must pass to become production by itself
    promote: str = "auto"  # auto: when it passes and is at least as accurate as production; never; always
    keep: int = 20  # versions no alias points to kept after registering one (the newest)


@dataclass(frozen=True)
class InferConfig:
    root: Path
    mirror: Optional[str] = None
    wait_s: float = WAIT_S
    grace_s: float = GRACE_S
    threshold: float = THRESHOLD
    count: int = 5
    seed: Optional[int] = None  # None: a different pick every run
    device: str = DEVICE
    threads: Optional[int] = None
    started: float = dataclasses.field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PredictConfig:
    root: Path
    images: Tuple[Path, ...]
    threshold: float = THRESHOLD
    model: Union[str, int] = PRODUCTION  # an alias, or a version number (pinned)
    device: str = DEVICE
    threads: Optional[int] = None


@dataclass(frozen=True)
class ServeConfig:
    root: Path
    threshold: float = THRESHOLD
    model: Union[str, int] = PRODUCTION  # the alias followed, or a version number (pinned)
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = DEVICE
    threads: Optional[int] = None  # None: one per request (serve.py)
    # what a client may hold (serve.py's docstring): connections at once, the first to go when full
    # being the one idle longest; images decoded at once (None: the CPUs this process may use) and
    # requests waiting for that (more: 503); seconds a request's head or body may stall, and an idle
    # connection may stay open after an answer
    max_connections: int = 1000
    max_decodes: Optional[int] = None
    max_waiting: int = 64
    read_timeout: float = 10.0
    keep_alive: float = 5.0


def default_of(config: type, name: str) -> Any:
    """The default of field `name` of dataclass `config` (the settings below take theirs from there)."""
    for field in dataclasses.fields(config):
        if field.name == name:
            if field.default is dataclasses.MISSING:
                raise TypeError(f"{config.__name__}.{name} has no default")
            return field.default
    raise TypeError(f"{config.__name__} has no field {name!r}")


# --- the table -------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    return limits.positive(int(text))


def _non_negative_int(text: str) -> int:
    return limits.non_negative_int(int(text))


def _non_negative_float(text: str) -> float:
    return limits.non_negative(float(text))


def _positive_float(text: str) -> float:
    return limits.positive_number(float(text))


def _learning_rate(text: str) -> float:
    return limits.learning_rate(float(text))


def _fraction(text: str) -> float:
    return limits.fraction(float(text))


def _seed(text: str) -> int:
    return limits.seed(int(text))


def _epochs(text: str) -> int:
    return limits.epochs(int(text))


def _batch_size(text: str) -> int:
    return limits.batch_size(int(text))


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _device(text: str) -> str:
    if text not in ("auto", "cpu", "cuda"):
        raise ValueError("must be auto, cpu or cuda")
    return text


def _host(text: str) -> str:
    if not text.strip() or any(c.isspace() for c in text):
        raise ValueError("must be a host name or IP address to listen on, e.g. 127.0.0.1 or 0.0.0.0")
    return text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port from 1 to 65535 (0: any free one)")
    return value


def _root(text: str) -> Path:
    if not text.strip():
        raise ValueError("must be a folder (empty would mean the current one)")
    return Path(text)


def _mirror(text: str) -> str:
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


def _promote(text: str) -> str:
    if text not in ("auto", "never", "always"):
        raise ValueError("must be auto, never or always")
    return text


def _alias(text: str) -> str:
    return limits.alias(text)


def _model(text: str) -> Union[str, int]:
    """A version number (pinned) or an alias name (followed)."""
    if text.isdigit():
        return limits.positive(int(text))
    try:
        return limits.alias(text)
    except ValueError:
        raise ValueError(f"{text[:60]!r} is neither a version number nor an alias name (e.g. production, 3)") from None


@dataclass(frozen=True)
class Setting:
    """One option: its flag, its MNIST_* twin, how to read it, its default."""

    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: Optional[str] = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def env(self) -> str:
        return "MNIST_" + self.dest.upper()


_ALL = [
    Setting("--root", _root, DEFAULT_ROOT, "volume root holding data/, model/, results/ (containers: /opt/mount)",
            "DIR"),
    Setting("--mirror", _mirror, None, "MNIST source: a folder or http(s) base URL with the four files (.gz or "
            "raw); unset: the public mirrors", "DIR_OR_URL"),
    Setting("--device", _device, DEVICE, "auto (CUDA when present), cpu or cuda", "DEVICE"),
    Setting("--threads", _positive_int, None, "CPU threads (default: the CPUs this process may use)", "N"),
    Setting("--seed", _seed, None, f"train: seed for weights and data order (default {default_of(Recipe, 'seed')}, "
            "kept in the checkpoint); infer: seed for the image pick (default: a new pick every run)", "N"),
    Setting("--wait", _non_negative_float, WAIT_S,
            "seconds to wait for the input (longer while its producer is still running)", "SECONDS"),
    Setting("--grace", _non_negative_float, GRACE_S,
            "seconds after start during which work already done is not used yet: a train started at the same "
            "time (`docker compose up`) takes its lock first", "SECONDS"),
    Setting("--threshold", _fraction, THRESHOLD, "accuracy the model must exceed", "FRACTION"),
    Setting("--epochs", _epochs, default_of(TrainConfig, "epochs"), "epochs to train on top of the checkpoint", "N"),
    Setting("--batch-size", _batch_size, default_of(Recipe, "batch_size"), "training batch size", "N"),
    Setting("--lr", _learning_rate, default_of(Recipe, "peak_lr"), "peak learning rate of each epoch's cycle", "LR"),
    Setting("--fresh", boolean, default_of(TrainConfig, "fresh"),
            "move an existing checkpoint aside and start from scratch"),
    Setting("--max-steps", _non_negative_int, default_of(Recipe, "max_steps"),
            "batches per epoch, the learning-rate cycle included (0: the whole training set); for quick trials", "N"),
    Setting("--save-every", _non_negative_float, default_of(TrainConfig, "save_every_s"),
            "seconds between progress saves within an epoch, so a kill -9 loses at most that (0: only on SIGTERM)",
            "SECONDS"),
    Setting("--nproc-per-node", _positive_int, NPROC_PER_NODE,
            "processes training together (data parallel) through torchrun's elastic agent; ignored inside torchrun",
            "N"),
    Setting("--promote", _promote, default_of(EvaluateConfig, "promote"),
            "move the production alias to the new version: auto (when it passes --threshold and is at least as "
            "accurate as production), never or always", "auto|never|always"),
    Setting("--keep", _positive_int, default_of(EvaluateConfig, "keep"),
            "versions no alias points to that are kept (the newest); older ones are removed", "K"),
    Setting("--alias", _alias, PRODUCTION, "the alias to move", "NAME"),
    Setting("--model", _model, PRODUCTION, "the model used: an alias (followed as it moves) or a version number "
            "(pinned)", "ALIAS|N"),
    Setting("--count", _positive_int, default_of(InferConfig, "count"), "how many random test images to label", "N"),
    Setting("--host", _host, default_of(ServeConfig, "host"), "address to listen on (the image: 0.0.0.0)", "HOST"),
    Setting("--port", _port, default_of(ServeConfig, "port"), "TCP port to listen on (0: any free one, logged)",
            "PORT"),
    Setting("--max-connections", _positive_int, default_of(ServeConfig, "max_connections"),
            "connections open at once; a new one closes the one idle longest", "N"),
    Setting("--max-decodes", _positive_int, default_of(ServeConfig, "max_decodes"),
            "images decoded at once (default: the CPUs this process may use)", "N"),
    Setting("--max-waiting", _non_negative_int, default_of(ServeConfig, "max_waiting"),
            "requests waiting for a decode; more get 503 with Retry-After", "N"),
    Setting("--read-timeout", _positive_float, default_of(ServeConfig, "read_timeout"),
            "seconds a request's head or body may stall before the connection is closed (408)", "SECONDS"),
    Setting("--keep-alive", _positive_float, default_of(ServeConfig, "keep_alive"),
            "seconds an idle connection stays open after an answer", "SECONDS"),
]
SETTINGS: Dict[str, Setting] = {s.dest: s for s in _ALL}

_COMMON = ("root", "mirror", "device", "threads")
_TRAIN = ("epochs", "batch_size", "lr", "fresh", "max_steps", "save_every")
_INFER = ("wait", "grace", "threshold", "count")
_PREDICT = ("root", "device", "threads", "threshold", "model")
_EVALUATE = ("wait", "grace", "threshold", "promote", "keep")
# which settings each command takes, in --help's order
COMMAND_SETTINGS: Dict[str, Tuple[str, ...]] = {
    "train": _COMMON + ("seed",) + _TRAIN + ("nproc_per_node",),  # (pipeline: no torchrun)
    "evaluate": _COMMON + _EVALUATE,  # no --seed: scoring draws nothing at random
    "infer": _COMMON + ("seed",) + _INFER,
    "pipeline": _COMMON + ("seed",) + _TRAIN + _INFER + ("promote", "keep"),
    "report": ("root", "mirror"),
    "predict": _PREDICT,
    "models": ("root", "keep"),
    "promote": ("root", "alias"),
    "rollback": ("root", "alias"),
    "serve": _PREDICT + ("host", "port", "max_connections", "max_decodes", "max_waiting", "read_timeout",
                         "keep_alive"),
}


def resolve(command: str, flags: Mapping[str, Any], env: Mapping[str, str]) -> Tuple[Dict[str, Any], FrozenSet[str]]:
    """Each setting of `command`: the flag if given (not None), else its MNIST_* variable, else the default;
    and the names the user set. ValueError names the variable whose value is bad."""
    values, explicit = {}, set()
    for name in COMMAND_SETTINGS[command]:
        s = SETTINGS[name]
        value = flags.get(name)
        if value is None and s.env in env:
            try:
                value = s.parse(env[s.env])
            except ValueError as exc:
                raise ValueError(f"{s.env}={env[s.env]!r}: {why(exc)}; fix or unset it, or pass {s.flag}") from None
        if value is not None:
            explicit.add(name)
        values[name] = s.default if value is None else value
    return values, frozenset(explicit)


def why(exc: ValueError) -> str:
    text = str(exc)
    return "not a number" if text.startswith(("invalid literal", "could not convert")) else text


def recipe(values: Mapping[str, Any]) -> Recipe:
    # --seed is unset (None) by default: infer then picks anew each run, and train uses the recipe's seed
    seed = default_of(Recipe, "seed") if values["seed"] is None else values["seed"]
    return Recipe(seed=seed, batch_size=values["batch_size"], peak_lr=values["lr"], max_steps=values["max_steps"])


# the Recipe field each train setting sets
RECIPE_FIELDS = {"seed": "seed", "batch_size": "batch_size", "lr": "peak_lr", "max_steps": "max_steps"}
