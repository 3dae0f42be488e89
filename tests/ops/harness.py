"""Check an op's forward and VJP, as edgetune compiles them, against torch.autograd.

`check_grads(fn, *args)`: every tensor argument with requires_grad=True becomes a trained
parameter; the others are inputs. The loss is sum(fn(*args) * cotangent) with a fixed random
cotangent, so every output entry's gradient is exercised. Run it in float64.
"""
from __future__ import annotations

import torch

from edgetune.autodiff import differentiate
from edgetune.backends.torch import CompiledStep
from edgetune.frontend.torch import export
from edgetune.ir.builder import Builder
from edgetune.ir.graph import verify
from edgetune.passes import run_pipeline


class _Fn(torch.nn.Module):
    def __init__(self, fn, args):
        super().__init__()
        self.fn, self.layout = fn, []
        for k, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                self.register_parameter(f"p{k}", torch.nn.Parameter(a.detach().clone()))
                self.layout.append(("param", f"p{k}"))
            elif isinstance(a, torch.Tensor):
                self.layout.append(("input", None))
            else:
                self.layout.append(("const", a))

    def forward(self, *inputs):
        it, args = iter(inputs), []
        for kind, v in self.layout:
            args.append(getattr(self, v) if kind == "param" else next(it) if kind == "input" else v)
        return self.fn(*args)


def compiled_grads(fn, *args):
    """(loss, {arg index: gradient}) as edgetune's compiled graph computes them."""
    module = _Fn(fn, args)
    inputs = tuple(a for a in args if isinstance(a, torch.Tensor) and not a.requires_grad)
    with torch.no_grad():
        cot = torch.randn(fn(*args).shape, dtype=_out_dtype(fn, args), generator=torch.Generator().manual_seed(7))

    def loss_fn(out, cotangent):
        return (out * cotangent).sum()

    fwd = export(module, loss_fn, inputs, (cot,))
    b = Builder(fwd.graph.nodes)
    loss = fwd.graph.outputs["loss"]
    grads = differentiate(fwd.graph, loss, {n: True for n in fwd.params.values()}, b)
    outputs = {"loss": loss, **{f"grad:{name}": grads[node] for name, node in fwd.params.items() if node in grads}}
    graph = verify(run_pipeline(b.graph(outputs)))
    values = {"param": dict(module.named_parameters()), "buffer": dict(module.named_buffers())}
    batch = list(inputs) + [cot]
    call = [values[n.attrs["kind"]][n.attrs["target"]].detach() if n.attrs["kind"] in values else batch[n.attrs["index"]]
            for n in graph.inputs]
    out = CompiledStep(graph, torch.device("cpu"))(*call)
    return out["loss"], {int(k[len("grad:p"):]): v for k, v in out.items() if k.startswith("grad:")}, cot


def _out_dtype(fn, args):
    with torch.no_grad():
        return fn(*args).dtype


def check_grads(fn, *args, rtol=1e-7, atol=1e-9):
    loss, grads, cot = compiled_grads(fn, *args)
    wanted = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_args = [a.detach().clone().requires_grad_(True) if k in wanted else a for k, a in enumerate(args)]
    ref_loss = (fn(*ref_args) * cot).sum()
    ref_grads = torch.autograd.grad(ref_loss, [ref_args[k] for k in wanted], allow_unused=True)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=rtol, atol=atol)
    for k, ref in zip(wanted, ref_grads):
        ref = torch.zeros_like(args[k]) if ref is None else ref
        got = grads.get(k, torch.zeros_like(ref))
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"gradient of argument {k}: {m}")
