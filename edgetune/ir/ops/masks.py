"""Ops the memory passes introduce: bit-packed activation masks and saved-slice copies.

Bit-packed masks: the 1 bit per element that a ReLU/ReLU6 backward really needs.

`pack_mask(y, rule)` runs in the forward right after the activation and keeps
ceil(numel / 8) bytes; `masked_grad(g, mask)` is the activation's backward from them.
Introduced by passes/masks.py, never by the frontend.
"""
from __future__ import annotations

import math
import sys

import torch

from edgetune.ir.ops import register

# Packing: the 0/1 mask, viewed as rows of eight, times (1, 2, 4, ..., 128) is one BLAS
# matrix-vector product giving each byte (exact: sums of distinct powers of two below 256).
# Unpacking repeats the byte in all eight of an int64, keeps bit i of byte i, and turns each
# nonzero byte into 1 by adding 0x7F (only the top bit of the byte can become set) and
# shifting that bit down: a few passes over n/8 words, and the bytes are already 0/1.
_BIT_VALUES = [float(1 << i) for i in range(8)]
_REPEAT = 0x0101010101010101
_BIT_I_OF_BYTE_I = 0x8040201008040201 - (1 << 64)  # as a signed int64
_SEVEN_F = 0x7F7F7F7F7F7F7F7F
assert sys.byteorder == "little", "bit packing assumes a little-endian machine"


def _pack(passes: torch.Tensor) -> torch.Tensor:
    """0/1 values (any float dtype) -> one byte per eight, bit i = element i."""
    rows = passes.reshape(-1)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()  # half precision would round the sums
    pad = (-rows.numel()) % 8
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad)])
    return (rows.view(-1, 8) @ rows.new_tensor(_BIT_VALUES)).to(torch.uint8)


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """0/1 bytes (uint8: a multiply by them is 2-3x faster than by a bool tensor)."""
    words = (packed.to(torch.int64) * _REPEAT).bitwise_and_(_BIT_I_OF_BYTE_I)
    words = words.add_(_SEVEN_F).bitwise_right_shift_(7).bitwise_and_(_REPEAT)
    return words.view(torch.uint8)[: math.prod(shape)].view(shape)


# Packing and unpacking go chunk by chunk so their temporaries (the rule's float output, the
# 0/1 bytes, the widened words) stay small next to the activation itself. A multiple of 8,
# so chunks start on byte boundaries of the packed mask.
_CHUNK = 1 << 18


def _pack_mask(y, *, rule, rule_attrs):
    """Bits of "the gradient passes here": the activation's own gradient rule applied to ones,
    so the mask agrees with it exactly, bounds included."""
    from edgetune.ir.ops import OPS

    flat, one = y.reshape(-1), torch.ones((), dtype=y.dtype, device=y.device)
    packed = torch.empty(math.ceil(flat.numel() / 8), dtype=torch.uint8, device=y.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start: start + _CHUNK]
        passes = OPS[rule].kernel(one.expand(part.shape), part, **rule_attrs)
        packed[start // 8: start // 8 + math.ceil(part.numel() / 8)] = _pack(passes)
    return packed


def _masked_grad(g, packed):
    flat = g.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        bits = _unpack(packed[start // 8: math.ceil(stop / 8)], (stop - start,))
        torch.mul(flat[start:stop], bits, out=out[start:stop])
    return out.view(g.shape)


def _packed_shape(y, rule, rule_attrs):
    return (math.ceil(math.prod(y.shape) / 8),), torch.uint8


def _chunk_scratch(n) -> int:
    """One chunk's temporaries: the rule's output or the widened product, plus bytes and words."""
    size = min(math.prod(n.inputs[0].shape), _CHUNK)
    return size * (n.inputs[0].dtype.itemsize + 2)


register("pack_mask", _pack_mask, shape=_packed_shape, scratch=_chunk_scratch)
register("masked_grad", _masked_grad, scratch=_chunk_scratch)


# A fresh contiguous copy: a saved slice must not keep the whole tensor it was cut from alive.
register("copy", lambda x: x.clone(memory_format=torch.contiguous_format),
         lambda b, n, g, want: (g if want[0] else None,))
