"""Hostile inputs to the Trainer: each is refused with one clear line naming what is wrong,
before anything changes in memory (parameters, buffers, optimizer state, step count) or on disk."""
import copy
import json
import re
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler import scheme as schemes
from edgetune.compiler.inputs import BatchError
from edgetune.compiler.scheme import SchemeError
from tests.unit.nets import ConvNet, batch


@pytest.fixture(autouse=True, scope="module")
def _compile_in_process():
    # A forked compile re-imports torch.export in every child (seconds each); the in-process
    # compile is the same (tests/unit/test_trainer.py checks that).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGETUNE_COMPILE_IN_PROCESS", "1")
        yield


def snapshot(model, trainer):
    """Everything a step or a load could change."""
    return (copy.deepcopy(model.state_dict()), {k: v.clone() for k, v in trainer.state.items()},
            trainer.steps, trainer.lr)


def assert_unchanged(before, model, trainer):
    after = snapshot(model, trainer)
    for b, a in zip(before[:2], after[:2]):
        assert b.keys() == a.keys()
        changed = [k for k in b if not torch.equal(b[k], a[k])]
        assert not changed, f"changed: {changed}"
    assert before[2:] == after[2:], "step count or lr changed"


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


class Tokens(nn.Module):
    """A batch-norm'd float input and token ids through an embedding: in train mode the norm's
    running statistics are written in the forward, before the embedding reads the ids."""

    def __init__(self, vocab=10, classes=5):
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.emb = nn.Embedding(vocab, 6)
        self.fc = nn.Linear(6, classes)

    def forward(self, x, ids):
        return self.fc(self.bn(x) + self.emb(ids).mean(1))


def tokens_trainer(on_nonfinite="skip", loss_fn=F.cross_entropy):
    torch.manual_seed(0)
    model = Tokens().train()
    x, ids, y = torch.randn(3, 6), torch.randint(0, 10, (3, 4)), torch.randint(0, 5, (3,))
    trainer = et.compile(model, loss_fn, (x, ids), (y,), scheme={"*": "full"},
                         optimizer=et.AdamW(lr=0.1), on_nonfinite=on_nonfinite)
    trainer.step((x, ids), (y,))  # optimizer state is not all zeros
    return model, trainer, (x, ids, y)


# -- 1. a scheme pattern with a typo --------------------------------------------------------

def test_a_misspelt_pattern_suggests_the_closest_parameter_names():
    with pytest.raises(SchemeError) as err:
        et.compile(ConvNet(), F.cross_entropy, *batch(), scheme={"*.bias": "full", "haed.weight": "full"})
    message = one_line(err)
    assert "'haed.weight' matches no parameter" in message and "did you mean 'head.weight'" in message


def test_a_misspelt_module_pattern_suggests_the_module_pattern():
    with pytest.raises(SchemeError, match=r"did you mean 'head\.\*'"):
        schemes.resolve({"heda.*": "full"}, ConvNet())


def test_a_pattern_like_nothing_shows_what_names_look_like():
    with pytest.raises(SchemeError) as err:
        schemes.resolve({"transformer.h.0.attn.weight": "full"}, ConvNet())
    assert "did you mean" not in one_line(err) and "names look like ['stem.weight'" in str(err.value)


def test_a_misspelt_pattern_in_a_scheme_file_is_refused_before_the_model_changes(tmp_path):
    path = tmp_path / "scheme.json"
    path.write_text(json.dumps({"*.bias": "full", "pw.wieght": 0.5}))
    model = ConvNet()
    before = copy.deepcopy(model.state_dict())
    for scheme in (schemes.from_file(str(path)), schemes.parse(str(path))):
        with pytest.raises(SchemeError, match=r"'pw\.wieght' matches no parameter.*did you mean 'pw\.weight'"):
            et.compile(model, F.cross_entropy, *batch(), scheme=scheme)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- 2. NaN or inf in the batch ---------------------------------------------------------------

@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_a_batch_with_nan_or_inf_is_refused_before_anything_changes(on_nonfinite):
    model, trainer, (x, ids, y) = tokens_trainer(on_nonfinite)
    before = snapshot(model, trainer)
    bad = x.clone()
    bad[1, 2], bad[2, 0], bad[2, 5] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(BatchError) as err:
        trainer.step((bad, ids), (y,))
    message = one_line(err)
    assert "input 0 has 3 non-finite entries (1 NaN, 2 inf) of 18, the first at [1, 2]" in message
    assert "on_nonfinite='apply'" in message
    assert_unchanged(before, model, trainer)
    assert trainer.step((x, ids), (y,)) == trainer.last_step.loss  # the trainer still works


