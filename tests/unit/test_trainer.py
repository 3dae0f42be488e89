import copy
import os
import re
import threading

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

import edgetune as et
from edgetune.compiler.frontend.torch import UnsupportedOpError
from edgetune.compiler.memory import BudgetError, parse_bytes
from edgetune.compiler.scheme import SchemeError
from tests.reference import assert_models_match, train_eager
from tests.unit.nets import ConvNet, batch

SCHEME = {"pw.weight": 0.5, "dw.weight": {"ratio": 0.25, "select": "first"}, "*.bias": "full", "head.*": "full"}


def snapshot(model, trainer):
    return copy.deepcopy(model.state_dict()), {k: v.clone() for k, v in trainer.state.items()}


def test_partial_channels_match_eager_with_gradient_masks():
    model = ConvNet().eval()
    ref = copy.deepcopy(model)
    batches = [batch(seed=s) for s in range(3)]
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=SCHEME, optimizer=et.AdamW(lr=0.01))
    before = copy.deepcopy(model.state_dict())
    losses = [trainer.step(*b) for b in batches]
    masks = trainer.trained_masks()
    ref_losses = train_eager(ref, F.cross_entropy, batches, masks,
                             lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01))
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_models_match(model, ref)
    for name, p in model.named_parameters():
        untrained = ~masks[name] if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[untrained], before[name][untrained]), f"{name} changed outside its scheme"
    assert masks["pw.weight"].any(dim=(0, 2, 3)).sum() == 4  # ceil(0.5 * 8) input channels
    assert masks["dw.weight"].any(dim=(1, 2, 3)).tolist() == [True, True] + [False] * 6
    assert trainer.report().trainable_params == sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_adamw_matches_torch_with_and_without_weight_decay(decay):
    model = ConvNet().eval()
    ref = copy.deepcopy(model)
    batches = [batch(seed=s) for s in range(3)]
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme={"*": "full"},
                         optimizer=et.AdamW(lr=0.01, weight_decay=decay))
    losses = [trainer.step(*b) for b in batches]
    everything = {name: torch.ones_like(p, dtype=torch.bool) for name, p in ref.named_parameters()}
    ref_losses = train_eager(ref, F.cross_entropy, batches, everything,
                             lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=decay))
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_models_match(model, ref)


def test_lr_changes_between_steps_without_recompiling():
    model = ConvNet()
    ref = copy.deepcopy(model)
    batches = [batch(seed=s) for s in range(3)]
    lrs = [0.1, 0.01, 0.05]
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=et.schemes.full(),
                         optimizer=et.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3))
    compiled = trainer.compiled
    for b, lr in zip(batches, lrs):
        trainer.lr = lr
        trainer.step(*b)
    assert trainer.compiled is compiled
    train_eager(ref, F.cross_entropy, batches, trainer.trained_masks(),
                lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), lrs)
    assert_models_match(model, ref)


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: ((x[:2],), (y[:2],)), r"input 0 is float32\[2, 3, 8, 8\] .* compiled for float32\[4, 3, 8, 8\]"),
    (lambda x, y: ((x.double(),), (y,)), "input 0 is float64"),
    (lambda x, y: ((x,), (y.int(),)), "target 0 is int32"),
    (lambda x, y: ((x, x), (y,)), "got 2 inputs and 1 targets"),
])
def test_rejected_batch_mutates_nothing(bad, message):
    model = ConvNet().train()
    (x,), (y,) = batch()
    trainer = et.compile(model, F.cross_entropy, (x,), (y,), scheme=SCHEME, optimizer=et.SGD(lr=0.1, momentum=0.9))
    trainer.step((x,), (y,))
    params, state = snapshot(model, trainer)
    with pytest.raises(ValueError, match=message):
        trainer.step(*bad(x, y))
    after_params, after_state = snapshot(model, trainer)
    assert all(torch.equal(params[k], after_params[k]) for k in params)
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert trainer.steps == 1


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cumprod(self.fc(x), dim=1)


