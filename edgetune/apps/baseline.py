"""The same job in plain PyTorch, to compare against: autograd with requires_grad only on the
trained parameters, torch.optim, and gradient masks for partially trained weights (the best a
PyTorch user can do with a sparse scheme without an engine like this one).

    step = eager_step(model, loss_fn, inputs, targets, scheme, et.SGD(lr=0.05, momentum=0.9))
    loss = step()

Its peak memory: edgetune.apps.measure.measure_eager_peak.
"""
from __future__ import annotations

from typing import Callable

import torch

from edgetune.compiler import scheme as schemes
from edgetune.compiler.optim import SGD, AdamW


def eager_step(model: torch.nn.Module, loss_fn: Callable, inputs: tuple, targets: tuple, scheme,
               optimizer: SGD | AdamW) -> Callable[[], float]:
    """A closure running one PyTorch training step of `scheme` on this batch; returns the loss."""
    masks = freeze_to(model, scheme)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch_optimizer(optimizer, trained)

    def step() -> float:
        loss = loss_fn(model(*inputs), *targets)
        loss.backward()
        for p, mask in masks:
            p.grad.mul_(mask)  # untrained channels get no gradient: SGD/AdamW leave them unchanged
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def torch_optimizer(optimizer: SGD | AdamW, params: list) -> torch.optim.Optimizer:
    if isinstance(optimizer, SGD):
        return torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum, dampening=optimizer.dampening,
                               weight_decay=optimizer.weight_decay, nesterov=optimizer.nesterov)
    return torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                             weight_decay=optimizer.weight_decay)


def freeze_to(model: torch.nn.Module, scheme) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """requires_grad only on trained parameters; (param, 0/1 mask) for partially trained ones.

    Channels are chosen by edgetune's own rule (schemes.choose_channels), so both engines train
    exactly the same entries."""
    rules = schemes.resolve(scheme, model)
    masks = []
    for name, p in model.named_parameters():
        rule = rules.get(name)
        if rule is not None and rule.touched:
            raise schemes.SchemeError(f"{name!r}: the eager baseline has no sparse optimizer for a 'touched' rows "
                                      "rule; give it the table's chosen rows or 'full'")
        p.requires_grad_(rule is not None)
        if rule is not None and rule.partial:
            masks.append((p, channel_mask(model, name, p, rule)))
    return masks


def channel_mask(model: torch.nn.Module, name: str, p: torch.Tensor, rule: schemes.Rule) -> torch.Tensor:
    """A mask broadcastable to `p`: 1 on the chosen input channels (or rows), 0 elsewhere."""
    if rule.rows:
        mask = torch.zeros([p.shape[0]] + [1] * (p.dim() - 1), dtype=p.dtype)
        mask[list(rule.rows)] = 1
        return mask
    module = model.get_submodule(name.rpartition(".")[0])
    depthwise = isinstance(module, torch.nn.Conv2d) and 1 < module.groups == module.in_channels
    axis = 0 if depthwise else 1  # the same axis rule as edgetune's partial-channel slicing
    shape = [1] * p.dim()
    shape[axis] = p.shape[axis]
    mask = torch.zeros(shape, dtype=p.dtype)
    mask.view(-1)[schemes.choose_channels(p, axis, rule)] = 1
    return mask

