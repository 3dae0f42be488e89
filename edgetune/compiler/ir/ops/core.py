"""Elementwise arithmetic, activations, comparisons, reductions, softmax, creation ops."""
from __future__ import annotations

import functools
import math

import torch

from edgetune.compiler.ir.graph import Node
from edgetune.compiler.ir.ops.registry import aten, register

A = torch.ops.aten


def scalar(b, value, like=None):
    """A Python scalar operand becomes a 0-d const, which broadcasts without promoting.

    Next to a float tensor `like` it takes that dtype: torch computes `x * 0.1` in x's
    precision, and a float32 0.1 would be off by 1e-8 in a float64 step."""
    if not isinstance(value, (int, float, bool)):
        return value
    if isinstance(like, Node) and like.is_float and not isinstance(value, bool):
        return b.const(value, dtype=like.dtype)
    return b.const(value)


def _operands(b, x, y):
    """Both operands of a binary op as nodes (ATen puts a Python scalar on either side)."""
    return scalar(b, x, like=y), scalar(b, y, like=x)


def grad_like(b, g, x):
    """g as the gradient of x: summed over broadcast dims, cast back from a promoted dtype."""
    g = b.sum_to(g, x.shape)
    return g if g.dtype == x.dtype else b.emit("cast", g, dtype=x.dtype)


# -- ONNX lowering helpers (edgetune.compiler.backends.onnx) -----------------------------------

def onnx_operands(ctx, n, names, dtype=None):
    """The operands in one dtype (the node's by default): ONNX ops do not promote as torch does."""
    dtype = dtype or n.dtype
    return [ctx.convert(x, i.dtype, dtype) for x, i in zip(names, n.inputs)]


def onnx_elementwise(op_type):
    """The lowering of an op that is one ONNX op over its operands in the node's dtype."""
    return lambda ctx, n, xs: ctx.op(op_type, *onnx_operands(ctx, n, xs))


def _compared_dtype(n):
    """The dtype torch compares two operands in (a 0-d operand does not widen a tensor)."""
    x, y = (torch.empty(i.shape, dtype=i.dtype, device="meta") for i in n.inputs)
    return torch.result_type(x, y)


def _onnx_compare(op_type, negate=False):
    def lower(ctx, n, xs):
        out = ctx.op(op_type, *onnx_operands(ctx, n, xs, _compared_dtype(n)))
        return ctx.op("Not", out) if negate else out
    return lower


def onnx_zero_where(ctx, n, stops, g):
    """g where `stops` is false, else 0: a gradient blocked where its rule says so. As g times
    0/1, not Where: onnxruntime's Where is 6-7x slower than Not, Cast and Mul on activation
    shapes (one op at a time). An inf or NaN of g at a blocked entry gives NaN there, not 0, as
    the torch backend's bit-packed masks do (masks.py): a step that overflowed either way."""
    return ctx.op("Mul", g, ctx.cast(ctx.op("Not", stops), n.dtype))


# -- binary arithmetic ----------------------------------------------------------------------

def _add_vjp(b, n, g, want):
    x, y = n.inputs
    return (grad_like(b, g, x) if want[0] else None, grad_like(b, g, y) if want[1] else None)


def _sub_vjp(b, n, g, want):
    x, y = n.inputs
    gy = grad_like(b, b.emit("neg", g), y) if want[1] else None
    return (grad_like(b, g, x) if want[0] else None, gy)


def _mul_vjp(b, n, g, want):
    x, y = n.inputs
    gx = grad_like(b, b.emit("mul", g, y), x) if want[0] else None
    gy = grad_like(b, b.emit("mul", g, x), y) if want[1] else None
    return gx, gy


def _div_vjp(b, n, g, want):
    x, y = n.inputs
    gx = grad_like(b, b.emit("div", g, y), x) if want[0] else None
    gy = grad_like(b, b.emit("div_grad_rhs", g, x, y), y) if want[1] else None
    return gx, gy


register("neg", torch.neg, lambda b, n, g, want: (b.emit("neg", g) if want[0] else None,), inplace=torch.neg_,
         onnx=onnx_elementwise("Neg"))
register("add", torch.add, _add_vjp, inplace=lambda x, y: x.add_(y), onnx=onnx_elementwise("Add"))
register("sub", torch.sub, _sub_vjp, inplace=lambda x, y: x.sub_(y), onnx=onnx_elementwise("Sub"))
register("mul", torch.mul, _mul_vjp, inplace=lambda x, y: x.mul_(y), onnx=onnx_elementwise("Mul"))
register("div", torch.div, _div_vjp, inplace=lambda x, y: x.div_(y), onnx=onnx_elementwise("Div"))


def _div_grad_rhs_onnx(ctx, n, xs):
    g, x, y = onnx_operands(ctx, n, xs)
    return ctx.op("Div", ctx.op("Mul", ctx.op("Neg", g), x), ctx.op("Mul", y, y))


register("div_grad_rhs", lambda g, x, y: -g * x / (y * y), onnx=_div_grad_rhs_onnx)


def _scaled(b, y, alpha):
    return y if alpha == 1 else b.emit("mul", y, scalar(b, alpha, like=y))


@aten(A.add.Tensor, A.add.Scalar)
def _(b, x, y, alpha=1):
    x, y = _operands(b, x, y)
    return b.emit("add", x, _scaled(b, y, alpha))


@aten(A.sub.Tensor, A.sub.Scalar)
def _(b, x, y, alpha=1):
    x, y = _operands(b, x, y)
    return b.emit("sub", x, _scaled(b, y, alpha))


@aten(A.rsub.Scalar, A.rsub.Tensor)
def _(b, x, y, alpha=1):
    x, y = _operands(b, x, y)
    return b.emit("sub", y, _scaled(b, x, alpha))


@aten(A.mul.Tensor, A.mul.Scalar)
def _(b, x, y):
    return b.emit("mul", *_operands(b, x, y))


@aten(A.div.Tensor, A.div.Scalar)
def _(b, x, y):
    return b.emit("div", *_operands(b, x, y))


# x ** y of two tensors (ALiBi's slopes: torch.pow(base, arange)). The gradients as autograd
# defines them where they are not smooth: 0 for the base where y == 0, 0 for the exponent where
# x == 0 and y >= 0.

def _pow_tensor_vjp(b, n, g, want):
    x, y = n.inputs
    gx = grad_like(b, b.emit("pow_grad_base", g, x, y), x) if want[0] else None
    gy = grad_like(b, b.emit("pow_grad_exponent", g, x, y, n), y) if want[1] else None
    return gx, gy


def _pow_grad_base(g, x, y):
    return torch.where(y == 0, 0.0, g * y * torch.pow(x, y - 1))


def _pow_grad_exponent(g, x, y, out):
    return torch.where((x == 0) & (y >= 0), 0.0, g * out * torch.log(x))


def _pow_grad_base_onnx(ctx, n, xs):
    g, x, y = onnx_operands(ctx, n, xs)
    grad = ctx.op("Mul", ctx.op("Mul", g, y), ctx.op("Pow", x, ctx.op("Sub", y, ctx.scalar(1.0, n.dtype))))
    return ctx.op("Where", ctx.op("Equal", y, ctx.scalar(0.0, n.dtype)), ctx.scalar(0.0, n.dtype), grad)


def _pow_grad_exponent_onnx(ctx, n, xs):
    g, x, y, out = onnx_operands(ctx, n, xs)
    zero = ctx.scalar(0.0, n.dtype)
    flat = ctx.op("And", ctx.op("Equal", x, zero), ctx.op("Not", ctx.op("Less", y, zero)))
    return ctx.op("Where", flat, zero, ctx.op("Mul", ctx.op("Mul", g, out), ctx.op("Log", x)))


register("pow_tensor", torch.pow, _pow_tensor_vjp, onnx=onnx_elementwise("Pow"))
register("pow_grad_base", _pow_grad_base, onnx=_pow_grad_base_onnx)
register("pow_grad_exponent", _pow_grad_exponent, onnx=_pow_grad_exponent_onnx)


@aten(A.pow.Tensor_Tensor)
def _(b, x, y):
    return b.emit("pow_tensor", x, y)


# -- unary math -----------------------------------------------------------------------------

