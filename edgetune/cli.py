"""The `edgetune` command: `plan` prints a compiled step's report, `export` writes it as ONNX,
`finetune` fine-tunes a model on a dataset, `search` finds a scheme under a memory budget,
`demo` shows it all; `finetune-lm` fine-tunes a language model on chats or text and
`generate` tries it."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from typing import Any

import edgetune as et

try:
    et.require_torch("the edgetune command")
except ModuleNotFoundError as missing:  # an edgetune[runtime] install
    sys.exit(f"edgetune: error: {missing}")

import torch
import torch.nn.functional as F

from edgetune.compiler.memory import parse_bytes
from edgetune.compiler.optim import ALL_OPTIMIZERS, OPTIMIZERS, by_name
from edgetune.compiler.scheme import SchemeError
from edgetune.files import write_json, write_text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_numbers(args)
        _check_out_folder(args)
        return args.run(args)
    except (SchemeError, ValueError, NotImplementedError, OSError) as err:
        print(f"edgetune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the run's last checkpoint is whole (files.py): say how to go on from it
        out = getattr(args, "resume", None) or getattr(args, "out", None)  # the run's folder, once it has one
        again = f"; go on with: edgetune {args.command} --resume {out}" if hasattr(args, "resume") and out else ""
        print(f"edgetune: interrupted{again}", file=sys.stderr)
        return 130


def _check_out_folder(args: argparse.Namespace) -> None:
    """A command that writes a folder refuses an --out that is a file, before any work."""
    out = getattr(args, "out", None)
    if args.command in ("export", "finetune", "finetune-lm", "federate") and out and os.path.isfile(out):
        raise ValueError(f"--out {out} is a file, and {args.command} writes a folder there: give a folder's path")


# The least value of each numeric flag (whichever the command has). Checked before any model
# loads, so that --epochs 0 or --batch 0 fails at once, with the flag's name.
_AT_LEAST = {"batch": 1, "epochs": 1, "steps": 1, "size": 1, "max_len": 1, "classes": 1, "seq_len": 2,
             "train_limit": 1, "val_limit": 1, "val_count": 1, "limit": 1, "max_chars": 1, "eval_every": 1,
             "search_steps": 1, "search_seeds": 1, "search_bands": 1, "search_score_items": 1, "qa_eval": 0,
             "max_new_tokens": 1, "warmup": 0, "weight_decay": 0, "checkpoint_every": 0}


def _check_numbers(args: argparse.Namespace) -> None:
    for name, least in _AT_LEAST.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if getattr(args, "lr", None) is not None and not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr:g} (e.g. --lr 0.003)")


def _parser() -> argparse.ArgumentParser:
    from edgetune.apps.lm import lm_names

    parser = argparse.ArgumentParser(prog="edgetune", description=__doc__)
    sub = parser.add_subparsers(required=True, metavar="command", dest="command")
    plan = sub.add_parser("plan", help="compile one training step and print its per-layer report")
    plan.add_argument("--model", default="mobilenetv2", help="built-in model: " + ", ".join(_models()))
    _common(plan, batch=8, size=128)
    plan.set_defaults(run=run_plan)
    export = sub.add_parser("export", help="compile one training step and write it as a plain ONNX graph "
                            "(with its manifest and starting state), for onnxruntime or any ONNX runtime")
    export.add_argument("--model", default="mobilenetv2",
                        help="built-in (" + ", ".join(_models()) + "), pretrained (mobilenetv2-imagenet, "
                        "efficientnet-lite0-imagenet, minilm-l6) or a language model (" + ", ".join(lm_names()) + ")")
    export.add_argument("--weights", help="start from these weights: the model.safetensors of `edgetune finetune` "
                        "(same --model and --classes) or the trained/model.safetensors of `finetune-lm`")
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder for step.onnx, predict.onnx, manifest.json and state.safetensors")
    where.add_argument("--web", metavar="DIR", help="a static web folder instead: the export in DIR/model, "
                       "onnxruntime-web, edgetune-web.js and a fine-tuning page (image classifiers); any web "
                       "server can host it (`python -m edgetune.web.serve DIR` sends the headers threads need)")
    export.add_argument("--lr", type=float, default=0.01, help="the learning rate the step starts with (a runner "
                        "can change it)")
    export.add_argument("--int8", action="store_true", help="hold frozen linear weights as int8, dequantized in "
                        "the graph")
    _common(export, batch=8, size=128, scheme=None)
    export.set_defaults(run=run_export)
    ft = sub.add_parser("finetune", help="fine-tune a (pretrained) model on a dataset under a scheme")
    _job_args(ft)
    ft.add_argument("--budget", help="memory for training on top of the weights, e.g. 40MB: with --scheme auto, "
                    "the search's limit; with another scheme, a step predicted over it is refused")
    ft.add_argument("--out", help="folder for the checkpoint, history and plot (default: runs/<model>-<data>-<time>)")
    ft.add_argument("--scheme", default="bias_only", help="full | bias_only | last:K | mbv2-49kb ... mbv2-138kb | "
                    "a JSON file | auto (search under --budget); the new head is always trained")
    _search_args(ft)
    _run_args(ft)
    ft.set_defaults(run=run_finetune)
    se = sub.add_parser("search", help="find the best scheme whose measured peak fits a memory budget")
    _job_args(se)
    se.add_argument("--budget", required=True, help="memory for training on top of the weights, e.g. 40MB")
    se.add_argument("--out", default="scheme.json", help="where to write the scheme (default: scheme.json)")
    _search_args(se)
    se.set_defaults(run=run_search)
    demo = sub.add_parser("demo", help="fine-tune ImageNet MobileNetV2 sparsely on Fashion-MNIST, "
                          "with the memory PyTorch needs for the same job")
    from edgetune.apps import demo as demo_job

    demo_job.add_arguments(demo)
    demo.set_defaults(run=demo_job.run)
    web_demo = sub.add_parser("web-demo", help="fine-tune ImageNet MobileNetV2 inside a web page on symbols you "
                              "draw: builds the page and serves it on localhost")
    from edgetune.web import demo as web_demo_job

    web_demo_job.add_arguments(web_demo)
    web_demo.set_defaults(run=web_demo_job.run)
    _lm_parsers(sub)
    _federate_parser(sub)
    return parser


def _lm_parsers(sub) -> None:
    from edgetune.apps.lm import lm_names

    lm = sub.add_parser("finetune-lm", help="fine-tune a language model on chats or plain text under a scheme")
    lm.add_argument("--model", default="smollm2-135m", help="one of " + ", ".join(lm_names()) + " (tiny-*: random, for tests)")
    lm.add_argument("--data", default="sharegpt", help="sharegpt (English two-turn subset) | FILE.jsonl "
                    "({messages: [...]}, {conversations: [...]} or {text: ...} a line) | FILE.json (a list) | FILE.txt")
    lm.add_argument("--scheme", help=f"{DEFAULT_LM_SCHEME} (default) | lm-last:K | norms | lora:R | full | last:K | "
                    "a JSON file of patterns | auto (searched under --budget, edgetune.apps.lm_search)")
    lm.add_argument("--budget", help="memory for training on top of the weights, e.g. 300MB: with --scheme auto, "
                    "the search's; with a given scheme, the step is fitted to it (transformer blocks recomputed in "
                    "the backward) or refused")
    _lm_search_args(lm)
    length = lm.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps (default 100)")
    length.add_argument("--epochs", type=int, help="passes over the training examples instead of --steps")
    lm.add_argument("--batch", type=int, default=4)
    lm.add_argument("--seq-len", type=int, default=128, help="tokens per example: longer ones are cut, shorter padded")
    lm.add_argument("--buckets", default="auto", help="lengths a batch is cut to, the shortest that holds it, each "
                    "compiled on first use; batches then group examples of similar length: auto (64, 128, ... "
                    "below --seq-len, and --seq-len) | none (--seq-len only, batches of random examples) | "
                    "comma-separated token counts")
    lm.add_argument("--optimizer", choices=ALL_OPTIMIZERS, default="adamw",
                    help="adamw (default), sgd (momentum 0.9), adafactor (factored second moment), mezo "
                         "(zeroth-order: two forward passes a step, "
                         "no activations or optimizer state kept; slower to learn), or galore (Adam on a low-rank "
                         "projection of each trained 2-D weight's gradient but the embeddings': less optimizer state)")
    lm.add_argument("--galore-rank", type=int, help="galore: the projection's rank (default 128; weights whose "
                    "smaller side is not above it get AdamW)")
    lm.add_argument("--galore-gap", type=int, help="galore: steps between recomputing each projection (default 200)")
    lm.add_argument("--galore-scale", type=float, help="galore: the projected update's scale (default 0.25)")
    lm.add_argument("--lr", type=float, help="learning rate (default: 3e-3 for adafactor, 1e-4 for the others)")
    lm.add_argument("--weight-decay", type=float, default=0.0)
    lm.add_argument("--int8", action="store_true", help="hold frozen linear weights as int8 (a quarter of their "
                    "memory; the step uses them dequantized, so the numbers change by the rounding)")
    lm.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    lm.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup")
    held = lm.add_mutually_exclusive_group()
    held.add_argument("--val-fraction", type=float, help="share of the examples held out (default 0.05)")
    held.add_argument("--val-count", type=int, help="number of examples held out")
    lm.add_argument("--eval-every", type=int, help="steps between evaluations (default: before and after only)")
    lm.add_argument("--qa-eval", type=int, default=0, metavar="N",
                    help="also ask N packaged questions with known answers (edgetune.data.tasks) before and after "
                         "training, and score the greedy replies (OUT/answers.json); 0: do not")
    lm.add_argument("--limit", type=int, help="use only the first N records (windows of a .txt)")
    lm.add_argument("--max-chars", type=int, help="sharegpt: skip conversations longer than this (default 4 x --seq-len)")
    lm.add_argument("--save", choices=["trained", "whole"], default="trained",
                    help="trained: only the parameters the scheme trains (default); whole: every weight")
    lm.add_argument("--out", help="folder for weights or adapter, history, plot, report (default: runs/lm-<model>-<time>)")
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--no-progress", action="store_true")
    _lisa_args(lm)
    _run_args(lm)
    lm.set_defaults(run=run_finetune_lm)
    _search_lm_parser(sub)
    gen = sub.add_parser("generate", help="answer a prompt with a language model (optionally fine-tuned)")
    gen.add_argument("--model", default="smollm2-135m", help="one of " + ", ".join(lm_names()))
    trained = gen.add_mutually_exclusive_group()
    trained.add_argument("--weights", help="a .safetensors file from finetune-lm (trained parameters or whole model)")
    trained.add_argument("--adapter", help="a PEFT adapter folder from finetune-lm with a LoRA scheme")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", help="a system message before the prompt (default: the template's)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(run=run_generate)


def _common(p: argparse.ArgumentParser, batch: int, size: int, scheme: str | None = "bias_only",
            optimizer: str = "sgd") -> None:
    default = f" (default {scheme})" if scheme else f" (default: bias_only; {DEFAULT_LM_SCHEME} for a language model)"
    p.add_argument("--scheme", default=scheme, help="full | bias_only | last:K | a published TTE scheme (mbv2-49kb ... "
                   "mbv2-138kb) | a language model's (lm-sparse:K, lora:R, ...) | a JSON file" + default)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--size", type=int, default=size, help="image side in pixels (tokens for a text model)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=optimizer)
    p.add_argument("--train-mode", action="store_true", help="batch statistics in BatchNorm (default: eval mode)")


def _job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mobilenetv2-imagenet",
                   help="pretrained: mobilenetv2-imagenet, efficientnet-lite0-imagenet, minilm-l6; or a built-in model")
    p.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist | digits | rotten-tomatoes | an image folder (class sub-folders) | .npz | .csv")
    p.add_argument("--val-data", help="held-out data (default: the dataset's test split, else --val-fraction of it)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--train-limit", type=int, help="use only this many training items (stratified)")
    p.add_argument("--val-limit", type=int, help="evaluate on only this many held-out items (stratified)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd (momentum 0.9), adamw, adafactor (factored second moment: almost no optimizer state), "
                        "or mezo (zeroth-order: forward passes only, the memory of inference; many more steps)")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.003 for sgd and adafactor, 3e-4 for adamw, "
                   "1e-5 for mezo)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    p.add_argument("--max-len", type=int, help="tokens per text (default: the model's)")
    p.add_argument("--no-augment", action="store_true", help="no random crops/flips of training images")
    p.add_argument("--strict", action="store_true", help="stop on an unreadable or non-image file instead of skipping it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="steps between checkpoints in OUT/checkpoint (also saved after each evaluation; 0: only then)")
    p.add_argument("--resume", metavar="RUN_DIR", help="go on with the run in RUN_DIR (its --out) from its last "
                   "checkpoint, with its settings")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search-steps", type=int, default=50,
                   help="training steps of each contribution run (with --lr, --batch, --optimizer)")
    p.add_argument("--search-ratios", default="0,0.125,0.25,0.5,1",
                   help="channel ratios a weight may train at (0 = frozen), comma-separated")
    p.add_argument("--search-space", choices=["auto", "layers", "blocks"], default="auto",
                   help="layers: biases of the last k layers and the later half's weights (the Tiny Training "
                        "Engine's); blocks: each projection kind of --search-bands bands over every transformer "
                        "block, at the ratios or as LoRA (--search-lora); auto: blocks where the model has them")
    p.add_argument("--search-bands", type=int, default=3, help="with the blocks space: groups of consecutive blocks")
    p.add_argument("--search-lora", default="none", help="with the blocks space: LoRA ranks a projection may train "
                   "with instead, comma-separated (none: no LoRA candidates)")
    p.add_argument("--search-seeds", type=int, default=1, help="contribution runs per candidate, each with another "
                   "draw and order of the training items; the search uses their mean gain and logs their spread")
    p.add_argument("--search-cache", default=os.path.join("runs", "search-cache.json"),
                   help="contributions measured once, reused by later searches with other budgets")
    p.add_argument("--search-recompute", action="store_true",
                   help="let a scheme fit the budget by recomputing transformer blocks in the backward (a "
                        "forward of each such block more per step): deeper schemes fit, at some time")
    p.add_argument("--search-score", choices=["accuracy", "loss"], default="accuracy",
                   help="what a contribution run is scored by on its held-back items: accuracy, or minus the "
                        "cross-entropy (finer-grained where short runs barely change the accuracy)")


def _search_lm_parser(sub) -> None:
    from edgetune.apps.lm import lm_names

    se = sub.add_parser("search-lm", help="find the language-model scheme (projections at channel ratios or as "
                        "LoRA, norms) whose measured peak fits a memory budget, by contribution analysis")
    se.add_argument("--model", default="smollm2-135m", help="one of " + ", ".join(lm_names()))
    se.add_argument("--data", default="sharegpt", help="as finetune-lm's --data")
    se.add_argument("--budget", required=True, help="memory for training on top of the weights, e.g. 300MB")
    se.add_argument("--out", default="scheme.json", help="where to write the scheme (default: scheme.json)")
    se.add_argument("--batch", type=int, default=4)
    se.add_argument("--seq-len", type=int, default=128)
    se.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    se.add_argument("--lr", type=float, default=1e-3, help="the contribution runs' learning rate")
    held = se.add_mutually_exclusive_group()
    held.add_argument("--val-fraction", type=float, help="share of the examples held out, never seen by the search "
                      "(default 0.05): finetune-lm with the same --seed holds out the same ones")
    held.add_argument("--val-count", type=int)
    se.add_argument("--limit", type=int, help="use only the first N records")
    se.add_argument("--max-chars", type=int, help="sharegpt: skip conversations longer than this (default 4 x --seq-len)")
    se.add_argument("--seed", type=int, default=0)
    _lm_search_args(se)
    se.set_defaults(run=run_search_lm)


def _lm_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search-steps", type=int, default=30,
                   help="training steps of each contribution run (with --lr, --batch, --seq-len, --optimizer)")
    p.add_argument("--search-seeds", type=int, default=2, help="runs per candidate, each with another data order; "
                   "the search sums their mean gains and reports their spread")
    p.add_argument("--search-bands", type=int, default=6, help="groups of consecutive blocks: one projection kind "
                   "in one group is one candidate")
    p.add_argument("--search-ratios", default="0.125,0.25,0.5,1", help="channel ratios a projection may train at")
    p.add_argument("--search-lora", default="8", help="LoRA ranks a projection may train with instead, "
                   "comma-separated (none: no LoRA candidates)")
    p.add_argument("--search-kinds", help="the linear layers of a block to search, comma-separated names inside "
                   "a block, e.g. self_attn.q_proj,mlp.up_proj (default: every one)")
    p.add_argument("--search-score-items", type=int, default=64,
                   help="training examples set aside to score the contribution runs")
    p.add_argument("--search-cache", default=os.path.join("runs", "search-cache.json"),
                   help="contributions measured once, reused by later searches with other budgets")
    p.add_argument("--search-recompute", action="store_true",
                   help="schemes may fit the budget by recomputing transformer blocks in the backward (each costs "
                        "one more forward of the block): deeper schemes fit")


def _lm_search_settings(args: argparse.Namespace):
    from edgetune.apps.lm_search import LMSearchSettings

    return LMSearchSettings(steps=args.search_steps, batch=args.batch, seq_len=args.seq_len, optimizer=args.optimizer,
                            lr=args.lr, score_items=args.search_score_items, seeds=tuple(range(args.search_seeds)),
                            bands=args.search_bands, ratios=_ratios(args.search_ratios), lora_ranks=_lora_ranks(args.search_lora),
                            cache=args.search_cache, recompute_blocks=args.search_recompute,
                            kinds=tuple(k.strip() for k in args.search_kinds.split(",")) if args.search_kinds else None)


def _lora_ranks(text: str) -> tuple[int, ...]:
    lora = text.strip().lower()
    try:
        return () if lora in ("", "none") else tuple(int(r) for r in lora.split(","))
    except ValueError:
        raise ValueError(f"--search-lora takes LoRA ranks separated by commas, or none; got {text!r}") from None


def _searched_lm_scheme(args: argparse.Namespace, lm, train):
    """search_lm's result for this run (contributions from the cache where measured before)."""
    from edgetune.apps.lm_search import search_lm

    result, gains = search_lm(lm.model, args.model, args.data, train, parse_bytes(args.budget),
                              _lm_search_settings(args))
    print(f"searched scheme for {args.budget}: peak {result.measured_peak_bytes / 2**20:.1f} MB measured "
          f"({result.predicted_peak_bytes / 2**20:.1f} MB predicted), predicted gain {result.predicted_gain:+.4f} "
          f"in loss over the floor; {gains.noise_summary()}")
    return result


