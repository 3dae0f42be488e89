"""Resident memory of a SmolLM2-135M sparse fine-tuning process, float vs int8 frozen weights.

    python -m bench.lm_int8

Each mode runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors leave
RSS): the model is loaded, then compiled with `lm-sparse:6` and AdamW (with
`frozen_weights="int8"` in the second), then trained 3 steps on the benchmark's batch
(4 x 128 seeded random ids). Reported: RSS after loading, after compiling, the highest RSS
while compiling and while stepping (VmHWM, reset between the phases), the step-1 loss, and
the weights the report says the step holds. Unlike bench.lm, these are whole-process
numbers: the point of int8 is the weights themselves.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

MB = 2 ** 20


def measure(mode: str) -> dict:
    import torch

    import edgetune as et
    from bench.lm_one import make_batch
    from edgetune.procmem import release_free_heap, reset_hwm, vm_hwm_bytes, vm_rss_bytes
    from edgetune.models.hf import causal_lm_loss, load_causal_lm

    torch.set_num_threads(2)
    model = load_causal_lm("smollm2-135m").model
    ids, mask = make_batch(model, 4, 128)
    release_free_heap()
    loaded = vm_rss_bytes()
    reset_hwm()
    trainer = et.compile(model, causal_lm_loss, (ids, mask), (ids.clone(),), scheme=et.schemes.lm_sparse(6),
                         optimizer=et.AdamW(lr=1e-4), frozen_weights=mode)
    release_free_heap()
    compiled, compile_peak = vm_rss_bytes(), vm_hwm_bytes()
    reset_hwm()
    losses = [trainer.step((ids, mask), (ids,)) for _ in range(3)]
    report = trainer.report()
    return {"mode": mode, "loaded": loaded, "compiled": compiled, "compile_peak": compile_peak,
            "step_peak": vm_hwm_bytes(), "losses": losses, "weights_held": report.weight_bytes,
            "int8": report.int8_bytes, "int8_as_float": report.int8_float_bytes}


def table(rows: list[dict]) -> str:
    lines = ["| frozen weights | RSS loaded | RSS compiled | peak while compiling | peak while training | "
             "weights held (report) | step-1 loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['loaded'] / MB:.0f} MB | {r['compiled'] / MB:.0f} MB | "
                     f"{r['compile_peak'] / MB:.0f} MB | {r['step_peak'] / MB:.0f} MB | {r['weights_held'] / MB:.0f} MB | "
                     f"{r['losses'][0]:.4f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for mode in ("float", "int8"):
        out = subprocess.run([sys.executable, "-m", "bench.lm_int8", "--one", mode], cwd=root, env=env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(table(rows))


if __name__ == "__main__":
    main()
