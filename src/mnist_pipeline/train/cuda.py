"""CUDA: a warm-up off the critical path, and the training step replayed as one CUDA graph."""

from __future__ import annotations

import copy
import logging
import threading
from typing import Callable, Optional

import torch
from torch import nn

from mnist_pipeline.model import IMAGE_SIZE
from mnist_pipeline.settings import Recipe
from mnist_pipeline.train.sgd import NesterovSGD

log = logging.getLogger(__name__)


def start_warm_up(model: nn.Module, recipe: Recipe) -> Optional[threading.Thread]:
    """On CUDA, run two throwaway steps in the background while the data is read and verified.

    A process's first CUDA step waits for cuDNN and cuBLAS to start and for each kernel to load;
    done here, that overlaps the data's reading and hashing instead of delaying the epoch.
    """
    if next(model.parameters()).device.type != "cuda":
        return None
    thread = threading.Thread(target=warm_up_steps, args=(model, recipe), name="cuda-warm-up",
                              daemon=True)
    thread.start()
    return thread


def finish_warm_up(thread: Optional[threading.Thread]) -> None:
    if thread is not None:
        thread.join()


def warm_up_steps(model: nn.Module, recipe: Recipe) -> None:
    """Two training steps on a copy of `model`, of one batch of zeros: the same kernels, no state touched.

    The model, the optimizer and every random generator stay as they were; on a failure the real
    first step meets the same error and reports it.
    """
    try:
        twin = copy.deepcopy(model)
        device = next(twin.parameters()).device
        optimizer = NesterovSGD(twin.parameters(), recipe)
        images = torch.zeros(recipe.batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
        labels = torch.zeros(recipe.batch_size, dtype=torch.long, device=device)
        twin.train()
        for _ in range(2):  # the optimizer's first step differs from the later ones
            loss = nn.functional.cross_entropy(twin(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - only a head start; the real step raises what matters
        log.debug("warm-up step failed: %s", exc)


def graphed_step(state, images: torch.Tensor, labels: torch.Tensor,
                  loss_fn: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model, optimizer, device = state.model, state.optimizer, state.device
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # this thread's and stream's handles and workspaces exist before the capture
        warm_up_steps(model, state.recipe)
    torch.cuda.current_stream(device).wait_stream(stream)
    batch = torch.zeros(state.recipe.batch_size, dtype=torch.long, device=device)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad()  # the capture allocates the gradients; each replay rewrites them
    with torch.cuda.graph(graph, stream=stream):  # records, runs nothing: no state changes here
        loss = loss_fn(model(model.normalize(images[batch])), labels[batch])
        loss.backward()
    log.debug("training step captured as a CUDA graph")

    def replay(indices: torch.Tensor) -> torch.Tensor:
        batch.copy_(indices)
        graph.replay()
        optimizer.step()  # eager: its learning rate changes every step
        return loss.detach()

    return replay
