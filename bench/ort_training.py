"""ONNX Runtime on-device training (onnxruntime-training 1.19.2, deprecated) on MobileNetV2, for
comparison with edgetune's backends (issue 11).

    python3.11 -m venv bench/.venv-ort-training
    bench/.venv-ort-training/bin/pip install /opt/wheels/torch-2.13.0+cpu-*.whl onnxruntime-training==1.19.2
    bench/.venv-ort-training/bin/python -m bench.ort_training --batches 1,8 --schemes bias-only,full,last-3,tte-whole

Steps: (1) the main venv (.venv, where edgetune is installed) exports MobileNetV2 width 1.0
(eval mode, 128x128, 10 classes, seeded as bench/configs.py builds it) with torch.onnx
(TorchScript exporter, no constant folding, so BatchNormalization keeps its parameters as
initializers named after the module's parameters), and writes each scheme's trained parameter
names as edgetune's own rules pick them. (2) This venv's
`onnxruntime.training.artifacts.generate_artifacts` builds the training, eval and optimizer
graphs and the checkpoint for each scheme (requires_grad = the trained names, frozen_params =
the rest, CrossEntropyLoss, SGD). (3) Each scheme x batch x mode runs in a fresh process
(`--child`): the training API's CheckpointState / Module / Optimizer, one intra-op thread;
step = module(x, y), optimizer.step(), module.lazy_reset_grad().
Memory (with MALLOC_MMAP_THRESHOLD_=65536): VmHWM reset once the checkpoint (the parameters)
is loaded and the batch built; the peak over Module + Optimizer creation + 1 warm-up + 5 steps
above that, and the 5 steps' own rise above the RSS that setup left (the same split as
bench/run_one.py). Time: 2 warm-ups, then the median wall and CPU time of --steps steps.

What it cannot express: partial channels of a weight (requires_grad is per tensor), so the
TTE scheme runs here with its weights whole ("tte-whole": the same tensors as edgetune's tte,
each trained in full); momentum (its SGD is plain `SGDOptimizerV2`; only AdamW has state).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
WORK = Path(os.environ.get("ORT_TRAINING_DIR", "/tmp/edgetune-ort-training"))
LR = 0.01  # bench/configs.py's
MEMORY_STEPS = 5
SCHEMES = ["full", "bias-only", "last-3", "tte-whole"]


# -- (1) export, in the main venv -----------------------------------------------------------------

def export(batches: list[int]) -> None:
    import numpy as np
    import torch

    from bench import configs
    from edgetune.apps.baseline import freeze_to

    WORK.mkdir(parents=True, exist_ok=True)
    trained = {}
    for name in SCHEMES:
        model = configs.build_model("mobilenetv2")
        masks = dict((id(p), m) for p, m in freeze_to(model, configs.scheme("mobilenetv2", name.removesuffix("-whole"))))
        trained[name] = {"names": [n for n, p in model.named_parameters() if p.requires_grad],
                         "partial": [n for n, p in model.named_parameters() if masks.get(id(p)) is not None]}
    (WORK / "schemes.json").write_text(json.dumps(trained, indent=1))
    for batch in batches:
        model = configs.build_model("mobilenetv2")
        x, y = configs.build_batch(batch)
        np.save(WORK / f"x-b{batch}.npy", x.numpy())  # the benchmark's own batch, for every process
        np.save(WORK / f"y-b{batch}.npy", y.numpy())
        torch.onnx.export(model, (x,), str(WORK / f"mobilenetv2-b{batch}.onnx"), dynamo=False,
                          input_names=["input"], output_names=["logits"], training=torch.onnx.TrainingMode.EVAL,
                          do_constant_folding=False, export_params=True, opset_version=17)
        undo_deduplication(WORK / f"mobilenetv2-b{batch}.onnx")
        eval_bn(WORK / f"mobilenetv2-b{batch}.onnx", WORK / f"mobilenetv2-b{batch}-evalbn.onnx")


def undo_deduplication(path: Path) -> None:
    """The exporter keeps one copy of initializers with equal values (a fresh model's BN weights
    are all ones, its biases zeros) and names the others through Identity nodes; the training
    artifacts need every parameter as an initializer of its own name."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def eval_bn(path: Path, out: Path) -> None:
    """The generator turns every BatchNormalization into a training-mode one (batch statistics,
    running statistics updated), whatever mode the model was exported in. This copy spells
    eval-mode BN out in elementwise ops instead, so the running statistics stay frozen as in
    edgetune's and eager's steps: y = x * s + (b - mean * s), s = w / sqrt(var + eps)."""
    import onnx
    from onnx import helper, numpy_helper
    import numpy as np

    model = onnx.load(str(path))
    nodes, consts = [], [numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "evalbn_shape")]
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            nodes.append(n)
            continue
        x, w, b, mean, var = n.input
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        k = n.output[0]
        consts.append(numpy_helper.from_array(np.array(eps, dtype=np.float32), f"{k}/eps"))
        nodes += [helper.make_node("Add", [var, f"{k}/eps"], [f"{k}/var_eps"]),
                  helper.make_node("Sqrt", [f"{k}/var_eps"], [f"{k}/std"]),
                  helper.make_node("Div", [w, f"{k}/std"], [f"{k}/scale"]),
                  helper.make_node("Mul", [mean, f"{k}/scale"], [f"{k}/mean_scale"]),
                  helper.make_node("Sub", [b, f"{k}/mean_scale"], [f"{k}/shift"]),
                  helper.make_node("Reshape", [f"{k}/scale", "evalbn_shape"], [f"{k}/scale_c11"]),
                  helper.make_node("Reshape", [f"{k}/shift", "evalbn_shape"], [f"{k}/shift_c11"]),
                  helper.make_node("Mul", [x, f"{k}/scale_c11"], [f"{k}/scaled"]),
                  helper.make_node("Add", [f"{k}/scaled", f"{k}/shift_c11"], [k])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(consts)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))