def _unary(name, kernel, grad_kernel=None, uses="x", inplace=None, onnx=None, grad_onnx=None):
    """An elementwise op whose gradient is `grad_kernel(g, x or y)`, registered as `name_grad`;
    `onnx` and `grad_onnx` lower them (a string: that one ONNX op)."""

    def vjp(b, n, g, want):
        saved = n.inputs[0] if uses == "x" else n
        return (b.emit(f"{name}_grad", g, saved, **n.attrs) if want[0] else None,)

    register(name, kernel, vjp if grad_kernel else None, inplace=inplace,
             onnx=onnx_elementwise(onnx) if isinstance(onnx, str) else onnx)
    if grad_kernel:
        register(f"{name}_grad", grad_kernel, onnx=grad_onnx)


# The gradient lowerings below mirror their kernels' arithmetic, operand order included.

def _grad_onnx(build):
    """A gradient lowering `build(ctx, g, saved, const)` over operands in the node's dtype;
    `const(v)` is a scalar in that dtype."""
    def lower(ctx, n, xs):
        g, saved = onnx_operands(ctx, n, xs)
        return build(ctx, g, saved, lambda v: ctx.scalar(v, n.dtype))
    return lower


def _relu_grad_onnx(ctx, n, xs):
    g, y = onnx_operands(ctx, n, xs)
    return onnx_zero_where(ctx, n, ctx.op("LessOrEqual", y, ctx.scalar(0, n.dtype)), g)  # threshold_backward


def _hardtanh_onnx(ctx, n, xs):
    t = n.inputs[0].dtype
    return ctx.op("Clip", xs[0], ctx.scalar(n.attrs["min"], t), ctx.scalar(n.attrs["max"], t))


def _hardtanh_grad_onnx(ctx, n, xs):
    g, y = onnx_operands(ctx, n, xs)
    at_bound = ctx.op("Or", ctx.op("LessOrEqual", y, ctx.scalar(n.attrs["min"], n.dtype)),
                      ctx.op("GreaterOrEqual", y, ctx.scalar(n.attrs["max"], n.dtype)))
    return onnx_zero_where(ctx, n, at_bound, g)


def _rsqrt_onnx(ctx, n, xs):
    return ctx.op("Reciprocal", ctx.op("Sqrt", xs[0]))


_unary("exp", torch.exp, lambda g, y: g * y, uses="y", inplace=torch.exp_,
       onnx="Exp", grad_onnx=_grad_onnx(lambda ctx, g, y, c: ctx.op("Mul", g, y)))
_unary("log", torch.log, lambda g, x: g / x, onnx="Log", grad_onnx=_grad_onnx(lambda ctx, g, x, c: ctx.op("Div", g, x)))
_unary("sqrt", torch.sqrt, lambda g, y: g / (2 * y), uses="y", onnx="Sqrt",
       grad_onnx=_grad_onnx(lambda ctx, g, y, c: ctx.op("Div", g, ctx.op("Mul", c(2), y))))
_unary("rsqrt", torch.rsqrt, lambda g, y: -0.5 * g * y * y * y, uses="y", onnx=_rsqrt_onnx,
       grad_onnx=_grad_onnx(lambda ctx, g, y, c: ctx.op("Mul", ctx.op("Mul", ctx.op("Mul", ctx.op(
           "Mul", c(-0.5), g), y), y), y)))
_unary("reciprocal", torch.reciprocal, lambda g, y: -g * y * y, uses="y", onnx="Reciprocal",
       grad_onnx=_grad_onnx(lambda ctx, g, y, c: ctx.op("Mul", ctx.op("Mul", ctx.op("Neg", g), y), y)))
_unary("abs", torch.abs, lambda g, x: g * torch.sgn(x), onnx="Abs",
       grad_onnx=_grad_onnx(lambda ctx, g, x, c: ctx.op("Mul", g, ctx.op("Sign", x))))
_unary("relu", torch.relu, lambda g, y: A.threshold_backward(g, y, 0), uses="y", inplace=torch.relu_,
       onnx="Relu", grad_onnx=_relu_grad_onnx)
_unary("sigmoid", torch.sigmoid, lambda g, y: A.sigmoid_backward(g, y), uses="y", inplace=torch.sigmoid_,
       onnx="Sigmoid", grad_onnx=_grad_onnx(lambda ctx, g, y, c: ctx.op("Mul", ctx.op("Mul", g, ctx.op(
           "Sub", c(1), y)), y)))
_unary("tanh", torch.tanh, lambda g, y: A.tanh_backward(g, y), uses="y", inplace=torch.tanh_,
       onnx="Tanh", grad_onnx=_grad_onnx(lambda ctx, g, y, c: ctx.op("Mul", g, ctx.op(
           "Sub", c(1), ctx.op("Mul", y, y)))))
# The lowerings of the activations below, spelled as ATen's CPU kernels compute them.

def _silu_onnx(ctx, n, xs):
    return ctx.op("Mul", xs[0], ctx.op("Sigmoid", xs[0]))


def _silu_grad_onnx(ctx, n, xs):
    g, x = xs
    c = lambda v: ctx.scalar(v, n.dtype)  # noqa: E731
    s = ctx.op("Sigmoid", x)
    return ctx.op("Mul", ctx.op("Mul", g, s), ctx.op("Add", c(1), ctx.op("Mul", x, ctx.op("Sub", c(1), s))))


def _hardswish_onnx(ctx, n, xs):
    x, c = xs[0], lambda v: ctx.scalar(v, n.dtype)
    return ctx.op("Div", ctx.op("Mul", x, ctx.op("Clip", ctx.op("Add", x, c(3)), c(0), c(6))), c(6))


def _hardswish_grad_onnx(ctx, n, xs):
    g, x = xs
    c = lambda v: ctx.scalar(v, n.dtype)  # noqa: E731
    ramp = ctx.op("Mul", g, ctx.op("Add", ctx.op("Div", x, c(3)), c(0.5)))
    inside = ctx.op("Where", ctx.op("Less", x, c(3)), ramp, g)  # at x = 3 the kernel takes g itself
    return ctx.op("Where", ctx.op("LessOrEqual", x, c(-3)), c(0), inside)


_GELU_TANH_BETA, _GELU_TANH_KAPPA = math.sqrt(2) * (2 / math.sqrt(math.pi)) * 0.5, 0.044715


def _gelu_onnx(ctx, n, xs):
    x, c = xs[0], lambda v: ctx.scalar(v, n.dtype)
    if n.attrs["approximate"] == "tanh":
        cube = ctx.op("Mul", ctx.op("Mul", x, x), x)
        inner = ctx.op("Mul", c(_GELU_TANH_BETA), ctx.op("Add", x, ctx.op("Mul", c(_GELU_TANH_KAPPA), cube)))
        return ctx.op("Mul", ctx.op("Mul", c(0.5), x), ctx.op("Add", c(1), ctx.op("Tanh", inner)))
    cdf = ctx.op("Add", c(1), ctx.op("Erf", ctx.op("Mul", x, c(math.sqrt(0.5)))))
    return ctx.op("Mul", ctx.op("Mul", x, c(0.5)), cdf)


def _gelu_grad_onnx(ctx, n, xs):
    g, x = xs
    c = lambda v: ctx.scalar(v, n.dtype)  # noqa: E731
    square = ctx.op("Mul", x, x)
    if n.attrs["approximate"] == "tanh":
        inner = ctx.op("Mul", c(_GELU_TANH_BETA), ctx.op("Add", x, ctx.op("Mul", c(_GELU_TANH_KAPPA),
                                                                         ctx.op("Mul", square, x))))
        t = ctx.op("Tanh", inner)
        left = ctx.op("Mul", c(0.5), ctx.op("Add", c(1), t))
        slope = ctx.op("Mul", ctx.op("Sub", c(1), ctx.op("Mul", t, t)), c(_GELU_TANH_BETA))
        right = ctx.op("Mul", ctx.op("Mul", ctx.op("Mul", c(0.5), x), slope),
                       ctx.op("Add", c(1), ctx.op("Mul", c(3 * _GELU_TANH_KAPPA), square)))
        return ctx.op("Mul", g, ctx.op("Add", left, right))
    cdf = ctx.op("Mul", c(0.5), ctx.op("Add", c(1), ctx.op("Erf", ctx.op("Mul", x, c(math.sqrt(0.5))))))
    pdf = ctx.op("Mul", c(0.5 * (2 / math.sqrt(math.pi)) * math.sqrt(0.5)),
                 ctx.op("Exp", ctx.op("Mul", c(-0.5), square)))
    return ctx.op("Mul", g, ctx.op("Add", cdf, ctx.op("Mul", x, pdf)))


