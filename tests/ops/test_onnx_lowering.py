"""Each op's ONNX lowering against its torch kernel, in float32 and float64.

A case is one op on small tensors (the shapes the VJP tests use). Its one-op graph runs
through the torch backend and, exported, through onnxruntime (float32) and in float64
through onnxruntime where it has the kernels, else onnx's reference evaluator (onnxruntime
has no float64 Conv). Every exported model passes the full checker (shape inference on).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgetune.compiler.backends.onnx import ExportError, to_onnx  # noqa: E402
from edgetune.compiler.backends.torch import CompiledStep  # noqa: E402
from edgetune.compiler.ir.builder import Builder  # noqa: E402
from edgetune.compiler.ir.graph import Graph  # noqa: E402
from edgetune.compiler.ir.ops import OPS, is_effect, mutated_inputs  # noqa: E402
from edgetune.compiler.ir.ops.quant import quantize_per_channel  # noqa: E402
import edgetune.compiler.optim  # noqa: E402,F401  (registers the optimizer ops: the file also runs alone)
import edgetune.compiler.zo  # noqa: E402,F401  (registers MeZO's ops)

# The operands are O(1): atol covers a float32 sum of a few dozen of them that cancels to near 0,
# which onnxruntime adds up in another order.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
# Log-probabilities of logits near 1000 (logit - logsumexp) carry float32's rounding at that
# magnitude, 6.1e-5 a step, whatever their own size: an absolute tolerance of a few steps.
CASE_TOLERANCE = {("vocab_log_prob-large-logits", torch.float32): dict(rtol=1e-5, atol=2.5e-4)}
# Cases the reference evaluator gets wrong itself (checked by onnxruntime in float32 only).
_ERF = "onnxruntime has no float64 Erf, and onnx.reference's is accurate to float32 only"
_GROUPED_CONV_TRANSPOSE = "onnx.reference's ConvTranspose mis-slices a grouped weight (1<groups<C)"
REFERENCE_GAPS = {"conv_grad_input-grouped": _GROUPED_CONV_TRANSPOSE,
                  "conv_transpose-grouped_dilated": _GROUPED_CONV_TRANSPOSE,
                  "erf": _ERF, "gelu": _ERF, "gelu_grad": _ERF}


class Const:
    """An argument baked into the graph as a const node (an index, a 0-d operand)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def one_op_graph(op: str, args: list, attrs: dict) -> Graph:
    """`op(*args, **attrs)`: tensors become batch inputs, Python floats and ints the hyper
    inputs (lr, step), Const the graph's constants. Outputs: the value, or what an effect writes."""
    b = Builder()
    nodes = []
    for k, a in enumerate(args):
        if isinstance(a, Const):
            nodes.append(b.const(a.value))
        elif isinstance(a, torch.Tensor):
            nodes.append(b.input(f"x{k}", a.shape, a.dtype, kind="input", index=k))
        else:
            dtype = torch.float64 if isinstance(a, float) else torch.int64
            nodes.append(b.input(f"x{k}", (), dtype, kind="hyper"))
    out = b.emit(op, *nodes, **attrs)
    return Graph(b.nodes, {} if is_effect(out) else {"out": out})


def torch_result(graph: Graph, args: list) -> list:
    """The torch backend's outputs: the value, or the written arguments after the call."""
    call = [a.clone() if isinstance(a, torch.Tensor) else a for a in args if not isinstance(a, Const)]
    out = CompiledStep(graph, torch.device("cpu"))(*call)
    effect = next(n for n in graph.nodes if n.op not in ("input", "const"))
    if not is_effect(effect):
        return [out["out"]]
    runtime_args = [a for a in args if not isinstance(a, Const)]
    position = {id(a): k for k, a in enumerate(runtime_args)}
    return [call[position[id(args[k])]] for k in mutated_inputs(effect)]


def onnx_result(graph: Graph, args: list, dtype: torch.dtype, case: str = "") -> list:
    exported = to_onnx(graph)
    onnx.checker.check_model(exported.model, full_check=True)
    feeds = {}
    for k, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            feeds[f"x{k}"] = a.numpy()
        elif not isinstance(a, Const):
            feeds[f"x{k}"] = torch.tensor(a, dtype=torch.float64 if isinstance(a, float) else torch.int64).numpy()
    names = [o["name"] for o in exported.manifest["outputs"] if o["name"] != "skipped"]
    return [torch.from_numpy(v) for v in _run(exported.model, feeds, names, dtype, case)]


