"""torchrun and data parallelism: who is rank 0, DistributedDataParallel, the stop flag, sharding, the launcher.

Under torchrun (or `mnist train --nproc-per-node N`, which starts the same elastic agent from
inside the command) each process is one rank, told by RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE. Without them the world is one process and every function here does nothing.
torch is imported inside the functions: cli.py asks who is rank 0 before torch loads.

The recipe means the same at any world size: step s takes the same `batch_size` samples of
`epoch_order` as in one process, rank r trains on the r-th slice of them, and DistributedDataParallel
averages the gradients, so the update is the whole batch's (BatchNorm, though, normalises each slice alone).
Rank 0 alone writes: it holds the train lock, fetches the data, saves checkpoints and progress;
the model it saves is the plain network, the same file as one process saves.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
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
            with _collective():
                dist.broadcast(status, src=0)
                dist.barrier()  # the others have heard it: they end quietly, not by the agent's SIGTERM
            raise
        with _collective():
            dist.broadcast(status, src=0)
        return
    with _collective():
        dist.broadcast(status, src=0)
    if status.item():
        # ending already: the agent's SIGTERM, sent once rank 0 has exited (after the barrier), changes nothing
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        with _collective():
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
    """`model` as a group trains it: in one process the model itself; in a group, DistributedDataParallel, which
    starts every rank from rank 0's parameters and buffers and averages the gradients during backward (mean_hook).

    Buffers (BatchNorm's running statistics) are not broadcast again before each forward: in train mode they do
    not enter the gradients, and only rank 0's are saved. So a step's collectives are this module's, whose
    failure lost_peers_reported recognises (but for the bucket layout DDP agrees on once, in the second step)."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  process_group=_group, forward_sync_buffers=False)
    order = {parameter: i for i, parameter in enumerate(model.parameters())}
    ddp.register_comm_hook(_GradientMean(_group, world.size, order), mean_hook)
    return ddp


@dataclass(frozen=True)
class _GradientMean:
    group: object
    size: int
    order: dict  # parameter -> its index in model.parameters()


def mean_hook(state: _GradientMean, bucket):  # (DDP refuses a return annotation that is a string)
    """A DDP communication hook: a future of the mean over the ranks of a bucket's gradients, one all-reduce, as
    DDP's own.

    The all-reduce sums the gradients laid out in the model's parameter order, not the bucket's: DDP lays a
    bucket out in the order of the first step's backward, which a resumed run's first step does not share, and
    with three or more ranks each value's sum is grouped by where it lies in the buffer. So a resumed epoch
    ends bit-identical to an uninterrupted one. A collective that fails is noted for lost_peers_reported."""
    import torch
    import torch.distributed as dist

    grads = sorted(zip(bucket.parameters(), bucket.gradients(), strict=True), key=lambda pg: state.order[pg[0]])
    flat = torch.cat([grad.reshape(-1) for _, grad in grads]).div_(state.size)
    future = dist.all_reduce(flat, group=state.group, async_op=True).get_future()

    def unpack(done: "torch.futures.Future") -> torch.Tensor:
        with _collective():
            mean = done.value()[0]
        for (_, grad), part in zip(grads, mean.split([grad.numel() for _, grad in grads]), strict=True):
            grad.copy_(part.view_as(grad))  # the bucket's views: DDP copies them into .grad
        return bucket.buffer()

    return future.then(unpack)


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
    with _collective():
        dist.all_reduce(value, group=_group)
    return value / world.size


def broadcast(world: World, tensor: "torch.Tensor") -> None:
    """Rank 0's `tensor` into every rank's, in place (a CPU tensor). In the group of PREPARE_TIMEOUT: rank 0 may read
    files first (train/mix.py)."""
    if world.size > 1:
        import torch.distributed as dist

        with _collective():
            dist.broadcast(tensor, src=0)


def stop_agreed(world: World, stop: bool) -> bool:
    """True on every rank when any rank wants to stop: all stop at the same step boundary."""
    if world.size == 1:
        return stop
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(stop)])
    with _collective():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_group)
    return bool(flag.item())


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        with _collective():
            dist.barrier(group=_group)


class _Lost:
    """Whether a collective of this process has failed (set from DDP's communication thread too)."""

    failed = False


@contextlib.contextmanager
def _collective() -> Iterator[None]:
    """Around each collective this module makes: a RuntimeError there means the group is lost."""
    try:
        yield
    except RuntimeError:
        _Lost.failed = True
        raise


@contextlib.contextmanager
def lost_peers_reported(world: World) -> Iterator[None]:
    """A collective that fails (a rank died or hung) becomes one clear error instead of gloo's or NCCL's.

    Known by where it failed (a collective of this module, or torch.distributed's own DistError), not by the
    words of the message; a collective that fails inside backward (DDP's) surfaces there as a RuntimeError."""
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

    return _Lost.failed or isinstance(exc, dist.DistError)


def _first_failure(failures) -> int:
    """The exit code of the rank that failed first. The agent dates a failure it saw without an error file
    to the second it noticed it, so a rank killed outright (kill -9) ties with the ranks that then lost
    their group (exit 1): the one ended by a signal the agent did not send comes first."""
    def order(failure) -> tuple:
        return failure.timestamp, not (failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM)

    return min(failures, key=order).exitcode


def launch(nproc: int, argv: Sequence[str]) -> int:
    """`mnist train --nproc-per-node N`: torch's elastic agent on this machine, running `python -m mnist_pipeline
    ARGV` N times, as `torchrun --standalone --nproc-per-node N -m mnist_pipeline ARGV` does.

    Built as torch's elastic docs show a custom launcher (a LocalElasticAgent given a WorkerSpec and a c10d
    rendezvous), whose run result says which rank failed how; torchrun itself exits 1 for any failure. The
    workers see WORLD_SIZE and so train instead of launching again. Returns the exit code: that of the first
    rank that failed (143 after SIGTERM), or 128 + a signal that stopped the agent.
    """
    import uuid

    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    os.environ.setdefault("OMP_NUM_THREADS", str(threads(World(local_size=nproc), None)))
    # --standalone: a rendezvous on this machine, on a free port
    parameters = RendezvousParameters(backend="c10d", endpoint="localhost:0", run_id=str(uuid.uuid4()),
                                      min_nodes=1, max_nodes=1)
    backend, store = create_backend(parameters)
    spec = WorkerSpec(role="default", local_world_size=nproc, entrypoint=sys.executable,
                      args=("-m", "mnist_pipeline", *argv), rdzv_handler=create_handler(store, backend, parameters),
                      max_restarts=0, monitor_interval=0.1)
    agent = LocalElasticAgent(spec, logs_specs=DefaultLogsSpecs(), start_method="spawn")
    try:
        result = agent.run()
    except SignalException as exc:  # the rendezvous is left open, as torchrun leaves it
        return 128 + int(exc.sigval)
    except BaseException:
        spec.rdzv_handler.shutdown()
        raise
    spec.rdzv_handler.shutdown()
    if not result.is_failed():
        return 0
    code = _first_failure(result.failures.values())
    return 128 - code if code < 0 else code  # -9: killed by SIGKILL, as a shell says 137
