"""The exported step in a real browser: `edgetune web-demo`'s page in headless Chromium (Debian's
/usr/bin/chromium, driven by playwright-core from web/node_modules through web/drive.mjs),
checked in Python against edgetune.runtime.StepRunner on the same folder. `make test` installs
both (the Makefile's web target); where either is missing these tests skip, saying so.

Screenshots of the page are kept in runs/test-artifacts/web/ (or $EDGETUNE_TEST_ARTIFACTS)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from edgetune.web import ORT_FILES  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("EDGETUNE_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts")) / "web"

LR = 0.001  # the batch is the same at every step: a small rate keeps the run far from diverging


def _browser_missing() -> str | None:
    if not shutil.which("node"):
        return "node is not installed"
    if not (REPO / "web" / "node_modules" / "playwright-core").is_dir():
        return "web/node_modules is not installed (npm ci --prefix web)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    return None


needs_browser = pytest.mark.skipif(_browser_missing() is not None,
                                   reason=f"browser tests: {_browser_missing()}; `make test` installs it")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The demo page built small (64 px), a batch of 8 packaged digits for the driver, served."""
    if _browser_missing():
        pytest.skip(f"browser tests: {_browser_missing()}")
    from edgetune.web.demo import build, sample_batch
    from edgetune.web.serve import address, make_server, start_in_thread

    folder = build(tmp_path_factory.mktemp("web") / "site", size=64)
    x, y = sample_batch(folder)
    _write_batch(folder, x, y, lr=LR)
    server = make_server(folder)
    start_in_thread(server)
    yield folder, address(server), x, y
    server.shutdown()


def _write_batch(folder: Path, x: np.ndarray, y: np.ndarray, lr: float | None = None) -> None:
    from edgetune.web.browser import write_test_batch

    write_test_batch(folder, [x, y], ["input", "target"], lr)


def _pretrained_demo_model() -> torch.nn.Module:
    from edgetune.models.pretrained import load_pretrained
    from edgetune.web.demo import CLASSES, MODEL

    torch.manual_seed(0)  # the new head's initial values are overwritten: it trains
    return load_pretrained(MODEL, len(CLASSES)).model.eval()


def _drive(mode: str, url: str, out: Path, *args: str) -> dict:
    from edgetune.web.browser import drive

    return drive(mode, url, *args, out=out, timeout=600)


def _keep(out: Path, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / name, ARTIFACTS / name)


@needs_browser
def test_page_steps_as_python_does(site, tmp_path):
    """20 steps in Chromium on one batch: each step's loss is the Python runner's from the same
    state, the downloaded state gives Python (StepRunner, and the PyTorch model through
    trained_weights) the page's logits, and a reload resumes.

    The whole 20-step loss curves are not compared: on this model a 1e-6 relative change of the
    input alone moves Python's own loss by ~2e-4 by step 20 (ReLU6 masks flip as weights move),
    so two correct runtimes that round differently (WASM against x86 kernels) drift apart. Each
    step is compared from the same state instead; the first steps also from the start."""
    from edgetune.runtime import StepRunner, trained_weights

    folder, url, x, y = site
    keep = [4, 9, 14, 19]
    got = _drive("check", url, tmp_path, "--steps", "20", "--keep", ",".join(map(str, keep)))
    _keep(tmp_path, "after-training.png")
    assert got["steps"] == 20 and len(got["losses"]) == 20, got

    python = StepRunner(folder / "model")
    python.lr = LR
    first = [python.step(x, y) for _ in range(4)]
    np.testing.assert_allclose(got["losses"][:4], first, atol=1e-4, rtol=0)

    for k in keep:  # from the page's state after step k, one step in Python = the page's step k+1
        runner = StepRunner(folder / "model")
        runner.load(tmp_path / f"state-{k}.safetensors")
        assert runner.steps == k and runner.lr == LR
        assert abs(runner.step(x, y) - got["losses"][k]) < 1e-4, (k, got["losses"][k])
    page_final = StepRunner(folder / "model")
    page_final.load(tmp_path / "state-20.safetensors")
    for key, value in runner.state().items():  # step 20 from the page's step 19, in Python
        np.testing.assert_allclose(page_final.state()[key], value, atol=1e-4, rtol=1e-4, err_msg=key)

    # the downloaded weights, in Python, give the page's logits
    logits = np.array(got["logits"], np.float32).reshape(len(x), -1)
    np.testing.assert_allclose(page_final.predict(x), logits, atol=1e-4, rtol=0)
    assert not np.allclose(StepRunner(folder / "model").predict(x), logits, atol=1e-2)  # it trained
    # ... and in the PyTorch model the folder was exported from
    model = _pretrained_demo_model()
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           trained_weights(folder / "model", tmp_path / "state-20.safetensors", weights).items()})
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), logits, atol=1e-4, rtol=0)

    # a reload resumed from IndexedDB: same step count, same predictions
    again = got["afterReload"]
    assert again["resumed"] and again["steps"] == 20
    np.testing.assert_allclose(np.array(again["logits"], np.float32).reshape(logits.shape), logits, atol=1e-6)