def _pow_onnx(ctx, n, xs):
    return ctx.op("Pow", xs[0], ctx.scalar(n.attrs["exponent"], n.dtype))


def _pow_grad_onnx(ctx, n, xs):
    g, x = xs
    e = n.attrs["exponent"]
    if e == 0:
        return ctx.op("Mul", g, ctx.scalar(0, n.dtype))
    scaled = ctx.op("Mul", g, ctx.scalar(e, n.dtype))
    return ctx.op("Mul", scaled, ctx.op("Pow", x, ctx.scalar(e - 1, n.dtype)))


def _leaky_relu_onnx(ctx, n, xs):
    x = xs[0]
    return ctx.op("Where", ctx.op("Greater", x, ctx.scalar(0, n.dtype)), x,
                  ctx.op("Mul", x, ctx.scalar(n.attrs["slope"], n.dtype)))


def _leaky_relu_grad_onnx(ctx, n, xs):
    g, x = xs
    return ctx.op("Where", ctx.op("Greater", x, ctx.scalar(0, n.dtype)), g,
                  ctx.op("Mul", g, ctx.scalar(n.attrs["slope"], n.dtype)))


_unary("silu", torch.nn.functional.silu, lambda g, x: A.silu_backward(g, x),
       inplace=lambda x: torch.nn.functional.silu(x, inplace=True), onnx=_silu_onnx, grad_onnx=_silu_grad_onnx)
_unary("hardswish", torch.nn.functional.hardswish, lambda g, x: A.hardswish_backward(g, x),
       onnx=_hardswish_onnx, grad_onnx=_hardswish_grad_onnx)
_unary("gelu", lambda x, approximate: A.gelu(x, approximate=approximate),
       lambda g, x, approximate: A.gelu_backward(g, x, approximate=approximate), onnx=_gelu_onnx,
       grad_onnx=_gelu_grad_onnx)
_unary("pow", lambda x, exponent: torch.pow(x, exponent),
       lambda g, x, exponent: g * exponent * torch.pow(x, exponent - 1) if exponent != 0 else torch.zeros_like(g),
       onnx=_pow_onnx, grad_onnx=_pow_grad_onnx)
# hardtanh's gradient vanishes at the bounds; the output carries the same information.
_unary("hardtanh", lambda x, min, max: A.hardtanh(x, min, max),
       lambda g, y, min, max: A.hardtanh_backward(g, y, min, max), uses="y",
       inplace=lambda x, min, max: A.hardtanh_(x, min, max), onnx=_hardtanh_onnx, grad_onnx=_hardtanh_grad_onnx)
def _clamp_onnx(ctx, n, xs):
    bound = lambda v: "" if v is None else ctx.scalar(v, n.dtype)  # noqa: E731  ("": no such bound)
    return ctx.op("Clip", xs[0], bound(n.attrs["min"]), bound(n.attrs["max"]))


def _clamp_grad_onnx(ctx, n, xs):
    g, x = xs
    a, keep = n.attrs, None
    for cmp, bound in (("GreaterOrEqual", a["min"]), ("LessOrEqual", a["max"])):
        if bound is not None:
            inside = ctx.op(cmp, x, ctx.scalar(bound, n.dtype))
            keep = inside if keep is None else ctx.op("And", keep, inside)
    return g if keep is None else ctx.op("Mul", g, ctx.cast(keep, n.dtype))  # as the kernel: g * mask


# ONNX has no Log1p or Expm1, and log(1 + x), exp(x) - 1 lose all relative accuracy near 0.
# The classic corrections keep it (Goldberg's for log1p, Kahan's for expm1; Higham, "Accuracy
# and Stability of Numerical Algorithms", 1.14): the rounding in u = 1 + x or u = exp(x)
# cancels in the ratio. Where the ratio is 0/0 or inf/inf the exact answer is taken.

def onnx_log1p(ctx, x, dtype):
    c = lambda v: ctx.scalar(v, dtype)  # noqa: E731
    u = ctx.op("Add", c(1), x)
    ratio = ctx.op("Div", ctx.op("Mul", ctx.op("Log", u), x), ctx.op("Sub", u, c(1)))
    ratio = ctx.op("Where", ctx.op("IsInf", u, detect_negative=0), u, ratio)  # log1p(inf) = inf
    return ctx.op("Where", ctx.op("Equal", u, c(1)), x, ratio)  # |x| below half an ulp of 1


def onnx_expm1(ctx, x, dtype):
    c = lambda v: ctx.scalar(v, dtype)  # noqa: E731
    u = ctx.op("Exp", x)
    u_minus_1 = ctx.op("Sub", u, c(1))
    ratio = ctx.op("Div", ctx.op("Mul", u_minus_1, x), ctx.op("Log", u))
    ratio = ctx.op("Where", ctx.op("IsInf", u, detect_negative=0), u, ratio)  # expm1(large) = inf
    ratio = ctx.op("Where", ctx.op("Equal", u_minus_1, c(-1)), c(-1), ratio)  # exp(x) below half an ulp of 1
    return ctx.op("Where", ctx.op("Equal", u, c(1)), x, ratio)


def _elu_onnx(ctx, n, xs):
    """As ATen's kernel: x * scale above 0, expm1(x * input_scale) * (alpha * scale) at or below."""
    x, a = xs[0], n.attrs
    c = lambda v: ctx.scalar(v, n.dtype)  # noqa: E731
    negative_coef = torch.tensor(a["alpha"], dtype=n.dtype) * torch.tensor(a["scale"], dtype=n.dtype)
    below = ctx.op("Mul", onnx_expm1(ctx, ctx.op("Mul", x, c(a["input_scale"])), n.dtype), ctx.const(negative_coef))
    return ctx.op("Where", ctx.op("Greater", x, c(0)), ctx.op("Mul", x, c(a["scale"])), below)


def _elu_grad_onnx(ctx, n, xs):
    """As ATen's kernel: g * scale above 0, g * input_scale * (alpha * scale) * exp(x * input_scale)."""
    g, x = xs
    a, c = n.attrs, lambda v: ctx.scalar(v, n.dtype)
    negative_coef = torch.tensor(a["alpha"], dtype=n.dtype) * torch.tensor(a["scale"], dtype=n.dtype)
    below = ctx.op("Mul", ctx.op("Mul", ctx.op("Mul", g, c(a["input_scale"])), ctx.const(negative_coef)),
                   ctx.op("Exp", ctx.op("Mul", x, c(a["input_scale"]))))
    return ctx.op("Where", ctx.op("Greater", x, c(0)), ctx.op("Mul", g, c(a["scale"])), below)


_unary("clamp", lambda x, min, max: torch.clamp(x, min, max),
       lambda g, x, min, max: g * _inside(x, min, max), onnx=_clamp_onnx, grad_onnx=_clamp_grad_onnx)
_unary("log1p", torch.log1p, lambda g, x: g / (1 + x),
       onnx=lambda ctx, n, xs: onnx_log1p(ctx, *onnx_operands(ctx, n, xs), n.dtype),
       grad_onnx=_grad_onnx(lambda ctx, g, x, c: ctx.op("Div", g, ctx.op("Add", c(1), x))))
_unary("expm1", torch.expm1, lambda g, y: g * (y + 1), uses="y",
       onnx=lambda ctx, n, xs: onnx_expm1(ctx, *onnx_operands(ctx, n, xs), n.dtype),
       grad_onnx=_grad_onnx(lambda ctx, g, y, c: ctx.op("Mul", g, ctx.op("Add", y, c(1)))))
_unary("sin", torch.sin, lambda g, x: g * torch.cos(x), onnx="Sin",
       grad_onnx=_grad_onnx(lambda ctx, g, x, c: ctx.op("Mul", g, ctx.op("Cos", x))))
