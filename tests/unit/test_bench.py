"""The vision benchmark's report: goals computed from results, several runs rendered together."""
import json
import sys

import pytest

from bench import __main__ as bench_main
from bench.goals import goals_section

MB = 2**20


def row(model, scheme, batch, engine, peak_mb, cpu_ms, predicted_mb=None, steps_mb=None):
    memory = {"ok": True, "peak_bytes": peak_mb * MB, "steps_peak_bytes": (steps_mb or peak_mb) * MB,
              "warm_rss_bytes": 0, "setup_s": 1.0, "modules_imported": 0, "trainable_params": 10,
              "child_peak_bytes": None}
    if predicted_mb is not None:
        memory["predicted_peak_bytes"] = predicted_mb * MB
    time = {"ok": True, "median_s": cpu_ms / 1e3, "cpu_median_s": cpu_ms / 1e3, "load_before": 1.0, "load_after": 1.0}
    return {"config": {"model": model, "scheme": scheme, "batch": batch, "engine": engine},
            "memory": memory, "time": time}


def mobilenet_results(edgetune_bias_mb=50):
    r = [row("mobilenetv2", "-", 8, "forward", 40, 50), row("mobilenetv2", "-", 8, "eager-full", 300, 200)]
    for scheme, eager_mb, eager_ms in (("full", 300, 180), ("bias-only", 290, 140), ("tte", 130, 90), ("last-3", 120, 60)):
        r.append(row("mobilenetv2", scheme, 8, "eager", eager_mb, eager_ms))
        mb = edgetune_bias_mb if scheme == "bias-only" else 45
        r.append(row("mobilenetv2", scheme, 8, "edgetune", mb, eager_ms * 0.9, predicted_mb=mb, steps_mb=mb))
    return r


def cells_of(results):
    return bench_main.Cells(results)


def test_goals_are_computed_from_the_results():
    text = "\n".join(goals_section(cells_of(mobilenet_results())))
    assert "| bias-only peak >= 5x lower than eager, same scheme (batch 8) | 290.0 MB / 50.0 MB = 5.80x | met |" in text
    assert "(predicted) = 1.00 | met" in text
    assert "TTE-style peak <= 1.15x the forward-only floor (batch 8) | 45.0 MB / 40.0 MB = 1.12x | met" in text
    assert "batch 1: step >= 1.3x faster than eager, tte (CPU time) | not measured" in text
    missed = "\n".join(goals_section(cells_of(mobilenet_results(edgetune_bias_mb=100))))
    assert "290.0 MB / 100.0 MB = 2.90x | **missed** by 42% |" in missed


def test_without_mobilenet_only_the_speed_goals():
    text = "\n".join(goals_section(cells_of([row("resnet", "full", 8, "edgetune", 10, 10),
                                             row("resnet", "full", 8, "eager", 10, 12)])))
    assert "| resnet: step no slower than eager, full, batch 8 (CPU time) | 12.0 ms / 10.0 ms = 1.20x | met |" in text
    assert "resnet: batch 1: step >= 1.3x faster than eager, tte (CPU time) | not measured" in text
    assert "peak" not in text and "TTE-style" not in text
    assert goals_section(cells_of([row("resnet", "full", 8, "eager", 10, 10)])) == []


def test_runs_render_together(tmp_path, monkeypatch):
    env = {"command": "python -m bench --models mobilenetv2", "date": "2026-11-27 12:00", "revision": "abc",
           "cpu": "cpu", "cores": 2, "torch": "2", "threads": 1, "default_threads": 2, "python": "3.11",
           "runtime_s": 60.0, "load_start": [1.0], "load_end": [1.0]}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"environment": env, "results": mobilenet_results()}))
    other = {**env, "command": "python -m bench --models resnet", "date": "2026-11-27 12:10"}
    second.write_text(json.dumps({"environment": other, "results": [row("resnet", "full", 8, "edgetune", 10, 10, predicted_mb=9)]}))
    out = tmp_path / "B.md"
    monkeypatch.setattr(sys, "argv", ["bench"])
    bench_main.main(["--render", "--json", f"{first},{second}", "--out", str(out)])
    text = out.read_text()
    assert "## mobilenetv2" in text and "## resnet" in text and "## Against the goals" in text
    assert "--models mobilenetv2`, then `python -m bench --models resnet" in text
    assert "2026-11-27 12:00; 2026-11-27 12:10" in text


