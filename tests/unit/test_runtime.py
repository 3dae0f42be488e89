"""edgetune.runtime: an exported step run by onnxruntime alone matches the torch backend after
5 steps, in a process where `import torch` fails; its state saves and loads; bad input is
refused with nothing changed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import edgetune as et
from tests.unit.nets import ConvNet, batch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SCHEME = {"pw.weight": 0.5, "*.bias": "full", "head.*": "full"}
STEPS = 5

# A process as if torch were not installed: any import of it raises.
NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")

sys.meta_path.insert(0, NoTorch())
"""
# Runs the exported step there.
WITHOUT_TORCH = NO_TORCH + """
import json
import numpy as np
from edgetune.runtime import StepRunner

folder = sys.argv[1]
data = np.load(folder + "/batches.npz")
runner = StepRunner(folder)
losses = [runner.step(data[f"x{i}"], data[f"y{i}"]) for i in range(int(data["n"]))]
runner.save(folder + "/after.safetensors")
np.save(folder + "/predicted.npy", runner.predict(data["x0"]))
loaded = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"__main__"})
json.dump({"losses": losses, "torch_loaded": "torch" in sys.modules, "loaded": loaded},
          open(folder + "/result.json", "w"))
"""


def seeded_convnet():
    torch.manual_seed(0)
    return ConvNet()


@pytest.fixture
def exported(tmp_path, monkeypatch):
    """A train-mode ConvNet under a partial scheme with AdamW, exported before its first step,
    and its twin trained STEPS steps by the torch backend."""
    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    batches = [batch(seed=s) for s in range(STEPS)]
    model = seeded_convnet().train()
    trainer = et.compile(model, F.cross_entropy, *batches[0], scheme=SCHEME, optimizer=et.AdamW(lr=0.01))
    trainer.export_onnx(tmp_path)
    np.savez(tmp_path / "batches.npz", n=STEPS, **{f"x{i}": b[0][0].numpy() for i, b in enumerate(batches)},
             **{f"y{i}": b[1][0].numpy() for i, b in enumerate(batches)})
    losses = [trainer.step(*b) for b in batches]
    return tmp_path, trainer, losses, batches


