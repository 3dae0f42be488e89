"""Neural-network ops: convolution, normalization, pooling, upsampling, embedding, gather."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgetune.compiler.ir.ops.registry import ChannelSlice, aten, register
from edgetune.compiler.ir.ops.core import scalar
from edgetune.compiler.ir.ops.layout import channels_last_here, channels_last_on, memory_format_of, to_channels_last

A = torch.ops.aten


# -- convolution (1-D and 2-D, any stride/padding/dilation/groups) --------------------------

def is_pointwise(weight_shape, stride, padding, groups) -> bool:
    """A 1x1 conv with stride 1, no padding and no groups: a matrix product per sample. BLAS
    runs it faster than ATen's CPU convolution (measured on MobileNetV2's shapes: forward
    1.0-1.4x, input gradient 1.2-2.5x) and without a layout-reordering buffer."""
    return groups == 1 and all(k == 1 for k in weight_shape[2:]) and all(s == 1 for s in stride) and not any(padding)


# Channels-last is not for every convolution: given a channels-last input, ATen lays the
# whole weight out channels-last at every call, forward and backward. Where the weight is
# much larger than the input (ResNet-18's last stages: a [512, 512, 3, 3] weight over 2x2
# pixels) that copy is the call's cost, and the plain layout, with the activations turned
# around it (small, by this rule), is faster. Measured one call at a time, one thread, plain
# against channels-last: [1, 512, 2, 2] x [512, 512, 3, 3] forward 0.81 against 1.81 ms, input
# gradient 0.96 against 1.52; batch 8, 3.9 against 7.5; [1, 128, 8, 8] x [128, 128, 3, 3]
# (weight / input 18) 0.21 against 0.25 forward, alike backward; [1, 64, 16, 16] x [64, 64, 3,
# 3] (2.3) alike forward, channels-last 1.24x faster backward; depthwise and 1x1 convs keep it.
WEIGHT_HEAVY = 8  # weight entries per input entry


def _weight_heavy(x_shape, w_shape) -> bool:
    return math.prod(w_shape) >= WEIGHT_HEAVY * math.prod(x_shape)


# oneDNN's channels-last weight gradient of a grouped conv with a kernel larger than 3x3 is
# slow over few pixels (EfficientNet's 5x5 depthwise convs in its last stages): measured one
# call at a time, one thread, plain against channels-last, [1, 1152, 3, 3] 0.62-0.76 against
# 1.7-3.5 ms, [1, 672, 6, 6] stride 2 0.37-0.47 against 1.0, stride 1 0.77-0.87 against 1.1-1.8;
# from [1, 240, 12, 12] (144 output pixels) channels-last is the faster (0.63-0.71 against
# 0.76-0.83), and for 3x3 kernels it is at every size measured.
SMALL_GROUPED_GRAD_PIXELS = 64  # output pixels, the batch's together


def _small_grouped_weight_grad(g_shape, w_shape, groups) -> bool:
    return (groups > 1 and math.prod(w_shape[2:]) > 9
            and g_shape[0] * math.prod(g_shape[2:]) <= SMALL_GROUPED_GRAD_PIXELS)


def _conv(x, w, b=None, *, stride, padding, dilation, groups):
    if channels_last_here(x):  # layout.py: oneDNN's NHWC kernels, one product for a 1x1 conv
        return _channels_last_conv(tuple(x.shape), tuple(w.shape), stride, padding, dilation, groups)(x, w, b)
    if is_pointwise(w.shape, stride, padding, groups):
        y = torch.matmul(w.flatten(1), x.flatten(2)).view(x.shape[0], w.shape[0], *x.shape[2:])
        return y if b is None else y.add_(b.view(-1, *[1] * (x.dim() - 2)))
    return A.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_grad_input(g, w, *, input_shape, stride, padding, dilation, groups):
    if channels_last_here(g):
        return _channels_last_conv_grad_input(tuple(input_shape), tuple(w.shape), stride, padding, dilation,
                                              groups)(g, w)
    if is_pointwise(w.shape, stride, padding, groups):
        return torch.matmul(w.flatten(1).t(), g.flatten(2)).view(input_shape)
    # Only the input's shape is needed. An uninitialized stand-in is never read, so its pages
    # are never touched; a zero-stride expand would be copied to contiguous memory in full.
    fake_x = g.new_empty(input_shape)
    return A.convolution_backward(g, fake_x, w, None, stride, padding, dilation, False,
                                  [0] * len(stride), groups, [True, False, False])[0]


def _conv_grad_weight(x, g, *, weight_shape, stride, padding, dilation, groups):
    if channels_last_here(x):
        return _channels_last_conv_grad_weight(tuple(x.shape), tuple(g.shape), tuple(weight_shape), stride, padding,
                                               dilation, groups)(x, g)
    if x.shape[0] == 1 and is_pointwise(weight_shape, stride, padding, groups):
        # One sample: g [Co, pixels] times x [pixels, Ci], a single BLAS product without
        # copies, 1.2-1.9x faster than ATen's at MobileNetV2's 1x1 shapes (with more samples
        # the product needs a transposed copy or a sum of products and is not faster).
        return (g.reshape(g.shape[1], -1) @ x.reshape(x.shape[1], -1).t()).view(weight_shape)
    fake_w = g.new_empty(weight_shape)  # shape only, as above
    return A.convolution_backward(g, x, fake_w, None, stride, padding, dilation, False,
                                  [0] * len(stride), groups, [False, True, False])[1]


# -- on the CPU, channels-last: each kernel chosen from the shapes -----------------------------
# The three functions below make a convolution's choices (a 1x1 conv as a matrix product, the
# plain layout for a weight-heavy conv) from its shapes and return the kernel that carries
# them out. The generic kernels above call them at each call; the torch backend calls them
# once per node at compile time (OpDef.bind) and then calls only what they return: at batch 1
# a step makes about a hundred convolution calls, and the choices and their views cost as much
# as a small 1x1 product (MobileNetV2's 1x1 convs at batch 1, one thread: 15 us bound against
# 19-26 us generic). One function for both keeps their values the same, bit for bit.

def _channels_last_conv(x_shape, w_shape, stride, padding, dilation, groups):
    batch, cin, h, wd = x_shape
    cout = w_shape[0]
    if is_pointwise(w_shape, stride, padding, groups):
        def conv_1x1(x, w, b=None):  # pixel rows times the weight, back to an NHWC view
            rows = F.linear(x.permute(0, 2, 3, 1).reshape(-1, cin), w.reshape(cout, cin), b)
            return rows.view(batch, h, wd, cout).permute(0, 3, 1, 2)
        return conv_1x1
    no_output_padding = [0] * len(stride)
    if _weight_heavy(x_shape, w_shape):
        def conv_plain(x, w, b=None):
            return A.convolution(x.contiguous(), w, b, stride, padding, dilation, False, no_output_padding,
                                 groups).contiguous(memory_format=torch.channels_last)
        return conv_plain

    def conv_nhwc(x, w, b=None):
        return A.convolution(x.contiguous(memory_format=torch.channels_last), w, b, stride, padding, dilation,
                             False, no_output_padding, groups)
    return conv_nhwc


def _channels_last_conv_grad_input(input_shape, w_shape, stride, padding, dilation, groups):
    batch, cin, h, wd = input_shape
    cout = w_shape[0]
    if is_pointwise(w_shape, stride, padding, groups):
        def conv_1x1_grad_input(g, w):
            rows = torch.mm(g.permute(0, 2, 3, 1).reshape(-1, cout), w.reshape(cout, cin))
            return rows.view(batch, h, wd, cin).permute(0, 3, 1, 2)
        return conv_1x1_grad_input
    mask, no_output_padding = [True, False, False], [0] * len(stride)
    if _weight_heavy(input_shape, w_shape):
        def conv_plain_grad_input(g, w):
            return A.convolution_backward(g.contiguous(), g.new_empty(input_shape), w, None, stride, padding,
                                          dilation, False, no_output_padding, groups,
                                          mask)[0].contiguous(memory_format=torch.channels_last)
        return conv_plain_grad_input

    def conv_nhwc_grad_input(g, w):
        fake_x = torch.empty(input_shape, dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
        return A.convolution_backward(g.contiguous(memory_format=torch.channels_last), fake_x, w, None, stride,
                                      padding, dilation, False, no_output_padding, groups, mask)[0]
    return conv_nhwc_grad_input


def _channels_last_conv_grad_weight(x_shape, g_shape, weight_shape, stride, padding, dilation, groups):
    cout, cin = weight_shape[:2]
    if is_pointwise(weight_shape, stride, padding, groups):
        def conv_1x1_grad_weight(x, g):  # [Co, pixels] times [pixels, Ci]: one product over the whole batch
            g_rows, x_rows = g.permute(0, 2, 3, 1).reshape(-1, cout), x.permute(0, 2, 3, 1).reshape(-1, cin)
            return torch.mm(g_rows.t(), x_rows).view(weight_shape)
        return conv_1x1_grad_weight
    mask, no_output_padding = [False, True, False], [0] * len(stride)
    layout = (torch.contiguous_format if _weight_heavy(x_shape, weight_shape)
              or _small_grouped_weight_grad(g_shape, weight_shape, groups) else torch.channels_last)

    def conv_grad_weight(x, g):
        fake_w = g.new_empty(weight_shape)  # shape only
        return A.convolution_backward(g.contiguous(memory_format=layout), x.contiguous(memory_format=layout),
                                      fake_w, None, stride, padding, dilation, False, no_output_padding, groups,
                                      mask)[1]
    return conv_grad_weight


def _conv_attrs(n) -> tuple:
    a = n.attrs
    return a["stride"], a["padding"], a["dilation"], a["groups"]


def _bind_conv(n, device):
    x, w = n.inputs[:2]
    return _channels_last_conv(x.shape, w.shape, *_conv_attrs(n)) if channels_last_on(device, x.shape) else None


def _bind_conv_grad_input(n, device):
    g, w = n.inputs
    return (_channels_last_conv_grad_input(n.attrs["input_shape"], w.shape, *_conv_attrs(n))
            if channels_last_on(device, g.shape) else None)


def _bind_conv_grad_weight(n, device):
    x, g = n.inputs
    return (_channels_last_conv_grad_weight(x.shape, g.shape, n.attrs["weight_shape"], *_conv_attrs(n))
            if channels_last_on(device, x.shape) else None)


def _conv_vjp(b, n, g, want):
    x, w = n.inputs[:2]
    conv = {k: n.attrs[k] for k in ("stride", "padding", "dilation", "groups")}
    gx = b.emit("conv_grad_input", g, w, input_shape=tuple(x.shape), **conv) if want[0] else None
    gw = _conv_weight_grad(b, n, g, want[1], conv) if want[1] else None
    gb = None
    if len(n.inputs) == 3 and want[2]:
        gb = b.emit("sum", g, dims=(0,) + tuple(range(2, len(g.shape))), keepdim=False)
    return (gx, gw, gb)[: len(n.inputs)]


def _conv_weight_grad(b, n, g, want, conv):
    x, w = n.inputs[:2]
    if not isinstance(want, ChannelSlice):
        return b.emit("conv_grad_weight", x, g, weight_shape=tuple(w.shape), **conv)
    if conv["groups"] == 1 and want.axis == 1:
        # Only the k chosen input channels of x are needed for those k weight slices.
        shape = (w.shape[0], want.k) + tuple(w.shape[2:])
        return b.emit("conv_grad_weight", take_channels(b, x, want, dim=1), g, weight_shape=shape, **conv)
    if conv["groups"] == x.shape[1] == w.shape[0] and want.axis == 0:
        # Depthwise: channel c of the weight sees only channel c of x and of g.
        shape = (want.k,) + tuple(w.shape[1:])
        xs, gs = take_channels(b, x, want, dim=1), take_channels(b, g, want, dim=1)
        return b.emit("conv_grad_weight", xs, gs, weight_shape=shape, **{**conv, "groups": want.k})
    if want.axis == 1:
        # Grouped (RegNet, ResNeXt): the chosen channels are the same input channels of every
        # group; those of x alone, group after group, make a grouped conv of k channels a group.
        groups, per_group = conv["groups"], w.shape[1]
        chosen = (torch.arange(groups)[:, None] * per_group + want.index.attrs["value"][None, :]).flatten()
        xs = b.emit("index_select", x, b.const(chosen), dim=1)
        shape = (w.shape[0], want.k) + tuple(w.shape[2:])
        return b.emit("conv_grad_weight", xs, g, weight_shape=shape, **conv)
    raise NotImplementedError(f"partial-channel update of a grouped conv weight {w.name} (groups={conv['groups']}) "
                              f"along axis {want.axis}")


def take_channels(b, x, part: ChannelSlice, dim: int):
    """x restricted to the chosen channels along `dim`: a view for 0..k-1, else a gather."""
    if part.first:
        return b.emit("slice", x, dim=dim, start=0, end=part.k, step=1)
    return b.emit("index_select", x, part.index, dim=dim)


def _conv_scratch(n) -> int:
    # Measured on CPU (oneDNN): a convolution on plain NCHW tensors reorders into its blocked
    # layout, holding a second buffer the size of its largest operand (input, output or, for
    # wide 1x1 convs, the weight) while it runs. In a sparse step's forward this sets the peak.
    # Channels-last operands (layout.py, the CPU) need less; the final plan measures that
    # (backends/scratch.py), while the passes keep this device-independent upper figure.
    # The matrix product of a pointwise conv allocates only its output.
    a = n.attrs
    if is_pointwise(n.inputs[1].shape, a["stride"], a["padding"], a["groups"]):
        return 0
    return max(v.nbytes for v in (n, *n.inputs[:2]))


def _onnx_conv_attrs(a, kernel_shape):
    return dict(kernel_shape=list(kernel_shape), strides=list(a["stride"]), pads=list(a["padding"]) * 2,
                dilations=list(a["dilation"]), group=a["groups"])


def _conv_onnx(ctx, n, xs):
    return ctx.op("Conv", *xs, **_onnx_conv_attrs(n.attrs, n.inputs[1].shape[2:]))


def _conv_grad_input_onnx(ctx, n, xs):
    """The transposed convolution with the same weight; `output_padding` restores the trailing
    rows a strided conv never read (their gradient is zero). A grouped conv of stride 1 (a
    depthwise one) is a plain Conv instead: onnxruntime's grouped ConvTranspose is 4-16x
    slower than its grouped Conv at MobileNetV2's shapes (measured one op at a time)."""
    a, (g, w) = n.attrs, n.inputs
    if a["groups"] > 1 and all(s == 1 for s in a["stride"]) and \
            all(d * (k - 1) >= p for d, k, p in zip(a["dilation"], w.shape[2:], a["padding"])):
        return _grouped_grad_input_as_conv(ctx, n, xs)
    reached = [s * (o - 1) + d * (k - 1) + 1 - 2 * p
               for s, o, d, k, p in zip(a["stride"], g.shape[2:], a["dilation"], w.shape[2:], a["padding"])]
    extra = [want - got for want, got in zip(a["input_shape"][2:], reached)]
    return ctx.op("ConvTranspose", *xs, output_padding=extra, **_onnx_conv_attrs(a, w.shape[2:]))


