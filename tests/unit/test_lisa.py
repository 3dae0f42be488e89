"""LISA over compiled steps (edgetune.apps.lisa): against an eager PyTorch run of the same
algorithm, its sampling, what a period changes, checkpoints, and finetune-lm --lisa-layers."""
import copy
import json
import os

import pytest
import torch

import edgetune as et
from edgetune.apps.lisa import LisaError, LisaTrainer, lisa, lisa_lm, lm_always, lm_blocks, scheme_for
from edgetune.apps.lm import evaluate_lm, load_lm
from edgetune.cli import main
from edgetune.models.hf import causal_lm_loss, tiny_causal_lm
from edgetune.models.llama import Llama
from tests.reference import assert_models_match, padded_lm_batches, train_eager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EMBEDDING = "model.embed_tokens.weight"  # also the tied LM head's: named_parameters names it once
# eps well above float64 noise: the compiled step's gradients differ from eager ones by ~1e-11
# (so do a plain compiled step's, LISA aside), and Adam divides by sqrt(v) + eps, which turns
# such noise on near-zero gradients into updates of lr * noise / eps.
BETAS, EPS, DECAY = (0.9, 0.99), 1e-4, 0.01


def four_block_lm():
    return tiny_causal_lm("llama", num_hidden_layers=4).double()


def lisa_on(model, batches, layers, interval, seed=0, lr=1e-2, **kw):
    (inputs, targets) = batches[0]
    return lisa(model, causal_lm_loss, inputs, targets, et.AdamW(lr=lr, betas=BETAS, eps=EPS, weight_decay=DECAY),
                layers=layers, interval=interval, seed=seed, **kw)


def in_block(block):
    return lambda name: name.startswith(block + ".")