def _run(model, feeds, names, dtype, case):
    try:
        session = ort.InferenceSession(model.SerializeToString(), single_threaded(), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime's NOT_IMPLEMENTED has no own class)
        if dtype != torch.float64 or "NOT_IMPLEMENTED" not in str(e):
            raise
        from onnx.reference import ReferenceEvaluator

        if case in REFERENCE_GAPS:
            pytest.skip(REFERENCE_GAPS[case])
        return ReferenceEvaluator(model).run(names, feeds)
    return session.run(names, feeds)


def single_threaded():
    """Session options for tests: no onnxruntime thread pool. The suite forks to compile
    (edgetune.compiler.isolate), and a fork while a pool's threads are alive once hung the child."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3  # not the warnings about initializers that a lowering left unused
    return options


# -- the cases --------------------------------------------------------------------------------

def _gen(seed):
    return torch.Generator().manual_seed(seed)


class Args:
    """Argument makers for a dtype: `r(*shape)` normal, `pos` positive, `idx` indices."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self._seed = dtype, 0

    def _next(self):
        self._seed += 1
        return _gen(self._seed)

    def r(self, *shape):
        return torch.randn(shape, generator=self._next(), dtype=self.dtype)

    def pos(self, *shape):
        return torch.rand(shape, generator=self._next(), dtype=self.dtype) + 0.5

    def idx(self, high, *shape):
        return torch.randint(0, high, shape, generator=self._next())

    def scalar(self, v):
        return Const(torch.tensor(v, dtype=self.dtype))

    def with_bounds(self, *shape, values=(0.0, 6.0)):
        """Normal values scaled past [0, 6], with the bounds themselves in it."""
        x = self.r(*shape) * 4 + 3
        x.view(-1)[: len(values)] = torch.tensor(values, dtype=self.dtype)
        return x


CONV = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
CONV_CONFIGS = {  # name: (x shape, weight shape, conv attrs)
    "plain": ((2, 3, 5, 5), (4, 3, 3, 3), CONV),
    "stride2_pad1_odd": ((2, 3, 7, 7), (4, 3, 3, 3), dict(CONV, stride=(2, 2), padding=(1, 1))),
    "dilated": ((1, 2, 7, 6), (3, 2, 3, 2), dict(CONV, dilation=(2, 1), padding=(1, 0))),
    "grouped": ((2, 4, 5, 5), (6, 2, 3, 3), dict(CONV, groups=2, stride=(2, 1))),
    "depthwise": ((2, 4, 6, 6), (4, 1, 3, 3), dict(CONV, groups=4, padding=(1, 1))),
    # stride 1: its input gradient is lowered as a Conv over the flipped, group-swapped weight
    "grouped_dilated": ((2, 4, 7, 7), (6, 2, 3, 3), dict(CONV, groups=2, padding=(1, 2), dilation=(2, 1))),
    "pointwise": ((2, 4, 3, 3), (5, 4, 1, 1), CONV),  # its weight gradient: a batched MatMul
    "pointwise_one_sample": ((1, 4, 3, 3), (5, 4, 1, 1), CONV),  # a Gemm
    "conv1d": ((2, 3, 9), (4, 3, 3), dict(stride=(2,), padding=(1,), dilation=(1,), groups=1)),
}


def _conv_out_shape(x, w, a):
    return tuple(x[:1]) + (w[0],) + tuple(
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, k, st, p, d in zip(x[2:], w[2:], a["stride"], a["padding"], a["dilation"]))


def _conv_cases(a):
    cases = []
    for name, (xs, ws, conv) in CONV_CONFIGS.items():
        gs = _conv_out_shape(xs, ws, conv)
        cases.append((f"conv-{name}", "conv", [a.r(*xs), a.r(*ws)], conv))
        cases.append((f"conv_grad_input-{name}", "conv_grad_input", [a.r(*gs), a.r(*ws)], dict(conv, input_shape=xs)))
        cases.append((f"conv_grad_weight-{name}", "conv_grad_weight", [a.r(*xs), a.r(*gs)],
                      dict(conv, weight_shape=ws)))
    cases.append(("conv-bias", "conv", [a.r(2, 3, 5, 5), a.r(4, 3, 3, 3), a.r(4)], dict(CONV, padding=(1, 1))))
    for name, (xs, ws, convt) in CONV_TRANSPOSE_CONFIGS.items():
        out = _conv_transpose_out_shape(xs, ws, convt)
        bias = [a.r(ws[1] * convt["groups"])] if name != "conv1d" else []
        cases += [(f"conv_transpose-{name}", "conv_transpose", [a.r(*xs), a.r(*ws), *bias], convt),
                  (f"conv_transpose_grad_input-{name}", "conv_transpose_grad_input", [a.r(*out), a.r(*ws)],
                   dict(convt, input_shape=xs)),
                  (f"conv_transpose_grad_weight-{name}", "conv_transpose_grad_weight", [a.r(*xs), a.r(*out)],
                   dict(convt, weight_shape=ws))]
    return cases


CONV_TRANSPOSE = dict(CONV, output_padding=(0, 0))
CONV_TRANSPOSE_CONFIGS = {  # name: (x shape, weight shape [Cin, Cout / groups, ...], attrs): test_nn's
    "stride2_pad1_outpad1": ((2, 4, 4, 3), (4, 3, 3, 2), dict(CONV_TRANSPOSE, stride=(2, 2), padding=(1, 1),
                                                              output_padding=(1, 1))),
    "grouped_dilated": ((2, 4, 4, 3), (4, 3, 3, 2), dict(CONV_TRANSPOSE, groups=2, dilation=(2, 2))),
    "stride21_pad01": ((2, 4, 4, 3), (4, 3, 3, 2), dict(CONV_TRANSPOSE, stride=(2, 1), padding=(0, 1))),
    "conv1d": ((2, 3, 5), (3, 2, 4), dict(stride=(3,), padding=(1,), dilation=(1,), groups=1, output_padding=(0,))),
}


def _conv_transpose_out_shape(x, w, a):
    return (x[0], w[1] * a["groups"]) + tuple(
        st * (s - 1) - 2 * p + d * (k - 1) + op + 1
        for s, k, st, p, d, op in zip(x[2:], w[2:], a["stride"], a["padding"], a["dilation"], a["output_padding"]))


def _elementwise_cases(a):
    x, y = a.r(3, 4), a.r(3, 4)
    cases = [(op, op, [a.r(3, 4), a.r(1, 4)], {}) for op in ("add", "sub", "mul")]
    cases += [
        ("neg", "neg", [x], {}),
        ("div", "div", [a.r(3, 4), a.pos(3, 1)], {}),
        ("div_grad_rhs", "div_grad_rhs", [a.r(3, 4), a.r(3, 4), a.pos(3, 4)], {}),
        ("pow_tensor", "pow_tensor", [a.pos(3, 4), a.r(1, 4)], {}),
        ("pow_grad_base", "pow_grad_base", [a.r(3, 4), a.pos(3, 4), torch.cat([torch.zeros(3, 1), a.r(3, 3)], 1)], {}),
        ("pow_grad_exponent", "pow_grad_exponent",
         [a.r(3, 4), torch.cat([torch.zeros(3, 1), a.pos(3, 3)], 1), a.r(3, 4), a.pos(3, 4)], {}),
        ("mul-0d-const", "mul", [x, a.scalar(0.1)], {}),
        ("add-int64", "add", [torch.tensor(5), Const(torch.tensor(1))], {}),
        ("div-by-int", "div", [x, Const(torch.tensor(3))], {}),
        ("add_inplace", "add_inplace", [x, y], {}),
        ("hardtanh", "hardtanh", [a.with_bounds(3, 5)], dict(min=0, max=6)),
        ("hardtanh_grad", "hardtanh_grad", [a.r(3, 5), a.with_bounds(3, 5)], dict(min=0, max=6)),
        ("relu_grad", "relu_grad", [a.r(3, 5), torch.relu(a.with_bounds(3, 5, values=(0.0, -1.0)))], {}),
    ]
    for op in ("exp", "abs", "relu", "sigmoid", "tanh", "silu", "sin", "cos", "erf", "isnan"):
        cases.append((op, op, [a.r(3, 4)], {}))
    halves = torch.tensor([-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 1.2, -1.7], dtype=a.dtype)
    for op in ("sign", "floor", "ceil", "round"):
        cases.append((op, op, [halves], {}))
    around_3 = a.r(3, 5) * 3
    around_3.view(-1)[:4] = torch.tensor([-3.0, 3.0, 0.0, -2.0], dtype=a.dtype)
    cases += [
        ("maximum", "maximum", [a.r(3, 4), a.r(1, 4)], {}), ("minimum", "minimum", [a.r(3, 4), a.r(3, 4)], {}),
        ("hardswish", "hardswish", [around_3], {}),
        ("hardswish_grad", "hardswish_grad", [a.r(3, 5), around_3], {}),
        ("gelu", "gelu", [a.r(3, 4)], dict(approximate="none")),
        ("gelu-tanh", "gelu", [a.r(3, 4)], dict(approximate="tanh")),
        ("gelu_grad", "gelu_grad", [a.r(3, 4), a.r(3, 4)], dict(approximate="none")),
        ("gelu_grad-tanh", "gelu_grad", [a.r(3, 4), a.r(3, 4)], dict(approximate="tanh")),
        ("pow", "pow", [a.pos(3, 4)], dict(exponent=0.5)), ("pow-square", "pow", [a.r(3, 4)], dict(exponent=2)),
        ("pow_grad", "pow_grad", [a.r(3, 4), a.pos(3, 4)], dict(exponent=1.5)),
        ("pow_grad-zero", "pow_grad", [a.r(3, 4), a.r(3, 4)], dict(exponent=0)),
        ("leaky_relu", "leaky_relu", [a.r(3, 4)], dict(slope=0.1)),
        ("leaky_relu_grad", "leaky_relu_grad", [a.r(3, 4), a.r(3, 4)], dict(slope=0.1)),
        ("clamp", "clamp", [a.with_bounds(3, 4, values=(-0.5, 0.5))], dict(min=-0.5, max=0.5)),
        ("clamp-min-only", "clamp", [a.r(3, 4)], dict(min=0.1, max=None)),
        ("clamp_grad", "clamp_grad", [a.r(3, 4), a.with_bounds(3, 4, values=(-0.5, 0.5))], dict(min=-0.5, max=0.5)),
        ("clamp_grad-max-only", "clamp_grad", [a.r(3, 4), a.r(3, 4)], dict(min=None, max=0.2)),
        ("cumsum", "cumsum", [a.r(3, 4)], dict(dim=1)), ("cumsum_grad", "cumsum_grad", [a.r(3, 4)], dict(dim=0)),
    ]
    for op in ("log", "sqrt", "rsqrt", "reciprocal"):
        cases.append((op, op, [a.pos(3, 4)], {}))
    for op in ("exp", "log", "sqrt", "rsqrt", "reciprocal", "abs", "sigmoid", "tanh", "silu", "sin", "cos", "erf"):
        saved = a.pos(3, 4) if op in ("log", "sqrt", "rsqrt", "reciprocal", "sigmoid") else a.r(3, 4)
        cases.append((f"{op}_grad", f"{op}_grad", [a.r(3, 4), saved], {}))
    ints, labels = torch.tensor([3, -100, 0, 2]), Const(torch.tensor(-100))
    for op in ("eq", "ne", "lt", "le", "gt", "ge"):
        cases.append((op, op, [torch.round(a.r(3, 4)), torch.round(a.r(3, 4))], {}))
        cases.append((f"{op}-int-const", op, [ints, labels], {}))
    m1, m2 = a.r(3, 4) > 0, a.r(3, 4) > 0
    cases += [
        ("logical_not", "logical_not", [m1], {}), ("logical_and", "logical_and", [m1, m2], {}),
        ("logical_or", "logical_or", [m1, m2], {}),
        ("bitwise_and", "bitwise_and", [m1, m2], {}), ("bitwise_or-int", "bitwise_or", [ints, ints.flip(0)], {}),
        ("bitwise_xor", "bitwise_xor", [m1, m2], {}), ("bitwise_not", "bitwise_not", [m1], {}),
        ("bitwise_not-int", "bitwise_not", [ints], {}),
        ("any", "any", [m1], dict(dims=(1,), keepdim=False)),
        ("any-all", "any", [x * (x > 1)], dict(dims=(), keepdim=False)),
        ("where", "where", [m1, x, a.scalar(0.0)], {}),
        ("where-int", "where", [ints != -100, ints, Const(torch.tensor(0))], {}),
        ("cast-to-float", "cast", [ints], dict(dtype=a.dtype)),
        ("cast-bool", "cast", [m1], dict(dtype=a.dtype)),
        ("cast-to-int", "cast", [a.r(3, 4) * 5], dict(dtype=torch.int64)),
        ("detach", "detach", [x], {}),
        ("copy", "copy", [x], {}),
        ("full", "full", [], dict(size=(2, 3), value=1.5, dtype=a.dtype, device=torch.device("cpu"))),
    ]
    return cases


SELU = dict(alpha=1.6732632423543772, scale=1.0507009873554805, input_scale=1.0)


def _more_elementwise_cases(a):
    near_zero = torch.tensor([0.0, 1e-7, -1e-7, 1e-30, 3e-4, -0.5, 20.0, -0.999], dtype=a.dtype)
    small = torch.cat([near_zero, a.pos(4) - 1]).reshape(3, 4)  # > -1: log1p's domain
    wide = torch.cat([near_zero, torch.tensor([-100.0, 50.0, 100.0, -1e-12], dtype=a.dtype)]).reshape(3, 4)
    halves = torch.tensor([-2.5, -1.5, -0.5, 0.0, 0.5, 1.5, 2.5, 1.2, -1.7], dtype=a.dtype)
    ints, divisors = torch.tensor([[7, -7, 5, -5, 0, 3]]), torch.tensor([[3, 3, -3, -3, 2, 5]])
    x, lo, hi = a.r(3, 4), a.r(4) - 0.5, a.r(3, 1) + 0.5  # where lo > hi, clamp gives hi
    cases = [
        ("log1p", "log1p", [small], {}), ("log1p_grad", "log1p_grad", [a.r(3, 4), small], {}),
        ("expm1", "expm1", [wide], {}), ("expm1_grad", "expm1_grad", [a.r(3, 4), torch.expm1(small)], {}),
        ("elu", "elu", [a.r(3, 4)], dict(alpha=1.0, scale=1.0, input_scale=1.0)),
        ("elu-selu", "elu", [small], SELU),
        ("elu-celu", "elu", [a.r(3, 4)], dict(alpha=2.0, scale=1.0, input_scale=0.5)),
        ("elu_grad", "elu_grad", [a.r(3, 4), a.r(3, 4)], dict(alpha=1.0, scale=1.0, input_scale=1.0)),
        ("elu_grad-selu", "elu_grad", [a.r(3, 4), a.r(3, 4)], SELU),
        ("trunc", "trunc", [halves], {}), ("trunc-int", "trunc", [ints], {}),
        ("fmod", "fmod", [a.r(3, 4) * 3, a.pos(4)], {}), ("fmod-int", "fmod", [ints, divisors], {}),
        ("fmod-negative-divisor", "fmod", [a.r(3, 4) * 3, -a.pos(3, 1)], {}),
        ("remainder", "remainder", [a.r(3, 4) * 3, a.scalar(0.7)], {}),
        ("remainder-negative-divisor", "remainder", [a.r(3, 4) * 3, -a.pos(4)], {}),
        ("remainder-int", "remainder", [ints, divisors], {}),
        ("mod_grad_rhs-fmod", "mod_grad_rhs", [a.r(3, 4), a.r(3, 4) * 3, a.pos(4)], dict(kind="fmod")),
        ("mod_grad_rhs-remainder", "mod_grad_rhs", [a.r(3, 4), a.r(3, 4) * 3, -a.pos(4)], dict(kind="remainder")),
        ("clamp_t", "clamp_t", [x, lo, hi], {}),
        ("scalar_pow", "scalar_pow", [a.r(3, 4)], dict(base=2.5)),
        ("scalar_pow_grad", "scalar_pow_grad", [a.r(3, 4), a.pos(3, 4)], dict(base=0.3)),
    ]
    for part in ("x", "lo", "hi"):
        cases.append((f"clamp_t_grad-{part}", "clamp_t_grad", [a.r(3, 4), x, lo, hi], dict(part=part)))
    y = a.r(3, 4)
    y[0] = x[0]  # row 0 ties: each side takes half
    for pick in ("maximum", "minimum"):
        cases += [(f"choice_share-{pick}", "choice_share", [x, y], dict(pick=pick)),
                  (f"choice_share-{pick}-broadcast", "choice_share", [x, a.r(4)], dict(pick=pick))]
    return cases


def _tied(a, *shape, dim):
    """Normal values whose entries 0 and 1 along dim are equal (ties for extrema)."""
    x = a.r(*shape)
    x.select(dim, 1).copy_(x.select(dim, 0))
    return x


def _order_cases(a):
    x, tied = _tied(a, 3, 4, 2, dim=2), _tied(a, 3, 4, dim=1)
    with_nan = a.r(3, 4)
    with_nan[1, 2], with_nan[1, 3], with_nan[2, 0] = math.nan, math.nan, math.inf
    rounded = torch.round(a.r(4, 6))  # many ties: sort keeps them in order
    cases = [
        ("extremum_grad", "extremum_grad", [a.r(3, 4), x, x.amax(2)], dict(dims=(2,), keepdim=False)),
        ("extremum_grad-keepdim", "extremum_grad", [a.r(1, 4, 1), x, x.amin((0, 2), keepdim=True)],
         dict(dims=(0, 2), keepdim=True)),
        ("argmax", "argmax", [tied], dict(dim=1, keepdim=False)),
        ("argmin-keepdim", "argmin", [tied], dict(dim=1, keepdim=True)),
        ("argmax-all", "argmax", [tied], dict(dim=None, keepdim=False)),
        ("argmax-nan", "argmax", [with_nan], dict(dim=1, keepdim=False)),
        ("argmin-nan", "argmin", [with_nan], dict(dim=0, keepdim=False)),
        ("argmax-int", "argmax", [torch.tensor([[3, 9, 9, 1], [0, 0, -2, 5]])], dict(dim=1, keepdim=False)),
        ("sort_indices", "sort_indices", [a.r(3, 4)], dict(dim=1, descending=False, stable=False)),
        ("sort_indices-descending-ties", "sort_indices", [rounded], dict(dim=0, descending=True, stable=True)),
        ("sort_indices-ties", "sort_indices", [rounded], dict(dim=1, descending=False, stable=False)),
        ("sort_indices-nan", "sort_indices", [with_nan], dict(dim=1, descending=False, stable=True)),
        ("topk_indices", "topk_indices", [a.r(3, 4)], dict(k=2, dim=1, largest=True, sorted=True)),
        ("topk_indices-smallest", "topk_indices", [a.r(3, 4)], dict(k=1, dim=0, largest=False, sorted=False)),
        ("arange-int", "arange", [], dict(start=1, end=11, step=3, dtype=torch.int64, device=torch.device("cpu"))),
        ("arange-float", "arange", [], dict(start=0.5, end=4.5, step=0.3, dtype=a.dtype, device=torch.device("cpu"))),
    ]
    v = a.r(2, 3, 4)
    v[1, 2] = 0  # a zero norm: its gradient is 0
    for name, order, dims, keep in (("l2", 2, (2,), False), ("l1-keepdim", 1, (0, 2), True), ("l3-all", 3, (0, 1, 2),
                                                                                              False)):
        y = torch.linalg.vector_norm(v, order, dims, keep)
        attrs = dict(ord=order, dims=dims, keepdim=keep)
        cases += [(f"vector_norm-{name}", "vector_norm", [v], attrs),
                  (f"vector_norm_grad-{name}", "vector_norm_grad", [a.r(*y.shape), v, y], attrs)]
    return cases


def _reduction_cases(a):
    x = a.r(2, 3, 4, 5)
    return [
        ("sum", "sum", [x], dict(dims=(0, 2, 3), keepdim=False)),
        ("sum-keepdim", "sum", [x], dict(dims=(1,), keepdim=True)),
        ("sum-bool", "sum", [x > 0], dict(dims=(0, 1, 2, 3), keepdim=False)),
        ("sum-to-float64", "sum", [x], dict(dims=(3,), keepdim=False, dtype=torch.float64)),
        ("mean", "mean", [x], dict(dims=(2, 3), keepdim=False)),
        ("var", "var", [x], dict(dims=(0, 2, 3), correction=0, keepdim=False)),
        ("var-unbiased", "var", [x], dict(dims=(1,), correction=1, keepdim=True)),
        ("var_grad", "var_grad", [a.r(1, 3, 1, 1), x], dict(dims=(0, 2, 3), correction=0)),
        ("amax", "amax", [x], dict(dims=(1, 3), keepdim=False)),
        ("amin", "amin", [x], dict(dims=(2,), keepdim=True)),
        ("sum_to", "sum_to", [a.r(2, 3, 4)], dict(shape=(3, 1))),
        ("sum_to-vector", "sum_to", [a.r(4, 5)], dict(shape=(5,))),
        ("softmax", "softmax", [a.r(3, 5)], dict(dim=1)),
        ("softmax_grad", "softmax_grad", [a.r(3, 5), torch.softmax(a.r(3, 5), 1)], dict(dim=1)),
        ("log_softmax", "log_softmax", [a.r(3, 5)], dict(dim=1)),
        ("log_softmax_grad", "log_softmax_grad", [a.r(3, 5), torch.log_softmax(a.r(3, 5), 0)], dict(dim=0)),
    ]


def _shape_cases(a):
    x = a.r(2, 3, 4)
    return [
        ("reshape", "reshape", [x], dict(shape=(6, 4))),
        ("permute", "permute", [x], dict(dims=(2, 0, 1))),
        ("expand", "expand", [a.r(3, 1)], dict(size=(2, 3, 4))),
        ("slice", "slice", [x], dict(dim=2, start=1, end=4, step=2)),
        ("select", "select", [x], dict(dim=1, index=2)),
        ("cat", "cat", [a.r(2, 1, 4), x], dict(dim=1)),
        ("slice_grad", "slice_grad", [a.r(2, 2, 4)], dict(input_shape=(2, 3, 4), dim=1, start=1, end=3, step=1)),
        # strided: entries 0, 2, 4 of 6; 1 and 4 of 7; 1 and 3 of 4 (the spread-out g cut at the input's end)
        ("slice_grad-step2", "slice_grad", [a.r(2, 3, 4)], dict(input_shape=(2, 6, 4), dim=1, start=0, end=6, step=2)),
        ("slice_grad-step3", "slice_grad", [a.r(2, 2, 4)], dict(input_shape=(2, 7, 4), dim=1, start=1, end=7, step=3)),
        ("slice_grad-last", "slice_grad", [a.r(2, 3, 2)], dict(input_shape=(2, 3, 4), dim=2, start=1, end=4, step=2)),
        ("select_grad", "select_grad", [a.r(2, 4)], dict(input_shape=(2, 3, 4), dim=1, index=1)),
        ("pad", "pad", [x], dict(pad=(1, 2, 0, 1), value=0.5)),
        ("pad-crop", "pad", [x], dict(pad=(-1, 0, 1, -1), value=0.0)),
        ("flip", "flip", [x], dict(dims=(0, 2))),
    ]


def _linalg_cases(a):
    return [
        ("linear", "linear", [a.r(3, 4), a.r(5, 4), a.r(5)], {}),
        ("linear-3d", "linear", [a.r(2, 3, 4), a.r(5, 4)], {}),
        ("linear_grad_input", "linear_grad_input", [a.r(2, 3, 5), a.r(5, 4)], {}),
        ("linear_grad_weight", "linear_grad_weight", [a.r(2, 3, 5), a.r(2, 3, 4)], {}),
        ("mm", "mm", [a.r(3, 4), a.r(4, 2)], {}),
        ("bmm", "bmm", [a.r(2, 3, 4), a.r(2, 4, 2)], {}),
        ("linear_int8", "linear_int8", [a.r(2, 3, 4), *quantize_per_channel(a.r(5, 4)), a.r(5)], {}),
        ("linear_int8-no-bias", "linear_int8", [a.r(3, 4), *quantize_per_channel(a.r(5, 4))], {}),
        ("linear_int8_grad_input", "linear_int8_grad_input", [a.r(2, 3, 5), *quantize_per_channel(a.r(5, 4))], {}),
    ]


POOL = dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=False)


