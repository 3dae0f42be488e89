"""A tiny Llama-style decoder LM with Hugging Face's layer names (embed_tokens,
layers.N.self_attn.q_proj, layers.N.mlp.gate_proj, norm, lm_head). RMSNorm, rotary
positions, grouped-query attention, SwiGLU, and an lm_head tied to the embedding."""
import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Plain pow/mean/rsqrt/mul, so every engine that knows these ops can differentiate it.
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0):
    """cos/sin for rotate-half RoPE, each [max_seq_len, head_dim] (frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(max_seq_len).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def heads(self, x, n):
        b, t, _ = x.shape
        return x.reshape(b, t, n, self.head_dim).transpose(1, 2)  # [B, n, T, head_dim]

    def repeat_kv(self, x):
        # GQA: each kv head serves n_heads / n_kv_heads query heads.
        b, n, t, d = x.shape
        rep = self.n_heads // n
        return x[:, :, None].expand(b, n, rep, t, d).reshape(b, n * rep, t, d)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = apply_rope(self.heads(self.q_proj(x), self.n_heads), cos, sin)
        k = apply_rope(self.heads(self.k_proj(x), self.n_kv_heads), cos, sin)
        v = self.heads(self.v_proj(x), self.n_kv_heads)
        out = F.scaled_dot_product_attention(q, self.repeat_kv(k), self.repeat_kv(v),
                                             is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    is_language_model = True  # callers feed token ids [B, T], not images, and get [B, T, V]

    def __init__(self, vocab_size: int = 256, dim: int = 64, n_layers: int = 2,
                 n_heads: int = 4, n_kv_heads: int = 2, hidden_dim: int = 128,
                 max_seq_len: int = 128, rope_theta: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            DecoderLayer(dim, n_heads, n_kv_heads, hidden_dim, eps) for _ in range(n_layers))
        self.norm = RMSNorm(dim, eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one Parameter, two uses
        cos, sin = rope_tables(dim // n_heads, max_seq_len, rope_theta)
        # Derived from the config, so kept out of the state_dict (like HF's inv_freq).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self)

    def forward(self, input_ids):
        t = input_ids.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))  # logits [B, T, vocab]


def init_weights(model: nn.Module) -> None:
    """HF Llama's initialisation: normal(0, 0.02) for every Linear and the embedding."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)


def llama_tiny(num_classes: int = 256, **kw):
    """`num_classes` is the vocabulary size, so every registry entry is built the same way."""
    return Llama(num_classes, **kw)