def test_the_report_keeps_the_lm_section_and_what_follows(tmp_path):
    from bench.lm import BEGIN, END

    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# old vision tables\n\n{BEGIN}\nLM table\n{END}\n\n### notes by hand\n")
    bench_main.write_report(path, "# new vision tables\n")
    assert path.read_text() == f"# new vision tables\n\n{BEGIN}\nLM table\n{END}\n\n### notes by hand\n"


def test_the_profile_times_every_kernel_call_of_the_same_step(monkeypatch):
    """bench/profile.py: the step with its kernels wrapped computes what the compiled step
    computes, and counts one call per kernel line that ran."""
    import re

    import torch
    import torch.nn.functional as F

    import edgetune as et
    from bench.profile import report, timed_step
    from tests.unit.nets import ConvNet, batch

    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    trainer = et.compile(ConvNet().eval(), F.cross_entropy, *batch(), scheme=et.schemes.bias_only(),
                         optimizer=et.SGD(lr=0.0))  # lr 0: both runs start from the same weights
    fn, seconds, calls = timed_step(trainer.compiled)
    args = trainer._arguments([*batch()[0], *batch()[1]], step=1)
    with torch.no_grad():
        want, got = trainer.compiled.fn(*args), fn(*args)
    assert torch.equal(want["loss"], got["loss"])
    # The kernel lines of the step itself (values every step computes alike run once, before it)
    step_source = trainer.compiled.source.split("def _edgetune_step")[1]
    kernels = [trainer.compiled.kernel_ops[name] for name in re.findall(r"\b(_op_\w+|_bound_\w+)\(", step_source)]
    assert sum(calls.values()) == len(kernels) - want["skipped"]
    assert set(seconds) == set(kernels) and all(s > 0 for s in seconds.values())
    result = {"model": "m", "scheme": "s", "batch": 4, "threads": 1, "eager_s": 0.002, "step_s": 0.001,
              "kernels_s": 0.0008, "between_s": 0.0002, "calls": 3, "ops": {"conv": {"s": 0.0008, "calls": 3}}}
    assert "| m | s | 4 | 1 | 2.0 | 1.0 | 0.8 | 0.2 (20%) | 3 |" in report([result], top=5)


def test_the_profile_of_a_language_model_times_its_step_beside_the_forward_floor():
    """bench/profile.py on the tiny random Llama: the lm-sparse scheme's step, its fused head
    among its kernels, the forward floor as the reference; a vision scheme is refused for it."""
    import torch

    from bench.profile import main, profile

    threads = torch.get_num_threads()
    try:
        result = profile("tiny-llama", "lm-sparse:6", batch=2, threads=1, steps=1, seq=8)
    finally:
        torch.set_num_threads(threads)
    assert result["calls"] > 0 and result["eager_s"] > 0 and result["step_s"] > 0
    assert "vocab_log_prob" in result["ops"] and "adamw_update" in result["ops"]
    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--scheme", "tte"])


def test_kernel_choices_time_only_alternatives_that_compute_the_same_values():
    """bench/kernel_choices.py: each pair is checked for equal values before it is timed."""
    import torch

    from bench import kernel_choices

    rows = kernel_choices.measure(["norm"], repeats=1)
    assert [r["what"] for r in rows][:2] == ["RMSNorm forward, ATen fused", "RMSNorm forward, torch.rms_norm"]
    assert all(r["now_ms"] > 0 and r["alternative_ms"] > 0 for r in rows)
    assert "| eval BN, addcmul with its scale precomputed | [1, 96, 8, 8] |" in kernel_choices.report(rows, 1)
    with pytest.raises(AssertionError):
        kernel_choices._same(torch.zeros(3), torch.ones(3), tol=1e-3)