class _MaskedEncoder(nn.Module):
    """An encoder layer under a causal mask given with the batch (PyTorch's 0 / -inf encoding),
    and a second float input added to the data."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, x, mask, shift):
        return self.layer(x + shift, src_mask=mask)


def test_an_attention_mask_may_hold_minus_inf_but_no_nan_or_plus_inf(tmp_path):
    """-inf in an input the step reads only as an attention mask is the mask's meaning, not bad
    data: the step trains as eager does; NaN and +inf there, and -inf anywhere else, are refused.
    The exported step's runner reads the same from the manifest."""
    from edgetune.compiler.inputs import mask_inputs
    from edgetune.runtime import RunnerError, StepRunner

    torch.manual_seed(0)
    model = _MaskedEncoder().eval()
    reference = copy.deepcopy(model)
    x, shift, y = torch.randn(2, 5, 8), torch.zeros(2, 5, 8), torch.randn(2, 5, 8)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    trainer = et.compile(model, F.mse_loss, (x, mask, shift), (y,), optimizer=et.SGD(0.1))
    assert mask_inputs(trainer.graph) == {1}
    assert trainer.step((x, mask, shift), (y,)) == pytest.approx(F.mse_loss(reference(x, mask, shift), y).item(), rel=1e-6)
    before = snapshot(model, trainer)
    for bad, says in ((float("nan"), r"input 1 has 1 non-finite entry \(1 NaN, 0 \+inf\)"),
                      (float("inf"), r"input 1 has 1 non-finite entry \(0 NaN, 1 \+inf\)")):
        wrong = mask.clone()
        wrong[0, 0] = bad
        with pytest.raises(BatchError, match=says):
            trainer.step((x, wrong, shift), (y,))
    minus_inf = shift.clone()
    minus_inf[0, 0, 0] = float("-inf")
    with pytest.raises(BatchError, match=r"input 2 has 1 non-finite entry \(0 NaN, 1 inf\)"):
        trainer.step((x, mask, minus_inf), (y,))
    assert_unchanged(before, model, trainer)

    trainer.export_onnx(tmp_path)
    runner = StepRunner(tmp_path)
    runner.step(x.numpy(), mask.numpy(), shift.numpy(), y.numpy())
    wrong = mask.clone().numpy()
    wrong[0, 0] = float("nan")
    with pytest.raises(RunnerError, match=r"args_1\) has 1 NaN or infinite entries"):
        runner.step(x.numpy(), wrong, shift.numpy(), y.numpy())


class _HandWrittenAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, mask):
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 8 ** 0.5
        return torch.softmax(scores + mask, -1) @ self.v(x)


def test_a_mask_added_to_hand_written_scores_may_hold_minus_inf_too():
    torch.manual_seed(0)
    model = _HandWrittenAttention()
    reference = copy.deepcopy(model)
    x, y, mask = torch.randn(2, 5, 8), torch.randn(2, 5, 8), nn.Transformer.generate_square_subsequent_mask(5)
    trainer = et.compile(model, F.mse_loss, (x, mask), (y,), optimizer=et.SGD(0.1))
    assert trainer.step((x, mask), (y,)) == pytest.approx(F.mse_loss(reference(x, mask), y).item(), rel=1e-6)


def test_a_non_finite_float_target_is_refused_too():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    trainer = et.compile(model, F.mse_loss, (torch.randn(3, 4),), (torch.randn(3, 2),))
    before = snapshot(model, trainer)
    y = torch.randn(3, 2)
    y[0, 1] = float("nan")
    with pytest.raises(BatchError, match=r"^target 0 has 1 non-finite entry \(1 NaN, 0 inf\) of 6, the first at \[0, 1\]"):
        trainer.step((torch.randn(3, 4),), (y,))
    assert_unchanged(before, model, trainer)


def test_a_finite_batch_whose_sum_overflows_is_accepted():
    model, trainer, (x, ids, y) = tokens_trainer("skip")
    before = snapshot(model, trainer)
    huge = torch.full_like(x, 3e38)  # every entry finite; their float32 sum is inf
    trainer.step((huge, ids), (y,))  # runs: the step's own guard then skips what overflowed
    assert trainer.last_step.skipped == trainer.last_step.writes
    assert all(torch.equal(v, before[0][k]) for k, v in model.state_dict().items())


def test_apply_lets_a_non_finite_batch_through():
    model, trainer, (x, ids, y) = tokens_trainer("apply")
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert trainer.step((bad, ids), (y,)) != trainer.step((x, ids), (y,))  # NaN != anything
    assert torch.isnan(model.fc.weight).any()


