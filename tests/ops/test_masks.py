"""The bit-mask kernels: a masked gradient equals the activation's own backward, element for
element, on either packing route (numpy on the CPU, the generic one elsewhere), at the
rule's bounds, across chunk edges, and written over its input."""
from __future__ import annotations

import math

import pytest
import torch

from edgetune.compiler.ir.ops import masks
from edgetune.compiler.ir.ops.registry import OPS

RULES = {"relu_grad": ("relu", {}), "hardtanh_grad": ("hardtanh", {"min": 0.0, "max": 6.0})}


def activation_output(rule: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A forward output with values exactly at the rule's bounds; for ReLU a NaN among them
    (torch's hardtanh_backward itself treats a NaN one way or the other by its position)."""
    forward, attrs = RULES[rule]
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) * 5
    x[: n // 4] = torch.tensor([0.0, 6.0, -0.0, 7.0])[torch.arange(n // 4) % 4].to(dtype)
    y = OPS[forward].kernel(x, **attrs)
    if rule == "relu_grad":
        y[n // 2] = float("nan")
    return y


@pytest.fixture(params=["numpy", "numpy-multiply", "generic"])
def route(request, monkeypatch):
    """numpy packs and unpacks, torch or numpy multiplies (numpy only where its dtypes allow);
    or the generic route, torch throughout."""
    if request.param == "numpy-multiply":
        monkeypatch.setattr(masks, "_NUMPY_MULTIPLY_DTYPES", (torch.float32, torch.float64, torch.float16))
        monkeypatch.setattr(masks, "_TORCH_SPLITS_ABOVE", 1 << 62)
    else:
        monkeypatch.setattr(masks, "_TORCH_SPLITS_ABOVE", -1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    if request.param == "generic":
        monkeypatch.setattr(masks, "_numpy_pack", lambda *a: None)
        monkeypatch.setattr(masks, "_numpy_unpack", lambda *a: None)
    return request.param


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("n", [5, 8, 1001, 2 * masks._CHUNK + 13], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_masked_grad_is_the_rules_backward(route, rule, n, dtype):
    attrs = RULES[rule][1]
    y = activation_output(rule, n, dtype).view(1, -1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed = masks._pack_mask(y, rule=rule, rule_attrs=attrs)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 7) // 8,)
    expected = OPS[rule].kernel(g, y, **attrs)
    assert torch.equal(masks._masked_grad(g, packed), expected)
    into = g.clone()
    assert torch.equal(masks._masked_grad_inplace(into, packed), expected) and torch.equal(into, expected)


def test_both_routes_pack_the_same_bits(monkeypatch):
    y = activation_output("hardtanh_grad", 3 * masks._CHUNK + 5, torch.float32)
    by_numpy = masks._pack_mask(y, rule="hardtanh_grad", rule_attrs=RULES["hardtanh_grad"][1])
    monkeypatch.setattr(masks, "_numpy_pack", lambda *a: None)
    assert torch.equal(by_numpy, masks._pack_mask(y, rule="hardtanh_grad", rule_attrs=RULES["hardtanh_grad"][1]))


def test_inplace_over_a_non_contiguous_gradient_returns_a_fresh_result():
    y = activation_output("relu_grad", 64, torch.float32).view(8, 8)
    g = torch.randn(8, 8).t()
    packed = masks._pack_mask(y, rule="relu_grad", rule_attrs={})
    assert torch.equal(masks._masked_grad_inplace(g, packed), OPS["relu_grad"].kernel(g, y))


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("y_layout, g_layout", [("cl", "cl"), ("cl", "nchw"), ("nchw", "cl"), ("nchw", "nchw")])
def test_image_masks_whatever_the_layouts(monkeypatch, channels_last, y_layout, g_layout):
    """On the CPU the bits of an image tensor follow its pixels (ops/layout.py); an activation
    and its gradient in different layouts still pair element for element."""
    from edgetune.compiler.ir.ops import layout

    monkeypatch.setattr(layout, "CPU_CHANNELS_LAST", channels_last)

    def laid_out(t, name):
        return t.contiguous(memory_format=torch.channels_last if name == "cl" else torch.contiguous_format)

    y = laid_out(activation_output("hardtanh_grad", 2 * 5 * 7 * 3, torch.float32).view(2, 5, 7, 3), y_layout)
    g = laid_out(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)), g_layout)
    attrs = RULES["hardtanh_grad"][1]
    packed = masks._pack_mask(y, rule="hardtanh_grad", rule_attrs=attrs)
    expected = OPS["hardtanh_grad"].kernel(g, y, **attrs)
    assert torch.equal(masks._masked_grad(g, packed), expected)
    into = g.clone(memory_format=torch.preserve_format)
    out = masks._masked_grad_inplace(into, packed)
    assert torch.equal(out, expected)
    # written over the gradient wherever its memory is in the bits' order
    assert (out.data_ptr() == into.data_ptr()) == (not channels_last and g_layout == "nchw" or channels_last and g_layout == "cl")


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("y_layout, g_layout", [("cl", "cl"), ("nchw", "cl"), ("cl", "nchw")])
@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mask_kernels_bound_at_compile_time_give_the_generic_kernels_bits(monkeypatch, channels_last, y_layout,
                                                                         g_layout, rule, dtype):
    """OpDef.bind: the torch backend calls these on the CPU for a mask of one chunk; a gradient
    whose memory is not in the bits' order gets a fresh result, as from the generic kernel."""
    from edgetune.compiler.ir.graph import Node
    from edgetune.compiler.ir.ops import layout

    monkeypatch.setattr(layout, "CPU_CHANNELS_LAST", channels_last)

    def laid_out(t, name):
        return t.contiguous(memory_format=torch.channels_last if name == "cl" else torch.contiguous_format)

    y = laid_out(activation_output(rule, 2 * 5 * 7 * 3, dtype).view(2, 5, 7, 3), y_layout)
    g = laid_out(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype), g_layout)
    attrs = RULES[rule][1]
    y_node = Node("input", (), {}, tuple(y.shape), dtype)
    pack = Node("pack_mask", (y_node,), dict(rule=rule, rule_attrs=attrs), (math.ceil(y.numel() / 8),), torch.uint8)
    packed = masks._pack_mask(y, rule=rule, rule_attrs=attrs)
    assert torch.equal(OPS["pack_mask"].bind(pack, torch.device("cpu"))(y), packed)

    g_node = Node("input", (), {}, tuple(g.shape), dtype)
    masked = Node("masked_grad_inplace", (g_node, pack), {}, tuple(g.shape), dtype)
    bound = OPS["masked_grad_inplace"].bind(masked, torch.device("cpu"))
    want_into, got_into = g.clone(memory_format=torch.preserve_format), g.clone(memory_format=torch.preserve_format)
    want, got = masks._masked_grad_inplace(want_into, packed), bound(got_into, packed)
    assert torch.equal(got, want) and got.stride() == want.stride()
    assert (got.data_ptr() == got_into.data_ptr()) == (want.data_ptr() == want_into.data_ptr())


def test_masks_larger_than_a_chunk_or_not_in_numpy_keep_the_generic_kernels():
    from edgetune.compiler.ir.graph import Node

    def pack_of(shape, dtype, device="cpu"):
        y = Node("input", (), {}, shape, dtype)
        node = Node("pack_mask", (y,), dict(rule="relu_grad", rule_attrs={}), (math.ceil(math.prod(shape) / 8),),
                    torch.uint8)
        return OPS["pack_mask"].bind(node, torch.device(device))

    assert pack_of((4, 8), torch.float32) is not None
    assert pack_of((masks._CHUNK + 8,), torch.float32) is None
    assert pack_of((4, 8), torch.bfloat16) is None
    assert pack_of((4, 8), torch.float32, "meta") is None
