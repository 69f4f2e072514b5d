"""A version as an ONNX model, checked against torch before it is written: model/versions/<N>/mnist_cnn.onnx.

The file is one ONNX model (the weights inside; opset OPSET, ONNX IR version 10) that takes what every
service takes, uint8 images, and answers what predict answers, probabilities:

  images uint8 [batch, 28, 28] -> the network's normalize() -> the network -> softmax
  -> probabilities float32 [batch, 10]

with the model's own mean and std, so a client needs no constants. torch's own exporter writes it
(torch.onnx.export, dynamo=True, which needs the onnx and onnxscript packages: docs/export.md);
metadata_props name the version and the sha256 of its checkpoint (a reader serves the file only for that
checkpoint). The parity check runs it with onnxruntime over the 10,000 test images: the same digit for
every image and probabilities within TOLERANCE of model.predict's, or no file is written.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from mnist_pipeline import data, faults, model
from mnist_pipeline.contract import ONNX_FORMAT_VERSION, ONNX_INPUT, ONNX_OUTPUT, onnx_session
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.records import versions
from mnist_pipeline.storage.atomic import atomic_write_bytes
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

# torch 2.13's default, named so that a torch upgrade does not change what the file needs of its reader
OPSET = 20
BATCH = "batch"  # the name of the dynamic batch axis
TOLERANCE = 1e-4  # the most any probability may differ from torch's
PARITY_BATCH = 250  # the images onnxruntime scores at a time: larger batches run slower on the CPU


class Unusable(PipelineError):
    """The version's checkpoint does not load or does not build its network: there is nothing to export."""


class ParityFailed(PipelineError):
    """The ONNX model does not answer as torch does."""


@dataclass(frozen=True)
class Parity:
    """How the ONNX model's answers compare with torch's.

    An image whose two likeliest digits torch scores within TOLERANCE of each other is a tie: either
    answer is right within the noise of float arithmetic, which orders the sums differently in each
    runtime, so one answered the other way is counted apart (ties), not as a disagreement. A barely
    trained network has such images.
    """

    images: int
    disagreements: int  # images whose digit differs, ties aside
    ties: int  # images whose digit differs where torch's two likeliest were within TOLERANCE
    max_difference: float  # the largest |probability difference|

    @property
    def passed(self) -> bool:
        return self.disagreements == 0 and self.max_difference <= TOLERANCE  # (a NaN fails)

    def describe(self) -> str:
        digits = "the same digits" if not self.disagreements else f"{self.disagreements} get another digit"
        ties = f" ({self.ties} near-ties, within {TOLERANCE:g}, answered the other way)" if self.ties else ""
        return f"{self.images} test images: {digits}{ties}, max |probability difference| {self.max_difference:.2g}"


@dataclass(frozen=True)
class Exported:
    number: int
    path: Path
    parity: Parity


def unavailable() -> Optional[str]:
    """None when onnxruntime (the parity check) and onnx and onnxscript (torch's exporter) import here; else
    why not."""
    try:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime does not import here ({first_line(exc)})"
    return _exporter_missing()


def _exporter_missing() -> Optional[str]:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return f"onnx and onnxscript, which torch's ONNX exporter needs, do not import here ({first_line(exc)})"
    return None


def export_version(volume: Volume, number: int, mirror: Optional[str], threads: int,
                   known: Tuple[str, Optional[torch.Tensor]] = ("", None)) -> Exported:
    """Write version `number`'s ONNX model once it passed the parity check, atomically. Unusable when the
    version does not load, ParityFailed when the model does not answer as torch does (no file written).
    `known`: a checkpoint's sha256 and torch's probabilities for the test images on the CPU, which evaluate
    has just computed: the check compares with those, not a second pass, when they are this version's."""
    try:
        version, saved, _ = versions.load(volume, number)
        network = saved.build_model().eval()
    except versions.NoSuchVersion:
        raise
    except PipelineError as exc:
        raise Unusable(str(exc)) from None
    metadata = {"mnist.format_version": ONNX_FORMAT_VERSION, "mnist.checkpoint_sha256": version.sha256,
                "mnist.epoch": str(version.epoch), "mnist.architecture": saved.state.architecture,
                "mnist.version": str(number)}
    encoded = to_onnx(network, metadata)
    expected = known[1] if known[0] == version.sha256 else None
    parity = check(encoded, network, data.load_split(volume.data_dir, "test", mirror).images, threads, expected)
    if not parity.passed:
        raise ParityFailed(f"version {number}'s ONNX model does not answer as its checkpoint does "
                           f"({parity.describe()}; at most {TOLERANCE:g} allowed): no file written")
    path = volume.exported(number)
    with versions.registry_lock(volume, f"write version {number}'s ONNX model"):  # prune waits: no folder re-made
        try:
            current = versions.read(volume, number)
        except FileNotFoundError:
            raise versions.NoSuchVersion(f"version {number} was removed while it was exported: nothing written") \
                from None
        if current.sha256 != version.sha256:
            raise PipelineError(f"version {number} changed while it was exported: nothing written; export it again")
        atomic_write_bytes(path, encoded, fault_point="onnx-before-rename")
    return Exported(number, path, parity)