def test_engines_take_turns_and_each_runs_its_steps():
    """bench/interleave.py: every engine of a group runs the asked number of steps, a few per
    turn, each turn starting with the next engine; a failing engine is reported, not fatal."""
    from bench.configs import Config
    from bench.interleave import STEPS_PER_TURN, time_in_turns

    calls = []

    class FakeServer:
        def __init__(self, config, threads, env, timeout):
            self.name, self.replies = config.engine, [{"ok": True, "setup_s": 1.0}]
            calls.append((self.name, env))

        def reply(self):
            return self.replies.pop(0)

        def steps(self, count):
            calls.append((self.name, count))
            if self.name == "broken":
                return {"ok": False, "error": "RuntimeError: boom"}
            return {"ok": True, "times_s": [0.01 * (1 + len(calls))] * count, "cpu_times_s": [0.005] * count}

        def close(self):
            calls.append((self.name, "closed"))

    group = [Config("mobilenetv2", "tte", 1, e) for e in ("edgetune", "eager", "broken")]
    steps = 2 * STEPS_PER_TURN + 1
    results = time_in_turns(group, 2, steps, {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}, 10,
                            start=FakeServer)
    # timing runs keep the allocator's defaults: the memory runs' setting is not passed on
    assert [c[1] for c in calls[:3]] == [{"OMP_NUM_THREADS": "2"}] * 3
    ran = [c for c in calls[3:] if c[1] != "closed"]
    assert [name for name, _ in ran[:3]] == ["edgetune", "eager", "broken"]
    assert [name for name, _ in ran[3:5]] == ["eager", "edgetune"]  # turn 2 starts with the next engine
    for r, engine in zip(results[:2], ("edgetune", "eager")):
        assert r["ok"] and len(r["times_s"]) == steps and r["threads"] == 2 and r["cpu_median_s"] == 0.005
        assert sum(count for name, count in ran if name == engine) == steps
    assert results[2] == {"ok": False, "error": "RuntimeError: boom"}
    assert sum(1 for c in calls if c[1] == "closed") == 3


def test_a_time_table_per_thread_count(tmp_path, monkeypatch):
    """Results timed at 1 and 2 threads render as two tables: CPU-time ratios at one thread,
    wall-time ratios at two."""
    results = mobilenet_results()
    for r in results:
        one = r["time"]
        r["time_by_threads"] = {"1": one, "2": {**one, "median_s": one["median_s"] / 2}}
    eager = next(r for r in results if r["config"]["engine"] == "eager" and r["config"]["scheme"] == "tte")
    eager["time_by_threads"]["2"]["median_s"] = 0.090  # edgetune's two-thread wall median is 0.0405
    env = {"command": "python -m bench", "date": "2026-12-01 12:00", "revision": "abc", "cpu": "cpu", "cores": 2,
           "torch": "2", "threads": [1, 2], "default_threads": 2, "python": "3.11", "runtime_s": 60.0,
           "load_start": [1.0], "load_end": [1.0]}
    path, out = tmp_path / "r.json", tmp_path / "B.md"
    path.write_text(json.dumps({"environment": env, "results": results}))
    monkeypatch.setattr(sys, "argv", ["bench"])
    bench_main.main(["--render", "--json", str(path), "--out", str(out)])
    text = out.read_text()
    assert "Median step time at 1 thread, ms" in text and "Median step time at 2 threads, ms" in text
    assert "Intra-op threads in every engine: 1 and 2" in text
    two = text[text.index("at 2 threads, ms"):]
    assert "edgetune / eager (wall)" in two and "| tte | 8 | 40.5 (81.0) | 90.0 (90.0) |" in two
    assert "| 0.45 |" in two.splitlines()[6]  # 40.5 / 90.0, in the tte row


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm-proj", "rnn"])
def test_the_recurrent_benchmark_trains_the_same_scheme_in_both_engines(kind):
    """bench/recurrent.py: eager and edgetune start from the same model and batch and update the
    same parameters, so their losses agree step after step; the table names both."""
    from bench import recurrent

    steps = {engine: recurrent.setup(kind, 1, "bias-only", 2, engine)[0] for engine in ("eager", "edgetune")}
    losses = {engine: [step() for _ in range(3)] for engine, step in steps.items()}
    assert losses["eager"][0] != losses["eager"][2]  # the steps train
    assert losses["edgetune"] == pytest.approx(losses["eager"], rel=1e-5)
    timed = {"median_s": 0.002, "times_s": [0.002], "peak_bytes": MB, "predicted_peak_bytes": MB}
    row = {"kind": kind, "layers": 1, "scheme": "bias-only", "batch": 2, "threads": 1,
           "eager": dict(timed, median_s=0.003), "edgetune": timed, "edgetune@abc": timed}
    table = recurrent.render([row])
    assert f"| {kind} | bias-only | 2 | 3.00 | 2.00 | 1.50x | 2.00 | 1.50x | 1.0 | 1.0 | 1.0 | 1.0 |" in table
