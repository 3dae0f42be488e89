"""The fused LM head + cross-entropy (edgetune/compiler/ir/ops/vocab.py, passes/vocab_loss.py):
gradients vs torch.autograd in float64, across several vocabulary slices, and where the
fusion fires and where it must not."""
import pytest
import torch
import torch.nn.functional as F

import edgetune.compiler.ir.ops.vocab as vocab
from edgetune.compiler.frontend.torch import export
from tests.ops.harness import check_grads, t


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 3 words at 6 rows of float64: the online softmax crosses several of them."""
    monkeypatch.setattr(vocab, "SLICE_BYTES", 6 * 8 * 3)


def _targets(shape, classes, ignored=()):
    y = torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(3))
    y.view(-1)[list(ignored)] = -100
    return y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_head_and_cross_entropy(small_slices, reduction):
    def loss(h, w, y):
        return F.cross_entropy(F.linear(h, w), y, reduction=reduction)

    check_grads(loss, t(6, 5), t(11, 5), _targets((6,), 11, ignored=(2,)))


def test_shifted_language_model_loss_with_padding(small_slices):
    # The loss transformers computes: logits at t predict the token at t + 1.
    def loss(h, w, y):
        logits = F.linear(h, w)
        return F.cross_entropy(logits[:, :-1].reshape(-1, w.shape[0]), y[:, 1:].reshape(-1), ignore_index=-100)

    check_grads(loss, t(2, 4, 5), t(10, 5), _targets((2, 4), 10, ignored=(3, 6)))


def test_only_the_hidden_state_trained(small_slices):
    w = t(9, 4, grad=False)
    check_grads(lambda h, y: F.cross_entropy(F.linear(h, w), y), t(6, 4), _targets((6,), 9))


def test_large_logits_do_not_overflow(small_slices):
    # The online log-sum-exp rescales earlier slices: logits of 1000 stay finite.
    check_grads(lambda h, w, y: F.cross_entropy(F.linear(h * 300, w), y), t(6, 4), t(9, 4), _targets((6,), 9))


def _graph(fn, *args):
    class M(torch.nn.Module):
        def forward(self, h, w):
            return h, w

    return export(M(), lambda out, y: fn(*out, y), args[:2], args[2:]).graph


def _ops(fn, *args):
    return [n.op for n in _graph(fn, *args).nodes]


def test_fusion_fires_and_leaves_no_vocabulary_sized_value():
    h, w, y = torch.randn(6, 5), torch.randn(11, 5), _targets((6,), 11)
    ops = _ops(lambda h, w, y: F.cross_entropy(F.linear(h, w), y), h, w, y)
    assert "vocab_log_prob" in ops and "log_softmax" not in ops and "linear" not in ops


def _logits_used_twice(h, w, y):
    logits = F.linear(h, w)
    return F.cross_entropy(logits, y) + logits.square().mean()


@pytest.mark.parametrize("loss", [
    _logits_used_twice,
    lambda h, w, y: F.cross_entropy(F.linear(h, w).t()[:5].t(), y),                      # vocabulary cut
    lambda h, w, y: F.cross_entropy(F.linear(h, w) * 2.0, y),                            # not a plain head
], ids=["logits-reused", "vocab-sliced", "scaled"])
def test_fusion_leaves_other_graphs_alone(loss):
    h, w, y = torch.randn(6, 5), torch.randn(11, 5), _targets((6,), 5)
    assert "vocab_log_prob" not in _ops(loss, h, w, y)


def _fused_head(fn, *args):
    return next(n for n in _graph(fn, *args).nodes if n.op == "vocab_log_prob")


def test_ignored_rows_are_left_out_of_the_head(small_slices):
    # Cross-entropy's ignore_index masks the rows in the loss: the fused head reads the labels
    # unmasked and never computes those rows (half a chat's tokens are its prompt).
    h, w, y = torch.randn(6, 5), torch.randn(11, 5), _targets((6,), 11, ignored=(1, 4))
    assert _fused_head(lambda h, w, y: F.cross_entropy(F.linear(h, w), y), h, w, y).attrs["ignore"] == -100
    assert _fused_head(lambda h, w, y: F.cross_entropy(F.linear(h, w), y, ignore_index=7), h, w, y).attrs["ignore"] == 7


def test_rows_still_counted_in_the_loss_are_computed(small_slices):
    # The target is masked as cross-entropy does, but the loss reads every row (an ignored row
    # counts as word 0): nothing may be left out.
    def loss(h, w, y):
        log_p = F.log_softmax(F.linear(h, w), dim=1)
        return -log_p.gather(1, torch.where(y != -100, y, 0)[:, None]).mean()

    y = _targets((6,), 11, ignored=(1, 4))
    assert _fused_head(loss, torch.randn(6, 5), torch.randn(11, 5), y).attrs.get("ignore") is None
    check_grads(loss, t(6, 5), t(11, 5), y)


def test_the_kernels_skip_ignored_rows_exactly():
    h, w = torch.randn(6, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    labels = _targets((6, 1), 11, ignored=(1, 4))
    learned = labels[:, 0] != -100
    everything = vocab._vocab_log_prob(h, w, labels.clamp(min=0), chunk=3)
    skipping = vocab._vocab_log_prob(h, w, labels, chunk=3, ignore=-100)
    torch.testing.assert_close(skipping[learned], everything[learned])
    assert skipping[~learned].eq(0).all()
    g = torch.randn(6, 6, dtype=torch.float64)
    g_learned = torch.where(learned[:, None], g, 0)  # what the loss's mask sends back
    torch.testing.assert_close(vocab._grad_w(g, h, w, labels, skipping, chunk=3, ignore=-100),
                               vocab._grad_w(g_learned, h, w, labels.clamp(min=0), everything, chunk=3))
    nothing = torch.full((6, 1), -100)
    assert vocab._vocab_log_prob(h, w, nothing, chunk=3, ignore=-100).eq(0).all()
    assert vocab._grad_w(g, h, w, nothing, skipping, chunk=3, ignore=-100).eq(0).all()
