"""A version as an ONNX model, checked against torch before it is written: model/versions/<N>/mnist_cnn.onnx.

The file is one ONNX model (opset 17, IR version 8, the weights inside) that takes what every service
takes, uint8 images, and answers what predict answers, probabilities:

  images uint8 [batch, 28, 28] -> Cast float -> Div 255 -> Sub mean -> Div std -> Unsqueeze [batch, 1, 28, 28]
  -> each stage: Conv -> BatchNormalization -> Relu [-> MaxPool] -> Flatten -> Gemm -> Softmax
  -> probabilities float32 [batch, 10]

with the model's own mean and std, so a client needs no constants. metadata_props name the version and
the sha256 of its checkpoint (a reader serves the file only for that checkpoint). The graph is written
from the network's modules in order (onnx_proto.py encodes it: no onnx package, no torch.onnx), and the
parity check runs it with onnxruntime over the 10,000 test images: the same digit for every image and
probabilities within TOLERANCE of model.predict's, or no file is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mnist_pipeline import __version__, data, faults, model
from mnist_pipeline import onnx_proto as proto
from mnist_pipeline.contract import ONNX_FORMAT_VERSION, ONNX_INPUT, ONNX_OUTPUT, onnx_session
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.records import versions
from mnist_pipeline.storage.atomic import atomic_write_bytes
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

OPSET, IR_VERSION = 17, 8
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
    """None when onnxruntime, which the parity check runs, imports here; else why not."""
    try:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime does not import here ({first_line(exc)})"
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


def to_onnx(network: nn.Module, metadata: Dict[str, str]) -> bytes:
    """`network` (eval mode) with its input normalisation and a softmax, as an ONNX model's bytes.

    Its leaf modules are written in the order they were registered, which is the order forward()
    runs them in for the networks of model.py; a Linear after 4-D values flattens them first, as
    forward() does. The parity check catches a network for which that does not hold.
    """
    mean, std = getattr(network, "mean", None), getattr(network, "std", None)
    if not isinstance(mean, float) or not isinstance(std, float):
        raise PipelineError(f"{type(network).__name__} has no float mean and std, which the export needs")
    graph = _Graph(perturb=faults.broken("export-weights"))
    graph.add("Cast", to=proto.FLOAT)
    graph.add("Div", graph.constant("scale", torch.tensor(255.0)))
    graph.add("Sub", graph.constant("mean", torch.tensor(mean)))
    graph.add("Div", graph.constant("std", torch.tensor(std)))
    axes = "unsqueeze_axes"
    graph.initializers.append(proto.int64s(axes, [1], [1]))
    graph.add("Unsqueeze", axes)
    rank = 4
    for name, module in network.named_modules():
        if next(module.children(), None) is not None:
            continue
        writer = _WRITERS.get(type(module))
        if writer is None:
            raise PipelineError(f"the ONNX export cannot write {type(module).__name__} ({name} of "
                                f"{type(network).__name__}): it writes {', '.join(t.__name__ for t in _WRITERS)}")
        if isinstance(module, nn.Linear) and rank > 2:
            graph.add("Flatten", axis=1)
            rank = 2
        writer(graph, name, module)
        rank = 2 if isinstance(module, nn.Flatten) else rank
    graph.add("Softmax", axis=1, output=ONNX_OUTPUT)
    body = proto.graph(type(network).__name__, graph.nodes, graph.initializers,
                       [proto.value_info(ONNX_INPUT, proto.UINT8, [BATCH, model.IMAGE_SIZE, model.IMAGE_SIZE])],
                       [proto.value_info(ONNX_OUTPUT, proto.FLOAT, [BATCH, model.NUM_CLASSES])])
    return proto.model(body, IR_VERSION, OPSET, "mnist-pipeline", __version__, metadata)


class _Graph:
    """The nodes written so far, each taking the one before's output, and the weights they use."""

    def __init__(self, perturb: bool = False):
        self.nodes: List[bytes] = []
        self.initializers: List[bytes] = []
        self.value = ONNX_INPUT
        self.perturb = perturb  # the fault point export-weights: the first weight written is off by 1

    def add(self, op_type: str, *weights: str, output: Optional[str] = None, **attributes) -> None:
        name = f"{op_type}_{len(self.nodes)}"
        self.nodes.append(proto.node(op_type, [self.value, *weights], [output or name], name, attributes))
        self.value = output or name

    def constant(self, name: str, tensor: torch.Tensor) -> str:
        values = tensor.detach().to("cpu", torch.float32).contiguous()  # (channels-last weights: row-major here)
        if self.perturb and values.dim() > 1:
            values, self.perturb = values.clone(), False
            values.view(-1)[0] += 1.0
        self.initializers.append(proto.floats(name, list(values.shape), values.flatten().tolist()))
        return name