def _grouped_grad_input_as_conv(ctx, n, xs):
    """Stride 1: the input's gradient is g convolved with the weight flipped in space, each
    group's in and out channels swapped, padded so that the output has the input's size."""
    a, (g, w) = n.attrs, n.inputs
    groups, (co, ci_g), kernel = a["groups"], w.shape[:2], list(w.shape[2:])
    co_g, rank = co // groups, len(w.shape)
    swapped = ctx.op("Reshape", xs[1], ctx.ints([groups, co_g, ci_g] + kernel))
    swapped = ctx.op("Transpose", swapped, perm=[0, 2, 1] + list(range(3, rank + 1)))
    swapped = ctx.op("Reshape", swapped, ctx.ints([groups * ci_g, co_g] + kernel))
    spatial = list(range(2, rank))
    flipped = ctx.op("Slice", swapped, ctx.ints([-1] * len(spatial)), ctx.ints([-(2**63)] * len(spatial)),
                     ctx.ints(spatial), ctx.ints([-1] * len(spatial)))
    pads = [d * (k - 1) - p for d, k, p in zip(a["dilation"], kernel, a["padding"])]
    return ctx.op("Conv", xs[0], flipped, kernel_shape=kernel, pads=pads * 2, dilations=list(a["dilation"]),
                  group=groups)


def _conv_grad_weight_onnx(ctx, n, xs):
    a = n.attrs
    if is_pointwise(a["weight_shape"], a["stride"], a["padding"], a["groups"]):
        return _pointwise_grad_weight(ctx, *xs, n.inputs[0].shape, a["weight_shape"])
    return _onnx_weight_correlation(ctx, *xs, n.inputs[0].shape, n.inputs[1].shape, a, a["weight_shape"])


def _pointwise_grad_weight(ctx, x, g, x_shape, weight_shape):
    """A 1x1 conv's weight gradient is a matrix product, g [Co, pixels] times x [pixels, Ci],
    summed over samples: a Gemm for one sample, a batched MatMul for more (onnxruntime runs
    the conv-shaped correlation 2-20x slower at MobileNetV2's late-block shapes)."""
    batch, (co, ci) = x_shape[0], weight_shape[:2]
    g3 = ctx.op("Reshape", g, ctx.ints([batch, co, -1]))
    x3 = ctx.op("Reshape", x, ctx.ints([batch, ci, -1]))
    if batch == 1:
        gw = ctx.op("Gemm", ctx.op("Reshape", g3, ctx.ints([co, -1])), ctx.op("Reshape", x3, ctx.ints([ci, -1])),
                    transB=1)
    else:
        per_sample = ctx.op("MatMul", g3, ctx.op("Transpose", x3, perm=[0, 2, 1]))
        gw = ctx.reduce("ReduceSum", per_sample, [0], keepdims=False)
    return ctx.op("Reshape", gw, ctx.ints(weight_shape))


def _onnx_weight_correlation(ctx, x, g, x_shape, g_shape, a, weight_shape):
    """gw[o, i] = sum over samples of x[n, i] correlated with g[n, o]: itself a convolution, with
    the channels as the batch and the samples as the channels, stride and dilation swapped.
    Groups stay groups: x becomes [Ci, groups * N, ...], each group's samples one group's input."""
    batch, groups, spatial = x_shape[0], a["groups"], list(x_shape[2:])
    per_group, rank = x_shape[1] // groups, len(x_shape)
    xt = ctx.op("Reshape", x, ctx.ints([batch, groups, per_group] + spatial))
    xt = ctx.op("Transpose", xt, perm=[2, 1, 0] + list(range(3, rank + 1)))
    xt = ctx.op("Reshape", xt, ctx.ints([per_group, groups * batch] + spatial))
    gt = ctx.op("Transpose", g, perm=[1, 0] + list(range(2, rank)))
    swapped = dict(stride=a["dilation"], dilation=a["stride"], padding=a["padding"], groups=groups)
    corr = ctx.op("Conv", xt, gt, **_onnx_conv_attrs(swapped, g_shape[2:]))
    gw = ctx.op("Transpose", corr, perm=[1, 0] + list(range(2, rank)))
    kernel = list(weight_shape[2:])  # the correlation may run past the kernel's extent
    return ctx.op("Slice", gw, ctx.ints([0] * len(kernel)), ctx.ints(kernel), ctx.ints(range(2, rank)))


register("conv", _conv, _conv_vjp, scratch=_conv_scratch, measure_scratch=True, onnx=_conv_onnx, bind=_bind_conv)


def _depthwise_backward_scratch(n) -> int:
    # Measured on CPU (oneDNN): a depthwise conv's input gradient allocates a second buffer
    # of the gradient's size while it runs; other convolutions allocate next to nothing.
    groups = n.attrs["groups"]
    return n.nbytes if groups > 1 and groups == n.shape[1] else 0


register("conv_grad_input", _conv_grad_input, scratch=_depthwise_backward_scratch, measure_scratch=True,
         onnx=_conv_grad_input_onnx, bind=_bind_conv_grad_input)
register("conv_grad_weight", _conv_grad_weight, measure_scratch=True, onnx=_conv_grad_weight_onnx,
         bind=_bind_conv_grad_weight)


