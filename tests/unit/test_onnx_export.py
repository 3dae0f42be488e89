"""The whole training step exported as ONNX and run by onnxruntime, against the torch backend.

Each case compiles a Trainer, exports it before any step, then runs 5 steps on both: the
torch Trainer, and onnxruntime fed the exported state and its own outputs back (the
manifest's `next_step`). Losses and every carried tensor (trained parameters, optimizer
state, written buffers) must agree; frozen weights are initializers the step cannot write,
and the untrained channels of a partially trained weight come back bitwise unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import edgetune as et  # noqa: E402
from edgetune.compiler.backends.onnx import ExportError, export_step, to_onnx  # noqa: E402
from edgetune.compiler.ir.builder import Builder  # noqa: E402
from edgetune.compiler.ir.graph import Graph  # noqa: E402
from edgetune.compiler.ir.ops import OPS  # noqa: E402
from tests.ops.test_onnx_lowering import single_threaded  # noqa: E402
from tests.unit.nets import ConvNet  # noqa: E402
from tests.unit.nets import batch as conv_batch  # noqa: E402

STEPS = 5
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp_batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4, 6, generator=g, dtype=dtype),), (torch.randint(0, 3, (4,), generator=g),)


def cross_entropy(out, y):
    return nn.functional.cross_entropy(out, y)


CONV_PARTIAL = {"pw.weight": 0.5, "*.bias": "full", "head.*": "full"}
# Each compile costs seconds (torch.export in a child process), so each case covers several
# things at once: eval mode folds the frozen stem's BN into its conv; the MLP in float64 is
# compiled with on_nonfinite="raise"; one case is exported with its weights as external data;
# the MLP trained partially holds its frozen fc2.weight as int8 (frozen_weights="int8").
CASES = {  # name: (model, train mode, scheme, optimizer, dtype, on_nonfinite)
    "convnet-train-full-sgd": (ConvNet, True, et.schemes.full(), et.SGD(lr=0.1, momentum=0.9), torch.float32,
                               "skip"),
    "convnet-train-bias-adamw": (ConvNet, True, et.schemes.bias_only(), et.AdamW(lr=0.01), torch.float32, "skip"),
    "convnet-train-partial-sgd": (ConvNet, True, CONV_PARTIAL, et.SGD(lr=0.1, momentum=0.9), torch.float32, "skip"),
    "convnet-eval-partial-adamw": (ConvNet, False, CONV_PARTIAL, et.AdamW(lr=0.01), torch.float32, "skip"),
    "convnet-train-partial-adafactor": (ConvNet, True, CONV_PARTIAL, et.Adafactor(lr=0.01, weight_decay=0.1),
                                        torch.float32, "skip"),
    "mlp-full-adamw-f64": (MLP, True, et.schemes.full(), et.AdamW(lr=0.01, weight_decay=0.1), torch.float64,
                           "raise"),
    "mlp-partial-first-sgd": (MLP, True, {"fc1.weight": {"ratio": 0.5, "select": "first"}, "*.bias": "full"},
                              et.SGD(lr=0.1, momentum=0.9, nesterov=True), torch.float32, "skip"),
}
EXTERNAL_DATA_CASE = "convnet-eval-partial-adamw"
INT8_CASE = "mlp-partial-first-sgd"


def make_batch(model_cls, seed, dtype):
    if model_cls is MLP:
        return mlp_batch(seed, dtype)
    x, y = conv_batch(n=8, size=16, seed=seed)  # large enough for the bit-mask pass to pack a ReLU
    return tuple(t.to(dtype) for t in x), y


def compiled(case):
    model_cls, train, scheme, optimizer, dtype, on_nonfinite = CASES[case]
    torch.manual_seed(0)
    model = model_cls().to(dtype).train(train)
    x, y = make_batch(model_cls, 0, dtype)
    int8 = "int8" if case == INT8_CASE else "float"
    return et.compile(model, cross_entropy, x, y, scheme=scheme, optimizer=optimizer, on_nonfinite=on_nonfinite,
                      frozen_weights=int8)


class OnnxStep:
    """An exported step run by onnxruntime, its carried tensors fed back at every step."""

    def __init__(self, folder: str) -> None:
        with open(os.path.join(folder, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.session = ort.InferenceSession(os.path.join(folder, "step.onnx"), single_threaded(),
                                            providers=["CPUExecutionProvider"])
        from safetensors.numpy import load_file

        self.carried = load_file(os.path.join(folder, "state.safetensors"))
        self.initial = {k: v.copy() for k, v in self.carried.items()}
        self.steps = self.manifest["steps_done"]

    def step(self, inputs, targets, lr):
        batch = list(inputs) + list(targets)
        feeds = dict(self.carried, lr=torch.tensor(lr, dtype=torch.float64).numpy(),
                     step=torch.tensor(self.steps + 1).numpy())
        for i in self.manifest["inputs"]:
            if i["kind"] in ("input", "target"):
                feeds[i["name"]] = batch[i["key"]].numpy()
        outs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feeds)))
        for output, input_name in self.manifest["next_step"].items():
            self.carried[input_name] = outs[output]
        self.steps += 1
        return outs

    def by_key(self, kind):
        """{key: final value} of the carried inputs of one kind (a partially trained weight:
        its trained channels only)."""
        return {i["key"]: torch.from_numpy(self.carried[i["name"]]) for i in self.manifest["inputs"]
                if i["kind"] == kind}

    def parts(self):
        """{key: manifest "part"} of the partially trained weights."""
        return {i["key"]: i["part"] for i in self.manifest["inputs"] if "part" in i}


@dataclass
class Run:
    """A case after STEPS steps on both backends, and where it started."""

    trainer: Any
    runner: OnnxStep
    model: Any  # the exported onnx.ModelProto
    folder: Path
    torch_losses: list[float]
    onnx_losses: list[float]
    initial: dict[str, torch.Tensor]  # the model's state_dict before any step


def run_both(case: str, folder: Path) -> Run:
    trainer = compiled(case)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    if case == EXTERNAL_DATA_CASE:
        model = export_step(trainer, str(folder), external_data_bytes=256)
    else:
        model = trainer.export_onnx(str(folder))
    onnx.checker.check_model(model, full_check=True)
    run = Run(trainer, OnnxStep(str(folder)), model, folder, [], [], initial)
    for s in range(1, STEPS + 1):
        x, y = make_batch(CASES[case][0], s, CASES[case][4])
        run.torch_losses.append(trainer.step(x, y))
        out = run.runner.step(x, y, trainer.lr)
        run.onnx_losses.append(float(out["loss"]))
        assert int(out["skipped"]) == 0
    return run


def check_matches_torch_backend(case: str, run: Run) -> None:
    tol = TOLERANCE[CASES[case][4]]
    torch.testing.assert_close(torch.tensor(run.onnx_losses), torch.tensor(run.torch_losses), **tol)
    trainer = run.trainer
    params, buffers = dict(trainer.model.named_parameters()), dict(trainer.model.named_buffers())
    parts = run.runner.parts()
    for kind, held in (("param", params), ("buffer", buffers), ("state", trainer.state)):
        for key, value in run.runner.by_key(kind).items():
            want = held[key].detach()
            if kind == "param" and key in parts:  # the step carries only the trained channels
                want = want.index_select(parts[key]["axis"], torch.tensor(parts[key]["channels"]))
            torch.testing.assert_close(value, want, **tol, msg=lambda m: f"{kind} {key}: {m}")
    assert set(run.runner.by_key("param")) == {u.name for u in trainer.updates}
    assert set(run.runner.by_key("state")) == set(trainer.state)


def check_frozen_and_untrained_stay_bitwise(case: str, run: Run) -> None:
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in run.model.graph.initializer}
    carried = {i["key"] for i in run.runner.manifest["inputs"] if i["kind"] in ("param", "buffer")}
    frozen = {i["key"]: i["name"] for i in run.runner.manifest["frozen"]}
    left_out = set(run.initial) - set(frozen) - carried
    users = run.trainer.graph.users()
    unread = {n.attrs["target"] for n in run.trainer.graph.inputs if n.attrs["kind"] in ("param", "buffer")
              and not users[n]}
    assert left_out <= unread, "every model tensor the step reads is either carried or frozen"
    int8 = {(kind, key): held[k] for key, held in run.trainer.int8.items()
            for k, kind in enumerate(("int8", "int8_scale"))}
    for i in run.runner.manifest["frozen"]:
        # A frozen tensor is an initializer of the step, which no node can write.
        want = int8.get((i["kind"], i["key"]), run.initial[i["key"]])
        assert torch.equal(torch.tensor(initializers[i["name"]]), want), f"frozen {i['kind']} {i['key']} differs"
    if case == INT8_CASE:  # int8 in the model too, dequantized in the graph where used
        assert int8 and any(t.data_type == onnx.TensorProto.INT8 for t in run.model.graph.initializer)
    masks, parts = run.trainer.trained_masks(), run.runner.parts()
    for key, value in run.runner.by_key("param").items():
        if key in parts:
            check_split(run, key, value, parts[key], masks[key], initializers)
            continue
        untrained = ~masks[key]
        assert torch.equal(value[untrained], run.initial[key][untrained]), f"untrained entries of {key} changed"
        assert not torch.equal(value, run.initial[key]), f"{key} did not train"


def check_split(run: Run, key: str, trained, part: dict, mask, initializers) -> None:
    """A partially trained weight is carried as its trained channels alone; the rest is an
    initializer, bitwise the weight's untrained channels; put back together (put_part), the
    channels the trainer trained are those the runner carries."""
    from edgetune.runtime import put_part

    axis, initial = part["axis"], run.initial[key]
    assert list(trained.shape) == [len(part["channels"]) if d == axis else n for d, n in enumerate(initial.shape)]
    rest = [c for c in range(initial.shape[axis]) if c not in part["channels"]]
    assert torch.equal(torch.from_numpy(initializers[part["frozen"]]), initial.index_select(axis, torch.tensor(rest)))
    whole = torch.from_numpy(put_part(initial.numpy(), trained.numpy(), part))
    assert torch.equal(whole[~mask], initial[~mask]) and not torch.equal(whole[mask], initial[mask]), key


def check_bit_masks_were_exported(case: str, run: Run) -> None:
    ops = {n.op.removesuffix("_inplace") for n in run.trainer.graph.nodes}
    assert {"pack_mask", "masked_grad"} <= ops, "the case no longer exercises the bit-mask ops"
    to_uint8 = [n for n in run.model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.UINT8]
    assert to_uint8 and {"MatMul", "Gather"} <= {n.op_type for n in run.model.graph.node}  # packed, unpacked


def check_standard_ops_only(case: str, run: Run) -> None:
    assert [(o.domain, o.version) for o in run.model.opset_import] == [("", 18)]
    assert {n.domain for n in run.model.graph.node} == {""}


def check_manifest(case: str, run: Run) -> None:
    m = run.runner.manifest
    carried = [i["name"] for i in m["inputs"] if i["kind"] in ("param", "buffer", "state")]
    assert sorted(m["next_step"].values()) == sorted(carried)
    assert sorted(run.runner.initial) == sorted(carried)
    assert {i["kind"] for i in m["inputs"]} == {"param", "buffer", "state", "input", "target", "hyper"}
    assert m["scheme"] == et.schemes.as_mapping(run.trainer.rules) and m["scheme"]["pw.weight"]["ratio"] == 0.5
    assert m["optimizer"]["name"] == "SGD" and m["optimizer"]["momentum"] == 0.9 and m["optimizer"]["lr"] == 0.1
    assert m["edgetune_version"] == et.__version__ and m["opset"] == 18 and m["on_nonfinite"] == "skip"


def check_a_nonfinite_step_writes_nothing(case: str, run: Run) -> None:
    """A NaN in the batch makes the loss NaN: every guarded write keeps its old value bitwise,
    and `skipped` counts them ("raise": a runner raises on skipped > 0; nothing changed)."""
    runner = OnnxStep(str(run.folder))  # from the exported start again
    assert runner.manifest["on_nonfinite"] == CASES[case][5]
    x, y = make_batch(MLP, 1, CASES[case][4])
    x[0][0, 0] = float("nan")
    out = runner.step(x, y, run.trainer.lr)
    assert int(out["skipped"]) == len(run.trainer.updates)
    for name, value in runner.carried.items():
        assert (value == runner.initial[name]).all(), name
    out = runner.step(*make_batch(MLP, 1, CASES[case][4]), run.trainer.lr)  # the same batch, finite
    assert int(out["skipped"]) == 0
    assert float(out["loss"]) == pytest.approx(run.torch_losses[0], rel=1e-6)


def check_external_data(case: str, run: Run) -> None:
    """The weights were written beside the model, and the steps above ran from those files."""
    assert (run.folder / "step.onnx.data").stat().st_size > 0
    saved = onnx.load(str(run.folder / "step.onnx"), load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in saved.graph.initializer)
    onnx.checker.check_model(str(run.folder / "step.onnx"), full_check=True)


EXTRA_CHECKS = {
    "convnet-train-partial-sgd": (check_standard_ops_only, check_manifest),
    "convnet-train-bias-adamw": (check_bit_masks_were_exported,),
    "convnet-eval-partial-adamw": (check_external_data,),
    "mlp-partial-first-sgd": (check_a_nonfinite_step_writes_nothing,),
    "mlp-full-adamw-f64": (check_a_nonfinite_step_writes_nothing,),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_step_matches_the_torch_backend(case, tmp_path):
    """All checks of a case in one test: one compile each (seconds), however tests are spread
    over workers."""
    run = run_both(case, tmp_path)
    check_matches_torch_backend(case, run)
    check_frozen_and_untrained_stay_bitwise(case, run)
    for check in EXTRA_CHECKS.get(case, ()):
        check(case, run)


# -- errors and files ----------------------------------------------------------------------------

def test_an_op_without_lowering_is_named_with_its_module(monkeypatch):
    monkeypatch.setitem(OPS, "neg", dataclasses.replace(OPS["neg"], onnx=None))  # as if it had none yet
    b = Builder()
    x = b.input("x", (3, 4), torch.float32, kind="input", index=0)
    b.meta = {"module": "encoder.block2"}
    y = b.emit("neg", x)
    with pytest.raises(ExportError, match=r"op 'neg' \(module 'encoder.block2'\) has no ONNX lowering"):
        to_onnx(Graph(b.nodes, {"out": y}))