_unary("cos", torch.cos, lambda g, x: -g * torch.sin(x), onnx="Cos",
       grad_onnx=_grad_onnx(lambda ctx, g, x, c: ctx.op("Mul", ctx.op("Neg", g), ctx.op("Sin", x))))
_unary("erf", torch.erf, lambda g, x: g * (2 / math.sqrt(math.pi)) * torch.exp(-x * x), onnx="Erf",
       grad_onnx=_grad_onnx(lambda ctx, g, x, c: ctx.op("Mul", ctx.op("Mul", g, c(2 / math.sqrt(math.pi))), ctx.op(
           "Exp", ctx.op("Mul", ctx.op("Neg", x), x)))))
_unary("leaky_relu", lambda x, slope: A.leaky_relu(x, slope),
       lambda g, x, slope: A.leaky_relu_backward(g, x, slope, False), onnx=_leaky_relu_onnx,
       grad_onnx=_leaky_relu_grad_onnx)
_unary("elu", lambda x, alpha, scale, input_scale: A.elu(x, alpha, scale, input_scale),
       lambda g, x, alpha, scale, input_scale: A.elu_backward(g, alpha, scale, input_scale, False, x),
       onnx=_elu_onnx, grad_onnx=_elu_grad_onnx)


def onnx_trunc(ctx, x, dtype):
    """ONNX has no Trunc: ceil below 0, floor elsewhere (-0.5 -> -0.0, as torch); integers are whole."""
    if not dtype.is_floating_point:
        return x
    return ctx.op("Where", ctx.op("Less", x, ctx.scalar(0, dtype)), ctx.op("Ceil", x), ctx.op("Floor", x))


# Piecewise constant: the gradient is zero everywhere (None, not a zero tensor).
# Round is half-to-even in both.
_ONNX_STEPS = {"sign": onnx_elementwise("Sign"), "floor": onnx_elementwise("Floor"), "ceil": onnx_elementwise("Ceil"),
               "round": onnx_elementwise("Round"), "trunc": lambda ctx, n, xs: onnx_trunc(ctx, xs[0], n.dtype)}
for _step in ("sign", "floor", "ceil", "round", "trunc"):
    register(_step, getattr(torch, _step), lambda b, n, g, want: (None,), onnx=_ONNX_STEPS[_step])


def _inside(x, lo, hi):
    keep = torch.ones_like(x, dtype=torch.bool)
    keep = keep if lo is None else keep & (x >= lo)
    return keep if hi is None else keep & (x <= hi)


OPS_SIMPLE = {A.neg.default: "neg", A.exp.default: "exp", A.log.default: "log", A.sqrt.default: "sqrt",
              A.rsqrt.default: "rsqrt", A.reciprocal.default: "reciprocal", A.abs.default: "abs",
              A.relu.default: "relu", A.sigmoid.default: "sigmoid", A.tanh.default: "tanh",
              A.silu.default: "silu", A.hardswish.default: "hardswish", A.log1p.default: "log1p",
              A.expm1.default: "expm1", A.sin.default: "sin", A.cos.default: "cos", A.erf.default: "erf",
              A.sign.default: "sign", A.floor.default: "floor", A.ceil.default: "ceil",
              A.round.default: "round", A.trunc.default: "trunc"}
for _ov, _name in OPS_SIMPLE.items():
    aten(_ov)(lambda b, x, _name=_name: b.emit(_name, x))


@aten(A.gelu.default)
def _(b, x, approximate="none"):
    return b.emit("gelu", x, approximate=approximate)


@aten(A.pow.Tensor_Scalar)
def _(b, x, exponent):
    return b.emit("pow", x, exponent=exponent)


@aten(A.hardtanh.default)
def _(b, x, min_val=-1.0, max_val=1.0):
    return b.emit("hardtanh", x, min=min_val, max=max_val)


@aten(A.clamp.default)
def _(b, x, min=None, max=None):
    return b.emit("clamp", x, min=min, max=max)


# clamp with tensor bounds: x's gradient passes inside [lo, hi], a bound's where it binds.
def _clamp_t_vjp(b, n, g, want):
    return tuple(grad_like(b, b.emit("clamp_t_grad", g, *n.inputs, part=part), i) if w else None
                 for i, w, part in zip(n.inputs, want, ("x", "lo", "hi")))


def _clamp_t_grad(g, x, lo, hi, part):
    # Where lo > hi torch's clamp returns hi, and hi takes the gradient.
    passes = {"x": (x >= lo) & (x <= hi), "lo": (x < lo) & (lo < hi), "hi": (x > hi) | (hi < lo)}[part]
    return torch.where(passes, g, torch.zeros((), dtype=g.dtype, device=g.device))


def _clamp_t_onnx(ctx, n, xs):
    # Clip takes scalar bounds only. Max and Min pass a NaN on, as torch's clamp does.
    x, lo, hi = onnx_operands(ctx, n, xs)
    return ctx.op("Min", ctx.op("Max", x, lo), hi)


def _clamp_t_grad_onnx(ctx, n, xs):
    dtype = functools.reduce(torch.promote_types, (i.dtype for i in n.inputs[1:]))
    g, (x, lo, hi) = xs[0], [ctx.convert(v, i.dtype, dtype) for v, i in zip(xs[1:], n.inputs[1:])]
    part = n.attrs["part"]
    if part == "x":
        passes = ctx.op("And", ctx.op("GreaterOrEqual", x, lo), ctx.op("LessOrEqual", x, hi))
    elif part == "lo":
        passes = ctx.op("And", ctx.op("Less", x, lo), ctx.op("Less", lo, hi))
    else:
        passes = ctx.op("Or", ctx.op("Greater", x, hi), ctx.op("Less", hi, lo))
    return ctx.op("Where", passes, ctx.convert(g, n.inputs[0].dtype, n.dtype), ctx.scalar(0, n.dtype))


register("clamp_t", lambda x, lo, hi: torch.clamp(x, lo, hi), _clamp_t_vjp, onnx=_clamp_t_onnx)
register("clamp_t_grad", _clamp_t_grad, onnx=_clamp_t_grad_onnx)


@aten(A.clamp.Tensor)
def _(b, x, min=None, max=None):
    lo = min if min is not None else b.const(-math.inf, dtype=x.dtype)
    hi = max if max is not None else b.const(math.inf, dtype=x.dtype)
    return b.emit("clamp_t", x, lo, hi)


# base ** x for a Python number base
# The base is a Python number: torch takes it in the tensor's dtype, as ctx.scalar does.
_unary("scalar_pow", lambda x, base: torch.pow(base, x), lambda g, y, base: g * y * math.log(base), uses="y",
       onnx=lambda ctx, n, xs: ctx.op("Pow", ctx.scalar(n.attrs["base"], n.dtype), *onnx_operands(ctx, n, xs)),
       grad_onnx=lambda ctx, n, xs: ctx.op("Mul", ctx.op("Mul", *onnx_operands(ctx, n, xs)),
                                           ctx.scalar(math.log(n.attrs["base"]), n.dtype)))


@aten(A.pow.Scalar)
def _(b, base, x):
    if base <= 0:
        raise NotImplementedError(f"{base} ** tensor (only a positive base has a gradient)")
    return b.emit("scalar_pow", x, base=base)


# fmod / remainder: x's gradient is 1; the divisor's is -trunc(x/y) (fmod) or -floor(x/y).
def _mod_vjp(b, n, g, want):
    x, y = n.inputs
    gy = grad_like(b, b.emit("mod_grad_rhs", g, x, y, kind=n.op), y) if want[1] else None
    return (grad_like(b, g, x) if want[0] else None, gy)


def _fmod_onnx(ctx, n, xs):
    return ctx.op("Mod", *onnx_operands(ctx, n, xs), fmod=1)  # C's fmod: the dividend's sign