def test_the_finite_check_is_cheap_next_to_a_step():
    """The check reads each float batch tensor once; on the smallest model here (a step of a few
    dozen microseconds of kernels) it must stay a small part of the step."""
    model = ConvNet().train()
    (x,), (y,) = batch(n=8, size=32)
    trainer = et.compile(model, F.cross_entropy, (x,), (y,), optimizer=et.SGD(lr=0.01, momentum=0.9))
    check, step = _best_time(lambda: trainer._check_batch((x,), (y,))), _best_time(lambda: trainer.step((x,), (y,)))
    assert check < 0.1 * step, f"batch check {check * 1e6:.0f} us vs step {step * 1e6:.0f} us"


def _best_time(fn, repeats=10):
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# -- 3. token ids and class labels out of range ---------------------------------------------

@pytest.mark.parametrize("on_nonfinite", ["skip", "apply"])
@pytest.mark.parametrize("bad_id, shown", [(10, "10"), (-1, "-1"), (1_000_000, "1000000")])
def test_a_token_id_outside_the_vocabulary_is_refused_before_the_step(on_nonfinite, bad_id, shown):
    model, trainer, (x, ids, y) = tokens_trainer(on_nonfinite)
    before = snapshot(model, trainer)
    bad = ids.clone()
    bad[1, 2] = bad_id
    with pytest.raises(BatchError) as err:
        trainer.step((x, bad), (y,))
    message = one_line(err)
    assert f"input 1 holds {shown} at [1, 2]" in message and "embedding 'emb' of 10 rows" in message
    assert "[0, 10)" in message and "vocabulary" in message
    assert_unchanged(before, model, trainer)  # with "apply" the norm's statistics were written before


@pytest.mark.parametrize("on_nonfinite", ["skip", "apply"])
@pytest.mark.parametrize("bad_class", [5, -1, -99])
def test_a_class_label_out_of_range_is_refused_and_ignore_index_is_not(on_nonfinite, bad_class):
    model, trainer, (x, ids, y) = tokens_trainer(on_nonfinite)
    before = snapshot(model, trainer)
    bad = y.clone()
    bad[0] = bad_class
    with pytest.raises(BatchError) as err:
        trainer.step((x, ids), (bad,))
    message = one_line(err)
    assert f"target 0 holds {bad_class} at [0]" in message and "[0, 5)" in message and "-100 (ignored)" in message
    assert_unchanged(before, model, trainer)
    ignored = y.clone()
    ignored[0] = -100
    trainer.step((x, ids), (ignored,))  # cross-entropy's ignore_index is a valid label


def test_a_custom_ignore_index_is_the_one_allowed():
    model, trainer, (x, ids, y) = tokens_trainer(loss_fn=lambda out, t: F.cross_entropy(out, t, ignore_index=7))
    ok, bad = y.clone(), y.clone()
    ok[0], bad[0] = 7, -100
    trainer.step((x, ids), (ok,))
    with pytest.raises(BatchError, match=r"target 0 holds -100 at \[0\].*or 7 \(ignored\)"):
        trainer.step((x, ids), (bad,))


def test_a_negative_label_on_a_fused_lm_head_is_refused_not_read_as_the_last_class():
    """A bias-free head before cross-entropy is fused into vocab_log_prob, which indexes the
    head's rows with the labels: unchecked, -1 silently trains the last class."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Flatten(0, 1), nn.Linear(6, 10, bias=False))
    ids, y = torch.randint(0, 10, (2, 4)), torch.randint(0, 10, (8,))
    trainer = et.compile(model, F.cross_entropy, (ids,), (y,), optimizer=et.SGD(lr=0.1, momentum=0.9))
    assert "vocab_log_prob" in [n.op for n in trainer.graph.nodes]
    before = snapshot(model, trainer)
    bad = y.clone()
    bad[5] = -1
    with pytest.raises(BatchError, match=r"^target 0 holds -1 at \[5\], out of range for the loss's 10 classes"):
        trainer.step((ids,), (bad,))
    assert_unchanged(before, model, trainer)


def test_index_bounds_come_from_the_compiled_graph():
    _, trainer, _ = tokens_trainer()
    uses = sorted((u.position, u.size, tuple(u.ignored)) for u in trainer._index_uses)
    assert uses == [(1, 10, ()), (2, 5, (-100,))]


# -- 4. truncated, corrupted and foreign checkpoints ----------------------------------------
# (tests/unit/test_trainer.py covers a file that is not safetensors at all, a safetensors file
# without edgetune's metadata, a torch.save file and a checkpoint of a model with other shapes.)

SCHEME = {"*.bias": "full", "head.*": "full"}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    """The bytes of a checkpoint a step along."""
    torch.manual_seed(0)
    source = et.compile(ConvNet(), F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.SGD(lr=0.1, momentum=0.9))
    source.step(*batch())
    path = tmp_path_factory.mktemp("good") / "good.ckpt"
    source.save(path)
    return path.read_bytes()


@pytest.fixture
def saved(good_checkpoint):
    """A good checkpoint's bytes, and a fresh trainer of the same model and scheme to load into."""
    model = ConvNet()
    target = et.compile(model, F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.SGD(lr=0.1, momentum=0.9))
    return good_checkpoint, model, target


