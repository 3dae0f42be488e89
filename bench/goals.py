"""The benchmark's goals (MobileNetV2 width 1.0 unless a row names another model, eval-mode BN,
SGD momentum), checked against the measured tables: each row is computed from the results, so
a new run rewrites them."""
from __future__ import annotations

from bench.sections import compared, time_modes

MODEL = "mobilenetv2"


def goals_section(cells) -> list[str]:
    """Markdown rows `goal | measured | verdict`: the speed goals of every model that ran, the
    rest where MobileNetV2 ran; nothing if no edgetune step ran."""
    if not any(k[3] == "edgetune" for k in cells.by_key):
        return []
    if not any(k[0] == MODEL for k in cells.by_key):
        return ["| goal | measured | verdict |", "| --- | --- | --- |"] + speed_goals(cells)
    peak = lambda scheme, batch, engine: cells.value(MODEL, scheme, batch, engine, "memory", "peak_bytes")  # noqa: E731
    rows = [
        _lower("bias-only peak >= 5x lower than eager, same scheme (batch 8)",
               peak("bias-only", 8, "eager"), peak("bias-only", 8, "edgetune"), 5, "MB"),
        _lower("full backprop peak >= 1.5x lower than eager (batch 8)",
               peak("full", 8, "eager"), peak("full", 8, "edgetune"), 1.5, "MB"),
        _at_most("TTE-style peak <= 1.15x the forward-only floor (batch 8)",
                 peak("tte", 8, "edgetune"), peak("-", 8, "forward"), 1.15, "MB"),
        _lower("TTE-style peak >= 5x lower than eager full backprop (batch 8)",
               peak("-", 8, "eager-full"), peak("tte", 8, "edgetune"), 5, "MB"),
    ]
    rows += speed_goals(cells)
    rows += [_predicted(cells, scheme, batch) for scheme in ("full", "bias-only", "tte", "last-3") for batch in (8, 1)
             if cells.get(MODEL, scheme, batch, "edgetune", "memory")]
    rows += backend_goals(cells)
    return ["| goal | measured | verdict |", "| --- | --- | --- |"] + rows


def speed_goals(cells) -> list[str]:
    """Issue 18's: at every thread count measured, every scheme of every model no slower than
    eager on it, bias-only and TTE at batch 1 >= 1.3x faster, and MobileNetV2's TTE step >= 2.5x
    faster than eager full backprop (batch 8). CPU time at one thread, wall time at more (the
    time tables' own ratios)."""
    rows = []
    models = list(dict.fromkeys(k[0] for k in cells.by_key))
    for mode, threads in time_modes(list(cells.by_key.values())):
        key, kind = compared(threads)
        at = f"{kind} time" + ("" if threads is None else f", {threads} thread{'s' if threads > 1 else ''}")
        t = lambda model, scheme, batch, engine: cells.value(model, scheme, batch, engine, mode, key)  # noqa: E731
        for model in models:
            prefix = "" if model == MODEL else f"{model}: "
            # what ran, and the batch-1 rows the goals name even where they did not run
            pairs = {(k[1], k[2]) for k in cells.by_key if k[0] == model and k[3] == "edgetune"}
            for scheme, batch in sorted(pairs | {("bias-only", 1), ("tte", 1)}, key=lambda sb: (-sb[1], sb[0])):
                rows.append(_lower(f"{prefix}step no slower than eager, {scheme}, batch {batch} ({at})",
                                   t(model, scheme, batch, "eager"), t(model, scheme, batch, "edgetune"), 1.0, "ms"))
            for scheme in ("bias-only", "tte"):
                rows.append(_lower(f"{prefix}batch 1: step >= 1.3x faster than eager, {scheme} ({at})",
                                   t(model, scheme, 1, "eager"), t(model, scheme, 1, "edgetune"), 1.3, "ms"))
        if MODEL in models:
            rows.append(_lower(f"TTE-style step >= 2.5x faster than eager full backprop (batch 8, {at})",
                               t(MODEL, "-", 8, "eager-full"), t(MODEL, "tte", 8, "edgetune"), 2.5, "ms"))
    return rows


