"""What serve answers with, behind one interface: a gated version loaded as a Live, whose predict() takes
images as preprocess.py makes them (contract.IMAGE_BYTES each) and gives probabilities [N, 10]. Which runtime
serves which version (onnx, torch, auto): docs/serving.md#runtimes. The gate needs no torch
(records.aliases.gate); torch, onnxruntime and numpy are imported when a runtime first needs them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional, Sequence, Union

from mnist_pipeline.contract import (IMAGE_BYTES, IMAGE_SIZE, NUM_CLASSES, ONNX_FORMAT_VERSION, ONNX_INPUT,
                                     ONNX_OUTPUT, onnx_session)
from mnist_pipeline.errors import PipelineError, first_line
from mnist_pipeline.records import aliases, checkpoint, evaluation, versions
from mnist_pipeline.storage.files import describe, read_regular
from mnist_pipeline.volume import Volume

log = logging.getLogger(__name__)

TO_A_VERSION = ("`mnist train`, then `mnist evaluate`, register a version (production when it passes --threshold, "
                "else `mnist promote N`), and `mnist export` exports it")


@dataclass(frozen=True)
class Live:
    """A loaded model and what it is: the checkpoint it came from and that checkpoint's evaluation."""

    runtime: ClassVar[str]
    sha256: str
    epoch: int
    accuracy: float
    version: Optional[int]  # None: the current checkpoint of a volume with no production version yet

    def describe(self) -> dict:
        """The `checkpoint` object of serve's answers."""
        return {"sha256": self.sha256, "epoch": self.epoch,
                **({"version": self.version} if self.version is not None else {})}

    def is_of(self, sha256: str, version: Optional[int], runtime: str) -> bool:
        return (self.sha256, self.version, self.runtime) == (sha256, version, runtime)

    def predict(self, images: Sequence[bytes]) -> Any:
        """Images of IMAGE_BYTES each -> probabilities [N, 10] (rows that contract.describe reads)."""
        raise NotImplementedError


@dataclass(frozen=True)
class TorchLive(Live):
    runtime: ClassVar[str] = "torch"
    model: Any
    device: Any

    def predict(self, images: Sequence[bytes]) -> Any:
        from mnist_pipeline import model

        return model.predict(self.model, model.stack(images), self.device)


@dataclass(frozen=True)
class OnnxLive(Live):
    runtime: ClassVar[str] = "onnx"
    session: Any

    def predict(self, images: Sequence[bytes]) -> Any:
        import numpy

        batch = numpy.frombuffer(b"".join(images), dtype=numpy.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: batch})[0]