def _header_length(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


CORRUPTIONS = {
    "empty": lambda d: b"",
    "cut in half": lambda d: d[: len(d) // 2],
    "last byte cut": lambda d: d[:-1],
    "header length flipped": lambda d: bytes([d[0] ^ 0xFF]) + d[1:],
    "header's first byte flipped": lambda d: d[:8] + bytes([d[8] ^ 0xFF]) + d[9:],
    "header's last byte flipped": lambda d: (d[: _header_length(d) - 1] + bytes([d[_header_length(d) - 1] ^ 0xFF])
                                             + d[_header_length(d):]),
    "a tensor name changed": lambda d: d.replace(b'"model/head.bias"', b'"model/head.bios"', 1),
    "a byte of tensor data flipped": lambda d: d[:-3] + bytes([d[-3] ^ 0x01]) + d[-2:],
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_truncated_or_corrupted_checkpoint_is_refused_with_nothing_changed(saved, tmp_path, corruption):
    data, model, trainer = saved
    path = tmp_path / "bad.ckpt"
    path.write_bytes(CORRUPTIONS[corruption](data))
    before = snapshot(model, trainer)
    with pytest.raises(ValueError) as err:
        trainer.load(path)
    assert str(path) in one_line(err) or "head.bios" in str(err.value)
    assert_unchanged(before, model, trainer)
    assert path.read_bytes() == CORRUPTIONS[corruption](data)  # loading never writes


DAMAGED_HEADERS = {  # still valid JSON, so safetensors reads them
    "a section name flipped": lambda d: d.replace(b'"optimizer/', b'"optimIzer/', 1),
    "the step made not a number": lambda d: d.replace(b'"step":"1"', b'"step":"q"', 1),
}


@pytest.mark.parametrize("corruption", DAMAGED_HEADERS)
def test_a_corrupted_header_that_is_still_valid_json_names_the_file(saved, tmp_path, corruption):
    data, model, trainer = saved
    path = tmp_path / "bad.ckpt"
    corrupted = DAMAGED_HEADERS[corruption](data)
    assert corrupted != data and len(corrupted) == len(data)
    path.write_bytes(corrupted)
    before = snapshot(model, trainer)
    try:
        with pytest.raises(ValueError, match=re.escape(str(path))):
            trainer.load(path)
    finally:
        assert_unchanged(before, model, trainer)


def test_a_checkpoint_of_another_scheme_is_refused_with_nothing_changed(saved, tmp_path):
    _, model, trainer = saved
    other = et.compile(ConvNet(), F.cross_entropy, *batch(), scheme={"pw.weight": 0.5, "head.*": "full"},
                       optimizer=et.SGD(lr=0.1, momentum=0.9))
    other.step(*batch())
    other.save(tmp_path / "other-scheme.ckpt")
    from edgetune.compiler.checkpoint import save_checkpoint

    save_checkpoint(other.state_dict(frozen=False), tmp_path / "other-scheme-run.ckpt")
    before = snapshot(model, trainer)
    with pytest.raises(ValueError, match=r"optimizer state does not match this trainer: missing \['bn\.bias:"):
        trainer.load(tmp_path / "other-scheme.ckpt")
    with pytest.raises(ValueError, match=r"model weights does not match this trainer: missing \['bn\.bias'"):
        trainer.load(tmp_path / "other-scheme-run.ckpt")
    assert_unchanged(before, model, trainer)


def test_a_checkpoint_of_a_model_with_other_names_is_refused_with_nothing_changed(saved, tmp_path):
    _, model, trainer = saved
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    other = et.compile(mlp, F.cross_entropy, *batch(), optimizer=et.SGD(lr=0.1, momentum=0.9))
    other.save(tmp_path / "mlp.ckpt")
    before = snapshot(model, trainer)
    with pytest.raises(ValueError, match=r"model weights does not match this trainer: missing \['bn\.bias'.*"
                                         r"unexpected \['1\.bias', '1\.weight'\]"):
        trainer.load(tmp_path / "mlp.ckpt")
    assert_unchanged(before, model, trainer)