def test_the_runner_matches_the_torch_backend_without_torch(exported):
    from edgetune.runtime import put_part

    folder, trainer, want_losses, batches = exported
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(folder)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads((folder / "result.json").read_text())
    assert not result["torch_loaded"]
    assert_an_install_has(result["loaded"], extra="runtime")
    assert result["losses"] == pytest.approx(want_losses, rel=1e-5)
    from safetensors.numpy import load_file

    after = load_file(str(folder / "after.safetensors"))
    want = {**trainer.model.state_dict(), **trainer.state}
    part = next(i["part"] for i in json.loads((folder / "manifest.json").read_text())["inputs"] if "part" in i)
    assert part["axis"] == 1 and len(part["channels"]) == 4 and after["pw.weight"].shape == (16, 4, 1, 1)
    # the step carried pw.weight's trained channels alone; put back, they give the trained weight
    after["pw.weight"] = put_part(seeded_convnet().state_dict()["pw.weight"].numpy(), after["pw.weight"], part)
    assert set(after) == {"bn.bias", "bn2.bias", "pw.weight", "pw.bias", "head.weight", "head.bias",
                          "bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "bn2.running_mean",
                          "bn2.running_var", "bn2.num_batches_tracked"} | set(trainer.state)
    for key, value in after.items():
        np.testing.assert_allclose(value, want[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
    # predict: the trained model's forward in eval mode (running statistics, as trained)
    model = trainer.model.eval()
    with torch.no_grad():
        want_out = model(*batches[0][0])
    np.testing.assert_allclose(np.load(folder / "predicted.npy"), want_out.numpy(), rtol=1e-5, atol=1e-6)
    assert model.training is False and trainer.model is model


def test_the_inference_graph_reads_the_steps_weight_file(tmp_path, monkeypatch):
    """Frozen weights are stored once: predict.onnx's initializers point into step.onnx.data."""
    import onnx

    from edgetune.compiler.backends.onnx import export_step
    from edgetune.runtime import RunnerError, StepRunner

    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    model = ConvNet().eval()
    data = batch()
    trainer = et.compile(model, F.cross_entropy, *data, scheme={"head.*": "full", "pw.weight": 0.5})
    export_step(trainer, tmp_path, external_data_bytes=200)  # even this small net's weights go to the file
    predict = onnx.load(str(tmp_path / "predict.onnx"), load_external_data=False)
    shared = {t.name for t in predict.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL
              and {e.key: e.value for e in t.external_data}["location"] == "step.onnx.data"}
    # the frozen convs, and the frozen channels of the partially trained one
    assert {"stem_weight", "dw_weight", "pw_weight_frozen"} <= shared, shared
    own = tmp_path / "predict.onnx.data"  # what the step does not store as such (none here)
    assert not own.exists() or own.stat().st_size == 0
    assert {"head_weight", "pw_weight_trained"} <= {i.name for i in predict.graph.input}  # fed by the runner
    runner = StepRunner(tmp_path)
    x, y = data[0][0].numpy(), data[1][0].numpy()
    with torch.no_grad():
        before = model(*data[0]).numpy()
    np.testing.assert_allclose(runner.predict(x), before, rtol=1e-5, atol=1e-6)
    runner.step(x, y)
    trainer.step(*data)
    with torch.no_grad():  # predict reads the trained weights as they are now, not as exported
        after = model(*data[0]).numpy()
    assert not np.allclose(after, before, atol=1e-6)
    np.testing.assert_allclose(runner.predict(x), after, rtol=1e-5, atol=1e-6)
    # any number of rows: in batches of the export's 4, the last one padded
    for rows in (1, 7, 9):
        more = torch.randn(rows, *data[0][0].shape[1:], generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            np.testing.assert_allclose(runner.predict(more.numpy()), model(more).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(RunnerError, match=r"args_0 is float32\[2, 3, 9, 9\]; the graph takes float32\[rows, 3, 8, 8\]"):
        runner.predict(np.zeros((2, 3, 9, 9), dtype=np.float32))


def test_state_saves_and_loads_and_bad_input_changes_nothing(exported, tmp_path):
    from edgetune.runtime import RunnerError, StepRunner

    folder, _, want_losses, batches = exported
    arrays = [(b[0][0].numpy(), b[1][0].numpy()) for b in batches]
    runner = StepRunner(folder)
    for x, y in arrays[:2]:
        runner.step(x, y)
    runner.save(tmp_path / "mid.safetensors")
    before = runner.state()
    with pytest.raises(RunnerError, match=r"args_0 is float64\[4, 3, 8, 8\], the graph was exported for float32"):
        runner.step(arrays[2][0].astype(np.float64), arrays[2][1])
    with pytest.raises(RunnerError, match=r"takes inputs, then targets: 2 arrays \(\['args_0', 'args_1'\]\), got 1"):
        runner.step(arrays[2][0])
    assert runner.steps == 2 and all(np.array_equal(v, before[k]) for k, v in runner.state().items())
    resumed = StepRunner(folder)
    resumed.load(tmp_path / "mid.safetensors")
    assert resumed.steps == 2
    assert [resumed.step(x, y) for x, y in arrays[2:]] == pytest.approx(want_losses[2:], rel=1e-5)
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(RunnerError, match="is not a runner state file"):
        resumed.load(tmp_path / "bad.safetensors")
    with pytest.raises(RunnerError, match="holds no manifest.json"):
        StepRunner(tmp_path / "nowhere")


def test_the_runner_refuses_what_the_trainer_refuses_and_runs_nothing(tmp_path, monkeypatch):
    """Token ids and labels outside their tables (ONNX's Gather would take -1 as the last row)
    and a batch with NaN: refused before the session runs, the step count and state as they
    were; an ignore_index label passes, and so do token ids at the table's edges."""
    from edgetune.runtime import RunnerError, StepRunner

    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(40, 4))
    ids, labels = torch.randint(0, 20, (3, 5)), torch.tensor([0, 1, 2])
    et.compile(model, F.cross_entropy, (ids,), (labels,), optimizer=et.AdamW(lr=0.01)).export_onnx(tmp_path)
    runner = StepRunner(tmp_path)
    runner.step(ids.numpy(), labels.numpy())
    before = runner.state()
    bad_label, bad_ids, far_ids = labels.numpy().copy(), ids.numpy().copy(), ids.numpy().copy()
    bad_label[1], bad_ids[0, 2], far_ids[2, 4] = -1, -1, 20
    for batch_, says in (((ids.numpy(), bad_label), r"array 1 \(target \w+\) holds -1 at \[1\], out of range for "
                                                    r"the loss's 4 classes: values must be in \[0, 4\) or -100"),
                         ((bad_ids, labels.numpy()), r"array 0 \(input \w+\) holds -1 at \[0, 2\], out of range for "
                                                    r"embedding '0' of 20 rows"),
                         ((far_ids, labels.numpy()), r"holds 20 at \[2, 4\]")):
        with pytest.raises(RunnerError, match=says):
            runner.step(*batch_)
    assert runner.steps == 1 and all(np.array_equal(v, before[k]) for k, v in runner.state().items())
    with pytest.raises(RunnerError, match=r"holds -1 at \[0, 2\]"):
        runner.predict(bad_ids)
    edges = ids.numpy().copy()
    edges[0, :2] = 0, 19
    runner.step(edges, np.array([0, -100, 3]))  # the loss's ignore_index, and the table's first and last rows
    assert runner.steps == 2


def test_the_runner_refuses_a_non_finite_batch_and_counts_no_step(exported):
    from edgetune.runtime import RunnerError, StepRunner

    folder, _, _, batches = exported
    x, y = batches[0][0][0].numpy().copy(), batches[0][1][0].numpy()
    runner = StepRunner(folder)
    before = runner.state()
    x[1, 2, 3, 4] = np.nan
    with pytest.raises(RunnerError, match=r"array 0 \(input \w+\) has 1 NaN or infinite entries of 768, the first "
                                          r"at \[1, 2, 3, 4\]; nothing was run"):
        runner.step(x, y)
    assert runner.steps == 0 and all(np.array_equal(v, before[k]) for k, v in runner.state().items())


def test_a_step_onnxruntime_has_no_kernels_for_is_refused_with_what_to_do(tmp_path, monkeypatch):
    from edgetune.runtime import RunnerError, StepRunner

    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(36, 3)).double()
    x, y = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.tensor([0, 2])
    et.compile(model, F.cross_entropy, (x,), (y,), optimizer=et.SGD(lr=0.05)).export_onnx(tmp_path)
    with pytest.raises(RunnerError, match=r"onnxruntime cannot run step.onnx .*mostly float32.*model.float\(\)"):
        StepRunner(tmp_path)  # onnxruntime has no float64 Conv on the CPU


def test_the_export_command_writes_a_step_the_runner_takes(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from edgetune.cli import main
    from edgetune.models import build
    from edgetune.runtime import StepRunner

    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    out = tmp_path / "step"
    assert main(["export", "--model", "resnet", "--size", "16", "--batch", "2", "--scheme", "bias_only",
                 "--out", str(out)]) == 0
    assert "as ONNX in" in capsys.readouterr().out
    runner = StepRunner(out)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16), dtype=np.float32)
    losses = [runner.step(x, np.array([1, 3])) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # one batch, fitted a little more each step
    assert main(["export", "--model", "nope", "--out", str(out)]) == 2
    save_file(build("resnet", num_classes=10).state_dict(), tmp_path / "ten.safetensors")
    capsys.readouterr()
    assert main(["export", "--model", "resnet", "--size", "16", "--classes", "3", "--weights",
                 str(tmp_path / "ten.safetensors"), "--out", str(tmp_path / "three")]) == 2
    assert "the same --model, and for a classifier the same --classes" in capsys.readouterr().err


def test_the_export_command_takes_a_language_model_with_its_weights(tmp_path, monkeypatch, capsys):
    """A causal LM under the default LM scheme with int8 frozen linears, started from a file of
    trained weights: the runner's step and prediction are those of the same model in torch."""
    from safetensors.torch import save_file

    from edgetune.apps.lm import compile_lm, load_lm
    from edgetune.cli import main
    from edgetune.runtime import StepRunner

    monkeypatch.setenv("EDGETUNE_MEASURE_SCRATCH", "0")
    model = load_lm("tiny-llama", seq_len=16).model
    trained = {"lm_head.weight": model.lm_head.weight.detach() * 1.5}  # as finetune-lm's trained.safetensors
    save_file(trained, tmp_path / "trained.safetensors")
    out = tmp_path / "step"
    assert main(["export", "--model", "tiny-llama", "--size", "16", "--batch", "2", "--scheme", "lm-sparse:2",
                 "--int8", "--optimizer", "adamw", "--lr", "0.001", "--weights", str(tmp_path / "trained.safetensors"),
                 "--out", str(out)]) == 0
    assert "tiny-llama, scheme lm-sparse:2" in capsys.readouterr().out
    model.lm_head.weight.data.copy_(trained["lm_head.weight"])
    trainer = compile_lm(model, et.schemes.parse("lm-sparse:2"), 2, 16, et.AdamW(lr=0.001), frozen_weights="int8")
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), trainer.dequantized():  # the frozen linears as the step holds them (int8)
        want = model(ids, torch.ones_like(ids)).logits
    runner = StepRunner(out)
    np.testing.assert_allclose(runner.predict(ids.numpy(), np.ones((2, 16), dtype=np.int64)), want.numpy(),
                               rtol=1e-4, atol=1e-4)
    for _ in range(2):
        got = runner.step(ids.numpy(), np.ones((2, 16), dtype=np.int64), ids.numpy())
        assert got == pytest.approx(trainer.step((ids, torch.ones_like(ids)), (ids,)), rel=1e-5)


# -- what an install without PyTorch holds ----------------------------------------------------

# Modules that .pth files of the environment import at start-up, not the runner.
INSTALL_HOOKS = ("__editable__", "_distutils_hack")


def assert_an_install_has(modules: list[str], extra: str) -> None:
    """Every module in `modules` comes with `pip install edgetune[extra]`: edgetune itself, or a
    distribution that edgetune's base dependencies, that extra's, or theirs in turn require.
    And that install pulls no PyTorch."""
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"][extra]]
    installed: set[str] = set()
    while wanted:  # the requirements' closure, as pip would install it (no extras of theirs)
        name = wanted.pop().name.lower().replace("_", "-")
        if name in installed:
            continue
        installed.add(name)
        wanted += [r for r in map(Requirement, md.requires(name) or [])
                   if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert "torch" not in installed, f"edgetune[{extra}] pulls PyTorch"
    dists = md.packages_distributions()
    for module in modules:
        if module == "edgetune" or module.startswith(INSTALL_HOOKS):
            continue
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        assert owners & installed, f"{module} is imported, but edgetune[{extra}] does not install it"


def test_without_torch_the_compiler_says_what_to_install():
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    api = subprocess.run([sys.executable, "-c", NO_TORCH + "import edgetune\nedgetune.compile"], env=env,
                         capture_output=True, text=True)
    assert api.returncode == 1 and "edgetune.compile needs PyTorch" in api.stderr
    assert "pip install 'edgetune[train]'" in api.stderr
    command = subprocess.run([sys.executable, "-c", NO_TORCH + "from edgetune.cli import main"], env=env,
                             capture_output=True, text=True)
    assert command.returncode == 1, command.stderr
    assert command.stderr.startswith("edgetune: error: the edgetune command needs PyTorch"), command.stderr


def test_trained_weights_put_a_runner_state_back_into_the_model(exported, tmp_path):
    """The runner's state after 5 steps, through trained_weights, is the torch backend's model
    after 5 steps: whole trained tensors, partially trained ones with their channels in place,
    frozen ones untouched; a state or model that does not fit is refused."""
    from edgetune.runtime import RunnerError, StepRunner, trained_weights

    folder, trainer, _, batches = exported
    runner = StepRunner(folder)
    for b in batches:
        runner.step(b[0][0].numpy(), b[1][0].numpy())
    runner.save(tmp_path / "after.safetensors")
    start = {k: v.numpy() for k, v in seeded_convnet().state_dict().items()}
    got = trained_weights(folder, tmp_path / "after.safetensors", start)
    assert any("part" in i for i in json.loads((folder / "manifest.json").read_text())["inputs"])
    for key, want in trainer.model.state_dict().items():
        if key in got and got[key].dtype.kind == "f":
            np.testing.assert_allclose(got[key], want.numpy(), atol=1e-5, rtol=1e-4, err_msg=key)
    with pytest.raises(RunnerError, match="the model has no 'head.weight'"):
        trained_weights(folder, tmp_path / "after.safetensors", {k: v for k, v in start.items() if k != "head.weight"})


def test_sessions_stop_their_workers_spinning_when_a_run_returns():
    """The runner's and the onnxruntime backend's sessions: onnxruntime's workers would spin on
    a core for tens of milliseconds after each step, against the process's next work (torch's
    threads in the backend, a data pipeline) and the machine's."""
    import onnxruntime as ort

    from edgetune.compiler.backends.ort import session_options
    from edgetune.runtime.runner import lean_session_options

    for options in (lean_session_options(ort), session_options(ort, threads=2)):
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