def _group_norm_cases(a):
    cases = []
    for groups, x in ((1, a.r(2, 4, 3, 3)), (2, a.r(2, 4, 3, 3)), (4, a.r(2, 4, 3, 3)), (2, a.r(2, 4, 5))):
        gn, name = dict(groups=groups, eps=1e-4), f"{groups}-{len(x.shape)}d"
        cases += [(f"group_norm-{name}", "group_norm", [x, a.r(4), a.r(4)], gn),
                  (f"gn_grad_input-{name}", "gn_grad_input", [a.r(*x.shape), x, a.r(4)], gn),
                  (f"gn_grad_weight-{name}", "gn_grad_weight", [a.r(*x.shape), x, a.r(4)], gn)]
    return cases


def _ln_with_stats_cases(a):
    """The gradients reading the statistics that ln_stats computed once for both (the statistics
    come from the kernel: the lowering must read them as it packs them)."""
    out = []
    for shape, normalized in (((2, 3, 4), (4,)), ((2, 3, 4), (3, 4))):
        x, ln = a.r(*shape), dict(normalized_shape=normalized, eps=1e-5)
        stats = OPS["ln_stats"].kernel(x, **ln)
        tag = "-".join(map(str, normalized))
        out += [(f"ln_stats-{tag}", "ln_stats", [x], ln),
                (f"ln_grad_input-stats-{tag}", "ln_grad_input", [a.r(*shape), x, a.r(*normalized), stats], ln),
                (f"ln_grad_weight-stats-{tag}", "ln_grad_weight", [a.r(*shape), x, stats], ln)]
    return out