def run_search_lm(args: argparse.Namespace) -> int:
    train, _, lm = _lm_data(args)
    result = _searched_lm_scheme(args, lm, train)
    side = result.save(args.out)
    print(f"written to {args.out} (every gain with its spread: {side}); use it with: edgetune finetune-lm "
          f"--model {args.model} --scheme {args.out}{_budget_flag(result)} ...")
    return 0


def _models() -> list[str]:
    from edgetune.models import MODELS

    return sorted(MODELS)


def run_plan(args: argparse.Namespace) -> int:
    model, inputs, targets = _built_model(args)
    start = time.perf_counter()
    trainer = et.compile(model, _loss_for(args.model), inputs, targets, scheme=et.schemes.parse(args.scheme),
                         optimizer=by_name(args.optimizer, 0.01))
    print(f"{args.model}, scheme {args.scheme}, batch {args.batch}, "
          f"{'train' if args.train_mode else 'eval'}-mode norms; compiled in {time.perf_counter() - start:.1f}s\n")
    print(trainer.report())
    return 0


def run_export(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("onnx") is None:  # said before the model builds and compiles
        raise ValueError("exporting needs the onnx package: pip install -e '.[onnx]'")
    from edgetune.apps.lm import lm_names

    if args.web:  # said before the model builds and compiles
        from edgetune.web import onnxruntime_web_dist

        onnxruntime_web_dist()
    is_lm = args.model in lm_names()
    args.scheme = args.scheme or (DEFAULT_LM_SCHEME if is_lm else "bias_only")
    scheme = et.schemes.parse(args.scheme)  # a bad scheme fails before the model loads
    model, loss_fn, inputs, targets = _lm_to_export(args) if is_lm else _model_to_export(args)
    if args.weights:
        from edgetune.apps.lm import load_trained

        load_trained(model, args.weights)
    trainer = et.compile(model, loss_fn, inputs, targets, scheme=scheme, optimizer=by_name(args.optimizer, args.lr),
                         frozen_weights="int8" if args.int8 else "float")
    if args.web:
        from edgetune.web import export_web

        export_web(trainer, args.web)
    else:
        trainer.export_onnx(args.out)
    folder = os.path.join(args.web, "model") if args.web else args.out
    files = sorted(os.listdir(folder))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in files) / 2**20
    print(f"{args.model}, scheme {args.scheme}, batch {args.batch}: the whole training step ({trainer.trainable_params:,} "
          f"trainable parameters, {args.optimizer}) as ONNX in {folder}/ ({', '.join(files)}; {size:.1f} MB). " +
          (f"The page: serve {args.web}/ (python -m edgetune.web.serve {args.web}) and open it; edgetune-web.js "
           "steps the model from any page" if args.web else
           "Run it with edgetune.runtime.StepRunner, or any ONNX runtime (manifest.json says what feeds what)"))
    return 0


