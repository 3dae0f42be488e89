"""Softmax, losses and attention: gradients vs torch.autograd."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tests.ops.harness import check_each, check_grads, few, t

# -- softmax / log_softmax ------------------------------------------------------------------


@pytest.mark.parametrize("shape,dims", [((5,), [0]), ((3, 4), [0, 1]), ((2, 3, 4), [-1, 1, -3])], ids=str)
def test_softmax(shape, dims):
    fns = {f"{fn.__name__}(dim={d})": (lambda x, fn=fn, d=d: fn(x * 3, dim=d))
           for fn in (F.softmax, F.log_softmax) for d in dims}
    check_each(fns, lambda: t(*shape))


def test_softmax_of_transposed_input_with_dtype():
    check_grads(lambda x: F.softmax(x.t(), dim=-1, dtype=torch.float64) + F.log_softmax(x.t(), 0), t(4, 3))


# -- losses -----------------------------------------------------------------------------------

def _targets(shape, classes, ignored=()):
    y = torch.randint(0, classes, shape)
    y.view(-1)[list(ignored)] = -100
    return y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_with_ignored_entries(reduction):
    y = _targets((6,), 5, ignored=(1, 4))
    check_grads(lambda x, y: F.cross_entropy(x, y, reduction=reduction), t(6, 5), y)


def test_cross_entropy_nothing_ignored():
    check_grads(F.cross_entropy, t(4, 7), _targets((4,), 7))


def test_cross_entropy_spatial_and_sequence():
    # (N, C, d) targets (N, d): a segmentation-style or a (B, vocab, T) language-model loss.
    check_grads(F.cross_entropy, t(2, 5, 3), _targets((2, 3), 5, ignored=(2,)))
    check_grads(lambda x, y: F.cross_entropy(x.transpose(1, 2), y), t(2, 3, 5), _targets((2, 3), 5, ignored=(0,)))


def test_cross_entropy_language_model_flattened():
    def loss(logits, y):
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1), ignore_index=-100)

    check_grads(loss, t(2, 4, 6), _targets((2, 4), 6, ignored=(3, 7)))


def test_cross_entropy_other_options():
    y = _targets((6,), 5)
    y[2] = 3
    check_grads(lambda x, y: F.cross_entropy(x, y, ignore_index=3), t(6, 5), y)
    check_grads(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1), t(6, 5), _targets((6,), 5, ignored=(0,)))


def test_cross_entropy_of_linear_head():
    check_grads(lambda x, w, b, y: F.cross_entropy(F.linear(x, w, b), y), t(6, 4), t(5, 4), t(5),
                _targets((6,), 5, ignored=(5,)))


def test_nll_and_mse_losses():
    y = _targets((6,), 5, ignored=(2,))
    check_grads(lambda x, y: F.nll_loss(F.log_softmax(x, -1), y), t(6, 5), y)
    check_grads(F.mse_loss, t(3, 4), t(3, 4, grad=False))


@pytest.mark.parametrize("loss", [F.l1_loss, F.smooth_l1_loss, F.huber_loss], ids=["l1", "smooth_l1", "huber"])
def test_regression_losses(loss):
    check_grads(loss, t(3, 4) * 2, t(3, 4, grad=False))


def test_binary_cross_entropy():
    y = torch.rand(3, 4, dtype=torch.float64)
    check_grads(F.binary_cross_entropy_with_logits, t(3, 4) * 3, y)
    check_grads(lambda x, y, w: F.binary_cross_entropy_with_logits(x, y, pos_weight=w), t(3, 4), y,
                t(4, low=1, grad=False))
    check_grads(lambda x, y: F.binary_cross_entropy(torch.sigmoid(x), y), t(3, 4), y)


def test_kl_divergence():
    target = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    check_grads(lambda x, p: F.kl_div(F.log_softmax(x, -1), p, reduction="batchmean"), t(3, 4), target)


# -- scaled_dot_product_attention -------------------------------------------------------------

def _qkv(b=2, h=2, t_q=4, t_k=4, d=8, h_kv=None):
    return t(b, h, t_q, d), t(b, h_kv or h, t_k, d), t(b, h_kv or h, t_k, d)


def test_sdpa_plain():
    check_grads(F.scaled_dot_product_attention, *_qkv())
    check_grads(F.scaled_dot_product_attention, *_qkv(t_q=3, t_k=5))  # cross-attention lengths


def test_sdpa_backward_reads_the_output_gradient_unpadded():
    """The fused op packs its output with the log-sum-exp; the gradient of the output reaches
    the backward kernel as it is, not copied into a zero-padded tensor of the packed width."""
    import edgetune as et

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)

        def forward(self, x):
            q = self.q(x).unflatten(-1, (2, 4)).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).sum((1, 3))

    trainer = et.compile(Attention(), F.mse_loss, (torch.randn(2, 5, 8),), (torch.randn(2, 5),),
                         scheme=et.schemes.full(), optimizer=et.SGD(0.1))
    ops = [n.op for n in trainer.graph.nodes]
    assert "sdpa_grad" in ops and "slice_grad" not in ops


def test_sdpa_causal():
    check_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), *_qkv(t_q=5, t_k=5))


def test_sdpa_scale():
    check_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3), *_qkv(d=4))


@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 4, 6), (1, 4, 6), (2, 1, 4, 6), (2, 2, 4, 6)], ids=str)
def test_sdpa_bool_mask(mask_shape):
    mask = torch.rand(mask_shape) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    q, k, v = _qkv(t_q=4, t_k=6)
    check_grads(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, mask)


def test_sdpa_fully_masked_rows():
    # Left padding with a causal mask leaves the padded queries no key at all: torch outputs 0
    # for such rows and passes no gradient through them (not NaN).
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    keys = torch.tensor([[False, True, True, True], [True, True, True, True]])
    mask = causal & keys[:, None, None, :]
    check_grads(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), *_qkv(), mask)


def test_sdpa_float_mask():
    bias = torch.randn(4, 4, dtype=torch.float64)
    check_grads(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), *_qkv(), bias)


@pytest.mark.parametrize("mask_shape", [(4, 6), (2, 4, 6), (1, 4, 6), (1, 2, 4, 6), (2, 1, 4, 6), (2, 2, 4, 6)], ids=str)
def test_sdpa_trained_float_mask(mask_shape):
    # A relative position bias trained through the mask (Swin, T5): its gradient is the scores',
    # summed over the dimensions the mask is broadcast along.
    check_grads(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), *_qkv(t_q=4, t_k=6),
                t(*mask_shape))


def test_sdpa_only_the_mask_trained():
    q, k, v = (x.detach() for x in _qkv())
    check_grads(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), q, k, v, t(2, 1, 4, 4))


def test_sdpa_gqa_by_expand():
    # Llama-style grouped-query attention: 4 query heads share 2 kv heads, repeated by expand.
    def attend(q, k, v):
        b, h_kv, s, d = k.shape
        rep = q.shape[1] // h_kv
        k = k[:, :, None].expand(b, h_kv, rep, s, d).reshape(b, h_kv * rep, s, d)
        v = v[:, :, None].expand(b, h_kv, rep, s, d).reshape(b, h_kv * rep, s, d)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    check_grads(attend, *_qkv(h=4, h_kv=2))


def test_sdpa_gqa_builtin():
    check_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), *_qkv(h=4, h_kv=2))


def test_attention_block_from_projections():
    # One attention layer as a model writes it: fused qkv projection, heads split by view/transpose.
    def block(x, w_qkv, w_o):
        b, s, e = x.shape
        q, k, v = F.linear(x, w_qkv).split(e, dim=-1)
        q, k, v = (z.view(b, s, 2, e // 2).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.linear(y.transpose(1, 2).reshape(b, s, e), w_o)

    check_grads(block, t(2, 5, 8), t(24, 8), t(8, 8))


@few(4)
@given(t_q=st.integers(1, 5), t_k=st.integers(1, 5), d=st.integers(1, 6), causal=st.booleans())
def test_manual_attention_with_arange_mask(t_q, t_k, d, causal):
    # The hand-written form: masks from arange comparisons, masked_fill with -inf, softmax.
    def attend(q, k, v):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if causal:
            future = torch.arange(k.shape[-2])[None, :] > torch.arange(q.shape[-2])[:, None] + (t_k - t_q)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(-1) @ v

    t_k = max(t_k, t_q) if causal else t_k
    check_grads(attend, *_qkv(b=1, t_q=t_q, t_k=t_k, d=d))


@pytest.mark.parametrize("kw, fused", [({}, True), ({"is_causal": True}, True), ({"enable_gqa": True}, False)])
def test_sdpa_stays_one_op_where_the_fused_kernel_applies(kw, fused):
    from edgetune.compiler.frontend.torch import export

    q, k, v = _qkv(h=4, h_kv=2 if kw.get("enable_gqa") else 4)
    forward = export(torch.nn.Identity(), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw).sum(),
                     (q,), (k, v))
    ops = [n.op for n in forward.graph.nodes]
    assert ("sdpa" in ops) == fused and ("softmax" in ops) != fused


def test_each_sdpa_call_stays_whole_or_is_decomposed_on_its_own():
    """A grouped-query call, which the fused kernel does not take, beside one it does: the
    first is decomposed, the second stays one op (the choice is made call by call); the
    gradients of both against autograd."""
    from edgetune.compiler.frontend.torch import export

    def both(q, k, v):
        grouped = F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True)
        return grouped + F.scaled_dot_product_attention(q, k, v)

    q, k, v = _qkv(h=4, h_kv=4)
    ops = [n.op for n in export(torch.nn.Identity(), lambda *qkv: both(*qkv).sum(), (q,), (k, v)).graph.nodes]
    assert ops.count("sdpa") == 1 and "softmax" in ops
    check_grads(both, q, k, v)
