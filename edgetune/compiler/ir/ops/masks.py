"""Ops the memory passes introduce: bit-packed activation masks and saved-slice copies.

Bit-packed masks: the 1 bit per element that a ReLU/ReLU6 backward really needs.

`pack_mask(y, rule)` runs in the forward right after the activation and keeps
ceil(numel / 8) bytes; `masked_grad(g, mask)` is the activation's backward from them.
Introduced by passes/masks.py, never by the frontend.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from edgetune.compiler.ir.ops.layout import channels_last_here, channels_last_on, empty_channels_last, pixel_major
from edgetune.compiler.ir.ops.registry import register

# On the CPU, in a dtype numpy has, the two rules the pass masks (ReLU, ReLU6) are packed
# by numpy: its comparisons are vectorised and write one byte per element, and
# np.packbits / np.unpackbits turn eight of those into a byte and back. Against the BLAS
# route below, on this project's 2-core machine, one thread, float32: pack 0.07 ms instead
# of 0.46 for 256K elements (1.6 instead of 4.6 for 2M); unpack and multiply 0.33 instead of
# 0.45. The bits are the same either way.
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def _passes(y: np.ndarray, rule: str, attrs: dict) -> np.ndarray | None:
    """Where `rule` lets the gradient through, as its vectorised kernel decides it, or None for
    a rule this does not know. (On a NaN, torch's own hardtanh_backward blocks in its
    vectorised body and passes in its scalar tail; this blocks.)"""
    if rule == "relu_grad":  # threshold_backward(g, y, 0): zero where y <= 0, so NaN passes
        return np.logical_not(y <= 0)
    if rule == "hardtanh_grad":  # hardtanh_backward: g where min < y < max
        return np.logical_and(y > attrs["min"], y < attrs["max"])
    return None


def _numpy_pack(part: torch.Tensor, rule: str, attrs: dict) -> torch.Tensor | None:
    if part.device.type != "cpu" or part.dtype not in _NUMPY_DTYPES:
        return None
    passes = _passes(part.numpy(), rule, attrs)
    return None if passes is None else torch.from_numpy(np.packbits(passes, bitorder="little"))


def _numpy_unpack(packed: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The first n bits as uint8 0/1 (a multiply promotes them to the gradient's dtype)."""
    if packed.device.type != "cpu" or dtype not in _NUMPY_DTYPES:
        return None
    return torch.from_numpy(_unpacked_bytes(packed, n))


def _unpacked_bytes(packed: torch.Tensor, n: int) -> np.ndarray:
    """The first n bits of a CPU mask, one uint8 0/1 each."""
    return np.unpackbits(packed.numpy(), count=n, bitorder="little")


# Elsewhere (CUDA, bfloat16, other rules): the 0/1 mask, viewed as rows of eight, times
# (1, 2, 4, ..., 128) is one BLAS matrix-vector product giving each byte (exact: sums of
# distinct powers of two below 256).
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


def _pack_part(part: torch.Tensor, rule: str, attrs: dict) -> torch.Tensor:
    """Bits of "the gradient passes here" for a flat chunk: where numpy knows the rule, its
    comparisons; else the activation's own gradient rule applied to ones. Either way the
    mask agrees with the rule exactly, bounds included."""
    from edgetune.compiler.ir.ops.registry import OPS

    packed = _numpy_pack(part, rule, attrs)
    if packed is not None:
        return packed
    one = torch.ones((), dtype=part.dtype, device=part.device)
    return _pack(OPS[rule].kernel(one.expand(part.shape), part, **attrs))


