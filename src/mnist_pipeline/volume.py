"""Where each file of the volume lives: paths only, no I/O.

Each file is read and written by its record module (records/), through storage/ (atomic writes,
locks, waiting, reading only regular files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Volume:
    """Paths inside the volume root (MNIST_ROOT)."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def checkpoint(self) -> Path:
        """The last completed epoch: the only model evaluate and infer ever read."""
        return self.model_dir / "mnist_cnn.pt"

    @property
    def progress(self) -> Path:
        """An interrupted epoch, kept apart so the checkpoint stays a finished one."""
        return self.model_dir / "train_progress.pt"

    @property
    def eval_results(self) -> Path:
        return self.model_dir / "eval_results.json"

    @property
    def history(self) -> Path:
        """Train loss and learning rate every few steps, each epoch's summary and test accuracy."""
        return self.model_dir / "history.jsonl"

    @property
    def report_dir(self) -> Path:
        """The evaluation report (index.html and its pictures), replaced as a whole."""
        return self.model_dir / "report"

    @property
    def versions_dir(self) -> Path:
        """Every evaluated checkpoint kept as model/versions/<N>/ (records/versions.py)."""
        return self.model_dir / "versions"

    def version_dir(self, number: int) -> Path:
        return self.versions_dir / str(number)

    def exported(self, number: int) -> Path:
        """Version `number` as an ONNX model, for serving without torch (export.py)."""
        return self.version_dir(number) / "mnist_cnn.onnx"

    @property
    def aliases_dir(self) -> Path:
        """Named pointers to versions, <name>.json each, and log.jsonl, every move of one."""
        return self.model_dir / "aliases"

    def alias_path(self, name: str) -> Path:
        return self.aliases_dir / f"{name}.json"

    @property
    def alias_log(self) -> Path:
        return self.aliases_dir / "log.jsonl"

    @property
    def feedback_dir(self) -> Path:
        """Samples people sent serve with their label, for review (records/feedback.py)."""
        return self.root / "feedback"

    def feedback_image(self, sample: str) -> Path:
        return self.feedback_dir / f"{sample}.png"

    def feedback_record(self, sample: str) -> Path:
        return self.feedback_dir / f"{sample}.json"

    def lock_path(self, role: str) -> Path:
        return self.model_dir / f".{role}.lock"
