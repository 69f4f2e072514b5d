"""Where the math runs: device choice, deterministic CUDA, and a thread count that respects container limits.

torch is imported where it is used: serve's ONNX runtime counts CPUs here and never loads torch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from mnist_pipeline.errors import PipelineError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    os.cpu_count() reports the host's cores, which oversubscribes a container
    started with --cpus.
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cgroup_quota(cgroup_root: Path) -> Optional[float]:
    try:  # cgroup v2: "max 100000" or "150000 100000"
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int((cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def setup(device: str, threads: Optional[int]) -> torch.device:
    """Resolve `device` ('auto' picks CUDA when present), make CUDA deterministic, set torch's thread count."""
    import torch

    resolved = resolve(device)
    if resolved.type == "cuda":
        deterministic_cuda()
    torch.set_num_threads(threads or available_cpus())
    log.debug("device %s, %d threads", resolved, torch.get_num_threads())
    return resolved


def resolve(device: str) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cuda' without a GPU is an error."""
    import torch

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
    import torch

    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in CUBLAS_DETERMINISTIC:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    torch.backends.cudnn.benchmark = False  # autotuning picks kernels by timing, so a run's sums could differ
    torch.backends.cudnn.deterministic = True
    # an op without a deterministic kernel raises instead of drifting. torch.set_deterministic_debug_mode is
    # torch's documented alternative to torch.use_deterministic_algorithms, which also sets torch.compile's
    # switch and so imports the compiler, a large import at every process's start; nothing here compiles
    torch.set_deterministic_debug_mode("error")
    # that mode also fills every new tensor with NaN, a debugging aid costing a kernel launch per allocation;
    # nothing here reads memory before writing it
    torch.utils.deterministic.fill_uninitialized_memory = False
