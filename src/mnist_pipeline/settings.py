"""Every setting, once: its flag, MNIST_* twin, default, check (parse.py) and help (SETTINGS), which
commands take it (COMMAND_SETTINGS), and the frozen config each stage receives, built at the CLI edge.

Flags win over MNIST_* variables, which win over the defaults; argparse type-checks a variable's
value with the flag's own check. docs/settings.md and the Compose file's environment lists are
checked against this table (tests/test_cli.py). No torch here: `--help` and usage errors answer
before torch loads.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Optional, Tuple, Union

from mnist_pipeline import parse

DEFAULT_ROOT = Path("mnist-volume")  # beside where you run it, named after the Compose volume
NPROC_PER_NODE = 1  # train's processes: one, no torchrun

# defaults that several stages share (None, where a field has it, means "not set")
DEVICE = "auto"  # CUDA when torch sees a GPU
WAIT_S = 30.0  # for the input, longer while its producer still runs
GRACE_S = 5.0  # see storage.waiting.wait_for
THRESHOLD = 0.95  # the gate: accuracy a checkpoint must exceed to be used
PRODUCTION = "production"  # the alias serve and predict follow, and evaluate promotes to
EXPORT = "auto"  # evaluate exports the version it registers where onnxruntime imports
FOLLOW = False  # export: the versions there are, once (the Compose export service follows)
JSON = False  # predict and models print text


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
    # of each epoch's examples, the share drawn from the accepted train samples of feedback/ (train/mix.py)
    feedback_share: float = 0.05
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
    # with held-out feedback, auto lets MNIST's accuracy fall this many percentage points below production's
    margin: float = 0.1
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
    threads: Optional[int] = None  # None: one per request (serve/runtimes.py)
    runtime: str = "auto"  # onnx where onnxruntime imports and the version is exported, else torch (serve/runtimes.py)
    # what a client may hold (serve/__init__.py's docstring): requests in progress in a worker (granian's
    # backpressure; more wait in the listen queue); images decoded at once (None: the CPUs this process may
    # use) and requests waiting for that (more: 503); seconds a request's head or body may stall, or an
    # idle connection stay open
    max_requests: int = 256
    max_decodes: Optional[int] = None
    max_waiting: int = 64
    read_timeout: float = 10.0
    workers: Optional[int] = None  # processes answering on the one port (None: one per CPU, at most 4)
    access_log: bool = False  # one line per request on stderr: client, method, path, status, time, request id
    # POST /feedback (docs/feedback.md): off unless asked; each client's samples a minute (a token bucket in
    # each worker); the pending samples kept at most, in count and bytes; the proxies whose X-Forwarded-For
    # names the client
    feedback: bool = False
    feedback_rate: int = 6
    feedback_max_pending: int = 5000
    feedback_max_bytes: int = 64 * 1024 * 1024
    trusted_proxy: Optional[Tuple[str, ...]] = None  # None: no proxy is trusted


def default_of(config: type, name: str) -> Any:
    """The default of field `name` of dataclass `config` (the settings below take theirs from there)."""
    for field in dataclasses.fields(config):
        if field.name == name:
            if field.default is dataclasses.MISSING:
                raise TypeError(f"{config.__name__}.{name} has no default")
            return field.default
    raise TypeError(f"{config.__name__} has no field {name!r}")


# --- the table -------------------------------------------------------------------------------------


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
    Setting("--root", parse.root, DEFAULT_ROOT, "volume root holding data/, model/, results/ (containers: /opt/mount)",
            "DIR"),
    Setting("--mirror", parse.mirror, None, "MNIST source: a folder or http(s) base URL with the four files (.gz or "
            "raw); unset: the public mirrors", "DIR_OR_URL"),
    Setting("--device", parse.device, DEVICE, "auto (CUDA when present), cpu or cuda", "DEVICE"),
    Setting("--threads", parse.positive_int, None, "CPU threads (default: the CPUs this process may use)", "N"),
    Setting("--seed", parse.seed, None,
            f"train: seed for weights and data order (default {default_of(Recipe, 'seed')}, kept in the "
            "checkpoint); infer: seed for the image pick (default: a new pick every run)", "N"),
    Setting("--wait", parse.non_negative_float, WAIT_S,
            "seconds to wait for the input (longer while its producer is still running)", "SECONDS"),
    Setting("--grace", parse.non_negative_float, GRACE_S,
            "seconds after start during which work already done is not used yet: a train started at the same "
            "time (`docker compose up`) takes its lock first", "SECONDS"),
    Setting("--threshold", parse.fraction, THRESHOLD, "accuracy the model must exceed", "FRACTION"),
    Setting("--epochs", parse.epochs, default_of(TrainConfig, "epochs"), "epochs to train on top of the checkpoint",
            "N"),
    Setting("--batch-size", parse.batch_size, default_of(Recipe, "batch_size"), "training batch size", "N"),
    Setting("--lr", parse.learning_rate, default_of(Recipe, "peak_lr"), "peak learning rate of each epoch's cycle",
            "LR"),
    Setting("--fresh", parse.boolean, default_of(TrainConfig, "fresh"),
            "move an existing checkpoint aside and start from scratch"),
    Setting("--max-steps", parse.non_negative_int, default_of(Recipe, "max_steps"),
            "batches per epoch, the learning-rate cycle included (0: the whole training set); for quick trials", "N"),
    Setting("--save-every", parse.non_negative_float, default_of(TrainConfig, "save_every_s"),
            "seconds between progress saves within an epoch, so a kill -9 loses at most that (0: only on SIGTERM)",
            "SECONDS"),
    Setting("--feedback-share", parse.feedback_share, default_of(TrainConfig, "feedback_share"),
            "the fraction of each epoch's examples drawn from the accepted train samples of feedback/, the set "
            "frozen for the epoch (0: none; at most 0.5)", "FRACTION"),
    Setting("--nproc-per-node", parse.positive_int, NPROC_PER_NODE,
            "processes training together (data parallel) through torchrun's elastic agent; ignored inside torchrun",
            "N"),
    Setting("--promote", parse.promote, default_of(EvaluateConfig, "promote"),
            "move the production alias to the new version: auto (when it passes --threshold and is at least as "
            "accurate as production), never or always", "auto|never|always"),
    Setting("--promote-margin", parse.non_negative_float, default_of(EvaluateConfig, "margin"),
            "with accepted held-out feedback: percentage points of MNIST test accuracy a new version may lose against "
            "production and still replace it under --promote auto, if it reads the held-out feedback at least as "
            "well", "POINTS"),
    Setting("--export", parse.export, EXPORT,
            "after evaluating: export the version to ONNX where onnxruntime imports (auto), or leave that to "
            "`mnist export` (never)", "auto|never"),
    Setting("--keep", parse.positive_int, default_of(EvaluateConfig, "keep"),
            "versions no alias points to that are kept (the newest); older ones are removed", "K"),
    Setting("--alias", parse.alias, PRODUCTION, "the alias to move", "NAME"),
    Setting("--model", parse.model, PRODUCTION, "the model used: an alias (followed as it moves) or a version number "
            "(pinned)", "ALIAS|N"),
    Setting("--count", parse.positive_int, default_of(InferConfig, "count"), "how many random test images to label",
            "N"),
    Setting("--runtime", parse.runtime, default_of(ServeConfig, "runtime"),
            "what answers: onnx (the version's exported model, no torch), torch (its checkpoint), or auto (onnx "
            "where onnxruntime imports and the version is exported, else torch)", "auto|onnx|torch"),
    Setting("--host", parse.host, default_of(ServeConfig, "host"), "address to listen on (the image: 0.0.0.0)", "HOST"),
    Setting("--port", parse.port, default_of(ServeConfig, "port"), "TCP port to listen on (0: any free one, logged)",
            "PORT"),
    Setting("--workers", parse.positive_int, default_of(ServeConfig, "workers"),
            "processes answering on the one port, each following the volume and each held to the limits below "
            "(default: one per CPU this process may use, at most 4)", "N"),
    Setting("--max-requests", parse.positive_int, default_of(ServeConfig, "max_requests"),
            "requests in progress at once in each worker; more wait in the listen queue", "N"),
    Setting("--max-decodes", parse.positive_int, default_of(ServeConfig, "max_decodes"),
            "images of larger requests decoded at once in the threadpool (a request of small files, 320x320 "
            "pixels in all, is decoded on the event loop; default: the CPUs this process may use)", "N"),
    Setting("--max-waiting", parse.non_negative_int, default_of(ServeConfig, "max_waiting"),
            "requests waiting for a decode; more get 503 with Retry-After", "N"),
    Setting("--read-timeout", parse.positive_float, default_of(ServeConfig, "read_timeout"),
            "seconds a request's head or body may stall, or an idle connection stay open, before it is closed "
            "(a stalled body: 408)", "SECONDS"),
    Setting("--access-log", parse.boolean, default_of(ServeConfig, "access_log"),
            "log one line per request: client, method, path, status, milliseconds, request id (X-Request-ID)"),
    Setting("--feedback", parse.on_off, default_of(ServeConfig, "feedback"),
            "accept POST /feedback: labelled drawings kept in feedback/ for review (the volume must be writable)",
            "on|off"),
    Setting("--feedback-rate", parse.positive_int, default_of(ServeConfig, "feedback_rate"),
            "feedback samples a client address may send a minute (each worker counts its own); more get 429", "N"),
    Setting("--feedback-max-pending", parse.positive_int, default_of(ServeConfig, "feedback_max_pending"),
            "samples waiting for review at most; beyond, POST /feedback answers 507", "N"),
    Setting("--feedback-max-bytes", parse.positive_int, default_of(ServeConfig, "feedback_max_bytes"),
            "bytes of the samples waiting for review at most; beyond, POST /feedback answers 507", "BYTES"),
    Setting("--trusted-proxy", parse.addresses, default_of(ServeConfig, "trusted_proxy"),
            "the reverse proxies' IP addresses, comma-separated, whose X-Forwarded-For names the client for "
            "--feedback-rate (unset: the peer's address, X-Forwarded-For ignored)", "ADDR,..."),
    Setting("--follow", parse.boolean, FOLLOW,
            "keep exporting each new version until SIGTERM or SIGINT (the Compose export service)"),
    Setting("--json", parse.boolean, JSON,
            "print JSON instead of text (models: its rows; predict: file, digit, confidence, probabilities)"),
]
SETTINGS: Dict[str, Setting] = {s.dest: s for s in _ALL}

_COMMON = ("root", "mirror", "device", "threads")
_TRAIN = ("epochs", "batch_size", "lr", "fresh", "max_steps", "save_every", "feedback_share")
_INFER = ("wait", "grace", "threshold", "count")
_PREDICT = ("root", "device", "threads", "threshold", "model")
_EVALUATE = ("wait", "grace", "threshold", "promote", "promote_margin", "keep", "export")
# which settings each command takes, in --help's order
COMMAND_SETTINGS: Dict[str, Tuple[str, ...]] = {
    "train": _COMMON + ("seed",) + _TRAIN + ("nproc_per_node",),  # (pipeline: no torchrun)
    "evaluate": _COMMON + _EVALUATE,  # no --seed: scoring draws nothing at random
    "infer": _COMMON + ("seed",) + _INFER,
    "pipeline": _COMMON + ("seed",) + _TRAIN + _INFER + ("promote", "promote_margin", "keep", "export"),
    "report": ("root", "mirror"),
    "predict": _PREDICT + ("json",),
    "models": ("root", "keep", "json"),
    "promote": ("root", "alias"),
    "rollback": ("root", "alias"),
    # export runs on the CPU: onnxruntime's answers are checked against torch's there
    "export": ("root", "mirror", "threads", "follow"),
    "serve": _PREDICT + ("runtime", "host", "port", "workers", "max_requests", "max_decodes", "max_waiting",
                         "read_timeout", "access_log", "feedback", "feedback_rate", "feedback_max_pending",
                         "feedback_max_bytes", "trusted_proxy"),
    "feedback": ("root",),
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