def _remainder_onnx(ctx, n, xs):
    """Python's modulo, the divisor's sign. On integers ONNX's Mod is that; on floats it must be
    fmod, corrected as ATen's kernel does: + y where the fmod is nonzero and its sign is not y's."""
    x, y = onnx_operands(ctx, n, xs)
    if not n.dtype.is_floating_point:
        return ctx.op("Mod", x, y, fmod=0)
    mod, zero = ctx.op("Mod", x, y, fmod=1), ctx.scalar(0, n.dtype)
    wrong_sign = ctx.op("Xor", ctx.op("Less", y, zero), ctx.op("Less", mod, zero))
    shift = ctx.op("And", ctx.op("Not", ctx.op("Equal", mod, zero)), wrong_sign)
    return ctx.op("Where", shift, ctx.op("Add", mod, y), mod)


def _mod_grad_rhs_onnx(ctx, n, xs):
    g, x, y = onnx_operands(ctx, n, xs)
    quotient = ctx.op("Div", x, y)
    rounded = onnx_trunc(ctx, quotient, n.dtype) if n.attrs["kind"] == "fmod" else ctx.op("Floor", quotient)
    return ctx.op("Mul", ctx.op("Neg", g), rounded)


register("fmod", torch.fmod, _mod_vjp, onnx=_fmod_onnx)
register("remainder", torch.remainder, _mod_vjp, onnx=_remainder_onnx)
register("mod_grad_rhs", lambda g, x, y, kind: -g * (torch.trunc(x / y) if kind == "fmod" else torch.floor(x / y)),
         onnx=_mod_grad_rhs_onnx)
for _mod in ("fmod", "remainder"):
    for _ov in (getattr(A, _mod).Tensor, getattr(A, _mod).Scalar):
        aten(_ov)(lambda b, x, y, _mod=_mod: b.emit(_mod, *_operands(b, x, y)))


@aten(A.leaky_relu.default)
def _(b, x, negative_slope=0.01):
    return b.emit("leaky_relu", x, slope=negative_slope)