def _model_to_export(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, tuple, tuple]:
    """A built-in or pretrained model (new head of --classes) and a random example batch."""
    from edgetune.apps.jobs import check_input_fits
    from edgetune.models.pretrained import PRETRAINED, load_pretrained

    if args.model not in PRETRAINED:
        model, inputs, targets = _built_model(args)
        return model, _loss_for(args.model), inputs, targets
    takes_length = "max_len" in inspect.signature(PRETRAINED[args.model]).parameters  # a text model
    p = load_pretrained(args.model, args.classes, **({"max_len": args.size} if takes_length else {}))
    p.model.train(args.train_mode)
    inputs, targets = _example(p.model, args)
    if p.kind == "image":
        check_input_fits(p.model, inputs, f"inputs of size {args.size}")
    return p.model, F.cross_entropy, inputs, targets


def _lm_to_export(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, tuple, tuple]:
    """A language model (--size tokens a row) and an example batch of ids, mask and labels."""
    from edgetune.apps.lm import lm_example, load_lm
    from edgetune.models.hf import causal_lm_loss

    return load_lm(args.model, seq_len=args.size).model, causal_lm_loss, *lm_example(args.batch, args.size)


def _built_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple, tuple]:
    """A built-in model in the mode asked for, and a random example batch it takes."""
    from edgetune.apps.jobs import check_input_fits
    from edgetune.models import MODELS, build

    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; {args.command} takes a built-in model: "
                         f"{', '.join(sorted(MODELS))}")
    extra = {"image_size": args.size} if args.model == "vit" else {}
    model = build(args.model, num_classes=args.classes, **extra)
    model.train(args.train_mode)
    inputs, targets = _example(model, args)
    check_input_fits(model, inputs, f"inputs of size {args.size}")
    return model, inputs, targets


