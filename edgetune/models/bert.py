"""A small BERT encoder with a sequence-classification head.

Parameter names match Hugging Face's `BertModel` state dict (`embeddings.word_embeddings.
weight`, `encoder.layer.0.attention.self.query.weight`, ...), so checkpoints such as
all-MiniLM-L6-v2 load without renaming. Deliberately left out:
- the pooler ([CLS] -> dense -> tanh): sentence-transformers models are trained with *mean
  pooling over the non-padding tokens*, so that is what `embed` returns and what the head
  reads;
- token types: every token is segment 0 (single-sentence classification);
- dropout: a compiled training step should be deterministic, and fine-tuning a small head on
  top of a pretrained encoder does not need it.

forward(input_ids [B, L] int64, attention_mask [B, L] (1 = token, 0 = padding)) -> [B, classes].
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        """From a Hugging Face config.json (only the fields this architecture has)."""
        if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with exact GELU and absolute positions is supported")
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                   cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["type_vocab_size"],
                   cfg["layer_norm_eps"])


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden)
        self.position_embeddings = nn.Embedding(c.max_positions, c.hidden)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden)
        self.LayerNorm = nn.LayerNorm(c.hidden, eps=c.eps)

    def forward(self, ids):
        # Positions 0..L-1 and token type 0 are the same for every sequence: slicing the
        # tables avoids two index tensors (and two embedding lookups) in the graph.
        length = ids.shape[1]
        x = self.word_embeddings(ids) + self.position_embeddings.weight[:length] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.heads
        self.query = nn.Linear(c.hidden, c.hidden)
        self.key = nn.Linear(c.hidden, c.hidden)
        self.value = nn.Linear(c.hidden, c.hidden)

    def split(self, x):
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, keep):
        """keep: bool [B, 1, 1, L], True where a key is a real token."""
        b, t, d = x.shape
        out = F.scaled_dot_product_attention(self.split(self.query(x)), self.split(self.key(x)),
                                             self.split(self.value(x)), attn_mask=keep)
        return out.transpose(1, 2).reshape(b, t, d)


class DenseLayerNorm(nn.Module):
    """BERT's post-LN sublayer output: LayerNorm(residual + dense(x))."""

    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(cin, cout)
        self.LayerNorm = nn.LayerNorm(cout, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(residual + self.dense(x))


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseLayerNorm(c.hidden, c.hidden, c.eps)

    def forward(self, x, keep):
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden, c.intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))  # the exact (erf) GELU BERT was trained with


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseLayerNorm(c.intermediate, c.hidden, c.eps)

    def forward(self, x, keep):
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.layers))

    def forward(self, x, keep):
        for layer in self.layer:
            x = layer(x, keep)
        return x


class BertClassifier(nn.Module):
    """BERT encoder, mean pooling over real tokens, then a Linear head named `classifier`."""

    is_text_classifier = True  # takes token ids (and an optional mask), not images

    def __init__(self, config: BertConfig = BertConfig(), num_classes: int = 2):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.classifier = nn.Linear(config.hidden, num_classes)
        init_weights(self)

    def embed(self, input_ids, attention_mask=None):
        """Mean of the last hidden states over non-padding tokens: [B, hidden]."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.bool()
        hidden = self.encoder(self.embeddings(input_ids), keep[:, None, None, :])
        weights = keep.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, input_ids, attention_mask=None):
        return self.classifier(self.embed(input_ids, attention_mask))


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def bert_tiny(num_classes: int = 2, vocab_size: int = 1000, max_positions: int = 128) -> BertClassifier:
    """A 2-layer, 64-wide BERT for tests and quick plans (random init)."""
    return BertClassifier(BertConfig(vocab_size, 64, 2, 2, 256, max_positions), num_classes)


def bert_minilm_l6(num_classes: int = 2) -> BertClassifier:
    """all-MiniLM-L6-v2's architecture (random init; see models.pretrained for the weights)."""
    return BertClassifier(BertConfig(), num_classes)