@aten(A.elu.default)
def _(b, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return b.emit("elu", x, alpha=alpha, scale=scale, input_scale=input_scale)


# -- maximum / minimum: the larger (smaller) operand gets the gradient; ties split it ------

def _choose_vjp(b, n, g, want):
    x, y = n.inputs
    # An operand's share of g: 1 where it wins, 0.5 where they tie, 0 where it loses.
    gx = grad_like(b, b.emit("mul", g, b.emit("choice_share", x, y, pick=n.op)), x) if want[0] else None
    gy = grad_like(b, b.emit("mul", g, b.emit("choice_share", y, x, pick=n.op)), y) if want[1] else None
    return gx, gy


def _choice_share(x, y, pick):
    wins = x > y if pick == "maximum" else x < y
    return wins.to(torch.promote_types(x.dtype, y.dtype)) + 0.5 * (x == y)


register("maximum", torch.maximum, _choose_vjp, onnx=onnx_elementwise("Max"))
register("minimum", torch.minimum, _choose_vjp, onnx=onnx_elementwise("Min"))
def _choice_share_onnx(ctx, n, xs):
    x, y = onnx_operands(ctx, n, xs, _compared_dtype(n))
    wins = ctx.op("Greater" if n.attrs["pick"] == "maximum" else "Less", x, y)
    ties = ctx.op("Mul", ctx.cast(ctx.op("Equal", x, y), n.dtype), ctx.scalar(0.5, n.dtype))
    return ctx.op("Add", ctx.cast(wins, n.dtype), ties)


register("choice_share", _choice_share, onnx=_choice_share_onnx)
aten(A.maximum.default)(lambda b, x, y: b.emit("maximum", x, y))
aten(A.minimum.default)(lambda b, x, y: b.emit("minimum", x, y))


# -- comparisons and selection (no gradient through the condition) ------------------------

_ONNX_COMPARE = {"eq": _onnx_compare("Equal"), "ne": _onnx_compare("Equal", negate=True), "lt": _onnx_compare("Less"),
                 "le": _onnx_compare("LessOrEqual"), "gt": _onnx_compare("Greater"),
                 "ge": _onnx_compare("GreaterOrEqual")}
for _cmp in ("eq", "ne", "lt", "le", "gt", "ge"):
    register(_cmp, getattr(torch, _cmp), onnx=_ONNX_COMPARE[_cmp])
    for _ov in (getattr(A, _cmp).Tensor, getattr(A, _cmp).Scalar):
        aten(_ov)(lambda b, x, y, _cmp=_cmp: b.emit(_cmp, *_operands(b, x, y)))
register("isnan", torch.isnan, onnx=lambda ctx, n, xs: ctx.op("IsNaN", xs[0]))
aten(A.isnan.default)(lambda b, x: b.emit("isnan", x))
register("logical_not", torch.logical_not, onnx=lambda ctx, n, xs: ctx.op("Not", *onnx_operands(ctx, n, xs)))
register("logical_and", torch.logical_and, onnx=lambda ctx, n, xs: ctx.op("And", *onnx_operands(ctx, n, xs)))
register("logical_or", torch.logical_or, onnx=lambda ctx, n, xs: ctx.op("Or", *onnx_operands(ctx, n, xs)))
aten(A.logical_not.default)(lambda b, x: b.emit("logical_not", x))
aten(A.logical_and.default)(lambda b, x, y: b.emit("logical_and", x, y))
aten(A.logical_or.default)(lambda b, x, y: b.emit("logical_or", x, y))
def _onnx_bitwise(logical, bitwise):
    """ONNX splits torch's bitwise ops: And/Or/Xor/Not on bools, BitwiseAnd/... on integers."""
    def lower(ctx, n, xs):
        return ctx.op(logical if n.dtype == torch.bool else bitwise, *onnx_operands(ctx, n, xs))
    return lower


register("bitwise_not", torch.bitwise_not, onnx=_onnx_bitwise("Not", "BitwiseNot"))
aten(A.bitwise_not.default)(lambda b, x: b.emit("bitwise_not", x))
_ONNX_BITWISE = {"bitwise_and": ("And", "BitwiseAnd"), "bitwise_or": ("Or", "BitwiseOr"),
                 "bitwise_xor": ("Xor", "BitwiseXor")}
for _bit in ("bitwise_and", "bitwise_or", "bitwise_xor"):  # `m1 | m2` on bool masks
    register(_bit, getattr(torch, _bit), onnx=_onnx_bitwise(*_ONNX_BITWISE[_bit]))
    for _ov in (getattr(A, _bit).Tensor, getattr(A, _bit).Scalar):
        aten(_ov)(lambda b, x, y, _bit=_bit: b.emit(_bit, *_operands(b, x, y)))


def _where_vjp(b, n, g, want):
    cond, x, y = n.inputs
    zero = b.const(0.0, dtype=g.dtype)
    gx = grad_like(b, b.emit("where", cond, g, zero), x) if want[1] else None
    gy = grad_like(b, b.emit("where", cond, zero, g), y) if want[2] else None
    return None, gx, gy


def _where_onnx(ctx, n, xs):
    cond, x, y = xs
    return ctx.op("Where", cond, *(ctx.convert(v, i.dtype, n.dtype) for v, i in zip((x, y), n.inputs[1:])))


register("where", torch.where, _where_vjp, onnx=_where_onnx)


@aten(A.where.self, A.where.ScalarSelf, A.where.ScalarOther, A.where.Scalar)
def _(b, cond, x, y):
    return b.emit("where", cond, *_operands(b, x, y))


@aten(A.masked_fill.Scalar, A.masked_fill.Tensor)
def _(b, x, mask, value):
    return b.emit("where", mask, scalar(b, value, like=x), x)


def _cast_vjp(b, n, g, want):
    x = n.inputs[0]
    return (b.emit("cast", g, dtype=x.dtype) if want[0] and x.is_float else None,)


register("cast", lambda x, dtype: x.to(dtype), _cast_vjp,
         onnx=lambda ctx, n, xs: ctx.convert(xs[0], n.inputs[0].dtype, n.dtype))


@aten(A._to_copy.default)
def _(b, x, dtype=None, **_):
    return x if dtype is None or dtype == x.dtype else b.emit("cast", x, dtype=dtype)


# `x.to(dtype)` leaves a metadata assertion behind; there is nothing to compute.
aten(A._assert_tensor_metadata.default)(lambda b, *args, **kwargs: None)
aten(A.clone.default, A.alias.default, A.lift_fresh_copy.default)(lambda b, x, **_: x)

# `x.detach()`: the value passes, its gradient does not.
register("detach", torch.Tensor.detach, lambda b, n, g, want: (None,), view=True,
         onnx=lambda ctx, n, xs: ctx.op("Identity", xs[0]))
aten(A.detach.default)(lambda b, x: b.emit("detach", x))


# -- reductions -----------------------------------------------------------------------------

def _dims(shape, dims):
    if dims is None or len(dims) == 0:
        return tuple(range(len(shape)))
    return tuple(sorted(d % len(shape) for d in dims))


def _kept_shape(shape, dims):
    return tuple(1 if i in dims else s for i, s in enumerate(shape))


def _expand_back(b, g, x, dims, keepdim):
    """Gradient of a reduction over `dims`: reshape with unit dims, broadcast to x."""
    if not keepdim:
        g = b.emit("reshape", g, shape=_kept_shape(x.shape, dims))
    return b.emit("expand", g, size=tuple(x.shape))


def _sum_vjp(b, n, g, want):
    x = n.inputs[0]
    if not want[0]:
        return (None,)
    if g.dtype != x.dtype:  # sum(dtype=...) accumulated in another precision
        g = b.emit("cast", g, dtype=x.dtype)
    return (_expand_back(b, g, x, n.attrs["dims"], n.attrs["keepdim"]),)


def _mean_vjp(b, n, g, want):
    if not want[0]:
        return (None,)
    x, dims = n.inputs[0], n.attrs["dims"]
    count = math.prod(x.shape[d] for d in dims)
    return (_expand_back(b, b.emit("div", g, b.const(float(count))), x, dims, n.attrs["keepdim"]),)


def _var_vjp(b, n, g, want):
    if not want[0]:
        return (None,)
    x = n.inputs[0]
    if not n.attrs["keepdim"]:
        g = b.emit("reshape", g, shape=_kept_shape(x.shape, n.attrs["dims"]))
    return (b.emit("var_grad", g, x, dims=n.attrs["dims"], correction=n.attrs["correction"]),)


def _var_grad(g, x, dims, correction):
    count = math.prod(x.shape[d] for d in dims)
    return g * (2.0 / (count - correction)) * (x - x.mean(dims, keepdim=True))


def _sum_kernel(x, dims, keepdim, dtype=None):
    return torch.sum(x, dims, keepdim=keepdim, dtype=dtype)


def _onnx_reduction(op_type):
    """Reduce over attrs["dims"], in the node's dtype (a sum of bools counts in int64)."""
    return lambda ctx, n, xs: ctx.reduce(op_type, onnx_operands(ctx, n, xs)[0], n.attrs["dims"], n.attrs["keepdim"])


def _centered_onnx(ctx, x, dims):
    """x minus its mean over dims."""
    return ctx.op("Sub", x, ctx.reduce("ReduceMean", x, dims, keepdims=True))


def _var_onnx(ctx, n, xs):
    dims, x = n.attrs["dims"], xs[0]
    count = math.prod(n.inputs[0].shape[d] for d in dims)
    d = _centered_onnx(ctx, x, dims)
    squares = ctx.reduce("ReduceSum", ctx.op("Mul", d, d), dims, n.attrs["keepdim"])
    return ctx.op("Div", squares, ctx.scalar(count - n.attrs["correction"], n.dtype))


def _var_grad_onnx(ctx, n, xs):
    g, x = xs
    dims = n.attrs["dims"]
    count = math.prod(n.inputs[1].shape[d] for d in dims)
    scaled = ctx.op("Mul", g, ctx.scalar(2.0 / (count - n.attrs["correction"]), n.dtype))
    return ctx.op("Mul", scaled, _centered_onnx(ctx, x, dims))


register("sum", _sum_kernel, _sum_vjp, onnx=_onnx_reduction("ReduceSum"))
register("mean", lambda x, dims, keepdim: torch.mean(x, dims, keepdim=keepdim), _mean_vjp,
         onnx=_onnx_reduction("ReduceMean"))
register("var", lambda x, dims, correction, keepdim: torch.var(x, dims, correction=correction, keepdim=keepdim),
         _var_vjp, onnx=_var_onnx)
register("var_grad", _var_grad, onnx=_var_grad_onnx)
def _extremum_vjp(b, n, g, want):
    return (b.emit("extremum_grad", g, n.inputs[0], n, dims=n.attrs["dims"], keepdim=n.attrs["keepdim"])
            if want[0] else None,)


def _extremum_grad(g, x, y, dims, keepdim):
    # As torch: the gradient is shared evenly among the entries that tie for the extremum.
    if not keepdim:
        g, y = g.reshape(_kept_shape(x.shape, dims)), y.reshape(_kept_shape(x.shape, dims))
    hit = x == y
    return hit * (g / hit.sum(dims, keepdim=True))


register("amax", lambda x, dims, keepdim: torch.amax(x, dims, keepdim=keepdim), _extremum_vjp,
         onnx=_onnx_reduction("ReduceMax"))
register("amin", lambda x, dims, keepdim: torch.amin(x, dims, keepdim=keepdim), _extremum_vjp,
         onnx=_onnx_reduction("ReduceMin"))
def _extremum_grad_onnx(ctx, n, xs):
    g, x, y = xs
    x_shape, dims = n.inputs[1].shape, n.attrs["dims"]
    if not n.attrs["keepdim"]:
        kept = ctx.ints(_kept_shape(x_shape, dims))
        g, y = ctx.op("Reshape", g, kept), ctx.op("Reshape", y, kept)
    hit = ctx.cast(ctx.op("Equal", x, y), n.dtype)
    count = ctx.reduce("ReduceSum", hit, dims, keepdims=True)  # the ties: whole numbers, exact as floats
    return ctx.op("Mul", hit, ctx.op("Div", g, count))


register("extremum_grad", _extremum_grad, onnx=_extremum_grad_onnx)
def _any_onnx(ctx, n, xs):
    nonzero = ctx.op("Not", ctx.op("Equal", xs[0], ctx.scalar(0, n.inputs[0].dtype)))
    largest = ctx.reduce("ReduceMax", ctx.cast(nonzero, torch.uint8), n.attrs["dims"], n.attrs["keepdim"])
    return ctx.cast(largest, torch.bool)


register("any", lambda x, dims, keepdim: torch.any(x, dims, keepdim=keepdim) if dims else torch.any(x),
         onnx=_any_onnx)


def _sum_to_kernel(g, shape):
    lead = g.dim() - len(shape)
    dims = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape) if s == 1 and g.shape[lead + i] != 1)
    return g.sum(dims, keepdim=True).reshape(shape) if dims else g.reshape(shape)


def _sum_to_onnx(ctx, n, xs):
    g, shape = n.inputs[0].shape, n.attrs["shape"]
    lead = len(g) - len(shape)
    dims = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape) if s == 1 and g[lead + i] != 1)
    summed = ctx.reduce("ReduceSum", xs[0], dims, keepdims=True) if dims else xs[0]
    return ctx.op("Reshape", summed, ctx.ints(shape))


register("sum_to", _sum_to_kernel,
         lambda b, n, g, want: (b.emit("expand", g, size=tuple(n.inputs[0].shape)) if want[0] else None,),
         onnx=_sum_to_onnx)


@aten(A.sum.dim_IntList, A.sum.default)
def _(b, x, dims=None, keepdim=False, dtype=None):
    return b.emit("sum", x, dims=_dims(x.shape, dims), keepdim=keepdim, dtype=dtype)


@aten(A.mean.dim, A.mean.default)
def _(b, x, dims=None, keepdim=False, dtype=None):
    if dtype is not None and dtype != x.dtype:
        x = b.emit("cast", x, dtype=dtype)
    return b.emit("mean", x, dims=_dims(x.shape, dims), keepdim=keepdim)


@aten(A.var.correction, A.var.dim)
def _(b, x, dims=None, unbiased=None, keepdim=False, correction=None):
    corr = correction if correction is not None else (1 if unbiased in (None, True) else 0)
    return b.emit("var", x, dims=_dims(x.shape, dims), correction=corr, keepdim=keepdim)


@aten(A.amax.default)
def _(b, x, dims=(), keepdim=False):
    return b.emit("amax", x, dims=_dims(x.shape, dims), keepdim=keepdim)