class Runtimes:
    """Loads the gated model `model` names with the runtime --runtime picks (for auto: per version)."""

    def __init__(self, choice: str, device: str, threads: Optional[int]):
        if choice == "onnx" and device == "cuda":
            raise PipelineError("--runtime onnx runs on the CPU, and --device / MNIST_DEVICE is cuda: "
                                "use --runtime torch (or auto) for the GPU, or --device cpu")
        # auto with --device cuda: the GPU is torch's
        self.choice = "torch" if choice == "auto" and device == "cuda" else choice
        # one thread per request unless told otherwise: requests run side by side on the threadpool, and
        # one image is too little work to split (bench/serve_bench.py)
        self.device_name, self.threads = device, threads or 1
        self._lock = threading.Lock()
        self._modules: Dict[str, Any] = {}
        self._device: Any = None
        # what --runtime names must be there: otherwise serve stops at its start, saying so
        if self.choice == "torch":
            self._need_torch()
            self.torch_device()  # (a bad --device too)
        elif self.choice == "onnx" and self._import("onnxruntime") is None:
            raise PipelineError("--runtime onnx, but onnxruntime does not import here: install it "
                                "(pip install onnxruntime numpy), or use --runtime torch")

    def load(self, volume: Volume, model: Union[str, int], threshold: float, current: Optional[Live] = None) -> Live:
        """The gated model `model` names, loaded and warmed up; `current` itself if it is that one already.
        PipelineError saying why when it cannot serve."""
        passed = aliases.gate(volume, model, threshold)
        if passed is None:
            return self._current_checkpoint(volume, threshold, current)
        version, scores = passed
        runtime = "onnx" if self._onnx_for(volume, version.number) else "torch"
        if runtime == "torch":
            self._need_torch(volume, version.number)
        if current is not None and current.is_of(version.sha256, version.number, runtime):
            return current
        if runtime == "onnx":
            return self._open_onnx(volume, version, scores)
        _, saved, scores = versions.load(volume, version.number)
        return self._open_torch(saved, scores, version.number)

    # --- which runtime ---------------------------------------------------------------------------

    def _onnx_for(self, volume: Volume, number: int) -> bool:
        if self.choice == "torch":
            return False
        if self.choice == "auto":
            return self._import("onnxruntime") is not None and volume.exported(number).exists()
        if not volume.exported(number).exists():
            raise PipelineError(f"version {number} has no ONNX model ({describe(volume.exported(number))}) to serve "
                                f"with --runtime onnx: run `mnist export` to write it")
        return True

    def _need_torch(self, volume: Optional[Volume] = None, number: int = 0) -> None:
        """Nothing when torch imports; else PipelineError saying so, and for auto why version `number` is not
        served with onnx instead."""
        if self._import("torch") is not None:
            return
        if self.choice == "torch" and self.device_name == "cuda":
            raise PipelineError("--device cuda (MNIST_DEVICE) needs torch, which does not import here: use "
                                "--device cpu to serve exported versions with onnxruntime")
        if self.choice == "torch":
            raise PipelineError("--runtime torch, but torch does not import here: install it, or use "
                                "--runtime onnx (or auto) to serve exported versions")
        because = ("onnxruntime does not import here" if self._import("onnxruntime") is None else
                   f"it has no ONNX model yet ({describe(volume.exported(number))}; `mnist export` writes it)")
        raise PipelineError(f"version {number} cannot be served: {because}, and torch, which would serve it "
                            f"instead, does not import here")

    def _import(self, name: str) -> Any:
        """Module `name`, or None when it does not import here (asked once)."""
        with self._lock:
            if name not in self._modules:
                try:
                    self._modules[name] = __import__(name)
                except ImportError as exc:
                    log.info("%s does not import here (%s)", name, first_line(exc))
                    self._modules[name] = None
            return self._modules[name]

    # --- torch -----------------------------------------------------------------------------------

    def torch_device(self) -> Any:
        """torch's device, set up (threads, deterministic CUDA) once, on first use."""
        with self._lock:
            if self._device is None:
                from mnist_pipeline import runtime

                self._device = runtime.setup(self.device_name, self.threads)
            return self._device

    def _current_checkpoint(self, volume: Volume, threshold: float, current: Optional[Live]) -> Live:
        """No production version yet: model/mnist_cnn.pt with its evaluation, which torch reads."""
        if self.choice == "onnx":
            raise PipelineError(f"production is not set, and --runtime onnx serves versions only: {TO_A_VERSION}; "
                                f"or use --runtime torch")
        if self._import("torch") is None:
            raise PipelineError(f"production is not set, and torch, which would serve model/mnist_cnn.pt instead, "
                                f"does not import here: {TO_A_VERSION}")
        saved, scores = evaluation.evaluated(volume, threshold)
        if current is not None and current.is_of(saved.sha256, None, "torch"):
            return current
        return self._open_torch(saved, scores, None)

    def _open_torch(self, saved: checkpoint.Checkpoint, scores: evaluation.Evaluation, number: Optional[int]) -> Live:
        device = self.torch_device()
        live = TorchLive(sha256=saved.sha256, epoch=saved.epoch, accuracy=scores.accuracy, version=number,
                         model=saved.build_model().to(device), device=device)
        live.predict([bytes(IMAGE_BYTES)])  # warm up off the hot path
        return live

    # --- onnx ------------------------------------------------------------------------------------

    def _open_onnx(self, volume: Volume, version: versions.Version, scores: evaluation.Evaluation) -> Live:
        import numpy

        path, number = volume.exported(version.number), version.number
        again = f"`mnist export --version {number}` writes it again"
        try:
            data = read_regular(path, checkpoint.MAX_BYTES, "ONNX model")  # (the weights, little more)
        except FileNotFoundError:  # (pruned or removed since)
            raise PipelineError(f"version {number} has no ONNX model ({describe(path)}): run `mnist export`") from None
        try:
            session = onnx_session(data, self.threads)
        except Exception as exc:  # noqa: BLE001 - any failure to load untrusted bytes is bad input
            raise PipelineError(f"version {number}: {describe(path)} does not load ({first_line(exc)}): "
                                f"{again}") from None
        problem = _interface_problem(session, version.sha256)
        if problem:
            raise PipelineError(f"version {number}: {describe(path)} {problem}: {again}")
        live = OnnxLive(sha256=version.sha256, epoch=version.epoch, accuracy=scores.accuracy, version=number,
                        session=session)
        try:  # warm up off the hot path; a broken graph fails here, not in a request
            answers = live.predict([bytes(IMAGE_BYTES)] * 2)
        except Exception as exc:  # noqa: BLE001 - as above
            raise PipelineError(f"version {number}: {describe(path)} does not run ({first_line(exc)}): "
                                f"{again}") from None
        if answers.shape != (2, NUM_CLASSES) or not numpy.isfinite(answers).all():
            raise PipelineError(f"version {number}: {describe(path)} answers {answers.shape} values, not finite "
                                f"probabilities for each image: {again}")
        return live


def _interface_problem(session: Any, sha256: str) -> Optional[str]:
    """What keeps the exported model from serving the version whose checkpoint has `sha256`, if anything."""
    metadata = session.get_modelmeta().custom_metadata_map
    if metadata.get("mnist.format_version") != ONNX_FORMAT_VERSION:
        return (f"is not an export this version reads (mnist.format_version "
                f"{str(metadata.get('mnist.format_version'))[:20]!r}, not {ONNX_FORMAT_VERSION!r})")
    if metadata.get("mnist.checkpoint_sha256") != sha256:
        return "is the export of another checkpoint than the version's (a stale or foreign file)"
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if ([(i.name, i.type, i.shape[1:]) for i in inputs] != [(ONNX_INPUT, "tensor(uint8)", [IMAGE_SIZE, IMAGE_SIZE])]
            or [(o.name, o.type, o.shape[1:]) for o in outputs] != [(ONNX_OUTPUT, "tensor(float)", [NUM_CLASSES])]
            or any(isinstance(v.shape[0], int) for v in (*inputs, *outputs))):  # a fixed batch would cut answers
        return (f"does not take `{ONNX_INPUT}` uint8 [N, {IMAGE_SIZE}, {IMAGE_SIZE}] and give `{ONNX_OUTPUT}` "
                f"float [N, {NUM_CLASSES}]")
    return None
