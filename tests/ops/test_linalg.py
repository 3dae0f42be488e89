"""Matrix products (mm, addmm, bmm, matmul, linear) and tied parameters: gradients vs torch.autograd."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tests.ops.harness import check_grads, few, t


def test_mm():
    check_grads(torch.mm, t(3, 4), t(4, 5))
    check_grads(torch.mm, t(3, 4, grad=False), t(4, 5))
    check_grads(torch.mm, t(3, 4), t(4, 5, grad=False))


def test_mm_of_transposed_operands():
    check_grads(lambda x, y: x.t() @ y.t(), t(4, 3), t(5, 4))


@pytest.mark.parametrize("bias_shape,beta,alpha", [((5,), 1, 1), ((5,), 0.5, 2.0), ((1, 5), 1, 1), ((3, 1), 0, 1.5),
                                                   ((3, 5), 1, 1), ((3, 5), 0.1, 0.3)], ids=str)
def test_addmm(bias_shape, beta, alpha):
    check_grads(lambda c, x, y: torch.addmm(c, x, y, beta=beta, alpha=alpha), t(*bias_shape), t(3, 4), t(4, 5))


def test_addmm_with_transposed_weight_is_linear():
    # nn.Linear's pattern: addmm(b, x, W.t()); W gets its gradient in its own layout.
    check_grads(lambda b, x, w: torch.addmm(b, x, w.t()), t(5), t(3, 4), t(5, 4))


def test_bmm():
    check_grads(torch.bmm, t(2, 3, 4), t(2, 4, 5))
    check_grads(lambda x, y: torch.bmm(x.transpose(1, 2), y), t(2, 4, 3), t(2, 4, 5))


MATMUL_SHAPES = [
    ((3, 4), (4, 5)),          # mm
    ((2, 3, 4), (4, 5)),       # batched @ matrix: folds into one mm
    ((3, 4), (2, 4, 5)),       # matrix @ batched: broadcast bmm
    ((2, 3, 4), (2, 4, 5)),    # bmm
    ((2, 1, 3, 4), (5, 4, 6)),  # broadcast batch dims on both sides
    ((4,), (4, 5)),            # vector @ matrix
    ((3, 4), (4,)),            # matrix @ vector
    ((4,), (4,)),              # dot
    ((4,), (2, 4, 3)),         # vector @ batched
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul(shapes):
    a, b = shapes
    check_grads(torch.matmul, t(*a), t(*b))


@few(5)
@given(batch_a=st.lists(st.integers(1, 3), max_size=2), batch_b=st.lists(st.integers(1, 3), max_size=2),
       n=st.integers(1, 4), k=st.integers(1, 4), m=st.integers(1, 4))
def test_matmul_broadcast_batches(batch_a, batch_b, n, k, m):
    # Make the batch dims broadcastable: where both have a dim, one of them is 1 or they agree.
    lead = min(len(batch_a), len(batch_b))
    for i in range(1, lead + 1):
        if batch_a[-i] != batch_b[-i]:
            batch_b[-i] = 1
    check_grads(torch.matmul, t(*batch_a, n, k), t(*batch_b, k, m))


@pytest.mark.parametrize("x_shape", [(3, 4), (2, 3, 4), (2, 2, 3, 4), (4,)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(x_shape, bias):
    if bias:
        check_grads(F.linear, t(*x_shape), t(5, 4), t(5))
    else:
        check_grads(F.linear, t(*x_shape), t(5, 4))


def test_linear_frozen_input_and_noncontiguous_input():
    check_grads(F.linear, t(2, 3, 4, grad=False), t(5, 4), t(5))
    check_grads(lambda x, w, b: F.linear(x.transpose(1, 2), w, b), t(2, 4, 3), t(5, 4), t(5))
    check_grads(lambda x, w: F.linear(x, w.t()), t(3, 4), t(4, 6))


def test_linear_of_a_noncontiguous_batch_stays_a_linear():
    # torch.matmul spells it bmm(x, expand(W.t())); edgetune reads it back as linear(x, W), so
    # that ratio rules, LoRA and int8 find the weight (attention's o_proj at real shapes).
    from edgetune.compiler.frontend.torch import export

    def fn(x, w):
        return F.linear(x.transpose(0, 1), w)

    check_grads(fn, t(5, 3, 4), t(6, 4))

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            return fn(x, self.w)

    forward = export(M(), lambda y: y.sum(), (torch.randn(5, 3, 4),), ())
    assert [n.op for n in forward.graph.nodes if forward.params["w"] in n.inputs] == ["linear"]


def test_linear_stack_with_gelu():
    def mlp(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    check_grads(mlp, t(2, 3, 4), t(8, 4), t(8), t(4, 8), t(4))


# -- tied parameters: one parameter, several uses, the gradients summed ----------------------

def test_tied_square_matrix_and_its_transpose():
    check_grads(lambda x, w: x @ w + x @ w.t(), t(3, 4), t(4, 4))
    check_grads(lambda x, w: x @ w + x @ w.t(), t(3, 4, grad=False), t(4, 4))


def test_tied_embedding_and_output_head():
    idx = torch.tensor([[0, 3, 2], [1, 1, 4]])
    check_grads(lambda w, idx: F.linear(F.embedding(idx, w), w), t(5, 3), idx)


def test_tied_weight_used_three_ways():
    check_grads(lambda x, w, b: F.linear(x, w, b) + (w * w).sum() + torch.mm(x, w.t()) * b, t(3, 4), t(2, 4), t(2))


def _routed_experts(x, w, token_expert_pairs):
    """transformers' default MoE experts as they export: rows sorted by expert, counted per
    expert (floor division of the pair index, histc, cumsum) into offsets, one product each."""
    experts = torch.div(token_expert_pairs, 2, rounding_mode="floor")
    counts = torch.histc(experts.to(x.dtype), bins=w.shape[0], min=0, max=w.shape[0] - 1)
    return torch.ops.transformers.grouped_mm_fallback(x, w, counts.cumsum(0).to(torch.int64))


def test_grouped_mm_of_moe_experts():
    pytest.importorskip("transformers.integrations.moe")  # registers the custom op
    pairs = torch.tensor([0, 1, 2, 3, 3, 6, 7, 7, 7])  # experts 0, 0, 1, 1, 1, 3, 3, 3, 3: expert 2 gets none
    check_grads(_routed_experts, t(9, 4), t(4, 4, 3), pairs)
    check_grads(_routed_experts, t(9, 4, grad=False), t(4, 4, 3), pairs)
