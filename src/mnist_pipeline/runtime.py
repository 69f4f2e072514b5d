"""Where the math runs: device choice, deterministic CUDA, and a thread count that respects container limits."""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from mnist_pipeline.cpus import available_cpus
from mnist_pipeline.errors import PipelineError

log = logging.getLogger(__name__)

def setup(device: str, threads: Optional[int]) -> torch.device:
    """Resolve `device` ('auto' picks CUDA when present), make CUDA deterministic, set torch's thread count."""
    resolved = resolve(device)
    if resolved.type == "cuda":
        deterministic_cuda()
    torch.set_num_threads(threads or available_cpus())
    log.debug("device %s, %d threads", resolved, torch.get_num_threads())
    return resolved


def resolve(device: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(
            "--device cuda / MNIST_DEVICE=cuda, but torch sees no CUDA GPU; "
            "use --device auto or cpu, or give the container a GPU"
        )
    return torch.device(device)


# the two values PyTorch documents as making cuBLAS deterministic
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def deterministic_cuda() -> None:
    """The same inputs give bit-identical results on every run, so resuming on CUDA is exact.

    Must run before the first CUDA computation: cuBLAS sizes its workspace from
    CUBLAS_WORKSPACE_CONFIG when PyTorch creates its handle.
    """
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing, so a run's sums could differ
    torch.backends.cudnn.deterministic = True
    # an op without a deterministic kernel raises instead of drifting. Not through
    # torch.use_deterministic_algorithms: it also sets torch.compile's switch, whose import pulls in
    # torch._dynamo, seconds of every process's start (docs/performance.md); nothing here compiles
    set_mode = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_mode is None:
        torch.use_deterministic_algorithms(True)
    else:
        set_mode(True, warn_only=False)
    # that mode also fills every new tensor with NaN, a debugging aid costing a kernel launch per allocation;
    # nothing here reads memory before writing it
    torch.utils.deterministic.fill_uninitialized_memory = False
