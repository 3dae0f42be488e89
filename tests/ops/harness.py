"""Check an op's forward and VJP, as edgetune compiles them, against torch.autograd.

`check_grads(fn, *args)`: every tensor argument with requires_grad=True becomes a trained
parameter; a `Buffer(tensor)` becomes a module buffer (whose in-place update, e.g. BatchNorm's
running statistics, is compared too); the other tensors are inputs. The loss is
sum(fn(*args) * cotangent) with a fixed random cotangent, so every output entry's gradient is
exercised. Run it in float64.
"""
from __future__ import annotations

import torch

from edgetune.compiler.autodiff import differentiate
from edgetune.compiler.backends.torch import CompiledStep
from edgetune.compiler.frontend.torch import export
from edgetune.compiler.ir.builder import Builder
from edgetune.compiler.ir.verify import verify
from edgetune.compiler.passes import run_pipeline


class Buffer:
    """An argument that `fn` receives as a module buffer rather than as an input."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _eager(args):
    """The arguments for an eager call: buffers as fresh copies, so the call may update them."""
    return [a.value.clone() if isinstance(a, Buffer) else a for a in args]


class _Fn(torch.nn.Module):
    def __init__(self, fn, args):
        super().__init__()
        self.fn, self.layout = fn, []
        for k, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                self.register_parameter(f"p{k}", torch.nn.Parameter(a.detach().clone()))
                self.layout.append(("param", f"p{k}"))
            elif isinstance(a, Buffer):
                self.register_buffer(f"b{k}", a.value.clone())
                self.layout.append(("buffer", f"b{k}"))
            elif isinstance(a, torch.Tensor):
                self.layout.append(("input", None))
            else:
                self.layout.append(("const", a))

    def forward(self, *inputs):
        it, args = iter(inputs), []
        for kind, v in self.layout:
            args.append(getattr(self, v) if kind in ("param", "buffer") else next(it) if kind == "input" else v)
        return self.fn(*args)


def compiled_grads(fn, *args):
    """(loss, {arg index: gradient}, cotangent, {arg index: buffer's new value}) as compiled."""
    module = _Fn(fn, args)
    inputs = tuple(a for a in args if isinstance(a, torch.Tensor) and not a.requires_grad)
    with torch.no_grad():
        out = fn(*_eager(args))
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))

    def loss_fn(out, cotangent):
        return (out * cotangent).sum()

    fwd = export(module, loss_fn, inputs, (cot,))
    b = Builder(fwd.graph.nodes)
    loss = fwd.graph.outputs["loss"]
    grads = differentiate(fwd.graph, loss, {n: True for n in fwd.params.values()}, b)
    outputs = {"loss": loss, **{f"grad:{name}": grads[node] for name, node in fwd.params.items() if node in grads},
               **{k: v for k, v in fwd.graph.outputs.items() if k.startswith("buffer:")}}
    graph = verify(run_pipeline(b.graph(outputs)))
    values = {"param": dict(module.named_parameters()), "buffer": dict(module.named_buffers())}
    batch = list(inputs) + [cot]
    call = [values[n.attrs["kind"]][n.attrs["target"]].detach() if n.attrs["kind"] in values else batch[n.attrs["index"]]
            for n in graph.inputs]
    out = CompiledStep(graph, torch.device("cpu"))(*call)
    grads = {int(k[len("grad:p"):]): v for k, v in out.items() if k.startswith("grad:")}
    return out["loss"], grads, cot, {int(k[len("buffer:b"):]): v for k, v in out.items() if k.startswith("buffer:")}


def check_grads(fn, *args, rtol=1e-7, atol=1e-9, names=None):
    """`names[k]`, if given, names argument k in failure messages."""
    loss, grads, cot, buffers = compiled_grads(fn, *args)
    wanted = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    ref_args = [a.detach().clone().requires_grad_(True) if k in wanted else a for k, a in enumerate(_eager(args))]
    ref_loss = (fn(*ref_args) * cot).sum()
    ref_grads = torch.autograd.grad(ref_loss, [ref_args[k] for k in wanted], allow_unused=True)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=rtol, atol=atol)
    for k, ref in zip(wanted, ref_grads):
        ref = torch.zeros_like(args[k]) if ref is None else ref
        got = grads.get(k, torch.zeros_like(ref))
        what = names[k] if names else f"argument {k}"
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"gradient of {what}: {m}")
    for k, a in enumerate(args):
        if isinstance(a, Buffer):
            got = buffers.get(k, a.value)  # not in the outputs: the step leaves it unchanged
            torch.testing.assert_close(got, ref_args[k], rtol=rtol, atol=atol, msg=lambda m: f"buffer {k}: {m}")


def check_each(fns, make_arg, **kw):
    """check_grads for many one-input ops at once: op `name` gets its own parameter `make_arg()`,
    so each gradient still checks one op, but the whole set costs one torch.export."""
    names = list(fns)
    args = [make_arg() for _ in names]
    check_grads(lambda *xs: torch.cat([fns[n](x).reshape(-1) for n, x in zip(names, xs)]), *args, names=names, **kw)


# -- helpers shared by the op tests -----------------------------------------------------------

def t(*shape, grad=True, low=None):
    """A float64 tensor: a trained parameter by default; `low` makes it uniform in [low, low + 1)."""
    x = torch.randn(shape, dtype=torch.float64) if low is None else torch.rand(shape, dtype=torch.float64) + low
    return x.requires_grad_(grad)


def few(n=6):
    """Hypothesis settings for op tests: each example compiles a graph, so keep them few."""
    from hypothesis import settings

    return settings(max_examples=n, deadline=None, derandomize=True)