# -- (2) artifacts, in this venv ------------------------------------------------------------------

def artifacts(scheme: str, batch: int, bn: str) -> Path:
    import onnx
    from onnxruntime.training import artifacts as art

    out = WORK / f"{scheme}-b{batch}-{bn}bn"
    if (out / "training_model.onnx").exists():
        return out
    model = onnx.load(str(WORK / f"mobilenetv2-b{batch}{'-evalbn' if bn == 'eval' else ''}.onnx"))
    names = json.loads((WORK / "schemes.json").read_text())[scheme]["names"]
    # the model's parameters and buffers (BN's running statistics), not eval_bn's constants
    params = [i.name for i in model.graph.initializer if not i.name.startswith(("evalbn_", "/"))]
    missing = sorted(set(names) - set(params))
    if missing:
        raise SystemExit(f"trained parameters not among the ONNX initializers: {missing[:5]}")
    # BatchNormalization's running mean/var are initializers too, never trained.
    out.mkdir(parents=True, exist_ok=True)
    art.generate_artifacts(model, requires_grad=names, frozen_params=[p for p in params if p not in names],
                           loss=art.LossType.CrossEntropyLoss, optimizer=art.OptimType.SGD, artifact_directory=str(out))
    return out


# -- (3) one measurement, in a fresh process --------------------------------------------------------

