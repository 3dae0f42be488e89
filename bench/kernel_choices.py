"""The torch backend's kernels against the alternatives that could replace them (issue 18).

    python -m bench.kernel_choices                 # one thread
    python -m bench.kernel_choices --threads 2

Each pair computes the same values (checked before timing) on the shapes of the benchmark's
models; the two are called in turns, and the table gives the median time of each and their
ratio. A ratio above 1 means the alternative is slower than what the step calls now.

- attention, forward and backward: ATen's CPU flash kernels (the `sdpa` op) against the same
  arithmetic spelled as matrix products (the probabilities recomputed from the log-sum-exp);
- a convolution, its bias and ReLU6: ATen's conv2d then clamp (what a folded conv-BN-ReLU6 of
  MobileNetV2 runs) against oneDNN's fused `mkldnn._convolution_pointwise`, with the weight as
  it is and prepacked, over all 52 convolutions of MobileNetV2-0.35 at batch 1;
- RMSNorm (Llama's, SmolLM2's): the pow / mean / rsqrt / mul the graph runs against ATen's fused
  kernel and torch.rms_norm;
- an eval-mode BN that is not folded: F.batch_norm against one addcmul with a precomputed
  per-channel scale and shift;
- a linear layer with a frozen weight: F.linear against MKL's prepacked GEMM (a packed copy of
  the weight, kept: memory the step does not otherwise hold).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

A = torch.ops.aten
Case = tuple[str, str, Callable[[], object], Callable[[], object]]  # (what, shape, now, alternative)


def _timed(now: Callable, alternative: Callable, repeats: int) -> tuple[float, float]:
    """Medians of `repeats` calls of each, called in turns after a warm-up."""
    times: tuple[list, list] = ([], [])
    for f in (now, alternative):
        f()
    for _ in range(repeats):
        for f, into in ((now, times[0]), (alternative, times[1])):
            start = time.perf_counter()
            f()
            into.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _same(a, b, tol: float) -> None:
    a, b = (a,) if torch.is_tensor(a) else a, (b,) if torch.is_tensor(b) else b
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, rtol=tol, atol=tol)


# -- attention -------------------------------------------------------------------------------

def _flash(q, k, v, g, causal, scale):
    out, lse = A._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    dq, dk, dv = A._scaled_dot_product_flash_attention_for_cpu_backward(g, q, k, v, out, lse, 0.0, causal,
                                                                          scale=scale)
    return out, dq, dk, dv


def _scores(q, k, causal, scale):
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if causal:
        s.masked_fill_(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    return s


def _attention_as_products(q, k, v, g, causal, scale):
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, -1, keepdim=True)
    out = torch.matmul(s.sub_(lse).exp_(), v)
    p = _scores(q, k, causal, scale).sub_(lse).exp_()  # the backward recomputes, as flash does
    dv = torch.matmul(p.transpose(-2, -1), g)
    ds = torch.matmul(g, v.transpose(-2, -1)).sub_((g * out).sum(-1, keepdim=True)).mul_(p)
    return out, torch.matmul(ds, k).mul_(scale), torch.matmul(ds.transpose(-2, -1), q).mul_(scale), dv


def attention_cases() -> list[Case]:
    cases = []
    for name, shape, causal in (("ViT b1", (1, 4, 257, 16), False), ("ViT b8", (8, 4, 257, 16), False),
                                ("MiniLM b32", (32, 12, 32, 32), False), ("SmolLM2 4x128", (4, 9, 128, 64), True)):
        q, k, v, g = (torch.randn(shape) for _ in range(4))
        args = (q, k, v, g, causal, 1 / math.sqrt(shape[-1]))
        cases.append((f"attention fwd+bwd, {name}", str(list(shape)), lambda a=args: _flash(*a),
                      lambda a=args: _attention_as_products(*a)))
    return cases


# -- convolution + bias + ReLU6 --------------------------------------------------------------

def _mobilenet_convs() -> list[tuple]:
    """(x, w, b, stride, padding, dilation, groups) of every convolution of MobileNetV2-0.35 at
    batch 1, 128x128, channels-last as the torch backend runs them."""
    from edgetune.models import build

    model = build("mobilenetv2-0.35", num_classes=10).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 3, 128, 128))
    for h in hooks:
        h.remove()
    cl = torch.channels_last
    return [(torch.randn(shape).contiguous(memory_format=cl), m.weight.detach().contiguous(memory_format=cl),
             torch.randn(m.weight.shape[0]), list(m.stride), list(m.padding), list(m.dilation), m.groups)
            for m, shape in seen]


def conv_cases() -> list[Case]:
    convs = _mobilenet_convs()
    packed = [(x, torch.ops.mkldnn._reorder_convolution_weight(w, p, s, d, g, list(x.shape)), b, s, p, d, g)
              for x, w, b, s, p, d, g in convs]

    def aten(cs=convs):
        return [torch.conv2d(x, w, b, s, p, d, g).clamp_(0, 6) for x, w, b, s, p, d, g in cs]

    def fused(cs):
        return [torch.ops.mkldnn._convolution_pointwise(x, w, b, p, s, d, g, "hardtanh", [0.0, 6.0], "")
                for x, w, b, s, p, d, g in cs]

    shape = f"{len(convs)} convolutions, batch 1"
    return [("conv + bias + ReLU6, oneDNN fused", shape, aten, lambda: fused(convs)),
            ("conv + bias + ReLU6, oneDNN fused, prepacked weight", shape, aten, lambda: fused(packed))]


# -- norms -----------------------------------------------------------------------------------

def norm_cases() -> list[Case]:
    x, w, eps = torch.randn(4, 128, 576), torch.randn(576), 1e-5

    def as_graph():
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    cases = [("RMSNorm forward, ATen fused", "[4, 128, 576]", as_graph,
              lambda: A._fused_rms_norm(x, [576], w, eps)[0]),
             ("RMSNorm forward, torch.rms_norm", "[4, 128, 576]", as_graph, lambda: torch.rms_norm(x, [576], w, eps))]
    for shape in ((1, 96, 8, 8), (1, 1280, 4, 4), (8, 96, 32, 32)):
        c = shape[1]
        xs = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        mean, var, gamma, beta = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
        scale = gamma * torch.rsqrt(var + eps)
        shift, scale = (beta - mean * scale).view(1, -1, 1, 1), scale.view(1, -1, 1, 1)
        cases.append(("eval BN, addcmul with its scale precomputed", str(list(shape)),
                      lambda a=(xs, mean, var, gamma, beta): F.batch_norm(*a, training=False, eps=eps),
                      lambda a=(shift, xs, scale): torch.addcmul(*a)))
    return cases


# -- linear ----------------------------------------------------------------------------------

def linear_cases() -> list[Case]:
    cases = []
    for rows, inner, out in ((512, 576, 1536), (512, 1536, 576), (512, 576, 576), (512, 576, 49152)):
        x, w = torch.randn(rows, inner), torch.randn(out, inner)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
        cases.append(("linear, MKL prepacked weight", f"[{rows}, {inner}] x [{inner}, {out}]",
                      lambda a=(x, w): F.linear(*a),
                      lambda a=(x, packed, w, rows): torch.ops.mkl._mkl_linear(a[0], a[1], a[2], None, a[3])))
    return cases


GROUPS = {"attention": attention_cases, "conv": conv_cases, "norm": norm_cases, "linear": linear_cases}


def measure(groups: list[str], repeats: int) -> list[dict]:
    rows = []
    for group in groups:
        for what, shape, now, alternative in GROUPS[group]():
            _same(now(), alternative(), tol=1e-3)
            t_now, t_alt = _timed(now, alternative, repeats if "49152" not in shape else max(5, repeats // 6))
            rows.append({"what": what, "shape": shape, "now_ms": t_now * 1e3, "alternative_ms": t_alt * 1e3})
    return rows


def report(rows: list[dict], threads: int) -> str:
    lines = [f"{threads} thread(s), medians of calls in turns:", "",
             "| alternative | shape | now (ms) | alternative (ms) | alternative / now |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['what']} | {r['shape']} | {r['now_ms']:.3f} | {r['alternative_ms']:.3f} | "
              f"{r['alternative_ms'] / r['now_ms']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=60, help="calls of each, in turns")
    p.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(report(measure(args.only, args.repeats), args.threads))


if __name__ == "__main__":
    main()