def _norm_cases(a):
    x, g, c = a.r(2, 3, 4, 4), a.r(2, 3, 4, 4), 3
    cases = [
        ("batch_norm", "batch_norm", [x, a.r(c), a.pos(c), a.r(c), a.r(c)], dict(eps=1e-5)),
        ("batch_norm-2d", "batch_norm", [a.r(4, c), a.r(c), a.pos(c), a.r(c), a.r(c)], dict(eps=1e-3)),
        ("bn_scale", "bn_scale", [a.r(c), a.pos(c)], dict(eps=1e-5)),
        ("bn_grad_input", "bn_grad_input", [g, a.r(c)], {}),
        ("bn_grad_input_inplace", "bn_grad_input_inplace", [g, a.r(c)], {}),
        ("bn_grad_weight", "bn_grad_weight", [g, x, a.r(c), a.pos(c)], dict(eps=1e-5)),
        ("bn_grad_mean", "bn_grad_mean", [g, a.r(c)], {}),
        ("bn_grad_var", "bn_grad_var", [g, x, a.r(c), a.r(c), a.pos(c)], dict(eps=1e-5)),
        ("fold_bn_weight", "fold_bn_weight", [a.r(c, 2, 3, 3), a.r(c)], {}),
        ("fold_bn_bias", "fold_bn_bias", [a.r(c), a.r(c), a.r(c)], {}),
        ("layer_norm", "layer_norm", [a.r(2, 3, 4), a.r(4), a.r(4)], dict(normalized_shape=(4,), eps=1e-5)),
        ("layer_norm-2d", "layer_norm", [a.r(2, 3, 4), a.r(3, 4), a.r(3, 4)], dict(normalized_shape=(3, 4), eps=1e-6)),
        ("layer_norm_stats", "layer_norm_stats", [a.r(2, 3, 4), a.r(4), a.r(4)], dict(normalized_shape=(4,), eps=1e-5)),
        ("layer_norm_stats-2d", "layer_norm_stats", [a.r(2, 3, 4), a.r(3, 4), a.r(3, 4)],
         dict(normalized_shape=(3, 4), eps=1e-6)),
        ("ln_grad_input", "ln_grad_input", [a.r(2, 3, 4), a.r(2, 3, 4), a.r(4)], dict(normalized_shape=(4,), eps=1e-5)),
        ("ln_grad_weight", "ln_grad_weight", [a.r(2, 3, 4), a.r(2, 3, 4)], dict(normalized_shape=(4,), eps=1e-5)),
        ("ln_grad_weight-all", "ln_grad_weight", [a.r(3, 4), a.r(3, 4)], dict(normalized_shape=(3, 4), eps=1e-5)),
        *_ln_with_stats_cases(a),
        *_group_norm_cases(a),
        ("adaptive_avg_pool2d", "adaptive_avg_pool2d", [a.r(2, 3, 4, 6)], dict(output_size=(1, 1))),
        ("max_pool2d", "max_pool2d", [a.r(2, 3, 7, 6)], POOL),
        ("max_pool2d-ceil", "max_pool2d", [a.r(2, 3, 7, 6)], dict(POOL, ceil_mode=True, padding=(0, 0))),
        ("max_pool2d_grad", "max_pool2d_grad", [a.r(2, 3, 4, 3), a.r(2, 3, 7, 6)], POOL),
        ("max_pool2d_grad-overlap", "max_pool2d_grad", [a.r(1, 2, 5, 4), a.r(1, 2, 7, 6)],
         dict(POOL, stride=(1, 1), padding=(0, 0))),
        ("adaptive_avg_pool2d-2x3", "adaptive_avg_pool2d", [a.r(2, 3, 4, 6)], dict(output_size=(2, 3))),
        ("adaptive_avg_pool2d_grad", "adaptive_avg_pool2d_grad", [a.r(2, 3, 1, 1)], dict(input_shape=(2, 3, 4, 6))),
        ("adaptive_avg_pool2d_grad-2x3", "adaptive_avg_pool2d_grad", [a.r(2, 3, 2, 3)],
         dict(input_shape=(2, 3, 4, 6))),
        # cells that do not tile the input: overlapping (7 -> 3, 5 -> 2) and repeating (2 -> 4)
        ("adaptive_avg_pool2d-uneven", "adaptive_avg_pool2d", [a.r(2, 3, 7, 5)], dict(output_size=(3, 2))),
        ("adaptive_avg_pool2d-up", "adaptive_avg_pool2d", [a.r(1, 2, 2, 3)], dict(output_size=(4, 3))),
        ("adaptive_avg_pool2d_grad-uneven", "adaptive_avg_pool2d_grad", [a.r(2, 3, 3, 2)],
         dict(input_shape=(2, 3, 7, 5))),
        ("adaptive_avg_pool2d_grad-up", "adaptive_avg_pool2d_grad", [a.r(1, 2, 4, 3)], dict(input_shape=(1, 2, 2, 3))),
    ]
    # bn_grad_affine on bn_grad_weight's operands (no new draws: the later cases keep their values)
    weight_case = next(case for case in cases if case[0] == "bn_grad_weight")
    return cases + [("bn_grad_affine", "bn_grad_affine", *weight_case[2:])]