@aten(A.convolution.default)
def _(b, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    inputs = (x, w) if bias is None else (x, w, bias)
    conv = dict(stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups)
    if transposed:
        return b.emit("conv_transpose", *inputs, output_padding=tuple(output_padding), **conv)
    return b.emit("conv", *inputs, **conv)


# -- transposed convolution (decoders, upsampling): the same ATen kernels, transposed=True ----

def _convt(x, w, b=None, **a):
    return A.convolution(x, w, b, a["stride"], a["padding"], a["dilation"], True, a["output_padding"], a["groups"])


def _convt_backward(g, x, w, mask, a):
    return A.convolution_backward(g, x, w, None, a["stride"], a["padding"], a["dilation"], True,
                                  a["output_padding"], a["groups"], mask)


def _convt_vjp(b, n, g, want):
    x, w = n.inputs[:2]
    if isinstance(want[1], ChannelSlice):
        raise NotImplementedError(f"partial-channel update of a transposed conv weight {w.name}")
    gx = b.emit("conv_transpose_grad_input", g, w, input_shape=tuple(x.shape), **n.attrs) if want[0] else None
    gw = b.emit("conv_transpose_grad_weight", x, g, weight_shape=tuple(w.shape), **n.attrs) if want[1] else None
    gb = None
    if len(n.inputs) == 3 and want[2]:
        gb = b.emit("sum", g, dims=(0,) + tuple(range(2, len(g.shape))), keepdim=False)
    return (gx, gw, gb)[: len(n.inputs)]


# ONNX's ConvTranspose is torch's (weight [Cin, Cout / groups, ...], the same output size). Its
# gradients are the ordinary convolution's own, the other way round: the input's is the conv of
# g with the same weight; the weight's correlates g (as the conv's input) with x.

def _convt_onnx(ctx, n, xs):
    a = n.attrs
    return ctx.op("ConvTranspose", *xs, output_padding=list(a["output_padding"]),
                  **_onnx_conv_attrs(a, n.inputs[1].shape[2:]))


def _convt_grad_weight_onnx(ctx, n, xs):
    x, g = xs
    return _onnx_weight_correlation(ctx, g, x, n.inputs[1].shape, n.inputs[0].shape, n.attrs, n.attrs["weight_shape"])


register("conv_transpose", _convt, _convt_vjp, measure_scratch=True, onnx=_convt_onnx)
register("conv_transpose_grad_input", lambda g, w, input_shape, **a: _convt_backward(
    g, g.new_empty(1).expand(input_shape), w, [True, False, False], a)[0], measure_scratch=True,
    onnx=lambda ctx, n, xs: ctx.op("Conv", *xs, **_onnx_conv_attrs(n.attrs, n.inputs[1].shape[2:])))
register("conv_transpose_grad_weight", lambda x, g, weight_shape, **a: _convt_backward(
    g, x, g.new_empty(1).expand(weight_shape), [False, True, False], a)[1], measure_scratch=True,
    onnx=_convt_grad_weight_onnx)


# -- batch norm: y = (x - mean) * rsqrt(var + eps) * weight + bias ---------------------------
# mean/var are the batch statistics (train) or the running buffers (eval). In train mode they
# are `mean`/`var` nodes of x, so x's gradient through the statistics comes from their VJPs.

def _bn_shape(x):
    return (1, -1) + (1,) * (len(x.shape) - 2)


def _bn(x, mean, var, w, bias, *, eps):
    # The fused kernel, normalizing with the statistics given (batch or running).
    return torch.nn.functional.batch_norm(x, mean, var, w, bias, training=False, eps=eps)


def _bn_scale(w, var, *, eps):
    # The per-channel factor of the normalization, w / sqrt(var + eps): its own node, so that
    # a frozen BN's is computed once, not in every op that reads it (backends/invariants.py).
    return w * torch.rsqrt(var + eps)


def _bn_grad_input(g, scale):
    return g * scale.view(_bn_shape(g))


def _bn_grad_input_inplace(g, scale):
    return g.mul_(scale.view(_bn_shape(g)))


def _bn_grad_weight(g, x, mean, var, *, eps):
    # ATen's fused kernel reduces sum(g * (x - mean)) in one pass without temporaries (3x
    # faster than spelling it out); `train=False` makes it use the statistics given.
    return A.native_batch_norm_backward(g, x, None, mean, var, None, None, False, eps, [False, True, False])[1]


# A BN whose weight and bias both train gets both gradients from one kernel from this many
# entries of its gradient on: ATen sums g for the bias in the pass that reduces g * (x - mean)
# for the weight, where a separate sum reads g again (about 0.2 ns an entry here: [8, 96, 32,
# 32] 303 against 481 us, one thread), but the packing costs two calls more (about 10 us at
# batch 1: MobileNetV2-0.35's full step was 4% slower with every BN so fused).
AFFINE_GRAD_TOGETHER = 1 << 16


def _bn_grad_affine(g, x, mean, var, *, eps):
    """The weight's and the bias's gradients, packed."""
    _, gw, gb = A.native_batch_norm_backward(g, x, None, mean, var, None, None, False, eps, [False, True, True])
    return torch.cat([gw, gb])


def _bn_grad_mean(g, scale):
    return -g.sum(_bn_dims(g.dim())) * scale


def _bn_grad_var(g, x, mean, w, var, *, eps):
    s = _bn_shape(x)
    return (g * (x - mean.view(s))).sum(_bn_dims(x.dim())) * w * -0.5 * torch.rsqrt(var + eps) ** 3


def _bn_dims(ndim):
    return (0,) + tuple(range(2, ndim))


def _bn_vjp(b, n, g, want):
    x, mean, var, w, _ = n.inputs
    eps = n.attrs["eps"]
    scale = b.emit("bn_scale", w, var, eps=eps) if want[0] or want[1] else None
    if want[3] and want[4] and math.prod(g.shape) >= AFFINE_GRAD_TOGETHER:
        affine, c = b.emit("bn_grad_affine", g, x, mean, var, eps=eps), w.shape[0]
        grad_w, grad_bias = (b.emit("slice", affine, dim=0, start=k * c, end=(k + 1) * c, step=1) for k in (0, 1))
    else:
        grad_w = b.emit("bn_grad_weight", g, x, mean, var, eps=eps) if want[3] else None
        grad_bias = b.emit("sum", g, dims=_bn_dims(len(g.shape)), keepdim=False) if want[4] else None
    return (
        b.emit("bn_grad_input", g, scale) if want[0] else None,
        b.emit("bn_grad_mean", g, scale) if want[1] else None,
        b.emit("bn_grad_var", g, x, mean, w, var, eps=eps) if want[2] else None,
        grad_w,
        grad_bias,
    )


# ONNX lowerings of the batch-norm family, term by term as the kernels compute them.

def _onnx_channels(ctx, v, rank):
    """A per-channel vector shaped to broadcast over [N, C, ...]."""
    return ctx.op("Reshape", v, ctx.ints([1, -1] + [1] * (rank - 2)))


def _onnx_rsqrt(ctx, var, eps, dtype):
    return ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", var, ctx.scalar(eps, dtype))))


def _onnx_sum_centered(ctx, n, g, x, mean):
    """sum(g * (x - mean)) per channel."""
    rank = len(n.inputs[0].shape)
    centered = ctx.op("Sub", x, _onnx_channels(ctx, mean, rank))
    return ctx.reduce("ReduceSum", ctx.op("Mul", g, centered), _bn_dims(rank), keepdims=False)


def _bn_onnx(ctx, n, xs):
    # ONNX's `epsilon` attribute is a float32: eps is added to var in var's own dtype instead.
    x, mean, var, w, bias = xs
    var_eps = ctx.op("Add", var, ctx.scalar(n.attrs["eps"], n.inputs[2].dtype))
    return ctx.op("BatchNormalization", x, w, bias, mean, var_eps, epsilon=0.0)


def _bn_scale_onnx(ctx, n, xs):
    w, var = xs
    return ctx.op("Mul", w, _onnx_rsqrt(ctx, var, n.attrs["eps"], n.dtype))


def _bn_grad_input_onnx(ctx, n, xs):
    g, scale = xs
    return ctx.op("Mul", g, _onnx_channels(ctx, scale, len(n.shape)))


def _bn_grad_weight_onnx(ctx, n, xs):
    g, x, mean, var = xs
    return ctx.op("Mul", _onnx_sum_centered(ctx, n, g, x, mean), _onnx_rsqrt(ctx, var, n.attrs["eps"], n.dtype))


def _bn_grad_affine_onnx(ctx, n, xs):
    g = xs[0]
    grad_bias = ctx.reduce("ReduceSum", g, _bn_dims(len(n.inputs[0].shape)), keepdims=False)
    return ctx.op("Concat", _bn_grad_weight_onnx(ctx, n, xs), grad_bias, axis=0)


def _bn_grad_mean_onnx(ctx, n, xs):
    g, scale = xs
    total = ctx.op("Neg", ctx.reduce("ReduceSum", g, _bn_dims(len(n.inputs[0].shape)), keepdims=False))
    return ctx.op("Mul", total, scale)


def _bn_grad_var_onnx(ctx, n, xs):
    g, x, mean, w, var = xs
    r = _onnx_rsqrt(ctx, var, n.attrs["eps"], n.dtype)
    scaled = ctx.op("Mul", ctx.op("Mul", _onnx_sum_centered(ctx, n, g, x, mean), w), ctx.scalar(-0.5, n.dtype))
    return ctx.op("Mul", scaled, ctx.op("Mul", ctx.op("Mul", r, r), r))


register("batch_norm", _bn, _bn_vjp, onnx=_bn_onnx)
register("bn_scale", _bn_scale, onnx=_bn_scale_onnx)
register("bn_grad_input", _bn_grad_input, inplace=_bn_grad_input_inplace, onnx=_bn_grad_input_onnx)
register("bn_grad_weight", _bn_grad_weight, onnx=_bn_grad_weight_onnx)
register("bn_grad_affine", _bn_grad_affine, onnx=_bn_grad_affine_onnx)
register("bn_grad_mean", _bn_grad_mean, onnx=_bn_grad_mean_onnx)
register("bn_grad_var", _bn_grad_var, onnx=_bn_grad_var_onnx)


# -- an eval-mode BN folded into the frozen conv before it (passes/fold_bn.py) ----------------
# conv(x, w) then BN = conv(x, w * s) + (beta - mean * s), s = gamma / sqrt(var + eps) (a
# bn_scale node): the BN's pass over the activation becomes a pass over the (often much
# smaller) weight.

def _fold_bn_weight(w, scale):
    return w * scale.view((-1,) + (1,) * (w.dim() - 1))


def _fold_bn_bias(beta, mean, scale):
    return torch.addcmul(beta, mean, scale, value=-1)


def _fold_bn_bias_vjp(b, n, g, want):
    # The pass folds only frozen scales and statistics: the BN bias alone can train through it.
    if any(want[1:]):
        raise AssertionError(f"{n.name}: a folded BN's scale or statistics cannot train")
    return (g if want[0] else None, None, None)


def _fold_bn_weight_onnx(ctx, n, xs):
    w, scale = xs
    return ctx.op("Mul", w, ctx.op("Reshape", scale, ctx.ints([-1] + [1] * (len(n.shape) - 1))))


def _fold_bn_bias_onnx(ctx, n, xs):
    beta, mean, scale = xs
    return ctx.op("Sub", beta, ctx.op("Mul", mean, scale))


register("fold_bn_weight", _fold_bn_weight, onnx=_fold_bn_weight_onnx)
register("fold_bn_bias", _fold_bn_bias, _fold_bn_bias_vjp, onnx=_fold_bn_bias_onnx)


def _affine_or_default(b, t, x, fill):
    return t if t is not None else b.const(torch.full((x.shape[1],), fill, dtype=x.dtype))


@aten(A._native_batch_norm_legit_no_training.default)
def _(b, x, w, bias, running_mean, running_var, momentum, eps):
    w, bias = _affine_or_default(b, w, x, 1.0), _affine_or_default(b, bias, x, 0.0)
    return b.emit("batch_norm", x, running_mean, running_var, w, bias, eps=eps), None, None


@aten(A._native_batch_norm_legit_functional.default)
def _(b, x, w, bias, running_mean, running_var, training, momentum, eps):
    w, bias = _affine_or_default(b, w, x, 1.0), _affine_or_default(b, bias, x, 0.0)
    if not training:
        y = b.emit("batch_norm", x, running_mean, running_var, w, bias, eps=eps)
        return y, None, None, running_mean, running_var
    y, mean, var = _bn_batch_stats(b, x, w, bias, eps)
    count = x.shape[0] * math.prod(x.shape[2:])
    new_mean = _lerp(b, running_mean, mean, momentum)
    unbiased = b.emit("mul", var, scalar(b, count / max(count - 1, 1), like=var))
    return y, None, None, new_mean, _lerp(b, running_var, unbiased, momentum)


@aten(A._native_batch_norm_legit.no_stats)
def _(b, x, w, bias, training, momentum, eps):
    # F.batch_norm(training=True) without running statistics: batch statistics, nothing to update.
    w, bias = _affine_or_default(b, w, x, 1.0), _affine_or_default(b, bias, x, 0.0)
    return _bn_batch_stats(b, x, w, bias, eps)[0], None, None


def _bn_batch_stats(b, x, w, bias, eps):
    dims = _bn_dims(len(x.shape))
    mean = b.emit("mean", x, dims=dims, keepdim=False)
    var = b.emit("var", x, dims=dims, correction=0, keepdim=False)
    return b.emit("batch_norm", x, mean, var, w, bias, eps=eps), mean, var


def _lerp(b, old, new, momentum):
    """old * (1 - m) + new * m, as PyTorch updates running statistics."""
    new = b.emit("cast", new, dtype=old.dtype) if new.dtype != old.dtype else new
    keep, take = scalar(b, 1.0 - momentum, like=old), scalar(b, momentum, like=old)
    return b.emit("add", b.emit("mul", old, keep), b.emit("mul", new, take))


# -- layer norm over the trailing `normalized_shape` dims -----------------------------------

def _ln(x, w, bias, *, normalized_shape, eps):
    return torch.nn.functional.layer_norm(x, normalized_shape, w, bias, eps)


def _ln_stats(x, normalized_shape, eps):
    # ATen's forward kernel gives mean and 1/std in one pass (torch.var alone takes ~8x longer).
    _, mean, rstd = A.native_layer_norm(x, normalized_shape, None, None, eps)
    return mean, rstd


def _ln_stats_packed(x, *, normalized_shape, eps):
    """Mean and 1/std of each normalized row, as one [2, rows] tensor: computed once in the
    backward when both the input's and the weight's gradients need them."""
    mean, rstd = _ln_stats(x, normalized_shape, eps)
    return torch.stack([mean.reshape(-1), rstd.reshape(-1)])


def _unpacked_stats(x, stats, normalized_shape, eps):
    if stats is None:
        return _ln_stats(x, normalized_shape, eps)
    kept = x.shape[: x.dim() - len(normalized_shape)] + (1,) * len(normalized_shape)
    return stats[0].view(kept), stats[1].view(kept)


def _ln_grad_input(g, x, w, stats=None, *, normalized_shape, eps):
    mean, rstd = _unpacked_stats(x, stats, normalized_shape, eps)
    return A.native_layer_norm_backward(g, x, normalized_shape, mean, rstd, w, None, [True, False, False])[0]


def _ln_grad_weight(g, x, stats=None, *, normalized_shape, eps):
    mean, rstd = _unpacked_stats(x, stats, normalized_shape, eps)
    ones = torch.ones(normalized_shape, dtype=x.dtype, device=x.device)  # the kernel wants a weight to grade
    return A.native_layer_norm_backward(g, x, normalized_shape, mean, rstd, ones, None, [False, True, False])[1]


def _layer_norm_stats(x, w, bias, *, normalized_shape, eps):
    """layer_norm's output and then each row's mean and 1/std, in one flat buffer: the kernel
    computes the statistics on its way, and they are kept instead of dropped (passes/ln_stats.py
    gives them to the backward). Packed by a cat: ATen's `out=` form of the kernel copies its
    output inside as well, and takes longer (ViT's [8, 257, 64]: 112 us against 100; 28
    against 17 at batch 1)."""
    y, mean, rstd = A.native_layer_norm(x, normalized_shape, w, bias, eps)
    return torch.cat([y.reshape(-1), mean.reshape(-1), rstd.reshape(-1)])


def _layer_norm_stats_onnx(ctx, n, xs):
    x, w, bias = xs
    mean, centered, rstd, _ = _onnx_ln_moments(ctx, x, n.inputs[0], n.attrs["normalized_shape"], n.attrs["eps"])
    y = ctx.op("Add", ctx.op("Mul", ctx.op("Mul", centered, rstd), w), bias)
    flat = lambda v: ctx.op("Reshape", v, ctx.ints([-1]))  # noqa: E731
    return ctx.op("Concat", flat(y), flat(mean), flat(rstd), axis=0)


def _ln_vjp(b, n, g, want):
    x, w, _ = n.inputs
    ln = dict(n.attrs)
    lead = tuple(range(len(x.shape) - len(ln["normalized_shape"])))
    # The gradients need the statistics: one op computes them for both (ViT full backprop: the
    # two gradients took 5.8 ms a step recomputing them each, eager's fused backward 1.4 ms),
    # and passes/ln_stats.py takes them from the forward where it can.
    stats = (b.emit("ln_stats", x, **ln),) if want[0] or want[1] else ()
    return (
        b.emit("ln_grad_input", g, x, w, *stats, **ln) if want[0] else None,
        b.emit("ln_grad_weight", g, x, *stats, **ln) if want[1] else None,
        b.emit("sum", g, dims=lead, keepdim=False) if want[2] else None,
    )


def _onnx_ln_moments(ctx, x, x_node, normalized_shape, eps):
    """(mean, x - mean, rstd, axes) over the trailing dims (mean and rstd with kept dims)."""
    axes = list(range(len(x_node.shape) - len(normalized_shape), len(x_node.shape)))
    mean = ctx.reduce("ReduceMean", x, axes, keepdims=True)
    centered = ctx.op("Sub", x, mean)
    var = ctx.reduce("ReduceMean", ctx.op("Mul", centered, centered), axes, keepdims=True)
    return mean, centered, _onnx_rsqrt(ctx, var, eps, x_node.dtype), axes


def _onnx_ln_normalized(ctx, x, x_node, normalized_shape, eps):
    """(x - mean) * rstd over the trailing dims, and rstd (kept dims)."""
    _, centered, rstd, axes = _onnx_ln_moments(ctx, x, x_node, normalized_shape, eps)
    return ctx.op("Mul", centered, rstd), rstd, axes


def _ln_onnx(ctx, n, xs):
    # Composed rather than LayerNormalization: its epsilon attribute is a float32.
    x, w, bias = xs
    xhat, _, _ = _onnx_ln_normalized(ctx, x, n.inputs[0], n.attrs["normalized_shape"], n.attrs["eps"])
    return ctx.op("Add", ctx.op("Mul", xhat, w), bias)


def _onnx_ln_stats(ctx, n, xs):
    mean, _, rstd, _ = _onnx_ln_moments(ctx, xs[0], n.inputs[0], n.attrs["normalized_shape"], n.attrs["eps"])
    row = lambda v: ctx.op("Reshape", v, ctx.ints([1, -1]))  # noqa: E731
    return ctx.op("Concat", row(mean), row(rstd), axis=0)


def _onnx_ln_normalized_by(ctx, n, x, x_node, stats):
    """As _onnx_ln_normalized, from the packed statistics when the node has them."""
    normalized_shape, eps = n.attrs["normalized_shape"], n.attrs["eps"]
    if stats is None:
        return _onnx_ln_normalized(ctx, x, x_node, normalized_shape, eps)
    rank = len(x_node.shape)
    axes = list(range(rank - len(normalized_shape), rank))
    kept = ctx.ints(list(x_node.shape[:axes[0]]) + [1] * len(normalized_shape))
    row = lambda k: ctx.op("Reshape", ctx.op("Gather", stats, ctx.ints([k]), axis=0), kept)  # noqa: E731
    mean, rstd = row(0), row(1)
    return ctx.op("Mul", ctx.op("Sub", x, mean), rstd), rstd, axes


def _ln_grad_input_onnx(ctx, n, xs):
    """rstd * (gx - mean(gx) - xhat * mean(gx * xhat)), gx = g * w, means over the normalized dims."""
    g, x, w, *stats = xs
    xhat, rstd, axes = _onnx_ln_normalized_by(ctx, n, x, n.inputs[1], stats[0] if stats else None)
    gx = ctx.op("Mul", g, w)
    mean = lambda v: ctx.reduce("ReduceMean", v, axes, keepdims=True)  # noqa: E731
    inner = ctx.op("Sub", ctx.op("Sub", gx, mean(gx)), ctx.op("Mul", xhat, mean(ctx.op("Mul", gx, xhat))))
    return ctx.op("Mul", rstd, inner)


def _ln_grad_weight_onnx(ctx, n, xs):
    g, x, *stats = xs
    xhat, _, axes = _onnx_ln_normalized_by(ctx, n, x, n.inputs[1], stats[0] if stats else None)
    lead = list(range(axes[0]))
    return ctx.reduce("ReduceSum", ctx.op("Mul", g, xhat), lead, keepdims=False) if lead else ctx.op("Mul", g, xhat)


register("layer_norm", _ln, _ln_vjp, onnx=_ln_onnx)
# native_layer_norm writes the normalized rows too, a buffer of x's size, dropped at once
register("ln_stats", _ln_stats_packed, scratch=lambda n: n.inputs[0].nbytes, onnx=_onnx_ln_stats)
register("layer_norm_stats", _layer_norm_stats,
         shape=lambda x, w, bias, normalized_shape, eps: (
             (math.prod(x.shape) + 2 * math.prod(x.shape) // math.prod(normalized_shape),), x.dtype),
         onnx=_layer_norm_stats_onnx)
register("ln_grad_input", _ln_grad_input, onnx=_ln_grad_input_onnx)
register("ln_grad_weight", _ln_grad_weight, onnx=_ln_grad_weight_onnx)


@aten(A.native_layer_norm.default)
def _(b, x, normalized_shape, w, bias, eps):
    shape = tuple(normalized_shape)
    w = w if w is not None else b.const(torch.ones(shape, dtype=x.dtype))
    bias = bias if bias is not None else b.const(torch.zeros(shape, dtype=x.dtype))
    return b.emit("layer_norm", x, w, bias, normalized_shape=shape, eps=eps), None, None


# -- group norm: statistics per (sample, group of channels) ---------------------------------

def _gn(x, w, bias, *, groups, eps):
    return torch.nn.functional.group_norm(x, groups, w, bias, eps)


def _gn_backward(g, x, w, groups, eps, mask):
    # mean/rstd are recomputed from x rather than kept from the forward. ATen's CPU kernel
    # reads g in x's memory format, and on channels-last operands it crashes (torch 2.13)
    # when the input's gradient is not asked for: those calls get plain ones.
    fmt = memory_format_of(x) if mask[0] else torch.contiguous_format
    g, x = g.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt)
    n, c = x.shape[:2]
    flat = x.reshape(n, groups, -1)
    mean, rstd = flat.mean(-1), torch.rsqrt(flat.var(-1, correction=0) + eps)
    return A.native_group_norm_backward(g, x, mean, rstd, w, n, c, flat.shape[-1] * groups // c, groups, mask)


def _gn_vjp(b, n, g, want):
    x, w, _ = n.inputs
    gn = dict(n.attrs)
    return (
        b.emit("gn_grad_input", g, x, w, **gn) if want[0] else None,
        b.emit("gn_grad_weight", g, x, w, **gn) if want[1] else None,
        b.emit("sum", g, dims=(0,) + tuple(range(2, len(g.shape))), keepdim=False) if want[2] else None,
    )


# ONNX: composed, as layer norm is, over each (sample, group) viewed as one row [N, groups, -1].
# Not GroupNormalization: its epsilon is a float32, and opset 18's scale and bias are per group
# (opset 21 made them per channel).

def _onnx_gn_normalized(ctx, n, x, x_node):
    """(x - mean) * rstd per (sample, group), as [N, groups, -1], and rstd ([N, groups, 1])."""
    grouped = ctx.op("Reshape", x, ctx.ints([x_node.shape[0], n.attrs["groups"], -1]))
    centered = ctx.op("Sub", grouped, ctx.reduce("ReduceMean", grouped, [2], keepdims=True))
    var = ctx.reduce("ReduceMean", ctx.op("Mul", centered, centered), [2], keepdims=True)
    rstd = _onnx_rsqrt(ctx, var, n.attrs["eps"], x_node.dtype)
    return ctx.op("Mul", centered, rstd), rstd


def _gn_onnx(ctx, n, xs):
    x, w, bias = xs
    xhat, _ = _onnx_gn_normalized(ctx, n, x, n.inputs[0])
    xhat = ctx.op("Reshape", xhat, ctx.ints(n.shape))
    rank = len(n.shape)
    return ctx.op("Add", ctx.op("Mul", xhat, _onnx_channels(ctx, w, rank)), _onnx_channels(ctx, bias, rank))


def _gn_grad_input_onnx(ctx, n, xs):
    """rstd * (gx - mean(gx) - xhat * mean(gx * xhat)), gx = g * w, means over each group: the
    layer-norm gradient, per (sample, group)."""
    g, x, w = xs
    xhat, rstd = _onnx_gn_normalized(ctx, n, x, n.inputs[1])
    gx = ctx.op("Mul", g, _onnx_channels(ctx, w, len(n.shape)))
    gx = ctx.op("Reshape", gx, ctx.ints([n.shape[0], n.attrs["groups"], -1]))
    mean = lambda v: ctx.reduce("ReduceMean", v, [2], keepdims=True)  # noqa: E731
    inner = ctx.op("Sub", ctx.op("Sub", gx, mean(gx)), ctx.op("Mul", xhat, mean(ctx.op("Mul", gx, xhat))))
    return ctx.op("Reshape", ctx.op("Mul", rstd, inner), ctx.ints(n.shape))


def _gn_grad_weight_onnx(ctx, n, xs):
    g, x, _ = xs
    xhat, _ = _onnx_gn_normalized(ctx, n, x, n.inputs[1])
    xhat = ctx.op("Reshape", xhat, ctx.ints(n.inputs[1].shape))
    return ctx.reduce("ReduceSum", ctx.op("Mul", g, xhat), _bn_dims(len(n.inputs[1].shape)), keepdims=False)


register("group_norm", _gn, _gn_vjp, onnx=_gn_onnx)
register("gn_grad_input", lambda g, x, w, groups, eps: _gn_backward(g, x, w, groups, eps, [True, False, False])[0],
         onnx=_gn_grad_input_onnx)
register("gn_grad_weight", lambda g, x, w, groups, eps: _gn_backward(g, x, w, groups, eps, [False, True, False])[1],
         onnx=_gn_grad_weight_onnx)


@aten(A.native_group_norm.default)
def _(b, x, w, bias, n, c, hw, groups, eps):
    w, bias = _affine_or_default(b, w, x, 1.0), _affine_or_default(b, bias, x, 0.0)
    return b.emit("group_norm", x, w, bias, groups=groups, eps=eps), None, None


# -- pooling --------------------------------------------------------------------------------

# ATen's CPU max pooling of a plain (NCHW) tensor is slow next to its channels-last kernel:
# measured one call at a time, one thread, values and argmax indices alike: [8, 64, 32, 32]
# 2.8 ms against 0.85 ms for a channels-last copy and its pooling; a MaxPool1d's [1, 32, 1,
# 2000] 0.30 ms against 0.10 ms, and 0.03 ms by ATen's own 1-D kernel (max_pool1d, values only).
# With 3 channels (an input image) the copy costs more than it saves. On the CPU the tensors
# after a convolution are channels-last already (layout.py); these are the others.
_COPY_TO_CHANNELS_LAST_FROM = 16  # channels


def _pools_along_width_only(x, kernel_size, stride, padding) -> bool:
    """A MaxPool1d as torch.export gives it: [N, C, 1, L], windows along L."""
    return x.dim() == 4 and x.shape[2] == 1 and kernel_size[0] == stride[0] == 1 and padding[0] == 0


def _channels_last_pays(x) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] >= _COPY_TO_CHANNELS_LAST_FROM
            and not x.is_contiguous(memory_format=torch.channels_last))


def _max_pool(x, *, kernel_size, stride, padding, dilation, ceil_mode):
    if x.device.type == "cpu" and _pools_along_width_only(x, kernel_size, stride, padding):
        along_width = A.max_pool1d(x.squeeze(2), kernel_size[1:], stride[1:], padding[1:], dilation[1:], ceil_mode)
        return along_width.unsqueeze(2)
    if _channels_last_pays(x):
        pooled = A.max_pool2d_with_indices(to_channels_last(x), kernel_size, stride, padding, dilation, ceil_mode)[0]
        return pooled.contiguous()  # the layout it came in
    return A.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)[0]