@needs_browser
def test_demo_page_as_a_user_would(site, tmp_path):
    """The demo's path through its buttons: the sample digits, Train (60 steps, augmented), the
    held-out accuracy before and after, and a download that Python's runner loads."""
    from edgetune.runtime import StepRunner

    folder, url, _, _ = site
    got = _drive("demo", url, tmp_path)
    _keep(tmp_path, "demo.png")
    assert got["steps"] == 60 and len(got["losses"]) == 60, got
    assert got["after"] > got["before"] + 0.2, (got["before"], got["after"])  # 10 classes: chance is 0.1
    runner = StepRunner(folder / "model")
    runner.load(tmp_path / "downloaded.safetensors")
    assert runner.steps == 60


@needs_browser
def test_demo_page_learns_what_a_user_draws(site, tmp_path):
    """Drawing on the pad: two classes renamed "O" and "X", four drawings each (the fourth held
    out), 10 steps; a new circle is then classified among those two classes only, as "O"."""
    folder, url, _, _ = site
    got = _drive("draw", url, tmp_path)
    _keep(tmp_path, "draw.png")
    assert got["steps"] == 10 and got["after"] == 1.0, got  # both held-out drawings right
    names = [row.rstrip("0123456789.%") for row in got["top3"]]
    assert names == ["O", "X"], got["top3"]


@pytest.fixture(scope="module")
def small_site(tmp_path_factory):
    if not (REPO / "web" / "node_modules" / "onnxruntime-web").is_dir():
        pytest.skip("web/node_modules is not installed (npm ci --prefix web); `make test` installs it")
    """`export_web` of a small CNN (convolutions, BatchNorm, ReLU, a partially trained conv,
    AdamW), not the demo's model, with a batch for the driver, served."""
    import edgetune as et
    from edgetune.web import export_web
    from edgetune.web.serve import address, make_server, start_in_thread

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    scheme = {"3.weight": 0.5, "7.weight": "full", "7.bias": "full", "1.bias": "full"}
    trainer = et.compile(model, torch.nn.functional.cross_entropy, (x,), (y,), scheme=scheme,
                         optimizer=et.AdamW(lr=LR))
    folder = export_web(trainer, tmp_path_factory.mktemp("web") / "small")
    _write_batch(folder, x.numpy(), y.numpy())
    server = make_server(folder)
    start_in_thread(server)
    yield folder, address(server), x.numpy(), y.numpy()
    server.shutdown()


def test_export_web_from_the_command_line(small_site, tmp_path, capsys):
    """`edgetune export --web DIR` writes the folder the page loads (small_site: node_modules is there)."""
    from edgetune.cli import main

    assert main(["export", "--model", "resnet", "--scheme", "bias_only", "--size", "16", "--batch", "2",
                 "--classes", "3", "--web", str(tmp_path / "site")]) == 0
    manifest = json.loads((tmp_path / "site" / "model" / "manifest.json").read_text())
    assert manifest["web"]["demo"]["classes"] == ["0", "1", "2"] and manifest["web"]["demo"]["size"] == 16
    assert (tmp_path / "site" / "edgetune-web.js").is_file() and (tmp_path / "site" / "ort" / ORT_FILES[0]).is_file()
    assert "python -m edgetune.web.serve" in capsys.readouterr().out