# --- the graph ---------------------------------------------------------------------------------------


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Answering(nn.Module):
    """uint8 images [batch, 28, 28] -> probabilities [batch, 10]: what model.predict computes for a batch
    (the network's own normalisation, the network, a softmax), as the one module the exporter traces."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(self.network.normalize(images)).float(), dim=1)


def to_onnx(network: nn.Module, metadata: Dict[str, str]) -> bytes:
    """`network` (eval mode) with its input normalisation and a softmax, as an ONNX model's bytes, written by
    torch's exporter (torch.onnx.export with dynamo=True: torch.export traces forward(), whatever its layers
    and their order). PipelineError where the exporter or its packages fail."""
    if not callable(getattr(network, "normalize", None)):
        raise PipelineError(f"{type(network).__name__} has no normalize(images), which the export needs")
    why = _exporter_missing()
    if why:
        raise PipelineError(why)
    import onnx
    import torch.export
    import torch.onnx

    traced = _Answering(_perturbed(network) if faults.broken("export-weights") else network).eval()
    example = torch.zeros(2, model.IMAGE_SIZE, model.IMAGE_SIZE, dtype=torch.uint8)  # (batch 1 would be fixed)
    try:
        with _quiet():
            program = torch.onnx.export(traced, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], external_data=False,
                                        dynamic_shapes={"images": {0: torch.export.Dim(BATCH)}})
            proto = program.model_proto
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types (torch.export's, onnxscript's, ...)
        cause = exc  # the exporter wraps what went wrong in a step's error, whose text is advice on filing bugs
        while cause.__cause__ is not None:
            cause = cause.__cause__
        text = _ANSI.sub("", first_line(cause))  # (its own messages are coloured for a terminal)
        raise PipelineError(f"torch's ONNX exporter cannot export {type(network).__name__} "
                            f"({type(cause).__name__}: {text})") from None
    # torch's notes on each node and value (stack traces with this installation's paths) are left out:
    # the same checkpoint gives the same bytes wherever it is exported
    for value in (*proto.graph.node, *proto.graph.input, *proto.graph.output, *proto.graph.value_info,
                  *proto.graph.initializer):
        del value.metadata_props[:]
    del proto.graph.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def _perturbed(network: nn.Module) -> nn.Module:
    """The fault point export-weights: a copy of `network` whose first weight matrix is off by 1 in one place."""
    copy = deepcopy(network)
    with torch.no_grad():
        weight = next(p for p in copy.parameters() if p.dim() > 1)
        weight[(0,) * weight.dim()] += 1.0
    return copy


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's own warnings, log lines and prints (about torch internals, or the partial graph where
    tracing fails) silenced: they are not the user's to act on, and a failure is one error line anyway."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --- the parity check --------------------------------------------------------------------------------


def check(encoded: bytes, network: nn.Module, images: torch.Tensor, threads: int,
          expected: Optional[torch.Tensor] = None) -> Parity:
    """Run the ONNX model with onnxruntime over `images` (uint8 [N, 28, 28]) beside model.predict on the CPU
    (or `expected`, what it gave for them)."""
    try:  # as serve runs it
        session = onnx_session(encoded, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types; any of them means the same
        raise PipelineError(f"onnxruntime does not load the exported model ({first_line(exc)}); no file written") \
            from None
    if expected is None or expected.shape != (len(images), model.NUM_CLASSES):
        expected = model.predict(network, images, torch.device("cpu"))
    try:
        answers = _run(session, images)
    except Exception as exc:  # noqa: BLE001 - as above: a model it loads but cannot run
        raise PipelineError(f"onnxruntime does not run the exported model ({first_line(exc)}); no file written") \
            from None
    theirs = answers.argmax(1)
    differ = theirs != expected.argmax(1)
    gap = expected.max(1).values - expected.gather(1, theirs.unsqueeze(1)).squeeze(1)  # torch's view of their pick
    tie = differ & (gap <= TOLERANCE)
    return Parity(images=len(images), disagreements=int((differ & ~tie).sum()), ties=int(tie.sum()),
                  max_difference=float((answers - expected).abs().max()) if len(images) else 0.0)


def _run(session, images: torch.Tensor) -> torch.Tensor:
    chunks: Sequence = [session.run([ONNX_OUTPUT], {ONNX_INPUT: images[start:start + PARITY_BATCH].numpy()})[0]
                        for start in range(0, len(images), PARITY_BATCH)]
    return torch.cat([torch.from_numpy(chunk) for chunk in chunks]) if chunks else torch.empty(0, model.NUM_CLASSES)
