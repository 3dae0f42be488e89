"""Ops the memory passes introduce: bit-packed activation masks and saved-slice copies.

Bit-packed masks: the 1 bit per element that a ReLU/ReLU6 backward really needs.

`pack_mask(y)` runs in the forward right after the activation and keeps
ceil(numel / 8) bytes; `masked_grad(g, mask)` is the activation's backward from them.
Introduced by passes/masks.py, never by the frontend.
"""
from __future__ import annotations

import math

import torch

from edgetune.ir.ops import register

def _bit_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)


def _pack(keep: torch.Tensor) -> torch.Tensor:
    flat = keep.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    bits = packed.unsqueeze(1).bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.view(-1)[: math.prod(shape)].view(shape)


def _pack_mask(y, *, lo, hi):
    """Bits of lo < y < hi (either bound may be None): where the gradient passes."""
    keep = y > lo if lo is not None else torch.ones_like(y, dtype=torch.bool)
    return _pack(keep if hi is None else keep & (y < hi))


def _masked_grad(g, packed):
    return torch.where(_unpack(packed, tuple(g.shape)), g, g.new_zeros(()))


register("pack_mask", _pack_mask, shape=lambda y, lo, hi: ((math.ceil(math.prod(y.shape) / 8),), torch.uint8))
register("masked_grad", _masked_grad)


# A fresh contiguous copy: a saved slice must not keep the whole tensor it was cut from alive.
register("copy", lambda x: x.clone(memory_format=torch.contiguous_format),
         lambda b, n, g, want: (g if want[0] else None,))