def _bits(packed: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    bits = _numpy_unpack(packed, n, dtype)
    return bits if bits is not None else _unpack(packed, n, dtype)


def _in_mask_order(t: torch.Tensor) -> torch.Tensor:
    """t's elements flat, in the order the mask's bits follow: pixel by pixel for an image
    tensor the CPU kernels keep channels-last (layout.py; then a view), else t's own order."""
    return pixel_major(t).reshape(-1) if channels_last_here(t) else t.reshape(-1)


def _dense_in_mask_order(t: torch.Tensor) -> bool:
    if channels_last_here(t):
        return t.is_contiguous(memory_format=torch.channels_last)
    return t.is_contiguous()


def _pack_mask(y, *, rule, rule_attrs):
    flat = _in_mask_order(y)
    if flat.numel() <= _CHUNK:
        return _pack_part(flat, rule, rule_attrs)
    packed = torch.empty(math.ceil(flat.numel() / 8), dtype=torch.uint8, device=y.device)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start: start + _CHUNK]
        packed[start // 8: start // 8 + math.ceil(part.numel() / 8)] = _pack_part(part, rule, rule_attrs)
    return packed


# The multiply by the unpacked 0/1 bytes: torch's kernel, mixing uint8 into float, is slower
# than numpy's on one thread (262K float32 entries, this project's 2-core machine: 155 us
# against 94) and equal below 64K entries, where it runs on one thread anyway; on two threads
# it splits a large chunk and wins (65 us against 95). Both multiply, so the values are the same.
_NUMPY_MULTIPLY_DTYPES = (torch.float32, torch.float64)
_TORCH_SPLITS_ABOVE = 1 << 16


def _multiply_in_numpy(g: torch.Tensor) -> bool:
    return (g.device.type == "cpu" and g.dtype in _NUMPY_MULTIPLY_DTYPES
            and (g.numel() <= _TORCH_SPLITS_ABOVE or torch.get_num_threads() == 1))


def _multiply_by_bits(out: torch.Tensor, g: torch.Tensor, packed: torch.Tensor) -> None:
    """out = g * (the first g.numel() bits of `packed`); flat tensors, `out` may be `g`."""
    if _multiply_in_numpy(g):
        np.multiply(g.numpy(), _unpacked_bytes(packed, g.numel()), out=out.numpy())
    else:
        torch.mul(g, _bits(packed, g.numel(), g.dtype), out=out)


def _masked_grad_into(out, g, packed):
    """out = g where the bits say the gradient passes, else 0; `out` may be `g` itself."""
    flat, into = _in_mask_order(g), _in_mask_order(out)
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        _multiply_by_bits(into[start:stop], flat[start:stop], packed[start // 8: math.ceil(stop / 8)])
    return out


def _masked_grad(g, packed):
    if channels_last_here(g):
        out = empty_channels_last(g.shape, g)
    else:
        out = torch.empty_like(g, memory_format=torch.contiguous_format)
    return _masked_grad_into(out, g, packed)


def _masked_grad_inplace(g, packed):
    # The gradient dies here (passes/inplace.py): its memory takes the result.
    if not _dense_in_mask_order(g):
        return _masked_grad(g, packed)
    return _masked_grad_into(g, g, packed)


# -- bound to one node at compile time (OpDef.bind) ------------------------------------------
# At batch 1 a mask is a few thousand entries and numpy's work on it a few microseconds; the
# generic kernels' checks (device, dtype, layout, chunks) cost as much again. Where a node's
# mask fits one chunk in a dtype numpy has, the checks are made here once: the same numpy
# calls in the same order, so the same bits. (MobileNetV2-0.35's masks at batch 1, one thread:
# pack 8-16 us bound against 12-20, unpack and multiply 7-21 against 19-33.)
_NUMPY_RULES = ("relu_grad", "hardtanh_grad")


def _flat_in_mask_order(device: torch.device, shape: tuple):
    """`_in_mask_order` with its layout decided for this device and shape."""
    if channels_last_on(device, shape):
        return lambda t: t.permute(0, 2, 3, 1).reshape(-1)
    return lambda t: t.reshape(-1)


def _bind_pack_mask(n, device):
    y, rule, attrs = n.inputs[0], n.attrs["rule"], n.attrs["rule_attrs"]
    if device.type != "cpu" or y.dtype not in _NUMPY_DTYPES or rule not in _NUMPY_RULES or math.prod(y.shape) > _CHUNK:
        return None
    flat = _flat_in_mask_order(device, y.shape)

    def pack_mask(y):
        return torch.from_numpy(np.packbits(_passes(flat(y).numpy(), rule, attrs), bitorder="little"))
    return pack_mask


def _bind_masked_grad_inplace(n, device):
    g, count = n.inputs[0], math.prod(n.inputs[0].shape)
    if device.type != "cpu" or g.dtype not in _NUMPY_MULTIPLY_DTYPES or count > _TORCH_SPLITS_ABOVE:
        return None  # (above that size torch's multiply, on more than one thread, is the faster)
    layout = torch.channels_last if channels_last_on(device, g.shape) else torch.contiguous_format
    flat = _flat_in_mask_order(device, g.shape)

    def masked_grad_inplace(g, packed):
        if not g.is_contiguous(memory_format=layout):
            return _masked_grad(g, packed)
        values = flat(g).numpy()  # a view of g
        np.multiply(values, _unpacked_bytes(packed, count), out=values)
        return g
    return masked_grad_inplace


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


register("pack_mask", _pack_mask, shape=_packed_shape, scratch=_chunk_scratch, onnx=_pack_mask_onnx,
         bind=_bind_pack_mask)
register("masked_grad", _masked_grad, shape=lambda g, packed: (tuple(g.shape), g.dtype), scratch=_chunk_scratch,
         inplace=_masked_grad_inplace, inplace_bind=_bind_masked_grad_inplace, onnx=_masked_grad_onnx)


# A fresh contiguous copy: a saved slice must not keep the whole tensor it was cut from alive.
register("copy", lambda x: x.clone(memory_format=torch.contiguous_format),
         lambda b, n, g, want: (g if want[0] else None,), onnx=lambda ctx, n, xs: ctx.op("Identity", xs[0]))
