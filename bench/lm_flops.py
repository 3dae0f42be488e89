"""The arithmetic of SmolLM2-135M's training step against its forward-only floor (issue 18).

    python -m bench.lm_flops            # SmolLM2-135M, batch 4 x 128, the LM benchmark's engines
    python -m bench.lm_flops --tiny     # a tiny random Llama: a smoke test

`python -m bench.lm` compares a step's tokens/s with the forward floor's (HF's forward and
loss under no_grad). A step does the forward's matrix products and more, so the ratio of
the two FLOP counts bounds what the tokens/s ratio can be at equal arithmetic speed: above it,
a step would have to run its products faster than the floor runs its own.

torch's FlopCounterMode counts the matrix products (mm, addmm, bmm, convolutions, attention)
that each engine dispatches in one step: the floor, the eager step on the sparse scheme
(`loss.backward()`; it forms the whole gradient of a partially trained weight before the mask)
and edgetune's compiled step on the same scheme. Elementwise work is not counted.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bench.lm_one import load_model, make_batch, setup_eager, setup_edgetune, setup_forward, sparse_scheme

ENGINES = {"forward": setup_forward, "eager-sparse": setup_eager, "edgetune-sparse": setup_edgetune}
# torch counts the attention kernels of the GPU; the CPU's flash kernels take the same
# arguments first (query, key, value; the backward the output's gradient before them). Every
# engine here calls these, and all of them count a causal mask's skipped blocks.
def _attention(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _attention_backward(g, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(g, q, k, v)


ATEN = torch.ops.aten
CPU_ATTENTION = {ATEN._scaled_dot_product_flash_attention_for_cpu: _attention,
                 ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward}


def step_flops(setup, model, batch, scheme) -> int:
    """FLOPs of one step after a warm-up (which leaves the weights trained once: the counts do
    not depend on the values)."""
    step, _ = setup(model, batch, scheme)
    step()
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        step()
    return counter.get_total_flops()


def count_flops(tiny: bool, batch: int, seq: int) -> dict[str, int]:
    """FLOPs of one step of each engine, on the same batch and scheme."""
    counts = {}
    for engine, setup in ENGINES.items():
        model = load_model(tiny)  # fresh weights per engine: eager's setup freezes the model
        scheme = sparse_scheme(model.config.num_hidden_layers)
        counts[engine] = step_flops(setup, model, make_batch(model, batch, seq), scheme)
    return counts


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    counts = count_flops(args.tiny, args.batch, args.seq)
    floor = counts["forward"]
    print("| engine | GFLOP a step | forward / step |\n| --- | ---: | ---: |")
    for engine, flops in counts.items():
        print(f"| {engine} | {flops / 1e9:.2f} | {floor / flops:.3f} |")


if __name__ == "__main__":
    main()