@aten(A.amin.default)
def _(b, x, dims=(), keepdim=False):
    return b.emit("amin", x, dims=_dims(x.shape, dims), keepdim=keepdim)


# x.max() / x.min() over everything share the gradient among ties, like amax.
aten(A.max.default)(lambda b, x: b.emit("amax", x, dims=_dims(x.shape, None), keepdim=False))
aten(A.min.default)(lambda b, x: b.emit("amin", x, dims=_dims(x.shape, None), keepdim=False))


# max(dim)/min(dim) pick one entry (the first extremum) and route the gradient to it alone.
def _onnx_arg_extremum(op_type):
    """The first extremum's index along dim (over everything, flattened, for dim=None). torch takes
    a NaN as the extremum (the first NaN's index); ONNX's ArgMax/ArgMin pass over NaNs, so rows
    holding one take the first NaN instead."""
    def lower(ctx, n, xs):
        x, dim = xs[0], n.attrs["dim"]
        if dim is None:
            x, dim = ctx.op("Reshape", x, ctx.ints([-1])), 0
        picked = ctx.op(op_type, x, axis=dim, keepdims=1, select_last_index=0)
        if n.inputs[0].dtype.is_floating_point:
            nan = ctx.cast(ctx.op("IsNaN", x), torch.uint8)
            any_nan = ctx.cast(ctx.reduce("ReduceMax", nan, [dim], keepdims=True), torch.bool)
            picked = ctx.op("Where", any_nan, ctx.op("ArgMax", nan, axis=dim, keepdims=1, select_last_index=0), picked)
        return ctx.op("Reshape", picked, ctx.ints(n.shape))
    return lower


register("argmax", lambda x, dim, keepdim: torch.argmax(x, dim, keepdim), onnx=_onnx_arg_extremum("ArgMax"))
register("argmin", lambda x, dim, keepdim: torch.argmin(x, dim, keepdim), onnx=_onnx_arg_extremum("ArgMin"))
aten(A.argmax.default)(lambda b, x, dim=None, keepdim=False: b.emit("argmax", x, dim=dim, keepdim=keepdim))
aten(A.argmin.default)(lambda b, x, dim=None, keepdim=False: b.emit("argmin", x, dim=dim, keepdim=keepdim))


def _picked(b, x, dim, keepdim, arg):
    dim = dim % max(len(x.shape), 1)
    idx = b.emit(arg, x, dim=dim, keepdim=True)
    value = b.emit("gather", x, idx, dim=dim)
    if keepdim or not x.shape:
        return value, idx
    shape = tuple(s for i, s in enumerate(x.shape) if i != dim)
    return b.emit("reshape", value, shape=shape), b.emit("reshape", idx, shape=shape)


aten(A.max.dim)(lambda b, x, dim, keepdim=False: _picked(b, x, dim, keepdim, "argmax"))


# sort / topk: the order is computed without gradient; the values are a gather along it.
# ONNX: TopK, sorted, which puts the lower index first among equal values and NaN above every
# number, as torch's CPU sort does (it is stable whether or not asked to be). torch's topk
# selects with a partial sort: among equal values its order is that algorithm's, which TopK
# does not reproduce (the values agree; which tied entry takes the gradient may not).

def _sort_indices_onnx(ctx, n, xs):
    dim = n.attrs["dim"]
    return ctx.op("TopK", xs[0], ctx.ints([n.inputs[0].shape[dim]]), outputs=2, axis=dim,
                  largest=int(n.attrs["descending"]), sorted=1)[1]


def _topk_indices_onnx(ctx, n, xs):
    a = n.attrs
    if not a["sorted"] and a["k"] > 1:
        raise NotImplementedError("topk(sorted=False): torch returns the k entries in the order its selection "
                                  "algorithm leaves them, which ONNX's TopK does not reproduce")
    return ctx.op("TopK", xs[0], ctx.ints([a["k"]]), outputs=2, axis=a["dim"], largest=int(a["largest"]), sorted=1)[1]


register("sort_indices", lambda x, dim, descending, stable: torch.sort(x, dim=dim, descending=descending,
                                                                       stable=stable).indices, onnx=_sort_indices_onnx)
register("topk_indices", lambda x, k, dim, largest, sorted: torch.topk(x, k, dim, largest, sorted).indices,
         onnx=_topk_indices_onnx)


@aten(A.sort.default, A.sort.stable)
def _(b, x, dim=-1, descending=False, stable=False):
    dim = dim % max(len(x.shape), 1)
    idx = b.emit("sort_indices", x, dim=dim, descending=descending, stable=bool(stable))
    return b.emit("gather", x, idx, dim=dim), idx


@aten(A.topk.default)
def _(b, x, k, dim=-1, largest=True, sorted=True):
    dim = dim % max(len(x.shape), 1)
    idx = b.emit("topk_indices", x, k=k, dim=dim, largest=largest, sorted=sorted)
    return b.emit("gather", x, idx, dim=dim), idx
aten(A.min.dim)(lambda b, x, dim, keepdim=False: _picked(b, x, dim, keepdim, "argmin"))


# -- cumsum, vector norms ---------------------------------------------------------------------

register("cumsum", lambda x, dim: torch.cumsum(x, dim),
         lambda b, n, g, want: (b.emit("cumsum_grad", g, dim=n.attrs["dim"]) if want[0] else None,),
         onnx=lambda ctx, n, xs: ctx.op("CumSum", xs[0], ctx.scalar(n.attrs["dim"], torch.int64)))
register("cumsum_grad", lambda g, dim: g.flip(dim).cumsum(dim).flip(dim),  # a sum over the later entries
         onnx=lambda ctx, n, xs: ctx.op("CumSum", xs[0], ctx.scalar(n.attrs["dim"], torch.int64), reverse=1))


@aten(A.cumsum.default)
def _(b, x, dim, dtype=None):
    if dtype is not None and dtype != x.dtype:
        x = b.emit("cast", x, dtype=dtype)
    return b.emit("cumsum", x, dim=dim % max(len(x.shape), 1))


def _norm_grad(g, x, y, ord, dims, keepdim):
    if not keepdim:
        g, y = g.reshape(_kept_shape(x.shape, dims)), y.reshape(_kept_shape(x.shape, dims))
    if ord == 1:
        return g * torch.sgn(x)
    # d|x|_p / dx = x |x|^(p-2) / |x|_p^(p-1); torch takes 0 where the norm is 0.
    scale = (g / y.pow(ord - 1)).masked_fill(y == 0, 0)
    return x * x.abs().pow(ord - 2) * scale


def _vector_norm_onnx(ctx, n, xs):
    x, a = xs[0], n.attrs
    dims, keep, order = a["dims"], a["keepdim"], a["ord"]
    if order == 1:
        return ctx.reduce("ReduceL1", x, dims, keep)
    if order == 2:
        return ctx.op("Sqrt", ctx.reduce("ReduceSumSquare", x, dims, keep))
    powers = ctx.op("Pow", ctx.op("Abs", x), ctx.scalar(order, n.dtype))
    return ctx.op("Pow", ctx.reduce("ReduceSum", powers, dims, keep), ctx.scalar(1 / order, n.dtype))


def _vector_norm_grad_onnx(ctx, n, xs):
    g, x, y = xs
    a, x_shape = n.attrs, n.inputs[1].shape
    if not a["keepdim"]:
        kept = ctx.ints(_kept_shape(x_shape, a["dims"]))
        g, y = ctx.op("Reshape", g, kept), ctx.op("Reshape", y, kept)
    if a["ord"] == 1:
        return ctx.op("Mul", g, ctx.op("Sign", x))
    c = lambda v: ctx.scalar(v, n.dtype)  # noqa: E731
    scale = ctx.op("Div", g, ctx.op("Pow", y, c(a["ord"] - 1)))
    scale = ctx.op("Where", ctx.op("Equal", y, c(0)), c(0), scale)  # torch takes 0 where the norm is 0
    return ctx.op("Mul", ctx.op("Mul", x, ctx.op("Pow", ctx.op("Abs", x), c(a["ord"] - 2))), scale)


