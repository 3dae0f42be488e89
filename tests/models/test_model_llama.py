import torch

from edgetune.models import build
from edgetune.models.llama import Attention, apply_rope, rope_tables


def test_forward_and_names():
    model = build("llama", num_classes=100).eval()
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "embed_tokens.weight" and names[-1] == "norm.weight"
    for name in ["layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
                 "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
                 "layers.0.mlp.up_proj.weight", "layers.1.mlp.down_proj.weight",
                 "layers.1.input_layernorm.weight", "layers.1.post_attention_layernorm.weight"]:
        assert name in names
    assert model(torch.randint(0, 100, (2, 16))).shape == (2, 16, 100)
    assert model.is_language_model and not getattr(build("vit"), "is_language_model", False)


def test_lm_head_is_tied_to_embedding():
    model = build("llama")
    assert model.lm_head.weight is model.embed_tokens.weight
    # named_parameters lists a shared Parameter once; the rope tables are not state.
    assert "lm_head.weight" not in dict(model.named_parameters())
    assert not any("rope" in k for k in model.state_dict())


def test_is_causal():
    model = build("llama").eval()
    ids = torch.randint(0, 256, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 256
    torch.testing.assert_close(model(ids)[:, :-1], model(changed)[:, :-1])


def test_gqa_shares_each_kv_head_across_consecutive_query_heads():
    attn = Attention(dim=32, n_heads=4, n_kv_heads=2)
    kv = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(attn.repeat_kv(kv), kv.repeat_interleave(2, dim=1))


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_tables(head_dim=8, max_seq_len=16)
    q, k = torch.randn(8), torch.randn(8)

    def score(i, j):
        return apply_rope(q, cos[i], sin[i]) @ apply_rope(k, cos[j], sin[j])

    torch.testing.assert_close(score(3, 1), score(10, 8))
    torch.testing.assert_close(apply_rope(q, cos[5], sin[5]).norm(), q.norm())