AVG_POOL = dict(stride=None, padding=(0, 0), ceil_mode=False, count_include_pad=True, divisor_override=None)
AVG_POOL_CONFIGS = {  # test_nn's
    "2x2": dict(AVG_POOL, kernel_size=(2, 2)),
    "3x3-stride2-pad1": dict(AVG_POOL, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1)),
    "3x3-stride2-pad1-no-pad-count": dict(AVG_POOL, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
                                          count_include_pad=False),
    "2x3-stride21-ceil": dict(AVG_POOL, kernel_size=(2, 3), stride=(2, 1), ceil_mode=True),
    "3x3-ceil-pad1": dict(AVG_POOL, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=True),
    "3x3-pad1-divisor4": dict(AVG_POOL, kernel_size=(3, 3), padding=(1, 1), divisor_override=4),
}
UPSAMPLE_CONFIGS = {  # name: (output size, attrs): test_nn's interpolations of [2, 2, 3, 4]
    "nearest-x2": ((6, 8), dict(mode="nearest", scales=(2.0, 2.0), align_corners=False)),
    "nearest-size": ((5, 7), dict(mode="nearest", scales=(None, None), align_corners=False)),
    "bilinear-x2": ((6, 8), dict(mode="bilinear", scales=(2.0, 2.0), align_corners=False)),
    "bilinear-corners": ((5, 6), dict(mode="bilinear", scales=(None, None), align_corners=True)),
    "bilinear-x1.5": ((4, 6), dict(mode="bilinear", scales=(1.5, 1.5), align_corners=False)),
    "bilinear-size-down": ((2, 4), dict(mode="bilinear", scales=(None, None), align_corners=False)),
}


def _pool_cases(a):
    cases = []
    for name, pool in AVG_POOL_CONFIGS.items():
        pool = dict(pool, stride=pool["stride"] or pool["kernel_size"])
        out = torch.ops.aten.avg_pool2d(torch.zeros(2, 3, 7, 8), pool["kernel_size"], pool["stride"],
                                        pool["padding"], pool["ceil_mode"]).shape
        cases += [(f"avg_pool2d-{name}", "avg_pool2d", [a.r(2, 3, 7, 8)], pool),
                  (f"avg_pool2d_grad-{name}", "avg_pool2d_grad", [a.r(*out)], dict(pool, input_shape=(2, 3, 7, 8)))]
    for size in ((1, 1), (3, 2), (5, 4)):  # even windows (a MaxPool), and uneven ones
        tied = a.r(2, 3, 7, 8)
        tied[:, :, 1] = tied[:, :, 0]  # ties: the gradient goes to the first maximum
        cases += [(f"adaptive_max_pool2d-{size}", "adaptive_max_pool2d", [a.r(2, 3, 7, 8)], dict(output_size=size)),
                  (f"adaptive_max_pool2d_grad-{size}", "adaptive_max_pool2d_grad", [a.r(2, 3, *size), tied],
                   dict(output_size=size))]
    for name, (out, up) in UPSAMPLE_CONFIGS.items():
        up = dict(up, output_size=out)
        cases += [(f"upsample2d-{name}", "upsample2d", [a.r(2, 2, 3, 4)], up),
                  (f"upsample2d_grad-{name}", "upsample2d_grad", [a.r(2, 2, *out)], dict(up, input_shape=(2, 2, 3, 4)))]
    return cases


