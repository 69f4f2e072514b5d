"""The optimizer: torch.optim.SGD(nesterov=True), its arithmetic through torch's functional form.

An adapter, the one place that uses torch.optim.sgd.sgd: a public name of a public module (in its __all__) that
torch's documentation does not list. Not the class itself: creating a torch.optim optimizer imports torch's
compiler, a large import that delays every `mnist train` (docs/performance.md). tests/test_units.py holds it to
torch.optim.SGD bit for bit over real steps, weights and state_dict, with the torch release below: a newer torch
fails that test until it is checked again (docs/development.md).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch.optim.sgd import sgd as sgd_arithmetic

from mnist_pipeline.settings import Recipe

CHECKED_WITH_TORCH = "2.13"  # the torch release whose torch.optim.SGD the contract test compared


class NesterovSGD:
    """torch.optim.SGD(nesterov=True): its arithmetic (torch.optim.sgd.sgd, the functional form) and state_dict."""

    def __init__(self, params, recipe: Recipe):
        self.params = list(params)
        self.param_groups = [{"lr": recipe.peak_lr, "momentum": recipe.momentum, "dampening": 0.0,
                              "weight_decay": recipe.weight_decay, "nesterov": True, "maximize": False,
                              "foreach": None, "differentiable": False, "fused": None}]
        self.momentum_buffers: list = [None] * len(self.params)

    def zero_grad(self) -> None:
        """As set_to_none=True."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        live = [i for i, param in enumerate(self.params) if param.grad is not None]
        buffers = [self.momentum_buffers[i] for i in live]
        sgd_arithmetic([self.params[i] for i in live], [self.params[i].grad for i in live], buffers,
                       weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                       dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"])
        for i, buffer in zip(live, buffers, strict=True):  # the first step creates them
            self.momentum_buffers[i] = buffer

    def state_dict(self) -> Dict[str, Any]:
        return {
            "state": {i: {"momentum_buffer": b} for i, b in enumerate(self.momentum_buffers) if b is not None},
            "param_groups": [{**self.param_groups[0], "params": list(range(len(self.params)))}],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Raises ValueError or KeyError where `state` does not fit these parameters."""
        groups = state["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(f"it has {len(groups)} parameter groups, not 1 of {len(self.params)} parameters")
        position = {index: i for i, index in enumerate(groups[0]["params"])}
        buffers: list = [None] * len(self.params)
        for index, entry in state["state"].items():
            param, buffer = self.params[position[index]], entry["momentum_buffer"]
            if not isinstance(buffer, torch.Tensor) or buffer.shape != param.shape:
                raise ValueError(f"the momentum of parameter {index} does not have its shape {tuple(param.shape)}")
            buffers[position[index]] = buffer.to(device=param.device, dtype=param.dtype)
        self.momentum_buffers = buffers
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
