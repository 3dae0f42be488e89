"""Kernel scratch measured on this machine, for the memory plan.

Library kernels allocate memory of their own while they run, and how much depends on the CPU
and the library's choices, not only on the shapes: oneDNN reorders a plain NCHW tensor into a
blocked layout whose channels are padded to its vector width (16 on AVX-512, 8 on AVX2), so an
8-channel convolution holds copies twice its operands' size; it copies a zero-stride (expanded)
gradient to dense memory first; a depthwise input gradient needs a buffer of its own. A formula
per op misses most of that (a small convolution net measured 2x its prediction), so for the
ops registered with `measure_scratch=True` the final plan of a step uses what the kernel is
measured to take:

    plan(graph, measure_scratch(graph, device))   # {node: bytes} for those ops' nodes

Each distinct call (op, attributes, operand shapes, dtypes and strides, thread count) is run
once in a forked child with glibc serving large allocations by mmap, so what the kernel
allocates shows in the resident set: the high-water mark of a second call above the memory
before it, less the output, is the scratch. Results are kept for the life of the process.
Where that cannot be measured (not Linux, no fork, a CUDA graph, EDGETUNE_MEASURE_SCRATCH=0)
the result is empty and the plan falls back to the op's `scratch` estimate. The passes plan
with the estimates, so what a compile decides does not depend on the machine it runs on.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

from edgetune.compiler.ir.graph import Graph, Node
from edgetune.compiler.ir.ops import OPS, layout
from edgetune.procmem import MMAP_THRESHOLD, release_free_heap, reset_hwm, set_mmap_threshold, vm_hwm_bytes, vm_rss_bytes

_MEASURED: dict[tuple, int | None] = {}  # call signature -> bytes (None: could not measure), for this process


def measure_scratch(graph: Graph, device: torch.device) -> dict[Node, int]:
    """{node: bytes its kernel allocates besides its output} for every node of a measured op,
    measuring the calls not seen before in one forked child; empty where it cannot measure."""
    if not can_measure(device):
        return {}
    nodes = [n for n in graph.nodes if OPS[n.op].measure_scratch]
    keys = {n: signature(n) for n in nodes}
    missing = list({keys[n]: n for n in nodes if keys[n] not in _MEASURED}.values())
    if missing:
        _MEASURED.update(zip((keys[n] for n in missing), _measured_or_nothing(missing)))
    return {n: _MEASURED[keys[n]] for n in nodes if _MEASURED[keys[n]] is not None}


def _measured_or_nothing(nodes: list[Node]) -> list[int | None]:
    """The measurements, or None for each where measuring failed: the plan then estimates
    (a prediction a little off is better than a compile that fails over it)."""
    from edgetune.compiler.isolate import in_child

    try:
        return in_child(lambda: _measure_in_this_process(nodes))
    except Exception as err:  # noqa: BLE001  (any failure of the measuring child)
        warnings.warn(f"edgetune could not measure kernel scratch ({type(err).__name__}: {err}); "
                      "the memory plan estimates it instead", RuntimeWarning, stacklevel=3)
        return [None] * len(nodes)


def can_measure(device: torch.device) -> bool:
    """Measured in a forked child: not where other threads run (see edgetune.compiler.isolate)."""
    from edgetune.compiler.isolate import fork_is_safe

    return (device.type == "cpu" and sys.platform.startswith("linux") and fork_is_safe()
            and os.environ.get("EDGETUNE_MEASURE_SCRATCH", "1") not in ("", "0"))


def signature(n: Node) -> tuple:
    """What the kernel's allocations depend on: op, attributes, each operand's layout, threads."""
    return (n.op, repr(sorted(n.attrs.items())), tuple(_layout(i) for i in n.inputs), torch.get_num_threads())


def _layout(n: Node) -> tuple:
    """An operand as the kernel sees it: its storage's shape, dtype and memory format and the
    views on it (an expanded or sliced operand may be copied to dense memory by the kernel)."""
    views = []
    while _pure_view(n):
        views.append((n.op, repr(sorted(n.attrs.items()))))
        n = n.inputs[0]
    return tuple(n.shape), str(n.dtype), _channels_last(n), tuple(reversed(views))


def _channels_last(n: Node) -> bool:
    """Whether the step holds this value channels-last (ops/layout.py): on the CPU, the image
    tensors the kernels compute are, the batch and constants as given are not."""
    return layout.CPU_CHANNELS_LAST and len(n.shape) == 4 and n.op not in ("input", "const")


def _pure_view(n: Node) -> bool:
    """A view that only reinterprets its input (an `<op>_inplace` twin is a view that computes)."""
    return OPS[n.op].view and not n.op.endswith("_inplace")


def _operand(n: Node) -> torch.Tensor:
    """A tensor laid out like `n`: its storage written (so no page faults later count as the
    kernel's), then the same views applied."""
    if _pure_view(n):
        return OPS[n.op].kernel(_operand(n.inputs[0]), **n.attrs)
    if n.op == "const":
        return n.attrs["value"].clone()
    if _channels_last(n):
        return torch.ones(n.shape, dtype=n.dtype).contiguous(memory_format=torch.channels_last)
    return torch.ones(n.shape, dtype=n.dtype)


def _measure_in_this_process(nodes: list[Node]) -> list[int]:
    set_mmap_threshold(MMAP_THRESHOLD)  # this child only: freed buffers leave the resident set at once
    results = []
    with torch.no_grad():
        for n in nodes:
            operands = [_operand(i) for i in n.inputs]
            kernel = OPS[n.op].kernel
            kernel(*operands, **n.attrs)  # the first call creates and caches the library's primitives
            release_free_heap()
            reset_hwm()
            before = vm_rss_bytes()
            out = kernel(*operands, **n.attrs)
            extra = vm_hwm_bytes() - before - (out.nbytes if isinstance(out, torch.Tensor) else 0)
            # Smaller allocations come from the heap, where free memory hides them: below the
            # mmap threshold the figure is noise, not scratch.
            results.append(extra if extra >= MMAP_THRESHOLD else 0)
            del out, operands
    return results
