"""torchrun and data parallelism: who is rank 0, the averaged gradients and stop flag, sharding, the launcher.

Under torchrun (or `mnist train --nproc-per-node N`, which starts the same elastic agent from
inside the command) each process is one rank, told by RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE. Without them the world is one process and every function here does nothing.
torch is imported inside the functions: cli.py asks who is rank 0 before torch loads.

The recipe means the same at any world size: step s takes the same `batch_size` samples of
`epoch_order` as in one process, rank r trains on the r-th slice of them, and an all-reduce averages
the gradients, so the update is the whole batch's (BatchNorm, though, normalises each slice alone).
Rank 0 alone writes: it holds the train lock, fetches the data, saves checkpoints and progress;
the model it saves is the plain network, the same file as one process saves.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Sequence

from mnist_pipeline.errors import PipelineError, UsageError, first_line
from mnist_pipeline.faults import hold_point

if TYPE_CHECKING:
    import torch

# While rank 0 takes the lock and fetches MNIST (minutes over a slow network) the others wait.
PREPARE_TIMEOUT = datetime.timedelta(minutes=30)
# During training every collective must finish within this: a rank that hangs this long is lost.
# (A rank that dies is noticed at once: its sockets close.)
STEP_TIMEOUT = datetime.timedelta(seconds=60)

_group = None  # the training process group (STEP_TIMEOUT), set by process_group()
# After a failed collective, freeing the group deadlocks: its destructor joins a gloo thread that waits
# for the GIL. So a failed group is never freed (_group keeps it): cli.script() ends the process with os._exit.


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes to the volume."""
        return self.rank == 0


def world(env: Optional[Mapping[str, str]] = None) -> World:
    """This process's place, from the variables torchrun sets; a world of one without them."""
    env = os.environ if env is None else env
    return World(rank=int(env.get("RANK", 0)), size=int(env.get("WORLD_SIZE", 1)),
                 local_rank=int(env.get("LOCAL_RANK", 0)), local_size=int(env.get("LOCAL_WORLD_SIZE", 1)))


def launched(env: Optional[Mapping[str, str]] = None) -> bool:
    """True in a process started by torchrun's elastic agent."""
    return "WORLD_SIZE" in (os.environ if env is None else env)


def check_batch_size(batch_size: int, world_size: int, resumed: bool = False) -> None:
    """UsageError unless the global batch splits evenly over the processes. `resumed`: the batch size is the
    checkpoint's, which a resumed run keeps whatever --batch-size says."""
    if batch_size % world_size == 0:
        return
    if resumed:
        raise UsageError(
            f"the checkpoint was trained at batch size {batch_size}, which a resumed run keeps (its data order and "
            f"learning rate depend on it), and {batch_size} does not split evenly over {world_size} processes: "
            f"pick a process count that divides {batch_size}, or start over with --fresh"
        )
    raise UsageError(
        f"--batch-size / MNIST_BATCH_SIZE {batch_size} does not split evenly over {world_size} processes: "
        f"the global batch is shared out, so pick a batch size divisible by the world size"
    )


