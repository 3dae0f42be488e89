"""PyTorch eager training as the reference: the same scheme as gradient masks."""
from __future__ import annotations

import torch


def train_eager(model, loss_fn, batches, masks, make_optimizer, lrs=None):
    """Train `model` in eager PyTorch on `batches`, updating only the entries in `masks`.

    Gradients outside a mask are zeroed; entries outside it are restored after each step
    (AdamW's decoupled weight decay would otherwise shrink them). Returns the losses.
    """
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in masks)
    trained = [params[n] for n in masks]
    opt = make_optimizer(trained)
    losses = []
    for k, (inputs, targets) in enumerate(batches):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[k]
        frozen = {n: params[n].detach().clone() for n in masks}
        opt.zero_grad()
        loss = loss_fn(model(*inputs), *targets)
        loss.backward()
        for n, mask in masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            for n, mask in masks.items():
                params[n].copy_(torch.where(mask, params[n], frozen[n]))
        losses.append(loss.item())
    return losses


def assert_models_match(got, want, rtol=1e-4, atol=1e-6):
    """Every parameter and buffer of `got` matches `want` within rtol (relative to scale)."""
    want_state = want.state_dict()
    for name, value in got.state_dict().items():
        ref = want_state[name]
        if not value.is_floating_point():
            assert torch.equal(value, ref), f"{name}: {value} != {ref}"
            continue
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(value, ref, rtol=rtol, atol=atol * float(scale),
                                   msg=lambda m, name=name: f"{name}: {m}")
