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


class TrainedSlices:
    """Leaves holding exactly what a compiled trainer trains, for an eager reference of an
    optimizer whose state is shaped by the slice (a partially trained weight's slice is a leaf of
    its own, not the weight with a gradient mask). `weights()`: the model's trained parameters
    with the leaves written in, for torch.func.functional_call."""

    def __init__(self, model, trainer) -> None:
        self.params = dict(model.named_parameters())
        # name -> (axis, trained channels), or None for a whole tensor
        self.parts = {u.name: (u.part.axis, u.part.index.attrs["value"]) if u.part else None for u in trainer.updates}
        self.leaves = {n: (self.params[n].detach().index_select(*s) if s else self.params[n].detach())
                       .clone().requires_grad_() for n, s in self.parts.items()}

    def weights(self) -> dict:
        return {n: self.params[n].detach().index_copy(s[0], s[1], self.leaves[n]) if s else self.leaves[n]
                for n, s in self.parts.items()}


def assert_untrained_channels_kept(got, before, part) -> None:
    """The channels of a partially trained weight outside `part` (axis, trained channels) are
    bitwise as `before`: weight decay included, nothing moved them."""
    axis, trained = part
    untrained = torch.ones(got.shape[axis], dtype=torch.bool).index_fill_(0, trained, False).nonzero().flatten()
    assert torch.equal(got.index_select(axis, untrained), before.index_select(axis, untrained))


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


class GaLoreAdamWReference(torch.optim.Optimizer):
    """GaLore as galore-torch's GaLoreAdamW with proj_type "std", written out for eager PyTorch:
    every parameter given is a 2-D weight whose gradient is projected to `rank` (give the
    others to torch.optim.AdamW). The projector is the SVD's first `rank` right singular vectors
    (rows >= columns) or left ones (else), recomputed from the gradient every `update_gap`
    steps starting with the first; the moments live in the projected gradient's shape and are
    not re-projected. The SVD runs in float32 at least (float64 stays float64)."""

    def __init__(self, params, lr=1e-3, rank=128, update_gap=200, scale=0.25, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0):
        super().__init__(params, dict(lr=lr, rank=rank, update_gap=update_gap, scale=scale, betas=betas, eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, self.state[p], group)

    def _update(self, p, state, group):
        grad, rank = p.grad, group["rank"]
        right = grad.shape[0] >= grad.shape[1]
        if not state:
            state["step"] = 0
        if state["step"] % group["update_gap"] == 0:
            u, _, vh = torch.linalg.svd(grad.to(torch.promote_types(grad.dtype, torch.float32)), full_matrices=False)
            state["projector"] = (vh[:rank, :] if right else u[:, :rank]).to(grad.dtype)
        projector = state["projector"]
        low = grad @ projector.t() if right else projector.t() @ grad
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(low), torch.zeros_like(low)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"] * (1.0 - beta2 ** state["step"]) ** 0.5 / (1.0 - beta1 ** state["step"])
        norm_grad = exp_avg / denom
        norm_grad = (norm_grad @ projector if right else projector @ norm_grad) * group["scale"]
        p.add_(norm_grad, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
