"""The per-layer report of a compiled step: update mode, saved bytes, FLOPs, live memory."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from edgetune.compiler.ir.graph import Node
from edgetune.compiler.ir.ops.recurrent import RNN_WEIGHTS
from edgetune.compiler.memory import saved_for_backward, value_bytes


@dataclass
class LayerRow:
    module: str
    mode: str
    trainable: int = 0
    saved_bytes: int = 0  # forward values kept alive for the backward
    flops: int = 0  # forward + backward multiply-adds x2 of conv/linear/matmul
    live_bytes: int = 0  # most transient memory live while this layer's ops run


@dataclass
class Report:
    trainable_params: int
    total_params: int
    predicted_peak_bytes: int
    state_bytes: int
    layers: list[LayerRow] = field(default_factory=list)
    weight_bytes: int = 0        # the model's weights as the step holds them (int8 where chosen)
    int8_bytes: int = 0          # of which int8 values and scales of frozen linears
    int8_float_bytes: int = 0    # what those weights would take as floats
    backend: str = "torch"       # what runs the step; under "auto", each backend's measured time
    # Each compiled batch shape (compile(max_shapes=...)), the one reported above first:
    # (shapes of the batch's tensors, predicted peak bytes, {compile phase: seconds}).
    variants: list[tuple[tuple, int, dict[str, float]]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.format()

    def format(self, trained_only: bool = False) -> str:
        """The table; `trained_only` keeps just the layers that have trained parameters."""
        layers = [r for r in self.layers if r.trainable] if trained_only else self.layers
        head = f"{'layer':<34} {'mode':<14} {'trainable':>10} {'saved MB':>9} {'MFLOPs':>9} {'live MB':>8}"
        rows = [head, "-" * len(head)]
        for r in layers:
            rows.append(f"{r.module[:34]:<34} {r.mode:<14} {r.trainable:>10,} {r.saved_bytes / 2**20:>9.2f} "
                        f"{r.flops / 1e6:>9.1f} {r.live_bytes / 2**20:>8.2f}")
        rows.append("-" * len(head))
        rows.append(f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} "
                    f"({100 * self.trainable_params / max(self.total_params, 1):.2f}%)")
        rows.append(f"optimizer state: {self.state_bytes / 2**20:.2f} MB")
        rows.append(f"weights held: {self.weight_bytes / 2**20:.2f} MB" + (
            f" (frozen linears as int8: {self.int8_bytes / 2**20:.2f} MB instead of "
            f"{self.int8_float_bytes / 2**20:.2f} MB)" if self.int8_bytes else ""))
        rows.append(f"predicted peak of one step: {self.predicted_peak_bytes / 2**20:.2f} MB "
                    "(activations, gradients and optimizer state; parameters and the batch excluded)")
        rows.append(f"backend: {self.backend}")
        for shapes, peak, seconds in self.variants:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
            rows.append(f"step for batch shapes {_shapes_text(shapes)}: predicted peak {peak / 2**20:.2f} MB, "
                        f"compiled in {sum(seconds.values()):.2f} s ({phases})")
        return "\n".join(rows)


def _shapes_text(shapes: tuple) -> str:
    return " ".join("x".join(map(str, s)) or "scalar" for s in shapes)


def build_report(trainer) -> Report:
    plan, graph = trainer.plan, trainer.graph
    owners = {name.rpartition(".")[0] for name, _ in trainer.model.named_parameters(remove_duplicate=False)}
    row_of = _rows_by_layer(graph.nodes, owners)
    rows = {layer: LayerRow(layer, _mode(trainer, layer)) for layer in dict.fromkeys(row_of.values())}
    for u in trainer.updates:
        rows[row_of.get(u.module, u.module)].trainable += u.trained_entries
    for pos, n in enumerate(graph.nodes):
        if n.meta.get("module") in row_of and n.op not in ("input", "const"):
            r = rows[row_of[n.meta["module"]]]
            r.flops += flops(n)
            r.live_bytes = max(r.live_bytes, plan.live_bytes[pos])
    for n in saved_for_backward(graph.nodes):
        if n.meta.get("module") in row_of:
            rows[row_of[n.meta["module"]]].saved_bytes += value_bytes(n)
    # LoRA adapters count as parameters, as PEFT's print_trainable_parameters counts them.
    # Weights held as int8 have released their float storage: count them by their int8 copy.
    int8 = trainer.int8.values()
    total = (sum(p.numel() for p in trainer.model.parameters()) + sum(q.numel() for q, _ in int8)
             + sum(a.numel() for a in trainer.adapters.values()))
    int8_bytes = sum(q.nbytes + scale.nbytes for q, scale in int8)
    floats = sum(p.nbytes for p in trainer.model.parameters())
    return Report(trainer.trainable_params, total, plan.peak_bytes, plan.state_bytes, list(rows.values()),
                  weight_bytes=floats + int8_bytes, int8_bytes=int8_bytes,
                  int8_float_bytes=sum(q.numel() * scale.element_size() for q, scale in int8),
                  backend=trainer.backend.describe(),
                  variants=[(v.shapes, v.plan.peak_bytes, dict(v.seconds))
                            for v in [trainer.active, *(v for v in trainer.variants.values() if v is not trainer.active)]])


def _rows_by_layer(nodes: list[Node], layers: set[str]) -> dict[str, str]:
    """Module -> report row: a layer (a module owning parameters) gathers the parameter-free
    modules that follow it in forward order (its activation, pooling, residual add)."""
    row_of: dict[str, str] = {}
    current = None
    for n in nodes:
        module = n.meta.get("module")
        if module is None or "grad_of" in n.meta or module in row_of:
            continue
        if module in layers or current is None or module.startswith("<"):
            current = module
        row_of[module] = current
    return row_of


def _mode(trainer, module: str) -> str:
    prefix = module + "."
    rules = {n.removeprefix(prefix): r for n, r in trainer.rules.items()
             if n.startswith(prefix) and "." not in n.removeprefix(prefix)}
    if not rules:
        return "frozen"
    parts = []
    for leaf, rule in rules.items():
        if rule.lora:
            parts.append(f"lora r={rule.lora}" if leaf == "weight" else f"{leaf} lora r={rule.lora}")
        elif rule.touched:
            parts.append(f"{leaf}@touched rows")
        elif rule.rows:
            parts.append(f"{leaf}@{len(rule.rows)} rows")
        else:
            parts.append(leaf if not rule.partial else f"{leaf}@{rule.ratio:g}")
    return "+".join(parts)


def flops(n: Node) -> int:
    """Multiply-add FLOPs (x2) of the compute-heavy ops; elementwise work is not counted."""
    if n.op == "conv":
        w = n.inputs[1].shape
        return 2 * math.prod(n.shape) * math.prod(w[1:])
    if n.op in ("conv_grad_input",):
        return 2 * math.prod(n.inputs[0].shape) * math.prod(n.inputs[1].shape[1:])
    if n.op == "conv_grad_weight":
        return 2 * math.prod(n.inputs[1].shape) * math.prod(n.shape[1:])
    if n.op in ("linear", "linear_grad_input"):
        return 2 * math.prod(n.shape) * n.inputs[1].shape[-1 if n.op == "linear" else 0]
    if n.op == "linear_grad_weight":
        return 2 * math.prod(n.inputs[0].shape) * n.shape[-1]
    if n.op in ("mm", "bmm"):
        return 2 * math.prod(n.shape) * n.inputs[0].shape[-1]
    if n.op == "sdpa":
        return sdpa_flop_count(*(x.shape for x in n.inputs[:3]))
    if n.op == "sdpa_grad":
        q, k, v = n.inputs[1:4]  # after the output's gradient
        return sdpa_backward_flop_count((*q.shape[:3], v.shape[-1]), q.shape, k.shape, v.shape)
    if n.op in RNN_WEIGHTS:  # a product through each weight at each time step
        return _recurrent_flops(n.inputs, RNN_WEIGHTS[n.op])
    layer = n.op.removesuffix("_grad")
    if layer != n.op and layer in RNN_WEIGHTS:  # its inputs: g, the layer's output, the layer's inputs
        wanted = n.attrs.get("wanted") or (True,) * (len(n.inputs) - 2)
        return _recurrent_flops(n.inputs[2:], RNN_WEIGHTS[layer], wanted)
    return 0


def _recurrent_flops(inputs, weights, wanted=None) -> int:
    """A recurrent layer's products: one through each weight at each step for each sample (x's
    first two axes); in the backward, one more for each weight whose gradient is `wanted`."""
    steps_and_batch = math.prod(inputs[0].shape[:2])
    products = [1 + (wanted is not None and bool(wanted[p])) for p in weights]
    return sum(2 * steps_and_batch * math.prod(inputs[p].shape) * k for p, k in zip(weights, products))
