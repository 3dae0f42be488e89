"""PyTorch eager training as the reference: the same scheme as gradient masks."""
from __future__ import annotations

import torch


def train_eager(model, loss_fn, batches, masks, make_optimizer, lrs=None, lazy_rows=None):
    """Train `model` in eager PyTorch on `batches`, updating only the entries in `masks`.

    Gradients outside a mask are zeroed; entries outside it are restored after each step
    (AdamW's decoupled weight decay would otherwise shrink them). `lazy_rows`: {parameter
    name: function of a batch's inputs -> the rows that step updates}; those rows alone change,
    optimizer state included (a sparse optimizer's update). Returns the losses.
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
        step_masks = {**masks, **{n: _row_mask(params[n], rows(inputs)) for n, rows in (lazy_rows or {}).items()}}
        frozen = {n: params[n].detach().clone() for n in masks}
        state_before = {n: {key: v.clone() for key, v in _state_of(opt, params[n]).items()} for n in lazy_rows or {}}
        opt.zero_grad()
        loss = loss_fn(model(**inputs) if isinstance(inputs, dict) else model(*inputs), *targets)
        loss.backward()
        for n, mask in step_masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(mask)
        opt.step()
        with torch.no_grad():
            for n, mask in step_masks.items():
                params[n].copy_(torch.where(mask, params[n], frozen[n]))
            for n, before in state_before.items():
                for key, value in _state_of(opt, params[n]).items():
                    value.copy_(torch.where(step_masks[n], value, before.get(key, torch.zeros_like(value))))
        losses.append(loss.item())
    return losses


def _row_mask(p, rows):
    mask = torch.zeros(p.shape[0], *[1] * (p.dim() - 1), dtype=torch.bool)
    mask[rows] = True
    return mask


def _state_of(opt, p):
    """The optimizer's state tensors of p that have its shape (momentum, moments)."""
    return {k: v for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v) and v.shape == p.shape}


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


def padded_classifier_batches(vocab: int = 100, n: int = 3, t: int = 10, labels: int = 3, low: int = 0) -> list:
    """3 seeded ((input_ids, attention_mask), (labels,)) batches for a sequence classifier:
    token ids in [low, vocab), the first row padded after 6 tokens."""
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        mask = torch.ones(n, t, dtype=torch.int64)
        mask[0, 6:] = 0
        batches.append(((torch.randint(low, vocab, (n, t), generator=g), mask),
                        (torch.randint(0, labels, (n,), generator=g),)))
    return batches


def padded_lm_batches(n: int = 3, rows: int = 2, length: int = 12, vocab: int = 128, padded_row: int = 1,
                      padding: int = 4) -> list:
    """`n` seeded ((input_ids, attention_mask), (labels,)) batches for a causal LM: the last
    `padding` tokens of row `padded_row` are padding, masked out and labelled -100."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        mask = torch.ones(rows, length, dtype=torch.int64)
        mask[padded_row, length - padding:] = 0
        batches.append(((ids, mask), (ids.masked_fill(mask == 0, -100),)))
    return batches
