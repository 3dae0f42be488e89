"""Elementwise ops, comparisons used as masks, selection, reductions: gradients vs torch.autograd."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from tests.ops.harness import check_each, check_grads, few, t

shapes = array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)

ACTIVATIONS = {
    "relu": F.relu,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
    "hardtanh_-2_0.5": lambda x: F.hardtanh(x, -2.0, 0.5),
    "hardswish": F.hardswish,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "exp": torch.exp,
    "neg": torch.neg,
    "abs": torch.abs,
    "clamp": lambda x: x.clamp(-0.5, 1.5),
    "clamp_min": lambda x: x.clamp(min=0.25),
    "square": lambda x: x**2,
    "cube": lambda x: x.pow(3),
    "pow_-1": lambda x: x.pow(-1),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "elu": F.elu,
    "selu": F.selu,
    "softplus": F.softplus,
    "mish": F.mish,
    "logsigmoid": F.logsigmoid,
    "hardsigmoid": F.hardsigmoid,
    "sin": torch.sin,
    "cos": torch.cos,
    "erf": torch.erf,
    "expm1": torch.expm1,
    "2**x": lambda x: 2**x,
}
POSITIVE = {
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal,
    "pow_0.5": lambda x: x**0.5,
    "pow_2.5": lambda x: x**2.5,
    "pow_-1.5": lambda x: x ** -1.5,
    "log1p": torch.log1p,
}


# An elementwise VJP does not care about shape: one 3-D shape each, plus one shape sweep.
def test_unary():
    check_each(ACTIVATIONS, lambda: t(2, 3, 4) * 3)


def test_unary_positive_domain():
    check_each(POSITIVE, lambda: t(2, 3, 4, low=0.5))


@few(5)
@given(shape=shapes, names=st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=1, max_size=3))
def test_unary_chains_any_shape(shape, names):
    def chain(x):
        for name in names:
            x = ACTIVATIONS[name](x)
        return x

    check_grads(chain, t(*shape) * 2)


KINKS = torch.tensor([-3.0, -2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0, 6.0, 7.0], dtype=torch.float64)


def test_kinks_match_torch():
    # Exactly at a kink torch picks a side (hardtanh: 0 at its bounds; clamp: 1); so must we.
    kinked = ["relu", "relu6", "hardtanh", "hardtanh_-2_0.5", "clamp", "clamp_min", "leaky_relu", "abs"]
    check_each({n: ACTIVATIONS[n] for n in kinked}, lambda: KINKS.clone().requires_grad_(True))


def test_hardswish_kinks_match_torch():
    check_grads(F.hardswish, KINKS.clone().requires_grad_(True))


def test_unary_of_transposed_view():
    check_grads(lambda x: F.gelu(x.t()[1:, ::2]) * torch.sigmoid(x.t()[1:, ::2]), t(6, 5))


def test_step_functions_pass_no_gradient():
    check_grads(lambda x: x * x.floor() + x.sign() + x.round() * x.ceil() + x.trunc(), t(3, 4) * 3)


def test_activation_of_noncontiguous_input():
    x = t(6, 5, grad=False).t()
    check_grads(lambda x, w: F.silu(x * w), x, t(5, 6))


# -- binary arithmetic with broadcasting ---------------------------------------------------

BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
          "add_alpha": lambda x, y: torch.add(x, y, alpha=2.5), "sub_alpha": lambda x, y: torch.sub(x, y, alpha=-3)}


@pytest.mark.parametrize("op", BINARY)
@few(3)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4))
def test_binary_broadcasting(op, shapes):
    a, b = shapes.input_shapes
    y = t(*b)
    if op == "div":
        y = (y.detach().abs() + 0.5).requires_grad_(True)
    check_grads(BINARY[op], t(*a), y)


def test_pow_of_two_tensors():
    """x ** y with both trained (x > 0), and ALiBi's use: a constant base to a tensor power."""
    check_grads(torch.pow, (t(3, 4).detach().abs() + 0.5).requires_grad_(True), t(1, 4))
    check_grads(lambda y: torch.pow(torch.tensor(0.5, dtype=y.dtype), y), t(5))
    # where autograd's rule is not the formula: y == 0 (base), x == 0 with y >= 0 (exponent)
    x = torch.tensor([0.0, 0.0, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    check_grads(torch.pow, x, torch.tensor([0.0, 2.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_one_side_trained(op):
    # Only one operand is a parameter; the other is a (broadcast) input.
    check_grads(BINARY[op], t(3, 1, 4, grad=False), t(5, 1) + 3)


SCALAR = {
    "x+2": lambda x: x + 2, "2+x": lambda x: 2 + x, "x-1.5": lambda x: x - 1.5, "3-x": lambda x: 3 - x,
    "x*2.5": lambda x: x * 2.5, "-2*x": lambda x: -2 * x, "x/4": lambda x: x / 4, "3/x": lambda x: 3 / x,
    "x*True": lambda x: x * True, "x*0.1": lambda x: x * 0.1, "x-0.1": lambda x: x - 0.1,
}


def test_python_scalars():
    # Tight tolerance: a scalar rounded to float32 would be off by ~1e-8 relative.
    check_each(SCALAR, lambda: t(3, 4).detach().abs().add(0.5).requires_grad_(True), rtol=1e-14, atol=1e-14)


def test_zero_dim_tensor_operand():
    check_grads(lambda x, s: x + s * x, t(3, 4), torch.tensor(2.0, dtype=torch.float64))


def test_same_value_on_both_sides():
    check_grads(lambda x: x * x - x / (x * x + 1), t(4, 3))


def test_zero_dim_parameter_broadcast():
    check_grads(lambda s, x: s * x + s, t(), t(3, 4))


def test_mixed_with_integer_tensor():
    # An int64 operand promotes to the float's dtype; no gradient flows into it.
    check_grads(lambda x: x * torch.arange(4) + torch.arange(4).view(4, 1)[:3], t(3, 4))


# -- comparisons and boolean masks ----------------------------------------------------------

def test_comparison_masks():
    def fn(x, y):
        out = x
        for cmp in (torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge):
            mask = cmp(x, 0.0) | cmp(y, x[0])  # the Scalar and the Tensor overloads
            out = out + x * mask + y * ~mask
        return out

    check_grads(fn, t(3, 4).round(decimals=0), t(4))


def test_mask_multiplies_activation():
    check_grads(lambda x: x * (x > 0) + 0.1 * x * (x <= 0).to(x.dtype), t(4, 5))


def test_logical_ops_and_arange_mask():
    def fn(x):
        i, j = torch.arange(4).unsqueeze(1), torch.arange(6).unsqueeze(0)
        band = torch.logical_and(j >= i, j - i < 3) | torch.logical_not(j != 5)
        return x.masked_fill(band, -1.0) * 2

    check_grads(fn, t(4, 6))


@few(4)
@given(shapes=mutually_broadcastable_shapes(num_shapes=3, min_dims=1, max_dims=3, max_side=4))
def test_where_broadcasting(shapes):
    c, a, b = shapes.input_shapes
    cond = torch.rand(*c) > 0.5
    check_grads(lambda cond, x, y: torch.where(cond, x, y), cond, t(*a), t(*b))


def test_where_with_scalars_and_masked_fill():
    m = torch.rand(3, 5) > 0.5
    check_grads(lambda m, x: torch.where(m, x, 0.0) + torch.where(m, -1.0, x), m, t(3, 5))
    check_grads(lambda m, x: x.masked_fill(m, 0.0) + x.masked_fill(~m[0], float("-inf")).exp(), m, t(3, 5))
    check_grads(lambda m, v, x: x.masked_fill(m, v), m, torch.tensor(2.0, dtype=torch.float64), t(3, 5))


def test_where_on_the_values_own_sign():
    # The mask depends on the trained value itself (leaky relu); no gradient through the mask.
    check_grads(lambda x: torch.where(x > 0, x, 0.01 * x), t(4, 5))


def test_mixed_precision_gradients_keep_the_parameters_dtype():
    # A float32 parameter meets float64 values: the result promotes, its gradient must not.
    x32 = t(3, 4).float().detach().requires_grad_(True)
    check_grads(lambda x, y: x * y + torch.where(y > 0, x, y) - x / (y.abs() + 1), x32, t(4, grad=False))
    check_grads(lambda x: x.sum(-1, dtype=torch.float64), x32)


def test_detach_stops_the_gradient():
    check_grads(lambda x: x * x.detach() + x.detach().exp(), t(3, 4))


def test_masks_from_full_and_float_arange():
    check_grads(lambda x: x.masked_fill(torch.full((3, 4), False), 1.0) * torch.full((4,), True), t(3, 4))
    check_grads(lambda x: x * torch.arange(0, 2, 0.5, dtype=torch.float64) + torch.arange(0.5, 4.5), t(3, 4))


def test_cast_round_trip():
    check_grads(lambda x: (x.float() * 2).double() + x.to(torch.float64), t(3, 4), rtol=1e-6, atol=1e-6)


# -- reductions -----------------------------------------------------------------------------

@st.composite
def reduction_case(draw):
    shape = draw(array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4))
    dims = draw(st.lists(st.integers(-len(shape), len(shape) - 1), unique_by=lambda d: d % len(shape),
                         min_size=1, max_size=len(shape)))
    return shape, dims, draw(st.booleans())


@few(5)
@given(case=reduction_case())
def test_sum_mean_dims(case):
    shape, dims, keepdim = case
    check_grads(lambda x: x.sum(dims, keepdim=keepdim) * 2 + x.mean(dims, keepdim=keepdim), t(*shape))


def test_full_reductions():
    fns = {"sum": torch.sum, "mean": torch.mean, "var": lambda x: x.var(), "std": lambda x: x.std(unbiased=False)}
    check_each(fns, lambda: t(3, 4, 2))


@few(5)
@given(case=reduction_case(), correction=st.sampled_from([0, 1, 2]))
def test_var_dims(case, correction):
    shape, dims, keepdim = case
    count = 1
    for d in dims:
        count *= shape[d]
    if count <= correction:
        shape = tuple(s + 2 for s in shape)
    check_grads(lambda x: torch.var(x, dims, correction=correction, keepdim=keepdim), t(*shape))


def test_reductions_of_views():
    check_grads(lambda x: x.t().sum(0) + x[:, 1::2].mean(-1, keepdim=True).t() + x.t().var(0), t(5, 4))


def _tied(*shape, dim):
    """t(*shape) whose entries 0 and 1 along `dim` are equal: ties for max/min to resolve."""
    x = t(*shape)
    x.data.select(dim, 1).copy_(x.data.select(dim, 0))
    return x


def test_extrema():
    # Ties (and relu's zeros) share the gradient evenly among the tied entries, as in torch.
    fns = {"amax": lambda x: x.amax(-1), "amin_keepdim": lambda x: x.amin((0, 2), keepdim=True),
           "max": lambda x: x.max(), "min": lambda x: x.min(), "logsumexp": lambda x: torch.logsumexp(x, 1),
           "amax_of_relu": lambda x: x.relu().amax(0)}
    check_each(fns, lambda: _tied(3, 4, 2, dim=2))


def test_var_mean():
    check_grads(lambda x: torch.var_mean(x, 1)[0] * torch.var_mean(x, 1, correction=0)[1], t(3, 4))


def test_max_min_along_a_dim():
    # Unlike amax, max(dim) routes the gradient to the one entry it picked (the first, on ties).
    fns = {"max_dim": lambda x: x.max(1).values, "min_dim_keepdim": lambda x: x.min(0, keepdim=True)[0],
           "max_and_argmax": lambda x: x.max(-1)[0] * x.argmax(-1)}
    check_each(fns, lambda: _tied(3, 4, 2, dim=1))


def test_sort_topk():
    fns = {"sort": lambda x: x.sort(1).values,
           "sort_descending": lambda x: torch.sort(x, 0, descending=True)[0] * torch.sort(x, 0)[1],
           "topk": lambda x: x.topk(2, -1).values, "topk_smallest": lambda x: x.topk(1, 0, largest=False)[0]}
    check_each(fns, lambda: t(3, 4))


def test_one_hot_and_new_empty():
    check_grads(lambda x, y: (x * F.one_hot(y, 4)).sum(-1) + x.new_empty(3, 4).fill_(2.0)[:, 0], t(3, 4),
                torch.tensor([0, 3, 1]))


def test_maximum_minimum_with_ties_and_broadcasting():
    x = t(3, 4)
    y = torch.cat([x.detach()[:1], t(2, 4, grad=False)]).requires_grad_(True)  # row 0 ties
    check_grads(lambda x, y: torch.maximum(x, y) + torch.minimum(x, 2 * y), x, y)
    check_grads(lambda x, y: torch.maximum(x, y) * torch.minimum(y, x), t(3, 4), t(4))


def test_clamp_with_tensor_bounds():
    # The bounds overlap: where lo > hi, torch returns hi and hi takes the gradient.
    check_grads(lambda x, lo, hi: torch.clamp(x, lo, hi), t(3, 4), t(4) - 0.5, t(3, 1) + 0.5)
    check_grads(lambda x, lo: x.clamp(min=lo), t(3, 4), t(4))


def test_fmod_remainder():
    check_grads(lambda x, y: torch.fmod(x, y) + torch.remainder(x, 0.7), t(3, 4) * 3, t(4, low=0.5))


def test_cumsum():
    check_grads(lambda x: x.cumsum(1) * x.cumsum(-3), t(2, 3, 4))


def test_norms():
    fns = {"l2": lambda x: x.norm(dim=-1), "l1_keepdim": lambda x: torch.linalg.vector_norm(x, 1, (0, 2), True),
           "l3": lambda x: torch.linalg.vector_norm(x, 3), "normalize": lambda x: F.normalize(x, dim=1),
           "cosine_similarity": lambda x: F.cosine_similarity(x[0], x[1], dim=-1)}
    check_each(fns, lambda: t(2, 3, 4))


def test_constant_tensors_made_in_forward_are_constants():
    check_grads(lambda x: x * torch.tensor(2.0, dtype=torch.float64) + x[[0, 2, 2]].sum(), t(3))
