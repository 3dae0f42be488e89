import torch

from edgetune.models import build
from edgetune.models.vit import Attention


def test_forward_and_names():
    model = build("vit", num_classes=10).eval()
    names = [n for n, _ in model.named_parameters()]
    for name in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight",
                 "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.1.mlp.fc1.weight",
                 "blocks.1.mlp.fc2.bias", "norm.weight", "head.weight", "head.bias"]:
        assert name in names
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 64)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_attention_matches_per_head_softmax():
    attn = Attention(dim=16, num_heads=4).eval()
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)  # the qkv output is laid out [q | k | v]
    outs = []
    for h in range(4):
        s = slice(4 * h, 4 * h + 4)  # head h owns a contiguous block of 4 features
        w = torch.softmax(q[..., s] @ k[..., s].mT / 2.0, dim=-1)
        outs.append(w @ v[..., s])
    expected = attn.proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x), expected)