def _max_pool_grad(g, x, *, kernel_size, stride, padding, dilation, ceil_mode):
    # The argmax indices are recomputed from x rather than kept as an int64 tensor. They number
    # each window's maximum within its own channel's plane, whatever the layout.
    at = to_channels_last(x) if _channels_last_pays(x) else x
    idx = A.max_pool2d_with_indices(at, kernel_size, stride, padding, dilation, ceil_mode)[1]
    return A.max_pool2d_with_indices_backward(g, x, kernel_size, stride, padding, dilation, ceil_mode, idx)


def _onnx_max_pool(ctx, n, x, outputs):
    a = n.attrs
    return ctx.op("MaxPool", x, outputs=outputs, kernel_shape=list(a["kernel_size"]), strides=list(a["stride"]),
                  pads=list(a["padding"]) * 2, dilations=list(a["dilation"]), ceil_mode=int(a["ceil_mode"]))


def _max_pool_grad_onnx(ctx, n, xs):
    """Each window's gradient added at its maximum: MaxPool's indices (flat over the whole
    input, as torch recomputes them from x) scatter g into zeros."""
    g, x = xs
    _, where = _onnx_max_pool(ctx, n, x, outputs=2)
    flat = lambda v: ctx.op("Reshape", v, ctx.ints([-1]))  # noqa: E731
    total = math.prod(n.shape)
    summed = ctx.op("ScatterElements", ctx.full([total], 0, n.dtype), flat(where), flat(g), axis=0, reduction="add")
    return ctx.op("Reshape", summed, ctx.ints(n.shape))