def test_unsupported_op_names_op_and_module():
    model = nn.Sequential(nn.Linear(4, 4), Cumulative())
    with pytest.raises(UnsupportedOpError, match=r"aten\.cumprod.*module '1' \(Cumulative\)"):
        et.compile(model, lambda o, t: F.mse_loss(o, t), (torch.randn(2, 4),), (torch.randn(2, 4),))


class _BranchesOnData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class _ReadsData(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + x @ self.b.weight.data.t()


class _PacksSequences(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(1, 4, batch_first=True)

    def forward(self, x):
        lengths = torch.tensor([4, 3])
        _, h = self.rnn(nn.utils.rnn.pack_padded_sequence(x.unsqueeze(-1), lengths, batch_first=True))
        return h[-1]


@pytest.mark.parametrize("in_process", ["0", "1"])
@pytest.mark.parametrize("model, says", [
    (_PacksSequences(), r"pack_padded_sequence reads its lengths.*Pad the sequences"),
    (_BranchesOnData(), r"reads a tensor's value to decide something in Python.*torch\.where"),
    (_ReadsData(), r"through `\.data`.*use `\.detach\(\)` instead"),
    (nn.BatchNorm1d(4, momentum=None).train(), r"BatchNorm with momentum=None"),
])
def test_a_model_torch_export_cannot_trace_gets_an_error_that_says_what_to_change(model, says, in_process,
                                                                                  monkeypatch):
    from edgetune.compiler.frontend.torch import TraceError

    monkeypatch.setenv("EDGETUNE_COMPILE_IN_PROCESS", in_process)  # forked (the default) or not, the same error
    with pytest.raises(TraceError, match=f"(?s)could not trace the model and its loss.*{says}.*torch.export said"):
        et.compile(model, lambda o, t: F.mse_loss(o, t), (torch.randn(2, 4),), (torch.randn(2, 4),))


class _Refuses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] != 5:
            raise ValueError("this model wants 5 features")
        return self.fc(x)


def test_the_models_own_error_under_the_trace_reaches_the_caller_as_it_is():
    with pytest.raises(ValueError, match="^this model wants 5 features$"):
        et.compile(_Refuses(), lambda o, t: F.mse_loss(o, t), (torch.randn(2, 4),), (torch.randn(2, 4),))


def test_a_loss_that_is_a_python_number_is_an_error():
    with pytest.raises(ValueError, match="loss_fn must return a scalar floating-point tensor, got 1.0"):
        et.compile(ConvNet(), lambda out, y: 1.0, *batch())


def test_a_forked_error_whose_message_does_not_pickle_keeps_it():
    from edgetune.compiler.isolate import in_child

    class NeedsCondition(Exception):  # as torch's GuardOnDataDependentSymNode: rebuilt empty by pickle
        def __init__(self, cond, *args):
            super().__init__(*args)
            self.cond = cond

        def __str__(self):
            return f"could not guard on {self.cond}"

    def fail():
        raise NeedsCondition("Eq(u0, 1)")

    with pytest.raises(RuntimeError, match=r"^NeedsCondition: could not guard on Eq\(u0, 1\)\n") as caught:
        in_child(fail)
    assert "in the forked compile" in caught.value.__notes__[0] and "fail" in caught.value.__notes__[0]
    with pytest.raises(ValueError, match="^plain$"):  # one that pickles comes back as itself
        in_child(lambda: (_ for _ in ()).throw(ValueError("plain")))


def test_ratio_on_a_non_conv_weight_is_an_error():
    with pytest.raises(SchemeError, match="'bn.weight' is used by op 'batch_norm'"):
        et.compile(ConvNet(), F.cross_entropy, *batch(), scheme={"bn.weight": 0.5})


def test_state_dict_round_trip_resumes_identically(tmp_path):
    batches = [batch(seed=s) for s in range(4)]
    model = ConvNet().train()
    twin = copy.deepcopy(model)
    opt = et.AdamW(lr=0.01)
    a = et.compile(model, F.cross_entropy, *batches[0], scheme=SCHEME, optimizer=opt)
    for b in batches[:2]:
        a.step(*b)
    path = tmp_path / "ckpt.pt"
    a.save(str(path))
    b_trainer = et.compile(twin, F.cross_entropy, *batches[0], scheme=SCHEME, optimizer=opt)
    b_trainer.load(str(path))
    assert b_trainer.steps == 2
    for b in batches[2:]:
        assert a.step(*b) == b_trainer.step(*b)
    assert_models_match(twin, model, rtol=0, atol=0)


def test_state_without_frozen_weights_holds_only_what_a_step_writes(tmp_path):
    """frozen=False (a run's checkpoint) stores the trained parameters and the buffers; loaded
    into a fresh trainer of the same model and scheme it resumes bitwise."""
    batches = [batch(seed=s) for s in range(4)]
    model = ConvNet().train()
    twin = copy.deepcopy(model)
    scheme = {"pw.weight": 0.5, "head.*": "full"}
    a = et.compile(model, F.cross_entropy, *batches[0], scheme=scheme, optimizer=et.AdamW(lr=0.01))
    for b in batches[:2]:
        a.step(*b)
    state = a.state_dict(frozen=False)
    buffers = {n for n, _ in model.named_buffers()}
    assert set(state["model"]) == {"pw.weight", "head.weight", "head.bias"} | buffers
    from edgetune.compiler.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(state, tmp_path / "run.ckpt")
    b = et.compile(twin, F.cross_entropy, *batches[0], scheme=scheme, optimizer=et.AdamW(lr=0.01))
    b.load(tmp_path / "run.ckpt")
    assert load_checkpoint(tmp_path / "run.ckpt", torch.device("cpu"))["frozen"] is False
    for x in batches[2:]:
        assert a.step(*x) == b.step(*x)
    assert_models_match(twin, model, rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):  # a whole-model state is not a trained-only one
        b.load_state_dict(dict(state, frozen=True))


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    trainer = et.compile(ConvNet(), F.cross_entropy, *batch(), optimizer=et.SGD(lr=0.1, momentum=0.9))
    path = tmp_path / "ckpt.pt"
    trainer.save(str(path))
    old = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(str(path))
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_state_dict_rejects_foreign_state_before_changing_anything():
    model = ConvNet()
    trainer = et.compile(model, F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.SGD(lr=0.1, momentum=0.9))
    other = et.compile(ConvNet(), F.cross_entropy, *batch(), scheme=et.schemes.full(),
                       optimizer=et.SGD(lr=0.1, momentum=0.9))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="optimizer state does not match"):
        trainer.load_state_dict(other.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_mode_batch_norm_updates_running_stats_like_eager():
    model = ConvNet().train()
    ref = copy.deepcopy(model)
    batches = [batch(seed=s) for s in range(3)]
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=et.schemes.bias_only(),
                         optimizer=et.SGD(lr=0.1, momentum=0.9))
    for b in batches:
        trainer.step(*b)
    train_eager(ref, F.cross_entropy, batches, trainer.trained_masks(),
                lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert_models_match(model, ref)
    assert int(model.bn.num_batches_tracked) == 3


def test_frozen_weights_grow_no_weight_gradient():
    trainer = et.compile(ConvNet().eval(), F.cross_entropy, *batch(), scheme=et.schemes.bias_only())
    ops = [n.op for n in trainer.graph.nodes]
    assert "conv_grad_weight" not in ops and "linear_grad_weight" not in ops
    assert ops.count("conv_grad_input") == 2  # back through pw and dw to reach bn's bias; never into stem


class _Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    @torch.no_grad()
    def forward(self, x):
        return self.fc(x)


class _WithFrozenBranches(nn.Module):
    """Branches whose values must pass no gradient: a no_grad block, set_grad_enabled(False),
    and a submodule whose forward is decorated with no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 3), nn.Linear(6, 3), nn.Linear(6, 3)
        self.teacher = _Teacher()

    def forward(self, x):
        with torch.no_grad():
            z = self.b(x)
        with torch.set_grad_enabled(False):
            w = torch.tanh(self.c(x))
        return self.a(x) * (1 + w) + z + self.teacher(x)


def test_values_computed_without_grad_in_the_forward_pass_no_gradient():
    torch.manual_seed(0)
    model = _WithFrozenBranches().double()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 6, dtype=torch.float64)
    batches = [((x + s,), (torch.randint(0, 3, (5,)),)) for s in range(3)]
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=et.schemes.full(),
                         optimizer=et.SGD(lr=0.1, momentum=0.9))
    assert sorted(trainer.trained_masks()) == ["a.bias", "a.weight"]  # nothing else gets a gradient
    before = copy.deepcopy(model.state_dict())
    losses = [trainer.step(*b) for b in batches]
    ref_losses = train_eager(ref, F.cross_entropy, batches, trainer.trained_masks(),
                             lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    assert losses == pytest.approx(ref_losses, rel=1e-12)
    assert_models_match(model, ref, rtol=1e-12, atol=1e-12)
    for name in ("b.weight", "c.weight", "teacher.fc.bias"):
        assert torch.equal(model.state_dict()[name], before[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_when_model_and_batch_are_there():
    model = ConvNet().cuda().train()
    ref = copy.deepcopy(model)
    batches = [tuple(tuple(t.cuda() for t in part) for part in batch(seed=s)) for s in range(3)]
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=SCHEME, optimizer=et.AdamW(lr=0.01))
    losses = [trainer.step(*b) for b in batches]
    ref_losses = train_eager(ref, F.cross_entropy, batches, trainer.trained_masks(),
                             lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01))
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert_models_match(model, ref)


def test_forked_and_in_process_compiles_agree(monkeypatch):
    def run():
        torch.manual_seed(0)
        model = ConvNet()
        trainer = et.compile(model, F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.SGD(lr=0.1, momentum=0.9))
        return trainer.compiled.source, [trainer.step(*batch(seed=s)) for s in range(2)], model.state_dict()

    forked = run()
    monkeypatch.setenv("EDGETUNE_COMPILE_IN_PROCESS", "1")
    local = run()
    assert forked[0] == local[0] and forked[1] == local[1]
    assert all(torch.equal(a, b) for a, b in zip(forked[2].values(), local[2].values()))


def test_no_fork_while_another_thread_runs():
    """A fork copies the locks other threads hold (an import's module lock, say) and never
    their releases: with a Flower server thread or a Ray actor's threads alive, edgetune
    compiles and measures in-process instead."""
    from edgetune.compiler.backends.scratch import can_measure
    from edgetune.compiler.isolate import run_isolated

    cpu = torch.device("cpu")
    from tqdm import tqdm

    tqdm(range(3), disable=True)  # a progress bar's monitor thread is stopped, not a reason to stay in-process
    assert any(t.name == "tqdm_monitor" for t in threading.enumerate())
    assert run_isolated(os.getpid, cpu) != os.getpid() and can_measure(cpu)  # alone: a forked child
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        assert run_isolated(os.getpid, cpu) == os.getpid() and not can_measure(cpu)
        model = ConvNet()
        et.compile(model, F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.SGD(lr=0.1)).step(*batch())
    finally:
        release.set()
        other.join()


def test_a_loss_that_is_not_a_scalar_is_an_error():
    with pytest.raises(ValueError, match="loss_fn must return a scalar floating-point tensor"):
        et.compile(ConvNet(), lambda out, y: F.cross_entropy(out, y, reduction="none"), *batch())


@pytest.mark.parametrize("make, message", [
    (lambda: et.SGD(lr=-0.1), "SGD lr must be >= 0"),
    (lambda: et.SGD(lr=0.1, nesterov=True), "nesterov needs momentum > 0"),
    (lambda: et.AdamW(lr=1e-3, betas=(0.9, 1.0)), "betas must be in"),
])
def test_bad_optimizer_settings_are_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_memory_budget_refuses_a_step_predicted_over_it_before_allocating_it():
    model, data = ConvNet().eval(), batch(n=16, size=32)
    before = copy.deepcopy(model.state_dict())
    fits = et.compile(model, F.cross_entropy, *data, scheme=et.schemes.full(), optimizer=et.SGD(lr=0.1, momentum=0.9))
    peak = fits.report().predicted_peak_bytes
    assert et.compile(model, F.cross_entropy, *data, scheme=et.schemes.full(), optimizer=et.SGD(lr=0.1, momentum=0.9),
                      memory_budget=peak).report().predicted_peak_bytes == peak  # exactly at the budget: fits
    with pytest.raises(BudgetError) as refused:
        et.compile(model, F.cross_entropy, *data, scheme=et.schemes.full(), optimizer=et.SGD(lr=0.1, momentum=0.9),
                   memory_budget=peak - 1)
    message = str(refused.value)
    top = fits.plan.peak_by_layer()
    assert f"predicted peak is {peak / 2**20:.2f} MB" in message and top[0][0] in message
    assert "pw.weight" in message and "edgetune search --budget" in message
    assert sum(n for _, n in top) == peak  # the layers account for the whole peak
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_budgets_are_read_in_mb_of_two_to_the_twentieth():
    assert parse_bytes("64MB") == parse_bytes("64 mib") == 64 * 2**20 and parse_bytes(1000) == 1000
    assert parse_bytes("1.5GB") == int(1.5 * 2**30)
    for bad in ("lots", "-1MB", 0):
        with pytest.raises(ValueError, match="budget"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match=r"the budget '12' has no unit: write 12MB \(or KB, GB; B for bytes\)"):
        parse_bytes("12")
    assert parse_bytes("12B") == 12


def test_the_budget_hint_is_a_budget_the_cli_reads_back():
    from edgetune.compiler.trainer import _budget_text

    for budget in (12, 3000, 2**20, 40 * 2**20 + 12345, 3 * 2**30):
        assert parse_bytes(_budget_text(budget)) >= budget * 0.999  # never rounded to 0MB
    assert _budget_text(12) == "1KB" and _budget_text(64 * 2**20) == "64MB"


def test_a_checkpoint_is_safetensors_and_loads_without_unpickling(tmp_path, monkeypatch):
    from safetensors import safe_open

    trainer = et.compile(ConvNet(), F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.AdamW(lr=0.01))
    trainer.step(*batch())
    path = tmp_path / "ckpt.safetensors"
    trainer.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "edgetune-checkpoint" and f.metadata()["step"] == "1"
    other = et.compile(ConvNet(), F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.AdamW(lr=0.01))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a checkpoint must not be unpickled"))
    other.load(path)
    assert other.steps == 1 and all(torch.equal(v, other.state[k]) for k, v in trainer.state.items())


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a checkpoint at all"), "not a checkpoint at all"),
    (lambda p: safetensors.torch.save_file({"w": torch.zeros(2)}, str(p)), "not an edgetune checkpoint"),
    (lambda p: torch.save({"step": 1}, str(p)), "torch.load(path, weights_only=True)"),
])
def test_a_file_that_is_not_a_checkpoint_is_refused_with_nothing_changed(tmp_path, make, message):
    model = ConvNet()
    trainer = et.compile(model, F.cross_entropy, *batch(), scheme=SCHEME, optimizer=et.SGD(lr=0.1, momentum=0.9))
    before = snapshot(model, trainer)
    path = tmp_path / "bad.ckpt"
    make(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.load(path)
    after = snapshot(model, trainer)
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())
    assert trainer.steps == 0


def test_a_checkpoint_of_another_model_is_refused_before_anything_loads(tmp_path):
    class Wider(ConvNet):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 5)

    other = et.compile(Wider(), F.cross_entropy, *batch(), scheme={"head.*": "full"}, optimizer=et.SGD(lr=0.1))
    other.save(tmp_path / "wider.ckpt")
    model = ConvNet()
    trainer = et.compile(model, F.cross_entropy, *batch(), scheme={"head.*": "full"}, optimizer=et.SGD(lr=0.1))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"model weights 'head\.(weight|bias)' has shape"):
        trainer.load(tmp_path / "wider.ckpt")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- non-finite steps ---------------------------------------------------------------------------

def _nan_in(trainer, op):
    """Make every call of one op in the compiled step return NaN in its first entry (an
    injected fault), through its generic kernel and those bound to one node. Returns the
    real kernels by name, for putting back."""
    namespace = trainer.compiled.fn.__globals__
    names = [name for name, of in trainer.compiled.kernel_ops.items() if of == op]
    real = {name: namespace[name] for name in names}
    assert any(name in trainer.compiled.source for name in names), f"the step calls no {op}"

    def faulty(kernel):
        def call(*args, **kwargs):
            out = kernel(*args, **kwargs)
            out[(0,) * out.dim()] = float("nan")  # the first entry, whatever the layout
            return out
        return call

    namespace.update({name: faulty(kernel) for name, kernel in real.items()})
    return real


def _guarded(on_nonfinite="skip", mode="eval", optimizer=None):
    model = ConvNet().train(mode == "train")
    scheme = {"pw.weight": "full", "head.*": "full", "bn.bias": "full"}
    trainer = et.compile(model, F.cross_entropy, *batch(), scheme=scheme,
                         optimizer=optimizer or et.AdamW(lr=0.1), on_nonfinite=on_nonfinite)
    trainer.step(*batch(seed=1))  # optimizer state is not all zeros
    return model, trainer


def test_a_nan_loss_skips_every_update_and_buffer_write():
    model, trainer = _guarded(mode="train")
    before = snapshot(model, trainer)
    real = _nan_in(trainer, "conv")  # a NaN in the forward (a batch with one is refused before the step)
    loss = trainer.step(*batch(seed=2))
    trainer.compiled.fn.__globals__.update(real)
    assert loss != loss and trainer.last_step.skipped == trainer.last_step.writes == 4 + 6  # 6 BN buffers
    after = snapshot(model, trainer)
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())  # BN running stats too
    assert all(torch.equal(v, after[1][k]) for k, v in before[1].items())
    assert trainer.step(*batch(seed=3)) == trainer.last_step.loss and trainer.last_step.skipped == 0


def test_a_nan_gradient_skips_only_its_own_update():
    model, trainer = _guarded()
    before = snapshot(model, trainer)
    _nan_in(trainer, "conv_grad_weight")  # pw.weight's gradient
    trainer.step(*batch(seed=2))
    after = snapshot(model, trainer)
    assert trainer.last_step.skipped == 1
    assert torch.equal(after[0]["pw.weight"], before[0]["pw.weight"])
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1] if k.startswith("pw.weight:"))
    assert not torch.equal(after[0]["head.weight"], before[0]["head.weight"])  # the rest trained
    assert all(torch.isfinite(v).all() for v in after[0].values())


def test_a_nan_activation_skips_the_step():
    model, trainer = _guarded()
    before = snapshot(model, trainer)
    _nan_in(trainer, "hardtanh_inplace")  # the ReLU6 output
    trainer.step(*batch(seed=2))
    assert trainer.last_step.skipped == trainer.last_step.writes == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before[0].items())


def test_raise_changes_nothing_even_where_other_gradients_were_finite():
    model, trainer = _guarded("raise", optimizer=et.SGD(lr=0.1, momentum=0.9))
    before = snapshot(model, trainer)
    _nan_in(trainer, "conv_grad_weight")
    with pytest.raises(et.NonFiniteError, match="step 2: the loss or a gradient is NaN or infinite; nothing was"):
        trainer.step(*batch(seed=2))
    after = snapshot(model, trainer)
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())
    assert all(torch.equal(v, after[1][k]) for k, v in before[1].items())
    assert trainer.steps == 1


def test_apply_lets_the_nan_through_and_the_modes_train_alike():
    model, trainer = _guarded("apply")
    _nan_in(trainer, "conv_grad_weight")
    trainer.step(*batch(seed=2))
    assert torch.isnan(model.state_dict()["pw.weight"]).any()
    losses = {}
    for mode in ("skip", "raise", "apply"):
        torch.manual_seed(0)
        _, t = _guarded(mode)
        losses[mode] = [t.step(*batch(seed=s)) for s in range(2, 5)]
    assert losses["skip"] == losses["raise"] == losses["apply"]
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        et.compile(ConvNet(), F.cross_entropy, *batch(), on_nonfinite="ignore")
