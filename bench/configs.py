"""What the benchmark compares: models, update schemes, batches and engines.

Every name here is a string so that the parent process can hand a configuration to a fresh
subprocess on its command line (`python -m bench.run_one ...`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import edgetune
from edgetune.models import build

IMAGE_SIZE = 128
NUM_CLASSES = 10
LR, MOMENTUM = 0.01, 0.9

# Benchmark name -> (edgetune.models name, constructor options).
MODELS = {
    "mobilenetv2": ("mobilenetv2", {}),
    "mobilenetv2-0.35": ("mobilenetv2-0.35", {}),
    "resnet": ("resnet", {}),
    # patch 8 at 128x128 gives 256 patches (+1 class token); the default patch 4 would give
    # 1024, an attention matrix ViTs are rarely run with.
    "vit": ("vit", {"image_size": IMAGE_SIZE, "patch_size": 8}),
}
SCHEMES = ["full", "bias-only", "tte", "last-3"]
BATCHES = [8, 1]
ENGINES = ["edgetune", "eager", "eager-full", "compile", "forward"]
# edgetune on its other backends (compile(backend=...)): run only when --engines names them.
# "edgetune" above is the torch backend, the default.
# "edgetune-mezo": the same scheme trained by MeZO (forward passes only), next to "forward".
OPT_IN_ENGINES = ["edgetune-ort", "edgetune-auto", "edgetune-mezo"]
ALL_ENGINES = ENGINES + OPT_IN_ENGINES
# Engines whose step does not depend on the scheme: measured once per model and batch.
SCHEME_FREE = ("eager-full", "forward")

# The Tiny-Training-Engine-style sparse scheme of each model (see SCHEME_NOTES).
RESNET_TTE = dict(n_bias_update=6, manual_weight_idx=[9, 10], weight_update_ratio=[0.25, 0.25])
VIT_TTE = {
    "blocks.1.attn.qkv.weight": 0.25,
    "blocks.1.mlp.fc1.weight": 0.25,
    "blocks.1.*.bias": "full",
    "norm.bias": "full",
    "head.*": "full",
}

SCHEME_NOTES = {
    "full": "every parameter (`schemes.full()`).",
    "bias-only": "every bias, conv/linear and norm (`schemes.bias_only()`).",
    "last-3": "the last three parameter-owning modules, as `schemes.last(3)` counts them "
              "(MobileNetV2: last 1x1 conv, its BN, the classifier; ResNet: layer4's downsample "
              "conv, its BN, fc; ViT: the last block's fc2, the final LayerNorm, head).",
    "tte": "Tiny-Training-Engine-style sparse update. MobileNetV2 (both widths): "
           "`published(\"mbv2-99kb\")` = BN biases of the last 25 convs (features.10 on), the "
           "first pointwise conv weights of features.10-17 at input-channel ratios "
           "1,1,1,1,1,1/8,1/2,1, classifier. ResNet: "
           f"`tte(**{RESNET_TTE})` = BN biases of the last 6 convs (layer3, layer4), "
           "layer4.0.conv1/conv2 weights at 1/4 of their input channels, fc. ViT: "
           "last block's biases (qkv, proj, fc1, fc2, both LayerNorms), final LayerNorm bias, "
           "head, and the last block's qkv and fc1 weights at 1/4 of their input channels.",
}


@dataclass
class Config:
    model: str
    scheme: str
    batch: int
    engine: str

    def argv(self) -> list[str]:
        return ["--model", self.model, "--scheme", self.scheme, "--batch", str(self.batch),
                "--engine", self.engine]


def build_model(model: str) -> torch.nn.Module:
    """The model in eval mode (running BN statistics, no dropout), seeded for repeatability."""
    torch.manual_seed(0)
    name, kw = MODELS[model]
    return build(name, num_classes=NUM_CLASSES, **kw).eval()


def build_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x, y


def scheme(model: str, name: str):
    """The edgetune scheme that every engine of this configuration trains."""
    if name == "full":
        return edgetune.schemes.full()
    if name == "bias-only":
        return edgetune.schemes.bias_only()
    if name.startswith("last-"):
        return edgetune.schemes.last(int(name.removeprefix("last-")))
    if name == "tte":
        return _tte(model)
    raise KeyError(f"unknown scheme {name!r}; known: {SCHEMES}")


def _tte(model: str):
    if model.startswith("mobilenetv2"):
        return edgetune.schemes.published("mbv2-99kb")
    if model == "resnet":
        return edgetune.schemes.tte(**RESNET_TTE)
    if model == "vit":
        return dict(VIT_TTE)
    raise KeyError(f"no TTE-style scheme for {model!r}")


def quick(models: list[str] = ("mobilenetv2",), extra_engines: list[str] = ()) -> list[Config]:
    """Each model at batch 8 with every scheme and engine, plus batch 1 for bias-only and tte.

    torch.compile is left out at batch 1: each of its configurations costs a cold Inductor
    compile of minutes on two cores, which alone would use up the quick budget.
    `extra_engines`: opt-in engines (OPT_IN_ENGINES) to run alongside.
    """
    engines = ENGINES + [e for e in OPT_IN_ENGINES if e in extra_engines]
    configs = expand(models, SCHEMES, [8], engines)
    return configs + expand(models, ["bias-only", "tte"], [1], [e for e in engines if e != "compile"])


def expand(models, schemes, batches, engines) -> list[Config]:
    """Every combination, with scheme-free engines once per model and batch."""
    out = []
    for model in models:
        for batch in batches:
            for engine in engines:
                if engine in SCHEME_FREE:
                    out.append(Config(model, "-", batch, engine))
                else:
                    out += [Config(model, s, batch, engine) for s in schemes]
    return out