def threads(world: World, requested: Optional[int]) -> int:
    """--threads, else this machine's CPUs shared among its ranks (more would oversubscribe the cores)."""
    from mnist_pipeline import runtime

    return requested or max(1, runtime.available_cpus() // world.local_size)


@contextlib.contextmanager
def process_group(world: World, device: "torch.device") -> Iterator["torch.device"]:
    """Join the group (gloo on CPU, nccl on CUDA) for the block; yields this rank's device."""
    global _group
    if world.size == 1:
        yield device
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch_device = _cuda_device(world)
        backend = "cpu:gloo,cuda:nccl"  # the stop flag travels on the CPU, without a CUDA sync
    else:
        torch_device, backend = device, "gloo"
    dist.init_process_group(backend, timeout=PREPARE_TIMEOUT)
    _group = dist.new_group(backend=backend, timeout=STEP_TIMEOUT)
    yield torch_device  # an exception leaves the group as it is (see _group)
    dist.destroy_process_group()
    _group = None


def _cuda_device(world: World) -> "torch.device":
    import torch

    if world.local_rank >= torch.cuda.device_count():  # one GPU per rank: NCCL refuses to share one
        raise UsageError(
            f"local rank {world.local_rank} has no GPU of its own: this machine shows {torch.cuda.device_count()}; "
            f"start at most that many processes per machine, or train on the CPU (--device cpu)"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block first (the lock, fetching, setting files aside); the others wait, then run it.

    If rank 0 fails there, the others stop too, with its exit code, instead of waiting out a timeout.
    """
    if world.size == 1:
        yield
        return
    import torch
    import torch.distributed as dist

    status = torch.zeros(1, dtype=torch.int64)
    if world.is_main:
        try:
            yield
        except BaseException as exc:
            status[0] = getattr(exc, "exit_code", 1)
            dist.broadcast(status, src=0)
            dist.barrier()  # the others have heard it: they end quietly, not by the agent's SIGTERM
            raise
        dist.broadcast(status, src=0)
        return
    dist.broadcast(status, src=0)
    if status.item():
        # ending already: the agent's SIGTERM, sent once rank 0 has exited (after the barrier), changes nothing
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        dist.barrier()
        hold_point("follows")
        raise Follows(int(status.item()))
    yield


class Follows(PipelineError):
    """A rank other than 0 stopping because rank 0 did: rank 0 prints the one error line of the group."""

    silent = True

    def __init__(self, exit_code: int):
        super().__init__(f"rank 0 stopped before training (exit {exit_code})")
        self.exit_code = exit_code


def wrap(world: World, model: "torch.nn.Module") -> "torch.nn.Module":
    """`model` as a group trains it: the same on every rank from the start (rank 0's parameters and buffers),
    its gradients averaged by average_gradients after each backward. Not DistributedDataParallel, whose
    constructor imports torch._dynamo, a slow import at every rank's start, for what one all-reduce a step does."""
    if world.size > 1:
        import torch.distributed as dist

        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0, group=_group)
    return model


def average_gradients(world: World, model: "torch.nn.Module") -> None:
    """Each gradient of `model` replaced by its mean over the ranks (one all-reduce of them all): the update is the
    whole global batch's, as in one process."""
    if world.size == 1:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat, group=_group)
    flat /= world.size
    for grad, mean in zip(grads, flat.split([grad.numel() for grad in grads]), strict=True):
        grad.copy_(mean.view_as(grad))


def shard(world: World, batch: "torch.Tensor") -> "torch.Tensor":
    """This rank's disjoint slice of the global batch."""
    per_rank = len(batch) // world.size
    return batch[world.rank * per_rank:(world.rank + 1) * per_rank]


def average(world: World, value: "torch.Tensor") -> "torch.Tensor":
    """The mean of `value` over the ranks (the batch loss, so every rank sums the same training loss)."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value, group=_group)
    return value / world.size


def stop_agreed(world: World, stop: bool) -> bool:
    """True on every rank when any rank wants to stop: all stop at the same step boundary."""
    if world.size == 1:
        return stop
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(stop)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_group)
    return bool(flag.item())


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier(group=_group)


@contextlib.contextmanager
def lost_peers_reported(world: World) -> Iterator[None]:
    """A collective that fails (a rank died or hung) becomes one clear error instead of gloo's or NCCL's."""
    try:
        yield
    except RuntimeError as exc:
        if world.size == 1 or not _is_collective_error(exc):
            raise
        raise PipelineError(
            f"rank {world.rank} of {world.size} lost its process group: another rank died or stopped answering "
            f"({first_line(exc, 300)}); the checkpoint holds the last finished epoch, the progress file what was saved "
            f"before: run train again (torchrun --max-restarts N does so by itself)"
        ) from None


def _is_collective_error(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(word in text for word in ("gloo", "NCCL", "Connection closed"))


def _first_failure(failures) -> int:
    """The exit code of the rank that failed first. The agent dates a failure it saw without an error file
    to the second it noticed it, so a rank killed outright (kill -9) ties with the ranks that then lost
    their group (exit 1): the one ended by a signal the agent did not send comes first."""
    def order(failure) -> tuple:
        return failure.timestamp, not (failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM)

    return min(failures, key=order).exitcode


def launch(nproc: int, argv: Sequence[str]) -> int:
    """`mnist train --nproc-per-node N`: torchrun's elastic agent on this machine, running `mnist` N times.

    The workers see WORLD_SIZE and so train instead of launching again. Returns the exit code:
    that of the first rank that failed (143 after SIGTERM), or 128 + a signal that stopped the agent.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", str(threads(World(local_size=nproc), None)))  # quiets torchrun
    # torch 2.13's agent otherwise lends its store to the workers, and a restarted group can read the
    # dead group's addresses from it (pytorch/pytorch#135712)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = torchrun.parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "mnist_pipeline",
                                *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        code = _first_failure(exc.failures.values())
        return 128 - code if code < 0 else code  # -9: killed by SIGKILL, as a shell says 137
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
