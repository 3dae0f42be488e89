"""A zoo of Hugging Face `transformers` families that users fine-tune on edge devices, as data.

Every family is built offline from a tiny config (random weights, nothing downloaded):
`FAMILIES[name]` is a `Family` whose `build()` returns (model, loss_fn, batches) and whose
`partial` names two weight matrices (linear or conv) for ratio rules. `schemes(family, model)`
gives the schemes a test runs: "full" (None), "norms-biases" (every bias and every
normalization weight of the model, as patterns over the names that exist), "partial" (the two
weights at ratio 0.5) and "combined" (all of those at once).

`NOT_EXPORTABLE` lists the families torch.export itself cannot trace, with the error it
raises; `FAILS` the families that export but that edgetune does not compile or train as
PyTorch eager does, per scheme, with the exception, the reason and where in edgetune the gap is.
tests/e2e/test_zoo.py asserts both still fail that way, so a fix shows up as a failing test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.models.hf import causal_lm_loss
from tests.reference import padded_classifier_batches, padded_lm_batches

VOCAB = 128
LABELS = 3


# -- batches and losses ---------------------------------------------------------------------

def lm_batches():
    return padded_lm_batches(vocab=VOCAB)  # ((ids, mask), (labels,)): the second row padded


def text_batches():
    """((input_ids, attention_mask), (labels,)), the first row padded after 6 tokens; no id is
    one of the special tokens (pad, bos, eos: 0-2)."""
    return padded_classifier_batches(vocab=VOCAB, labels=LABELS, low=3)


def image_batches(n=2, size=32):
    g = torch.Generator().manual_seed(3)
    return [((torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),),
             (torch.randint(0, LABELS, (n,), generator=g),)) for _ in range(3)]


def audio_batches(n=2, samples=400):
    g = torch.Generator().manual_seed(4)
    return [((torch.randn(n, samples, generator=g, dtype=torch.float64),),
             (torch.randint(0, LABELS, (n,), generator=g),)) for _ in range(3)]


def features_batches(n=2, mels=8, frames=32):
    g = torch.Generator().manual_seed(5)
    return [((torch.randn(n, mels, frames, generator=g, dtype=torch.float64),),
             (torch.randint(0, LABELS, (n,), generator=g),)) for _ in range(3)]


def seq2seq_batches(n=2, t=10, t_dec=6):
    """((input_ids, attention_mask, decoder_input_ids), (labels,)): labels are the decoder
    inputs shifted left; the first row's source is padded after 7 tokens."""
    g = torch.Generator().manual_seed(6)
    batches = []
    for _ in range(3):
        mask = torch.ones(n, t, dtype=torch.int64)
        mask[0, 7:] = 0
        target = torch.randint(3, VOCAB, (n, t_dec + 1), generator=g)
        batches.append(((torch.randint(3, VOCAB, (n, t), generator=g), mask, target[:, :-1]), (target[:, 1:],)))
    return batches


def classifier_loss(outputs, labels):
    return F.cross_entropy(outputs.logits, labels)


def seq2seq_loss(outputs, labels):
    logits = outputs.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def hidden_state_loss(outputs, labels):
    """For a model without a head: the mean square of the last hidden state, shifted by the
    label so each sample's loss differs."""
    h = outputs.last_hidden_state
    return ((h - labels.to(h.dtype).view(-1, *[1] * (h.dim() - 1))) ** 2).mean()


# -- families -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    kind: str                      # decoder | encoder | vision | audio | seq2seq
    model_class: str               # transformers class, built with from_config
    config: Callable[[], object]   # the tiny config (imports transformers when called)
    loss: Callable
    batches: Callable[[], list]
    partial: tuple[str, str]       # two weight matrices for ratio rules
    rtol: float = 1e-7
    setup: Callable[[nn.Module], None] = field(default=lambda model: None)
    # The eager reference's own setup, where eager PyTorch cannot run the traced code path
    # in float64 (the same arithmetic by another implementation).
    reference_setup: Callable[[nn.Module], None] = field(default=lambda model: None)
    # A model whose forward takes other arguments between its inputs (GPT-2 and Falcon take
    # `cache` second) gets them by keyword: its batches' inputs are dicts of these names.
    keywords: tuple[str, ...] = ()

    def build(self, seed: int = 0):
        """(model in float64 eval mode, loss_fn, batches)."""
        import transformers

        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(self.config())
        self.setup(model)
        batches = self.batches()
        if self.keywords:
            batches = [(dict(zip(self.keywords, inputs)), targets) for inputs, targets in batches]
        return model.double().eval(), self.loss, batches