register("max_pool2d", _max_pool,
         lambda b, n, g, want: (b.emit("max_pool2d_grad", g, n.inputs[0], **n.attrs) if want[0] else None,),
         onnx=lambda ctx, n, xs: _onnx_max_pool(ctx, n, xs[0], outputs=1))
register("max_pool2d_grad", _max_pool_grad, onnx=_max_pool_grad_onnx)


@aten(A.max_pool2d_with_indices.default)
def _(b, x, kernel_size, stride=(), padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    stride = tuple(stride) or tuple(kernel_size)
    return b.emit("max_pool2d", x, kernel_size=tuple(kernel_size), stride=stride, padding=tuple(padding),
                  dilation=tuple(dilation), ceil_mode=ceil_mode), None


def _avg_pool(x, **a):
    return A.avg_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                        a["count_include_pad"], a["divisor_override"])


def _avg_pool_grad(g, *, input_shape, **a):
    fake_x = g.new_empty(input_shape)  # shape only, never read
    return A.avg_pool2d_backward(g, fake_x, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                                 a["count_include_pad"], a["divisor_override"])


# ONNX: not AveragePool, which has no divisor_override and leaves the divisor of a ceil-mode
# window running past the padding to the runtime's reading of the spec (onnxruntime 1.32 reads it
# as torch does). Here each window's sum is a convolution with ones over the explicitly padded
# input (every window inside it, zeros adding nothing), divided by torch's divisor for that
# window, worked out here: nothing is left to the runtime.