def _pair(value) -> List[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _conv(graph: _Graph, name: str, conv: nn.Conv2d) -> None:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise PipelineError(f"the ONNX export cannot write {name}: padding {conv.padding!r} ({conv.padding_mode})")
    weights = [graph.constant(f"{name}.weight", conv.weight)]
    if conv.bias is not None:
        weights.append(graph.constant(f"{name}.bias", conv.bias))
    pad_h, pad_w = _pair(conv.padding)
    graph.add("Conv", *weights, kernel_shape=_pair(conv.kernel_size), strides=_pair(conv.stride),
              pads=[pad_h, pad_w, pad_h, pad_w], dilations=_pair(conv.dilation), group=conv.groups)


def _batch_norm(graph: _Graph, name: str, norm: nn.BatchNorm2d) -> None:
    if norm.running_mean is None or norm.running_var is None:
        raise PipelineError(f"the ONNX export cannot write {name}: it keeps no running statistics")
    ones = torch.ones_like(norm.running_mean)
    scale = norm.weight if norm.weight is not None else ones
    bias = norm.bias if norm.bias is not None else torch.zeros_like(ones)
    graph.add("BatchNormalization", graph.constant(f"{name}.weight", scale), graph.constant(f"{name}.bias", bias),
              graph.constant(f"{name}.running_mean", norm.running_mean),
              graph.constant(f"{name}.running_var", norm.running_var), epsilon=float(norm.eps))


def _relu(graph: _Graph, name: str, relu: nn.ReLU) -> None:
    graph.add("Relu")


def _max_pool(graph: _Graph, name: str, pool: nn.MaxPool2d) -> None:
    if pool.return_indices:
        raise PipelineError(f"the ONNX export cannot write {name}: it returns indices")
    pad_h, pad_w = _pair(pool.padding)
    graph.add("MaxPool", kernel_shape=_pair(pool.kernel_size), strides=_pair(pool.stride or pool.kernel_size),
              pads=[pad_h, pad_w, pad_h, pad_w], dilations=_pair(pool.dilation), ceil_mode=int(pool.ceil_mode))


def _flatten(graph: _Graph, name: str, flatten: nn.Flatten) -> None:
    if flatten.start_dim != 1 or flatten.end_dim != -1:
        raise PipelineError(f"the ONNX export cannot write {name}: it flattens dims {flatten.start_dim} to "
                            f"{flatten.end_dim}, not 1 to -1")
    graph.add("Flatten", axis=1)


def _linear(graph: _Graph, name: str, linear: nn.Linear) -> None:
    weights = [graph.constant(f"{name}.weight", linear.weight)]
    if linear.bias is not None:
        weights.append(graph.constant(f"{name}.bias", linear.bias))
    graph.add("Gemm", *weights, transB=1)


_WRITERS = {nn.Conv2d: _conv, nn.BatchNorm2d: _batch_norm, nn.ReLU: _relu, nn.MaxPool2d: _max_pool,
            nn.Flatten: _flatten, nn.Linear: _linear}


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