def _indexing_cases(a):
    chosen = Const(torch.tensor([0, 2, 3]))
    return [
        ("gather", "gather", [a.r(4, 5), a.idx(5, 4, 1)], dict(dim=1)),
        ("gather_grad", "gather_grad", [a.r(4, 2), a.idx(5, 4, 2)], dict(dim=1, input_shape=(4, 5))),
        ("index_select", "index_select", [a.r(2, 4, 3, 3), chosen], dict(dim=1)),
        ("index_select_grad", "index_select_grad", [a.r(2, 3, 3), Const(torch.tensor([1, 1, 0]))],
         dict(dim=1, input_shape=(2, 4, 3))),
        ("embedding", "embedding", [a.r(6, 3), torch.tensor([[1, 5, 1], [0, 2, 2]])], dict(padding_idx=-1)),
        ("embedding_grad", "embedding_grad", [a.r(2, 3, 4), torch.tensor([[1, 5, 1], [0, 2, 2]])],
         dict(num_weights=6, padding_idx=-1)),
        ("embedding_grad-padding", "embedding_grad", [a.r(2, 3, 4), torch.tensor([[1, 5, 1], [0, 2, 2]])],
         dict(num_weights=6, padding_idx=2)),
        ("embedding_rows_grad", "embedding_rows_grad",
         [a.r(2, 3, 4), torch.tensor([[1, 5, 1], [0, 2, 2]]), Const(torch.tensor([1, 2, 4]))], dict(padding_idx=-1)),
        ("embedding_rows_grad-padding", "embedding_rows_grad",
         [a.r(2, 3, 4), torch.tensor([[1, 5, 1], [0, 2, 2]]), Const(torch.tensor([1, 2, 4]))], dict(padding_idx=2)),
        ("embedding_touched_grad", "embedding_touched_grad", [a.r(2, 3, 4), torch.tensor([[1, 5, 1], [0, 2, 2]])],
         dict(padding_idx=-1)),
        ("embedding_touched_grad-padding", "embedding_touched_grad",
         [a.r(2, 3, 4), torch.tensor([[1, 5, 1], [0, 2, 2]])], dict(padding_idx=5)),
    ]


def _write_cases(a):
    """repeat, the flat index of x[i, j], and writes into a tensor (test_shape's)."""
    rows, src = torch.tensor([[0, 2], [1, 1], [3, 0]]), a.r(3, 2)
    pairs = [torch.tensor([1, 3, 0]), torch.tensor([-1, 0, 2])]
    cases = [
        ("repeat", "repeat", [a.r(4, 3, 5)], dict(repeats=(2, 1, 1, 3))),
        ("repeat-same-rank", "repeat", [a.r(2, 3)], dict(repeats=(1, 2))),
        ("repeat_grad", "repeat_grad", [a.r(2, 4, 3, 15)], dict(repeats=(2, 1, 1, 3), input_shape=(4, 3, 5))),
        ("flat_index", "flat_index", pairs, dict(sizes=(3, 4))),
        ("flat_index-broadcast", "flat_index", [torch.tensor([[3], [-4]]), torch.tensor([2, 0, -1])],
         dict(sizes=(4, 3))),
        ("flat_index-one", "flat_index", [torch.tensor([[3, 0], [1, -4]])], dict(sizes=(4,))),
        ("index_put", "index_put", [a.r(4, 3), a.r(2, 3), torch.tensor([0, 2])], dict(dim=0, accumulate=False)),
        ("index_put-accumulate", "index_put", [a.r(3, 4), a.r(3, 3), torch.tensor([0, 2, 0])],
         dict(dim=1, accumulate=True)),
        ("index_put_grad_input", "index_put_grad_input", [a.r(4, 3), torch.tensor([0, 2, 0])], dict(dim=0)),
        ("scatter", "scatter", [a.r(3, 4), rows[:, :1], src], dict(dim=1, add=False)),
        ("scatter-add", "scatter", [a.r(3, 4), rows, src], dict(dim=1, add=True)),
        ("scatter-value", "scatter", [a.r(4, 3), rows.t()], dict(dim=0, add=False, value=0.5)),
        ("scatter_grad_input", "scatter_grad_input", [a.r(3, 4), rows[:, :1]], dict(dim=1)),
        ("select_scatter", "select_scatter", [a.r(3, 4), a.r(3)], dict(dim=1, index=1)),
        ("select_scatter_grad_input", "select_scatter_grad_input", [a.r(3, 4)], dict(dim=0, index=2)),
    ]
    for name, (xs, ss, region) in {"cols": ((3, 4), (3, 2), dict(dim=1, start=1, end=3, step=1)),
                                   "strided": ((3, 4), (2, 4), dict(dim=0, start=0, end=3, step=2)),
                                   "empty": ((3, 4), (3, 0), dict(dim=1, start=2, end=2, step=1))}.items():
        cases += [(f"slice_scatter-{name}", "slice_scatter", [a.r(*xs), a.r(*ss)], region),
                  (f"slice_scatter_grad_input-{name}", "slice_scatter_grad_input", [a.r(*xs)], region)]
    return cases


def _mask_cases(a):
    y6, y0 = a.with_bounds(3, 7), torch.relu(a.with_bounds(3, 7, values=(0.0, -2.0)))  # 21 entries: a partial byte
    return [
        ("pack_mask-relu", "pack_mask", [y0], dict(rule="relu_grad", rule_attrs={})),
        ("pack_mask-hardtanh", "pack_mask", [y6], dict(rule="hardtanh_grad", rule_attrs=dict(min=0, max=6))),
        ("masked_grad", "masked_grad", [a.r(3, 7), torch.tensor([0b10110101, 0xFF, 0x00], dtype=torch.uint8)], {}),
    ]


def _repeated(rows):
    """The summed gradient of rows 4, 1, 0 given per lookup of `touched` (4, 1, 4, 0, 1)."""
    return rows[[0, 1, 0, 2, 1]]


def _optimizer_cases(a):
    sgd = dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, part=None, n_state=1)
    adamw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, part=None, n_state=2)
    adafactor = dict(beta2_decay=-0.8, eps1=None, eps2=1e-3, d=1.0, weight_decay=0.0, part=None, n_state=1)
    chosen = Const(torch.tensor([0, 2]))
    touched = torch.tensor([4, 1, 4, 0, 1])  # the rows a batch looked up, in lookup order
    cases = [
        ("sgd-plain", "sgd_update", [a.r(4, 3), a.r(4, 3), 0.1, 1], dict(sgd, momentum=0.0, n_state=0)),
        ("sgd-momentum-step1", "sgd_update", [a.r(4, 3), a.r(4, 3), 0.1, 1, a.r(4, 3)], sgd),
        ("sgd-momentum-later", "sgd_update", [a.r(4, 3), a.r(4, 3), 0.1, 3, a.r(4, 3)], sgd),
        ("sgd-nesterov-decay", "sgd_update", [a.r(4, 3), a.r(4, 3), 0.05, 2, a.r(4, 3)],
         dict(sgd, nesterov=True, weight_decay=1e-2)),
        ("sgd-dampening", "sgd_update", [a.r(4, 3), a.r(4, 3), 0.05, 2, a.r(4, 3)], dict(sgd, dampening=0.3)),
        ("sgd-partial-first", "sgd_update", [a.r(4, 3, 1, 1), a.r(4, 2, 1, 1), 0.1, 2, a.r(4, 2, 1, 1)],
         dict(sgd, part=(1, 2))),
        ("sgd-partial-index", "sgd_update", [a.r(4, 3, 1, 1), a.r(4, 2, 1, 1), 0.1, 2, a.r(4, 2, 1, 1), chosen],
         dict(sgd, part=(1, 2))),
        ("adamw", "adamw_update", [a.r(4, 3), a.r(4, 3), 0.01, 3, a.r(4, 3), a.pos(4, 3)], adamw),
        ("adamw-step1", "adamw_update", [a.r(5), a.r(5), 0.01, 1, torch.zeros(5, dtype=a.dtype),
                                         torch.zeros(5, dtype=a.dtype)], adamw),
        ("adamw-partial-index", "adamw_update", [a.r(3, 4), a.r(2, 4), 0.01, 2, a.r(2, 4), a.pos(2, 4), chosen],
         dict(adamw, part=(0, 2))),
        # 'touched' rows: the state covers the table; a repeated row brings the same gradient
        ("sgd-touched-rows", "sgd_update", [a.r(6, 3), _repeated(a.r(3, 3)), 0.1, 2, a.r(6, 3), touched],
         dict(sgd, touched=True)),
        ("adamw-touched-rows", "adamw_update", [a.r(6, 3), _repeated(a.r(3, 3)), 0.01, 2, a.r(6, 3), a.pos(6, 3),
                                                touched], dict(adamw, touched=True)),
        # Adafactor: factored (a matrix; a conv weight's gathered output channels) and not (a
        # vector); its moment's decay step**-0.8 is >= 0.5 at step 2 and < 0.5 from step 3
        # (torch's lerp switches form there); lr 0.3 > 1/sqrt(step) at step 4
        ("adafactor-step1", "adafactor_update", [a.r(4, 3), a.r(4, 3), 0.01, 1, torch.zeros(4, 1, dtype=a.dtype),
                                                 torch.zeros(1, 3, dtype=a.dtype)], dict(adafactor, n_state=2)),
        ("adafactor-matrix", "adafactor_update", [a.r(4, 3), a.r(4, 3), 0.01, 3, a.pos(4, 1), a.pos(1, 3)],
         dict(adafactor, n_state=2)),
        ("adafactor-vector-decay", "adafactor_update", [a.r(5), a.r(5), 0.01, 2, a.pos(5)],
         dict(adafactor, weight_decay=0.1)),
        ("adafactor-partial-index", "adafactor_update", [a.r(3, 2, 3, 3), a.r(2, 2, 3, 3), 0.3, 4, a.pos(2, 2, 3, 1),
                                                         a.pos(2, 2, 1, 3), chosen],
         dict(adafactor, n_state=2, part=(0, 2), eps1=1e-30)),
        ("assign", "assign", [a.r(3), a.r(3)], {}),
        ("assign-int64", "assign", [torch.tensor(4), torch.tensor(5)], {}),
    ]
    finite, nan, inf = a.r(3, 4), a.r(3, 4), a.r(3, 4)
    nan[1, 2], inf[0, 0] = math.nan, math.inf
    for name, g in (("finite", finite), ("nan", nan), ("inf", inf)):
        cases.append((f"is_finite-{name}", "is_finite", [g], {}))
        cases.append((f"update_ok-{name}", "update_ok", [torch.tensor(True), g], {}))
    cases.append(("update_ok-loss-not-ok", "update_ok", [torch.tensor(False), finite], {}))
    cases.append(("all_of", "all_of", [torch.tensor(True), torch.tensor(False), torch.tensor(True)], {}))
    return cases