def _avg_pool_windows(size, out, kernel, stride, pad):
    """Along one axis, per output: (torch's window size counting padding, the entries inside x)."""
    windows = []
    for o in range(out):
        start = o * stride - pad
        end = min(start + kernel, size + pad)
        windows.append((end - start, min(end, size) - max(start, 0)))
    return windows


def _avg_pool_divisors(a, in_hw, out_hw, dtype):
    """[OH, OW]: what torch divides each window's sum by."""
    if a["divisor_override"]:
        return torch.full(tuple(out_hw), a["divisor_override"], dtype=dtype)
    pick = 0 if a["count_include_pad"] else 1
    rows, cols = (torch.tensor([w[pick] for w in _avg_pool_windows(*dims)], dtype=dtype)
                  for dims in zip(in_hw, out_hw, a["kernel_size"], a["stride"], a["padding"]))
    return rows[:, None] * cols[None, :]


def _avg_pool_overhang(a, in_hw, out_hw):
    """Zeros past each axis's end padding that ceil mode's last window reaches."""
    return [max(0, (o - 1) * s + k - (i + 2 * p))
            for i, o, k, s, p in zip(in_hw, out_hw, a["kernel_size"], a["stride"], a["padding"])]


def _onnx_ones_kernel(ctx, a, dtype):
    return ctx.const(torch.ones((1, 1, *a["kernel_size"]), dtype=dtype))


def _avg_pool_onnx(ctx, n, xs):
    a, (batch, channels, *in_hw), out_hw = n.attrs, n.inputs[0].shape, n.shape[2:]
    pads, extra = list(a["padding"]), _avg_pool_overhang(a, in_hw, out_hw)
    planes = ctx.op("Reshape", xs[0], ctx.ints([batch * channels, 1, *in_hw]))  # one plane per (sample, channel)
    padded = ctx.op("Pad", planes, ctx.ints([0, 0, *pads, 0, 0, *(p + e for p, e in zip(pads, extra))]))
    sums = ctx.op("Conv", padded, _onnx_ones_kernel(ctx, a, n.dtype), kernel_shape=list(a["kernel_size"]),
                  strides=list(a["stride"]))
    average = ctx.op("Div", sums, ctx.const(_avg_pool_divisors(a, in_hw, out_hw, n.dtype)))
    return ctx.op("Reshape", average, ctx.ints(n.shape))


def _avg_pool_grad_onnx(ctx, n, xs):
    """Each window's g / divisor spread over the window (a transposed convolution with ones), then
    the padding cut off; input rows no window reaches get zeros."""
    a, (batch, channels, *out_hw), in_hw = n.attrs, n.inputs[0].shape, n.attrs["input_shape"][2:]
    planes = ctx.op("Reshape", xs[0], ctx.ints([batch * channels, 1, *out_hw]))
    shares = ctx.op("Div", planes, ctx.const(_avg_pool_divisors(a, in_hw, out_hw, n.dtype)))
    spread = ctx.op("ConvTranspose", shares, _onnx_ones_kernel(ctx, a, n.dtype), kernel_shape=list(a["kernel_size"]),
                    strides=list(a["stride"]))
    reached = [(o - 1) * s + k for o, s, k in zip(out_hw, a["stride"], a["kernel_size"])]
    ends = [min(i + p, r) for i, p, r in zip(in_hw, a["padding"], reached)]
    x_part = ctx.op("Slice", spread, ctx.ints(a["padding"]), ctx.ints(ends), ctx.ints([2, 3]))
    missing = [i + p - e for i, p, e in zip(in_hw, a["padding"], ends)]
    if any(missing):
        x_part = ctx.op("Pad", x_part, ctx.ints([0, 0, 0, 0, 0, 0, *missing]))
    return ctx.op("Reshape", x_part, ctx.ints(n.shape))


register("avg_pool2d", _avg_pool, lambda b, n, g, want: (
    b.emit("avg_pool2d_grad", g, input_shape=tuple(n.inputs[0].shape), **n.attrs) if want[0] else None,),
    onnx=_avg_pool_onnx)
register("avg_pool2d_grad", _avg_pool_grad, onnx=_avg_pool_grad_onnx)


@aten(A.avg_pool2d.default)
def _(b, x, kernel_size, stride=(), padding=(0, 0), ceil_mode=False, count_include_pad=True, divisor_override=None):
    return b.emit("avg_pool2d", x, kernel_size=tuple(kernel_size), stride=tuple(stride) or tuple(kernel_size),
                  padding=tuple(padding), ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                  divisor_override=divisor_override)


def _adaptive_avg_pool_grad(g, *, input_shape):
    return A._adaptive_avg_pool2d_backward(g, g.new_empty(input_shape))  # shape only, never read