def _example(model: torch.nn.Module, args: argparse.Namespace) -> tuple[tuple, tuple]:
    if getattr(model, "is_language_model", False):
        ids = torch.randint(0, args.classes, (args.batch, args.size))
        return (ids,), (ids,)
    if getattr(model, "is_text_classifier", False):  # --size is the number of tokens
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.size))
        return (ids, torch.ones_like(ids)), (torch.randint(0, args.classes, (args.batch,)),)
    return (torch.randn(args.batch, 3, args.size, args.size),), (torch.randint(0, args.classes, (args.batch,)),)


def _loss_for(name: str):
    if name == "llama":
        return lambda logits, ids: F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return F.cross_entropy


def run_finetune(args: argparse.Namespace) -> int:
    from edgetune.apps.finetune import finetune, fit_batch
    from edgetune.apps.jobs import build_job

    given, resumed = _resume_settings(args)
    _default_lr(args)
    torch.manual_seed(args.seed)
    job = build_job(args.model, args.data, size=args.size, max_len=args.max_len, val_data=args.val_data,
                    val_fraction=args.val_fraction, train_limit=args.train_limit, val_limit=args.val_limit,
                    seed=args.seed, augment=not args.no_augment, strict=args.strict)
    args.batch = fit_batch(args.batch, len(job.train))
    args.out = args.out or _default_out(f"{args.model}-{os.path.basename(args.data.rstrip('/'))}")
    scheme_file = os.path.join(args.out, "scheme.json")
    scheme, budget = _job_scheme(args, job, resumed)
    trainer = _compile_job(job, scheme, args, budget)
    _record_settings(args, given, resumed)
    write_json(scheme_file, et.schemes.as_mapping(trainer.rules))  # reloadable with --scheme FILE
    print(f"{args.model} on {args.data} ({len(job.train)} train / {len(job.val)} held-out, {job.describe_input}), "
          f"scheme {args.scheme}: {trainer.trainable_params:,} trainable parameters, predicted peak "
          f"{trainer.report().predicted_peak_bytes / 2**20:.1f} MB above the weights")
    checkpoints = _checkpoints(args, trainer, getattr(job.prepare, "generators", {}))
    history = finetune(trainer, job.train, job.val, job.prepare, epochs=args.epochs, batch_size=args.batch,
                       lr=args.lr, schedule=args.schedule, warmup=args.warmup, seed=args.seed,
                       progress=not args.no_progress, checkpoints=checkpoints)
    out = _save_run(args, job, trainer, history)
    print(f"\nheld-out accuracy {100 * history.evals[0]['accuracy']:.2f}% -> {100 * history.final['accuracy']:.2f}% "
          f"in {history.seconds:.0f}s; checkpoint, history and plot in {out}/")
    return 0


