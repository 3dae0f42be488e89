"""Smoke test of the language-model benchmark (bench/lm.py, bench/lm_one.py) on the tiny HF Llama."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402

from bench import lm, lm_one  # noqa: E402
from edgetune.models.hf import tiny_causal_lm  # noqa: E402
from edgetune.compiler.scheme import as_mapping, resolve  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(tiny=True, batch=2, seq=16)


def one_timed_step(engine: str) -> dict:
    """The engine warmed up as its serving process does, then one step timed, as bench.lm
    records it (bench/interleave.py adds the times and losses of each turn)."""
    try:
        step, ready = lm_one.warmed_up(engine, **TINY)
    except Exception as e:  # noqa: BLE001  (reported as the serving process does)
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    t = time.perf_counter()
    loss = step()
    wall = time.perf_counter() - t
    return {"ok": True, **ready, "losses": ready["losses"] + [loss], "times_s": [wall], "median_s": wall,
            "cpu_median_s": wall, "tokens_per_s": ready["tokens"] / wall, "load_before": 0.0, "load_after": 0.0}


# One xdist worker runs this module (make test: --dist loadgroup), so that its module fixture
# (timed, the costly part) runs once, not once a worker.
pytestmark = pytest.mark.xdist_group("test_bench_lm")


@pytest.fixture(scope="module")
def timed():
    """Every engine in this process: 2 warm-ups + 1 timed step each."""
    return {e: one_timed_step(e) for e in lm_one.ENGINES}


@pytest.mark.parametrize("engine", [e for e in lm_one.ENGINES if e != "edgetune-lora"])
def test_engine_reports_its_fields(timed, engine):
    r = timed[engine]
    assert r["ok"], r.get("error")
    assert r["tokens"] == 2 * 16 and r["tokens_per_s"] > 0 and r["median_s"] > 0
    assert len(r["losses"]) == lm_one.WARMUP + 1 and len(r["times_s"]) == 1
    assert isinstance(r["trainable_params"], int)


def test_edgetune_lora_runs_or_says_why(timed):
    r = timed["edgetune-lora"]  # LoRA as a scheme rule may not have landed: then a reason, no crash
    assert r["ok"] or r["error"]


def test_every_engine_starts_from_the_same_loss(timed):
    # MeZO reports the mean of its two perturbed passes (theta +- eps z): near, not equal.
    first = {e: r["losses"][0] for e, r in timed.items() if r["ok"]}
    exact = [loss for e, loss in first.items() if "mezo" not in e]
    assert max(exact) - min(exact) < 1e-5
    assert all(abs(loss - exact[0]) < 1e-3 for e, loss in first.items() if "mezo" in e)


def test_sparse_engines_train_the_same_entries_the_same_way(timed):
    eager, compiled = timed["eager-sparse"], timed["edgetune-sparse"]
    assert eager["trainable_params"] == compiled["trainable_params"] > 0
    # Step 1 is before any update; the later steps agree only if both changed the same entries alike.
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5, abs=1e-5)


def test_sparse_scheme_is_the_issues():
    model = tiny_causal_lm("llama", num_hidden_layers=30)
    scheme = as_mapping(resolve(lm_one.sparse_scheme(30), model))
    assert len(scheme) == 6 * 5
    assert scheme["model.layers.24.self_attn.q_proj.weight"] == {"ratio": 0.5, "select": "magnitude"}
    assert scheme["model.layers.29.mlp.up_proj.weight"] == {"ratio": 0.25, "select": "magnitude"}
    assert scheme["model.layers.29.post_attention_layernorm.weight"] == "full"
    assert "model.layers.23.self_attn.v_proj.weight" not in scheme


def test_section_replaces_only_between_markers(tmp_path):
    page = tmp_path / "B.md"
    page.write_text("# Benchmarks\n\nvision\n")
    lm.replace_section(page, f"{lm.BEGIN}\nfirst\n{lm.END}\n")
    assert page.read_text() == f"# Benchmarks\n\nvision\n\n{lm.BEGIN}\nfirst\n{lm.END}\n"
    page.write_text(page.read_text() + "\n## after\n")
    lm.replace_section(page, f"{lm.BEGIN}\nsecond\n{lm.END}\n")
    assert page.read_text() == f"# Benchmarks\n\nvision\n\n{lm.BEGIN}\nsecond\n{lm.END}\n\n## after\n"


def test_memory_run_in_a_fresh_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-m", "bench.lm_one", "--engine", "forward", "--mode", "memory",
                           "--steps", "1", "--tiny", "--seq", "16", "--threads", "1"],
                          cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["ok"], r.get("error")
    assert r["peak_bytes"] >= 0 and r["base_bytes"] > 0 and len(r["losses"]) == lm_one.WARMUP + 1


def test_engine_serves_steps_in_a_fresh_process():
    """--mode serve: ready once set up and warmed up, then the steps asked for, until EOF."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.lm_one", "--engine", "forward", "--mode", "serve",
                           "--tiny", "--seq", "16", "--threads", "1"],
                          input="2\n1\n", cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120)
    ready, *answers = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert ready["ok"] and ready["tokens"] == 4 * 16 and len(ready["losses"]) == lm_one.WARMUP
    assert [len(a["times_s"]) for a in answers] == [2, 1] and all(len(a["losses"]) == len(a["times_s"]) for a in answers)


def test_driver_writes_json_and_section(timed, tmp_path, monkeypatch):
    """The driver with its subprocesses replaced by the in-process results above."""
    def memory(cmd, mode, env, timeout):
        engine = cmd[cmd.index("--engine") + 1]
        return {**timed[engine], "peak_bytes": 100 * lm.MB, "setup_s": 0.1, "child_peak_bytes": None}

    def in_turns(engines, threads, steps, env, timeout, start):
        return [{"ok": False, "error": "did not answer within 300 s"} if e == "eager-full" else timed[e]
                for e in engines]

    monkeypatch.setattr(lm, "run_child", memory)
    monkeypatch.setattr(lm, "time_in_turns", in_turns)
    out, raw = tmp_path / "B.md", tmp_path / "lm.json"
    lm.main(["--tiny", "--steps", "1", "--out", str(out), "--json", str(raw)])
    saved = json.loads(raw.read_text())
    assert list(saved["results"]) == list(lm_one.ENGINES)
    assert saved["environment"]["peft"] and saved["environment"]["tiny"]
    text = out.read_text()
    assert text.startswith(lm.BEGIN) and text.rstrip().endswith(lm.END)
    assert "| eager-full [^1] | — |" in text and "did not answer within 300 s" in text
    assert "peak <= 0.5x PEFT LoRA: 1.00x — **missed**" in text


def test_flop_counts_cover_every_product_of_the_step():
    """bench.lm_flops: the floor's count is the tiny Llama's linears and attention worked out by
    hand; a step does more; edgetune's step no more than eager's, which forms the partially
    trained weights' whole gradients."""
    from bench import lm_flops

    batch, seq = 2, 16
    counts = lm_flops.count_flops(tiny=True, batch=batch, seq=seq)
    model = lm_one.load_model(tiny=True)
    c = model.config
    linears = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = c.hidden_size // c.num_attention_heads
    attention = c.num_hidden_layers * 2 * (2 * batch * c.num_attention_heads * seq * seq * head_dim)
    assert counts["forward"] == 2 * batch * seq * linears + attention
    assert counts["forward"] < counts["edgetune-sparse"] < counts["eager-sparse"]
