"""The memory layout of image tensors in the torch kernels: channels-last on the CPU.

oneDNN's CPU convolutions work in NHWC; given plain NCHW tensors they reorder every operand
on every call. Measured one kernel at a time on MobileNetV2's shapes (128x128, one thread),
NHWC against NCHW: depthwise 3x3 forward, input and weight gradient 1.8-2.6x faster; a 1x1
conv, as one matrix product over all the batch's pixels, 1.3x faster at batch 8. So on
the CPU a 2-D convolution takes and gives channels-last tensors, and the elementwise ops
after it keep that layout. It changes no value, only the strides: a 4-D tensor's shape
stays [N, C, H, W].

The bit masks of ReLU-family activations (ops/masks.py) are packed and unpacked in the same
order, `pixel_major` below, so that both are views, not copies, of channels-last tensors.
"""
from __future__ import annotations

import torch

# Read at each call (not at compile time), so one process can time both layouts in turns.
CPU_CHANNELS_LAST = True


def channels_last_here(t: torch.Tensor) -> bool:
    """Whether the kernels lay out this [N, C, H, W] tensor's values channels-last."""
    return CPU_CHANNELS_LAST and t.dim() == 4 and t.device.type == "cpu"


def channels_last_on(device: torch.device, shape: tuple) -> bool:
    """The same for a tensor of this shape on this device, known at compile time."""
    return CPU_CHANNELS_LAST and len(shape) == 4 and device.type == "cpu"


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when already in NHWC memory, else an NHWC copy."""
    return t.contiguous(memory_format=torch.channels_last)


def pixel_major(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] as [N*H*W, C], one row per pixel: a view of a channels-last tensor (a
    copy of any other)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def empty_channels_last(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The format t is dense in: channels-last for an NHWC tensor, else plain (for a kernel
    that needs its operands alike)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