# -- runs that can be resumed (edgetune.apps.runs) -------------------------------------------

def _resume_settings(args: argparse.Namespace) -> tuple[argparse.Namespace, bool]:
    """(the arguments as given, whether --resume continues a run): a resumed run's settings
    replace `args`' own. The arguments as given are what a new run records."""
    from edgetune.apps.runs import resume_settings

    given = argparse.Namespace(**vars(args))
    return given, resume_settings(args, _parser().parse_args([args.command]))


def _record_settings(args: argparse.Namespace, given: argparse.Namespace, resumed: bool) -> None:
    from edgetune.apps.runs import record_settings

    if not resumed:
        given.out = args.out
        record_settings(args, given)


def _default_out(name: str) -> str:
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _checkpoints(args: argparse.Namespace, trainer: et.Trainer, generators: dict):
    from edgetune.apps.runs import Checkpoints

    checkpoints = Checkpoints(args.out, trainer, args.checkpoint_every, generators)
    if args.resume:
        print(f"resuming {args.out} from {checkpoints.path}" if os.path.exists(checkpoints.path)
              else f"{args.out} has no checkpoint yet: starting it from the beginning")
    return checkpoints


def _job_scheme(args: argparse.Namespace, job, resumed: bool) -> tuple[et.schemes.SchemeLike, int | str | None]:
    """(the scheme, the memory_budget to compile it under). A resumed run trains the scheme it
    started with, searched (--scheme auto) or given."""
    from edgetune.apps.jobs import search_job

    if args.scheme == "auto" and not args.budget:
        raise ValueError("--scheme auto needs --budget, e.g. --budget 40MB")
    if args.scheme == "auto" or (resumed and os.path.isfile(os.path.join(args.out, "scheme.json"))):
        return _resumed_or_searched_scheme(args, resumed, _given_budget(args),
                                           lambda: search_job(job, parse_bytes(args.budget), _search_settings(args)))
    return et.schemes.parse(args.scheme), args.budget  # compile fits it to --budget or refuses it


def _resumed_or_searched_scheme(args: argparse.Namespace, resumed: bool, given_budget, search):
    """(scheme, memory_budget to compile it under). A resumed run's are those it started with:
    OUT/scheme.json, under the budget its search fitted it to (the side file
    OUT/scheme.search.json: a searched scheme that recomputes blocks measured within the budget
    under that limit), else `given_budget`. A new run calls search() and writes both there."""
    from edgetune.apps.search import side_file

    path = os.path.join(args.out, "scheme.json")
    side = side_file(path)
    if resumed and os.path.isfile(path):
        memory_budget = given_budget
        if os.path.isfile(side):
            with open(side) as f:
                memory_budget = json.load(f).get("memory_budget")
        return et.schemes.from_file(path), memory_budget
    result = search()
    os.makedirs(args.out, exist_ok=True)
    result.save(path)
    return result.scheme, result.memory_budget


def _given_budget(args: argparse.Namespace) -> int | str | None:
    return args.budget if args.scheme != "auto" or args.search_recompute else None


def _search_settings(args: argparse.Namespace):
    from edgetune.apps.jobs import SearchSettings

    return SearchSettings(batch=args.batch, lr=args.lr, optimizer=args.optimizer, steps=args.search_steps,
                          seed=args.seed, cache=args.search_cache, ratios=_ratios(args.search_ratios),
                          space=args.search_space, bands=args.search_bands, lora_ranks=_lora_ranks(args.search_lora),
                          seeds=args.search_seeds, recompute_blocks=args.search_recompute, score=args.search_score)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(","))
    except ValueError:
        ratios = ()
    # 0 (frozen) is always a choice; the search needs at least one ratio that trains a weight.
    if not all(0 <= r <= 1 for r in ratios) or not any(r > 0 for r in ratios):
        raise ValueError(f"--search-ratios takes channel ratios in [0, 1] separated by commas, at least one above "
                         f"0, e.g. 0,0.25,1; got {text!r}")
    return ratios


def _default_lr(args: argparse.Namespace) -> None:
    # Measured on ImageNet MobileNetV2 -> Fashion-MNIST with frozen BN statistics: SGD with
    # momentum at 0.01 already diverges for full fine-tuning; 0.003 trains every scheme tried.
    # MeZO: no measurement here yet; 1e-5 is the top of the range its paper uses. Adafactor's
    # rate is relative to each tensor's RMS: 3e-3 was the best on MiniLM -> Rotten Tomatoes,
    # full and searched (RESULTS.md).
    if args.lr is None:
        args.lr = {"sgd": 0.003, "adamw": 3e-4, "adafactor": 3e-3, "mezo": 1e-5}[args.optimizer]


def run_search(args: argparse.Namespace) -> int:
    from edgetune.apps.finetune import fit_batch
    from edgetune.apps.jobs import build_job, search_job

    _default_lr(args)
    # The new head (or a model without pretrained weights) is drawn as `finetune --seed` draws it:
    # contributions cached by one search are those of the model another search builds.
    torch.manual_seed(args.seed)
    job = build_job(args.model, args.data, size=args.size, max_len=args.max_len, val_data=args.val_data,
                    val_fraction=args.val_fraction, train_limit=args.train_limit, val_limit=args.val_limit,
                    seed=args.seed, augment=not args.no_augment, strict=args.strict)
    args.batch = fit_batch(args.batch, len(job.train))
    result = search_job(job, parse_bytes(args.budget), _search_settings(args))
    side = result.save(args.out)
    trained = ", ".join(f"{k}={v}" for k, v in result.scheme.items())
    gain = (f"gain {100 * result.predicted_gain:+.2f} points" if args.search_score == "accuracy"
            else f"change {-result.predicted_gain:+.4f} in the held-back loss")
    print(f"\nscheme for {args.budget}: {trained}\npredicted {gain} over the head alone; peak "
          f"{result.measured_peak_bytes / 2**20:.1f} MB measured "
          f"({result.predicted_peak_bytes / 2**20:.1f} MB predicted)\nwritten to {args.out} (details: {side}); "
          f"use it with: edgetune finetune --scheme {args.out}{_budget_flag(result)} ...")
    return 0


def _budget_flag(result) -> str:
    """The --budget a searched scheme that recomputes blocks must be trained under (rounded down)."""
    return f" --budget {int(result.memory_budget / 2**10)}KB" if result.memory_budget else ""