def eager_lisa(model, batches, lrs, interval, blocks_of_period):
    """Algorithm 1 in plain PyTorch: each period a fresh torch.optim.AdamW over the embedding
    (tied to the head) and the period's blocks, run for `interval` steps at the global rates."""
    losses = []
    for start in range(0, len(batches), interval):
        blocks = blocks_of_period(start // interval)
        names = [n for n, _ in model.named_parameters() if n == EMBEDDING or any(in_block(b)(n) for b in blocks)]
        masks = {n: torch.ones((), dtype=torch.bool) for n in names}
        losses += train_eager(model, causal_lm_loss, batches[start:start + interval], masks,
                              lambda ps: torch.optim.AdamW(ps, lr=1.0, betas=BETAS, eps=EPS, weight_decay=DECAY),
                              lrs=lrs[start:start + interval])
    return losses


@pytest.mark.parametrize("model_fn, layers, interval", [
    (four_block_lm, 1, 3),                                  # another block most periods
    (lambda: load_lm("tiny-llama").model.double(), 2, 2),   # both blocks every period: a cached step restarts
], ids=["four-blocks", "tiny-llama-both-blocks"])
def test_lisa_matches_an_eager_run_of_algorithm_1(model_fn, layers, interval):
    model = model_fn()
    reference = copy.deepcopy(model)
    batches = padded_lm_batches(n=3 * interval)
    lrs = [1e-2 * (1 - k / 12) for k in range(len(batches))]  # a global schedule, not restarted per period
    trainer = lisa_on(model, batches, layers, interval)
    losses = []
    for (inputs, targets), lr in zip(batches, lrs):
        trainer.lr = lr
        losses.append(trainer.step(inputs, targets))
    want = eager_lisa(reference, batches, lrs, interval, trainer.sample)
    assert losses == pytest.approx(want, rel=1e-7)
    assert_models_match(model, reference, rtol=1e-5, atol=1e-6)
    assert trainer.steps == len(batches) and len(trainer.compile_seconds) <= 3


def test_sampling_is_the_seed_and_period_alone_and_exactly_layers_blocks():
    batches = padded_lm_batches(n=1)
    trainer = lisa_on(four_block_lm(), batches, layers=2, interval=2, seed=7)
    periods = range(60)
    drawn = [trainer.sample(p) for p in periods]
    assert all(len(set(d)) == 2 and set(d) <= set(trainer.blocks) for d in drawn)
    assert not any(a in d or any(b.startswith(a + ".") for b in d) for d in drawn for a in trainer.always)
    assert len({tuple(d) for d in drawn}) > 3                          # differs across periods
    assert set().union(*drawn) == set(trainer.blocks)                  # every block gets its turn
    trainer.step(*batches[0]), trainer.step(*batches[0]), trainer.step(*batches[0])
    again = lisa_on(four_block_lm(), batches, layers=2, interval=5, seed=7)
    assert [again.sample(p) for p in periods] == drawn == [trainer.sample(p) for p in periods]
    other = lisa_on(four_block_lm(), batches, layers=2, interval=2, seed=8)
    assert [other.sample(p) for p in periods] != drawn


def test_a_period_changes_the_always_on_modules_and_its_blocks_alone():
    model = four_block_lm()
    batches = padded_lm_batches(n=9)
    trainer = lisa_on(model, batches, layers=1, interval=3, seed=1)
    assert trainer.always == ["model.embed_tokens", "lm_head"]
    assert len({tuple(trainer.sample(p)) for p in range(3)}) > 1  # more than one active set in these 3 periods
    ever = set()
    for k, (inputs, targets) in enumerate(batches):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.step(inputs, targets)
        active = trainer.sample(k // 3)
        ever |= set(active)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert EMBEDDING in changed
        want = {n for n in before if n == EMBEDDING or any(in_block(b)(n) for b in active)}
        assert changed == want, f"step {k + 1}: {sorted(changed ^ want)}"
        assert set(trainer.rules) == {n for n in before if n == EMBEDDING or any(in_block(b)(n) for b in ever)}
    assert trainer.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in scheme_for(
        model, trainer.always + trainer.sample(2)))


def test_each_period_starts_its_optimizer_over_and_a_parked_step_holds_no_state():
    model = load_lm("tiny-llama").model
    batches = padded_lm_batches(n=4)
    trainer = lisa_on(model, batches, layers=2, interval=2, lr=1e-3)  # 2 of 2 blocks: one cached step throughout
    trainer.step(*batches[0]), trainer.step(*batches[1])
    assert trainer.active.steps == 2
    assert trainer.state_dict()["optimizer"] == {}  # at a period's end: the next period starts over
    trainer.step(*batches[2])
    assert trainer.active.steps == 1 and len(trainer.compile_seconds) == 1
    # the state after one step from zero moments: exp_avg = (1 - beta1) * grad, exp_avg_sq = (1 - beta2) * grad^2
    state = trainer.active.state
    m, v = state[f"{EMBEDDING}:exp_avg"], state[f"{EMBEDDING}:exp_avg_sq"]
    torch.testing.assert_close(v, m.square() / (1 - BETAS[0]) ** 2 * (1 - BETAS[1]), rtol=1e-4, atol=1e-12)

    two_sets = lisa_on(four_block_lm(), padded_lm_batches(n=1), layers=1, interval=1, seed=1, cache=2)
    for _ in range(6):
        two_sets.step(*padded_lm_batches(n=1)[0])
    parked = [t for t in two_sets._cache.values() if t is not two_sets.active]
    assert len(two_sets._cache) <= 2 and parked and all(s.numel() == 0 for t in parked for s in t.state.values())
    assert all(s.numel() > 0 for s in two_sets.active.state.values())


def test_a_checkpoint_mid_period_resumes_to_the_uninterrupted_run():
    batches = padded_lm_batches(n=8)
    whole, resumed_model = four_block_lm(), four_block_lm()
    first = lisa_on(whole, batches, layers=1, interval=3, seed=3)
    for inputs, targets in batches[:4]:
        first.step(inputs, targets)
    saved = first.state_dict(frozen=False)
    assert saved["optimizer"] and "model.norm.weight" not in saved["model"]  # the final norm never trains
    second = lisa_on(resumed_model, batches, layers=1, interval=3, seed=3)
    second.load_state_dict(saved)
    assert second.period == 1 and second.active.steps == 1
    for inputs, targets in batches[4:]:
        assert second.step(inputs, targets) == first.step(inputs, targets)
    assert_models_match(resumed_model, whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit this LISA run"):
        lisa_on(four_block_lm(), batches, layers=2, interval=3, seed=3).load_state_dict(saved)


def test_blocks_and_always_on_modules_of_the_repo_lms_and_clear_refusals():
    assert lm_blocks(Llama()) == ["layers.0", "layers.1"] and lm_always(Llama()) == ["embed_tokens", "lm_head"]
    assert list(scheme_for(Llama(), ["lm_head"])) == ["embed_tokens.weight"]  # tied: one parameter
    hf = four_block_lm()
    assert lm_blocks(hf) == [f"model.layers.{i}" for i in range(4)] and lm_always(hf) == ["model.embed_tokens", "lm_head"]
    with pytest.raises(LisaError, match="found no transformer blocks.*blocks=\\[...\\]"):
        lm_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    batches = padded_lm_batches(n=1)
    with pytest.raises(LisaError, match="cannot train 5 of the model's 4 blocks"):
        lisa_on(hf, batches, layers=5, interval=2)
    with pytest.raises(LisaError, match="interval must be a whole number >= 1"):
        lisa_on(hf, batches, layers=1, interval=0)
    with pytest.raises(LisaError, match="overlaps the sampled blocks"):
        lisa_on(hf, batches, layers=1, interval=2, always=["model.layers.0"])
    with pytest.raises(LisaError, match="MeZO"):
        lisa_lm(hf, 2, 12, et.MeZO(lr=1e-3), layers=1)
    with pytest.raises(LisaError, match="int8"):
        lisa_on(hf, batches, layers=1, interval=2, frozen_weights="int8")
    with pytest.raises(LisaError, match="must compile the scheme it is given"):
        LisaTrainer(hf, lambda scheme: et.compile(hf, causal_lm_loss, *batches[0], scheme=et.schemes.full()),
                    layers=1, interval=2)


# -- the command line ---------------------------------------------------------------------------

def write_chats(path, n=16):
    qa = [{"role": "user", "content": "q{}"}, {"role": "assistant", "content": "abcabc"}]
    path.write_text("".join(json.dumps({"messages": [dict(m, content=m["content"].format(i)) for m in qa]}) + "\n"
                            for i in range(n)))
    return str(path)


def test_cli_finetune_lm_with_lisa_saves_every_parameter_it_changed(tmp_path, capsys):
    from safetensors.torch import load_file

    from edgetune.data.chat import load_lm_data

    out, data = tmp_path / "run", write_chats(tmp_path / "c.jsonl")
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", data, "--lisa-layers", "1", "--lisa-interval", "2",
                 "--steps", "6", "--batch", "4", "--seq-len", "32", "--lr", "3e-3", "--val-count", "4",
                 "--buckets", "none", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "LISA: 1 of 2 blocks" in printed
    saved = load_file(str(out / "trained.safetensors"))
    pretrained = dict(load_lm("tiny-llama").model.named_parameters())
    assert EMBEDDING in saved and "model.norm.weight" not in saved and "lm_head.weight" not in saved
    assert all(not torch.equal(t, pretrained[n]) for n, t in saved.items())  # each one saved did change
    # ... and nothing else did: the saved weights over the pretrained model give the run's last held-out loss
    lm = load_lm("tiny-llama")
    lm.model.load_state_dict(saved, strict=False)
    _, val = load_lm_data(data, lm.tokenizer, 32, max_chars=128).split(None, 4, seed=0)
    history = json.loads((out / "history.json").read_text())
    assert evaluate_lm(lm.model, val, batch_size=4) == pytest.approx(history["evals"][-1]["loss"], rel=1e-6)
    assert json.loads((out / "run.json").read_text())["settings"]["lisa_layers"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--scheme", "lora:4"], "LISA trains whole blocks.*LoRA"),
    (["--scheme", "full"], "LISA chooses what trains"),
    (["--optimizer", "mezo"], "MeZO"),
    (["--int8"], "int8"),
    (["--lisa-layers", "3"], "cannot train 3 of the model's 2 blocks"),
])
def test_cli_refuses_what_lisa_does_not_go_with(tmp_path, capsys, flags, message):
    argv = ["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"), "--lisa-layers", "1",
            "--steps", "1", "--seq-len", "32", "--no-progress", "--out", str(tmp_path / "run"), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "run").exists()


