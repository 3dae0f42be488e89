"""experiments.lm_methods end to end in --tiny mode (the tiny random Llama): every row x seed
measured into a results file of its own, the RESULTS section computed from the per-seed
numbers, the learning-rate grid extended beyond an edge best, and a resumed sweep that reruns
nothing. Runs measure in this process (the experiment's children would each import torch
again); the pretrained model's scores go through a real child process, as the sweep runs them."""
import copy
import json
import math
import statistics

import pytest
import torch

import edgetune as et
from bench.sections import cpu_model
from experiments import lm_methods as exp

SETTINGS = dict(exp.TINY)


# One xdist worker runs this module (make test: --dist loadgroup), so that its module fixture
# (swept, the costly part) runs once, not once a worker.
pytestmark = pytest.mark.xdist_group("test_lm_methods_experiment")


@pytest.fixture(scope="module", autouse=True)
def compile_in_process():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGETUNE_COMPILE_IN_PROCESS", "1")
        yield


class Runner:
    """The sweep's runner: the base model's job in a child process, the rest in this one;
    every job is kept, so a test can tell what ran."""

    def __init__(self) -> None:
        self.jobs: list[dict] = []

    def __call__(self, job: dict) -> dict:
        self.jobs.append(job)
        if job["task"] == "base":
            return exp.child_runner(job)
        return json.loads(json.dumps(exp.dispatch(job)))  # what a child's stdout would give back


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_methods")
    paths = exp.Paths(str(folder / "lm_methods.json"), str(folder / "RESULTS.md"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps gain nothing from a second thread on this shared machine
    try:
        runner = Runner()
        results = exp.sweep(SETTINGS, paths, runner)
    finally:
        torch.set_num_threads(threads)
    return results, paths, runner


def test_every_row_ran_every_seed_at_every_rate_of_its_grid(swept):
    results, paths, _ = swept
    saved = json.loads(open(paths.results).read())
    assert set(saved["rows"]) == set(SETTINGS["rows"]) and "GaLore" in saved["rows"]
    for name, row in saved["rows"].items():
        assert set(row["runs"]) == {f"{lr:g}@{seed}" for lr in row["grid"] for seed in SETTINGS["seeds"]}
        for run in row["runs"].values():
            assert math.isfinite(run["test"]) and 0 <= run["contained"] <= 1 and run["tokens_per_s"] > 0
            assert [e["step"] for e in run["evals"]] == [0, 3, 6]
            assert [e["seconds"] for e in run["evals"]] == sorted(e["seconds"] for e in run["evals"])
            assert run["evals"][-1]["seconds"] == pytest.approx(run["training_seconds"])
            assert len(run["step_seconds"]) == SETTINGS["steps"] and run["predicted_peak"] > 0
    assert math.isfinite(saved["base"]["test"]) and saved["peaks"][exp.REFERENCE] > 0


def test_the_searched_row_trains_the_scheme_its_search_found_under_its_budget(swept):
    results, _, runner = swept
    found = results["searches"]["1.5"]
    assert found["budget"] == int(1.5 * results["peaks"][exp.REFERENCE])
    assert found["measured_peak"] <= found["budget"]
    assert results["rows"]["searched 1.5x"]["spec"]["scheme"] == found["scheme"]
    runs = [job for job in runner.jobs if job["task"] == "one" and job["spec"].get("searched") == 1.5]
    assert runs and all(job["spec"]["scheme"] == found["scheme"] for job in runs)
    assert sum(job["task"] == "search" for job in runner.jobs) == 1


def test_different_seeds_give_different_runs_of_the_same_split(swept):
    results, _, _ = swept
    runs = results["rows"][exp.REFERENCE]["runs"]
    first, second = (runs[f"0.01@{seed}"] for seed in SETTINGS["seeds"])
    assert first["examples"] == second["examples"]
    assert first["test"] != second["test"]


def test_the_table_shows_each_row_as_mean_and_spread_of_its_seeds(swept):
    results, paths, _ = swept
    exp.write_section(results, paths.markdown)
    exp.write_section(results, paths.markdown)  # rewritten in place, not appended
    text = open(paths.markdown).read()
    assert text.count(exp.MARKERS[0]) == 1 and text.count(exp.MARKERS[1]) == 1
    lora = _test_losses(results, exp.REFERENCE)
    for name in SETTINGS["rows"]:
        tests = _test_losses(results, name)
        line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"{statistics.fmean(tests):.4f} ± {statistics.stdev(tests):.4f}" in line
        assert f"{100 * (statistics.fmean(tests) / statistics.fmean(lora) - 1):+.2f}%" in line
        assert "0.01 (0.01; best at the grid's edge, extensions used up)" in line  # a one-rate grid, no extension
    assert "Goal, `searched 1.5x` against LoRA (q,v)" in text
    assert f"Runs' CPUs: {cpu_model()} ({', '.join(SETTINGS['rows'])})." in text  # every run says where it ran
    assert "LISA against LoRA (q,v)" in text and "GaLore against LoRA (q,v)" in text


def _test_losses(results: dict, row: str) -> list[float]:
    runs = results["rows"][row]["runs"]
    return [runs[f"0.01@{seed}"]["test"] for seed in SETTINGS["seeds"]]


def test_the_goal_line_follows_the_numbers(swept):
    results, _, _ = swept
    r = copy.deepcopy(results)
    searched, lora = r["rows"]["searched 1.5x"]["runs"], r["rows"][exp.REFERENCE]["runs"]
    for key, run in searched.items():  # the same loss as LoRA's, twice its rate, a quarter of its peak
        run.update(test=lora[key]["test"], tokens_per_s=2 * lora[key]["tokens_per_s"])
    r["peaks"][exp.REFERENCE] = 4 * r["searches"]["1.5"]["measured_peak"]
    assert "tokens/s 2.00x (the runs') — **met**" in exp.section(r)
    for run in searched.values():
        run["test"] *= 1.02
    assert "missed (within 1%)" in exp.section(r)


def test_speed_times_the_rows_side_by_side_on_the_same_batches_and_the_goal_uses_it(swept, tmp_path):
    results, paths, _ = swept
    copied = exp.Paths(str(tmp_path / "lm_methods.json"), None)
    open(copied.results, "w").write(open(paths.results).read())  # the shared sweep stays as it is
    rows = [exp.REFERENCE, "searched 1.5x"]
    timed = exp.speed(dict(SETTINGS, rows={n: SETTINGS["rows"][n] for n in rows}), copied, steps=3, threads=1)
    speed = json.loads(open(copied.results).read())["speed"]
    assert list(speed["rows"]) == rows and speed["threads"] == 1 and speed["steps"] == 3
    first = speed["rows"][exp.REFERENCE]
    for name in rows:
        row = speed["rows"][name]
        assert row["ok"] and len(row["times_s"]) == 3 and row["lr"] == results["rows"][name]["best_lr"]
        assert row["real_tokens"] == first["real_tokens"]  # every row steps through the same batches
        assert row["tokens_per_s"] == pytest.approx(sum(row["real_tokens"]) / sum(row["times_s"]))
        assert all(math.isfinite(loss) for loss in row["losses"])
    # The goal line takes the side-by-side ratio, not the runs' (made on other days).
    timed["speed"]["rows"]["searched 1.5x"]["tokens_per_s"] = 2 * first["tokens_per_s"]
    text = exp.section(timed)
    assert "tokens/s 2.00x (side by side)" in text and "Side by side (`--speed`" in text
    assert "| searched 1.5x |" in text and f"| {2 * first['tokens_per_s']:.0f} (2.00x) |" in text


def test_the_loss_at_loras_time_is_the_last_evaluation_within_it():
    run = {"evals": [{"step": 0, "val": 3.0, "seconds": 0.0}, {"step": 5, "val": 2.0, "seconds": 4.0},
                     {"step": 10, "val": 1.0, "seconds": 9.0}]}
    assert exp._last_eval_within(run, "seconds", 8.0) == (2.0, 5)
    assert exp._last_eval_within(run, "seconds", 9.0) == (1.0, 10)
    assert exp._last_eval_within(run, "seconds", 1.0) == (3.0, 0)
    # LoRA's runs took 10 steps in 12 s: untimed side by side, a row gets 12 s of its own run;
    # timed side by side at 0.6x LoRA's tokens/s, 6 of its steps (its seconds may be another machine's).
    lora = {"runs": [{"step_seconds": [1.2] * 10}], "training_seconds": 12.0, "side_by_side_tokens_per_s": None}
    row = {"side_by_side_tokens_per_s": None}
    assert exp._at_reference_time(run, row, lora) == (1.0, 10)
    lora["side_by_side_tokens_per_s"], row["side_by_side_tokens_per_s"] = 100.0, 60.0
    assert exp._at_reference_time(run, row, lora) == (2.0, 5)


def test_a_resumed_sweep_reruns_nothing(swept):
    results, paths, _ = swept
    before = json.loads(open(paths.results).read())

    def refuse(job):
        raise AssertionError(f"reran {job['task']}")

    again = exp.sweep(SETTINGS, paths, refuse)
    assert again["rows"] == before["rows"] and again["searches"] == before["searches"]


def test_choose_lr_extends_the_grid_beyond_an_edge_best():
    assert exp.choose_lr([1e-3, 3e-3, 1e-2], {1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.8}) == (3e-3, None)
    assert exp.choose_lr([1e-3, 3e-3, 1e-2], {1e-3: 2.0, 3e-3: 1.9, 1e-2: 1.8}) == (1e-2, pytest.approx(3e-2))
    assert exp.choose_lr([1e-3, 3e-3, 1e-2], {1e-3: 1.7, 3e-3: 1.9, 1e-2: 1.8}) == (1e-3, pytest.approx(1e-3 / 3))
    assert exp.choose_lr([1e-3, 1e-2], {1e-3: math.inf, 1e-2: math.inf}) == (1e-3, pytest.approx(1e-3 / 3))


def test_a_diverged_seed_makes_its_rate_the_worst():
    runs = {"0.01@0": {"lr": 1e-2, "seed": 0, "val": 1.0}, "0.01@1": {"lr": 1e-2, "seed": 1, "val": None},
            "0.001@0": {"lr": 1e-3, "seed": 0, "val": 2.0}, "0.001@1": {"lr": 1e-3, "seed": 1, "val": 2.2},
            "0.1@0": {"lr": 0.1, "seed": 0, "val": 0.5}}  # one seed of two: not yet comparable
    assert exp.mean_val_by_lr(runs, [0, 1]) == {1e-2: math.inf, 1e-3: pytest.approx(2.1)}


def _fake_runner(best_lr: float, ran: list):
    """Validation loss = distance from best_lr on a log scale: no model, the sweep's logic only."""
    def run(job):
        ran.append(job)
        if job["task"] != "one":
            return {}
        return {"lr": job["lr"], "seed": job["seed"], "val": 1 + math.log10(job["lr"] / best_lr) ** 2}
    return run


@pytest.mark.parametrize("limit, grid, at_edge", [
    (3, [1e-3, 3e-3, 9e-3, 2.7e-2], False),  # 9e-3 is inside once 2.7e-2 ran
    (2, [1e-3, 3e-3, 9e-3], True),  # stopped at the limit with the best at the top
])
def test_the_sweep_extends_the_grid_until_the_best_is_inside_or_the_limit(tmp_path, limit, grid, at_edge):
    settings = dict(SETTINGS, rows={"A": dict(scheme="lm-sparse:2", lrs=[1e-3])}, max_extensions=limit)
    ran = []
    results = exp.sweep(settings, exp.Paths(str(tmp_path / "r.json"), None), _fake_runner(1e-2, ran))
    row = results["rows"]["A"]
    assert row["grid"] == pytest.approx(grid) and row["extensions"] == len(grid) - 1
    assert row["at_edge"] is at_edge and row["best_lr"] == pytest.approx(grid[-2] if not at_edge else grid[-1])
    assert sum(job["task"] == "one" for job in ran) == len(grid) * len(SETTINGS["seeds"])


def test_with_tune_seeds_the_rate_is_chosen_on_the_first_seeds_and_the_others_run_at_it_only(tmp_path):
    settings = dict(SETTINGS, rows={"A": dict(scheme="lm-sparse:2", lrs=[3e-3, 1e-2, 3e-2])}, seeds=[0, 1, 2],
                    tune_seeds=1)
    ran = []
    results = exp.sweep(settings, exp.Paths(str(tmp_path / "r.json"), None), _fake_runner(1e-2, ran))
    runs = sorted((job["lr"], job["seed"]) for job in ran if job["task"] == "one")
    assert runs == [(3e-3, 0), (1e-2, 0), (1e-2, 1), (1e-2, 2), (3e-2, 0)]
    assert results["rows"]["A"]["best_lr"] == 1e-2


def test_rows_and_search_settings_can_be_narrowed_from_the_command_line():
    assert list(exp.chosen_rows(exp.ROWS, ["full", exp.REFERENCE], exp.REFERENCE)) == ["full", exp.REFERENCE]
    # A searched row's budget is a fraction of the reference's peak: the reference comes along.
    assert list(exp.chosen_rows(exp.ROWS, ["searched 1x"], exp.REFERENCE)) == [exp.REFERENCE, "searched 1x"]
    with pytest.raises(SystemExit, match="unknown rows \\['LoRA'\\]"):
        exp.chosen_rows(exp.ROWS, ["LoRA"], exp.REFERENCE)
    search = exp.search_settings(exp.SEARCH, ["bands=3", "kinds=self_attn.q_proj,mlp.up_proj", "ratios=none",
                                              "lr=3e-3", "seeds=0,1,2"])
    assert search == dict(exp.SEARCH, bands=3, kinds=["self_attn.q_proj", "mlp.up_proj"], ratios=[], lr=3e-3,
                          seeds=[0, 1, 2])
    assert exp.search_settings(search, ["kinds=all"])["kinds"] is None
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        exp.search_settings(exp.SEARCH, ["band=3"])


def test_rows_build_the_trainer_they_name():
    assert exp.optimizer_of(exp.ROWS["GaLore"], 1e-3) == et.GaLore(lr=1e-3, rank=128, update_gap=200, scale=0.25)
    assert isinstance(exp.optimizer_of(exp.ROWS[exp.REFERENCE], 1e-3), et.AdamW)
    assert exp.optimizer_of({"scheme": "lm-sparse:6", "optimizer": "adafactor"}, 3e-3) == et.Adafactor(lr=3e-3)
    for name, row in exp.ROWS.items():
        if "scheme" in row:
            exp.scheme_of(row)  # every spelling parses
        assert row["lrs"] == sorted(row["lrs"]) and len(row["lrs"]) >= 3, name


def test_a_row_whose_sweep_stopped_midway_is_listed_not_averaged():
    keys = ("test", "test_token_accuracy", "contained", "exact", "tokens_per_s", "tokens_per_s_median_step",
            "training_seconds", "predicted_peak")
    run = lambda lr, seed, test: {"lr": lr, "seed": seed, "val": test, **dict.fromkeys(keys, test)}  # noqa: E731
    row = {"grid": [1e-4, 3e-4], "extensions": 1, "best_lr": 1e-4, "at_edge": True,
           "runs": {"0.0001@0": run(1e-4, 0, 1.5)}}  # 3e-4 not run yet, seeds 1 and 2 neither
    s = exp._row_summary(row, [0, 1, 2])
    assert s["runs"] == [] and s["partial"] == [row["runs"]["0.0001@0"]] and s["pending"] == [3e-4]
    row["runs"].update({"0.0003@0": run(3e-4, 0, 1.6), "0.0001@1": run(1e-4, 1, 1.4), "0.0001@2": run(1e-4, 2, 1.3)})
    s = exp._row_summary(row, [0, 1, 2])
    assert s["partial"] == [] and s["test"] == pytest.approx(1.4)