def _attention_cases(a):
    from edgetune.compiler.ir.ops.attention import _sdpa

    q, k, v = a.r(2, 2, 3, 4), a.r(2, 2, 5, 4), a.r(2, 2, 5, 4)  # the CPU kernel wants one head size
    keep = a.r(3, 5) > -0.5
    keep[:, 0] = True  # no row masked entirely
    attention = dict(is_causal=False, scale=0.5)
    cases = []
    blind = keep.clone()
    blind[1] = False  # a query that sees no key (left padding under a causal mask): zeros, not NaN
    for name, mask, attrs in (("plain", [], attention), ("causal", [], dict(attention, is_causal=True)),
                              ("bool-mask", [keep], attention), ("float-mask", [a.r(3, 5)], attention),
                              ("bool-mask-a-row-sees-nothing", [blind], attention)):
        packed = _sdpa(q, k, v, *mask, **attrs)
        cases.append((f"sdpa-{name}", "sdpa", [q, k, v, *mask], attrs))
        g = a.r(packed.numel())  # one draw per case, as before: the later families' values stay
        cases.append((f"sdpa_grad-{name}", "sdpa_grad", [g, q, k, v, *mask, packed], attrs))
        # the output's gradient alone (the log-sum-exp's part left out, as the backward hands it)
        cases.append((f"sdpa_grad-{name}-output-only", "sdpa_grad", [g[:2 * 2 * 3 * 4], q, k, v, *mask, packed], attrs))
    bias = a.r(2, 1, 3, 5)  # a trained mask, broadcast over the heads
    packed = _sdpa(q, k, v, bias, **attention)
    cases.append(("sdpa_grad_mask", "sdpa_grad_mask", [a.r(packed.numel()), q, k, v, bias, packed], attention))
    # self-attention (q, k, v of one shape): dq, dk, dv interleaved as [N, T, 3, H, D]
    k, v = a.r(2, 2, 3, 4), a.r(2, 2, 3, 4)
    for name, attrs in (("plain", attention), ("causal", dict(attention, is_causal=True))):
        packed = _sdpa(q, k, v, **attrs)
        cases.append((f"sdpa_grad-interleaved-{name}", "sdpa_grad", [a.r(packed.numel()), q, k, v, packed],
                      dict(attrs, interleaved=True)))
    return cases


def _recurrent_cases(a):
    from edgetune.compiler.ir.ops.recurrent import _lstm_layer

    x, h0, c0 = a.r(5, 2, 3), a.r(2, 4), a.r(2, 4)
    weights = [a.r(16, 3), a.r(16, 4), a.r(16), a.r(16)]
    cases = []
    for reverse in (False, True):
        name, attrs = ("reverse" if reverse else "forward"), dict(reverse=reverse)
        packed = _lstm_layer(x, h0, c0, *weights, **attrs)
        cases += [(f"lstm_layer-{name}", "lstm_layer", [x, h0, c0, *weights], attrs),
                  (f"lstm_layer_grad-{name}", "lstm_layer_grad", [a.r(packed.numel()), packed, x, h0, c0, *weights], attrs)]
    return cases


def _gru_cases(a):
    from edgetune.compiler.ir.ops.gru import _gru_layer

    x, h0 = a.r(5, 2, 3), a.r(2, 4)
    weights = [a.r(12, 3), a.r(12, 4), a.r(12), a.r(12)]
    cases = []
    for reverse in (False, True):
        name, attrs = ("reverse" if reverse else "forward"), dict(reverse=reverse)
        packed = _gru_layer(x, h0, *weights, **attrs)
        cases += [(f"gru_layer-{name}", "gru_layer", [x, h0, *weights], attrs),
                  (f"gru_layer_grad-{name}", "gru_layer_grad", [a.r(packed.numel()), packed, x, h0, *weights], attrs)]
    # the input's and the biases' gradients only (a bias-only scheme)
    cases.append(("gru_layer_grad-biases", "gru_layer_grad", [a.r(packed.numel()), packed, x, h0, *weights],
                  dict(reverse=True, wanted=(True, False, False, False, True, True))))
    return cases


def _lstm_proj_cases(a):
    from edgetune.compiler.ir.ops.lstm_proj import _lstm_proj_layer

    x, h0, c0 = a.r(5, 2, 3), a.r(2, 2), a.r(2, 4)
    weights = [a.r(16, 3), a.r(16, 2), a.r(16), a.r(16), a.r(2, 4)]
    cases = []
    for reverse in (False, True):
        name, attrs = ("reverse" if reverse else "forward"), dict(reverse=reverse)
        packed = _lstm_proj_layer(x, h0, c0, *weights, **attrs)
        grad = [a.r(packed.numel()), packed, x, h0, c0, *weights]
        cases += [(f"lstm_proj_layer-{name}", "lstm_proj_layer", [x, h0, c0, *weights], attrs),
                  (f"lstm_proj_layer_grad-{name}", "lstm_proj_layer_grad", grad, attrs)]
    # the input's, the biases' and the projection's gradients only
    cases.append(("lstm_proj_layer_grad-some", "lstm_proj_layer_grad", grad,
                  dict(reverse=True, wanted=(True, False, False, False, False, True, True, True))))
    return cases


def _simple_rnn_cases(a):
    from edgetune.compiler.ir.ops.simple_rnn import _rnn_layer

    x, h0 = a.r(5, 2, 3), a.r(2, 4)
    weights = [a.r(4, 3), a.r(4, 4), a.r(4), a.r(4)]
    cases = []
    for nonlinearity in ("tanh", "relu"):
        for reverse in (False, True):
            name, attrs = f"{nonlinearity}-{'reverse' if reverse else 'forward'}", dict(reverse=reverse,
                                                                                         nonlinearity=nonlinearity)
            packed = _rnn_layer(x, h0, *weights, **attrs)
            cases += [(f"rnn_layer-{name}", "rnn_layer", [x, h0, *weights], attrs),
                      (f"rnn_layer_grad-{name}", "rnn_layer_grad", [a.r(packed.numel()), packed, x, h0, *weights], attrs)]
    cases.append(("rnn_layer_grad-biases", "rnn_layer_grad", [a.r(packed.numel()), packed, x, h0, *weights],
                  dict(reverse=True, nonlinearity="relu", wanted=(True, False, False, False, True, True))))
    return cases