def _compile_job(job, scheme, args: argparse.Namespace, budget: int | str | None) -> et.Trainer:
    inputs, targets = job.example(args.batch)
    # max_shapes=2: the last partial batch of an epoch trains (edgetune.apps.finetune).
    return et.compile(job.model, job.loss_fn, inputs, targets, scheme=et.schemes.with_head(scheme, job.head),
                      optimizer=by_name(args.optimizer, args.lr, args.weight_decay), memory_budget=budget,
                      max_shapes=2)


def _save_run(args: argparse.Namespace, job, trainer: et.Trainer, history) -> str:
    from edgetune.apps.finetune import save_weights
    from edgetune.apps.peft import adapters_merged

    with adapters_merged(trainer) as model:  # the whole model as trained: LoRA adapters folded in
        save_weights(model, os.path.join(args.out, "model.safetensors"),
                     metadata={"model": args.model, "data": args.data, "classes": json.dumps(job.train.classes)})
    history.save(os.path.join(args.out, "history.json"))
    history.plot(os.path.join(args.out, "curves.png"), title=f"{args.model} on {args.data}, scheme {args.scheme}")
    write_text(os.path.join(args.out, "report.txt"), str(trainer.report()) + "\n")
    return args.out



# -- federated fine-tuning (edgetune.federated, Flower's Simulation Engine) -------------------

def _federate_parser(sub) -> None:
    fed = sub.add_parser("federate", help="fine-tune a model across simulated clients with Flower: FedAvg over "
                         "the trained slices, or FedKSeed with --optimizer mezo")
    fed.add_argument("--model", default="resnet", help="a built-in or pretrained model (as finetune's --model)")
    fed.add_argument("--data", default="digits", help="a dataset finetune takes (digits, fashion-mnist, a folder, ...)")
    fed.add_argument("--scheme", default="bias_only", help="what trains and travels (as finetune's --scheme); the "
                     "new head always trains")
    fed.add_argument("--clients", type=int, default=4, help="simulated clients, each its own partition")
    fed.add_argument("--rounds", type=int, default=5)
    fed.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA (label skew; small ALPHA: a few "
                     "classes a client)")
    fed.add_argument("--local-steps", type=int, default=10, help="training steps a client runs each round")
    fed.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                     help="sgd, adamw or adafactor: FedAvg over the trained slices; mezo: FedKSeed (seeds and "
                          "scalars travel)")
    fed.add_argument("--lr", type=float, help="learning rate (default: 0.003 for sgd and adafactor, 3e-4 for adamw, "
                     "1e-5 for mezo)")
    fed.add_argument("--pool", type=int, default=1024, help="FedKSeed's K: the seeds MeZO's directions come from")
    fed.add_argument("--server-momentum", type=float, default=0.0,
                     help="FedAvgM: the server moves the slices by this momentum times its last move plus the "
                          "round's average change (0: plain FedAvg; sgd and adamw only)")
    fed.add_argument("--batch", type=int, default=16)
    fed.add_argument("--size", type=int, help="image side in pixels (default: the model's native size)")
    fed.add_argument("--train-limit", type=int, help="use only this many training items (stratified)")
    fed.add_argument("--val-limit", type=int, help="evaluate on only this many held-out items (stratified)")
    fed.add_argument("--seed", type=int, default=0)
    fed.add_argument("--out", help="folder for history.json, the plot and the weights "
                     "(default: runs/federate-<model>-<data>-<time>)")
    fed.set_defaults(run=run_federate)


def run_federate(args: argparse.Namespace) -> int:
    import logging

    from edgetune.apps.finetune import save_weights
    from edgetune.apps.jobs import build_job
    from edgetune.federated import job as fjob

    for name in ("clients", "rounds", "local_steps", "pool"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.server_momentum < 1:
        raise ValueError(f"--server-momentum must be in [0, 1), got {args.server_momentum}")
    if args.server_momentum and args.optimizer == "mezo":
        raise ValueError("--server-momentum is FedAvgM's, over averaged slices; FedKSeed (--optimizer mezo) "
                         "sums seeds' gradients instead")
    _default_lr(args)
    torch.manual_seed(args.seed)
    job = build_job(args.model, args.data, size=args.size, train_limit=args.train_limit, val_limit=args.val_limit,
                    seed=args.seed, augment=False)
    parts = fjob.partition(job.train.labels, args.clients, args.partition, seed=args.seed, min_size=args.batch)
    task = fjob.job_task(job, parts, et.schemes.with_head(et.schemes.parse(args.scheme), job.head),
                         by_name(args.optimizer, args.lr), local_steps=args.local_steps, batch_size=args.batch,
                         seed=args.seed)
    args.out = args.out or _default_out(f"federate-{args.model}-{os.path.basename(args.data.rstrip('/'))}")
    fedkseed = args.optimizer == "mezo"
    print(f"{args.model} on {args.data}: {len(job.train)} train items over {args.clients} clients "
          f"({args.partition}: {', '.join(str(len(p)) for p in parts)}), {len(job.val)} held-out; "
          f"{'FedKSeed, K=' + str(args.pool) if fedkseed else 'FedAvg'} for {args.rounds} rounds", flush=True)

    def progress(r: int, history) -> None:
        central = history.rounds[r]["central"] or {}
        down, up = fjob.round_bytes(history.rounds[r])
        clients = max(1, len(history.rounds[r]["clients"]))
        score = (f"held-out accuracy {100 * central['eval-accuracy']:.2f}%" if "eval-accuracy" in central
                 else f"held-out loss {central.get('eval-loss', float('nan')):.4f}")
        moved = f"; per client {down // clients:,} B down, {up // clients:,} B up" if r else " (the initial model)"
        print(f"round {r}/{args.rounds}: {score}, loss {central.get('eval-loss', float('nan')):.4f}{moved}", flush=True)

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower's own per-round log: the line above instead
    options = dict(num_rounds=args.rounds, fraction_evaluate=0.0, on_round=progress)
    if args.server_momentum:
        from flwr.serverapp.strategy import FedAvgM

        options.update(strategy=FedAvgM, strategy_options={"server_momentum": args.server_momentum})
    if fedkseed:
        from edgetune.federated.fedkseed import run_simulation

        server = run_simulation(task, args.clients, k=args.pool, pool_seed=args.seed, **options)
    else:
        from edgetune.federated.server import run_simulation

        server = run_simulation(task, args.clients, **options)
    history = server.history
    if len(history.rounds) <= args.rounds:
        raise ValueError(f"the simulation ended after {len(history.rounds) - 1} of {args.rounds} rounds "
                         "(see Flower's log above)")
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "command")}
    write_json(os.path.join(args.out, "history.json"), {"settings": settings, **history.to_dict()})
    fjob.plot(history, os.path.join(args.out, "curves.png"),
              title=f"{args.model} on {args.data}, {args.clients} clients, {args.optimizer}")
    save_weights(server.trainer.model, os.path.join(args.out, "model.safetensors"),
                 metadata={"model": args.model, "data": args.data, "classes": json.dumps(job.train.classes)})
    moved = sum(sum(fjob.round_bytes(r)) for r in history.rounds)
    print(f"{moved:,} bytes moved in all (sending the whole model would move {history.model_bytes:,} per client "
          f"each way a round); history, plot and weights in {args.out}/")
    return 0

