"""Step times measured in turns: every engine of a model and batch, each in its own process,
set up once, then asked for a few steps at a time, round after round.

On a shared machine the load moves from minute to minute. Timing one engine after another
(each for all its steps) lets a busy minute land on one engine alone, and with two threads a
step waits on whichever core another job holds. In turns, every engine sees the same minutes:
a slow spell stretches all of them, and their medians stay comparable. Each process is still
fresh (its own allocator, caches and thread pool), as in a timing run of its own.
"""
from __future__ import annotations

import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from bench.configs import Config

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_TURN = 3
# A pause between turns: the last process's OpenMP workers spin a little before they sleep,
# and the next engine's step should not share its cores with them.
PAUSE_S = 0.02


class Server:
    """One engine in a process of its own (`cmd`, which set up, warm up and then serve steps
    as `serve_steps` does), answering step requests."""

    def __init__(self, cmd: list[str], env: dict, timeout: float):
        self.timeout = timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")
        # Its own process group, so that ending it also ends its children (edgetune's compile child).
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # the process ended

    def reply(self) -> dict:
        """Its next JSON line, or {"ok": False, "error": ...} if it ended, failed or hung."""
        try:
            line = self.lines.get(timeout=self.timeout)
        except queue.Empty:
            self.close()
            return {"ok": False, "error": f"did not answer within {self.timeout} s"}
        if line is None:
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-1:] or [f"exit status {self.proc.wait()}"]
            return {"ok": False, "error": tail[0][:300]}
        return json.loads(line)

    def steps(self, count: int) -> dict:
        try:
            self.proc.stdin.write(f"{count}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # reply() reports how it ended
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.stderr.close()


def vision_server(config: Config, threads: int, env: dict, timeout: float) -> Server:
    """A vision engine x configuration in `bench.run_one --mode serve`."""
    cmd = [sys.executable, "-m", "bench.run_one", *config.argv(), "--mode", "serve", "--threads", str(threads)]
    return Server(cmd, env, timeout)


def serve_steps(step: Callable[[], float], ready: dict) -> None:
    """The engine's side, once it is set up and warmed up: print `ready` as one JSON line;
    then, for each line `k` on stdin, run k steps and print their wall and CPU times and
    losses as one JSON line; end at EOF."""
    reply({"ok": True, **ready})
    for line in sys.stdin:
        wall, cpu, losses = [], [], []
        for _ in range(int(line)):
            t, c = time.perf_counter(), time.process_time()
            losses.append(step())
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        reply({"ok": True, "times_s": wall, "cpu_times_s": cpu, "losses": losses})


def reply(result: dict) -> None:
    """One JSON line on stdout, at once (the parent waits for it)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def time_in_turns(group: list, threads: int, steps: int, env: dict, timeout: float,
                  start: Callable[..., Server] = vision_server) -> list[dict]:
    """The step times of each engine of `group`, in its order (median_s, cpu_median_s, the raw
    times, the losses, setup_s, the engine's facts), measured in turns.
    `start(member, threads, env, timeout)` starts a member's server."""
    # Timing runs keep the allocator's defaults (memory runs set this, bench/child.py).
    env = {k: v for k, v in env.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    servers, results = [], []
    for config in group:  # set up one at a time: a compile does not share the cores with another
        server = start(config, threads, env, timeout)
        ready = server.reply()
        servers.append(server)
        results.append({"losses": [], **ready, "times_s": [], "cpu_times_s": [], "load_before": os.getloadavg()[0]})
    try:
        turns = math.ceil(steps / STEPS_PER_TURN)
        for turn in range(turns):
            count = min(STEPS_PER_TURN, steps - turn * STEPS_PER_TURN)
            # Each turn starts with another engine, so that none always runs after the same one.
            for k in range(len(servers)):
                i = (turn + k) % len(servers)
                if not results[i]["ok"]:
                    continue
                answer = servers[i].steps(count)
                if not answer["ok"]:
                    results[i] = answer
                    continue
                results[i]["times_s"] += answer["times_s"]
                results[i]["cpu_times_s"] += answer["cpu_times_s"]
                results[i]["losses"] += answer.get("losses", [])
                time.sleep(PAUSE_S)
    finally:
        for server in servers:
            server.close()
    for r in results:
        if r["ok"]:
            r.update(median_s=statistics.median(r["times_s"]), cpu_median_s=statistics.median(r["cpu_times_s"]),
                     load_after=os.getloadavg()[0], threads=threads, engines_in_turn=len(group))
    return results