@needs_browser
def test_a_language_model_steps_in_the_page(tmp_path):
    """A Llama-style LM (ids, mask and labels; the fused vocabulary loss; lm-sparse:2) exported
    with `export --web`: the page, which has no drawing for it, still loads its trainer, which
    steps as Python's runner does, predicts its logits, and resumes after a reload."""
    from edgetune.cli import main
    from edgetune.runtime import StepRunner
    from edgetune.web.browser import write_test_batch
    from edgetune.web.serve import address, make_server, start_in_thread

    site = tmp_path / "site"
    assert main(["export", "--model", "tiny-llama", "--scheme", "lm-sparse:2", "--batch", "2", "--size", "16",
                 "--lr", "0.01", "--web", str(site)]) == 0
    ids = np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int64)
    mask = np.ones_like(ids)
    write_test_batch(site, [ids, mask, ids], ["input", "input", "target"])
    server = make_server(site)
    start_in_thread(server)
    try:
        got = _drive("check", address(server), tmp_path / "out", "--steps", "5")
    finally:
        server.shutdown()
    python = StepRunner(site / "model")
    np.testing.assert_allclose(got["losses"], [python.step(ids, mask, ids) for _ in range(5)], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(got["logits"]), python.predict(ids, mask).ravel(), atol=1e-4, rtol=0)
    assert got["afterReload"]["resumed"] and got["afterReload"]["steps"] == 5


def test_export_web_describes_an_image_classifier(small_site):
    """What the page reads of any exported image classifier, and the files it fetches."""
    folder = small_site[0]
    web = json.loads((folder / "model" / "manifest.json").read_text())["web"]
    assert web["demo"]["classes"] == ["0", "1", "2", "3", "4"] and web["demo"]["size"] == 16
    assert web["demo"]["trainable_params"] > 0 and web["demo"]["predicted_peak_bytes"] > 0
    assert set(web["external_data"]) == {"step.onnx", "predict.onnx"} and len(web["fingerprint"]) == 16
    for files in web["external_data"].values():
        assert all((folder / "model" / f).is_file() for f in files)
    assert all((folder / "ort" / f).is_file() for f in ORT_FILES)
    assert all((folder / f).is_file() for f in ("index.html", "demo.js", "edgetune-web.js"))


@needs_browser
def test_page_steps_on_webgpu(small_site, tmp_path):
    """onnxruntime-web's WebGPU provider (on SwiftShader, Chromium's software GPU: slow, but the
    same shaders a GPU runs) steps an exported model as Python does."""
    from edgetune.runtime import StepRunner

    folder, url, x, y = small_site
    got = _drive("gpu", url, tmp_path, "--steps", "3")
    assert got["device"] == "webgpu", got
    python = StepRunner(folder / "model")
    np.testing.assert_allclose(got["losses"], [python.step(x, y) for _ in range(3)], atol=1e-4, rtol=0)