# -- language models -------------------------------------------------------------------------

DEFAULT_LM_SCHEME = "lm-sparse:6"  # PockEngine's LLM scheme on the last 6 blocks


def parse_lm_scheme(spec: str | None) -> et.schemes.SchemeLike:
    return et.schemes.parse(spec or DEFAULT_LM_SCHEME)


def run_finetune_lm(args: argparse.Namespace) -> int:
    from edgetune.apps.finetune import fit_batch
    from edgetune.apps.lm import compile_lm, finetune_lm
    from edgetune.data.tasks import instruction_questions

    given, resumed = _resume_settings(args)
    _default_lm_lr(args)
    _check_lisa(args)  # before the model loads
    torch.manual_seed(args.seed)
    auto = args.scheme == "auto"
    if auto and not args.budget:
        raise ValueError("--scheme auto needs --budget, e.g. --budget 300MB")
    if auto and args.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"the search scores schemes by short AdamW or SGD runs; --scheme auto does not take "
                         f"--optimizer {args.optimizer}: search with adamw (edgetune search-lm), then pass the "
                         "scheme file")
    scheme = None if auto else parse_lm_scheme(args.scheme)  # a bad scheme fails before the model loads
    optimizer = _lm_optimizer(args)  # as do bad optimizer settings
    train, val, lm = _lm_data(args)
    args.batch = fit_batch(args.batch, len(train), "training examples")
    args.out = args.out or _default_out(f"lm-{args.model}")
    budget = args.budget  # a given scheme is fitted to it or refused
    if auto:
        # (a run from before the side file: its search recomputed no blocks)
        scheme, budget = _resumed_or_searched_scheme(args, resumed, None, lambda: _searched_lm_scheme(args, lm, train))
    buckets = length_ladder(args.buckets, args.seq_len)
    trainer = _lisa_trainer(args, lm, buckets, optimizer) if args.lisa_layers else compile_lm(
        lm.model, scheme, args.batch, args.seq_len, optimizer, frozen_weights="int8" if args.int8 else "float",
        buckets=buckets, memory_budget=budget)
    _record_settings(args, given, resumed)
    print(f"{args.model}, scheme {_lm_scheme_name(args)}: {trainer.trainable_params:,} trainable "
          f"parameters, predicted peak {trainer.report().predicted_peak_bytes / 2**20:.1f} MB above the weights")
    questions = instruction_questions(args.qa_eval) if args.qa_eval else []
    before = _answer_scores(trainer, lm, questions) if questions else None
    history = finetune_lm(trainer, train, val, steps=None if args.epochs else (args.steps or 100), epochs=args.epochs,
                          batch_size=args.batch, lr=args.lr, schedule=args.schedule, warmup=args.warmup,
                          eval_every=args.eval_every, seed=args.seed, progress=not args.no_progress,
                          checkpoints=_checkpoints(args, trainer, {}), buckets=buckets)
    out, saved = _save_lm_run(args, trainer, history)
    if questions:
        _write_answer_scores(args, questions, before, _answer_scores(trainer, lm, questions))
    first, last = history.evals[0], history.final
    print(f"\ntraining loss {first['train_loss']:.4f} -> {last['train_loss']:.4f}, held-out loss {first['loss']:.4f} "
          f"-> {last['loss']:.4f} after {len(history.losses)} steps in {history.seconds:.0f}s\n{saved}; history, "
          f"plot and report in {out}/")
    return 0


def _answer_scores(trainer, lm, questions) -> dict:
    from edgetune.apps.lm import answer_scores
    from edgetune.apps.peft import adapters_merged

    with adapters_merged(trainer) as model:
        return answer_scores(model, lm.tokenizer, questions)


def _write_answer_scores(args: argparse.Namespace, questions, before: dict, after: dict) -> None:
    write_json(os.path.join(args.out, "answers.json"), {
        "before": {k: v for k, v in before.items() if k != "replies"},
        "after": {k: v for k, v in after.items() if k != "replies"},
        "questions": [{"prompt": q.prompt, "answer": q.answer, "kind": q.kind, "before": b, "after": a}
                      for q, b, a in zip(questions, before["replies"], after["replies"])]})
    print(f"{args.qa_eval} packaged questions, the answer in the reply: {before['contained']:.1%} -> "
          f"{after['contained']:.1%} (the answer alone: {before['exact']:.1%} -> {after['exact']:.1%}); "
          f"replies in {args.out}/answers.json")


def _lisa_args(p: argparse.ArgumentParser) -> None:
    from edgetune.apps.lisa import DEFAULT_INTERVAL

    p.add_argument("--lisa-layers", type=int, metavar="GAMMA", help="LISA (edgetune.apps.lisa): train the embedding, "
                   "the LM head and GAMMA blocks sampled anew every --lisa-interval steps, each period with a fresh "
                   "AdamW; each period compiles its step (with --buckets, one per length). Takes no --scheme")
    p.add_argument("--lisa-interval", type=int, metavar="K", help=f"steps a LISA period (default {DEFAULT_INTERVAL})")


