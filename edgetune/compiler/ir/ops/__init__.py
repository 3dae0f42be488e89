"""The op vocabulary. Everything about an op lives in one `register` call in one place:

- `kernel`: the torch implementation, `kernel(*tensors, **attrs)`; it is also the shape
  rule, evaluated on meta tensors at build time (`shape=` overrides where that can't work);
- `vjp`: `vjp(b, node, g, want) -> one gradient Node or None per input`, emitting the
  backward as more IR through the builder `b`. `want[i]` is False (no gradient: return
  None and build nothing), True, or a `ChannelSlice` (only that slice of a weight);
- `mutates`: indices of inputs updated in place, or a function of the node giving them
  (optimizer updates, buffer writes; such ops are effects and produce no value);
- `view`: the output aliases input 0's memory (costs nothing in the memory plan);
- `scratch`: bytes the torch kernel allocates while it runs, beyond its output (an estimate);
- `measure_scratch`: the kernel's allocations depend on the machine (library kernels that
  reorder or copy their operands), so the plan uses what edgetune.compiler.backends.scratch measures
  for each call where it can, and `scratch` only where it cannot;
- `onnx`: `onnx(ctx, node, input_names) -> output name` (an effect: the new value of each
  input it mutates), the op as standard ONNX ops; edgetune.compiler.backends.onnx exports a
  whole step from these and refuses a step with an op that has none;
- `inplace`: the same kernel writing its result over input 0; registers `<name>_inplace`, a
  view of input 0, which passes/inplace.py uses where input 0 dies at this op;
- `bind`: `bind(node, device) -> kernel or None`, that node's kernel with its choices made
  once at compile time (the torch backend calls it with the node's inputs alone;
  `inplace_bind` is the same for `<name>_inplace`);
- `carries`: bytes the output holds beside its own values for as long as it lives (a
  workspace the kernel attaches for the backward), counted by the memory plan;
- `aten`: the torch.export ATen overloads this op is built from, with their converter.

The registry itself is registry.py; the families live in sibling modules and are imported
here, so that importing edgetune.compiler.ir.ops registers every op.
"""
from edgetune.compiler.ir.ops.registry import (ATEN, ATEN_NAMED, OPS, VJP, ChannelSlice, OpDef, aten, aten_named,
                                                carried_bytes, infer, is_effect, mutated_inputs, register, storage_of,
                                                written_storages)
from edgetune.compiler.ir.ops import (attention, core, gru, linalg, lstm_proj, masks, moe, nn, quant,  # noqa: E402,F401
                                   recurrent, shape, simple_rnn, vocab)  # (registration)

__all__ = ["ATEN", "ATEN_NAMED", "OPS", "VJP", "ChannelSlice", "OpDef", "aten", "aten_named", "carried_bytes", "infer", "is_effect",
           "mutated_inputs", "register", "storage_of", "written_storages"]
