"""One benchmark measurement in a fresh process, shared by the vision and the LM benchmarks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(cmd: list[str], mode: str, env: dict, timeout: float) -> dict:
    """Run `cmd` (which prints one JSON line last); its result, or {"ok": False, "error": ...}
    if it failed or hung. A memory run gets MALLOC_MMAP_THRESHOLD_=65536 (freed tensors leave
    RSS), a timing run the allocator's defaults."""
    env = dict(env)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    # Its own process group, so that a timeout also ends its children (edgetune's compile
    # child, Inductor's compile workers).
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"ok": False, "error": f"did not finish within {timeout} s"}
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"ok": False, "error": tail[0][:300]}