def test_cli_lisa_interval_alone_is_refused(tmp_path, capsys):
    assert main(["finetune-lm", "--model", "tiny-llama", "--lisa-interval", "5", "--steps", "1"]) == 2
    assert "--lisa-interval needs --lisa-layers" in capsys.readouterr().err


def test_cli_lisa_killed_mid_period_then_resumed_ends_as_if_never_stopped(tmp_path):
    import signal

    from tests.unit.test_cli_resume import _killed_at, _losses, _same_tensors

    run = ["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"), "--lisa-layers", "1",
           "--lisa-interval", "3", "--steps", "7", "--batch", "4", "--seq-len", "32", "--lr", "3e-3", "--val-count",
           "4", "--buckets", "none", "--checkpoint-every", "2", "--no-progress"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    # its checkpoint: step 4, 1 into period 1
    assert _killed_at(run + ["--out", str(killed)], steps_done=5, stepper="edgetune.apps.lisa:LisaTrainer") == \
        -signal.SIGKILL
    assert main(["finetune-lm", "--resume", str(killed)]) == 0
    assert main(run + ["--out", str(whole)]) == 0
    assert _losses(killed) == _losses(whole) and len(_losses(whole)) == 7
    assert _same_tensors(killed / "trained.safetensors", whole / "trained.safetensors")
