"""predict: the digit in each of the user's own images, with the --model version (production) if it passes the gate."""

from __future__ import annotations

from typing import Any, Dict, List

from mnist_pipeline import preprocess, runtime
from mnist_pipeline.contract import describe
from mnist_pipeline.model import predict, stack
from mnist_pipeline.records.aliases import gated
from mnist_pipeline.settings import PredictConfig
from mnist_pipeline.storage.files import describe as describe_path
from mnist_pipeline.storage.files import NotReadable, read_regular
from mnist_pipeline.volume import Volume

MAX_FILE_BYTES = 64 * 1024 * 1024  # a large photo; a bigger file is refused before it is read


def run(config: PredictConfig) -> List[Dict[str, Any]]:
    """{file, digit, confidence, probabilities} per image in argument order; {file, error} for one that
    cannot be read. Raises NotEvaluated / BelowThreshold (exit 3) when the model fails the gate."""
    _, saved, _ = gated(Volume(config.root), config.model, config.threshold)
    device = runtime.setup(config.device, config.threads)
    model = saved.build_model().to(device)
    inputs, results = [], []
    for path in config.images:
        name = describe_path(path)
        try:
            inputs.append(preprocess.from_bytes(read_regular(path, MAX_FILE_BYTES, "image")))
            results.append({"file": name})
        except FileNotFoundError:
            results.append({"file": name, "error": "cannot read it: no such file"})
        except NotReadable as exc:
            results.append({"file": name, "error": f"it {exc.reason}"})
        except preprocess.ImageError as exc:
            results.append({"file": name, "error": str(exc)})
    if inputs:
        probabilities = iter(predict(model, stack(inputs), device))
        for result in results:
            if "error" not in result:
                result.update(describe(next(probabilities)))
    return results