def backend_goals(cells) -> list[str]:
    """Issue 11's goals for edgetune's onnxruntime and auto backends (opt-in engines), for the
    configurations where they ran: the onnxruntime step >= 1.3x faster than eager on the same
    scheme at a peak within 1.2x of the torch backend's; auto within 5% of the faster backend."""
    peak = lambda scheme, batch, engine: cells.value(MODEL, scheme, batch, engine, "memory", "peak_bytes")  # noqa: E731
    cpu = lambda scheme, batch, engine: cells.value(MODEL, scheme, batch, engine, "time", "cpu_median_s")  # noqa: E731
    rows = []
    for batch in (1, 8):
        for scheme in ("bias-only", "tte"):
            if cells.get(MODEL, scheme, batch, "edgetune-ort", "time"):
                rows += [
                    _lower(f"onnxruntime step >= 1.3x faster than eager, {scheme}, batch {batch} (CPU time)",
                           cpu(scheme, batch, "eager"), cpu(scheme, batch, "edgetune-ort"), 1.3, "ms"),
                    _at_most(f"onnxruntime peak <= 1.2x the torch backend's, {scheme}, batch {batch}",
                             peak(scheme, batch, "edgetune-ort"), peak(scheme, batch, "edgetune"), 1.2, "MB")]
            if cells.get(MODEL, scheme, batch, "edgetune-auto", "time"):
                times = [t for t in (cpu(scheme, batch, "edgetune"), cpu(scheme, batch, "edgetune-ort")) if t]
                chose = cells.value(MODEL, scheme, batch, "edgetune-auto", "time", "backend")
                rows.append(_at_most(f"auto within 5% of the faster backend, {scheme}, batch {batch} (CPU time; "
                                     f"auto chose {chose})", cpu(scheme, batch, "edgetune-auto"),
                                     min(times) if len(times) == 2 else None, 1.05, "ms"))
    return rows


def _lower(goal: str, theirs, ours, factor: float, unit: str) -> str:
    """Ours must be `factor` times below theirs."""
    if theirs is None or ours is None:
        return f"| {goal} | not measured | — |"
    got = theirs / ours
    return f"| {goal} | {_fmt(theirs, unit)} / {_fmt(ours, unit)} = {got:.2f}x | {_verdict(got >= factor, got / factor)} |"


def _at_most(goal: str, ours, floor, factor: float, unit: str) -> str:
    if ours is None or floor is None:
        return f"| {goal} | not measured | — |"
    got = ours / floor
    return f"| {goal} | {_fmt(ours, unit)} / {_fmt(floor, unit)} = {got:.2f}x | {_verdict(got <= factor, factor / got)} |"


def _predicted(cells, scheme: str, batch: int) -> str:
    """The prediction against the steps' own peak (above what setup left: the part it models)."""
    r = cells.get(MODEL, scheme, batch, "edgetune", "memory")
    goal = f"predicted peak within +-20% of the measured step, {scheme}, batch {batch}"
    if not r or not r["ok"]:
        return f"| {goal} | not measured | — |"
    # Setup allocated the optimizer state, so the steps' rise is compared without it (older
    # results lack the figure and compare with the whole prediction).
    measured = r["steps_peak_bytes"] - r["warm_rss_bytes"]
    predicted = r["predicted_peak_bytes"] - r.get("state_bytes", 0)
    what = "predicted minus optimizer state" if "state_bytes" in r else "predicted"
    got = measured / predicted
    return (f"| {goal} | {_fmt(measured, 'MB')} / {_fmt(predicted, 'MB')} ({what}) = {got:.2f} "
            f"| {_verdict(0.8 <= got <= 1.2, None)} |")


def _fmt(value: float, unit: str) -> str:
    return f"{value / 2**20:.1f} MB" if unit == "MB" else f"{value * 1e3:.1f} ms"


def _verdict(met: bool, margin: float | None) -> str:
    if met:
        return "met"
    return "**missed**" + (f" by {(1 - margin) * 100:.0f}%" if margin is not None else "")
