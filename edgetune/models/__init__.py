"""Built-in models for demos, tests and benchmarks, by name.

    model = build("mobilenetv2-0.35", num_classes=10)

Every constructor takes `num_classes` (the vocabulary size for "llama") plus its own keyword
options, and defaults to something small that runs fast on a CPU."""
from functools import partial
from typing import Callable

from torch import nn

from .bert import BertClassifier, bert_minilm_l6, bert_tiny
from .efficientnet_lite import EfficientNetLite, efficientnet_lite0
from .llama import Llama, llama_tiny
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet10, resnet18
from .vit import VisionTransformer, vit_tiny

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenetv2": partial(mobilenet_v2, width_mult=1.0),
    "mobilenetv2-0.35": partial(mobilenet_v2, width_mult=0.35),
    "resnet": resnet10,
    "resnet18": resnet18,
    "vit": vit_tiny,
    "llama": llama_tiny,
    "efficientnet-lite0": efficientnet_lite0,
    # Text classifiers: forward(input_ids, attention_mask=None); `num_classes` is the label count.
    "bert-tiny": bert_tiny,
    "bert-minilm-l6": bert_minilm_l6,
}


def build(name: str, num_classes: int | None = None, **kw) -> nn.Module:
    """Build a registered model; `num_classes=None` keeps the constructor's default."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    if num_classes is not None:
        kw["num_classes"] = num_classes
    return MODELS[name](**kw)


__all__ = ["MODELS", "build", "MobileNetV2", "ResNet", "VisionTransformer", "Llama",
           "EfficientNetLite", "BertClassifier", "mobilenet_v2", "resnet10", "resnet18", "vit_tiny",
           "llama_tiny", "efficientnet_lite0", "bert_tiny", "bert_minilm_l6"]