def _pool_cells(input_hw, output_hw):
    """The (rows, cols) of input per output cell where they tile the input evenly, else None."""
    if any(i % o for i, o in zip(input_hw, output_hw)):
        return None
    return [i // o for i, o in zip(input_hw, output_hw)]


def _averaging(size: int, out: int, dtype) -> torch.Tensor:
    """[out, size]: row i averages the cells adaptive pooling gives output i, [floor(i*size/out),
    ceil((i+1)*size/out)), as ATen does (cells may overlap, or repeat an input when out > size)."""
    m = torch.zeros(out, size, dtype=torch.float64)
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m.to(dtype)


def _adaptive_avg_pool_onnx(ctx, n, xs):
    """An AveragePool where the cells tile the input; else, exactly, two products with constant
    averaging matrices (the pooling is separable): rows then columns."""
    cells = _pool_cells(n.inputs[0].shape[2:], n.shape[2:])
    if cells is not None:
        return ctx.op("AveragePool", xs[0], kernel_shape=cells, strides=cells)
    (h, w), (oh, ow) = n.inputs[0].shape[2:], n.shape[2:]
    cols = ctx.op("MatMul", xs[0], ctx.const(_averaging(w, ow, n.dtype).T))
    return ctx.op("MatMul", ctx.const(_averaging(h, oh, n.dtype)), cols)


def _adaptive_avg_pool_grad_onnx(ctx, n, xs):
    """Each output cell's gradient, divided by the cell's size, spread over the cell (the
    transposed products where the cells do not tile the input)."""
    batch, channels, oh, ow = n.inputs[0].shape
    h, w = n.attrs["input_shape"][2:]
    cells = _pool_cells((h, w), (oh, ow))
    if cells is None:
        cols = ctx.op("MatMul", xs[0], ctx.const(_averaging(w, ow, n.dtype)))
        return ctx.op("MatMul", ctx.const(_averaging(h, oh, n.dtype).T), cols)
    kh, kw = cells
    spread = ctx.op("Expand", ctx.op("Reshape", xs[0], ctx.ints([batch, channels, oh, 1, ow, 1])),
                    ctx.ints([batch, channels, oh, kh, ow, kw]))
    share = ctx.op("Div", spread, ctx.scalar(kh * kw, n.dtype))
    return ctx.op("Reshape", share, ctx.ints(n.attrs["input_shape"]))


register("adaptive_avg_pool2d", lambda x, output_size: A._adaptive_avg_pool2d(x, output_size),
         lambda b, n, g, want: (
             b.emit("adaptive_avg_pool2d_grad", g, input_shape=tuple(n.inputs[0].shape)) if want[0] else None,),
         onnx=_adaptive_avg_pool_onnx)
register("adaptive_avg_pool2d_grad", _adaptive_avg_pool_grad, onnx=_adaptive_avg_pool_grad_onnx)
aten(A._adaptive_avg_pool2d.default)(
    lambda b, x, output_size: b.emit("adaptive_avg_pool2d", x, output_size=tuple(output_size)))


def _adaptive_max_pool_grad(g, x, *, output_size):
    # The argmax indices are recomputed from x rather than kept as an int64 tensor.
    return A.adaptive_max_pool2d_backward(g, x, A.adaptive_max_pool2d(x, output_size)[1])


# ONNX: torch's adaptive windows [floor(o * in / out), ceil((o + 1) * in / out)) may differ in
# size. Where they do not, the forward is a MaxPool. Otherwise (and always for the gradient, which
# needs the first maximum in row-major order within each window, as torch takes it) each window
# is gathered whole: shorter windows repeat their last row or column, which changes neither the
# maximum nor where it first occurs.

def _adaptive_windows(size, out):
    return [((o * size) // out, ((o + 1) * size + out - 1) // out) for o in range(out)]


def _adaptive_uniform(size, out):
    """(kernel, stride) where the windows along this axis are one size at even steps, else None."""
    windows = _adaptive_windows(size, out)
    kernel, stride = windows[0][1] - windows[0][0], windows[1][0] if out > 1 else 1
    if all((start, end) == (o * stride, o * stride + kernel) for o, (start, end) in enumerate(windows)):
        return kernel, stride
    return None


def _adaptive_taps(size, out):
    """[out, k]: the indices of each window along one axis, the last repeated to the longest's size."""
    windows = _adaptive_windows(size, out)
    k = max(end - start for start, end in windows)
    return torch.tensor([[min(start + j, end - 1) for j in range(k)] for start, end in windows])


def _onnx_adaptive_windows(ctx, n, x, x_shape):
    """[N, C, OH, OW, KH * KW]: each window's entries in row-major order, and the two tap tables."""
    batch, channels, height, width = x_shape
    out_h, out_w = n.attrs["output_size"]
    rows, cols = _adaptive_taps(height, out_h), _adaptive_taps(width, out_w)
    picked = ctx.op("Gather", x, ctx.const(rows.reshape(-1)), axis=2)
    picked = ctx.op("Gather", picked, ctx.const(cols.reshape(-1)), axis=3)
    picked = ctx.op("Reshape", picked, ctx.ints([batch, channels, out_h, rows.shape[1], out_w, cols.shape[1]]))
    picked = ctx.op("Transpose", picked, perm=[0, 1, 2, 4, 3, 5])
    return ctx.op("Reshape", picked, ctx.ints([batch, channels, out_h, out_w, -1])), rows, cols


def _adaptive_max_pool_onnx(ctx, n, xs):
    in_hw = n.inputs[0].shape[2:]
    uniform = [_adaptive_uniform(i, o) for i, o in zip(in_hw, n.attrs["output_size"])]
    if all(uniform):
        return ctx.op("MaxPool", xs[0], kernel_shape=[k for k, _ in uniform], strides=[s for _, s in uniform])
    windows, _, _ = _onnx_adaptive_windows(ctx, n, xs[0], n.inputs[0].shape)
    return ctx.reduce("ReduceMax", windows, [4], keepdims=False)


def _adaptive_max_pool_grad_onnx(ctx, n, xs):
    """g added at each window's first maximum: ArgMax within the window, mapped through a table of
    the window's flat positions in x, scatters g into zeros."""
    g, x = xs
    batch, channels, height, width = n.shape
    windows, rows, cols = _onnx_adaptive_windows(ctx, n, x, n.shape)
    first = ctx.op("ArgMax", windows, axis=4, keepdims=1, select_last_index=0)
    # positions[oh, ow, kh * KW + kw] = rows[oh, kh] * W + cols[ow, kw]
    positions = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(rows.shape[0], cols.shape[0], -1)
    table = ctx.op("Expand", ctx.const(positions), ctx.ints([batch, channels, *positions.shape]))
    where = ctx.op("GatherElements", table, first, axis=4)
    flat = lambda v, shape: ctx.op("Reshape", v, ctx.ints(shape))  # noqa: E731
    zeros = ctx.full([batch, channels, height * width], 0, n.dtype)
    summed = ctx.op("ScatterElements", zeros, flat(where, [batch, channels, -1]), flat(g, [batch, channels, -1]),
                    axis=2, reduction="add")
    return flat(summed, n.shape)


register("adaptive_max_pool2d", lambda x, output_size: A.adaptive_max_pool2d(x, output_size)[0],
         lambda b, n, g, want: (b.emit("adaptive_max_pool2d_grad", g, n.inputs[0], **n.attrs) if want[0] else None,),
         onnx=_adaptive_max_pool_onnx)
register("adaptive_max_pool2d_grad", _adaptive_max_pool_grad, onnx=_adaptive_max_pool_grad_onnx)
aten(A.adaptive_max_pool2d.default)(
    lambda b, x, output_size: (b.emit("adaptive_max_pool2d", x, output_size=tuple(output_size)), None))


# -- upsampling (F.interpolate): nearest and bilinear, 2-D ----------------------------------

def _upsample(x, *, mode, output_size, scales, align_corners):
    if mode == "nearest":
        return A.upsample_nearest2d(x, output_size, *scales)
    return A.upsample_bilinear2d(x, output_size, align_corners, *scales)


def _upsample_grad(g, *, mode, output_size, scales, align_corners, input_shape):
    if mode == "nearest":
        return A.upsample_nearest2d_backward(g, output_size, input_shape, *scales)
    return A.upsample_bilinear2d_backward(g, output_size, input_shape, align_corners, *scales)


# ONNX: not Resize, which maps output to input pixels in the runtime's own arithmetic (its
# `scales` a float32), where torch's kernel rounds its own way. Here each output pixel reads
# fixed taps along each axis: nearest one (the index torch's own kernel gives, read off it),
# bilinear two with weights, worked out as ATen's CPU kernel does (compute_source_index_and_lambda,
# in the tensor's precision). The forward gathers the taps, width first as the kernel does; the
# gradient scatters g back.

def _nearest_taps(size, out, scale):
    """The source index of each output along one axis, as torch's kernel picks it."""
    column = torch.arange(size, dtype=torch.float64).reshape(1, 1, size, 1)
    picked = A.upsample_nearest2d(column, [out, 1], scale, None)
    return [(picked.reshape(-1).long(), None)]


def _linear_taps(size, out, align_corners, scale, dtype):
    """[(index, weight), (index, weight)] per output along one axis: torch's bilinear kernel's."""
    dst = torch.arange(out)
    if out == size:
        return [(dst, None)]  # the kernel copies (its second tap has weight 0)
    if align_corners:
        ratio = torch.tensor(size - 1, dtype=dtype) / (out - 1) if out > 1 else torch.tensor(0, dtype=dtype)
        src = ratio * dst.to(dtype)
    else:
        ratio = torch.tensor(1.0 / scale, dtype=dtype) if scale and scale > 0 else torch.tensor(size, dtype=dtype) / out
        src = (ratio * (dst.to(dtype) + 0.5) - 0.5).clamp_min(0)
    first = torch.floor(src.float()).long().clamp_max(size - 1)  # floorf, as the kernel
    weight1 = (src - first.to(dtype)).clamp(0, 1)
    second = first + (first < size - 1).long()
    return [(first, 1 - weight1), (second, weight1)]


def _upsample_taps(a, in_hw, out_hw, dtype):
    """The taps along H, then along W."""
    return [_nearest_taps(i, o, s) if a["mode"] == "nearest" else _linear_taps(i, o, a["align_corners"], s, dtype)
            for i, o, s in zip(in_hw, out_hw, a["scales"])]


def _onnx_along(ctx, t, axis):
    """A per-output vector shaped to broadcast along `axis` of an [N, C, H, W] value."""
    return ctx.const(t.reshape([-1] + [1] * (3 - axis)))


def _upsample_onnx(ctx, n, xs):
    x, (taps_h, taps_w) = xs[0], _upsample_taps(n.attrs, n.inputs[0].shape[2:], n.shape[2:], n.dtype)
    for axis, taps in ((3, taps_w), (2, taps_h)):
        terms = [ctx.op("Gather", x, ctx.const(index), axis=axis) for index, _ in taps]
        terms = [t if w is None else ctx.op("Mul", t, _onnx_along(ctx, w, axis)) for t, (_, w) in zip(terms, taps)]
        x = terms[0] if len(terms) == 1 else ctx.op("Add", *terms)
    return x


def _upsample_grad_onnx(ctx, n, xs):
    g, shape = xs[0], list(n.inputs[0].shape)  # [N, C, OH, OW], to [N, C, H, OW], to [N, C, H, W]
    taps = _upsample_taps(n.attrs, n.attrs["input_shape"][2:], shape[2:], n.dtype)
    for axis, size in ((2, n.shape[2]), (3, n.shape[3])):
        indices = [ctx.op("Expand", _onnx_along(ctx, index, axis), ctx.ints(shape)) for index, _ in taps[axis - 2]]
        updates = [g if w is None else ctx.op("Mul", g, _onnx_along(ctx, w, axis)) for _, w in taps[axis - 2]]
        if len(indices) > 1:
            indices, updates = [ctx.op("Concat", *indices, axis=axis)], [ctx.op("Concat", *updates, axis=axis)]
        shape[axis] = size
        g = ctx.op("ScatterElements", ctx.full(shape, 0, n.dtype), indices[0], updates[0], axis=axis, reduction="add")
    return g


register("upsample2d", _upsample, lambda b, n, g, want: (
    b.emit("upsample2d_grad", g, input_shape=tuple(n.inputs[0].shape), **n.attrs) if want[0] else None,),
    onnx=_upsample_onnx)
register("upsample2d_grad", _upsample_grad, onnx=_upsample_grad_onnx)


def _upsample_attrs(x, output_size, scale_factors):
    # Given scale factors, torch maps output to input pixels with them, not with the size ratio.
    if output_size is None:
        output_size = [math.floor(s * f) for s, f in zip(x.shape[2:], scale_factors)]
    return dict(output_size=tuple(output_size), scales=tuple(scale_factors or (None, None)))


aten(A.upsample_nearest2d.vec)(lambda b, x, output_size, scale_factors: b.emit(
    "upsample2d", x, mode="nearest", align_corners=False, **_upsample_attrs(x, output_size, scale_factors)))
aten(A.upsample_bilinear2d.vec)(lambda b, x, output_size, align_corners, scale_factors: b.emit(
    "upsample2d", x, mode="bilinear", align_corners=align_corners, **_upsample_attrs(x, output_size, scale_factors)))


# -- embedding, gather, index_select --------------------------------------------------------

def _embedding_vjp(b, n, g, want):
    w, idx = n.inputs
    part, padding_idx = want[0], n.attrs["padding_idx"]
    if not part:
        return None, None
    if isinstance(part, ChannelSlice) and part.touched:  # a row per lookup, repeats included
        return b.emit("embedding_touched_grad", g, idx, padding_idx=padding_idx), None
    if isinstance(part, ChannelSlice) and part.axis == 0:  # chosen rows: only lookups of those add up
        return b.emit("embedding_rows_grad", g, idx, part.index, padding_idx=padding_idx), None
    if isinstance(part, ChannelSlice):
        g = take_channels(b, g, part, dim=len(g.shape) - 1)  # the chosen columns of every looked-up row
    return b.emit("embedding_grad", g, idx, num_weights=w.shape[0], padding_idx=padding_idx), None


def _embedding_grad_onnx(ctx, n, xs):
    """Each row of g added into its index's row of zeros; the padding row gets none."""
    g, idx = xs
    padding = n.attrs["padding_idx"]
    if padding >= 0:
        at_padding = ctx.op("Unsqueeze", ctx.op("Equal", idx, ctx.scalar(padding, torch.int64)), ctx.ints([-1]))
        g = ctx.op("Where", at_padding, ctx.scalar(0, n.dtype), g)
    zeros = ctx.full(n.shape, 0, n.dtype)
    rows = ctx.op("Unsqueeze", idx, ctx.ints([-1]))
    return ctx.op("ScatterND", zeros, rows, g, reduction="add")


def _flat_lookups(g, idx):
    """g as one row per lookup [N, D], and the looked-up ids [N]."""
    return g.reshape(-1, g.shape[-1]), idx.reshape(-1)


def _embedding_rows_grad(g, idx, rows, *, padding_idx):
    """The gradient of the chosen rows (sorted ids) of a table: [k, D]."""
    g, idx = _flat_lookups(g, idx)
    at = torch.searchsorted(rows, idx).clamp_(max=len(rows) - 1)
    hit = (rows[at] == idx) & (idx != padding_idx)
    return g.new_zeros((len(rows), g.shape[1])).index_add_(0, at[hit], g[hit])


def _embedding_touched_grad(g, idx, *, padding_idx):
    """[N, D]: for each lookup, the summed gradient of the row it read (what a sparse
    gradient holds, repeated per lookup so that its shape is fixed)."""
    g, idx = _flat_lookups(g, idx)
    rows, inverse = torch.unique(idx, return_inverse=True)
    summed = g.new_zeros((len(rows), g.shape[1])).index_add_(0, inverse, g)
    summed[rows == padding_idx] = 0
    return summed[inverse]


def _onnx_flat_lookups(ctx, n, g, idx):
    width = n.inputs[0].shape[-1]
    return ctx.op("Reshape", g, ctx.ints([-1, width])), ctx.op("Reshape", idx, ctx.ints([-1]))


def _without_padding(ctx, n, g, idx):
    """g with the rows of lookups of the padding row zeroed."""
    padding = n.attrs["padding_idx"]
    if padding < 0:
        return g
    at_padding = ctx.op("Unsqueeze", ctx.op("Equal", idx, ctx.scalar(padding, torch.int64)), ctx.ints([-1]))
    return ctx.op("Where", at_padding, ctx.scalar(0, n.dtype), g)


def _embedding_rows_grad_onnx(ctx, n, xs):
    """Each lookup matched against the chosen ids ([N, k] of booleans); the matched ones added
    into their row's place."""
    g, idx = _onnx_flat_lookups(ctx, n, *xs[:2])
    g = _without_padding(ctx, n, g, idx)
    matches = ctx.op("Equal", ctx.op("Unsqueeze", idx, ctx.ints([-1])),
                     ctx.op("Unsqueeze", xs[2], ctx.ints([0])))
    at = ctx.op("ArgMax", ctx.cast(matches, torch.int32), axis=1, keepdims=1)  # [N, 1]
    hit = ctx.reduce("ReduceMax", ctx.cast(matches, torch.int32), [1], keepdims=True)
    g = ctx.op("Where", ctx.cast(hit, torch.bool), g, ctx.scalar(0, n.dtype))
    return ctx.op("ScatterND", ctx.full(n.shape, 0, n.dtype), at, g, reduction="add")


def _embedding_touched_grad_onnx(ctx, n, xs):
    g, idx = _onnx_flat_lookups(ctx, n, *xs)
    g = _without_padding(ctx, n, g, idx)
    rows, _, inverse, _ = ctx.op("Unique", idx, outputs=4, sorted=1)
    zeros = ctx.op("Expand", ctx.scalar(0, n.dtype), ctx.op("Concat", ctx.op("Shape", rows), ctx.ints([n.shape[1]]),
                                                             axis=0))
    summed = ctx.op("ScatterND", zeros, ctx.op("Unsqueeze", inverse, ctx.ints([-1])), g, reduction="add")
    return ctx.op("Gather", summed, inverse, axis=0)


register("embedding_rows_grad", _embedding_rows_grad,
         shape=lambda g, idx, rows, padding_idx: ((rows.shape[0], g.shape[-1]), g.dtype),
         onnx=_embedding_rows_grad_onnx)
register("embedding_touched_grad", _embedding_touched_grad,
         shape=lambda g, idx, padding_idx: ((math.prod(idx.shape), g.shape[-1]), g.dtype),
         scratch=lambda n: 2 * n.nbytes, onnx=_embedding_touched_grad_onnx)
register("embedding", lambda w, idx, padding_idx: A.embedding(w, idx, padding_idx), _embedding_vjp,
         onnx=lambda ctx, n, xs: ctx.op("Gather", *xs, axis=0))
register("embedding_grad", lambda g, idx, num_weights, padding_idx:
         A.embedding_dense_backward(g, idx, num_weights, padding_idx, False), onnx=_embedding_grad_onnx)


@aten(A.embedding.default)
def _(b, w, idx, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if scale_grad_by_freq:
        raise NotImplementedError("embedding with scale_grad_by_freq")
    return b.emit("embedding", w, idx, padding_idx=padding_idx)


def _register_indexing(name, read, accumulate, onnx, onnx_indices):
    """An op reading x's entries at idx along dim; its gradient adds g back there into zeros.
    `onnx` is the ONNX op reading them; `onnx_indices(ctx, n, idx)` gives the ScatterElements
    indices (one per entry of g) that add the gradient back."""
    register(name, lambda x, idx, dim: read(x, dim, idx), lambda b, n, g, want: (
        b.emit(f"{name}_grad", g, n.inputs[1], dim=n.attrs["dim"], input_shape=tuple(n.inputs[0].shape))
        if want[0] else None, None), onnx=lambda ctx, n, xs: ctx.op(onnx, *xs, axis=n.attrs["dim"]))

    def grad_onnx(ctx, n, xs):
        zeros = ctx.full(n.attrs["input_shape"], 0, n.dtype)
        return ctx.op("ScatterElements", zeros, onnx_indices(ctx, n, xs[1]), xs[0], axis=n.attrs["dim"],
                      reduction="add")

    register(f"{name}_grad", lambda g, idx, dim, input_shape: accumulate(g.new_zeros(input_shape), dim, idx, g),
             onnx=grad_onnx)


def onnx_index_along(ctx, idx, dim, shape):
    """A 1-D index along dim as one index per entry of a value of `shape` (ScatterElements')."""
    along = ctx.op("Reshape", idx, ctx.ints([1] * dim + [-1] + [1] * (len(shape) - dim - 1)))
    return ctx.op("Expand", along, ctx.ints(shape))


def _index_select_indices(ctx, n, idx):
    """index_select's 1-D index as one index per entry of g, along dim."""
    return onnx_index_along(ctx, idx, n.attrs["dim"], n.inputs[0].shape)


_register_indexing("gather", torch.gather, torch.Tensor.scatter_add_, "GatherElements", lambda ctx, n, idx: idx)
_register_indexing("index_select", torch.index_select, torch.Tensor.index_add_, "Gather", _index_select_indices)
aten(A.gather.default)(lambda b, x, dim, idx, sparse_grad=False: b.emit("gather", x, idx, dim=dim % len(x.shape)))


# scatter writes src's entries into x (scatter_add adds them): the gather of g is src's gradient.
def _scatter_vjp(b, n, g, want):
    x, idx = n.inputs[:2]
    added, dim = n.attrs["add"], n.attrs["dim"]
    gx = (g if added else b.emit("scatter_grad_input", g, idx, dim=dim)) if want[0] else None
    gs = b.emit("gather", g, idx, dim=dim) if len(n.inputs) == 3 and want[2] else None
    return (gx, None, gs)[: len(n.inputs)]


def _scatter(x, idx, src=None, *, dim, add, value=None):
    if add:
        return x.scatter_add(dim, idx, src)
    return x.scatter(dim, idx, src) if src is not None else x.scatter(dim, idx, value)


def _scatter_onnx(ctx, n, xs):
    """ScatterElements. torch reads src only where idx has entries (src may be larger: its
    leading block is cut to idx's shape); a scalar value is spread to idx's shape."""
    x, idx = xs[:2]
    shape = list(n.inputs[1].shape)
    if len(xs) == 3:
        src = ctx.convert(xs[2], n.inputs[2].dtype, n.dtype)
        if list(n.inputs[2].shape) != shape:
            src = ctx.op("Slice", src, ctx.ints([0] * len(shape)), ctx.ints(shape))
    else:
        src = ctx.full(shape, n.attrs["value"], n.dtype)
    return ctx.op("ScatterElements", x, idx, src, axis=n.attrs["dim"], reduction="add" if n.attrs["add"] else "none")


register("scatter", _scatter, _scatter_vjp, onnx=_scatter_onnx)
register("scatter_grad_input", lambda g, idx, dim: g.scatter(dim, idx, 0.0), onnx=lambda ctx, n, xs: ctx.op(
    "ScatterElements", *xs, ctx.full(n.inputs[1].shape, 0, n.dtype), axis=n.attrs["dim"]))
aten(A.scatter.src)(lambda b, x, dim, idx, src: b.emit("scatter", x, idx, src, dim=dim % len(x.shape), add=False))
aten(A.scatter.value)(lambda b, x, dim, idx, value: b.emit("scatter", x, idx, dim=dim % len(x.shape), add=False,
                                                           value=value))
aten(A.scatter_add.default)(lambda b, x, dim, idx, src: b.emit("scatter", x, idx, src, dim=dim % len(x.shape), add=True))


aten(A.index_select.default)(lambda b, x, dim, idx: b.emit("index_select", x, idx, dim=dim % len(x.shape)))
