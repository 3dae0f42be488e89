"""Every kernel on image tensors gives the same values whatever the memory layout of each of its
operands: on the CPU the step holds them channels-last after the first convolution
(ops/layout.py), while the batch, constants and some gradients arrive plain, so kernels meet
every mix. (ATen's own kernels are not all safe with a mix: its channels-last group-norm
backward crashed when only the weight's gradient was asked for.)"""
from __future__ import annotations

import itertools

import pytest
import torch

from edgetune.compiler.ir.ops.registry import OPS

N, C, H, W = 2, 4, 6, 5
CONV = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
POOL = dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), ceil_mode=True)
AVG = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=False, count_include_pad=False,
           divisor_override=None)
UP = dict(mode="bilinear", output_size=(12, 10), scales=(None, None), align_corners=False, input_shape=(N, C, H, W))


def image(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*(shape or (N, C, H, W)), generator=torch.Generator().manual_seed(seed))


def vector(seed: int) -> torch.Tensor:
    return torch.rand(C, generator=torch.Generator().manual_seed(seed)) + 0.5


# op: (operands, attrs); operands that are 4-D are laid out every way
CALLS = {
    "conv": ([image(), image(3, C, 3, 3, seed=1)], CONV),
    "conv_grad_input": ([image(seed=2), image(C, C, 3, 3, seed=1)], {**CONV, "input_shape": (N, C, H, W)}),
    "conv_grad_weight": ([image(), image(seed=2)], {**CONV, "weight_shape": (C, C, 3, 3)}),
    "conv_transpose": ([image(), image(C, 3, 2, 2, seed=1)],
                       dict(stride=(2, 2), padding=(0, 0), dilation=(1, 1), groups=1, output_padding=(0, 0))),
    "batch_norm": ([image(), vector(1), vector(2), vector(3), vector(4)], dict(eps=1e-5)),
    "bn_grad_weight": ([image(seed=2), image(), vector(1), vector(2)], dict(eps=1e-5)),
    "bn_grad_affine": ([image(seed=2), image(), vector(1), vector(2)], dict(eps=1e-5)),
    "group_norm": ([image(), vector(1), vector(2)], dict(groups=2, eps=1e-5)),
    "gn_grad_input": ([image(seed=2), image(), vector(1)], dict(groups=2, eps=1e-5)),
    "gn_grad_weight": ([image(seed=2), image(), vector(1)], dict(groups=2, eps=1e-5)),
    "max_pool2d": ([image()], POOL),
    "max_pool2d_grad": ([image(N, C, 3, 3, seed=2), image()], POOL),
    "avg_pool2d_grad": ([image(N, C, 3, 3, seed=2)], {**AVG, "input_shape": (N, C, H, W)}),
    "adaptive_avg_pool2d_grad": ([image(N, C, 2, 2, seed=2)], dict(input_shape=(N, C, H, W))),
    "adaptive_max_pool2d_grad": ([image(N, C, 2, 2, seed=2), image()], dict(output_size=(2, 2))),
    "upsample2d": ([image()], {k: v for k, v in UP.items() if k != "input_shape"}),
    "upsample2d_grad": ([image(N, C, 12, 10, seed=2)], UP),
}


def layouts(operands: list[torch.Tensor]):
    """Each way of laying out the 4-D operands, plain or channels-last, one at a time."""
    images = [i for i, t in enumerate(operands) if t.dim() == 4]
    for formats in itertools.product((torch.contiguous_format, torch.channels_last), repeat=len(images)):
        laid = list(operands)
        for i, fmt in zip(images, formats):
            laid[i] = operands[i].contiguous(memory_format=fmt)
        yield laid


@pytest.mark.parametrize("op", sorted(CALLS))
def test_kernel_values_do_not_depend_on_the_layout(op):
    operands, attrs = CALLS[op]
    kernel = OPS[op].kernel
    expected = kernel(*operands, **attrs)
    for laid in layouts(operands):
        assert torch.allclose(kernel(*laid, **attrs), expected, rtol=1e-5, atol=1e-5), op