register("vector_norm", lambda x, ord, dims, keepdim: torch.linalg.vector_norm(x, ord, dims, keepdim),
         lambda b, n, g, want: (b.emit("vector_norm_grad", g, n.inputs[0], n, **n.attrs) if want[0] else None,),
         onnx=_vector_norm_onnx)
register("vector_norm_grad", _norm_grad, onnx=_vector_norm_grad_onnx)


@aten(A.linalg_vector_norm.default)
def _(b, x, ord=2, dim=None, keepdim=False, dtype=None):
    if not 1 <= ord < math.inf:
        raise NotImplementedError(f"vector norm of order {ord}")
    dims = _dims(x.shape, [dim] if isinstance(dim, int) else dim)
    if dtype is not None and dtype != x.dtype:
        x = b.emit("cast", x, dtype=dtype)
    return b.emit("vector_norm", x, ord=ord, dims=dims, keepdim=keepdim)


@aten(A.var_mean.correction)
def _(b, x, dims=None, correction=None, keepdim=False):
    corr = 1 if correction is None else correction
    dims = _dims(x.shape, dims)
    return (b.emit("var", x, dims=dims, correction=corr, keepdim=keepdim),
            b.emit("mean", x, dims=dims, keepdim=keepdim))


@aten(A.any.dim, A.any.dims, A.any.default)
def _(b, x, dims=None, keepdim=False):
    dims = [dims] if isinstance(dims, int) else dims
    return b.emit("any", x, dims=_dims(x.shape, dims) if dims is not None else (), keepdim=keepdim)


# -- softmax --------------------------------------------------------------------------------

def _softmax_grad_onnx(ctx, n, xs):
    g, y = xs
    inner = ctx.reduce("ReduceSum", ctx.op("Mul", g, y), [n.attrs["dim"]], keepdims=True)
    grad = ctx.op("Mul", ctx.op("Sub", g, inner), y)
    return ctx.op("Where", ctx.op("IsNaN", grad), ctx.scalar(0, n.dtype), grad)  # as the kernel's nan_to_num


def _log_softmax_grad_onnx(ctx, n, xs):
    g, y = xs
    total = ctx.reduce("ReduceSum", g, [n.attrs["dim"]], keepdims=True)
    return ctx.op("Sub", g, ctx.op("Mul", ctx.op("Exp", y), total))


register("softmax", lambda x, dim: torch.softmax(x, dim),
         lambda b, n, g, want: (b.emit("softmax_grad", g, n, dim=n.attrs["dim"]) if want[0] else None,),
         onnx=lambda ctx, n, xs: ctx.op("Softmax", xs[0], axis=n.attrs["dim"]))
# A row masked entirely (-inf everywhere) has a NaN softmax; attention zeroes such rows after
# the softmax (`where`), so their gradient arrives as 0 and the true answer is 0, not NaN.
register("softmax_grad", lambda g, y, dim: A._softmax_backward_data(g, y, dim, y.dtype).nan_to_num_(
    nan=0.0, posinf=math.inf, neginf=-math.inf), onnx=_softmax_grad_onnx)
register("log_softmax", lambda x, dim: torch.log_softmax(x, dim),
         lambda b, n, g, want: (b.emit("log_softmax_grad", g, n, dim=n.attrs["dim"]) if want[0] else None,),
         onnx=lambda ctx, n, xs: ctx.op("LogSoftmax", xs[0], axis=n.attrs["dim"]))
register("log_softmax_grad", lambda g, y, dim: A._log_softmax_backward_data(g, y, dim, y.dtype),
         onnx=_log_softmax_grad_onnx)
aten(A._softmax.default)(lambda b, x, dim, half_to_float=False: b.emit("softmax", x, dim=dim % len(x.shape)))
aten(A._log_softmax.default)(lambda b, x, dim, half_to_float=False: b.emit("log_softmax", x, dim=dim % len(x.shape)))


# -- creation ops: no inputs, shape known from attrs ---------------------------------------

def _created(shape_key):
    return lambda **attrs: (tuple(attrs[shape_key]), attrs.get("dtype") or torch.get_default_dtype())


register("full", lambda size, value, dtype, device: torch.full(size, value, dtype=dtype, device=device),
         shape=_created("size"), onnx=lambda ctx, n, xs: ctx.full(n.shape, n.attrs["value"], n.dtype))
def _arange_onnx(ctx, n, xs):
    """Integers: a Range, exact and not stored. Floats: torch's own values as a constant (how it
    accumulates start + i * step is its own)."""
    a = n.attrs
    if n.dtype.is_floating_point or not all(isinstance(a[k], int) for k in ("start", "end", "step")):
        return ctx.const(torch.arange(a["start"], a["end"], a["step"], dtype=n.dtype))
    return ctx.op("Range", *(ctx.scalar(a[k], n.dtype) for k in ("start", "end", "step")))


register("arange", lambda start, end, step, dtype, device: torch.arange(start, end, step, dtype=dtype, device=device),
         shape=lambda **a: ((max(0, math.ceil((a["end"] - a["start"]) / a["step"])),), a["dtype"]), onnx=_arange_onnx)


def _dtype_of(*values):
    """The dtype torch infers for a tensor made from Python scalars: bool, int64, or the default float."""
    if all(isinstance(v, bool) for v in values):
        return torch.bool
    return torch.int64 if all(isinstance(v, int) for v in values) else torch.get_default_dtype()


@aten(A.full.default)
def _(b, size, value, dtype=None, device=None, **_):
    return b.emit("full", size=tuple(size), value=value, dtype=dtype or _dtype_of(value), device=device or b.device)


@aten(A.full_like.default)
def _(b, x, value, dtype=None, device=None, **_):
    return b.emit("full", size=tuple(x.shape), value=value, dtype=dtype or x.dtype, device=device or b.device)


@aten(A.empty.memory_format)
def _(b, size, dtype=None, device=None, **_):
    # Its values are never read before being written: zeros, deterministic.
    return b.emit("full", size=tuple(size), value=0, dtype=dtype or torch.get_default_dtype(), device=device or b.device)


# Checks torch inserts (e.g. one_hot's index range): nothing to compute at run time.
aten(A._assert_async.msg, A._assert_async.default)(lambda b, *args, **kwargs: None)


@aten(A.scalar_tensor.default)
def _(b, value, dtype=None, device=None, **_):
    return b.const(value, dtype=dtype or torch.get_default_dtype())


@aten(A.arange.start_step, A.arange.default, A.arange.start)
def _(b, *args, dtype=None, device=None, **_):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args + (1,))[:3]
    dtype = dtype or _dtype_of(start, end, step)
    return b.emit("arange", start=start, end=end, step=step, dtype=dtype, device=device or b.device)


# -- dropout: a random mask (no gradient) times the input -----------------------------------

# The mask reads x only for its shape: no gradient flows into x through it. p = 1 drops all
# (torch's dropout gives zeros; 0 / 0 would be NaN).
def _dropout_mask(x, p):
    return torch.zeros_like(x) if p >= 1 else torch.empty_like(x).bernoulli_(1 - p) / (1 - p)


def _dropout_mask_onnx(ctx, n, xs):
    # Its own random stream (the runtime's, not torch's): the same distribution, other draws.
    keep = 1 - n.attrs["p"]
    uniform = ctx.op("RandomUniformLike", xs[0], dtype=ctx.elem_type(n.dtype))
    if keep <= 0:
        return ctx.op("Mul", uniform, ctx.scalar(0, n.dtype))
    kept = ctx.cast(ctx.op("Less", uniform, ctx.scalar(keep, n.dtype)), n.dtype)
    return ctx.op("Div", kept, ctx.scalar(keep, n.dtype))


register("dropout_mask", _dropout_mask, lambda b, n, g, want: (None,), onnx=_dropout_mask_onnx)


@aten(A.native_dropout.default)
def _(b, x, p, train=True):
    if not train or p == 0:
        return x, None
    return b.emit("mul", x, b.emit("dropout_mask", x, p=p)), None


# -- graph leaves: bound by the runtime (inputs) or baked in at compile time (consts) ------

def _bound_at_run_time(**_):
    raise AssertionError("input nodes are bound by the runtime, not computed")


register("input", _bound_at_run_time)
register("const", lambda value: value)
