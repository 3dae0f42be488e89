"""The view family (view, reshape, permute, transpose, expand, slicing, select, cat, split, ...):
gradients route back to the right entries, also through chains of non-contiguous views."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from tests.ops.harness import check_each, check_grads, few, t

VIEWS = {
    "view": lambda x: x.view(4, 15),
    "view_-1": lambda x: x.view(-1, 3),
    "reshape": lambda x: x.reshape(2, 2, 15),
    "flatten": lambda x: x.flatten(1),
    "unflatten": lambda x: x.unflatten(2, (1, 5, 1)),
    "permute_neg": lambda x: x.permute(-1, -3, -2),
    "transpose": lambda x: x.transpose(0, 2),
    "mT": lambda x: x.mT,
    "movedim": lambda x: x.movedim(0, -1),
    "expand": lambda x: x[:, :1].expand(4, 3, 5),
    "expand_new_dims": lambda x: x.expand(2, 4, 3, 5),
    "expand_as": lambda x: x[:1, :, :1].expand_as(x),
    "slice_step": lambda x: x[:, ::2, 1::3],
    "slice_neg": lambda x: x[-3:-1, :, :-2],
    "slice_past_end": lambda x: x[:, 1:100],
    "slice_empty": lambda x: torch.cat([x[2:2], x[:1]]),
    "narrow": lambda x: x.narrow(2, 1, 3),
    "select_neg": lambda x: x[:, -1],
    "select_index_mix": lambda x: x[2, 1:, None, ::2],
    "select": lambda x: x[1],
    "unsqueeze": lambda x: x.unsqueeze(1),
    "unsqueeze_neg": lambda x: x.unsqueeze(-1),
    "none_index": lambda x: x[None, :, None],
    "squeeze": lambda x: x[:, :1].squeeze(),
    "squeeze_noop": lambda x: x.squeeze(0),
    "squeeze_dim": lambda x: x[:, :1].squeeze(1),
    "clone": lambda x: x.clone(),
    "contiguous": lambda x: x.transpose(0, 1).contiguous(),
    "unbind": lambda x: x.unbind(1)[2],
    "chunk": lambda x: x.chunk(2, dim=2)[1],
    "split": lambda x: x.split(2, dim=0)[1],
    "split_sizes": lambda x: x.split([1, 3, 1], dim=2)[1],
    "stack": lambda x: torch.stack([x, x * 2], 1),
    "cat": lambda x: torch.cat([x, x[:, :1] * 3], 1),
    "cat_neg_dim": lambda x: torch.cat([x[..., :2], x], -1),
    "flip": lambda x: x.flip(0, -1),
    "repeat": lambda x: x.repeat(2, 1, 1, 3),
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=1),
    "roll": lambda x: x.roll(1, 0) + x.roll(-2, 2),
    "tril_triu": lambda x: x.tril() + x.triu(1),
    "pixel_shuffle": lambda x: F.pixel_shuffle(x[None, :, :2, :2], 2),
}


def test_views():
    check_each(VIEWS, lambda: t(4, 3, 5))


def test_chain_of_noncontiguous_views():
    def fn(x):
        y = x.transpose(0, 2)[1:, ::2].permute(2, 0, 1)  # non-contiguous at every step
        return y.reshape(y.shape[0], -1).t()[::2] * 2

    check_grads(fn, t(4, 3, 5))


def test_noncontiguous_input_reshaped():
    # A transposed input tensor arrives at the step; reshape must copy, not reinterpret.
    x = t(5, 4, grad=False).t()
    check_grads(lambda x, w: (x * w).reshape(-1) + x.reshape(2, 10).t().reshape(-1), x, t(4, 5))


def test_split_all_pieces_and_cat_back():
    def fn(x):
        a, b, c = x.split([1, 2, 2], dim=1)
        return torch.cat([c * 2, a, b.exp()], dim=1)

    check_grads(fn, t(3, 5))


def test_cat_of_mixed_precision():
    check_grads(lambda x, y: torch.cat([x, y], 1) * 2, t(2, 3).float().detach().requires_grad_(True), t(2, 2))


def test_chunk_qkv():
    def fn(x, w):
        q, k, v = F.linear(x, w).chunk(3, dim=-1)
        return q * k + v

    check_grads(fn, t(2, 3, 4), t(12, 4))


def test_every_piece_of_an_unbind_and_a_select_used():
    check_grads(lambda x: (lambda a, b, c: a * b + c)(*x.unbind(1)), t(2, 3, 4))
    check_grads(lambda x: x[:, 0] * x[:, 1].exp() + x[:, 2], t(2, 3, 4))
    check_grads(lambda x: x[:, 0] * x[:, 2], t(2, 3, 4))  # the middle piece unused: no tiling


@pytest.mark.parametrize("cut", ["chunk", "unbind", "select"])
def test_the_gradient_of_a_value_cut_into_pieces_is_one_cat(cut):
    """q, k and v cut from one projection, all used: their gradients go side by side (one cat),
    not each into a zero-filled tensor of the whole, added up."""
    import edgetune as et

    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 12)

        def forward(self, x):
            y = self.proj(x)
            if cut == "chunk":
                q, k, v = y.chunk(3, dim=-1)
            else:
                y = y.unflatten(-1, (3, 4))
                q, k, v = y.unbind(-2) if cut == "unbind" else (y[..., 0, :], y[..., 1, :], y[..., 2, :])
            return (q * k + v).sum(-1)

    trainer = et.compile(QKV(), torch.nn.functional.mse_loss, (torch.randn(2, 4),), (torch.randn(2),),
                         scheme=et.schemes.full(), optimizer=et.SGD(0.1))
    ops = [n.op for n in trainer.graph.nodes]
    assert "cat" in ops and "slice_grad" not in ops and "select_grad" not in ops


def test_views_on_a_parameter_used_twice():
    check_grads(lambda w: w[:2] * w[2:] + w.t()[:, :2].t(), t(4, 3))


@few(5)
@given(shape=array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4), data=st.data())
def test_permute_and_slice(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    dim = data.draw(st.integers(0, len(shape) - 1))
    start = data.draw(st.integers(0, shape[dim] - 1))
    step = data.draw(st.integers(1, 3))

    def fn(x):
        sliced = x[(slice(None),) * dim + (slice(start, None, step),)]
        return x.permute(*perm) * 2 + sliced.sum() + x.select(dim, start).sum()

    check_grads(fn, t(*shape))


@few(5)
@given(shape=array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4), data=st.data())
def test_expand_broadcast(shape, data):
    # Keep some dims, broadcast the unit ones, and prepend new leading dims.
    unit = tuple(s if data.draw(st.booleans()) else 1 for s in shape)
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2)))
    check_grads(lambda x: x.expand(*lead, *shape) * 1.5, t(*unit))


def test_pad():
    check_grads(lambda x: F.pad(x, (1, 2)), t(3, 4))
    check_grads(lambda x: F.pad(x, (0, 1, 2, 0), value=0.5), t(2, 3, 4))
    check_grads(lambda x: F.pad(x, (-1, 1, 1, -2)), t(2, 3, 4))


@pytest.mark.parametrize("fn,idx", [
    (lambda x, i: x[i], torch.tensor([2, 0, 2, -1])),            # repeated and negative rows
    (lambda x, i: x[:, i], torch.tensor([[3, 0], [1, -4]])),      # a 2-D index on a middle dim
    (lambda x, i: x[torch.arange(3), i], torch.tensor([1, 3, 0])),  # logits[range(B), targets]
    (lambda x, i: x[..., i, :], torch.tensor([0, 0])),
], ids=["rows", "middle_2d", "pairs", "ellipsis"])
def test_integer_tensor_indexing(fn, idx):
    check_grads(fn, t(3, 4, 5), idx)


# -- writes into intermediate tensors (functionalized into *_scatter / index_put) -------------

def _written(write):
    def fn(x, *args):
        y = x * 2  # an intermediate: writing into a parameter itself is not a model's forward
        write(y, *args)
        return y * 3
    return fn


def _set(y, key, v):
    y[key] = v


def _set_at(y, i, v):
    y[i] = v


def _set_pairs(y, i, j, v):
    y[i, j] = v


@pytest.mark.parametrize("key,value_shape", [((slice(None), slice(1, 3)), (3, 2)), ((slice(None), 1), (3,)),
                                             ((1,), (1, 4)), ((slice(None, None, 2),), (4,))], ids=str)
def test_assign_into_view(key, value_shape):
    check_grads(_written(lambda y, v: _set(y, key, v)), t(3, 4), t(*value_shape))


def test_assign_at_index_tensors():
    check_grads(_written(_set_at), t(4, 3), torch.tensor([0, 2]), t(2, 3))
    check_grads(_written(_set_at), t(4, 3), torch.tensor([[3], [-4]]), t(3))  # broadcast value
    check_grads(_written(_set_pairs), t(4, 3), torch.tensor([0, 3]), torch.tensor([2, 0]), t(2))


def test_assign_scalar_at_bool_mask():
    check_grads(_written(lambda y, m, v: _set(y, m, v)), t(3, 4), torch.rand(3, 4) > 0.5, t())


# (Index tensors are passed in: a tensor captured from outside fn is a constant, which the
# frontend rejects.)
def test_index_put_accumulate_and_index_add():
    idx = torch.tensor([0, 2, 0])
    check_grads(lambda x, i, v: x.index_put((i,), v, accumulate=True), t(3, 4), idx, t(3, 4))
    check_grads(lambda x, i, v: x.index_add(1, i, v), t(4, 3), idx, t(4, 3))


def test_scatter_and_scatter_add():
    idx = torch.tensor([[0, 2], [1, 1], [3, 0]])
    check_grads(lambda x, i, src: x.scatter(1, i[:, :1], src[:, :1]) + x.scatter_add(1, i, src), t(3, 4), idx, t(3, 2))
    check_grads(lambda x, i: x.scatter(0, i.t(), 0.5), t(4, 3), idx)


# -- as_strided: only where it reshapes (edgetune/compiler/frontend/torch.py) ------------------

def test_adaptive_avg_pool1d_as_swin_pools():
    # Its decomposition ends in an as_strided that only restores the layout of the pooled mean.
    check_grads(lambda x: F.adaptive_avg_pool1d(x.transpose(1, 2), 1).flatten(1), t(2, 5, 4))
    check_grads(lambda x: F.adaptive_avg_pool1d(x, 1), t(2, 3, 4))


def test_as_strided_that_reshapes():
    check_grads(lambda x: torch.as_strided(x * 2, (6, 2), (2, 1)), t(3, 4))
    check_grads(lambda x: torch.as_strided(x * 2, (2, 1, 6), (6, 5, 1)), t(3, 4))  # any stride on a size-1 dim


@pytest.mark.parametrize("size, stride, offset", [((3, 3), (1, 1), 0), ((2, 4), (4, 1), 4), ((4, 3), (1, 4), 0)],
                         ids=["overlapping", "offset", "transposed"])
def test_as_strided_that_reads_memory_is_refused(size, stride, offset):
    from edgetune.compiler.frontend.torch import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match="as_strided"):
        check_grads(lambda x: torch.as_strided(x * 2, size, stride, offset), t(3, 4))