def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(scheme: str, batch: int, mode: str, bn: str, steps: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    out = WORK / f"{scheme}-b{batch}-{bn}bn"
    x, y = np.load(WORK / f"x-b{batch}.npy"), np.load(WORK / f"y-b{batch}.npy")
    state = CheckpointState.load_checkpoint(str(out / "checkpoint"))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1

    def setup():
        module = Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"), device="cpu",
                        session_options=options)
        optimizer = Optimizer(str(out / "optimizer_model.onnx"), module)
        optimizer.set_learning_rate(LR)
        module.train()

        def step() -> float:
            loss = module(x, y)
            optimizer.step()
            module.lazy_reset_grad()
            return float(loss)

        return step, {"trainable_params": int(module.get_parameters_size(trainable_only=True))}

    if mode == "memory":
        _reset_hwm()
        base = _status("VmHWM")
        t0 = time.perf_counter()
        step, info = setup()
        step()
        setup_s = time.perf_counter() - t0
        setup_peak, warm = _status("VmHWM"), _status("VmRSS")
        _reset_hwm()
        for _ in range(MEMORY_STEPS):
            step()
        steps_peak = _status("VmHWM")
        return {**info, "base_bytes": base, "peak_bytes": max(setup_peak, steps_peak) - base,
                "steps_peak_bytes": steps_peak - base, "warm_rss_bytes": warm - base, "setup_s": setup_s}
    t0 = time.perf_counter()
    step, info = setup()
    first_loss = step()  # before any update: eager's loss on the same batch, with eval-mode BN
    setup_s = time.perf_counter() - t0
    step()
    wall, cpu, losses = [], [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        losses.append(step())
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {**info, "median_s": statistics.median(wall), "cpu_median_s": statistics.median(cpu),
            "cpu_times_s": cpu, "setup_s": setup_s, "first_loss": first_loss, "losses": losses}


def run_child(scheme: str, batch: int, mode: str, bn: str, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, "-m", "bench.ort_training", "--child", scheme, str(batch), mode, bn, "--steps", str(steps)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"ok": False, "error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=1, help="processes per scheme x batch x mode")
    p.add_argument("--export", action="store_true", help=argparse.SUPPRESS)  # step (1), in the main venv
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--bn", default="train,eval", help="train: the generator's own BN; eval: eval-mode BN spelled out")
    p.add_argument("--json", default=str(ROOT / "bench" / "results-ort-training.json"))
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.export:
        return export(batches)
    if args.child:
        scheme, batch, mode, bn = args.child
        try:
            r = {"ok": True, **child(scheme, int(batch), mode, bn, args.steps)}
        except Exception as e:  # noqa: BLE001 - reported as n/a with its reason
            r = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"[:300]}
        print(json.dumps(r))
        return
    import onnxruntime

    subprocess.run([str(MAIN_PYTHON), "-m", "bench.ort_training", "--export", "--batches", args.batches],
                   cwd=ROOT, check=True)
    results = []
    for batch in batches:
        for scheme in [s for s in args.schemes.split(",") if s]:
            for bn in [b for b in args.bn.split(",") if b]:
                row = {"scheme": scheme, "batch": batch, "bn": bn, "memory": [], "time": []}
                results.append(row)
                try:
                    artifacts(scheme, batch, bn)
                except Exception as e:  # noqa: BLE001
                    err = {"ok": False, "error": f"artifacts: {type(e).__name__}: {str(e).strip()[:300]}"}
                    row["memory"], row["time"] = [err], [err]
                    print(f"{scheme} b{batch} {bn}-BN: {err['error']}", file=sys.stderr, flush=True)
                    continue
                for _ in range(args.repeat):
                    row["memory"].append(run_child(scheme, batch, "memory", bn, args.steps))
                    row["time"].append(run_child(scheme, batch, "time", bn, args.steps))
                m, t = row["memory"][-1], row["time"][-1]
                print(f"{scheme} b{batch} {bn}-BN: peak {m.get('peak_bytes', float('nan')) / 2**20:.1f} MB, "
                      f"CPU {t.get('cpu_median_s', float('nan')) * 1e3:.1f} ms"
                      + ("" if m.get("ok") and t.get("ok") else f" ({m.get('error') or t.get('error')})"),
                      file=sys.stderr, flush=True)
    Path(args.json).write_text(json.dumps({"onnxruntime_training": onnxruntime.__version__,
                                           "schemes": json.loads((WORK / "schemes.json").read_text()),
                                           "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
