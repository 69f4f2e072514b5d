"""The model's input and answer, without torch: what preprocess.py makes, what every runtime takes and
what serve and predict answer. model.py (torch) and serve's ONNX runtime (no torch) both hold to it.

An image is IMAGE_SIZE x IMAGE_SIZE uint8 pixels, white ink on black as in MNIST, row by row:
IMAGE_BYTES bytes. A batch of them becomes a uint8 array [N, 28, 28] at the runtime's edge; the
network normalises it with the mean and std it was trained with.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

IMAGE_SIZE = 28
IMAGE_BYTES = IMAGE_SIZE * IMAGE_SIZE
NUM_CLASSES = 10
# the standard normalisation: the training set's mean and std (older checkpoints, which do not
# store them, were trained with these)
MEAN, STD = 0.1307, 0.3081


# The exported model's interface (export.py writes it, serve/runtimes.py checks and runs it): its input
# and output names, and the version of the file's contract in its metadata (mnist.format_version).
ONNX_INPUT, ONNX_OUTPUT = "images", "probabilities"
ONNX_FORMAT_VERSION = "1"


def onnx_session(model: bytes, threads: int) -> Any:
    """An onnxruntime session over an ONNX model's bytes, on the CPU, set up alike for export's parity check
    and for serve: `threads` intra-op threads that sleep when idle, onnxruntime's own warnings silenced.
    Raises what onnxruntime raises for bytes it does not load."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep (few cores)
    options.log_severity_level = 3  # errors only: its warnings are not the user's to act on
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def describe(probabilities: Iterable[Any]) -> Dict[str, Any]:
    """One image's probabilities [10] (a row of a torch tensor, of a numpy array, or floats) ->
    {digit, confidence, probabilities}: the answer of predict and serve."""
    raw = probabilities.tolist() if hasattr(probabilities, "tolist") else [float(p) for p in probabilities]
    digit = max(range(len(raw)), key=raw.__getitem__)  # the first of equal ones, as argmax picks
    values = [round(p, 6) for p in raw]
    return {"digit": digit, "confidence": values[digit], "probabilities": values}