def _unit_gain(model):
    """He-initialised convolutions and batch norms of weight 1. Under transformers' init (std
    0.02 for both) the activations of a deep CNN vanish (logits ~1e-30): every loss is log(3)
    and no gradient reaches the convolutions, so the comparison would check nothing."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            nn.init.ones_(module.weight)


def _tf():
    import transformers

    return transformers


# transformers' decoders compute RMSNorm and the rotary tables in float32 even in a float64
# model, so both engines round to float32 there, in different orders (tests/e2e/test_hf_models.py).
DECODER_RTOL = 1e-5
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
LM = dict(vocab_size=VOCAB, max_position_embeddings=64, **SMALL)
GQA = dict(LM, num_key_value_heads=2)
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
TEXT = ("input_ids", "attention_mask")


def decoder(name, model_class, config, partial, **kw):
    return Family(name, "decoder", model_class, config, causal_lm_loss, lm_batches, partial,
                  rtol=kw.pop("rtol", DECODER_RTOL), **kw)


def encoder(name, model_class, config, partial, **kw):
    return Family(name, "encoder", model_class, config, classifier_loss, text_batches, partial, **kw)


def vision(name, model_class, config, partial, loss=classifier_loss, **kw):
    return Family(name, "vision", model_class, config, loss, image_batches, partial, **kw)


LLAMA_LIKE = ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")

_FAMILIES = [
    # -- decoders (causal LMs, next-token loss, padded batch) --
    decoder("gpt2", "GPT2LMHeadModel", lambda: _tf().GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, **TOKENS),
        ("transformer.h.1.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"), keywords=TEXT),
    decoder("gpt-neox", "GPTNeoXForCausalLM", lambda: _tf().GPTNeoXConfig(**LM, **TOKENS),
            ("gpt_neox.layers.1.attention.query_key_value.weight", "gpt_neox.layers.1.mlp.dense_h_to_4h.weight")),
    decoder("llama", "LlamaForCausalLM", lambda: _tf().LlamaConfig(**GQA, **TOKENS), LLAMA_LIKE),
    decoder("mistral", "MistralForCausalLM", lambda: _tf().MistralConfig(**GQA, sliding_window=8, **TOKENS),
            LLAMA_LIKE),
    decoder("qwen2", "Qwen2ForCausalLM", lambda: _tf().Qwen2Config(**GQA, **TOKENS), LLAMA_LIKE),
    decoder("qwen3", "Qwen3ForCausalLM", lambda: _tf().Qwen3Config(**GQA, head_dim=8, **TOKENS), LLAMA_LIKE),
    decoder("phi3", "Phi3ForCausalLM", lambda: _tf().Phi3Config(**GQA, **TOKENS),
            ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight")),
    decoder("gemma2", "Gemma2ForCausalLM", lambda: _tf().Gemma2Config(**GQA, head_dim=8, sliding_window=8, **TOKENS),
            LLAMA_LIKE),
    decoder("gemma3", "Gemma3ForCausalLM", lambda: _tf().Gemma3TextConfig(
        **GQA, head_dim=8, sliding_window=8, **TOKENS), LLAMA_LIKE),
    decoder("opt", "OPTForCausalLM", lambda: _tf().OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, **TOKENS),
        ("model.decoder.layers.1.self_attn.q_proj.weight", "model.decoder.layers.1.fc1.weight")),
    # OLMo's layer norms have no weights: attention biases give its norms-biases scheme something.
    decoder("olmo", "OlmoForCausalLM", lambda: _tf().OlmoConfig(**GQA, attention_bias=True, **TOKENS), LLAMA_LIKE),
    decoder("stablelm", "StableLmForCausalLM", lambda: _tf().StableLmConfig(**GQA, **TOKENS), LLAMA_LIKE),
    decoder("falcon", "FalconForCausalLM", lambda: _tf().FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **TOKENS),
        ("transformer.h.1.self_attention.query_key_value.weight", "transformer.h.1.mlp.dense_h_to_4h.weight"),
        keywords=TEXT),
    # Mixtral three ways: transformers' default experts implementation ("grouped_mm": sorts the
    # tokens by expert and calls a custom op), "batched_mm" (gathers each token's expert weights,
    # bmm) and "eager" (a Python loop over the experts hit). Traced, "grouped_mm" runs its
    # fallback op (edgetune/compiler/ir/ops/moe.py); eager PyTorch would call
    # torch's grouped_mm, which has no float64 kernel: the reference runs "batched_mm".
    decoder("mixtral", "MixtralForCausalLM", lambda: _tf().MixtralConfig(
        **GQA, num_local_experts=4, num_experts_per_tok=2, **TOKENS),
        ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"),
        reference_setup=lambda model: model.set_experts_implementation("batched_mm")),
    decoder("mixtral-batched-mm", "MixtralForCausalLM", lambda: _tf().MixtralConfig(
        **GQA, num_local_experts=4, num_experts_per_tok=2, **TOKENS),
        ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"),
        setup=lambda model: model.set_experts_implementation("batched_mm")),
    decoder("mixtral-eager", "MixtralForCausalLM", lambda: _tf().MixtralConfig(
        **GQA, num_local_experts=4, num_experts_per_tok=2, **TOKENS),
        ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"),
        setup=lambda model: model.set_experts_implementation("eager")),
    # -- encoders (sequence classification, padded batch) --
    encoder("bert", "BertForSequenceClassification", lambda: _tf().BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=LABELS, **SMALL),
        ("bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.1.intermediate.dense.weight")),
    encoder("roberta", "RobertaForSequenceClassification", lambda: _tf().RobertaConfig(
        vocab_size=VOCAB, max_position_embeddings=66, num_labels=LABELS, pad_token_id=1, **SMALL),
        ("roberta.encoder.layer.1.attention.self.query.weight", "roberta.encoder.layer.1.intermediate.dense.weight")),
    encoder("distilbert", "DistilBertForSequenceClassification", lambda: _tf().DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
        num_labels=LABELS), ("distilbert.transformer.layer.1.attention.q_lin.weight",
                             "distilbert.transformer.layer.1.ffn.lin1.weight")),
    encoder("albert", "AlbertForSequenceClassification", lambda: _tf().AlbertConfig(
        vocab_size=VOCAB, embedding_size=16, max_position_embeddings=64, num_labels=LABELS, **SMALL),
        ("albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query.weight",
         "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight")),
    encoder("electra", "ElectraForSequenceClassification", lambda: _tf().ElectraConfig(
        vocab_size=VOCAB, embedding_size=16, max_position_embeddings=64, num_labels=LABELS, **SMALL),
        ("electra.encoder.layer.1.attention.self.query.weight", "electra.encoder.layer.1.intermediate.dense.weight")),
    encoder("deberta-v2", "DebertaV2ForSequenceClassification", lambda: _tf().DebertaV2Config(
        vocab_size=VOCAB, max_position_embeddings=64, num_labels=LABELS, relative_attention=True,
        position_buckets=8, pos_att_type=["p2c", "c2p"], **SMALL),
        ("deberta.encoder.layer.1.attention.self.query_proj.weight",
         "deberta.encoder.layer.1.intermediate.dense.weight")),
    # -- vision (3x32x32 images, 3 classes) --
    vision("vit", "ViTForImageClassification", lambda: _tf().ViTConfig(
        image_size=32, patch_size=8, num_labels=LABELS, **SMALL),
        ("vit.layers.1.attention.q_proj.weight", "vit.layers.1.mlp.fc1.weight")),
    vision("deit", "DeiTForImageClassification", lambda: _tf().DeiTConfig(
        image_size=32, patch_size=8, num_labels=LABELS, **SMALL),
        ("deit.layers.1.attention.q_proj.weight", "deit.layers.1.mlp.fc1.weight")),
    vision("dinov2", "Dinov2Model", lambda: _tf().Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2),
        ("encoder.layer.1.attention.q_proj.weight", "encoder.layer.1.mlp.fc1.weight"),
        loss=hidden_state_loss),
    vision("swin", "SwinForImageClassification", lambda: _tf().SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=LABELS), ("swin.encoder.layers.1.blocks.0.attention.q_proj.weight",
                             "swin.encoder.layers.1.blocks.0.mlp.fc1.weight")),
    vision("convnext", "ConvNextForImageClassification", lambda: _tf().ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=LABELS),
        ("convnext.encoder.stages.1.layers.0.dwconv.weight", "convnext.encoder.stages.1.layers.0.pwconv1.weight")),
    vision("resnet", "ResNetForImageClassification", lambda: _tf().ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=LABELS),
        ("resnet.encoder.stages.1.layers.0.layer.0.convolution.weight",
         "resnet.encoder.stages.1.layers.0.layer.1.convolution.weight")),
    vision("regnet", "RegNetForImageClassification", lambda: _tf().RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=LABELS),
        ("regnet.encoder.stages.1.layers.0.layer.0.convolution.weight",
         "regnet.encoder.stages.1.layers.0.layer.1.convolution.weight")),
    vision("mobilenetv2", "MobileNetV2ForImageClassification", lambda: _tf().MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_labels=LABELS),
        ("mobilenet_v2.layer.15.expand_1x1.convolution.weight", "mobilenet_v2.layer.15.conv_3x3.convolution.weight"),
        setup=_unit_gain),
    vision("mobilevit", "MobileViTForImageClassification", lambda: _tf().MobileViTConfig(
        image_size=32, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
        num_attention_heads=2, num_labels=LABELS),
        ("mobilevit.encoder.layer.4.transformer.layer.0.attention.attention.query.weight",
         "mobilevit.encoder.layer.4.conv_1x1.convolution.weight"), setup=_unit_gain),
    vision("efficientnet", "EfficientNetForImageClassification", lambda: _tf().EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=LABELS),
        ("efficientnet.encoder.blocks.3.expansion.expand_conv.weight",
         "efficientnet.encoder.blocks.3.projection.project_conv.weight"), setup=_unit_gain),
    # -- audio --
    Family("wav2vec2", "audio", "Wav2Vec2ForSequenceClassification", lambda: _tf().Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        classifier_proj_size=16, num_labels=LABELS), classifier_loss, audio_batches,
        ("wav2vec2.encoder.layers.1.attention.q_proj.weight", "wav2vec2.feature_extractor.conv_layers.1.conv.weight")),
    # Whisper's encoder with a classification head (the decoder is not part of the model).
    Family("whisper-encoder", "audio", "WhisperForAudioClassification", lambda: _tf().WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4,
        decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=16, classifier_proj_size=16, num_labels=LABELS, decoder_start_token_id=1, **TOKENS),
        classifier_loss, features_batches,
        ("encoder.layers.1.self_attn.q_proj.weight", "encoder.conv2.weight")),
    # -- seq2seq (teacher-forced decoder inputs, token cross-entropy) --
    Family("t5", "seq2seq", "T5ForConditionalGeneration", lambda: _tf().T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
        seq2seq_loss, seq2seq_batches, ("encoder.block.1.layer.0.SelfAttention.q.weight",
                                        "decoder.block.1.layer.2.DenseReluDense.wi.weight")),
    Family("bart", "seq2seq", "BartForConditionalGeneration", lambda: _tf().BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, **TOKENS),
        seq2seq_loss, seq2seq_batches, ("model.encoder.layers.1.self_attn.q_proj.weight",
                                        "model.decoder.layers.1.fc1.weight")),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILIES}


# -- schemes --------------------------------------------------------------------------------

def norms_and_biases(model: nn.Module) -> dict[str, str]:
    """{pattern: "full"} for every bias and every normalization layer's weight, as patterns
    over the names the model has ("*.bias", "*.input_layernorm.weight", ...)."""
    names = {n for n, _ in model.named_parameters()}
    patterns = {}
    if any(n.endswith(".bias") for n in names):
        patterns["*.bias"] = "full"
    for path, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and f"{path}.weight" in names:
            patterns[f"*{path.rpartition('.')[2]}.weight"] = "full"
    return patterns


def schemes(family: Family, model: nn.Module) -> dict[str, dict | None]:
    partial = {name: 0.5 for name in family.partial}
    return {"full": None, "norms-biases": norms_and_biases(model), "partial": partial,
            "combined": {**partial, **norms_and_biases(model)}}


SCHEMES = ("full", "norms-biases", "partial", "combined")

# The default run's cases, each under the combined scheme: one family per mechanism (rotary
# GQA, QK norms, fused projections, learned positions, MoE, relative-position attention, patch
# and window attention, depthwise and grouped convs, audio front ends, encoder-decoder), as
# `make test` has ~90 s for the zoo: torch.export alone takes 2-20 s a family here. The rest,
# and every other scheme, run with --zoo-full.
DEFAULT = ("llama", "qwen3", "phi3", "opt", "mixtral", "bert", "deberta-v2", "vit", "swin", "convnext",
           "regnet", "wav2vec2", "whisper-encoder", "t5")


@dataclass(frozen=True)
class Gap:
    """A family x scheme that exports but that edgetune does not compile, or trains unlike eager."""
    raises: type
    reason: str


# Families torch.export itself cannot trace (model + loss, strict=False): name -> (a part of)
# its error message.
NOT_EXPORTABLE: dict[str, str] = {
    # for expert_idx in expert_hit (a nonzero()): a loop over a data-dependent count.
    "mixtral-eager": "Could not guard on data-dependent expression",
}

# Families that export but fail in edgetune: (name, scheme, or "*" for every scheme) -> the gap.
FAILS: dict[tuple[str, str], Gap] = {
}
