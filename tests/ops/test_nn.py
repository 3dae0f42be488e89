"""Convolution, normalization, pooling, embedding: gradients vs torch.autograd."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tests.ops.harness import Buffer, check_each, check_grads, few, t

# -- convolution ----------------------------------------------------------------------------


@st.composite
def conv_case(draw, dims):
    groups = draw(st.sampled_from(["one", "two", "depthwise"]))
    per_group = draw(st.integers(1, 2))
    cin = {"one": per_group, "two": 2 * per_group, "depthwise": draw(st.integers(1, 4))}[groups]
    g = {"one": 1, "two": 2, "depthwise": cin}[groups]
    cout = g * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    reach = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    size = tuple(draw(st.integers(max(1, r - 2 * p), r + 4)) for r, p in zip(reach, padding))
    batch, bias = draw(st.integers(1, 2)), draw(st.booleans())
    x, w = t(batch, cin, *size), t(cout, cin // g, *kernel)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=g)
    return x, w, (t(cout) if bias else None), conv


@few(8)
@given(case=conv_case(2))
def test_conv2d(case):
    x, w, b, conv = case
    if b is None:
        check_grads(lambda x, w: F.conv2d(x, w, **conv), x, w)
    else:
        check_grads(lambda x, w, b: F.conv2d(x, w, b, **conv), x, w, b)


@few(5)
@given(case=conv_case(1))
def test_conv1d(case):
    x, w, b, conv = case
    conv = {k: v[0] if isinstance(v, tuple) else v for k, v in conv.items()}
    if b is None:
        check_grads(lambda x, w: F.conv1d(x, w, **conv), x, w)
    else:
        check_grads(lambda x, w, b: F.conv1d(x, w, b, **conv), x, w, b)


def test_depthwise_with_channel_multiplier():
    check_grads(lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1, groups=3), t(2, 3, 7, 6), t(6, 1, 3, 3), t(6))


@pytest.mark.parametrize("select", ["magnitude", "first"])
def test_partial_channels_of_a_grouped_conv(select):
    # RegNet's 3x3 convs are grouped, not depthwise: a ratio rule trains the chosen input
    # channels of every group. Three SGD steps against eager autograd with the same masks.
    import copy

    import edgetune as et
    from tests.reference import assert_models_match, train_eager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(6, 6, 3, padding=1, groups=3, stride=2), torch.nn.Tanh(),
                                torch.nn.Conv2d(6, 2, 1)).double()
    reference, initial = copy.deepcopy(model), model[2].weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    batches = [((torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64),),
                (torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64),)) for _ in range(3)]
    trainer = et.compile(model, F.mse_loss, *batches[0], scheme={"2.weight": {"ratio": 0.5, "select": select}},
                         optimizer=et.SGD(lr=0.1, momentum=0.9))
    masks = trainer.trained_masks()
    assert masks["2.weight"].sum() == 6 * 1 * 9  # one of each group's two input channels
    shapes = {n.attrs["weight_shape"] for n in trainer.graph.nodes if n.op == "conv_grad_weight"}
    assert shapes == {(6, 1, 3, 3)}  # the chosen slices' gradient alone, not the whole weight's
    losses = [trainer.step(*batch) for batch in batches]
    want = train_eager(reference, F.mse_loss, batches, masks, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert losses == pytest.approx(want, rel=1e-10)
    assert_models_match(model, reference, rtol=1e-10, atol=1e-12)
    assert not torch.equal(model[2].weight.detach(), initial)


@pytest.mark.parametrize("trained", ["input", "weight", "bias"])
def test_conv_one_operand_trained(trained):
    args = [t(2, 4, 6, 6, grad=trained == "input"), t(5, 4, 3, 3, grad=trained == "weight"),
            t(5, grad=trained == "bias")]
    check_grads(lambda x, w, b: F.conv2d(x, w, b, padding=1), *args)


def test_conv_of_channels_last_view():
    # The input arrives NHWC and is permuted inside fn: a non-contiguous conv input.
    check_grads(lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w, padding=1), t(2, 5, 6, 3), t(4, 3, 3, 3))


@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_conv_runs_as_a_matrix_product(bias):
    # 1x1, stride 1, unpadded, ungrouped: the kernels use matmul instead of ATen's conv.
    b = t(6) if bias else None
    check_grads(lambda x, w, b=None: F.conv2d(x, w, b), t(2, 4, 5, 3), t(6, 4, 1, 1), *([b] if bias else []))
    check_grads(lambda x, w: F.conv1d(x, w), t(3, 4, 7), t(2, 4, 1))
    check_grads(lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w), t(2, 5, 6, 3), t(4, 3, 1, 1))
    # one sample: the weight gradient is one product too (of a permuted input, a copy)
    check_grads(lambda x, w: F.conv2d(x, w), t(1, 4, 5, 3), t(6, 4, 1, 1))
    check_grads(lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w), t(1, 5, 6, 3), t(4, 3, 1, 1))
    check_grads(lambda x, w: F.conv1d(x, w), t(1, 4, 7), t(2, 4, 1))


@pytest.fixture(params=["channels_last", "nchw"])
def layout(request, monkeypatch):
    """The CPU kernels' image layout (ops/layout.py): channels-last, as steps run on the CPU,
    or plain NCHW, as on other devices."""
    from edgetune.compiler.ir.ops import layout

    monkeypatch.setattr(layout, "CPU_CHANNELS_LAST", request.param == "channels_last")
    return request.param


@pytest.mark.parametrize("kw, shapes", [
    (dict(), ((3, 4, 5, 3), (6, 4, 1, 1))),                      # pointwise: a product over pixels
    (dict(stride=2, padding=1, groups=4), ((2, 4, 7, 6), (4, 1, 3, 3))),  # depthwise, strided
    (dict(padding=1, dilation=2, groups=2), ((2, 4, 6, 6), (6, 2, 3, 3))),
    (dict(stride=(2, 1)), ((1, 3, 5, 5), (2, 3, 2, 2))),
    (dict(padding=1), ((1, 6, 2, 2), (8, 6, 3, 3))),  # a weight 12x its input: run in the plain layout
    (dict(padding=2, groups=6), ((2, 6, 3, 3), (6, 1, 5, 5))),  # a 5x5 depthwise weight gradient over few pixels
], ids=["pointwise", "depthwise", "grouped", "strided", "weight-heavy", "small-5x5-depthwise"])
def test_conv_in_both_layouts(layout, kw, shapes):
    x, w = (t(*s) for s in shapes)
    check_grads(lambda x, w, b: F.conv2d(x, w, b, **kw), x, w, t(w.shape[0]))
    # an input in the other layout than the kernels' reaches them too (a permuted input)
    check_grads(lambda x, w: F.conv2d(x.permute(0, 3, 1, 2), w, **kw), x.permute(0, 2, 3, 1).detach(), w)


def test_conv_kernels_give_channels_last_on_the_cpu(layout):
    from edgetune.compiler.ir.ops.registry import OPS

    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    heavy = torch.randn(40, 4, 3, 3)  # 1440 weight entries over a 288-entry input: the plain layout inside
    for kw, weight in ((dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=4), w),
                       (dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1), torch.randn(5, 4, 1, 1)),
                       (dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1), heavy)):
        y = OPS["conv"].kernel(x, weight, **kw)
        g = torch.randn(y.shape)
        gx = OPS["conv_grad_input"].kernel(g, weight, input_shape=tuple(x.shape), **kw)
        expected = F.conv2d(x, weight, **{k: v for k, v in kw.items()})
        assert torch.allclose(y, expected, atol=1e-5)
        cl = layout == "channels_last"
        assert y.is_contiguous(memory_format=torch.channels_last) == cl and y.is_contiguous() != cl
        assert gx.is_contiguous(memory_format=torch.channels_last) == cl


@pytest.mark.parametrize("kw, shapes", [
    (dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1), ((2, 4, 5, 3), (6, 4, 1, 1))),  # 1x1
    (dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=4), ((1, 4, 7, 6), (4, 1, 3, 3))),  # depthwise
    (dict(stride=(1, 1), padding=(1, 1), dilation=(2, 2), groups=2), ((2, 4, 6, 6), (6, 2, 3, 3))),  # grouped
    (dict(stride=(2, 1), padding=(0, 0), dilation=(1, 1), groups=1), ((1, 3, 5, 5), (2, 3, 2, 2))),  # strided
    (dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1), ((1, 6, 2, 2), (8, 6, 3, 3))),  # weight-heavy
], ids=["pointwise", "depthwise", "grouped", "strided", "weight-heavy"])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_kernels_bound_at_compile_time_give_the_generic_kernels_bits(layout, kw, shapes, bias):
    """OpDef.bind: the torch backend calls these instead of the generic kernels on the CPU."""
    from edgetune.compiler.ir.graph import Node
    from edgetune.compiler.ir.ops.registry import OPS

    x, w = torch.randn(shapes[0]), torch.randn(shapes[1])
    b = torch.randn(w.shape[0]) if bias else None
    leaf = lambda v: Node("input", (), {}, tuple(v.shape), v.dtype)  # noqa: E731
    cpu = torch.device("cpu")
    for x_in in (x, x.contiguous(memory_format=torch.channels_last)):  # as the frontend gives it, or NHWC
        y = OPS["conv"].kernel(x_in, w, b, **kw)
        g = torch.randn(y.shape).contiguous(memory_format=torch.channels_last)
        ins = (leaf(x), leaf(w)) + ((leaf(b),) if bias else ())
        conv = Node("conv", ins, kw, tuple(y.shape), y.dtype)
        grad_input = Node("conv_grad_input", (leaf(g), leaf(w)), {**kw, "input_shape": tuple(x.shape)}, tuple(x.shape),
                          x.dtype)
        grad_weight = Node("conv_grad_weight", (leaf(x), leaf(g)), {**kw, "weight_shape": tuple(w.shape)},
                           tuple(w.shape), w.dtype)
        generic = (y, OPS["conv_grad_input"].kernel(g, w, **grad_input.attrs),
                   OPS["conv_grad_weight"].kernel(x_in, g, **grad_weight.attrs))
        args = ((x_in, w) + ((b,) if bias else ()), (g, w), (x_in, g))
        for node, want, got_args in zip((conv, grad_input, grad_weight), generic, args):
            kernel = OPS[node.op].bind(node, cpu)
            if layout == "nchw":
                assert kernel is None  # the generic kernels serve
                continue
            got = kernel(*got_args)
            assert torch.equal(got, want) and got.stride() == want.stride(), node.op


def test_conv_padding_same():
    check_grads(lambda x, w: F.conv2d(x, w, padding="same"), t(1, 2, 6, 5), t(3, 2, 3, 3))
    check_grads(lambda x, w: F.conv1d(x, w, padding="same", dilation=2), t(2, 2, 7), t(3, 2, 4))
    check_grads(lambda x, w: F.conv1d(x, w, padding="same"), t(2, 2, 7), t(3, 2, 4))  # asymmetric: a pad op


def test_conv1d_unbatched_input():
    check_grads(lambda x, w, b: F.conv1d(x, w, b, padding=1), t(3, 8), t(2, 3, 3), t(2))


def test_conv_stack_with_relu6():
    def block(x, w1, b1, w2):
        return F.conv2d(F.relu6(F.conv2d(x, w1, b1, stride=2, padding=1)), w2, groups=4, padding=1)

    check_grads(block, t(2, 3, 8, 8), t(4, 3, 3, 3), t(4), t(4, 1, 3, 3))


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, output_padding=1), dict(groups=2, dilation=2),
                                dict(stride=(2, 1), padding=(0, 1))], ids=str)
def test_conv_transpose2d(kw):
    check_grads(lambda x, w, b: F.conv_transpose2d(x, w, b, **kw), t(2, 4, 4, 3), t(4, 3, 3, 2), t(3 * kw.get("groups", 1)))


def test_conv_transpose1d():
    check_grads(lambda x, w: F.conv_transpose1d(x, w, stride=3, padding=1), t(2, 3, 5), t(3, 2, 4))


# -- batch norm -----------------------------------------------------------------------------

BN_SHAPES = [(4, 3), (3, 3, 5), (2, 3, 4, 5)]


def _stats(c):
    return torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_eval(shape):
    rm, rv = _stats(shape[1])
    check_grads(lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3),
                t(*shape), rm, rv, t(3), t(3))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batch_norm_weight_and_bias_gradients_from_one_kernel(training):
    """From AFFINE_GRAD_TOGETHER entries on, one kernel gives both (bn_grad_affine)."""
    from edgetune.compiler.ir.ops.nn import AFFINE_GRAD_TOGETHER

    rm, rv = (None, None) if training else _stats(4)  # train: the batch's statistics
    shape = (2, 4, 8, AFFINE_GRAD_TOGETHER // 64)
    check_grads(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=training), t(*shape, grad=False), t(4), t(4))


def test_batch_norm_eval_running_stats_as_buffers_and_no_affine():
    rm, rv = _stats(3)
    check_grads(lambda x, rm, rv: F.batch_norm(x, rm, rv, training=False), t(2, 3, 4, 4), Buffer(rm), Buffer(rv))


@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_train_batch_statistics(shape):
    check_grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), t(*shape), t(3), t(3))


@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_train_updates_running_stats(shape):
    rm, rv = _stats(shape[1])
    check_grads(lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3),
                t(*shape), Buffer(rm), Buffer(rv), t(3), t(3), rtol=1e-12, atol=1e-12)


def test_batch_norm_train_no_affine_of_transposed_input():
    check_grads(lambda x: F.batch_norm(x.transpose(0, 1), None, None, training=True), t(3, 4, 5))


def test_batch_norm_train_only_affine_trained():
    check_grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), t(4, 3, 5, grad=False), t(3), t(3))


# -- layer norm -----------------------------------------------------------------------------

@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("shape,normalized", [((2, 3, 5), (5,)), ((2, 3, 4), (3, 4))], ids=str)
def test_layer_norm(affine, shape, normalized):
    w = t(*normalized) if affine != "none" else None
    b = t(*normalized) if affine == "both" else None
    check_grads(lambda x, w, b: F.layer_norm(x, normalized, w, b, eps=1e-5), t(*shape), w, b)


@pytest.mark.parametrize("scheme", ["full", "bias-only"])
def test_layer_norm_gradients_take_the_statistics_from_the_forward(scheme):
    """The forward's kernel keeps each row's mean and 1/std (passes/ln_stats.py): the backward
    computes them neither once for both gradients nor inside each."""
    import edgetune as et

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    trainer = et.compile(model, F.mse_loss, (torch.randn(3, 4),), (torch.randn(3, 2),),
                         scheme=et.schemes.full() if scheme == "full" else et.schemes.bias_only(), optimizer=et.SGD(0.1))
    nodes = trainer.graph.nodes
    ops = [n.op for n in nodes]
    assert "ln_stats" not in ops and "layer_norm" not in ops and ops.count("layer_norm_stats") == 1
    grads = [n for n in nodes if n.op in ("ln_grad_input", "ln_grad_weight")]
    assert {n.op for n in grads} == ({"ln_grad_input", "ln_grad_weight"} if scheme == "full" else {"ln_grad_input"})
    stats = {n.inputs[-1] for n in grads}
    assert len(stats) == 1 and stats.pop().op == "copy"


def test_layer_norm_statistics_kept_from_the_forward_match_eager():
    import edgetune as et

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.GELU(), torch.nn.Linear(6, 2))
    reference = copy.deepcopy(model)
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    trainer = et.compile(model, F.mse_loss, (x,), (y,), scheme=et.schemes.full(), optimizer=et.SGD(0.1))
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(3):
        trainer.step((x,), (y,))
        opt.zero_grad()
        F.mse_loss(reference(x), y).backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m: f"{name}: {m}")


def test_layer_norm_of_transposed_input():
    check_grads(lambda x, w, b: F.layer_norm(x.transpose(1, 2), (3,), w, b), t(2, 3, 4), t(3), t(3))


# -- group / instance norm ------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm(groups):
    check_grads(lambda x, w, b: F.group_norm(x, groups, w, b, eps=1e-4), t(2, 4, 3, 3), t(4), t(4))


def test_group_norm_no_affine_and_instance_norm():
    check_grads(lambda x: F.group_norm(x, 2), t(2, 4, 5))
    check_grads(lambda x, w, b: F.instance_norm(x, weight=w, bias=b), t(2, 3, 4, 4), t(3), t(3))


# -- pooling --------------------------------------------------------------------------------

def _variants(fn, *kws):
    """{description: x -> fn(x, **kw)} for check_each."""
    return {f"{fn.__name__}({kw})": (lambda x, kw=kw: fn(x, **kw)) for kw in kws}


def test_max_pool2d():
    check_each(_variants(F.max_pool2d, dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                         dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
                         dict(kernel_size=3, stride=2, ceil_mode=True), dict(kernel_size=2, dilation=2)),
               lambda: t(2, 3, 7, 8))


def test_max_pool1d_and_plain_layout_pools_with_many_channels():
    # The kernels take other routes for these (ATen's 1-D kernel; a channels-last copy).
    check_each(_variants(F.max_pool1d, dict(kernel_size=4), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                         dict(kernel_size=2, dilation=2)), lambda: t(2, 17, 11))
    check_each(_variants(F.max_pool2d, dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
               lambda: t(2, 16, 7, 8))


@pytest.mark.parametrize("shape, pool", [
    ((2, 32, 1, 50), dict(kernel_size=(1, 4), stride=(1, 4), padding=(0, 0), dilation=(1, 1), ceil_mode=False)),
    ((2, 32, 1, 51), dict(kernel_size=(1, 3), stride=(1, 2), padding=(0, 1), dilation=(1, 2), ceil_mode=True)),
    ((2, 16, 9, 9), dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=True)),
    ((1, 3, 8, 8), dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1), ceil_mode=False)),
], ids=["1d", "1d-dilated-ceil", "16-channels", "3-channels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_pool_kernels_give_atens_values_and_argmax_on_ties_and_nan(shape, pool, dtype):
    from edgetune.compiler.ir.ops.registry import OPS

    A = torch.ops.aten
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).relu()  # ties at zero
    x.view(-1)[5] = float("nan")
    want, argmax = A.max_pool2d_with_indices(x, *pool.values())
    g = torch.randn(want.shape, dtype=dtype)
    got = OPS["max_pool2d"].kernel(x, **pool)
    assert torch.equal(got.nan_to_num(-1.0), want.nan_to_num(-1.0)) and got.stride() == want.stride()
    grad = OPS["max_pool2d_grad"].kernel(g, x, **pool)
    assert torch.equal(grad, A.max_pool2d_with_indices_backward(g, x, *pool.values(), argmax))


def test_avg_pool2d():
    check_each(_variants(F.avg_pool2d, dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
                         dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
                         dict(kernel_size=(2, 3), stride=(2, 1), ceil_mode=True),
                         dict(kernel_size=3, padding=1, divisor_override=4)),
               lambda: t(2, 3, 7, 8))


def test_adaptive_pool2d():
    sizes = [dict(output_size=s) for s in (1, (3, 2), (5, 4), (7, 8))]
    check_each({**_variants(F.adaptive_avg_pool2d, *sizes), **_variants(F.adaptive_max_pool2d, *sizes[:2])},
               lambda: t(2, 3, 7, 8))


def test_pool_of_permuted_input():
    check_grads(lambda x: F.max_pool2d(x.permute(0, 3, 1, 2), 2) + F.avg_pool2d(x.permute(0, 3, 1, 2), 2),
                t(2, 6, 6, 3))


# -- upsampling -----------------------------------------------------------------------------

def test_interpolate():
    check_each(_variants(F.interpolate, dict(scale_factor=2), dict(size=(5, 7)), dict(scale_factor=2, mode="bilinear"),
                         dict(size=(5, 6), mode="bilinear", align_corners=True),
                         dict(scale_factor=1.5, mode="bilinear")),
               lambda: t(2, 2, 3, 4))


# -- embedding ------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_idx", [None, 3, -1])
@pytest.mark.parametrize("idx_shape", [(5,), (2, 4)], ids=str)
def test_embedding(padding_idx, idx_shape):
    idx = torch.randint(0, 6, idx_shape)
    idx.view(-1)[:3] = torch.tensor([0, 3, 5])  # the padding rows and a repeat are present
    idx.view(-1)[-1] = 3
    check_grads(lambda w, idx: F.embedding(idx, w, padding_idx=padding_idx), t(6, 4), idx)


def test_embedding_looked_up_twice():
    idx = torch.tensor([[1, 2, 1], [0, 2, 2]])
    check_grads(lambda w, idx: F.embedding(idx, w) * F.embedding(idx[:, 1:], w).sum((1, 2))[:, None, None],
                t(4, 3), idx)