JS_HELPERS = """
import { seedsFor, readSafetensors, writeSafetensors } from %s;
import { readFileSync, writeFileSync } from "node:fs";
const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const seeds = cases.seeds.map(([step, seed, directions, pool]) => seedsFor(step, seed, directions, pool));
const read = readSafetensors(new Uint8Array(readFileSync(process.argv[3])));
writeFileSync(process.argv[4], writeSafetensors(read.tensors, read.metadata));
process.stdout.write(JSON.stringify({ seeds, metadata: read.metadata }));
"""


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_js_seeds_and_safetensors_match_python(tmp_path):
    """edgetune-web.js draws MeZO's seeds as edgetune.runtime.seeds does, and reads and writes
    safetensors files that the safetensors package reads back bit for bit."""
    from safetensors.numpy import load_file, save_file

    from edgetune.runtime.seeds import seeds_for

    cases = [[1, 0, 1, None], [7, 12345, 4, None], [2**31 + 5, 2**32 + 3, 3, None], [30, 9, 2, [11, 22, 33, 44, 55]]]
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "w:exp_avg": np.array([-1.5], np.float64),
               "step": np.array(3, np.int64), "ids": np.array([1, 2, 3], np.int32), "mask": np.array([0, 255], np.uint8)}
    save_file(tensors, tmp_path / "in.safetensors", metadata={"steps": "3", "lr": "0.01"})
    (tmp_path / "cases.json").write_text(json.dumps({"seeds": cases}))
    script = tmp_path / "helpers.mjs"
    script.write_text(JS_HELPERS % json.dumps((REPO / "edgetune" / "web" / "static" / "edgetune-web.js").as_uri()))
    run = subprocess.run(["node", "--experimental-detect-module", str(script), str(tmp_path / "cases.json"),
                          str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["seeds"] == [seeds_for(*c) for c in cases]
    assert got["metadata"] == {"steps": "3", "lr": "0.01"}
    back = load_file(tmp_path / "out.safetensors")
    assert set(back) == set(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


JS_REFUSALS = """
import { refuseBadValues } from %s;
const specs = [{ name: "args_0", kind: "input", dtype: "float32" },
               { name: "args_1", kind: "target", dtype: "int64",
                 indexes: [{ size: 4, ignored: [-100], table: "the loss's 4 classes" }] },
               { name: "args_2", kind: "input", dtype: "float32", attention_mask: true }];
const mask = Float32Array.of(0, -Infinity);
const cases = {
  fine: [Float32Array.of(0.5, -2), BigInt64Array.of(0n, 3n, -100n), mask],
  negative: [Float32Array.of(0.5, -2), BigInt64Array.of(0n, -1n, 2n), mask],
  beyond: [Float32Array.of(0.5, -2), BigInt64Array.of(4n, 1n, 2n), mask],
  nan: [Float32Array.of(0.5, NaN), BigInt64Array.of(0n, 1n, 2n), mask],
  minus_inf: [Float32Array.of(0.5, -Infinity), BigInt64Array.of(0n, 1n, 2n), mask],
  mask_nan: [Float32Array.of(0.5, -2), BigInt64Array.of(0n, 1n, 2n), Float32Array.of(NaN, -Infinity)],
  mask_plus_inf: [Float32Array.of(0.5, -2), BigInt64Array.of(0n, 1n, 2n), Float32Array.of(Infinity, 0)],
};
const out = {};
for (const [name, arrays] of Object.entries(cases)) {
  for (const finite of [true, false]) {
    try { refuseBadValues(arrays, specs, finite); out[`${name}/${finite}`] = "ok"; }
    catch (e) { out[`${name}/${finite}`] = e.message; }
  }
}
process.stdout.write(JSON.stringify(out));
"""


@pytest.mark.skipif(not shutil.which("node"), reason="node is not installed")
def test_js_trainer_refuses_the_batches_the_python_runner_refuses(tmp_path):
    """edgetune-web.js checks a batch as runtime/runner.py does, from the manifest's "indexes":
    labels outside the classes (not the ignore_index), and NaN unless on_nonfinite is 'apply';
    an attention mask (the manifest's "attention_mask") may hold -inf, not NaN or +inf."""
    script = tmp_path / "refusals.mjs"
    script.write_text(JS_REFUSALS % json.dumps((REPO / "edgetune" / "web" / "static" / "edgetune-web.js").as_uri()))
    run = subprocess.run(["node", "--experimental-detect-module", str(script)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    assert got["fine/true"] == got["fine/false"] == got["nan/false"] == "ok"
    for finite in ("true", "false"):
        assert got[f"negative/{finite}"] == ("array 1 (target args_1) holds -1 at flat position 1, out of range for the "
                                             "loss's 4 classes: values must be in [0, 4) or -100 (ignored); nothing was run")
        assert got[f"beyond/{finite}"].startswith("array 1 (target args_1) holds 4 at flat position 0")
    assert got["nan/true"].startswith("array 0 (input args_0) has a NaN or infinite value at flat position 1")
    assert got["minus_inf/true"].startswith("array 0 (input args_0) has a NaN or infinite value at flat position 1")
    assert got["mask_nan/true"].startswith("array 2 (input args_2) has a NaN or infinite value at flat position 0")
    assert got["mask_plus_inf/true"].startswith("array 2 (input args_2) has a NaN or infinite value at flat position 0")
    assert got["minus_inf/false"] == got["mask_nan/false"] == "ok"


def test_export_web_says_how_to_install_onnxruntime_web(monkeypatch, tmp_path, capsys):
    from edgetune.cli import main
    from edgetune.web import WebExportError, onnxruntime_web_dist

    monkeypatch.setenv("EDGETUNE_ORT_WEB", str(tmp_path))
    with pytest.raises(WebExportError, match="npm ci --prefix"):
        onnxruntime_web_dist()
    assert main(["export", "--model", "resnet", "--web", str(tmp_path / "site")]) == 2  # before any compile
    assert "onnxruntime-web is not installed" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()