def _check_lisa(args: argparse.Namespace) -> None:
    """LISA's flags, and what it does not go with, refused before the model loads."""
    from edgetune.apps.lisa import _NOT_INT8, _NOT_MEZO

    if args.lisa_layers is None:
        if args.lisa_interval is not None:
            raise ValueError("--lisa-interval needs --lisa-layers (the blocks LISA trains a period)")
        return
    for flag, value in (("--lisa-layers", args.lisa_layers), ("--lisa-interval", args.lisa_interval)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.scheme and _names_lora(args.scheme):
        raise ValueError("LISA trains whole blocks, a LoRA scheme trains adapters beside frozen ones: drop --scheme "
                         "for LISA, or --lisa-layers for LoRA")
    if args.scheme:
        raise ValueError(f"LISA chooses what trains each period (the embedding, the LM head and "
                         f"{args.lisa_layers} sampled blocks): drop --scheme {args.scheme}")
    if args.budget:
        raise ValueError(f"LISA's steps are not fitted to a memory budget: drop --budget {args.budget}")
    if args.optimizer == "mezo":
        raise ValueError(_NOT_MEZO)
    if args.int8:
        raise ValueError(_NOT_INT8)


def _names_lora(spec: str) -> bool:
    try:
        scheme = et.schemes.parse(spec)
    except (SchemeError, ValueError):
        return False
    if isinstance(scheme, et.schemes.Scheme):
        return scheme.name.startswith("lora(")
    return any(isinstance(rule, dict) and "lora" in rule for rule in scheme.values())


def _lisa_trainer(args: argparse.Namespace, lm, buckets: list[int], optimizer):
    from edgetune.apps.lisa import DEFAULT_INTERVAL, lisa_lm

    trainer = lisa_lm(lm.model, args.batch, args.seq_len, optimizer,
                      layers=args.lisa_layers, interval=args.lisa_interval or DEFAULT_INTERVAL, buckets=buckets,
                      seed=args.seed)
    print(trainer.describe())
    return trainer


def _lm_scheme_name(args: argparse.Namespace) -> str:
    from edgetune.apps.lisa import DEFAULT_INTERVAL

    if args.lisa_layers:
        return f"lisa:layers={args.lisa_layers},interval={args.lisa_interval or DEFAULT_INTERVAL}"
    return args.scheme or DEFAULT_LM_SCHEME


def _default_lm_lr(args: argparse.Namespace) -> None:
    # 1e-4 suits MeZO too: on SmolLM2 lm-sparse:6 it was the best of 1e-5..1e-3 by validation
    # loss (experiments.mezo_vs_backprop); at 1e-3 the loss ended above the pretrained model's.
    # Adafactor's rate is relative to each tensor's RMS: 3e-3 was its best on SmolLM2's last
    # blocks (experiments/lm_notes.md), as on MiniLM.
    if args.lr is None:
        args.lr = 3e-3 if args.optimizer == "adafactor" else 1e-4


def _lm_optimizer(args: argparse.Namespace):
    """finetune-lm's optimizer; the --galore-* flags go with --optimizer galore only."""
    galore = {"rank": args.galore_rank, "update_gap": args.galore_gap, "scale": args.galore_scale}
    given = [f"--galore-{flag}" for flag, v in zip(("rank", "gap", "scale"), galore.values()) if v is not None]
    if given and args.optimizer != "galore":
        raise ValueError(f"{', '.join(given)} set GaLore, but the optimizer is {args.optimizer}: add --optimizer galore")
    if args.optimizer == "galore" and args.lisa_layers:
        raise ValueError("--optimizer galore with --lisa-layers is untried (LISA builds a step of its own each "
                         "period): use one or the other")
    return by_name(args.optimizer, args.lr, args.weight_decay, **(galore if args.optimizer == "galore" else {}))


def length_ladder(spec: str, seq_len: int) -> list[int]:
    """--buckets as lengths, ending with seq_len."""
    from edgetune.data.chat import length_buckets

    spec = spec.strip().lower()
    if spec == "auto":
        return length_buckets(seq_len)
    if spec == "none":
        return [seq_len]
    try:
        lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--buckets takes auto, none or comma-separated token counts, got {spec!r}") from None
    if not lengths or lengths[0] < 2 or lengths[-1] > seq_len:
        raise ValueError(f"--buckets {spec}: each length must be between 2 and --seq-len ({seq_len})")
    return lengths if lengths[-1] == seq_len else lengths + [seq_len]


def _lm_data(args: argparse.Namespace):
    from edgetune.data.chat import load_lm_data
    from edgetune.apps.lm import load_lm

    lm = load_lm(args.model, seq_len=args.seq_len)
    max_chars = args.max_chars or 4 * args.seq_len
    data = load_lm_data(args.data, lm.tokenizer, args.seq_len, limit=args.limit, max_chars=max_chars)
    if len(data) < 2:
        more = " or lower --seq-len (a .txt is cut into windows of --seq-len tokens)" if args.data.endswith(".txt") else ""
        raise ValueError(f"{args.data} gives a single example of {args.seq_len} tokens, but training and held-out "
                         f"need one each: add data{more}")
    train, val = data.split(args.val_fraction, args.val_count, seed=args.seed)
    print(f"{args.data}: {data.describe()}; {len(train)} for training, {len(val)} held out")
    return train, val, lm


def _save_lm_run(args: argparse.Namespace, trainer: et.Trainer, history) -> tuple[str, str]:
    from edgetune.apps.lm import save_trained, trained_names, uses_lora

    out = args.out
    meta = {"model": args.model, "data": args.data, "scheme": _lm_scheme_name(args)}
    saved = []
    if uses_lora(trainer):
        from edgetune.apps.peft import save_peft_adapter

        save_peft_adapter(trainer, os.path.join(out, "adapter"))
        saved.append(f"adapter in {out}/adapter (edgetune generate --adapter)")
    if args.save == "whole" or trained_names(trainer):
        path = os.path.join(out, "model.safetensors" if args.save == "whole" else "trained.safetensors")
        size = save_trained(trainer, path, whole=args.save == "whole", metadata=meta)
        saved.append(f"weights in {path} ({size / 2**20:.1f} MB; edgetune generate --weights)")
    history.save(os.path.join(out, "history.json"))
    history.plot(os.path.join(out, "curves.png"), title=f"{args.model} on {args.data}, scheme {meta['scheme']}")
    write_text(os.path.join(out, "report.txt"), str(trainer.report()) + "\n")
    return out, "; ".join(saved)


def run_generate(args: argparse.Namespace) -> int:
    from edgetune.apps.lm import check_weights_file, generate, load_lm, load_trained

    if args.weights:  # checked before the model's seconds of loading, as is the adapter
        check_weights_file(args.weights)
    if args.adapter and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise FileNotFoundError(f"{args.adapter} holds no adapter_config.json: give the adapter folder finetune-lm wrote")
    lm = load_lm(args.model)
    model = lm.model
    if args.weights:
        trained_on = load_trained(model, args.weights).get("model")
        if trained_on and trained_on != args.model:
            raise ValueError(f"{args.weights} was trained from {trained_on}, not {args.model}; pass --model {trained_on}")
    if args.adapter:
        model = _with_adapter(model, args.adapter)
    print(generate(model, lm.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.system, args.seed))
    return 0


def _with_adapter(model: torch.nn.Module, folder: str) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, folder).eval()


if __name__ == "__main__":
    sys.exit(main())
