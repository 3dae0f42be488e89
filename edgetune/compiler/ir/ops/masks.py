"""Ops the memory passes introduce: bit-packed activation masks and saved-slice copies.

Bit-packed masks: the 1 bit per element that a ReLU/ReLU6 backward really needs.

`pack_mask(y, rule)` runs in the forward right after the activation and keeps
ceil(numel / 8) bytes; `masked_grad(g, mask)` is the activation's backward from them.
Introduced by passes/masks.py, never by the frontend.
"""
from __future__ import annotations

import functools
import math

import torch

from edgetune.compiler.ir.ops.registry import register

# Packing: the 0/1 mask, viewed as rows of eight, times (1, 2, 4, ..., 128) is one BLAS
# matrix-vector product giving each byte (exact: sums of distinct powers of two below 256).
# Unpacking looks each byte up in a 256 x 8 table of its bits, already in the gradient's
# dtype. Both are a handful of kernel calls: at batch 1, where a mask is a few kilobytes,
# the calls cost more than the arithmetic.

@functools.cache
def _bit_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([float(1 << i) for i in range(8)], dtype=dtype, device=device)


@functools.cache
def _bits_of_byte(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    table = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return table.to(dtype=dtype, device=device)


def _pack(passes: torch.Tensor) -> torch.Tensor:
    """0/1 values (any float dtype) -> one byte per eight, bit i = element i."""
    rows = passes.reshape(-1)
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.float()  # half precision would round the sums
    pad = (-rows.numel()) % 8
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad)])
    return (rows.view(-1, 8) @ _bit_values(rows.dtype, rows.device)).to(torch.uint8)


def _unpack(packed: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The first n bits as 0/1 values of `dtype`."""
    return _bits_of_byte(dtype, packed.device).index_select(0, packed.int()).view(-1)[:n]


# Larger masks go chunk by chunk so their temporaries (the rule's float output, the looked-up
# bits) stay small next to the activation itself. A multiple of 8, so chunks start on byte
# boundaries of the packed mask.
_CHUNK = 1 << 18


def _pack_mask(y, *, rule, rule_attrs):
    """Bits of "the gradient passes here": the activation's own gradient rule applied to ones,
    so the mask agrees with it exactly, bounds included."""
    from edgetune.compiler.ir.ops.registry import OPS

    flat, one = y.reshape(-1), torch.ones((), dtype=y.dtype, device=y.device)
    if flat.numel() <= _CHUNK:
        return _pack(OPS[rule].kernel(one.expand(flat.shape), flat, **rule_attrs))
    packed = torch.empty(math.ceil(flat.numel() / 8), dtype=torch.uint8, device=y.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start: start + _CHUNK]
        passes = OPS[rule].kernel(one.expand(part.shape), part, **rule_attrs)
        packed[start // 8: start // 8 + math.ceil(part.numel() / 8)] = _pack(passes)
    return packed


def _masked_grad(g, packed):
    flat = g.reshape(-1)
    if flat.numel() <= _CHUNK:
        return (flat * _unpack(packed, flat.numel(), g.dtype)).view(g.shape)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        bits = _unpack(packed[start // 8: math.ceil(stop / 8)], stop - start, g.dtype)
        torch.mul(flat[start:stop], bits, out=out[start:stop])
    return out.view(g.shape)


def _packed_shape(y, rule, rule_attrs):
    return (math.ceil(math.prod(y.shape) / 8),), torch.uint8


def _chunk_scratch(n) -> int:
    """One chunk's temporaries: the rule's output or the looked-up bits, plus bytes and indices."""
    size = min(math.prod(n.inputs[0].shape), _CHUNK)
    return size * (n.inputs[0].dtype.itemsize + 2)


# ONNX: the same bit layout and the same two tricks (bit i of byte j = element 8j + i): a
# MatMul with the bit values packs, a Gather from the 256 x 8 table unpacks. Each is one
# kernel over the mask, where uint8 shifts and masks took three (BitShift, BitwiseAnd, Cast)
# over eight times as many entries.

def _pack_mask_onnx(ctx, n, xs):
    """The rule's own lowering on (1, y) gives 0/1 per element; rows of eight times the bit
    values sum to their byte (exact in float32: distinct powers of two below 256)."""
    from edgetune.compiler.ir.graph import Node
    from edgetune.compiler.ir.ops.registry import OPS

    y = n.inputs[0]
    rule = Node(n.attrs["rule"], (y, y), dict(n.attrs["rule_attrs"]), tuple(y.shape), y.dtype)
    if OPS[rule.op].onnx is None:
        raise NotImplementedError(f"the mask's rule '{rule.op}' has no ONNX lowering")
    passes = OPS[rule.op].onnx(ctx, rule, [ctx.scalar(1, y.dtype), xs[0]])  # a one broadcasts: no tensor of ones
    exact = y.dtype if y.dtype in (torch.float32, torch.float64) else torch.float32
    rows = ctx.op("Reshape", ctx.convert(passes, y.dtype, exact), ctx.ints([-1]))
    pad = (-math.prod(y.shape)) % 8
    if pad:
        rows = ctx.op("Pad", rows, ctx.ints([0, pad]))
    # The bit values as a column [8, 1]: onnxruntime's MatMul by a 1-D [8] is 28x slower.
    column = ctx.const(_bit_values(exact, torch.device("cpu")).reshape(8, 1))
    byte = ctx.op("MatMul", ctx.op("Reshape", rows, ctx.ints([-1, 8])), column)
    return ctx.cast(ctx.op("Reshape", byte, ctx.ints([-1])), torch.uint8)


def _masked_grad_onnx(ctx, n, xs):
    g, packed = xs
    count = math.prod(n.shape)
    table = ctx.const(_bits_of_byte(n.dtype, torch.device("cpu")))
    bits = ctx.op("Gather", table, ctx.cast(packed, torch.int32), axis=0)
    flat = ctx.op("Slice", ctx.op("Reshape", bits, ctx.ints([-1])), ctx.ints([0]), ctx.ints([count]))
    kept = ctx.op("Mul", ctx.op("Reshape", g, ctx.ints([-1])), flat)
    return ctx.op("Reshape", kept, ctx.ints(n.shape))


register("pack_mask", _pack_mask, shape=_packed_shape, scratch=_chunk_scratch, onnx=_pack_mask_onnx)
register("masked_grad", _masked_grad, shape=lambda g, packed: (tuple(g.shape), g.dtype), scratch=_chunk_scratch,
         onnx=_masked_grad_onnx)


# A fresh contiguous copy: a saved slice must not keep the whole tensor it was cut from alive.
register("copy", lambda x: x.clone(memory_format=torch.contiguous_format),
         lambda b, n, g, want: (g if want[0] else None,), onnx=lambda ctx, n, xs: ctx.op("Identity", xs[0]))