def _vocab_cases(a):
    from edgetune.compiler.ir.ops.vocab import _vocab_log_prob

    h, w, target = a.r(6, 5), a.r(11, 5), a.idx(11, 6, 1)
    cases = []
    for chunk in (3, 11):  # four slices (the last one short) and the whole vocabulary at once
        packed = _vocab_log_prob(h, w, target, chunk=chunk)
        cases += [(f"vocab_log_prob-chunk{chunk}", "vocab_log_prob", [h, w, target], dict(chunk=chunk)),
                  (f"vocab_log_prob_grad_w-chunk{chunk}", "vocab_log_prob_grad_w", [a.r(6, 6), h, w, target, packed],
                   dict(chunk=chunk)),
                  (f"vocab_log_prob_grad_w-rows-chunk{chunk}", "vocab_log_prob_grad_w",  # rows of a rows rule
                   [a.r(6, 6), h, w, target, packed, Const(torch.tensor([0, 3, 4, 7, 10]))], dict(chunk=chunk, rows=True))]
    labels = target.clone()
    labels[[1, 4]] = -100  # rows a chat's loss ignores (its prompt): left out, zeros in the output
    packed = _vocab_log_prob(h, w, labels, chunk=3, ignore=-100)
    cases += [("vocab_log_prob-ignore", "vocab_log_prob", [h, w, labels], dict(chunk=3, ignore=-100)),
              ("vocab_log_prob_grad_w-ignore", "vocab_log_prob_grad_w", [a.r(6, 6), h, w, labels, packed],
               dict(chunk=3, ignore=-100))]
    big = h * 300  # logits of ~1000: the online log-sum-exp rescales earlier slices
    return cases + [
        ("vocab_log_prob-large-logits", "vocab_log_prob", [big, w, target], dict(chunk=4)),
        ("vocab_log_prob_grad_h", "vocab_log_prob_grad_h", [a.r(6, 6), _vocab_log_prob(h, w, target, chunk=3)], {}),
    ]


def _zo_cases(a):
    """MeZO's perturbation and update (edgetune.compiler.zo): the hash regenerates the same
    +-1 directions in ONNX's uint32 arithmetic as in torch's int64 emulation of it."""
    chosen = Const(torch.tensor([0, 2]))
    update = dict(key=123456789, weight_decay=0.01, directions=2)
    return [
        ("zo_perturb", "zo_perturb_inplace", [a.r(40, 30), 3, a.r()], dict(scale=1e-3, key=987654321, part=None)),
        ("zo_perturb-part", "zo_perturb_inplace", [a.r(3, 4, 2), 2**32 - 1, a.r(), chosen],
         dict(scale=-2e-3, key=5, part=(1, 2))),
        ("zo_update", "zo_update", [a.r(40, 30), 0.01, a.r(2), 7, 8], dict(update, part=None)),
        ("zo_update-part", "zo_update", [a.r(3, 4, 2), 0.01, a.r(2), 7, 8, chosen], dict(update, part=(1, 2))),
        ("zo_grads", "zo_grads", [a.r(), a.r(), a.r(), a.r()], dict(eps=1e-3)),
        ("zo_loss", "zo_loss", [a.r(), a.r()], {}),
    ]


FAMILIES = [_attention_cases, _elementwise_cases, _more_elementwise_cases, _reduction_cases, _order_cases, _shape_cases,
            _linalg_cases, _norm_cases, _conv_cases, _pool_cases, _indexing_cases, _write_cases, _mask_cases,
            _optimizer_cases, _recurrent_cases, _vocab_cases, _zo_cases, _gru_cases, _lstm_proj_cases, _simple_rnn_cases]


@functools.cache
def cases(dtype):
    a = Args(dtype)
    return [case for family in FAMILIES for case in family(a)]


CASE_IDS = [c[0] for c in cases(torch.float32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_lowering_matches_kernel(case, dtype):
    _, op, args, attrs = next(c for c in cases(dtype) if c[0] == case)
    graph = one_op_graph(op, args, attrs)
    want, got = torch_result(graph, args), onnx_result(graph, args, dtype, case)
    assert len(want) == len(got)
    for w, g in zip(want, got):
        w = torch.as_tensor(w)
        assert g.dtype == w.dtype and tuple(g.shape) == tuple(w.shape), f"{case}: {g.dtype}{list(g.shape)}"
        tolerance = CASE_TOLERANCE.get((case, dtype), TOLERANCE[dtype])
        torch.testing.assert_close(g, w, **tolerance if w.is_floating_point() else dict(rtol=0, atol=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", ["log1p", "expm1"])
def test_log1p_expm1_keep_relative_accuracy_near_zero(op, dtype):
    """ONNX has neither: log(1 + x) and exp(x) - 1 would be off by ~1e7 ulps at x = 1e-7. The
    lowerings stay within a few ulps of torch over 30 decades either side of 0."""
    tiny = torch.logspace(-30, 0, 100, dtype=dtype)
    x = torch.cat([tiny, -tiny * 0.99]).reshape(20, 10)
    got = onnx_result(one_op_graph(op, [x], {}), [x], dtype)[0]
    want = getattr(torch, op)(x)
    assert ((got - want).abs() / want.abs()).max() < 4 * torch.finfo(dtype).eps


def test_a_case_torch_orders_its_own_way_is_refused():
    """topk(sorted=False) returns the k entries in the order torch's selection leaves them."""
    graph = one_op_graph("topk_indices", [torch.randn(3, 40)], dict(k=5, dim=1, largest=True, sorted=False))
    with pytest.raises(ExportError, match=r"'topk_indices'.*sorted=False"):
        to_onnx(graph)


def test_dropout_mask_draws_a_mask_of_the_same_law():
    """Random: not torch's draws, so checked by law. Entries are 0 or 1/keep, kept at about the
    rate `keep`, and each run draws anew."""
    x = torch.zeros(64, 64)
    graph = one_op_graph("dropout_mask", [x], dict(p=0.25))
    model = to_onnx(graph).model
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), single_threaded(), providers=["CPUExecutionProvider"])
    first, second = (torch.from_numpy(session.run(["out"], {"x0": x.numpy()})[0]) for _ in range(2))
    assert set(first.unique().tolist()) == {0.0, torch.tensor(1 / 0.75, dtype=torch.float32).item()}
    assert abs((first > 0).float().mean().item() - 0.75) < 0.03  # 4096 draws: 5 standard deviations
    assert not torch.equal(first, second)


def test_dropout_mask_of_p_one_drops_everything_in_both_backends():
    """torch's dropout(p=1) gives zeros: the kernel and its lowering too (no 0 / 0)."""
    from edgetune.compiler.ir.ops import OPS

    x = torch.randn(8, 8)
    assert torch.equal(OPS["dropout_mask"].kernel(x, p=1.0), torch.zeros_like(x))
    session = ort.InferenceSession(to_onnx(one_op_graph("dropout_mask", [x], dict(p=1.0))).model.SerializeToString(),
                                   single_threaded(), providers=["CPUExecutionProvider"])
    assert torch.equal(torch.from_numpy(session.run(["out"], {"x0": x.numpy()})[0]), torch.zeros_like(x))


RANDOM_OPS = {"dropout_mask"}  # checked by law above, not against torch's draws
# Lowerings that refuse with the reason and what to do instead (GaLore's SVD has no ONNX
# operator), each checked by its own test (tests/unit/test_galore.py).
REFUSING_OPS = {"galore_update"}


def test_the_cases_cover_every_lowering():
    """A lowering added without a case here is untested: each registered one has a case."""
    covered = {c[1] for c in cases(torch.float32)} | RANDOM_OPS | REFUSING_OPS
    lowered = {name for name, op in OPS.items() if op.onnx is not None}
    inplace_of_covered = {name for name in lowered if name.removesuffix("_inplace") in covered}
    assert lowered - covered - inplace_of_covered == set()
